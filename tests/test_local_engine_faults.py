"""The local engine's lifecycle and faults: it stops on every exit path, a dead engine is restarted
rather than reused, and when it dies in the middle of `reason_items` the circuit stops the stage with
one line and a rerun after a restart answers every item exactly once. In a file of its own because
these tests start and kill their own engines (the tests in test_local_engine.py share one)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from llm_agents import local_engine

ROOT = Path(__file__).resolve().parent.parent


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


@pytest.mark.engine
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
    # -P: the script's folder must not shadow the standard library (llm_agents/types.py).
    cli = [sys.executable, "-P", str(ROOT / "llm_agents" / "local_engine.py")]
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


@pytest.mark.engine
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



@pytest.mark.slow
@pytest.mark.engine
def test_engine_killed_mid_run_stops_the_stage_and_a_rerun_completes_it_once(built, ctx_factory):
    from feature_store import delta
    from jobs.runtime import StageFailed, execute

    if local_engine.running() is not None:
        pytest.skip("an engine started by someone else is running; this test kills its own")
    ctx = ctx_factory(synthetic={"n_items": 4, "n_users": 20, "seed": 8},
                      llm={"backend": "local", "partitions": 1, "max_concurrency": 4, "samples_k": 1,
                           "max_retries": 1, "backoff_base_s": 0.05, "backoff_max_s": 0.2,
                           "circuit_failures": 2})
    execute("ingest_catalog", ctx)
    state, _ = local_engine.up("fault-test", slots=4)
    try:
        killer = threading.Timer(10.0, os.kill, (state.pid, signal.SIGKILL))
        killer.start()
        with pytest.raises(StageFailed) as failed:
            execute("reason_items", ctx)
        killer.join()
        message = str(failed.value)
        assert "\n" not in message and "unreachable" in message, message
        assert "REASEQ__LLM__BACKEND" in message  # names the setting that works
        restarted, started = local_engine.up("fault-test", slots=4)
        assert started and restarted.pid != state.pid
        m = execute("reason_items", ctx).metrics
        rows = delta.read_arrow("silver.item_knowledge", ctx.root).to_pylist()
        ids = [r["item_id"] for r in rows]
        assert len(ids) == len(set(ids)), "an item was answered twice"
        assert len(rows) + m["failed"] == 4 and len(rows) >= 3
        assert execute("reason_items", ctx).metrics["llm_calls"] == 0
    finally:
        local_engine.down()


def test_a_machine_without_a_compiler_gets_one_line_naming_what_to_install(tmp_path):
    # A fresh cache (nothing built) and a PATH with Python alone: no cmake, no c++.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    env = {"PATH": str(bin_dir), "REASEQ_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, "-P", str(ROOT / "llm_agents" / "local_engine.py"), "build"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "cmake" in lines[0] and "apt-get install" in lines[0], p.stderr
    assert "LLM=offline" in lines[0]
    # Starting an engine that was never built says how to build it, without trying to.
    up = subprocess.run([sys.executable, "-P", str(ROOT / "llm_agents" / "local_engine.py"), "up"],
                        env=env, capture_output=True, text=True, timeout=60)
    assert up.returncode == 2 and "make llm-engine" in up.stderr and "Traceback" not in up.stderr


def test_a_benchmark_killed_with_sigterm_runs_its_clean_up(tmp_path):
    """The benchmarks that start the engine turn SIGTERM into an exit (bench.common.exit_on_sigterm), so
    `local_engine.engine()`'s `finally` stops the engine; Python's default would end the process at once
    and leave the engine, in a session of its own, on both cores. A second SIGTERM during the clean-up
    does not cut it short."""
    marker = tmp_path / "cleaned"
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from bench.common import exit_on_sigterm\n"
        "exit_on_sigterm()\n"
        "try:\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
        "finally:\n"
        "    print('cleaning', flush=True)\n"
        "    time.sleep(1)\n"
        f"    Path({str(marker)!r}).write_text('stopped')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline().strip() == "cleaning"
    proc.send_signal(signal.SIGTERM)  # impatient: a second one while it cleans up
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert marker.read_text() == "stopped"
