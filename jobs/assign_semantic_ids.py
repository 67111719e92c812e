"""Batch inference: assign semantic IDs with a saved codebook version into gold.item_semantic_ids.

Runs without retraining: it uses the version train_quantizer recorded as LATEST, or the one named in
`quantizer.codebook_version`. Hierarchical codes carry a final collision digit so every full ID is
unique and stable for that version; MPQ gives one unordered token per expert.
"""

from __future__ import annotations

import json

from jobs.codebooks import checkpoint_dir, current_version, load_embeddings
from jobs.context import JobResult, RunContext
from jobs.runtime import cli_main


def run(ctx: RunContext) -> JobResult:
    import pandas as pd

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
    frame = pd.DataFrame({
        "item_id": ids,
        "codebook_version": version,
        "rq_codes": [row.tolist() for row in rq],
        "mpq_tokens": [row.tolist() for row in mpq],
        "embedder": meta["embedder"],
        "ds": ctx.ds,
        "run_id": ctx.run_id,
    })
    spark = ctx.spark
    df = spark.createDataFrame(frame, schema=delta.spark_schema(ITEM_SEMANTIC_IDS))
    delta.merge(spark, df, "gold.item_semantic_ids", ctx.root)
    return JobResult(rows_in=len(ids) + len(bad), rows_out=len(ids), rows_quarantined=0,
                     metrics={"codebook_version": version, "quality": metrics, "skipped_bad_vectors": len(bad)})


if __name__ == "__main__":
    raise SystemExit(cli_main("assign_semantic_ids"))
