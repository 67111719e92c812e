"""Train the semantic-ID quantizers (hierarchical RQ and REG4Rec's MPQ) on silver.item_embeddings.

The checkpoint's codebook_version is derived from the quantizer configuration and the embeddings
table's Delta version, so an unchanged rerun finds its checkpoint and trains nothing, while new
embeddings give a new version. Rows with NaN or wrong-dimension vectors are quarantined and never
reach training. Assignment (assign_semantic_ids) reuses a saved version without retraining.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from jobs.codebooks import checkpoint_dir, load_embeddings
from jobs.context import JobResult, RunContext
from jobs.runtime import cli_main, write_quarantine

log = logging.getLogger("reaseq")


def quantizer_config(ctx: RunContext):
    from models.quantizers import QuantizerConfig

    allowed = set(QuantizerConfig.model_fields)
    return QuantizerConfig(**{k: v for k, v in (ctx.config.get("quantizer") or {}).items() if k in allowed})


def embedder_name(ctx: RunContext) -> str:
    from models.embedder import EmbedderConfig

    return EmbedderConfig.from_dict(ctx.config.get("embedding")).name


def codebook_version(config_hash: str, embedder: str, table_version: int, ids: list[str], mat: np.ndarray) -> str:
    """Config + embeddings table version + a fingerprint of the exact training matrix.

    The fingerprint keeps a wiped-and-rebuilt lakehouse (whose Delta versions restart) from reusing a
    checkpoint trained on other data.
    """
    h = hashlib.sha256(f"{config_hash}|{embedder}|{table_version}|".encode())
    h.update("\n".join(ids).encode())
    h.update(memoryview(np.ascontiguousarray(mat, dtype=np.float32)))  # the buffer itself: no bytes copy
    return f"cb-{h.hexdigest()[:12]}"


def training_sample(ids: list[str], mat: np.ndarray, cap: int | None, seed: int) -> tuple[list[str], np.ndarray]:
    """At most `cap` rows, a seeded uniform sample kept in item-id order; all of them under the cap.

    Codebooks learn the embedding space's shape, which a few hundred thousand items pin down: k-means
    and the MPQ epochs cost time linear in the rows, so without a cap a catalog ten times larger trains
    ten times longer for the same codebooks. Assignment (assign_semantic_ids) still codes every item.
    """
    if cap is None or len(ids) <= cap:
        return ids, mat
    rows = np.sort(np.random.default_rng(seed).choice(len(ids), size=cap, replace=False))
    return [ids[i] for i in rows], mat[rows]


def run(ctx: RunContext) -> JobResult:
    from feature_store import delta
    from models.quantizers import load_checkpoint, save_checkpoint, train_quantizers

    cfg = quantizer_config(ctx)
    embedder = embedder_name(ctx)
    table_version = delta.table_version("silver.item_embeddings", ctx.root)
    ids, mat, bad = load_embeddings(ctx, embedder, table_version)
    n_items = len(ids)
    ids, mat = training_sample(ids, mat, cfg.max_train_items, cfg.seed)
    version = codebook_version(cfg.config_hash(), embedder, table_version, ids, mat)
    q = write_quarantine(ctx, [
        {"source_table": "gold.item_semantic_ids", "key": i, "stage": "train_quantizer", "reason": r, "payload": None}
        for i, r in bad
    ])
    path = checkpoint_dir(ctx, version)
    meta = {"codebook_version": version, "embeddings_table_version": table_version, "embedder": embedder,
            "config": json.loads(cfg.model_dump_json()), "items": n_items, "trained_on": len(ids)}
    if (path / "meta.json").exists():
        tq = load_checkpoint(path / "quantizers.pt")
        log.info("train_quantizer: %s already trained; reusing it", version)
        reused = True
    else:
        log.info("train_quantizer: training %s (%s + mpq) on %d of %d items", version, cfg.rq_method, len(ids),
                 n_items)
        tq = train_quantizers(mat, cfg, progress=_progress())
        path.mkdir(parents=True, exist_ok=True)
        save_checkpoint(tq, path / "quantizers.pt")
        (path / "meta.json").write_text(json.dumps({**meta, "metrics": tq.metrics,
                                                    "train_seconds": tq.train_seconds}, indent=2, default=str))
        reused = False
    latest = Path(ctx.artifacts) / "quantizers" / "LATEST"
    latest.write_text(version)
    return JobResult(rows_in=n_items + len(bad), rows_out=n_items, rows_quarantined=q, metrics={
        **meta, "reused_checkpoint": reused, "train_seconds": tq.train_seconds, "quality": tq.metrics,
    })


def _progress():
    from jobs.progress import Progress

    bars: dict[str, Progress] = {}

    def cb(stage: str, done: int, total: int) -> None:
        bars.setdefault(stage, Progress(f"train_quantizer {stage}", total))(done, total)

    return cb


if __name__ == "__main__":
    raise SystemExit(cli_main("train_quantizer"))
