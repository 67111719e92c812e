"""`make run`'s engine through real Airflow (`airflow dags test` on SQLite) on a small synthetic catalog:
every task green, every nightly table written, exit code 0; bad arguments give one line and exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from feature_store import delta
from feature_store.catalog import TABLES

ROOT = Path(__file__).resolve().parent.parent


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "REASEQ__LAKEHOUSE": str(tmp_path / "lakehouse"),
        "REASEQ__ARTIFACTS": str(tmp_path / "artifacts"),
        "REASEQ__REPORTS": str(tmp_path / "reports"),
        "REASEQ__SYNTHETIC__N_ITEMS": "100",
        "REASEQ__SYNTHETIC__N_USERS": "60",
        "REASEQ__QUANTIZER__CODEBOOK_SIZE": "16",
        "REASEQ__QUANTIZER__MPQ_CODEBOOK_SIZE": "16",
        "REASEQ__SPARK__SHUFFLE_PARTITIONS": "2",
        "PYTHONPATH": str(ROOT),
    })
    return env


@pytest.mark.slow
@pytest.mark.engine
def test_run_through_airflow_with_the_local_engine_writes_every_table_and_stops_the_engine(tmp_path):
    """The default backend: the DAG's setup task starts the real engine, the model answers within the
    budget (2 items through the Spark job: what it wrote is checked here; 4 until 2026-12, when the
    suite had to fit 25 minutes), the rest waits in the backlog, the teardown stops the
    engine (no process left). An unchanged rerun asking nothing is tested on the real engine in
    test_local_engine_faults.py."""
    from llm_agents import local_engine

    if local_engine.running() is not None:
        pytest.skip("an engine started by someone else is running; this test checks the DAG's own")
    env = {**_env(tmp_path), "REASEQ__LLM__BACKEND": "local", "REASEQ__LLM__BUDGET_ITEMS": "2",
           "REASEQ__LLM__LOCAL__BUDGET_MINUTES": "null", "REASEQ__LLM__SAMPLES_K": "1"}
    p = subprocess.run([sys.executable, "-m", "jobs.cli", "run", "--ds", "2026-11-22", "--quiet"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "run FAILED" not in p.stderr
    root = str(tmp_path / "lakehouse")
    for name in TABLES:
        if name != "ops.training_runs":
            assert delta.exists(name, root), name
    runs = delta.read_arrow("ops.pipeline_runs", root).to_pylist()
    assert {r["task"] for r in runs if r["status"] == "success"} >= {"ingest_catalog", "publish"}
    assert "publish" in p.stdout and "success" in p.stdout
    assert (tmp_path / "reports" / "reaseq_nightly__2026-11-22" / "summary.json").exists()
    # The model's answers, as reason_items recorded them: 2 items through the Spark job, one path per
    # agent (8 requests), tokens from the engine's usage for every request.
    model = local_engine.served_model_name(local_engine.model_path())
    m = json.loads(next(r["metrics"] for r in runs if r["task"] == "reason_items"))
    assert m["model"] == model and m["attempted"] == 2, m
    knowledge = delta.read_arrow("silver.item_knowledge", root).to_pylist()
    assert len(knowledge) + m["failed"] == 2 and len(knowledge) >= 1, m
    assert m["answers"] >= 2 * 4 and m["schema_valid_rate"] >= 0.9, m
    assert m["llm_calls"] >= len(knowledge) * 4
    assert m["tokens_out"] > 20 * m["llm_calls"] and m["tokens_in"] > 100 * m["llm_calls"]
    for r in knowledge:
        assert r["model"] == model and r["status"] == "ok"
        assert r["product_type"], r["item_id"]
        # The catalog lists every synthetic item's categories: the path is a catalog fact, not the model's.
        assert dict(r["field_source"])["category_path"] == "catalog"
        assert dict(r["field_source"])["product_type"] == model
        assert r["tokens_in"] > 0 and r["tokens_out"] > 0
    assert "wait in the backlog" in p.stdout, p.stdout[-2000:]
    # The teardown stopped the engine the run started: no state file, no llama-server process.
    assert local_engine.read_state() is None
    left = subprocess.run(["pgrep", "-f", str(local_engine.server_binary())], capture_output=True, text=True)
    assert left.stdout.strip() == "", f"llama-server left running: {left.stdout}"


@pytest.mark.parametrize("args, message", [
    (["--dataset", "nope"], "unknown DATASET"),
    (["--dataset", "amazon-json"], "needs DATA"),
    (["--dataset", "movielens", "--data", "/no/such/folder"], "no such file"),
    (["--ds", "2026-13-45"], "is not a date"),
    (["--tasks", "ingest_catalog,reason_itmes"], "'reason_itmes' is not a stage of reaseq_nightly (did you mean reason_items?)"),
])
def test_bad_arguments_give_one_line_and_exit_2(tmp_path, args, message):
    p = subprocess.run([sys.executable, "-m", "jobs.cli", "run", *args], env=_env(tmp_path), cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert message in p.stderr
    assert "Traceback" not in p.stderr


def test_tasks_runs_the_named_stages_and_their_engine_only():
    """--tasks: Airflow's mark-success pattern matches every task id but the named stages (and the LLM
    engine's setup and teardown when an LLM stage runs), whole ids only."""
    import re

    from jobs.cli import check_tasks, skip_pattern
    from jobs.stages import PIPELINE

    only, err = check_tasks(["embed_items,ingest_catalog", "reason_items", "embed_items"])
    assert err is None and only == ["ingest_catalog", "reason_items", "embed_items"]  # pipeline order, once
    skipped = re.compile(skip_pattern(only))
    tasks = [*PIPELINE, "llm_engine_up", "llm_engine_down"]
    assert [t for t in tasks if not skipped.fullmatch(t)] == [*only, "llm_engine_up", "llm_engine_down"]
    assert skipped.fullmatch("reason_items_extra")  # a longer id is another task
    no_llm = re.compile(skip_pattern(["publish"]))
    assert [t for t in tasks if not no_llm.fullmatch(t)] == ["publish"]
    assert check_tasks(None) == (None, None) and skip_pattern(None) is None
