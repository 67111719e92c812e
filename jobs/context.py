"""The run context every job receives: logical date, run id, configuration, paths, Spark session."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from jobs.config import load_config, resolve_path

log = logging.getLogger("reaseq")


@dataclass
class JobResult:
    rows_in: int = 0
    rows_out: int = 0
    rows_quarantined: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(self.metrics, default=str, sort_keys=True)


@dataclass
class RunContext:
    ds: dt.date
    run_id: str
    config: dict[str, Any]
    dag_id: str = "reaseq_nightly"
    airflow_run_id: str | None = None
    _spark: Any = None

    @classmethod
    def create(
        cls, ds: str | dt.date | None = None, run_id: str | None = None, overrides: dict | None = None,
        dag_id: str = "reaseq_nightly",
    ) -> RunContext:
        if ds is None:
            ds = dt.datetime.now(dt.UTC).date()
        if isinstance(ds, str):
            try:
                ds = dt.date.fromisoformat(ds[:10])
            except ValueError:
                raise ValueError(f"ds={ds!r} is not a date: use YYYY-MM-DD") from None
        # Deterministic, and the same as the DAG writes, so that rerunning a day by any entry point
        # rewrites the same lineage (idempotent reruns).
        run_id = run_id or f"{dag_id}__{ds.isoformat()}"
        return cls(ds=ds, run_id=run_id, config=load_config(overrides), dag_id=dag_id)

    @property
    def root(self) -> str:
        return resolve_path(self.config["lakehouse"])

    @property
    def artifacts(self) -> str:
        return resolve_path(self.config["artifacts"])

    @property
    def dataset(self) -> str:
        return self.config["dataset"]

    @property
    def spark(self):
        if self._spark is None:
            from jobs.spark import get_spark

            self._spark = get_spark(self.config.get("spark", {}).get("master"))
        return self._spark


def progress_line(what: str, done: int, total: int, elapsed: float, unit: str = "") -> str:
    """'what: 15/102 items (15%), 0.12/s, ETA 12 min 5 s': one format for every long loop's progress."""
    rate = done / max(elapsed, 1e-9)
    pct = 100.0 * done / total if total else 100.0
    unit = f" {unit}" if unit else ""
    return f"{what}: {done:,}/{total:,}{unit} ({pct:.0f}%), {_rate(rate)}/s, ETA {_eta((total - done) / rate if rate else None)}"


def _rate(rate: float) -> str:
    return f"{rate:.2g}" if rate < 10 else f"{rate:.0f}"  # 0.12/s on a slow engine, not 0.1 or 0.0


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


class Progress:
    """Logs done of total, rate and ETA at most every `every_s` seconds (for long loops in task logs)."""

    def __init__(self, what: str, total: int, every_s: float = 5.0, logger: logging.Logger | None = None):
        self.what, self.total, self.every_s = what, total, every_s
        self.log = logger or log
        self.start = self.last = time.monotonic()
        self.done = 0

    def __call__(self, done: int, total: int | None = None) -> None:
        self.done = done
        if total is not None:
            self.total = total
        now = time.monotonic()
        if now - self.last >= self.every_s or done >= self.total:
            self.last = now
            self.log.info(self.line())

    def line(self) -> str:
        return progress_line(self.what, self.done, self.total, time.monotonic() - self.start)
