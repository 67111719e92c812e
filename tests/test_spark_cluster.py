"""The nightly DAG run by real Airflow with every task a SparkSubmitOperator (REASEQ__AIRFLOW__SUBMIT=
spark-submit, the `make run SPARK_MASTER=…` path) against a Spark standalone cluster (one master, two
1-core workers on 127.0.0.1, started from pyspark's own spark-class), for the chain ingest_catalog →
reason_items → embed_items (`--tasks`: Airflow marks the DAG's other tasks successful without running
them): those tasks green, one Spark application per stage, executors on both workers, and tables equal
to those the same stages write in-process on local Spark. Every cluster process is stopped afterwards.

The chain covers what a cluster changes: a JVM-only Delta write (ingest), Python workers on the
executors calling out over HTTP (reason_items, offline backend here), and the embedding model loaded on
executors (embed_items). Every stage file has the same spark-submit entry (jobs.runtime.cli_main), and
tests/test_submit.py checks that each task submits its own file; the whole DAG on the cluster took 17
minutes of a 57-minute suite (each stage a cold driver and executor JVMs). embed_items reads nothing else than the chain writes, and
ingest_interactions / validate_bronze feed neither of the other two (validate_bronze gates them in the
DAG but writes no table they read)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jobs import spark_cluster
from tests.conftest import SMALL, env_overrides, free_port

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["ingest_catalog", "reason_items", "embed_items"]
DS = "2026-11-21"
TABLES = ["bronze.catalog_items", "silver.item_knowledge", "silver.item_embeddings", "silver.quarantine",
          "ops.pipeline_runs"]
# Run-time columns: when and how long (and the per-run metrics, which hold throughput and Delta's file
# counts); everything else must be equal. Embeddings are compared to float tolerance: a batch's padding
# depends on which items share a batch, which depends on the partitioning.
RUN_TIME = {"ops.pipeline_runs": {"started_at", "ended_at", "seconds", "metrics"},
            "silver.item_knowledge": {"latency_ms"}}




def _env(lake: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(env_overrides(SMALL))
    env.update({
        "REASEQ__SYNTHETIC__N_ITEMS": "120",
        "REASEQ__SYNTHETIC__N_USERS": "80",
        "REASEQ__LAKEHOUSE": str(lake / "lakehouse"),
        "REASEQ__ARTIFACTS": str(lake / "artifacts"),
        "REASEQ__REPORTS": str(lake / "reports"),
        "REASEQ__SPARK__SHUFFLE_PARTITIONS": "2",
        "REASEQ__SPARK__EXECUTOR_MEMORY": "768m",  # the workers offer 1g each
        "REASEQ__SPARK__DRIVER_MEMORY": "1g",
        "PYTHONPATH": str(ROOT),
    })
    return env


def _run_chain_in_process(ctx_factory, lake: Path) -> None:
    from jobs.runtime import execute

    ctx = ctx_factory(ds=DS, root=lake, synthetic={"n_items": 120, "n_users": 80})
    for stage in STAGES:
        execute(stage, ctx)


def _run_dag_on(master: str, lake: Path) -> subprocess.CompletedProcess:
    env = _env(lake)
    env["AIRFLOW_HOME"] = str(lake / "airflow")
    return subprocess.run([sys.executable, "-m", "jobs.cli", "run", "--ds", DS, "--spark-master", master,
                           "--tasks", ",".join(STAGES)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)


def _rows(name: str, root: str) -> list[dict]:
    from feature_store import delta
    from feature_store.catalog import TABLES as SPECS

    keys = SPECS[name].key
    rows = delta.read_arrow(name, root).to_pylist()
    skip = RUN_TIME.get(name, set())
    rows = [{k: v for k, v in r.items() if k not in skip} for r in rows]
    if name in ("ops.pipeline_runs", "silver.quarantine"):  # the DAG runs more stages than the chain
        column = "task" if name == "ops.pipeline_runs" else "stage"
        rows = [r for r in rows if r[column] in STAGES]
    return sorted(rows, key=lambda r: tuple(str(r[k]) for k in keys))


@pytest.mark.slow
def test_the_dag_spark_submits_its_stages_to_a_standalone_cluster_and_writes_what_local_mode_writes(
        tmp_path, ctx_factory):
    import psutil

    from jobs.stages import PIPELINE

    local, cluster = tmp_path / "local", tmp_path / "cluster"
    _run_chain_in_process(ctx_factory, local)

    port, ui_port = free_port(), free_port()
    folder = tmp_path / "spark-cluster"
    master = spark_cluster.master_url(port)
    try:
        assert spark_cluster.up(workers=2, cores=1, memory="1g", port=port, ui_port=ui_port, worker_ui_port=0,
                                folder=folder, env=_env(cluster)) == 0
        state = spark_cluster.master_state(ui_port)
        assert state["aliveworkers"] == 2 and state["cores"] == 2
        p = _run_dag_on(master, cluster)
        assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-3000:]
        state = spark_cluster.master_state(ui_port)
        # One application per stage, named by spark-submit's --name (the session builder leaves it alone).
        apps = sorted(a["name"] for a in state["completedapps"])
        assert apps == sorted(f"reaseq-{stage}" for stage in STAGES), apps
        # The summary says which tasks Airflow skipped, not "success".
        skipped = [t for t in PIPELINE if t not in STAGES]
        assert all(re.search(rf"^{t} +not run ", p.stdout, re.M) for t in skipped), p.stdout[-3000:]
        # Executors ran on both workers (each keeps a folder per application it served).
        for k in (1, 2):
            assert list((folder / f"worker-{k}").glob("app-*")), f"worker-{k} ran no executor"
    finally:
        pids = [int(f.read_text()) for f in folder.glob("*.pid")]
        spark_cluster.down(folder)
    assert not list(folder.glob("*.pid"))
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the master still listens"

    for name in TABLES:
        a, b = _rows(name, str(local / "lakehouse")), _rows(name, str(cluster / "lakehouse"))
        assert len(a) == len(b), name
        if name == "silver.item_embeddings":
            ea = np.array([r.pop("embedding") for r in a], dtype=np.float32)
            eb = np.array([r.pop("embedding") for r in b], dtype=np.float32)
            assert np.allclose(ea, eb, atol=1e-5), float(np.abs(ea - eb).max())
        assert a == b, name
    from feature_store import delta

    runs = delta.read_arrow("ops.pipeline_runs", str(cluster / "lakehouse")).to_pylist()
    assert {r["task"] for r in runs if r["status"] == "success"} == set(STAGES)
    # Lineage as the in-process DAG writes it: the day's run id, Airflow's run id in the metrics.
    assert {r["run_id"] for r in runs} == {f"reaseq_nightly__{DS}"}
    assert all(json.loads(r["metrics"]).get("airflow_run_id", "").startswith("manual__") for r in runs)
    know = delta.read_arrow("silver.item_knowledge", str(cluster / "lakehouse"))
    assert know.num_rows > 100
