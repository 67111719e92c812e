"""DAG files: parse with no heavy import, load in a real DagBag, mirror the pipeline's stages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DAG_FILES = sorted((ROOT / "dags").glob("*.py"))


def test_dag_files_import_no_heavy_library_at_parse_time():
    assert DAG_FILES
    for path in DAG_FILES:
        code = (
            "import runpy, sys\n"
            f"runpy.run_path({str(path)!r})\n"
            "heavy = [m for m in ('pyspark', 'torch', 'great_expectations', 'sentence_transformers', 'deltalake')"
            " if m in sys.modules]\n"
            "assert not heavy, heavy\n"
        )
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
        assert p.returncode == 0, f"{path.name}: {p.stderr[-2000:]}"


def test_dagbag_loads_without_errors_and_mirrors_the_pipeline(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    from airflow.models import DagBag

    from jobs.runtime import PIPELINE

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    dag = bag.dags.get("reaseq_nightly")
    assert dag is not None
    stages = [t.task_id for t in dag.topological_sort() if not t.task_id.startswith("llm_engine_")]
    assert sorted(stages) == sorted(PIPELINE)
    # The graph is the lineage's (jobs/stages.py): the two ingests side by side, then one line.
    assert dag.get_task("ingest_catalog").upstream_task_ids == dag.get_task("ingest_interactions").upstream_task_ids \
        == set()
    assert dag.get_task("validate_bronze").upstream_task_ids == {"ingest_catalog", "ingest_interactions"}
    assert dag.get_task("embed_items").upstream_task_ids == {"reason_items"}
    assert dag.get_task("publish").upstream_task_ids == {"validate_gold"}
    # The local engine is a setup/teardown pair around the stages that ask the LLM: the teardown runs
    # whatever became of them, and waits for both LLM stages before stopping the engine.
    up, down = dag.get_task("llm_engine_up"), dag.get_task("llm_engine_down")
    assert up.is_setup and down.is_teardown
    assert up.downstream_task_ids == {"reason_items", "llm_engine_down"}
    assert up.upstream_task_ids == {"validate_bronze"}
    assert down.upstream_task_ids == {"llm_engine_up", "reason_items", "infer_beyond_log"}
    assert dag.max_active_runs == 1
    assert dag.catchup is False
    assert dag.get_task("reason_items").pool == "llm"
    assert dag.get_task("publish").outlets, "publish must emit the gold assets"


def test_reaseq_nightly_has_the_failure_callback_on_the_dag_and_every_task(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    from airflow.models import DagBag

    from jobs.callbacks import on_failure

    dag = DagBag(dag_folder=str(ROOT / "dags" / "reaseq_nightly.py")).dags["reaseq_nightly"]
    callbacks = dag.on_failure_callback if isinstance(dag.on_failure_callback, list) else [dag.on_failure_callback]
    assert on_failure in callbacks
    for t in dag.tasks:
        assert on_failure in list(t.on_failure_callback or []), t.task_id
