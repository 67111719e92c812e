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
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta_s = f"{eta:.0f}s" if eta != float("inf") else "?"
        return f"{self.what}: {self.done}/{self.total} ({pct:.0f}%) {rate:.1f}/s ETA {eta_s}"
