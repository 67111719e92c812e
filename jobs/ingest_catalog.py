"""Extract the catalog from the configured source into bronze.catalog_items (MERGE on item_id).

Every raw row ends as a bronze row or a quarantine row with a reason; the job fails if the
accounting does not balance, because a silent drop is worse than a stopped pipeline.
"""

from __future__ import annotations

import pyarrow as pa

from jobs.context import JobResult, RunContext
from jobs.runtime import cli_main, write_quarantine
from jobs.sources import load_for_run as load


def run(ctx: RunContext) -> JobResult:
    from feature_store import delta

    batch = load(ctx)
    items = batch.items
    n = items.num_rows
    items = (
        items.append_column("source", pa.array([ctx.dataset] * n, pa.string()))
        .append_column("first_seen_ds", pa.array([ctx.ds] * n, pa.date32()))
        .append_column("last_seen_ds", pa.array([ctx.ds] * n, pa.date32()))
        .append_column("ds", pa.array([ctx.ds] * n, pa.date32()))
        .append_column("run_id", pa.array([ctx.run_id] * n, pa.string()))
    )
    quarantined = [q.__dict__ for q in batch.quarantine if q.source_table == "bronze.catalog_items"]
    rows_in = batch.rows_read["items"]
    if rows_in != n + len(quarantined):
        raise RuntimeError(f"catalog accounting broken: read {rows_in}, kept {n}, quarantined {len(quarantined)}")
    if n == 0:
        raise RuntimeError(
            f"{ctx.dataset}: the source has no usable item ({len(quarantined)} quarantined); refusing to empty "
            "bronze.catalog_items: check the source and silver.quarantine"
        )
    spark = ctx.spark
    df = spark.createDataFrame(items)
    # The source is a full snapshot: items it no longer lists leave bronze (Delta history keeps them,
    # and their knowledge and embeddings stay cached in silver for when they come back). Only new,
    # changed and vanished items are written: an item whose content hash is unchanged keeps its row, and
    # its ds / run_id / last_seen_ds name the run that last wrote it.
    merged = delta.sync_snapshot(spark, df, "bronze.catalog_items", ctx.root, unchanged_when=("content_hash",))
    write_quarantine(ctx, quarantined)
    return JobResult(rows_in=rows_in, rows_out=n, rows_quarantined=len(quarantined),
                     metrics={"merge": merged, "source": ctx.dataset})


if __name__ == "__main__":
    raise SystemExit(cli_main("ingest_catalog"))
