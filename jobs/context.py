"""The run context every job receives: logical date, run id, configuration, paths, Spark session."""

from __future__ import annotations

import datetime as dt
import json
import logging
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

            self._spark = get_spark(settings=self.config["spark"])
        return self._spark
