"""Fan catalog items out to the multi-agent chain of thought and write silver.item_knowledge.

Incremental by content: the work set is the items whose (item_id, content_hash, prompt_version,
model) has no knowledge row yet, so an unchanged nightly rerun makes zero LLM calls. The work set is
repartitioned so that partitions x per-partition concurrency equals the configured in-flight total
(the server's batch capacity); each partition runs the async client inside `mapInArrow`. Items
that still fail after retries go to silver.quarantine with the reason and the raw answer, and are
picked up again by the next run, until `llm.dead_letter_after` failed attempts of the same content,
prompt version and model (counted in ops.llm_attempts): from then on the item is skipped and written
to the quarantine as `dead_letter` in every run, until its content, the prompt or the model changes or
an operator requeues it (`python -m jobs.cli requeue-llm`; see jobs/dead_letter.py).
"""

from __future__ import annotations

import json
import logging
import sys
import time

from jobs import dead_letter
from jobs.context import JobResult, RunContext
from jobs.runtime import StageFailed, cli_main, write_quarantine

log = logging.getLogger("reaseq")

RESULT_DDL = (
    "item_id string, content_hash string, prompt_version string, model string, category_path array<string>, "
    "product_type string, attributes_json string, price_tier string, audiences array<string>, "
    "scenarios array<string>, occasions array<string>, complements array<string>, substitutes array<string>, "
    "summary string, field_confidence_json string, traces string, tokens_in long, tokens_out long, "
    "llm_calls int, latency_ms double, status string, error string, raw string"
)


def llm_config(ctx: RunContext, partitions: int):
    from llm_agents import LLMConfig

    cfg = dict(ctx.config.get("llm") or {})
    total = int(cfg.pop("max_concurrency", 64))
    cfg.pop("partitions", None)
    allowed = set(LLMConfig.model_fields)
    cfg = {k: v for k, v in cfg.items() if k in allowed and v is not None}
    if cfg.get("backend", "offline") == "offline":
        cfg.pop("model", None)
    return LLMConfig(**cfg, max_concurrency=max(1, total // max(1, partitions)))


def _partition_fn(config_json: str, schema):
    """One Spark task: the partition's items through the async multi-agent client, as Arrow.

    mapInArrow rather than mapInPandas: the rows become plain dicts either way, and a fresh Python
    worker then never imports pandas (about 1.2 s of a 2-core machine's time per worker, paid before
    the first request could leave).
    """

    def fn(batches):
        import pyarrow as pa

        from llm_agents import ItemInput, LLMConfig, reason_items

        config = LLMConfig.model_validate_json(config_json)
        items = [ItemInput.from_record(r) for b in batches for r in b.to_pylist()]
        if not items:
            return
        start = time.monotonic()
        last = [start]

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if now - last[0] >= 5 or done == total:
                last[0] = now
                rate = done / max(now - start, 1e-9)
                eta = (total - done) / rate if rate else float("inf")
                print(f"reason_items partition: {done}/{total} items, {rate:.1f}/s, ETA {eta:.0f}s",
                      file=sys.stderr, flush=True)

        results = reason_items(items, config, progress=progress)
        out = []
        for r in results:
            d = r.__dict__.copy()
            d["attributes_json"] = json.dumps(d.pop("attributes") or {}, ensure_ascii=False)
            d["field_confidence_json"] = json.dumps(d.pop("field_confidence") or {})
            out.append(d)
        yield pa.RecordBatch.from_pylist(out, schema=schema)

    return fn


def current_items(ctx: RunContext):
    from feature_store import delta

    return delta.read_spark(ctx.spark, "bronze.catalog_items", ctx.root)


def work_set(ctx: RunContext, prompt_version: str, model: str):
    """Items whose current content has no knowledge row for this prompt version and model."""
    from pyspark.sql import functions as F

    from feature_store import delta

    items = current_items(ctx)
    if not delta.exists("silver.item_knowledge", ctx.root):
        return items
    known = (
        delta.read_spark(ctx.spark, "silver.item_knowledge", ctx.root)
        .filter((F.col("prompt_version") == prompt_version) & (F.col("model") == model))
        .select("item_id", "content_hash")
    )
    return items.join(known, ["item_id", "content_hash"], "left_anti")


def attempts(ctx: RunContext, prompt_version: str, model: str):
    """This prompt version's and model's failure counters (ops.llm_attempts, created empty if missing)."""
    from pyspark.sql import functions as F

    from feature_store import delta
    from feature_store.catalog import get

    if not delta.exists(dead_letter.TABLE, ctx.root):
        delta.ensure_table(ctx.spark, get(dead_letter.TABLE), ctx.root)
    return (
        delta.read_spark(ctx.spark, dead_letter.TABLE, ctx.root)
        .filter((F.col("prompt_version") == prompt_version) & (F.col("model") == model))
    )


def _log_dead_letters(dead: list[dict], newly: list[str], limit: int, prompt_version: str, model: str) -> None:
    hint = f"fix the cause (silver.quarantine has each failure's reason and raw answer), then requeue: " \
           f"{dead_letter.REQUEUE_CMD} --item ID [ID ...] or --all ({dead_letter.REQUEUE_CMD} --list shows them)"
    if dead:
        ids = ", ".join(r["item_id"] for r in dead[:5]) + (", …" if len(dead) > 5 else "")
        log.warning("reason_items: skipped %d dead-lettered item(s) (%d or more failed attempts with prompt %s and "
                    "model %s; quarantined as %s): %s; %s", len(dead), limit, prompt_version, model,
                    dead_letter.REASON, ids, hint)
    if newly:
        ids = ", ".join(newly[:5]) + (", …" if len(newly) > 5 else "")
        log.warning("reason_items: %d item(s) reached %d failed attempts and are dead-lettered from the next run "
                    "on: %s; %s", len(newly), limit, ids, hint)


def run(ctx: RunContext) -> JobResult:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import to_arrow_schema

    from feature_store import delta
    from llm_agents import PROMPT_VERSION, model_name

    spark = ctx.spark
    partitions = int((ctx.config.get("llm") or {}).get("partitions", 4))
    config = llm_config(ctx, partitions)
    model = model_name(config)
    limit = config.dead_letter_after
    pending = work_set(ctx, PROMPT_VERSION, model)
    counters = attempts(ctx, PROMPT_VERSION, model)
    todo, dead = pending, []
    if limit > 0:
        over = counters.filter(F.col("failures") >= limit)
        todo = pending.join(over.select("item_id", "content_hash"), ["item_id", "content_hash"], "left_anti")
        dead = [r.asDict() for r in over.join(pending.select("item_id", "content_hash"),
                                              ["item_id", "content_hash"], "left_semi").collect()]
    dead.sort(key=lambda r: r["item_id"])
    dead_records = [
        {"source_table": "silver.item_knowledge", "key": r["item_id"], "stage": "reason_items",
         "reason": dead_letter.dead_letter_reason(r, limit),
         "payload": json.dumps({k: r[k] for k in (
             "content_hash", "prompt_version", "model", "failures", "total_failures", "last_reason",
             "first_failed_ds", "last_failed_ds", "last_failed_run_id", "requeued_at")}, default=str)}
        for r in dead
    ]
    total_items = current_items(ctx).count()
    # Computed once, counted, then fanned out from the cache (not planned and read a second time).
    todo = todo.repartition(partitions, "item_id").persist(StorageLevel.MEMORY_AND_DISK)
    n = todo.count()
    log.info("reason_items: %d of %d items need knowledge, %d skipped as dead-lettered (prompt %s, model %s, "
             "%d partitions x %d in flight)", n, total_items, len(dead), PROMPT_VERSION, model, partitions,
             config.max_concurrency)
    metrics = {"prompt_version": PROMPT_VERSION, "model": model, "work_set": n, "catalog": total_items,
               "partitions": partitions, "per_partition_concurrency": config.max_concurrency,
               "dead_letter_after": limit, "dead_lettered_skipped": len(dead)}
    if n == 0:
        todo.unpersist()
        write_quarantine(ctx, dead_records)
        _log_dead_letters(dead, [], limit, PROMPT_VERSION, model)
        return JobResult(rows_in=len(dead), rows_out=0, rows_quarantined=len(dead),
                         metrics={**metrics, "llm_calls": 0, "failed": 0, "newly_dead_lettered": 0})
    result_schema = to_arrow_schema(spark.createDataFrame([], RESULT_DDL).schema)
    t0 = time.monotonic()
    try:
        results = (
            todo.mapInArrow(_partition_fn(config.model_dump_json(), result_schema), RESULT_DDL)
            .localCheckpoint(eager=True)  # the LLM answers are computed exactly once
        )
    except Exception as exc:  # a circuit opened inside a worker arrives wrapped by Spark
        lines = [x for x in str(exc).splitlines() if "BackendUnavailable: " in x]
        if lines:
            raise StageFailed(lines[-1].split("BackendUnavailable: ", 1)[-1].strip()) from None
        raise
    finally:
        todo.unpersist()
    seconds = time.monotonic() - t0
    ok = results.filter(F.col("status") == "ok")
    knowledge = (
        ok.withColumn("attributes", F.from_json("attributes_json", "map<string,string>"))
        .withColumn("field_confidence", F.from_json("field_confidence_json", "map<string,double>"))
        .withColumn("ds", F.lit(ctx.ds))
        .withColumn("run_id", F.lit(ctx.run_id))
    )
    n_ok = knowledge.count()
    if n_ok:
        delta.merge(spark, knowledge, "silver.item_knowledge", ctx.root)
    failed = results.filter(F.col("status") != "ok").select("item_id", "content_hash", "error", "raw").collect()
    write_quarantine(ctx, [
        {
            "source_table": "silver.item_knowledge",
            "key": r["item_id"],
            "stage": "reason_items",
            "reason": (r["error"] or "failed")[:500],
            "payload": json.dumps({"content_hash": r["content_hash"], "prompt_version": PROMPT_VERSION,
                                   "model": model, "raw": (r["raw"] or "")[:4000]}),
        }
        for r in failed
    ] + dead_records)
    # Count this run's failures (and close the counters of keys that succeeded now).
    seen = counters.join(results.select("item_id", "content_hash", F.col("status").alias("_now")),
                         ["item_id", "content_hash"], "inner").collect()
    previous = {tuple(r[k] for k in dead_letter.KEY): {k: v for k, v in r.asDict().items() if k != "_now"}
                for r in seen}
    rows = dead_letter.attempt_rows(
        previous,
        [{"item_id": r["item_id"], "content_hash": r["content_hash"], "prompt_version": PROMPT_VERSION,
          "model": model, "reason": r["error"]} for r in failed],
        [tuple(r[k] for k in dead_letter.KEY) for r in seen if r["_now"] == "ok"],
        ctx.ds, ctx.run_id,
    )
    if rows:
        from feature_store.catalog import get

        delta.merge(spark, spark.createDataFrame(rows, delta.spark_schema(get(dead_letter.TABLE))),
                    dead_letter.TABLE, ctx.root)
    newly = sorted(r["item_id"] for r in rows if r["status"] == "failing" and 0 < limit <= r["failures"])
    _log_dead_letters(dead, newly, limit, PROMPT_VERSION, model)
    agg = results.agg(F.sum("tokens_in"), F.sum("tokens_out"), F.sum("llm_calls")).collect()[0]
    metrics.update({
        "ok": n_ok, "failed": len(failed), "seconds": round(seconds, 2),
        "items_per_second": round(n / seconds, 2) if seconds else None,
        "tokens_in": int(agg[0] or 0), "tokens_out": int(agg[1] or 0), "llm_calls": int(agg[2] or 0),
        "newly_dead_lettered": len(newly),
    })
    # Every input item ends as a knowledge row or a quarantine row (a failure, or a dead letter).
    return JobResult(rows_in=n + len(dead), rows_out=n_ok, rows_quarantined=len(failed) + len(dead),
                     metrics=metrics)


if __name__ == "__main__":
    raise SystemExit(cli_main("reason_items"))
