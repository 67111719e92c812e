"""Infer beyond-log behaviours per user into gold.user_augmented_behaviors.

Default method `diffusion` (models.diffusion): a masked discrete diffusion model over the items' semantic
tokens, trained on training prefixes only (each user's history without the validation and test targets),
then asked, for every user, to fill masked item slots after the user's history (every event but the
test target). The model version hashes the model configuration, the codebook version and the exact
training sequences, so an unchanged rerun loads its checkpoint from artifacts/diffusion/<version>/ and
trains nothing. Method `llm` (jobs.beyond_llm) asks the llm_agents backend for interests beyond the
history and maps them to items by embedding similarity.

The table holds the current inference of the configured method only: rows of other model versions are
deleted by the MERGE, so consumers never mix models. Every user of gold.user_sequences gets a row;
those without an inference say why in `status` (history_too_short, no_semantic_ids, no_candidates).

Training and inference run in the driver process with torch (CPU threads, or CUDA when present): the
work is one model over all users, not a per-row map, and sequences are read from a pinned Delta version
through Arrow. Spark only writes the result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from jobs.context import JobResult, RunContext
from jobs.progress import Progress
from jobs.runtime import cli_main

log = logging.getLogger("reaseq")


def diffusion_config(ctx: RunContext):
    from models.diffusion import DiffusionConfig

    cfg = dict(ctx.config["beyond_log"]["diffusion"])
    # The model cannot see more history than gold.user_sequences keeps.
    cfg["max_len"] = min(cfg["max_len"], ctx.config["sequences"]["max_len"])
    return DiffusionConfig.from_dict(cfg)


def load_vocab(root: str, codebook_version: str, version: int | None = None):
    """The semantic-ID vocabulary (RQ codes with the collision digit) of one codebook version."""
    import pyarrow.compute as pc

    from feature_store import delta
    from models.diffusion import SemanticVocab

    t = delta.read_arrow("gold.item_semantic_ids", root, version=version, columns=["item_id", "rq_codes"],
                         filter=pc.field("codebook_version") == codebook_version)
    ids, codes = t["item_id"].to_pylist(), t["rq_codes"].to_pylist()
    keep = [i for i, c in enumerate(codes) if c]
    return SemanticVocab.build([ids[i] for i in keep], [codes[i] for i in keep])


def load_sequences(root: str, version: int | None = None) -> list[tuple[str, list[str]]]:
    from feature_store import delta

    out = []
    for batch in delta.arrow_batches("gold.user_sequences", root, version=version, columns=["user_id", "item_ids"]):
        out += list(zip(batch.column("user_id").to_pylist(), batch.column("item_ids").to_pylist(), strict=True))
    out.sort()
    return out


def training_prefixes(vocab, sequences, drop: int = 2) -> tuple[list[list[int]], int]:
    """Item-index sequences without each user's last `drop` events; (sequences, events skipped).

    drop=2 leaves out the validation and test targets (the published model); drop=3 also the last
    training target (the as-of model behind the ranker's point-in-time contexts).
    """
    train, skipped = [], 0
    for _, items in sequences:
        items = items or []
        prefix = items[:-drop] if len(items) > drop else []
        idx, miss = vocab.encode(prefix)
        skipped += miss
        if len(idx) >= 2:
            train.append(idx)
    return train, skipped


def fingerprint(seqs: list[list[int]], vocab) -> str:
    h = hashlib.sha256()
    for s in seqs:
        h.update(("\x1f".join(vocab.item_ids[i] for i in s) + "\x1e").encode())
    return h.hexdigest()[:16]


def train_or_load(ctx: RunContext, vocab, train_seqs, codebook_version: str):
    """(model, version, reused, train stats dict) for these training sequences."""
    return train_or_load_at(ctx.artifacts, diffusion_config(ctx), vocab, train_seqs, codebook_version)


def train_or_load_at(artifacts: str, cfg, vocab, train_seqs, codebook_version: str, latest: bool = True):
    """train_or_load under an artifacts folder and a given config; `latest` records it in diffusion/LATEST."""
    from models import diffusion as D

    version = D.model_version(cfg, codebook_version, fingerprint(train_seqs, vocab))
    path = Path(artifacts) / "diffusion" / version
    if (path / "model.pt").exists():
        log.info("infer_beyond_log: %s already trained; reusing it", version)
        meta = json.loads((path / "meta.json").read_text())
        return D.load(path, cfg.device), version, True, meta.get("train", {})
    log.info("infer_beyond_log: training %s on %d sequences (%d epochs)", version, len(train_seqs), cfg.epochs)
    model, stats = D.train(vocab, train_seqs, cfg, progress=log.info)
    train_meta = {"sequences": stats.sequences, "epochs": stats.epochs, "steps": stats.steps,
                  "seconds": round(stats.seconds, 2), "first_loss": round(stats.first_loss, 4),
                  "last_loss": round(stats.last_loss, 4)}
    D.save(model, vocab, path, {"model_version": version, "codebook_version": codebook_version,
                                "items": len(vocab.item_ids), "config": cfg.__dict__, "train": train_meta})
    if latest:
        (path.parent / "LATEST").write_text(version)
    return model, version, False, train_meta


def infer_diffusion(ctx: RunContext, sequences, codebook_version: str, top_n: int, min_history: int):
    """Rows for every user (dicts in the table's columns but ds/run_id) and the job's metrics."""
    from models import diffusion as D

    vocab = load_vocab(ctx.root, codebook_version)
    train_seqs, skipped_train = training_prefixes(vocab, sequences)
    model, version, reused, train_meta = train_or_load(ctx, vocab, train_seqs, codebook_version)

    rows, todo = [], []
    for user_id, items in sequences:
        history = (items or [])[:-1]  # every event but the test target
        idx, _ = vocab.encode(history)
        base = {"user_id": user_id, "model_version": version, "item_ids": [], "scores": [],
                "semantic_ids": [], "n_history": len(history)}
        if len(history) < max(1, min_history - 1):
            rows.append({**base, "status": "history_too_short"})
        elif not idx:
            rows.append({**base, "status": "no_semantic_ids"})
        else:
            todo.append((base, idx))
    bar = Progress("infer_beyond_log users", len(todo))
    start = time.perf_counter()
    results = D.infer(model, vocab, [idx for _, idx in todo], top_n, progress=bar)
    infer_seconds = time.perf_counter() - start
    decoded = {"valid": 0, "invalid": 0, "already_seen": 0}
    scored = 0
    for (base, _), res in zip(todo, results, strict=True):
        scored += res.scored
        decoded["valid"] += res.decoded_valid
        decoded["invalid"] += res.decoded_invalid
        decoded["already_seen"] += res.decoded_seen
        rows.append({**base, "item_ids": [vocab.item_ids[i] for i in res.item_idx], "scores": res.scores,
                     "semantic_ids": [vocab.codes[i].tolist() for i in res.item_idx],
                     "status": "ok" if res.item_idx else "no_candidates"})
    metrics = {
        "model_version": version, "reused_checkpoint": reused, "train": train_meta,
        "training_sequences": len(train_seqs), "training_events_without_semantic_id": skipped_train,
        "ambiguous_semantic_ids": vocab.ambiguous_groups, "decoded_slots": decoded,
        "infer_seconds": round(infer_seconds, 2),
        "users_per_second": round(len(todo) / infer_seconds, 1) if infer_seconds > 0 else None,
        # Catalog items scored per user for the list's rest (of vocab_items): the prefix bounds' pruning.
        "items_scored_per_user": round(scored / len(todo), 1) if todo else 0, "vocab_items": len(vocab.item_ids),
    }
    return rows, metrics


def run(ctx: RunContext) -> JobResult:
    import pandas as pd

    from feature_store import delta
    from feature_store.catalog import USER_AUGMENTED
    from jobs.codebooks import current_version

    spark = ctx.spark
    cfg = ctx.config["beyond_log"]
    method, top_n, min_history = cfg["method"], cfg["top_n"], cfg["min_history"]
    seq_version = delta.table_version("gold.user_sequences", ctx.root)
    if method == "diffusion":
        sequences = load_sequences(ctx.root, seq_version)
        rows, metrics = infer_diffusion(ctx, sequences, current_version(ctx), top_n, min_history)
        frame = pd.DataFrame(rows, columns=[f.name for f in USER_AUGMENTED.schema if f.name not in ("ds", "run_id")])
        frame["ds"], frame["run_id"] = ctx.ds, ctx.run_id
        out = spark.createDataFrame(frame, schema=delta.spark_schema(USER_AUGMENTED))
    elif method == "llm":
        from pyspark.sql import functions as F

        from jobs import beyond_llm

        seqs = delta.read_spark(spark, "gold.user_sequences", ctx.root, version=seq_version)
        inferred = beyond_llm.infer_detailed(ctx, seqs, top_n)
        out = inferred.frame.withColumn("ds", F.lit(ctx.ds)).withColumn("run_id", F.lit(ctx.run_id))
        out = delta.conform(out, USER_AUGMENTED).localCheckpoint(eager=True)
        metrics = inferred.metrics  # the model version, users, calls, tokens, seconds: as diffusion records its own
    else:
        raise ValueError(f"beyond_log.method={method!r}: choose diffusion or llm")
    counts = {r["status"]: r["count"] for r in out.groupBy("status").count().collect()}
    # One method's current inference per user: rows of other model versions go.
    delta.merge(spark, out, "gold.user_augmented_behaviors", ctx.root, delete_unmatched=True)
    users = sum(counts.values())
    return JobResult(rows_in=users, rows_out=users, metrics={
        "method": method, "status_counts": counts, "top_n": top_n, "user_sequences_version": seq_version,
        **metrics,
    })


if __name__ == "__main__":
    raise SystemExit(cli_main("infer_beyond_log"))
