"""The quality gates (jobs/quality.py): a failed expectation stops the stage with one line, lands in
silver.quarantine with its reason and in the JSON report; a table that meets its suite passes."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.spark


def test_a_failed_expectation_stops_the_stage_and_is_quarantined_with_its_reason(ctx_factory, spark, capfd):
    from feature_store import delta
    from feature_store.catalog import get
    from jobs.quality import gate, report_dir
    from jobs.runtime import StageFailed

    ctx = ctx_factory()
    delta.ensure_table(spark, get("bronze.interactions"), ctx.root)  # empty: "at least one row" fails
    with pytest.raises(StageFailed) as failed:
        gate(ctx, ("bronze.interactions",))
    message = str(failed.value)
    assert "\n" not in message and "quality gate failed on bronze.interactions" in message
    assert "silver.quarantine" in message and str(report_dir(ctx)) in message  # where to look next
    rows = delta.read_arrow("silver.quarantine", ctx.root).to_pylist()
    assert [(r["stage"], r["source_table"], r["run_id"]) for r in rows] == \
        [("validate", "bronze.interactions", ctx.run_id)]
    assert rows[0]["reason"].startswith("expectation_failed: expect_table_row_count_to_be_between")
    assert rows[0]["key"].startswith("suite:expect_table_row_count_to_be_between:")
    report = json.loads((report_dir(ctx) / "bronze.interactions.json").read_text())
    assert report["success"] is False
    assert [f["expectation"] for f in report["failed"]] == ["expect_table_row_count_to_be_between"]

    events = spark.range(5).selectExpr(
        "concat('u', cast(id as string)) as user_id", "'i1' as item_id",
        "timestamp_seconds(1700000000 + id) as event_ts", "'click' as event_type", "cast(null as double) as rating",
        "'test' as source", "to_date(timestamp_seconds(1700000000)) as ds", "'r' as run_id")
    delta.merge(spark, events, "bronze.interactions", ctx.root)
    passed = gate(ctx, ("bronze.interactions",))
    suite = passed.metrics["suites"]["bronze.interactions"]
    assert suite["success"] and suite["failed"] == 0 and suite["evaluated"] >= 6, suite
    assert (passed.rows_in, passed.rows_out) == (5, 5)
    assert delta.read_arrow("silver.quarantine", ctx.root).num_rows == 1  # nothing new
    # GX's progress bars stay out of the task log.
    assert "Calculating Metrics" not in capfd.readouterr().err
