"""Great Expectations suites per table, and a runner that validates a Spark DataFrame against one.

A suite is the contract a table must meet before anything downstream reads it; the validate stages
stop publication when one fails and leave the JSON result (and GX's Data Docs) as the report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from feature_store.catalog import get


def _suite_expectations(name: str) -> list:
    import great_expectations.expectations as gxe

    spec = get(name)
    exps: list = [gxe.ExpectColumnValuesToNotBeNull(column=k) for k in spec.key]
    if len(spec.key) == 1:
        exps.append(gxe.ExpectColumnValuesToBeUnique(column=spec.key[0]))
    else:
        exps.append(gxe.ExpectCompoundColumnsToBeUnique(column_list=list(spec.key)))
    exps.append(gxe.ExpectTableColumnsToMatchSet(column_set=spec.columns, exact_match=True))
    exps.append(gxe.ExpectColumnValuesToNotBeNull(column="ds"))
    extra: dict[str, list] = {
        "bronze.catalog_items": [
            gxe.ExpectTableRowCountToBeBetween(min_value=1),
            gxe.ExpectColumnValuesToNotBeNull(column="title"),
            gxe.ExpectColumnValueLengthsToBeBetween(column="title", min_value=1, max_value=1000),
            gxe.ExpectColumnValueLengthsToEqual(column="content_hash", value=64),
            gxe.ExpectColumnValuesToBeBetween(column="price", min_value=0, mostly=1.0),
        ],
        "bronze.interactions": [
            gxe.ExpectTableRowCountToBeBetween(min_value=1),
            gxe.ExpectColumnValuesToNotBeNull(column="event_ts"),
        ],
        "gold.item_semantic_ids": [
            gxe.ExpectTableRowCountToBeBetween(min_value=1),
            gxe.ExpectColumnValuesToNotBeNull(column="rq_codes"),
            gxe.ExpectColumnValuesToNotBeNull(column="mpq_tokens"),
        ],
        "gold.user_sequences": [
            gxe.ExpectTableRowCountToBeBetween(min_value=1),
            gxe.ExpectColumnValuesToBeBetween(column="seq_len", min_value=1),
            gxe.ExpectColumnValuesToNotBeNull(column="item_ids"),
        ],
        "gold.user_augmented_behaviors": [
            gxe.ExpectTableRowCountToBeBetween(min_value=1),
            gxe.ExpectColumnValuesToBeInSet(
                column="status", value_set=["ok", "history_too_short", "no_candidates", "no_semantic_ids", "llm_failed"]
            ),
            # Most users must get an inference; a collapse to zero means the model broke.
            gxe.ExpectColumnValuesToBeInSet(column="status", value_set=["ok"], mostly=0.5),
        ],
        "gold.user_features": [
            gxe.ExpectTableRowCountToBeBetween(min_value=1),
            gxe.ExpectColumnValuesToBeBetween(column="n_events", min_value=1),
            gxe.ExpectColumnValuesToBeBetween(column="days_since_last", min_value=0),
        ],
    }
    return exps + extra.get(name, [])


def validate(df, name: str, report_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run the table's suite on a Spark DataFrame; returns {success, failed: [...], stats} and writes JSON."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    # GX draws a progress bar per validation on stderr, ~50 redraws a table, into every task's log; the
    # stage's own line (rows, suites, failures) says what a person needs.
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    suite = ctx.suites.add(gx.ExpectationSuite(name=f"{name}.suite"))
    for e in _suite_expectations(name):
        suite.add_expectation(e)
    bd = (
        ctx.data_sources.add_spark("spark")
        .add_dataframe_asset(name)
        .add_batch_definition_whole_dataframe("whole")
    )
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"{name}.validation", data=bd, suite=suite))
    result = vd.run(batch_parameters={"dataframe": df}, result_format="SUMMARY")
    failed = []
    for r in result.results:
        if not r.success:
            cfg = r.expectation_config
            res = r.result or {}
            failed.append({
                "expectation": cfg.type,
                "kwargs": {k: v for k, v in cfg.kwargs.items() if k != "batch_id"},
                "unexpected_count": res.get("unexpected_count"),
                "partial_unexpected_list": (res.get("partial_unexpected_list") or [])[:5],
                "observed_value": res.get("observed_value"),
            })
    out = {
        "table": name,
        "success": bool(result.success),
        "evaluated": len(result.results),
        "failed": failed,
    }
    if report_dir is not None:
        path = Path(report_dir)
        path.mkdir(parents=True, exist_ok=True)
        (path / f"{name}.json").write_text(json.dumps(out, indent=2, default=str))
        (path / f"{name}.gx.json").write_text(json.dumps(result.to_json_dict(), indent=2, default=str))
    return out
