"""The cluster path's wiring, without a cluster: with REASEQ__AIRFLOW__SUBMIT=spark-submit every nightly task is the
Spark provider's SparkSubmitOperator over the stage's own file, and the command its hook builds is the one
`python -m jobs.spark_cluster submit` runs. (tests/test_spark_cluster.py runs it against a real cluster.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MASTER = "spark://127.0.0.1:7999"


@pytest.fixture
def submit_bag(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    monkeypatch.setenv("REASEQ__AIRFLOW__SUBMIT", "spark-submit")
    monkeypatch.setenv("AIRFLOW_CONN_SPARK_REASEQ", f"{MASTER}?deploy-mode=client")
    from airflow.models import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags" / "reaseq_nightly.py"))
    assert bag.import_errors == {}
    return bag.dags["reaseq_nightly"]


def test_every_task_spark_submits_its_stage_file(submit_bag):
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    from jobs.callbacks import on_failure
    from jobs.stages import PIPELINE

    dag = submit_bag
    assert [t.task_id for t in dag.topological_sort()] == PIPELINE
    for t in dag.tasks:
        assert isinstance(t, SparkSubmitOperator), t.task_id
        assert t.application == str(ROOT / "jobs" / f"{t.task_id}.py") and Path(t.application).exists()
        assert t._conn_id == "spark_reaseq"
        assert "delta-spark" in (t.jars or t.packages)
        assert t.conf["spark.sql.extensions"] == "io.delta.sql.DeltaSparkSessionExtension"
        assert "spark.master" not in t.conf  # the connection names the master
        assert t.application_args[:4] == ["--ds", "{{ ds }}", "--run-id", "{{ dag.dag_id }}__{{ ds }}"]
        assert on_failure in list(t.on_failure_callback or [])
    assert dag.get_task("reason_items").pool == "llm"
    assert dag.get_task("publish").outlets


def test_the_hook_builds_the_same_command_as_the_cluster_cli(submit_bag):
    from airflow.providers.apache.spark.hooks.spark_submit import SparkSubmitHook

    from jobs.spark_cluster import submit_command

    t = submit_bag.get_task("embed_items")
    hook = SparkSubmitHook(conn_id=t._conn_id, conf=t.conf, jars=t.jars, packages=t.packages, name=t.name,
                           driver_memory=t._driver_memory, application_args=["--ds", "2026-11-21"])
    cmd = hook._build_spark_submit_command(t.application)
    assert cmd[cmd.index("--master") + 1] == MASTER
    assert cmd[cmd.index("--deploy-mode") + 1] == "client"
    ours = submit_command("embed_items", ["--ds", "2026-11-21"], MASTER)

    def confs(c):
        return {c[i + 1] for i, x in enumerate(c) if x == "--conf"}

    assert confs(cmd) == confs(ours)
    assert cmd[cmd.index("--jars") + 1] == ours[ours.index("--jars") + 1]
    assert cmd[-3:] == ours[-3:] == [t.application, "--ds", "2026-11-21"]


def test_submit_mode_parses_without_heavy_imports():
    code = (
        "import os, runpy, sys\n"
        "os.environ['REASEQ__AIRFLOW__SUBMIT'] = 'spark-submit'\n"
        f"runpy.run_path({str(ROOT / 'dags' / 'reaseq_nightly.py')!r})\n"
        "heavy = [m for m in ('pyspark', 'torch', 'great_expectations', 'deltalake') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]


def test_an_unknown_submit_mode_is_a_clear_error(monkeypatch):
    from jobs.submit import submit_mode

    monkeypatch.setenv("REASEQ__AIRFLOW__SUBMIT", "yarn-please")
    with pytest.raises(ValueError, match="airflow.submit='yarn-please' from REASEQ__AIRFLOW__SUBMIT: "
                       "Input should be 'inprocess' or 'spark-submit'"):
        submit_mode()


@pytest.mark.parametrize("master, message", [
    ("local[2]", "give a standalone master URL, spark://HOST:PORT"),
    ("spark://127.0.0.1:1", "no Spark master answers at spark://127.0.0.1:1: start one with `make cluster-up`"),
])
def test_run_with_a_bad_master_gives_one_line_and_exit_2(tmp_path, master, message):
    import os

    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow"), "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "jobs.cli", "run", "--ds", "2026-11-21", "--spark-master", master],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "airflow").exists()  # checked before anything is written


def test_an_s3a_lakehouse_gets_hadoop_aws_matching_pysparks_hadoop(monkeypatch):
    from jobs import spark

    monkeypatch.setenv("REASEQ__LAKEHOUSE", "s3a://reaseq-lakehouse/lakehouse")
    monkeypatch.setenv("REASEQ_S3_ENDPOINT", "http://minio:9000")
    conf = spark.spark_conf("local[1]")
    hadoop = spark.hadoop_version()
    assert conf["spark.jars.packages"] == f"org.apache.hadoop:hadoop-aws:{hadoop}"
    assert conf["spark.hadoop.fs.s3a.endpoint"] == "http://minio:9000"
    assert conf["spark.hadoop.fs.s3a.path.style.access"] == "true"
    assert conf["spark.hadoop.fs.s3a.connection.ssl.enabled"] == "false"
    monkeypatch.setenv("REASEQ__LAKEHOUSE", "/tmp/lake")
    assert "spark.jars.packages" not in spark.spark_conf("local[1]")
