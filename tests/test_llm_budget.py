"""A nightly budget and a backlog: reason_items sends the work set in priority order up to
`llm.budget_items` items and/or `llm.budget_minutes` minutes; the rest waits in the backlog, is counted,
and the next run takes it first.

Runner level (a scripted slow backend, no network): past the deadline no item is started, items in flight
finish, items never started come back as nothing (not failures). Spark level (the fake OpenAI server): the
N items answered are the N of highest priority, computed here from the tables themselves; the next run
continues with the next N; a past deadline answers nothing and quarantines nothing; an unchanged catalog
with an empty backlog makes no call; the offline heuristic ignores the budget.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections import Counter
from types import SimpleNamespace

import pyarrow.compute as pc
import pytest

from jobs import cli, report
from jobs.llm import llm_budget
from llm_agents import LLMConfig, reason_items, reason_items_async
from llm_agents.runner import FanOut

try:
    from test_llm_agents import make_items
except ImportError:  # tests/ made a package
    from tests.test_llm_agents import make_items


# -- runner: the deadline -------------------------------------------------------------------------


class _Slow:
    """The offline backend, each request held `delay` seconds; records which items reached it."""

    def __init__(self, delay: float):
        from llm_agents.offline import OfflineBackend

        self.inner, self.delay = OfflineBackend(), delay
        self.requests: Counter[str] = Counter()

    async def complete(self, request):
        self.requests[request.item.item_id] += 1
        await asyncio.sleep(self.delay)
        return await self.inner.complete(request)

    async def aclose(self):
        return None


def test_past_the_deadline_no_item_starts_and_items_in_flight_finish():
    # Two request slots and k=1: under a deadline the pool holds max_concurrency / k = 2 items, so
    # items 0 and 1 start at once; each needs 4 requests of 0.25 s (3 at once, then 1) through the two
    # slots, so both finish near 1 s, after the 0.3 s deadline, and item 2 never starts.
    backend = _Slow(0.25)
    cfg = LLMConfig(max_concurrency=2)
    items = make_items(12)
    started = time.time()
    deadline = started + 0.3
    results = asyncio.run(reason_items_async(items, cfg, backend=backend, deadline=deadline))
    ended = time.time()
    assert [r.item_id for r in results] == ["item-0", "item-1"], "only the items started before the deadline"
    assert all(r.status == "ok" and r.llm_calls == 4 for r in results), "in flight: finished, not cancelled"
    assert set(backend.requests) == {"item-0", "item-1"}, "no request for an item never started"
    assert ended > deadline + 0.4, "the run waited for the items in flight"
    # With k=3 paths per agent the same two slots hold one item: ceil(2 / 3).
    three = asyncio.run(reason_items_async(items, LLMConfig(max_concurrency=2, samples_k=3), backend=_Slow(0.05),
                                           deadline=time.time() + 0.1))
    assert [r.item_id for r in three] == ["item-0"]


def test_a_deadline_already_past_starts_nothing():
    backend = _Slow(0.0)
    results = asyncio.run(reason_items_async(make_items(5), LLMConfig(), backend=backend, deadline=time.time() - 1))
    assert results == [] and not backend.requests
    assert reason_items(make_items(3), LLMConfig(), deadline=time.time() - 1) == []
    # Without a deadline, or with a far one, every item comes back, in input order.
    items = make_items(7)
    far = reason_items(items, LLMConfig(), deadline=time.time() + 3600)
    assert [r.item_id for r in far] == [i.item_id for i in items] == [r.item_id for r in reason_items(items, LLMConfig())]


def test_pool_returns_the_started_inputs_in_order_and_still_checks_each_result():
    inputs = [SimpleNamespace(item_id=f"x{i}") for i in range(10)]

    async def slow(x):
        await asyncio.sleep(0.5)
        return SimpleNamespace(item_id=x.item_id)

    async def pool(handle, deadline):
        # Under a deadline, two workers (two request slots, k=1): they take inputs at 0 s and 0.5 s; at
        # 1.0 s the deadline (0.75 s) has passed, so four inputs started.
        return await FanOut(LLMConfig(max_concurrency=2), _Slow(0.0))._pool(inputs, handle, "item_id", None, deadline)

    done = asyncio.run(pool(slow, time.time() + 0.75))
    assert [r.item_id for r in done] == ["x0", "x1", "x2", "x3"]

    async def misplaced(x):
        return SimpleNamespace(item_id="someone-else")

    with pytest.raises(RuntimeError, match="missing or misplaced"):
        asyncio.run(pool(misplaced, time.time() + 60))
    with pytest.raises(RuntimeError, match="missing or misplaced"):
        asyncio.run(pool(misplaced, None))


# -- configuration, run summary, report -----------------------------------------------------------


def budget(**llm) -> tuple:
    from jobs.config import load_config

    return llm_budget(SimpleNamespace(config=load_config({"llm": llm}, env={})))


@pytest.mark.parametrize(
    ("llm", "expected"),
    [({"backend": "openai"}, (None, None)), ({"backend": "offline", "budget_items": None}, (None, None)),
     ({"backend": "openai", "budget_items": 24}, (24, None)), ({"backend": "openai", "budget_minutes": 30}, (None, 30.0)),
     ({"backend": "offline", "budget_items": 1, "budget_minutes": 0.5}, (1, 0.5))],
)
def test_budget_keys_are_read_from_the_llm_section(llm, expected):
    assert budget(**llm) == expected


@pytest.mark.parametrize(
    ("variable", "value", "key"),
    [("BUDGET_ITEMS", "0", "llm.budget_items=0"), ("BUDGET_ITEMS", "-3", "llm.budget_items=-3"),
     ("BUDGET_ITEMS", "2.5", "llm.budget_items=2.5"), ("BUDGET_ITEMS", "ten", "llm.budget_items='ten'"),
     ("BUDGET_ITEMS", "true", "llm.budget_items=True"), ("BUDGET_MINUTES", "0", "llm.budget_minutes=0"),
     ("BUDGET_MINUTES", "-1.5", "llm.budget_minutes=-1.5"), ("BUDGET_MINUTES", ".nan", "llm.budget_minutes=nan"),
     ("BUDGET_MINUTES", "1h", "llm.budget_minutes='1h'")],
)
def test_a_bad_budget_stops_the_run_in_one_line_naming_the_key_and_its_variable(variable, value, key):
    from jobs.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(env={f"REASEQ__LLM__{variable}": value})
    message = str(e.value)
    assert message.startswith(f"setting {key} from REASEQ__LLM__{variable}: ") and "\n" not in message


@pytest.mark.parametrize(("llm", "every"), [
    # A server given by URL: 1,000 items first, then chunks sized to llm.commit_every_minutes (2 by default).
    ({"backend": "openai"}, (1000, 120.0)), ({"backend": "openai", "commit_every_minutes": 0.5}, (1000, 30.0)),
    ({"backend": "openai", "commit_every_minutes": None}, (1000, None)),
    # Fixed chunks: the local engine's own default, or commit_every_items when set.
    ({"backend": "local"}, (25, None)), ({"backend": "local", "local": {"commit_every_items": 7}}, (7, None)),
    ({"backend": "local", "commit_every_items": 300}, (300, None)), ({"backend": "openai", "commit_every_items": 5}, (5, None)),
])
def test_answers_are_committed_every_n_items_by_backend_unless_set(llm, every):
    from jobs.config import load_config
    from jobs.llm import llm_commit_every

    assert llm_commit_every(SimpleNamespace(config=load_config({"llm": llm}, env={}))) == every


def test_the_bench_lakehouse_of_the_local_model_lifts_the_time_budget_and_keeps_an_item_cap():
    from bench.lakehouse import llm_settings

    # The whole catalog through the local engine: no deadline (the build is resumable instead), k = 1.
    assert budget(**llm_settings("local")) == (None, None)
    assert budget(**llm_settings("local", budget_items=500)) == (500, None)
    assert budget(**llm_settings("offline")) == (None, None)


def test_default_config_caps_only_the_local_engine():
    # The local engine on a 2-core machine gets its own 3 minutes; a server given by URL no cap.
    assert budget(backend="local") == (None, 3.0)
    assert budget(backend="openai") == (None, None)
    # llm.budget_* override the local defaults; llm.local.budget_minutes null lifts the local cap.
    assert budget(backend="local", budget_items=5) == (5, 3.0)
    assert budget(backend="local", local={"budget_minutes": None}) == (None, None)


def test_run_summary_line():
    m = {"model": "Qwen/Qwen3-8B", "work_set": 3000, "answered": 24, "failed": 0, "backlog": 2976,
         "budget_items": 24, "budget_minutes": None, "budget_stop": "items"}
    assert cli.reason_items_line(m) == \
        "reason_items: 24 items answered by Qwen/Qwen3-8B, 2,976 wait in the backlog (budget 24 items)"
    m.update(answered=9, failed=1, backlog=2990, budget_minutes=20, budget_stop="minutes")
    assert cli.reason_items_line(m) == ("reason_items: 9 items answered by Qwen/Qwen3-8B, 1 failed (quarantined; "
                                        "the next run retries them), 2,990 wait in the backlog (budget 24 items and "
                                        "20 minutes; time ran out)")
    offline = {"model": "offline-heuristic-v1", "work_set": 240, "answered": 240, "failed": 0, "backlog": 0,
               "budget_items": None, "budget_minutes": None, "budget_stop": None}
    assert cli.reason_items_line(offline) == ("reason_items: 240 items answered by the offline heuristic "
                                              "(offline-heuristic-v1, no LLM: the budget does not apply), "
                                              "the backlog is empty")
    assert cli.reason_items_line({}) is None


def _runs_table(root, metrics: dict) -> None:
    import pyarrow as pa
    from deltalake import write_deltalake

    from feature_store import delta
    from feature_store.catalog import get

    start = dt.datetime(2026, 11, 22, 3, 0, tzinfo=dt.UTC)
    row = {"run_id": "r1", "task": "reason_items", "dag_id": "reaseq_nightly", "dataset": "synthetic",
           "status": "success", "started_at": start, "ended_at": start + dt.timedelta(seconds=5), "seconds": 5.0,
           "rows_in": 24, "rows_out": 24, "rows_quarantined": 0, "metrics": json.dumps(metrics),
           "ds": dt.date(2026, 11, 22)}
    spec = get("ops.pipeline_runs")
    write_deltalake(delta.table_path("ops.pipeline_runs", str(root)), pa.Table.from_pylist([row], spec.schema))


def test_report_shows_the_backlog_and_calls_heuristic_answers_by_their_name(tmp_path):
    llm = {"model": "Qwen/Qwen3-8B", "prompt_version": "pv1", "work_set": 3000, "catalog": 3000, "answered": 24,
           "attempted": 24, "failed": 0, "backlog": 2976, "budget_items": 24, "budget_minutes": None,
           "budget_stop": "items", "llm_calls": 96, "tokens_in": 48000, "tokens_out": 9600}
    _runs_table(tmp_path / "a", llm)
    text = report.build_report(str(tmp_path / "a"), "r1", tmp_path / "out-a", reports_dir=tmp_path).read_text()
    assert "LLM calls and tokens" in text and "96 LLM calls" in text
    assert "24 answered, 2,976 wait in the backlog for the next run (budget 24 items)" in text
    assert "2,000 in / 400 out per item" in text  # per item sent, not per item of the work set
    heuristic = {"model": "offline-heuristic-v1", "prompt_version": "pv1", "work_set": 240, "catalog": 240,
                 "answered": 240, "attempted": 240, "failed": 0, "backlog": 0, "budget_items": None,
                 "budget_minutes": None, "budget_stop": None, "llm_calls": 960, "tokens_in": 0, "tokens_out": 0}
    _runs_table(tmp_path / "b", heuristic)
    text = report.build_report(str(tmp_path / "b"), "r1", tmp_path / "out-b", reports_dir=tmp_path).read_text()
    assert "960 heuristic answers" in text and "Heuristic answers and tokens" in text
    assert "LLM calls" not in text
    assert "240 answered, the backlog is empty" in text


# -- Spark: budget_items, the next run, the deadline, an empty backlog --------------------------------

DAY = dt.date(2026, 11, 22)
N = 5


def _llm(srv, **kw) -> dict:
    return {"backend": "openai", "base_url": srv.base_url, "model": srv.model, "max_concurrency": 8,
            "partitions": 2, "timeout_s": 10, "max_retries": 2, "backoff_base_s": 0.01, "backoff_max_s": 0.05, **kw}


def expected_order(root: str, ds: dt.date) -> list[str]:
    """The priority order, from the tables as plain rows: items with interactions (up to ds) first, latest
    event first, then more events in the 30 days up to ds, then item_id; then items without, newest
    first_seen_ds first, then item_id; within each class, items the catalog had before ds first."""
    from feature_store import delta

    items = delta.read_arrow("bronze.catalog_items", root, columns=["item_id", "first_seen_ds"]).to_pylist()
    last: dict[str, dt.datetime] = {}
    recent: Counter[str] = Counter()
    for e in delta.read_arrow("bronze.interactions", root, columns=["item_id", "event_ts", "ds"]).to_pylist():
        if e["ds"] > ds:
            continue
        last[e["item_id"]] = max(last.get(e["item_id"], e["event_ts"]), e["event_ts"])
        recent[e["item_id"]] += e["ds"] > ds - dt.timedelta(days=30)

    def key(it: dict) -> tuple:
        i, new = it["item_id"], it["first_seen_ds"] >= ds
        if i in last:
            return (0, new, -last[i].timestamp(), -recent[i], 0, i)
        return (1, new, 0, 0, -it["first_seen_ds"].toordinal(), i)

    return [it["item_id"] for it in sorted(items, key=key)]


def _known(root: str) -> list[str]:
    from feature_store import delta

    return sorted(delta.read_arrow("silver.item_knowledge", root, columns=["item_id"])["item_id"].to_pylist())


def _quarantined(root: str, run_id: str) -> list[dict]:
    from feature_store import delta

    if not delta.exists("silver.quarantine", root):
        return []
    f = (pc.field("stage") == "reason_items") & (pc.field("run_id") == run_id)
    return delta.read_arrow("silver.quarantine", root, filter=f).to_pylist()


def _run_metrics(root: str, run_id: str) -> dict:
    from feature_store import delta

    rows = delta.read_arrow("ops.pipeline_runs", root,
                            filter=(pc.field("run_id") == run_id) & (pc.field("task") == "reason_items")).to_pylist()
    assert len(rows) == 1
    return json.loads(rows[0]["metrics"])


@pytest.mark.spark
def test_budget_takes_the_highest_priority_items_and_the_next_run_continues(ctx_factory, spark, monkeypatch):
    from feature_store import delta
    from jobs.reason_items import current_items, for_fan_out, prioritized, select_for_run, with_ranks
    from jobs.runtime import execute
    from tests.fake_openai_server import FakeOpenAIServer

    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    # injection="fields": the catalog's planted injection item keeps the schema, so every item sent succeeds.
    with FakeOpenAIServer(capacity=32, latency_s=0.001, injection="fields") as srv:
        def ctx_for(day: dt.date, **llm_kw):
            return ctx_factory(ds=day.isoformat(), synthetic={"n_items": 30, "n_users": 12, "seed": 4},
                               llm=_llm(srv, **llm_kw))

        ctx = ctx_for(DAY, budget_items=N)
        execute("ingest_catalog", ctx)
        execute("ingest_interactions", ctx)
        root = ctx.root
        # A catalog that grew over days: a third of the items first seen on DAY, the others 1-5 days earlier.
        ids = sorted(delta.read_arrow("bronze.catalog_items", root, columns=["item_id"])["item_id"].to_pylist())
        path = delta.table_path("bronze.catalog_items", root)
        for k in range(1, 6):
            older = [i for n, i in enumerate(ids) if n % 3 and n % 5 + 1 == k]
            if older:
                spark.sql(f"UPDATE delta.`{path}` SET first_seen_ds = date_sub(first_seen_ds, {k}) "
                          f"WHERE item_id IN ({', '.join(repr(i) for i in older)})")
        order = expected_order(root, DAY)
        with_events = set(delta.read_arrow("bronze.interactions", root, columns=["item_id"])["item_id"].to_pylist())
        first_seen = {r["item_id"]: r["first_seen_ds"] for r in
                      delta.read_arrow("bronze.catalog_items", root, columns=["item_id", "first_seen_ds"]).to_pylist()}
        # The case is not degenerate: both classes, and new as well as older items in each.
        assert {(i in with_events, first_seen[i] >= DAY) for i in ids} == {(a, b) for a in (True, False)
                                                                          for b in (True, False)}
        assert len(order) == len(ids) == 30

        # Each partition of what is sent holds its items in priority order.
        ranked, cols = prioritized(ctx, current_items(ctx))
        parts = for_fan_out(select_for_run(ranked, cols, None), cols, 3).select("item_id").rdd.glom().collect()
        assert sorted(i for p in parts for (i,) in p) == ids and sum(1 for p in parts if p) > 1
        for p in parts:
            mine = [i for (i,) in p]
            assert mine == [i for i in order if i in set(mine)]
        # Commits go in chunks of the same order: each chunk is a range of these ranks, the most important first.
        ranks = dict(with_ranks(ranked, cols).select("item_id", "_rank").collect())
        assert ranks == {i: rank for rank, i in enumerate(order)}

        # Night 1: the N items of highest priority; the rest waits, nothing is quarantined.
        before = srv.stats["requests"]
        first = execute("reason_items", ctx)
        assert _known(root) == sorted(order[:N])
        m = first.metrics
        assert (m["work_set"], m["answered"], m["attempted"], m["backlog"]) == (30, N, N, 30 - N)
        assert (m["budget_items"], m["budget_minutes"], m["budget_stop"]) == (N, None, "items")
        assert (first.rows_in, first.rows_out, first.rows_quarantined) == (N, N, 0)
        assert first.rows_in == first.rows_out + first.rows_quarantined
        assert _quarantined(root, ctx.run_id) == []
        assert srv.stats["requests"] - before == 4 * N  # 3 agents and the reconciler per item
        recorded = _run_metrics(root, ctx.run_id)
        assert (recorded["backlog"], recorded["answered"], recorded["budget_stop"]) == (30 - N, N, "items")
        assert cli.reason_items_line(recorded) == \
            f"reason_items: {N} items answered by {srv.model}, {30 - N} wait in the backlog (budget {N} items)"

        # Night 2 with a deadline already past when the partitions start: nothing answered, nothing
        # quarantined, no failed attempt counted, no call; the whole work set stays in the backlog.
        day2 = ctx_for(DAY + dt.timedelta(days=1), budget_minutes=1e-9)
        before = srv.stats["requests"]
        second = execute("reason_items", day2)
        m = second.metrics
        assert (m["work_set"], m["answered"], m["attempted"], m["backlog"]) == (30 - N, 0, 0, 30 - N)
        assert (m["budget_stop"], m["llm_calls"], m["failed"]) == ("minutes", 0, 0)
        assert (second.rows_in, second.rows_out, second.rows_quarantined) == (0, 0, 0)
        assert srv.stats["requests"] == before
        assert _quarantined(root, day2.run_id) == []
        assert delta.read_arrow("ops.llm_attempts", root).num_rows == 0
        assert _known(root) == sorted(order[:N])

        # Night 3 continues where night 1 stopped: the next N in the order as of its own day.
        day3 = DAY + dt.timedelta(days=2)
        third = execute("reason_items", ctx_for(day3, budget_items=N))
        rest = [i for i in expected_order(root, day3) if i not in set(order[:N])]
        assert _known(root) == sorted(order[:N] + rest[:N])
        assert (third.metrics["answered"], third.metrics["backlog"]) == (N, 30 - 2 * N)

        # Night 4 with room for all: the backlog is emptied, and every item has its knowledge row.
        fourth = execute("reason_items", ctx_for(day3 + dt.timedelta(days=1), budget_items=1000))
        assert (fourth.metrics["answered"], fourth.metrics["backlog"], fourth.metrics["budget_stop"]) == \
            (30 - 2 * N, 0, None)
        assert _known(root) == ids

        # Night 5: unchanged catalog, empty backlog: zero calls.
        before = srv.stats["requests"]
        fifth = execute("reason_items", ctx_for(day3 + dt.timedelta(days=2), budget_items=N))
        assert (fifth.metrics["work_set"], fifth.metrics["backlog"], fifth.metrics["llm_calls"]) == (0, 0, 0)
        assert srv.stats["requests"] == before


@pytest.mark.spark
def test_the_offline_heuristic_ignores_the_budget(ctx_factory, caplog):
    import logging

    from jobs.runtime import execute

    ctx = ctx_factory(synthetic={"n_items": 12, "n_users": 6, "seed": 2},
                      llm={"backend": "offline", "budget_items": 2, "budget_minutes": 1e-9})
    execute("ingest_catalog", ctx)
    caplog.set_level(logging.INFO, logger="reaseq")
    res = execute("reason_items", ctx)
    m = res.metrics
    assert (m["work_set"], m["answered"], m["backlog"], m["budget_stop"]) == (12, 12, 0, None)
    assert (m["budget_items"], m["budget_minutes"]) == (None, None)
    assert "the offline heuristic backend is not an LLM" in caplog.text
