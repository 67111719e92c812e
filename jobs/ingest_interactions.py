"""Load user events into bronze.interactions, partitioned by the event's UTC date (ds).

The MERGE carries the partition predicate and deletes target rows up to ds that the source no longer
has, so replaying a day leaves exactly that day's events (idempotent backfills), and switching the
lakehouse to another source leaves no events of the old one.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from jobs.context import JobResult, RunContext
from jobs.runtime import cli_main, write_quarantine
from jobs.sources import load_for_run as load


def run(ctx: RunContext) -> JobResult:
    from feature_store import delta

    # The source is read again rather than staged by ingest_catalog: a load takes 1-2 s on these
    # sources, and each task stays runnable on its own (retries, spark-submit, backfills).
    batch = load(ctx)
    inter = batch.interactions
    n = inter.num_rows
    days = pc.cast(pc.cast(inter["event_ts"], pa.timestamp("us", tz="UTC")), pa.date32()) if n else pa.array([], pa.date32())
    inter = (
        inter.append_column("source", pa.array([ctx.dataset] * n, pa.string()))
        .append_column("ds", days)
        .append_column("run_id", pa.array([ctx.run_id] * n, pa.string()))
    )
    quarantined = [q.__dict__ for q in batch.quarantine if q.source_table == "bronze.interactions"]
    rows_in = batch.rows_read["interactions"]
    later = batch.rows_read.get("interactions_after_until", 0)
    if rows_in != n + len(quarantined) + later:
        raise RuntimeError(
            f"interaction accounting broken: read {rows_in}, kept {n}, quarantined {len(quarantined)}, after ds {later}"
        )
    spark = ctx.spark
    df = spark.createDataFrame(inter)
    partitions = sorted({d.isoformat() for d in pc.unique(days).to_pylist()})
    # Sources are full snapshots up to ds: days up to ds end up exactly as loaded (a day's rerun
    # replaces that day; events of a previous source in the same lakehouse are dropped).
    merged = delta.merge(spark, df, "bronze.interactions", ctx.root, partition_values=partitions,
                         delete_unmatched=f"t.ds <= DATE'{ctx.ds.isoformat()}'") if n else {}
    write_quarantine(ctx, quarantined)
    return JobResult(rows_in=rows_in, rows_out=n, rows_quarantined=len(quarantined),
                     metrics={"merge": merged, "days": len(partitions), "not_yet_due": later})


if __name__ == "__main__":
    raise SystemExit(cli_main("ingest_interactions"))
