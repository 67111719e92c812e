"""Nightly feature refresh: catalog → knowledge → embeddings → semantic IDs → user features.

Thin on purpose: tasks import the job modules only when they run, so parsing this file never loads
pyspark or torch. Each task runs one `jobs.<name>` stage in-process (local Spark, the default), or, with
REASEQ__AIRFLOW__SUBMIT=spark-submit, submits the same stage file to the cluster of the `spark_reaseq` Airflow
connection through the Spark provider's SparkSubmitOperator (see docs/operations.md, the cluster).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, Param, dag, task

from feature_store.assets import gold_asset_uris
from jobs.callbacks import on_failure
from jobs.config import load_settings
from jobs.stages import PIPELINE, edges
from jobs.submit import CONN_ID, submit_mode, submit_settings

STAGES = PIPELINE
SETTINGS = load_settings()  # a misspelt setting fails the parse with one line (Airflow's import errors)
# A cron expression (default 02:00 UTC), or "none" for manual runs only (an Airflow started for a test).
SCHEDULE = SETTINGS.airflow.schedule
# The same URIs schedule the downstream DAGs (dags/train_ranker.py).
GOLD_ASSETS = [Asset(uri) for uri in gold_asset_uris()]
SUBMIT = submit_mode()


def _run_stage(name: str, **context) -> dict:
    from jobs.runtime import run_task

    dag_id = context["dag"].dag_id
    # Lineage run id is per DAG and logical date, so rerunning a day rewrites the same rows
    # (idempotent); Airflow's own run id goes into the task's metrics.
    return run_task(name, ds=context["ds"], run_id=f"{dag_id}__{context['ds']}", conf=dict(context["params"]),
                    dag_id=dag_id, airflow_run_id=context["run_id"])


@dag(
    dag_id="reaseq_nightly",
    schedule=None if SCHEDULE.lower() == "none" else SCHEDULE,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={
        "retries": SETTINGS.airflow.task_retries,
        "retry_delay": timedelta(minutes=2),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=20),
        "on_failure_callback": on_failure,  # one line: task, day, run, why, what next
    },
    on_failure_callback=on_failure,
    params={
        "dataset": Param(SETTINGS.dataset, type="string",
                         enum=["synthetic", "amazon-json", "movielens"]),
        "data": Param(SETTINGS.data or "", type="string"),
    },
    tags=["reaseq", "features"],
    doc_md=__doc__,
)
def reaseq_nightly():
    steps = {}
    for name in STAGES:
        kwargs = {"task_id": name}
        if name == "reason_items":
            kwargs["pool"] = "llm"  # bounds concurrent LLM work across DAG runs
        if name == "publish":
            kwargs["outlets"] = GOLD_ASSETS
        if SUBMIT == "spark-submit":
            step = _submit_operator(name, **kwargs)
        else:
            step = task(**kwargs)(_stage_callable(name))()
        steps[name] = step
    # What each stage reads and writes decides what it waits for (jobs/stages.py): the two ingests run
    # side by side, the rest waits for the knowledge (every gold table keys items by semantic ID).
    # On s3a:// (Delta's default S3 LogStore: one writer at a time) they run one after the other.
    for up, down in edges(concurrent_commits=not SETTINGS.lakehouse.startswith("s3a://")):
        steps[up] >> steps[down]
    # The local LLM engine is held from just before the first stage that asks it to just after the
    # last (the beyond-log stage asks it when beyond_log.method is llm); the teardown runs on success
    # and failure alike and stops only an engine this run started. Not in spark-submit mode: the
    # stages then run on a cluster, whose executors cannot reach an engine on this host's loopback
    # (give them a served engine by URL: backend openai).
    if SUBMIT == "spark-submit":
        return
    up, down = llm_engine_up(), llm_engine_down()
    steps["validate_bronze"] >> up >> steps["reason_items"]
    [steps["reason_items"], steps["infer_beyond_log"]] >> down
    down.as_teardown(setups=up)


@task(task_id="llm_engine_up")
def llm_engine_up(**context) -> dict:
    from jobs.llm_engine_tasks import engine_up

    return engine_up(f"{context['dag'].dag_id}__{context['ds']}", dict(context["params"]))


@task(task_id="llm_engine_down")
def llm_engine_down(**context) -> dict:
    from jobs.llm_engine_tasks import engine_down

    return engine_down(f"{context['dag'].dag_id}__{context['ds']}")


def _stage_callable(name: str):
    def run_stage(**context):
        return _run_stage(name, **context)

    run_stage.__name__ = name
    return run_stage


def _submit_operator(name: str, **kwargs):
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    settings = submit_settings(name)
    return SparkSubmitOperator(
        conn_id=CONN_ID,
        application=settings["application"],
        name=settings["name"],
        jars=settings["jars"],
        packages=settings["packages"],
        conf=settings["conf"],
        driver_memory=settings["driver_memory"],
        application_args=["--ds", "{{ ds }}", "--run-id", "{{ dag.dag_id }}__{{ ds }}",
                          "--dataset", "{{ params.dataset }}", "--data", "{{ params.data }}",
                          "--dag-id", "{{ dag.dag_id }}", "--airflow-run-id", "{{ run_id }}"],
        **kwargs,
    )


reaseq_nightly()
