"""Batch inference: assign semantic IDs with a saved codebook version into gold.item_semantic_ids.

Runs without retraining: it uses the version train_quantizer recorded as LATEST, or the one named in
`quantizer.codebook_version`. Hierarchical codes carry a final collision digit so every full ID is
unique and stable for that version; MPQ gives one unordered token per expert.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from jobs.codebooks import checkpoint_dir, current_version, load_embeddings
from jobs.context import JobResult, RunContext
from jobs.runtime import cli_main


def run(ctx: RunContext) -> JobResult:
    from feature_store import delta
    from feature_store.catalog import ITEM_SEMANTIC_IDS
    from models.quantizers import assign, load_checkpoint

    version = current_version(ctx)
    path = checkpoint_dir(ctx, version)
    meta = json.loads((path / "meta.json").read_text())
    tq = load_checkpoint(path / "quantizers.pt")
    # Read the embeddings the version was trained on when it is still the newest, else the newest.
    ids, mat, bad = load_embeddings(ctx, meta["embedder"])
    rq, mpq, metrics = assign(tq, mat, ids)
    mat = None  # the largest thing the driver holds (1.5 GB at a million 384-d items): not needed below
    n = len(ids)
    # Straight from the code matrices to Arrow lists: no Python list per row (two per item).
    table = pa.table({
        "item_id": pa.array(ids, pa.string()),
        "codebook_version": pa.array([version] * n, pa.string()),
        "rq_codes": _lists(rq),
        "mpq_tokens": _lists(mpq),
        "embedder": pa.array([meta["embedder"]] * n, pa.string()),
        "ds": pa.array([ctx.ds] * n, pa.date32()),
        "run_id": pa.array([ctx.run_id] * n, pa.string()),
    }, schema=ITEM_SEMANTIC_IDS.schema)
    delta.merge(ctx.spark, ctx.spark.createDataFrame(table), "gold.item_semantic_ids", ctx.root)
    return JobResult(rows_in=n + len(bad), rows_out=n, rows_quarantined=0,
                     metrics={"codebook_version": version, "quality": metrics, "skipped_bad_vectors": len(bad)})


def _lists(codes: np.ndarray) -> pa.ListArray:
    """An n x w int32 matrix as n Arrow lists of w values (offsets 0, w, 2w, ...)."""
    n, w = codes.shape
    offsets = pa.array(np.arange(0, (n + 1) * w, w, dtype=np.int32) if w else np.zeros(n + 1, np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(codes, np.int32).ravel()))


if __name__ == "__main__":
    raise SystemExit(cli_main("assign_semantic_ids"))
