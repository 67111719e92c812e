"""Extract the catalog from the configured source into bronze.catalog_items (MERGE on item_id).

Every raw row ends as a bronze row or a quarantine row with a reason; the job fails if the
accounting does not balance, because a silent drop is worse than a stopped pipeline.

The source arrives in chunks (jobs.sources.catalog_chunks_for_run: an amazon-json catalog is streamed
from its file), so the driver holds one chunk at a time, never the catalog: each chunk is appended to a
Parquet staging folder under the lakehouse (`_staging/catalog_items`, a path the executors reach on a
cluster too), and the MERGE reads the snapshot from there. A catalog of one chunk (every source here but
a large amazon-json file) goes to the MERGE directly.
"""

from __future__ import annotations

import time

import pyarrow as pa

from jobs.context import JobResult, RunContext
from jobs.progress import progress_line
from jobs.runtime import cli_main, log, write_quarantine
from jobs.sources import catalog_chunks_for_run

STAGING = "_staging/catalog_items"


def _stamped(items: pa.Table, ctx: RunContext) -> pa.Table:
    n = items.num_rows
    return (
        items.append_column("source", pa.array([ctx.dataset] * n, pa.string()))
        .append_column("first_seen_ds", pa.array([ctx.ds] * n, pa.date32()))
        .append_column("last_seen_ds", pa.array([ctx.ds] * n, pa.date32()))
        .append_column("ds", pa.array([ctx.ds] * n, pa.date32()))
        .append_column("run_id", pa.array([ctx.run_id] * n, pa.string()))
    )


def run(ctx: RunContext) -> JobResult:
    from feature_store import delta
    from feature_store.spark import delete_path

    spark = ctx.spark
    chunks = catalog_chunks_for_run(ctx)
    first = next(chunks)
    second = next(chunks, None)
    rows_in, n, quarantined, staged = 0, 0, [], 0
    staging = f"{ctx.root.rstrip('/')}/{STAGING}"
    t0 = time.monotonic()
    # Held in a list and popped, so that no name keeps a staged chunk alive: the driver holds one.
    pending = [first] if second is None else [first, second]
    first = second = None
    one_chunk = len(pending) == 1
    df = None
    while pending or not one_chunk:
        chunk = pending.pop(0) if pending else next(chunks, None)
        if chunk is None:
            break
        rows_in += chunk.rows_read["items"]
        n += chunk.items.num_rows
        quarantined += [q.__dict__ for q in chunk.quarantine if q.source_table == "bronze.catalog_items"]
        if one_chunk:
            df = spark.createDataFrame(_stamped(chunk.items, ctx))
        elif chunk.items.num_rows:
            # The first staged chunk overwrites what a killed run may have left there.
            (spark.createDataFrame(_stamped(chunk.items, ctx)).write
             .mode("append" if staged else "overwrite").parquet(staging))
            staged += 1
            done, total = chunk.progress or (rows_in, rows_in)
            log.info(progress_line(f"ingest_catalog: {rows_in:,} rows read, staged", done, total,
                                   time.monotonic() - t0, "bytes"))
        chunk = None
    if rows_in != n + len(quarantined):
        raise RuntimeError(f"catalog accounting broken: read {rows_in}, kept {n}, quarantined {len(quarantined)}")
    if n == 0:
        raise RuntimeError(
            f"{ctx.dataset}: the source has no usable item ({len(quarantined)} quarantined); refusing to empty "
            "bronze.catalog_items: check the source and silver.quarantine"
        )
    if staged:
        df = spark.read.parquet(staging)
    # The source is a full snapshot: items it no longer lists leave bronze (Delta history keeps them,
    # and their knowledge and embeddings stay cached in silver for when they come back). Only new,
    # changed and vanished items are written: an item whose content hash is unchanged keeps its row, and
    # its ds / run_id / last_seen_ds name the run that last wrote it.
    merged = delta.sync_snapshot(spark, df, "bronze.catalog_items", ctx.root, unchanged_when=("content_hash",))
    if staged:
        delete_path(spark, staging)
    write_quarantine(ctx, quarantined)
    return JobResult(rows_in=rows_in, rows_out=n, rows_quarantined=len(quarantined),
                     metrics={"merge": merged, "source": ctx.dataset, "chunks_staged": staged})


if __name__ == "__main__":
    raise SystemExit(cli_main("ingest_catalog"))
