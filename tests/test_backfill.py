"""`make backfill`'s engine (`python -m jobs.cli backfill`): days replayed through real Airflow one after the
other, idempotently; a failed day stops the backfill and is named with its task; bad ranges are refused
with one line before anything is written."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import backfill_days
from tests.conftest import SMALL, env_overrides

ROOT = Path(__file__).resolve().parent.parent

# ops.pipeline_runs describes each execution of a (day, task), so a replay legitimately rewrites: when the
# task ran and how long it took, and its metrics (Airflow's run id, manual__<wall clock> under `dags test`,
# Delta's MERGE timings). Row counts differ for two kinds of task:
# - incremental stages have less left to do: on a replay reason_items and embed_items find every item's
#   knowledge and embedding there (0 LLM calls, 0 texts embedded), so their counts may drop;
# - publish counts whole tables as they are when it runs, ops.pipeline_runs included, which by the replay
#   also holds the first pass's record of publish itself: its counts grow.
# Every other table, and every other column of the run records, must come out identical.
RUN_TIME_COLUMNS = {"started_at", "ended_at", "seconds", "metrics"}
FEWER_ROWS = {"reason_items": {"rows_in", "rows_out"}, "embed_items": {"rows_out"}}
MORE_ROWS = {"publish": {"rows_in", "rows_out"}}



def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(env_overrides(SMALL))  # the small config of the Spark tests, on a tinier catalog: four
    env.update({"REASEQ__SYNTHETIC__N_ITEMS": "100", "REASEQ__SYNTHETIC__N_USERS": "60"})  # DAG runs
    # The subject is Airflow replaying days, not the text model: the hashing embedder (deterministic, named
    # in what it writes) spares each run MiniLM's load in a Spark worker (~20 s of a ~170 s run).
    env.update({"REASEQ__EMBEDDING__BACKEND": "hashing", "REASEQ__EMBEDDING__MODEL": "feature-hashing-384"})
    # Nor the quantizers' fit (tests/test_quantizers.py): a short one spares each run ~5 s of 8.
    env.update({"REASEQ__QUANTIZER__EPOCHS": "5", "REASEQ__QUANTIZER__KMEANS_ITERS": "10"})
    env.update({
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "REASEQ__LAKEHOUSE": str(tmp_path / "lakehouse"),
        "REASEQ__ARTIFACTS": str(tmp_path / "artifacts"),
        "REASEQ__REPORTS": str(tmp_path / "reports"),
        "REASEQ__SPARK__SHUFFLE_PARTITIONS": "2",
        "REASEQ__SPARK__DRIVER_MEMORY": "2g",
        "PYTHONPATH": str(ROOT),
    })
    return env


def _backfill(tmp_path: Path, *args: str, timeout: int = 2400, root: Path = ROOT) -> subprocess.CompletedProcess:
    env = _env(tmp_path)
    env["PYTHONPATH"] = str(root)
    return subprocess.run([sys.executable, "-m", "jobs.cli", "backfill", *args], env=env, cwd=root,
                          capture_output=True, text=True, timeout=timeout)


def _code_snapshot(dest: Path) -> Path:
    """A copy of the code the pipeline runs, so both replays run the same code even when the checkout is
    edited meanwhile (model versions hash code defaults: an edit between the replays is not a replay)."""
    for pkg in ("jobs", "models", "feature_store", "llm_agents", "dags"):
        shutil.copytree(ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _canon(value):
    if isinstance(value, dict):
        return {str(k): _canon(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple):
        # Maps come back from Arrow as lists of (key, value) pairs, in no promised order.
        items = [_canon(v) for v in value]
        if items and all(isinstance(i, list | tuple) and len(i) == 2 for i in value):
            return sorted(items, key=lambda i: json.dumps(i, sort_keys=True, default=str))
        return items
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return value


def snapshot(root: str) -> dict[str, dict]:
    """Per table: rows, a content hash over every column, and one hash per column (to say what changed)."""
    from feature_store import delta
    from feature_store.catalog import TABLES

    out = {}
    for name in TABLES:
        if not delta.exists(name, root) or name == "ops.pipeline_runs":
            continue
        rows = delta.read_arrow(name, root).to_pylist()
        lines = sorted(json.dumps({k: _canon(v) for k, v in r.items()}, sort_keys=True, default=str) for r in rows)
        columns = {}
        for col in (rows[0].keys() if rows else ()):
            values = sorted(json.dumps(_canon(r[col]), sort_keys=True, default=str) for r in rows)
            columns[col] = hashlib.sha256("\n".join(values).encode()).hexdigest()[:16]
        out[name] = {"rows": len(rows), "hash": hashlib.sha256("\n".join(lines).encode()).hexdigest(),
                     "columns": columns}
    return out


def run_records(root: str) -> dict[tuple[str, str], dict]:
    from feature_store import delta

    return {(r["run_id"], r["task"]): r for r in delta.read_arrow("ops.pipeline_runs", root).to_pylist()}


@pytest.mark.slow
def test_backfilling_a_day_then_replaying_it_leaves_identical_tables(tmp_path):
    """A day backfilled, then replayed (the rerun of a night): every table as it was, its run records
    replaced in place. Two DAG runs (~3 min each beside another test worker). Until 2026-12 this test
    backfilled two days and replayed the last (three runs); what the third run added, the other day's
    rows and run records left alone by a replay, is the MERGE's partition predicate, tested in-process
    (tests/test_pipeline_spark.py: a day's rerun replaces exactly that day), and a backfill going from
    one day to the next is tested by the failing backfill below (it stops at day 1 of 2)."""
    days = ("2026-11-21",)  # the synthetic events end on 2026-11-21
    code = _code_snapshot(tmp_path / "code")
    first = _backfill(tmp_path, "--start", days[0], "--end", days[0], "--quiet", root=code)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-3000:]
    assert "day 1 of 1: ds=2026-11-21" in first.stdout and "1 of 1 days succeeded" in first.stdout
    root = str(tmp_path / "lakehouse")
    once, runs_once = snapshot(root), run_records(root)
    assert {run_id for run_id, _ in runs_once} == {f"reaseq_nightly__{days[0]}"}
    assert all(r["status"] == "success" for r in runs_once.values())
    assert len(runs_once) == 12

    from feature_store import delta

    inter = delta.read_arrow("bronze.interactions", root, columns=["ds"])
    assert max(inter["ds"].to_pylist()).isoformat() == days[0] and len(set(inter["ds"].to_pylist())) > 1

    again = _backfill(tmp_path, "--start", days[0], "--end", days[0], "--quiet", root=code)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-3000:]
    assert "1 of 1 days succeeded" in again.stdout
    twice, runs_twice = snapshot(root), run_records(root)

    assert set(once) == set(twice) and len(once) >= 9, sorted(once)
    changed = {
        name: [c for c in once[name]["columns"] if once[name]["columns"][c] != twice[name]["columns"].get(c)]
        for name in once
        if once[name]["hash"] != twice[name]["hash"] or once[name]["rows"] != twice[name]["rows"]
    }
    assert not changed, f"tables changed by replaying the same day (columns): {changed}"

    # The run records: the same (day, task) rows, replaced, differing only where a replay differs.
    assert runs_once.keys() == runs_twice.keys()
    for key, before in runs_once.items():
        after = runs_twice[key]
        differ = {c for c in before if before[c] != after[c]} - RUN_TIME_COLUMNS
        grow = MORE_ROWS.get(key[1], set())
        assert differ <= FEWER_ROWS.get(key[1], set()) | grow, (key, differ)
        assert all((after[c] > before[c]) == (c in grow) for c in differ), \
            (key, {c: (before[c], after[c]) for c in differ})
        assert after["status"] == "success" and after["started_at"] > before["started_at"]
    replayed = json.loads(runs_twice[(f"reaseq_nightly__{days[0]}", "reason_items")]["metrics"])
    assert replayed["llm_calls"] == 0
    assert json.loads(runs_twice[(f"reaseq_nightly__{days[0]}", "embed_items")]["metrics"])["embedded"] == 0


@pytest.mark.slow
def test_a_failed_day_stops_the_backfill_names_day_and_task_and_the_callback_says_why(tmp_path):
    empty = tmp_path / "not-movielens"
    empty.mkdir()
    p = _backfill(tmp_path, "--start", "2026-11-20", "--end", "2026-11-21", "--dataset", "movielens",
                  "--data", str(empty), timeout=900)
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    assert "backfill FAILED on day 2026-11-20 (day 1 of 2) at task ingest_catalog" in p.stderr
    assert "not run: 2026-11-21" in p.stderr
    assert "2026-11-21   not run" in p.stdout
    assert "day 2 of 2" not in p.stdout
    # The task callback's line, shown on the console by jobs.cli: task, day, run, why, next step.
    line = next(x for x in p.stdout.splitlines() if "FAILED reaseq_nightly.ingest_catalog" in x)
    assert "ds=2026-11-20 run=manual__" in line
    assert "SourceError: movielens:" in line and "missing u.item and u.data" in line
    log = tmp_path / "reports" / "logs" / "reaseq_nightly_2026-11-20_movielens.log"
    assert f"read {log}" in line and "make run DS=2026-11-20 DATASET=movielens" in line
    assert "FAILED run of reaseq_nightly ds=2026-11-20" in p.stdout  # the DAG-level callback


@pytest.mark.parametrize("args, message", [
    (["--start", "2026-11-21", "--end", "2026-11-20"], "END 2026-11-20 is before START 2026-11-21"),
    (["--start", "2026-11-20", "--end", "2999-01-01"], "is in the future"),
    (["--start", "2026-11-31", "--end", "2026-11-30"], "START '2026-11-31' is not a date"),
    (["--start", "2026-11-20"], "backfill needs START=YYYY-MM-DD and END=YYYY-MM-DD"),
    (["--start", "2026-11-20", "--end", "2026-11-21", "--dataset", "nope"], "unknown DATASET"),
])
def test_bad_ranges_give_one_line_exit_2_and_write_nothing(tmp_path, args, message):
    p = subprocess.run([sys.executable, "-m", "jobs.cli", "backfill", *args], env=_env(tmp_path), cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and message in p.stderr
    assert list(tmp_path.iterdir()) == []  # no Airflow DB, no log folder, no table


def test_backfill_days_are_inclusive_and_today_is_allowed():
    today = dt.date(2026, 11, 22)
    assert backfill_days("2026-11-20", "2026-11-22", today=today) == (["2026-11-20", "2026-11-21", "2026-11-22"], None)
    assert backfill_days("2026-11-22", "2026-11-22", today=today) == (["2026-11-22"], None)
    days, err = backfill_days("2026-11-22", "2026-11-23", today=today)
    assert days == [] and "in the future" in err
