"""Extract the catalog from the configured source into bronze.catalog_items (MERGE on item_id).

Every raw row ends as a bronze row or a quarantine row with a reason; the job fails if the
accounting does not balance, because a silent drop is worse than a stopped pipeline. The source
arrives in chunks (an amazon-json catalog is streamed from its file), made one DataFrame by
jobs.staging without the driver holding the catalog.
"""

from __future__ import annotations

import pyarrow as pa

from jobs.context import JobResult, RunContext
from jobs.runtime import cli_main, write_quarantine
from jobs.sources import catalog_chunks_for_run
from jobs.staging import stage


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

    staged = stage(ctx, catalog_chunks_for_run(ctx), "bronze.catalog_items", lambda c: _stamped(c.items, ctx))
    rows_in, n, quarantined = staged.rows_read["items"], staged.kept, staged.quarantine
    if rows_in != n + len(quarantined):
        raise RuntimeError(f"catalog accounting broken: read {rows_in}, kept {n}, quarantined {len(quarantined)}")
    if n == 0:
        raise RuntimeError(
            f"{ctx.dataset}: the source has no usable item ({len(quarantined)} quarantined); refusing to empty "
            "bronze.catalog_items: check the source and silver.quarantine"
        )
    # The source is a full snapshot: items it no longer lists leave bronze (Delta history keeps them,
    # and their knowledge and embeddings stay cached in silver for when they come back). Only new,
    # changed and vanished items are written: an item whose content hash is unchanged keeps its row, and
    # its ds / run_id / last_seen_ds name the run that last wrote it.
    merged = delta.sync_snapshot(ctx.spark, staged.df, "bronze.catalog_items", ctx.root,
                                 unchanged_when=("content_hash",))
    staged.clean_up(ctx.spark)
    write_quarantine(ctx, quarantined)
    return JobResult(rows_in=rows_in, rows_out=n, rows_quarantined=len(quarantined),
                     metrics={"merge": merged, "source": ctx.dataset, "chunks_staged": staged.chunks_staged})


if __name__ == "__main__":
    raise SystemExit(cli_main("ingest_catalog"))
