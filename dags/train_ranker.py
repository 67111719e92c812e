"""Train the sequential ranker whenever the nightly refresh publishes new gold tables.

Scheduled on the gold Assets that `reaseq_nightly`'s publish task emits (the shared URIs of
feature_store.assets), so a successful refresh triggers training on exactly those tables. Thin on
purpose: the task imports jobs.train_ranker (torch, deltalake) only when it runs. The job reads the
tables at pinned Delta versions through Arrow, needs no Spark, and records the run in ops.training_runs.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, Param, dag, task

from feature_store.assets import gold_asset_uris
from jobs.callbacks import on_failure
from jobs.config import load_settings
from jobs.train_ranker import VARIANT_NAMES as VARIANTS


@dag(
    dag_id="train_ranker",
    schedule=[Asset(uri) for uri in gold_asset_uris()],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={
        "retries": load_settings().airflow.training_retries,
        "retry_delay": timedelta(minutes=5),
        "on_failure_callback": on_failure,  # one line: task, day, run, why, what next
    },
    on_failure_callback=on_failure,
    params={
        "variant": Param("all", type="string", enum=VARIANTS),
        "seed": Param(0, type="integer"),
        "max_epochs": Param(60, type="integer", minimum=1),
    },
    tags=["reaseq", "training"],
    doc_md=__doc__,
)
def train_ranker():
    @task(task_id="train_ranker", execution_timeout=timedelta(hours=6))
    def train(**context) -> dict:
        from jobs.train_ranker import run_task

        params = dict(context["params"])
        run_id = f"train_ranker__{context['ds']}__{params['variant']}__s{params['seed']}"
        return run_task(ds=context["ds"], run_id=run_id, conf=params)

    train()


train_ranker()
