"""Airflow failure callbacks: one line that says what failed, for which day and run, why, and what next.

Standard library only at import time: DAG files import this module while they are parsed, so it must
not load pyspark, torch or even Airflow's models. Attach it to every DAG that writes tables:

    @dag(..., on_failure_callback=on_failure, default_args={..., "on_failure_callback": on_failure})

As a task callback (through default_args) Airflow calls it once a task has failed for the last time
(no retry left); the context then carries the exception. As a DAG callback it is called once per failed
run (in the DAG processor under a scheduler, in-process under `airflow dags test`); that context names
the task that failed but has no exception, so the line points at the task's own line and log.

The line goes to the `reaseq` logger at ERROR level, so `make run` / `make backfill` show it on the
console (jobs.cli passes the run's log file in REASEQ_RUN_LOG) and a scheduler's task log keeps it.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("reaseq")

RUN_LOG_ENV = "REASEQ_RUN_LOG"


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _first_line(exc: Any) -> str:
    if exc is None:
        return ""
    if isinstance(exc, BaseException):
        text = str(exc).strip()
        first = text.splitlines()[0] if text else ""
        return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _ds(context: Mapping) -> str | None:
    ds = context.get("ds")
    if ds:
        return str(ds)
    for obj, name in ((context, "logical_date"), (context.get("dag_run"), "logical_date"),
                      (context.get("ti"), "logical_date")):
        value = _get(obj, name)
        if isinstance(value, dt.datetime):
            return value.date().isoformat()
        if isinstance(value, dt.date):
            return value.isoformat()
    return None


def _base_log_folder() -> Path:
    env = os.environ.get("AIRFLOW__LOGGING__BASE_LOG_FOLDER")
    if env:
        return Path(env)
    # Inside a task or a DAG processor Airflow's configuration is already loaded: ask it (airflow.cfg
    # may move the folder). Never import it here: that would reconfigure logging in a plain interpreter.
    conf_module = sys.modules.get("airflow.sdk.configuration")
    if conf_module is not None:
        try:
            folder = conf_module.conf.get("logging", "base_log_folder", fallback=None)
            if folder:
                return Path(folder)
        except Exception:
            pass
    return Path(os.environ.get("AIRFLOW_HOME", Path.home() / "airflow")) / "logs"


def task_log_path(dag_id: str, run_id: str | None, task_id: str | None, try_number: int | None) -> str:
    """Where Airflow's file task handler writes the attempt's log (its default filename template)."""
    run_log = os.environ.get(RUN_LOG_ENV)
    if run_log:
        return run_log
    folder = _base_log_folder() / f"dag_id={dag_id}" / f"run_id={run_id}"
    if task_id is None:
        return str(folder)
    return str(folder / f"task_id={task_id}" / f"attempt={try_number or 1}.log")


def _rerun_hint(dag_id: str, task_id: str | None, ds: str | None, params: Mapping) -> str:
    if os.environ.get(RUN_LOG_ENV) or not task_id:
        # Started by jobs.cli (make run / make backfill): rerunning the day is idempotent.
        extra = ""
        dataset = _get(params, "dataset")
        if dataset and dataset != "synthetic":
            extra = f" DATASET={dataset}" + (f" DATA={_get(params, 'data')}" if _get(params, "data") else "")
        return f"make run DS={ds}{extra}" if ds else "make run"
    day = f" -s {ds} -e {ds}" if ds else ""
    return f"airflow tasks clear {dag_id} -t '^{task_id}$'{day} --downstream --yes (or make run DS={ds})"


def failure_line(context: Mapping) -> str:
    """The one line; pure function of the context (and REASEQ_RUN_LOG / Airflow's log folder)."""
    ti = context.get("ti") or context.get("task_instance")
    dag = context.get("dag")
    dag_id = _get(ti, "dag_id") or _get(dag, "dag_id") or "?"
    task_id = _get(ti, "task_id")
    run_id = context.get("run_id") or _get(ti, "run_id") or _get(context.get("dag_run"), "run_id")
    ds = _ds(context)
    params = context.get("params") or {}
    try_number = _get(ti, "try_number")
    reason = context.get("reason")
    exc = context.get("exception")
    where = task_log_path(dag_id, run_id, task_id, try_number)
    rerun = _rerun_hint(dag_id, task_id, ds, params)
    if reason is not None and exc is None:
        # DAG-level: one line per failed run, naming the task that failed last.
        task = f"at task {task_id}" if task_id else ""
        return (f"FAILED run of {dag_id} ds={ds} run={run_id} {task} ({reason}); why: see that task's "
                f"FAILED line and its log {where}; next: fix the cause, then {rerun}").replace("  ", " ")
    tries = ""
    max_tries = _get(ti, "max_tries")
    if isinstance(try_number, int) and isinstance(max_tries, int):
        tries = f" try {try_number}/{max_tries + 1}"
    why = _first_line(exc) or "no exception recorded (killed, timed out or marked failed)"
    return (f"FAILED {dag_id}.{task_id} ds={ds} run={run_id}{tries}: {why}; next: read {where}, "
            f"fix the cause, then {rerun}")


def on_failure(context: Mapping) -> None:
    """on_failure_callback for tasks and DAGs: log the failure line; never raise."""
    try:
        line = failure_line(context)
    except Exception as exc:  # a broken callback must not hide the task's own failure
        line = f"FAILED (the failure callback could not describe it: {type(exc).__name__}: {exc})"
    log.error("%s", line)
