"""Running a job: timing, the ops.pipeline_runs record, quarantine writes, and the spark-submit entry.

Airflow tasks call `run_task(name, ...)` in-process (local mode); on a cluster the same job module is
submitted with spark-submit and enters through `cli_main`. Both paths go through `execute`, so a task
records its outcome the same way wherever it runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

from jobs.context import JobResult, RunContext
from jobs.stages import PIPELINE  # re-exported: callers import it from here

log = logging.getLogger("reaseq")


class StageFailed(RuntimeError):
    """A stage refused to go on (a failed quality gate, a backend down): the message says what to do."""


def _record(ctx: RunContext, task: str, status: str, started: dt.datetime, seconds: float,
            result: JobResult | None, error: str | None) -> None:
    from feature_store import delta

    spark = ctx.spark
    metrics = dict(result.metrics) if result else {}
    if ctx.airflow_run_id:
        metrics["airflow_run_id"] = ctx.airflow_run_id
    if error:
        metrics["error"] = error
    row = {
        "run_id": ctx.run_id,
        "task": task,
        "dag_id": ctx.dag_id,
        "dataset": ctx.dataset,
        "status": status,
        "started_at": started,
        "ended_at": started + dt.timedelta(seconds=seconds),
        "seconds": float(seconds),
        "rows_in": int(result.rows_in) if result else 0,
        "rows_out": int(result.rows_out) if result else 0,
        "rows_quarantined": int(result.rows_quarantined) if result else 0,
        "metrics": json.dumps(metrics, default=str, sort_keys=True),
        "ds": ctx.ds,
    }
    delta.upsert_rows(spark, [row], "ops.pipeline_runs", ctx.root)


def execute(name: str, ctx: RunContext) -> JobResult:
    if name not in PIPELINE and not name.startswith("train_"):
        raise ValueError(f"unknown job {name!r}; jobs: {', '.join(PIPELINE)}")
    module = importlib.import_module(f"jobs.{name}")
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    log.info("%s: starting (ds=%s run_id=%s dataset=%s)", name, ctx.ds, ctx.run_id, ctx.dataset)
    try:
        result = module.run(ctx)
    except Exception as exc:
        seconds = time.monotonic() - t0
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        try:
            _record(ctx, name, "failed", started, seconds, None, msg)
        except Exception:  # the record is best effort; the original error matters more
            log.exception("could not record the failure of %s", name)
        raise
    seconds = time.monotonic() - t0
    _record(ctx, name, "success", started, seconds, result, None)
    log.info(
        "%s: done in %.1fs, rows in %d, out %d, quarantined %d", name, seconds, result.rows_in,
        result.rows_out, result.rows_quarantined,
    )
    return result


def run_task(name: str, ds: str, run_id: str, conf: dict[str, Any] | None = None,
             dag_id: str = "reaseq_nightly", airflow_run_id: str | None = None) -> dict:
    """Entry point for Airflow tasks: returns a small summary for XCom."""
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("reaseq").setLevel(logging.INFO)
    overrides = {k: v for k, v in (conf or {}).items() if v not in (None, "")}
    ctx = RunContext.create(ds=ds, run_id=run_id, overrides=overrides, dag_id=dag_id)
    ctx.airflow_run_id = airflow_run_id
    res = execute(name, ctx)
    return {"rows_in": res.rows_in, "rows_out": res.rows_out, "rows_quarantined": res.rows_quarantined}


# ---------------------------------------------------------------- quarantine


def quarantine_rows(ctx: RunContext, records: Iterable[dict]) -> list[dict]:
    """Normalise quarantine records; keys repeated within one run get '#2', '#3'… so none collapse."""
    seen: Counter = Counter()
    rows = []
    for r in records:
        base = (r["source_table"], str(r["key"]))
        seen[base] += 1
        key = base[1] if seen[base] == 1 else f"{base[1]}#{seen[base]}"
        rows.append({
            "source_table": r["source_table"],
            "key": key,
            "stage": r["stage"],
            "reason": r["reason"],
            "payload": r.get("payload"),
            "ds": ctx.ds,
            "run_id": ctx.run_id,
        })
    return rows


def write_quarantine(ctx: RunContext, records: Iterable[dict]) -> int:
    from feature_store import delta

    rows = quarantine_rows(ctx, records)
    if not rows:
        return 0
    delta.upsert_rows(ctx.spark, rows, "silver.quarantine", ctx.root)  # quarantine_rows numbered repeats
    return len(rows)


# ---------------------------------------------------------------- spark-submit entry


def cli_main(name: str, argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=f"spark-submit jobs/{name}.py",
        description=f"Run the {name} stage of the nightly feature refresh once.",
    )
    p.add_argument("--ds", help="logical date YYYY-MM-DD (default: today, UTC)")
    p.add_argument("--run-id", help="lineage run id (default: reaseq_nightly__<ds>, as the DAG writes it)")
    p.add_argument("--dataset", help="synthetic | amazon-json | movielens")
    p.add_argument("--data", help="dataset path for amazon-json / movielens")
    p.add_argument("--lakehouse", help="root of the Delta tables (path or s3a:// URI)")
    p.add_argument("--dag-id", default="reaseq_nightly", help="the DAG that submitted this stage (lineage)")
    p.add_argument("--airflow-run-id", help="Airflow's run id, recorded in the task's metrics")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    overrides = {k: v for k, v in {"dataset": args.dataset, "data": args.data, "lakehouse": args.lakehouse}.items() if v}
    ctx = RunContext.create(ds=args.ds, run_id=args.run_id, overrides=overrides, dag_id=args.dag_id)
    ctx.airflow_run_id = args.airflow_run_id
    try:
        execute(name, ctx)
    except Exception as exc:
        # The traceback goes to the task log; the last line is the one a person reads first.
        logging.getLogger("reaseq").exception("%s failed", name)
        print(f"{name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0
