"""Publish a run: the run summary (tasks, rows per table, quarantine by reason) next to the tables.

Runs only after both quality gates passed; the DAG attaches the feature tables' Assets to this task,
so downstream DAGs (training) see new data only when a run is complete and valid.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from jobs.config import resolve_path
from jobs.context import JobResult, RunContext
from jobs.runtime import cli_main

log = logging.getLogger("reaseq")


def table_counts(root: str) -> dict[str, dict]:
    from feature_store import delta
    from feature_store.catalog import TABLES

    out = {}
    for name in TABLES:
        if not delta.exists(name, root):
            out[name] = {"rows": None, "version": None, "path": delta.table_path(name, root)}
            continue
        dt = delta.delta_table(name, root)
        rows = dt.to_pyarrow_dataset().count_rows()
        out[name] = {"rows": rows, "version": dt.version(), "path": delta.table_path(name, root)}
    return out


def summary(ctx: RunContext) -> dict:
    import pyarrow.compute as pc

    from feature_store import delta

    runs = delta.read_arrow("ops.pipeline_runs", ctx.root, filter=pc.field("run_id") == ctx.run_id).to_pylist()
    tasks = sorted(
        ({k: r[k] for k in ("task", "status", "seconds", "rows_in", "rows_out", "rows_quarantined", "started_at")}
         | {"metrics": json.loads(r["metrics"] or "{}")} for r in runs),
        key=lambda r: r["started_at"],
    )
    quarantine: dict[str, int] = {}
    if delta.exists("silver.quarantine", ctx.root):
        q = delta.read_arrow("silver.quarantine", ctx.root, columns=["source_table", "reason", "run_id"],
                             filter=pc.field("run_id") == ctx.run_id)
        for t, reason in zip(q["source_table"].to_pylist(), q["reason"].to_pylist(), strict=True):
            k = f"{t}: {reason.split(':', 1)[0]}"
            quarantine[k] = quarantine.get(k, 0) + 1
    return {
        "run_id": ctx.run_id, "ds": ctx.ds.isoformat(), "dataset": ctx.dataset, "lakehouse": ctx.root,
        "tasks": tasks, "tables": table_counts(ctx.root), "quarantine_by_reason": quarantine,
    }


def keep_history(ctx: RunContext) -> dict:
    """Every table's history held to `retention.days` and VACUUMed: the last step of a run that passed
    both gates, when no stage of this run reads the files it may delete."""
    from feature_store import delta
    from feature_store.catalog import TABLES

    days, vacuum = ctx.config["retention"]["days"], ctx.config["retention"]["vacuum"]
    spark = None if delta.is_local(ctx.root) else ctx.spark
    out = {"days": days, "vacuum": vacuum, "properties_set": [], "files_deleted": 0}
    for name in TABLES:
        if not delta.exists(name, ctx.root):
            continue
        r = delta.apply_retention(spark, name, ctx.root, days=days, vacuum=vacuum)
        if r["properties_set"]:
            out["properties_set"].append(name)
        if r["files_deleted"] is None:
            out["files_deleted"] = None
        elif out["files_deleted"] is not None:
            out["files_deleted"] += r["files_deleted"]
    return out


def compact_tables(ctx: RunContext) -> dict:
    """Every table compacted once it has `compaction.min_small_files` small files, but those whose Delta
    version pins a trained model (`version_pinned_by` in the catalog: a new version would retrain it):
    {table: what delta.compact did}, for the tables it compacted or failed to."""
    from feature_store import delta
    from feature_store.catalog import TABLES

    cfg = ctx.config["compaction"]
    if cfg["min_small_files"] is None:
        return {}
    spark = None if delta.is_local(ctx.root) else ctx.spark
    out = {}
    for name in TABLES:
        if TABLES[name].version_pinned_by or not delta.exists(name, ctx.root):
            continue
        try:
            r = delta.compact(spark, name, ctx.root, min_files=cfg["min_small_files"], target_mb=cfg["target_mb"])
        except Exception as exc:  # noqa: BLE001  e.g. a writer (requeue-llm, a trainer's run record) won the commit
            # Compaction changes no row: a run whose gates passed is not failed for it; the next one retries.
            log.warning("publish: %s not compacted (%s: %s); the next run tries again", name, type(exc).__name__,
                        str(exc).splitlines()[0][:200] if str(exc) else "")
            out[name] = {"compacted": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            continue
        if r["compacted"]:
            out[name] = r
    return out


def run(ctx: RunContext) -> JobResult:
    out_dir = Path(resolve_path(ctx.config["reports"])) / ctx.run_id
    out_dir.mkdir(parents=True, exist_ok=True)
    compacted = compact_tables(ctx)
    retention = keep_history(ctx)
    s = summary(ctx)
    from jobs.report import build_report

    report = build_report(ctx.root, ctx.run_id, out_dir / "report", reports_dir=Path(resolve_path(ctx.config["reports"])))
    s["report"] = str(report)
    s["retention"] = retention
    s["compacted"] = compacted
    (out_dir / "summary.json").write_text(json.dumps(s, indent=2, default=str))
    written = sum(v["rows"] or 0 for v in s["tables"].values())
    return JobResult(rows_in=written, rows_out=written,
                     metrics={"summary": str(out_dir / "summary.json"), "report": str(report),
                              "retention": retention, "compacted": compacted})


if __name__ == "__main__":
    raise SystemExit(cli_main("publish"))
