"""Embed each item's title + knowledge summary + key attributes into silver.item_embeddings.

The embedded text is hashed; an item is re-embedded only when that hash changes (new title, new
knowledge after a prompt bump), so an unchanged rerun embeds nothing and leaves the table version,
and with it the codebook version, as it was. Items without usable text are quarantined.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from jobs.context import JobResult, RunContext
from jobs.progress import progress_line
from jobs.runtime import cli_main, write_quarantine

log = logging.getLogger("reaseq")

MIN_TEXT_CHARS = 3


def embedding_text_column():
    """title. summary. key attributes — built in Spark so the hash is computed where the data is."""
    from pyspark.sql import functions as F

    attrs = F.array_join(
        F.transform(
            F.array_sort(F.map_entries(F.coalesce(F.col("k_attributes"), F.create_map().cast("map<string,string>")))),
            lambda e: F.concat(e["key"], F.lit(": "), e["value"]),
        ),
        "; ",
    )
    return F.trim(F.concat_ws(" ", F.col("title"), F.coalesce(F.col("summary"), F.lit("")), attrs))


def _partition_fn(config_dict: dict, threads: int):
    def fn(frames):
        import numpy as np
        import pandas as pd
        import torch

        from models.embedder import EmbedderConfig, embed_texts

        # One worker per core: more torch threads than that oversubscribe the cores and stall OpenMP.
        torch.set_num_threads(threads)

        config = EmbedderConfig.from_dict(config_dict)
        frames = [f for f in frames if not f.empty]
        if not frames:
            return
        frame = pd.concat(frames, ignore_index=True)
        total, start, chunk = len(frame), time.monotonic(), max(config.batch_size * 4, 256)
        for lo in range(0, total, chunk):
            part = frame.iloc[lo : lo + chunk]
            vecs = embed_texts(part["text"].tolist(), config)
            done = min(lo + chunk, total)
            print(progress_line("embed_items partition", done, total, time.monotonic() - start, "texts"),
                  file=sys.stderr, flush=True)
            # Plain arrays, not the frame's own: pandas 3 keeps strings in Arrow, and after the concat above
            # (a partition larger than one Arrow batch, 10,000 rows) in several chunks, which pyspark's
            # serializer rejects ("Expected Array, got ChunkedArray": it broke bench-scale at 100,000).
            yield pd.DataFrame({
                "item_id": part["item_id"].to_numpy(dtype=object),
                "text_hash": part["text_hash"].to_numpy(dtype=object),
                "prompt_version": part["prompt_version"].to_numpy(dtype=object),
                "model": part["model"].to_numpy(dtype=object),
                "embedding": list(vecs.astype(np.float32)),
                "dim": np.full(len(part), vecs.shape[1], dtype=np.int32),
            })

    return fn


def run(ctx: RunContext) -> JobResult:
    from pyspark.sql import functions as F

    from feature_store import delta
    from jobs.llm import llm_config
    from llm_agents import PROMPT_VERSION, model_name
    from models.embedder import EmbedderConfig

    spark = ctx.spark
    config = EmbedderConfig.from_dict(ctx.config.get("embedding"))
    items = delta.read_spark(spark, "bronze.catalog_items", ctx.root).select("item_id", "content_hash", "title")
    model = model_name(llm_config(ctx, 1))
    if delta.exists("silver.item_knowledge", ctx.root):
        know = (
            delta.read_spark(spark, "silver.item_knowledge", ctx.root)
            .filter((F.col("prompt_version") == PROMPT_VERSION) & (F.col("model") == model))
            .select("item_id", "content_hash", "summary", F.col("attributes").alias("k_attributes"),
                    "prompt_version", "model")
        )
        items = items.join(know, ["item_id", "content_hash"], "left")
    else:
        items = (items.withColumn("summary", F.lit(None).cast("string"))
                 .withColumn("k_attributes", F.lit(None).cast("map<string,string>"))
                 .withColumn("prompt_version", F.lit(None).cast("string"))
                 .withColumn("model", F.lit(None).cast("string")))
    texts = items.withColumn("text", embedding_text_column()).withColumn("text_hash", F.sha2("text", 256))
    usable = F.length(F.regexp_replace("text", r"[^\p{L}\p{N}]", "")) >= MIN_TEXT_CHARS
    bad = texts.filter(~usable).select("item_id", "text").collect()
    texts = texts.filter(usable)
    texts = texts.localCheckpoint(eager=True)
    total, with_knowledge = texts.agg(F.count("*"), F.count("summary")).first()
    if delta.exists("silver.item_embeddings", ctx.root):
        have = (delta.read_spark(spark, "silver.item_embeddings", ctx.root)
                .filter(F.col("embedder") == config.name).select("item_id", "text_hash"))
        todo = texts.join(have, ["item_id", "text_hash"], "left_anti")
    else:
        todo = texts
    todo = todo.select("item_id", "text", "text_hash", "prompt_version", "model")
    n = todo.count()
    log.info("embed_items: %d of %d items need embedding with %s", n, total, config.name)
    t0 = time.monotonic()
    written = 0
    if n:
        cores = spark.sparkContext.defaultParallelism
        parts = max(1, min(cores, n // 256 + 1))
        threads = max(1, (os.cpu_count() or 1) // parts) if spark.sparkContext.master.startswith("local") else 1
        out = (
            todo.repartition(parts, "item_id")
            .mapInPandas(_partition_fn(config.__dict__, threads),
                         "item_id string, text_hash string, prompt_version string, model string, "
                         "embedding array<float>, dim int")
            .withColumn("embedder", F.lit(config.name))
            .withColumn("ds", F.lit(ctx.ds))
            .withColumn("run_id", F.lit(ctx.run_id))
            .localCheckpoint(eager=True)
        )
        delta.merge(spark, out, "silver.item_embeddings", ctx.root)
        written = n
    seconds = time.monotonic() - t0
    q = write_quarantine(ctx, [
        {"source_table": "silver.item_embeddings", "key": r["item_id"], "stage": "embed_items",
         "reason": "no_usable_text: fewer than 3 letters or digits to embed", "payload": r["text"]}
        for r in bad
    ])
    return JobResult(rows_in=total + len(bad), rows_out=written, rows_quarantined=q, metrics={
        "embedder": config.name, "embedded": written, "unchanged": total - n,
        # Items whose text includes the model's summary; the rest are embedded from the title alone
        # until the model answers them (they wait in its backlog), then re-embedded.
        "items_with_knowledge": int(with_knowledge or 0), "items": int(total or 0),
        "texts_per_second": round(n / seconds, 1) if n and seconds else None,
    })


if __name__ == "__main__":
    raise SystemExit(cli_main("embed_items"))
