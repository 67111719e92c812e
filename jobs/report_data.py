"""What a run report reads: the run's rows of ops.pipeline_runs (the day's latest attempt), their metrics,
and tolerant reads of the other tables (a missing or broken table is a note, never a failure)."""

from __future__ import annotations

import datetime as dt
import json

import pyarrow as pa

from feature_store import delta


class NotAvailable(Exception):
    """A plot's inputs are missing: the message is shown in place of the plot."""


class RunData:
    """The run's rows of ops.pipeline_runs, their metrics, and tolerant reads of the other tables."""

    def __init__(self, root: str, run_id: str):
        self.root, self.run_id = root, run_id
        self.all_runs: list[dict] = []
        self.runs_error: str | None = None
        try:
            self.all_runs = self.read("ops.pipeline_runs").to_pylist()
        except NotAvailable as exc:
            self.runs_error = str(exc)
        far = dt.datetime.max.replace(tzinfo=dt.UTC)
        near = dt.datetime.min.replace(tzinfo=dt.UTC)
        rows = [r for r in self.all_runs if r["run_id"] == run_id]
        # One run id per day: a second attempt of the day (another `make run`, another dataset) rewrites
        # the rows of the tasks it ran and leaves the others' from the earlier attempt. The report is
        # the latest attempt's, named by Airflow's run id; the rows of earlier attempts are counted.
        self.attempt = _attempt(max(rows, key=lambda r: r["started_at"] or near)) if rows else None
        self.earlier = [r for r in rows if _attempt(r) != self.attempt]
        self.tasks = sorted((r for r in rows if _attempt(r) == self.attempt),
                            key=lambda r: (r["started_at"] or far, r["task"]))
        self._metrics: dict[str, dict] = {r["task"]: _metrics_of(r) for r in self.tasks}

    def read(self, name: str, columns: list[str] | None = None, filter=None) -> pa.Table:
        try:
            present = delta.exists(name, self.root)
        except Exception as exc:
            raise NotAvailable(f"{name} could not be opened ({type(exc).__name__}: {exc})") from None
        if not present:
            raise NotAvailable(f"{name} has not been written yet")
        try:
            return delta.read_arrow(name, self.root, columns=columns, filter=filter)
        except Exception as exc:
            raise NotAvailable(f"{name} could not be read ({type(exc).__name__}: {first_line(exc)})") from None

    def task(self, name: str) -> dict | None:
        return next((r for r in self.tasks if r["task"] == name), None)

    def metrics(self, task: str) -> dict:
        return self._metrics.get(task, {})


def _metrics_of(row: dict) -> dict:
    try:
        m = json.loads(row["metrics"] or "{}")
    except ValueError:
        m = {}
    return m if isinstance(m, dict) else {}


def _attempt(row: dict) -> str | None:
    """Airflow's run id of the attempt that wrote the row (None: run outside Airflow)."""
    return _metrics_of(row).get("airflow_run_id")


def first_line(exc: BaseException) -> str:
    s = str(exc).strip()
    return s.splitlines()[0][:300] if s else ""
