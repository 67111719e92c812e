"""The real local engine (llama-server + Gemma 3 270M GGUF) in the loop: its lifecycle, and
`reason_items` through Spark against it.

These tests need the engine built and the model fetched (`make test` does both, cached). Without
them they fail with the command that builds them: a missing engine in CI is a setup defect, not
something to skip over.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from llm_agents import local_engine

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def built():
    if not local_engine.server_binary().exists() or not local_engine.model_path().exists():
        pytest.fail("the local engine is not built: run `make llm-engine` (make test does it first)")
    return local_engine.server_binary()


@pytest.fixture(scope="module")
def engine(built):
    with local_engine.engine("tests", slots=8) as state:
        yield state


def _pids_of(binary: Path) -> set[int]:
    out = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")[0].decode()
            except OSError:
                continue
            if cmd == str(binary):
                out.add(int(proc.name))
    return out


def test_engine_serves_the_packaged_gguf_under_its_lineage_name(engine):
    sha = local_engine.file_sha256(local_engine.model_path())
    assert engine.model == f"gemma-3-270m-q4_k_m.gguf@sha256:{sha[:12]}"
    with urllib.request.urlopen(f"{engine.base_url}/models", timeout=10) as r:
        served = [m["id"] for m in json.loads(r.read())["data"]]
    assert engine.model in served
    # A second `up` reuses the healthy engine instead of starting another one.
    again, started = local_engine.up("someone-else")
    assert not started and again.pid == engine.pid


def test_engine_stops_on_every_exit_path(built, tmp_path, monkeypatch):
    monkeypatch.setenv("REASEQ_CACHE", str(local_engine.cache_root()))
    if local_engine.running() is not None:
        pytest.skip("an engine started by someone else is running; this test needs to start its own")
    before = _pids_of(built)
    with pytest.raises(RuntimeError, match="boom"), local_engine.engine("exit-path-test", slots=2) as state:
        assert state.pid in _pids_of(built)
        raise RuntimeError("boom")
    assert _pids_of(built) == before, "the engine outlived the block that started it"
    assert local_engine.read_state() is None
    # The command line: up, status, down; a down with no engine says so and exits 0.
    cli = [sys.executable, str(ROOT / "llm_agents" / "local_engine.py")]
    up = subprocess.run([*cli, "up", "--slots", "2"], capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stderr
    assert "started" in up.stdout
    pid = local_engine.read_state().pid
    assert subprocess.run([*cli, "status"], capture_output=True, timeout=60).returncode == 0
    down = subprocess.run([*cli, "down"], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0 and "stopped" in down.stdout
    assert pid not in _pids_of(built)
    assert subprocess.run([*cli, "status"], capture_output=True, timeout=60).returncode == 1
    assert "none running" in subprocess.run([*cli, "down"], capture_output=True, text=True, timeout=60).stdout


def test_a_dead_engine_is_restarted_not_reused(built):
    if local_engine.running() is not None:
        pytest.skip("an engine started by someone else is running")
    state, started = local_engine.up("dead-engine-test", slots=2)
    try:
        assert started
        os.kill(state.pid, signal.SIGKILL)
        os.waitpid(state.pid, 0)
        assert local_engine.running() is None  # the state file alone does not make an engine
        fresh, started_again = local_engine.up("dead-engine-test", slots=2)
        assert started_again and fresh.pid != state.pid
    finally:
        local_engine.down()


def test_reason_items_through_spark_on_the_real_engine(engine, ctx_factory):
    """20 synthetic items, k=3 sampled paths per agent at temperature 0.7, through the Spark job."""
    from feature_store import delta
    from jobs.runtime import execute

    ctx = ctx_factory(synthetic={"n_items": 20, "n_users": 30, "seed": 4},
                      llm={"backend": "local", "samples_k": 3, "partitions": 2, "max_concurrency": 16})
    execute("ingest_catalog", ctx)
    m = execute("reason_items", ctx).metrics
    assert m["model"] == engine.model
    rows = delta.read_arrow("silver.item_knowledge", ctx.root).to_pylist()
    quarantined = m["failed"]
    assert len(rows) + quarantined == 20 and len(rows) >= 18, m
    assert m["answers"] >= 20 * 4 * 3 and m["schema_valid_rate"] >= 0.9, m
    # Tokens come from the engine's usage: one request per sampled path (llama-server bills one of n).
    assert m["llm_calls"] >= len(rows) * 4 * 3
    assert m["tokens_out"] > 20 * m["llm_calls"] and m["tokens_in"] > 100 * m["llm_calls"]
    for r in rows:
        assert r["model"] == engine.model and r["status"] == "ok"
        assert r["product_type"], r["item_id"]
        # The catalog lists every synthetic item's categories: the path is a catalog fact, not the model's.
        assert dict(r["field_source"])["category_path"] == "catalog"
        assert dict(r["field_source"])["product_type"] == engine.model
        assert r["tokens_in"] > 0 and r["tokens_out"] > 0
    # Real sampling disagrees somewhere: at least one kept field with confidence below 1.
    shares = [v for r in rows for _, v in (r["field_confidence"] or [])]
    assert min(shares) < 1.0, "k=3 at temperature 0.7 agreed on every field of every item"
    # An unchanged rerun asks the engine nothing.
    again = execute("reason_items", ctx).metrics
    assert again["llm_calls"] == 0 and again["work_set"] == quarantined
