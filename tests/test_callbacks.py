"""The failure callback: one line naming the task, the day, the run, the exception's first line and the
next step, from the minimal context Airflow hands a task or DAG callback; it never raises."""

from __future__ import annotations

import datetime as dt
import logging
from types import SimpleNamespace

import pytest

from jobs.callbacks import RUN_LOG_ENV, failure_line, on_failure

RUN_ID = "scheduled__2026-11-21T02:00:00+00:00"


def _ti(**kw):
    base = {"dag_id": "reaseq_nightly", "task_id": "embed_items", "run_id": RUN_ID, "try_number": 3,
            "max_tries": 2}
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.fixture(autouse=True)
def _no_run_log(monkeypatch, tmp_path):
    monkeypatch.delenv(RUN_LOG_ENV, raising=False)
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    monkeypatch.setenv("AIRFLOW__LOGGING__BASE_LOG_FOLDER", str(tmp_path / "logs"))


def test_task_failure_is_one_line_with_task_day_run_why_and_next_step(caplog, tmp_path):
    exc = ValueError("embedding dimension 12 != 384\nsecond line of detail")
    ctx = {"ti": _ti(), "ds": "2026-11-21", "run_id": RUN_ID, "exception": exc, "params": {"dataset": "synthetic"}}
    with caplog.at_level(logging.ERROR, logger="reaseq"):
        on_failure(ctx)
    [rec] = [r for r in caplog.records if r.name == "reaseq"]
    line = rec.getMessage()
    assert rec.levelno == logging.ERROR
    assert "\n" not in line
    assert line.startswith("FAILED reaseq_nightly.embed_items ds=2026-11-21 run=" + RUN_ID)
    assert "try 3/3" in line
    assert "ValueError: embedding dimension 12 != 384;" in line
    assert "second line" not in line
    # No jobs.cli around (a scheduler ran it): the attempt's log file and the command that clears the task.
    expected_log = tmp_path / "logs" / "dag_id=reaseq_nightly" / f"run_id={RUN_ID}" / "task_id=embed_items" / "attempt=3.log"
    assert f"read {expected_log}" in line
    assert "airflow tasks clear reaseq_nightly -t '^embed_items$' -s 2026-11-21 -e 2026-11-21 --downstream --yes" in line


def test_under_make_run_the_line_points_at_the_run_log_and_make_run(monkeypatch):
    monkeypatch.setenv(RUN_LOG_ENV, "/tmp/reports/logs/reaseq_nightly_2026-11-21_movielens.log")
    ctx = {"ti": _ti(task_id="ingest_catalog", try_number=1, max_tries=0), "ds": "2026-11-21", "run_id": RUN_ID,
           "exception": RuntimeError("movielens: /x: missing u.item"),
           "params": {"dataset": "movielens", "data": "/x"}}
    line = failure_line(ctx)
    assert "FAILED reaseq_nightly.ingest_catalog ds=2026-11-21" in line
    assert "try 1/1: RuntimeError: movielens: /x: missing u.item;" in line
    assert "read /tmp/reports/logs/reaseq_nightly_2026-11-21_movielens.log" in line
    assert line.endswith("then make run DS=2026-11-21 DATASET=movielens DATA=/x")


def test_the_day_comes_from_the_logical_date_when_ds_is_missing():
    ctx = {"ti": _ti(), "logical_date": dt.datetime(2026, 11, 20, 2, tzinfo=dt.UTC), "exception": "killed by SIGKILL"}
    line = failure_line(ctx)
    assert "ds=2026-11-20 run=" + RUN_ID in line  # the run id from the task instance
    assert ": killed by SIGKILL;" in line


def test_dag_level_callback_names_the_failed_task_and_the_reason():
    ctx = {"ti": _ti(task_id="validate_gold"), "dag": SimpleNamespace(dag_id="reaseq_nightly"), "ds": "2026-11-21",
           "run_id": RUN_ID, "reason": "task_failure"}
    line = failure_line(ctx)
    assert line.startswith(f"FAILED run of reaseq_nightly ds=2026-11-21 run={RUN_ID} at task validate_gold (task_failure)")
    assert "\n" not in line


def test_a_broken_context_still_logs_one_line_and_never_raises(caplog):
    with caplog.at_level(logging.ERROR, logger="reaseq"):
        on_failure({"ti": object(), "exception": None})
        on_failure(None)  # type: ignore[arg-type]
    lines = [r.getMessage() for r in caplog.records if r.name == "reaseq"]
    assert len(lines) == 2 and all(line.startswith("FAILED") for line in lines)
