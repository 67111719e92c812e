"""Load user events into bronze.interactions, partitioned by the event's UTC date (ds).

The MERGE carries the partition predicate and deletes target rows up to ds that the source no longer
has, so replaying a day leaves exactly that day's events (idempotent backfills), and switching the
lakehouse to another source leaves no events of the old one. The events arrive in chunks (amazon-json
is streamed from its files), made one DataFrame by jobs.staging without the driver holding the log.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from jobs.context import JobResult, RunContext
from jobs.runtime import cli_main, write_quarantine
from jobs.sources import interaction_chunks_for_run
from jobs.staging import stage


def run(ctx: RunContext) -> JobResult:
    from feature_store import delta

    days: set[str] = set()

    def stamped(chunk) -> pa.Table:
        inter = chunk.interactions
        n = inter.num_rows
        ds = pc.cast(pc.cast(inter["event_ts"], pa.timestamp("us", tz="UTC")), pa.date32()) if n else pa.array([], pa.date32())
        days.update(d.isoformat() for d in pc.unique(ds).to_pylist())
        return (inter.append_column("source", pa.array([ctx.dataset] * n, pa.string()))
                .append_column("ds", ds)
                .append_column("run_id", pa.array([ctx.run_id] * n, pa.string())))

    # The source is read again rather than staged by ingest_catalog: a load takes 1-2 s on these
    # sources, and each task stays runnable on its own (retries, spark-submit, backfills).
    staged = stage(ctx, interaction_chunks_for_run(ctx), "bronze.interactions", stamped)
    rows_in, n, quarantined = staged.rows_read["interactions"], staged.kept, staged.quarantine
    later = staged.rows_read["interactions_after_until"]
    if rows_in != n + len(quarantined) + later:
        raise RuntimeError(
            f"interaction accounting broken: read {rows_in}, kept {n}, quarantined {len(quarantined)}, after ds {later}"
        )
    # Sources are full snapshots up to ds: days up to ds end up exactly as loaded (a day's rerun
    # replaces that day; events of a previous source in the same lakehouse are dropped).
    merged = delta.merge(ctx.spark, staged.df, "bronze.interactions", ctx.root, partition_values=sorted(days),
                         delete_unmatched=f"t.ds <= DATE'{ctx.ds.isoformat()}'") if n else {}
    staged.clean_up(ctx.spark)
    write_quarantine(ctx, quarantined)
    return JobResult(rows_in=rows_in, rows_out=n, rows_quarantined=len(quarantined),
                     metrics={"merge": merged, "days": len(days), "not_yet_due": later,
                              "chunks_staged": staged.chunks_staged})


if __name__ == "__main__":
    raise SystemExit(cli_main("ingest_interactions"))
