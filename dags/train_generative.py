"""Train REG4Rec's generative recommender whenever the nightly refresh publishes new gold tables.

Scheduled on the gold Assets that `reaseq_nightly`'s publish task emits (feature_store.assets), like
train_ranker. Thin on purpose: the task imports jobs.train_generative (torch, deltalake) only when it
runs. The job reads the tables at pinned Delta versions through Arrow, needs no Spark, writes checkpoints
under <artifacts>/generative/<version>/ and records the run in ops.training_runs.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, Param, dag, task

from feature_store.assets import gold_asset_uris
from jobs.callbacks import on_failure
from jobs.config import load_settings


@dag(
    dag_id="train_generative",
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
        "seed": Param(0, type="integer"),
        "max_epochs": Param(20, type="integer", minimum=1),
    },
    tags=["reaseq", "training"],
    doc_md=__doc__,
)
def train_generative():
    @task(task_id="train_generative", execution_timeout=timedelta(hours=6))
    def train(**context) -> dict:
        from jobs.train_generative import run_task

        params = dict(context["params"])
        run_id = f"train_generative__{context['ds']}__s{params['seed']}"
        return run_task(ds=context["ds"], run_id=run_id, conf=params)

    train()


train_generative()
