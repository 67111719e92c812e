"""The quality gates' one check: Great Expectations suites over named tables; a failure stops the run.

Each failed expectation is also written to silver.quarantine (key `suite:<expectation>`) so the reason is
queryable next to the row-level quarantine, and the JSON report stays under reports/<run_id>/validation/.
"""

from __future__ import annotations

import json
from pathlib import Path

from jobs.config import resolve_path
from jobs.context import JobResult, RunContext
from jobs.runtime import StageFailed, write_quarantine


def report_dir(ctx: RunContext) -> Path:
    return Path(resolve_path(ctx.config["reports"])) / ctx.run_id / "validation"


def gate(ctx: RunContext, tables: tuple[str, ...]) -> JobResult:
    from feature_store import delta
    from feature_store.expectations import validate

    spark = ctx.spark
    results, failures, rows = {}, [], 0
    for name in tables:
        df = delta.read_spark(spark, name, ctx.root)
        res = validate(df, name, report_dir(ctx))
        results[name] = {"success": res["success"], "evaluated": res["evaluated"], "failed": len(res["failed"])}
        rows += df.count()
        for f in res["failed"]:
            failures.append({
                "source_table": name,
                "key": f"suite:{f['expectation']}:{json.dumps(f['kwargs'], sort_keys=True, default=str)[:200]}",
                "stage": "validate",
                "reason": f"expectation_failed: {f['expectation']} (unexpected {f['unexpected_count']})",
                "payload": json.dumps(f, default=str),
            })
    write_quarantine(ctx, failures)
    if failures:
        names = sorted({f["source_table"] for f in failures})
        raise StageFailed(
            f"quality gate failed on {', '.join(names)}: {len(failures)} expectation(s) failed; "
            f"see {report_dir(ctx)} and silver.quarantine (stage='validate') before rerunning"
        )
    return JobResult(rows_in=rows, rows_out=rows, metrics={"suites": results, "report": str(report_dir(ctx))})
