"""reason_items through real Spark against a real HTTP server speaking the OpenAI wire format.

Reliability (issue 3): with 20% of requests faulted across every kind, every item of a 500-item run
ends as a knowledge row or a quarantine row with a reason (none lost, none duplicated), and a rerun
with faults off completes exactly the quarantined items. Incrementality: an unchanged rerun makes no
call; editing one item's title re-reasons that item only. Resumability: answers are committed in
chunks while the stage runs, so a stage killed midway keeps them and its rerun asks only for the rest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest

from feature_store import delta
from jobs.runtime import execute
from tests.conftest import SMALL, env_overrides
from tests.fake_openai_server import FakeOpenAIServer
from tests.test_llm_agents import ERROR_CODES

pytestmark = [pytest.mark.spark, pytest.mark.slow]

FAULTS = {"429": 0.04, "500": 0.04, "stall": 0.02, "disconnect": 0.02, "truncated": 0.04, "schema": 0.04}


def _llm(srv: FakeOpenAIServer, **kw) -> dict:
    return {"backend": "openai", "base_url": srv.base_url, "model": srv.model, "max_concurrency": 64,
            "partitions": 2, "timeout_s": 0.5, "max_retries": 1, "backoff_base_s": 0.01, "backoff_max_s": 0.05,
            **kw}


def test_twenty_percent_faults_lose_nothing_and_the_rerun_completes_exactly_the_quarantined(
    ctx_factory, monkeypatch
):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with FakeOpenAIServer(capacity=64, latency_s=0.002, faults=FAULTS, stall_s=2, seed=5) as srv:
        # Committed in two chunks of 250: the accounting holds across commits.
        ctx = ctx_factory(synthetic={"n_items": 500, "n_users": 40, "seed": 5}, llm=_llm(srv, commit_every_items=250))
        execute("ingest_catalog", ctx)
        items = delta.read_arrow("bronze.catalog_items", ctx.root, columns=["item_id"])["item_id"].to_pylist()
        assert len(items) == 500
        first = execute("reason_items", ctx)
        know = delta.read_arrow("silver.item_knowledge", ctx.root)
        quarantine = delta.read_arrow("silver.quarantine", ctx.root,
                                      filter=pc.field("stage") == "reason_items").to_pylist()
        ok_ids = know["item_id"].to_pylist()
        bad_ids = [q["key"] for q in quarantine]
        assert len(ok_ids) == len(set(ok_ids)) and len(bad_ids) == len(set(bad_ids))
        assert sorted(ok_ids + bad_ids) == sorted(items), "every item is a knowledge row or a quarantine row"
        assert 0 < len(bad_ids) < 500
        assert first.rows_quarantined == len(bad_ids)
        for q in quarantine:
            assert q["reason"].split(":")[0] in ERROR_CODES, q["reason"]
            json.loads(q["payload"])
        assert srv.stats["ok"] > 0 and first.metrics["chunks"] == 2
        # Each chunk's commit is timed, and the fan-out's wait on the previous one (bench-scale --llm).
        commits = first.metrics["commit_seconds"]
        assert commits["chunks"] == 2 and 0 < commits["first"] <= commits["max"] <= commits["total"]
        assert 0 <= first.metrics["commit_wait_seconds"] <= commits["total"]
        codes = sorted(q["reason"].split(":")[0] for q in quarantine)
        print(f"reliability: {len(ok_ids)} knowledge + {len(bad_ids)} quarantined = {len(items)} items; "
              f"reasons {dict((c, codes.count(c)) for c in set(codes))}; server {dict(srv.stats)}")

        srv.set_faults()
        # Faults off; a generous timeout so a loaded CI machine cannot turn slowness into failures.
        ctx.config["llm"].update(timeout_s=10, max_retries=3)
        before = srv.stats["requests"]
        second = execute("reason_items", ctx)
        assert second.metrics["work_set"] == len(bad_ids), "the rerun works on exactly the quarantined items"
        # The fake model "obeys" the catalog's planted injection text and breaks the schema: that item
        # must stay quarantined as a schema violation, never reach the knowledge table.
        injected = set(_injected_items(ctx))
        assert len(injected) == 1
        assert second.rows_out == len(bad_ids) - len(injected & set(bad_ids))
        know = delta.read_arrow("silver.item_knowledge", ctx.root)
        assert sorted(know["item_id"].to_pylist()) == sorted(set(items) - injected)
        assert set(know["model"].to_pylist()) == {srv.model}
        q = delta.read_arrow("silver.quarantine", ctx.root, filter=pc.field("stage") == "reason_items").to_pylist()
        reasons = {r["key"]: r["reason"] for r in q}
        assert all(reasons[i].startswith("schema_violation") for i in injected)

        srv.injection = "fields"  # a model that keeps the schema but echoes the injected values
        third = execute("reason_items", ctx)
        assert third.metrics["work_set"] == len(injected) and third.rows_out == len(injected)
        before = srv.stats["requests"]
        fourth = execute("reason_items", ctx)
        assert fourth.metrics["work_set"] == 0 and srv.stats["requests"] == before, "unchanged rerun: no call"


def test_chunks_after_the_first_grow_to_the_minutes_set_at_the_rate_measured(ctx_factory, monkeypatch):
    """With llm.commit_every_items null, a fast server gets longer chunks than the first (fewer Spark jobs
    and commits per item), never past the items sent; every item still lands once."""
    import jobs.llm

    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    monkeypatch.setattr(jobs.llm, "COMMIT_EVERY_ITEMS", 40)  # the first chunk (1,000 in production)
    n = 400
    with FakeOpenAIServer(capacity=64, latency_s=0.002, injection="fields") as srv:
        # A minute: the first 40 items take seconds here (tens on a loaded machine), so the next chunk
        # would be hundreds of items and is cut at the 360 left.
        ctx = ctx_factory(synthetic={"n_items": n, "n_users": 20, "seed": 4},
                          llm=_llm(srv, timeout_s=30, max_retries=2, commit_every_minutes=1))
        execute("ingest_catalog", ctx)
        res = execute("reason_items", ctx)
    sizes = res.metrics["chunk_items"]
    assert res.metrics["commit_every_items"] == 40 and res.metrics["commit_every_minutes"] == 1
    assert sizes["total"] == n
    assert sizes["max"] > 40 and 2 <= sizes["chunks"] < n // 40, sizes
    assert res.metrics["chunks"] == sizes["chunks"] and res.rows_out == n
    known = _known(ctx.root)
    assert len(known) == len(set(known)) == n


def _injected_items(ctx) -> list[str]:
    from tests.fake_openai_server import INJECTION

    t = delta.read_arrow("bronze.catalog_items", ctx.root, columns=["item_id", "title", "description"])
    return [r["item_id"] for r in t.to_pylist() if INJECTION.search(f"{r['title']} {r['description'] or ''}")]


def test_editing_one_title_re_reasons_that_item_only(ctx_factory, spark):
    ctx = ctx_factory(synthetic={"n_items": 60, "n_users": 20, "seed": 2})
    execute("ingest_catalog", ctx)
    assert execute("reason_items", ctx).metrics["work_set"] == 60
    path = delta.table_path("bronze.catalog_items", ctx.root)
    target = delta.read_arrow("bronze.catalog_items", ctx.root, columns=["item_id"])["item_id"][0].as_py()
    spark.sql(f"UPDATE delta.`{path}` SET title = concat(title, ' v2'), content_hash = sha2(concat(title, ' v2'), 256) "
              f"WHERE item_id = '{target}'")
    again = execute("reason_items", ctx)
    assert again.metrics["work_set"] == 1
    rows = delta.read_arrow("silver.item_knowledge", ctx.root, filter=pc.field("item_id") == target)
    assert rows.num_rows == 2  # the old content's row stays as history, keyed by its content hash


def test_a_dead_server_stops_the_stage_with_one_clear_error(ctx_factory, monkeypatch):
    from jobs.runtime import StageFailed

    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    srv = FakeOpenAIServer().start()
    url = srv.base_url
    srv.stop()
    ctx = ctx_factory(synthetic={"n_items": 80, "n_users": 20, "seed": 3},
                      llm={"backend": "openai", "base_url": url, "model": "m", "partitions": 1,
                           "max_retries": 0, "circuit_failures": 5, "timeout_s": 1})
    execute("ingest_catalog", ctx)
    with pytest.raises(StageFailed, match="unreachable|make serve-llm|offline"):
        execute("reason_items", ctx)
    assert not delta.exists("silver.item_knowledge", ctx.root)


def _known(root: str) -> list[str]:
    from deltalake.exceptions import TableNotFoundError

    try:  # the stage may be creating the table right now: its log folder exists before its first commit
        return delta.read_arrow("silver.item_knowledge", root, columns=["item_id"])["item_id"].to_pylist()
    except (delta.TableMissing, TableNotFoundError):
        return []


@pytest.mark.parametrize("how", ["sigkill", "ctrl-c"])
def test_a_stage_killed_midway_keeps_its_committed_chunks_and_the_rerun_asks_only_for_the_rest(
    ctx_factory, tmp_path, monkeypatch, how
):
    """sigkill: the driver and its JVM lost at once, as a lost node. ctrl-c: SIGINT to the driver alone, as
    a terminal's Ctrl-C reaches it (pyspark's JVM ignores SIGINT): the stage must stop by itself, its
    running Spark job cancelled (PySpark's own handler used to fail re-entering the py4j call the driver
    was blocked in, and the requests went on)."""
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    n, chunk = 30, 10
    catalog = {"n_items": n, "n_users": 20, "seed": 8}
    # Two service slots at 0.1 s a request: 5 items a second, so the stage can be cut between chunks. For
    # Ctrl-C one slot at 0.4 s (16 s a chunk, a commit takes a few): the signal lands while the driver
    # waits on a chunk's fan-out, where the handler used to fail.
    capacity, latency = (2, 0.1) if how == "sigkill" else (1, 0.4)
    with FakeOpenAIServer(capacity=capacity, latency_s=latency, injection="fields") as srv:
        llm = _llm(srv, max_concurrency=4, timeout_s=30, max_retries=2, commit_every_items=chunk)
        ctx = ctx_factory(synthetic=catalog, llm=llm)
        execute("ingest_catalog", ctx)
        root = ctx.root
        env = {**os.environ, **env_overrides({**SMALL, "llm": {**SMALL["llm"], **llm}, "synthetic": catalog}),
               "REASEQ__ARTIFACTS": str(tmp_path / "artifacts"), "REASEQ__REPORTS": str(tmp_path / "reports"),
               "REASEQ__SPARK__SHUFFLE_PARTITIONS": "2", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        log = tmp_path / "stage.log"  # a file, not a pipe nobody reads while the stage runs
        stage = subprocess.Popen([sys.executable, "-m", "jobs.reason_items", "--ds", str(ctx.ds), "--lakehouse", root],
                                 env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"), start_new_session=True)
        deadline = time.monotonic() + 600
        # SIGKILL once the first chunk is committed; Ctrl-C as soon as the first chunk's requests flow.
        while (not _known(root) if how == "sigkill" else srv.stats["requests"] == 0) and stage.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert stage.poll() is None, f"the stage ended before it could be cut: {log.read_text()[-3000:]}"
        if how == "sigkill":
            os.killpg(stage.pid, signal.SIGKILL)  # the driver and its JVM, as a lost node would
            stage.wait(timeout=60)
        else:
            stage.send_signal(signal.SIGINT)
            try:
                assert stage.wait(timeout=90) != 0  # a liveness bound, not a speed target
            finally:
                if stage.poll() is None:
                    os.killpg(stage.pid, signal.SIGKILL)
            assert "KeyboardInterrupt" in log.read_text()
        # pyspark's worker daemon puts itself in its own process group, so its workers outlive the kill
        # until they notice the JVM is gone (within about a second): wait until the server hears nothing.
        quiet, last = time.monotonic(), srv.stats["requests"]
        while time.monotonic() - quiet < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
            if srv.stats["requests"] != last:
                quiet, last = time.monotonic(), srv.stats["requests"]
        committed = _known(root)
        if how == "sigkill":
            assert chunk <= len(committed) < n and len(committed) % chunk == 0, len(committed)  # whole chunks only
        else:  # the first chunk's job was cancelled, not run to its end: nothing to commit
            assert committed == [] and srv.stats["requests"] < 4 * chunk, srv.stats["requests"]
        records = delta.read_arrow("ops.pipeline_runs", root, filter=pc.field("task") == "reason_items")
        assert records.num_rows == 0  # the killed run recorded nothing as done

        before = srv.stats["requests"]
        srv.latency_s = 0.02  # the rerun's speed is not what is checked here (one slot: 120 requests)
        ctx.config["llm"]["commit_every_items"] = n  # nor its chunks
        rerun = execute("reason_items", ctx)
        left = n - len(committed)
        assert rerun.metrics["work_set"] == left and rerun.rows_out == left
        assert srv.stats["requests"] - before == 4 * left  # 3 agents and the reconciler, per item not committed
        known = _known(root)
        assert len(known) == len(set(known)) == n
