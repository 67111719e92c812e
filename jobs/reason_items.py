"""Fan catalog items out to the multi-agent chain of thought and write silver.item_knowledge.

Incremental by content: the work set is the items whose (item_id, content_hash, prompt_version,
model) has no knowledge row yet, so an unchanged nightly rerun makes zero LLM calls. The work set is
repartitioned so that partitions x per-partition concurrency equals the configured in-flight total
(the server's batch capacity); each partition runs the async client inside `mapInArrow`. Items
that still fail after retries go to silver.quarantine with the reason and the raw answer, and are
picked up again by the next run, until `llm.dead_letter_after` failed attempts of the same content,
prompt version and model (counted in ops.llm_attempts): from then on the item is skipped and written
to the quarantine as `dead_letter` in every run, until its content, the prompt or the model changes or
an operator requeues it (`python -m jobs.cli requeue-llm`; see jobs/dead_letter.py).

Committed while it runs. The items sent are cut, in priority order, into chunks: `llm.commit_every_items`
when set, else 25 on the local engine (`llm.local.commit_every_items`), and for a server given by URL a
first chunk of 1,000 and then chunks sized to last about `llm.commit_every_minutes` (2) at the rate
measured so far, up to 20,000 items (each chunk pays a Spark job's launch and drain and a commit's fixed
jobs: against a fast server, chunks of 1,000 kept it 0.71 to 0.78 busy); each chunk's answers
are merged into silver.item_knowledge (failures into silver.quarantine and ops.llm_attempts) in a
background thread while the next chunk's requests run, so the server does not wait for Delta. A run
killed midway (a lost node, a task timeout, Ctrl-C) keeps every committed chunk: the rerun's work set no
longer holds those items and asks only for the rest; at most the chunk in flight and the one being
committed are asked again. The offline heuristic commits once.

A nightly budget and a backlog. A model is the scarce resource of a nightly run, so a run with a
model-backed backend reasons over the work set in priority order up to `llm.budget_items` items and/or
`llm.budget_minutes` minutes of fan-out wall clock (null: no cap). The offline heuristic backend is not
an LLM (it answers thousands of items per second) and ignores both. The order is deterministic:

1. items with interactions (bronze.interactions up to ds) before items without (new items);
2. within each of these two classes, items the catalog had before ds (`first_seen_ds < ds`) before
   items first seen on ds. An item that lacks knowledge although the catalog had it before ds was left
   by an earlier run (its budget or deadline stopped first, or it failed and is retried) or its text
   changed since: that carried-over work is taken before brand-new items. The recency order alone would
   not guarantee it (a new item with an event today would outrank yesterday's backlog, and among items
   without events the newest come first), and a backlog that drains in the order it formed cannot be
   starved by a steady stream of new items;
3. items with interactions: the latest `event_ts` first, then the most interactions in the 30 days up to
   ds, then item_id; items without: the newest `first_seen_ds` first, then item_id.

`budget_items` takes the first N of that order (a top-N in Spark; the work set is never collected to the
driver). `budget_minutes` becomes an absolute wall-clock deadline (epoch seconds, because the partitions
run in other processes) handed to every partition, whose workers stop starting items once it has passed
(items in flight finish; nothing is cancelled mid-item); each partition holds its items in the same
priority order, so the deadline cuts the least important. The backlog is the work set's items not
attempted: they still have no knowledge row, so the next run finds them in its work set again and takes
them first (rule 2); nothing is written for them (no quarantine row, no failed attempt), and an unchanged
catalog with an empty backlog makes no call. Accounting: rows_in = items attempted + dead letters =
rows_out + rows_quarantined, as before; the backlog is counted beside it in the metrics (`answered`,
`attempted`, `backlog`, `budget_items`, `budget_minutes`, `budget_stop`), in ops.pipeline_runs, the run
summary and the feature report.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from jobs import dead_letter
from jobs.context import JobResult, RunContext
from jobs.llm import CHUNK_MAX_ITEMS, llm_budget, llm_commit_every, llm_config
from jobs.progress import progress_line
from jobs.runtime import StageFailed, cli_main, write_quarantine

log = logging.getLogger("reaseq")

RESULT_DDL = (
    "item_id string, content_hash string, prompt_version string, model string, category_path array<string>, "
    "product_type string, attributes_json string, price_tier string, audiences array<string>, "
    "scenarios array<string>, occasions array<string>, complements array<string>, substitutes array<string>, "
    "summary string, field_confidence_json string, field_source_json string, traces string, tokens_in long, tokens_out long, "
    "llm_calls int, latency_ms double, answers_valid int, answers_rejected_json string, status string, "
    "error string, raw string"
)


# Helper columns of the priority order; dropped before the fan-out.
PRIORITY_COLUMNS = ("_prio_no_events", "_prio_new", "_prio_last_event", "_prio_recent", "_prio_first_seen")
RECENT_DAYS = 30


def prioritized(ctx: RunContext, items):
    """`items` with the helper columns of the priority order (module docstring), and that order.

    Interactions count as of ds (events of later days, present when an earlier day is replayed, are
    left out), so a day's order does not depend on what ran after it.
    """
    from pyspark.sql import functions as F

    from feature_store import delta

    ds = F.lit(ctx.ds)
    if delta.exists("bronze.interactions", ctx.root):
        events = delta.read_spark(ctx.spark, "bronze.interactions", ctx.root).filter(F.col("ds") <= ds)
        stats = events.groupBy("item_id").agg(
            F.max("event_ts").alias("_prio_last_event"),
            F.count(F.when(F.col("ds") > F.date_sub(ds, RECENT_DAYS), True)).alias("_prio_recent"),
        )
        items = items.join(stats, "item_id", "left")
    else:
        items = (items.withColumn("_prio_last_event", F.lit(None).cast("timestamp"))
                 .withColumn("_prio_recent", F.lit(None).cast("long")))
    no_events = F.col("_prio_last_event").isNull()
    items = (
        items.withColumn("_prio_no_events", no_events.cast("int"))
        .withColumn("_prio_new", (F.col("first_seen_ds") >= ds).cast("int"))
        .withColumn("_prio_first_seen", F.when(no_events, F.col("first_seen_ds")))
    )
    order = [F.col("_prio_no_events").asc(), F.col("_prio_new").asc(), F.col("_prio_last_event").desc_nulls_last(),
             F.col("_prio_recent").desc_nulls_last(), F.col("_prio_first_seen").desc_nulls_last(),
             F.col("item_id").asc()]
    return items, order


def select_for_run(ranked, order, budget_items: int | None):
    """The items a run sends: the first `budget_items` of `ranked` in priority order (all of them without
    a cap; a top-N in Spark, never collected to the driver)."""
    return ranked if budget_items is None else ranked.orderBy(*order).limit(budget_items)


def with_ranks(chosen, order):
    """`chosen` with `_rank`: its place in priority order (0: the most important), which cuts the chunks.
    Ranked on the keys only, by zipWithIndex over a sorted RDD: a distributed sort and one count per
    partition (a window without a partition would pull the whole work set into one task)."""
    keys = chosen.select("item_id", *PRIORITY_COLUMNS).orderBy(*order)
    ranks = keys.rdd.zipWithIndex().map(lambda pair: (pair[0]["item_id"], pair[1]))
    return chosen.join(chosen.sparkSession.createDataFrame(ranks, "item_id string, _rank long"), "item_id")


def next_chunk_items(done: int, seconds: float, target_s: float | None, first: int, most: int) -> int:
    """The next chunk's size: `first` when chunks are fixed (`target_s` None), else what the last chunk's
    rate (`done` items in `seconds`, its fan-out's whole wall time) answers in `target_s`, between `first`
    and `most`. A fast server gets long chunks: each chunk pays a Spark job's launch and drain and a
    commit, the same at any size, and the next chunk's requests wait while a slow commit finishes."""
    if target_s is None or seconds <= 0:
        return first
    return max(first, min(most, int(done / seconds * target_s)))


def for_fan_out(chunk, order, partitions: int):
    """A chunk as the fan-out takes it: repartitioned by item_id, each partition in priority order (so a
    deadline cuts its least important items), helper columns dropped."""
    return chunk.repartition(partitions, "item_id").sortWithinPartitions(*order).drop(*PRIORITY_COLUMNS, "_rank")


def _partition_fn(config_json: str, schema, deadline: float | None = None):
    """One Spark task: the partition's items through the async multi-agent client, as Arrow.

    mapInArrow rather than mapInPandas: the rows become plain dicts either way, and a fresh Python
    worker then never imports pandas (about 1.2 s of a 2-core machine's time per worker, paid before
    the first request could leave). `deadline` (epoch seconds): no item is started after it; the items
    not started return no row (they stay in the work set: the backlog).
    """

    def fn(batches):
        import pyarrow as pa

        from llm_agents import ItemInput, LLMConfig, reason_items

        config = LLMConfig.model_validate_json(config_json)
        items = [ItemInput.from_record(r) for b in batches for r in b.to_pylist()]
        if not items:
            return
        start = time.monotonic()
        last = [start]

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if now - last[0] >= 5 or done == total:
                last[0] = now
                line = progress_line("reason_items partition", done, total, now - start, "items")
                if deadline is not None:  # the budget, not the ETA, ends this run: say when
                    line += f"; the time budget ends in {max(0, deadline - time.time()) / 60:.1f} min"
                print(line, file=sys.stderr, flush=True)

        results = reason_items(items, config, progress=progress, deadline=deadline)
        if len(results) < len(items):
            print(f"reason_items partition: time budget reached, {len(results)} of {len(items)} items started; "
                  f"{len(items) - len(results)} left in the backlog for the next run", file=sys.stderr, flush=True)
        out = []
        for r in results:
            d = r.__dict__.copy()
            d["attributes_json"] = json.dumps(d.pop("attributes") or {}, ensure_ascii=False)
            d["field_confidence_json"] = json.dumps(d.pop("field_confidence") or {})
            d["field_source_json"] = json.dumps(d.pop("field_source") or {})
            d["answers_rejected_json"] = json.dumps(d.pop("answers_rejected") or {})
            out.append(d)
        yield pa.RecordBatch.from_pylist(out, schema=schema)

    return fn


def current_items(ctx: RunContext):
    from feature_store import delta

    return delta.read_spark(ctx.spark, "bronze.catalog_items", ctx.root)


def work_set(ctx: RunContext, prompt_version: str, model: str):
    """Items whose current content has no knowledge row for this prompt version and model."""
    from pyspark.sql import functions as F

    from feature_store import delta

    items = current_items(ctx)
    if not delta.exists("silver.item_knowledge", ctx.root):
        return items
    known = (
        delta.read_spark(ctx.spark, "silver.item_knowledge", ctx.root)
        .filter((F.col("prompt_version") == prompt_version) & (F.col("model") == model))
        .select("item_id", "content_hash")
    )
    return items.join(known, ["item_id", "content_hash"], "left_anti")


def attempts(ctx: RunContext, prompt_version: str, model: str):
    """This prompt version's and model's failure counters (ops.llm_attempts, created empty if missing)."""
    from pyspark.sql import functions as F

    from feature_store import delta
    from feature_store.catalog import get

    if not delta.exists(dead_letter.TABLE, ctx.root):
        delta.ensure_table(ctx.spark, get(dead_letter.TABLE), ctx.root)
    return (
        delta.read_spark(ctx.spark, dead_letter.TABLE, ctx.root)
        .filter((F.col("prompt_version") == prompt_version) & (F.col("model") == model))
    )


def _log_dead_letters(dead: list[dict], newly: list[str], limit: int, prompt_version: str, model: str) -> None:
    hint = f"fix the cause (silver.quarantine has each failure's reason and raw answer), then requeue: " \
           f"{dead_letter.REQUEUE_CMD} --item ID [ID ...] or --all ({dead_letter.REQUEUE_CMD} --list shows them)"
    if dead:
        ids = ", ".join(r["item_id"] for r in dead[:5]) + (", …" if len(dead) > 5 else "")
        log.warning("reason_items: skipped %d dead-lettered item(s) (%d or more failed attempts with prompt %s and "
                    "model %s; quarantined as %s): %s; %s", len(dead), limit, prompt_version, model,
                    dead_letter.REASON, ids, hint)
    if newly:
        ids = ", ".join(newly[:5]) + (", …" if len(newly) > 5 else "")
        log.warning("reason_items: %d item(s) reached %d failed attempts and are dead-lettered from the next run "
                    "on: %s; %s", len(newly), limit, ids, hint)


def run(ctx: RunContext) -> JobResult:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import to_arrow_schema

    from llm_agents import PROMPT_VERSION, model_name

    spark = ctx.spark
    budget_items, budget_minutes = llm_budget(ctx)
    partitions = ctx.config["llm"]["partitions"]
    if budget_minutes is not None or ctx.config["llm"]["backend"] == "local":
        # Every partition must run from the start: under a deadline a partition waiting for a free
        # core would begin after it and answer nothing (cutting items by hash, not priority), and the
        # local engine's in-flight total is split over the partitions, so a waiting one idles slots.
        partitions = max(1, min(partitions, spark.sparkContext.defaultParallelism))
    config = llm_config(ctx, partitions, need_server=True)
    model = model_name(config)
    if config.backend == "offline":
        if budget_items is not None or budget_minutes is not None:
            log.info("reason_items: llm.budget_items=%s and llm.budget_minutes=%s do not apply: the offline heuristic "
                     "backend is not an LLM (it answers thousands of items per second); the budget caps model-backed "
                     "backends only", budget_items, budget_minutes)
        budget_items = budget_minutes = None
    limit = config.dead_letter_after
    pending = work_set(ctx, PROMPT_VERSION, model)
    counters = attempts(ctx, PROMPT_VERSION, model)
    todo, dead = pending, []
    if limit > 0:
        over = counters.filter(F.col("failures") >= limit)
        todo = pending.join(over.select("item_id", "content_hash"), ["item_id", "content_hash"], "left_anti")
        dead = [r.asDict() for r in over.join(pending.select("item_id", "content_hash"),
                                              ["item_id", "content_hash"], "left_semi").collect()]
    dead.sort(key=lambda r: r["item_id"])
    dead_records = [
        {"source_table": "silver.item_knowledge", "key": r["item_id"], "stage": "reason_items",
         "reason": dead_letter.dead_letter_reason(r, limit),
         "payload": json.dumps({k: r[k] for k in (
             "content_hash", "prompt_version", "model", "failures", "total_failures", "last_reason",
             "first_failed_ds", "last_failed_ds", "last_failed_run_id", "requeued_at")}, default=str)}
        for r in dead
    ]
    total_items = current_items(ctx).count()
    storage = StorageLevel.MEMORY_AND_DISK
    ranked, order = prioritized(ctx, todo)
    if budget_items is not None:
        # The whole work set is counted (what the cap leaves is the backlog) before its top-N is taken.
        ranked = ranked.persist(storage)
        n_work = ranked.count()
    # Computed once, counted, then fanned out from the cache (not planned and read a second time).
    chosen = select_for_run(ranked, order, budget_items).persist(storage)
    n = chosen.count()
    if budget_items is None:
        n_work = n
    else:
        ranked.unpersist()
    # The offline heuristic answers thousands of items a second: one commit at the end is all it needs.
    chunk_items, target_s = (n, None) if config.backend == "offline" else llm_commit_every(ctx)
    chunk_items = min(n, chunk_items)
    chunked = n > chunk_items
    if chunked:
        # Checkpointed, not cached: each commit writes silver.item_knowledge and ops.llm_attempts, which the
        # work set reads, and Spark recomputes a cached plan over a table just written, which would redo the
        # work set (without the committed items, so the ranks would shift) once per chunk.
        ranked_chosen = with_ranks(chosen, order).localCheckpoint(eager=True)
        chosen.unpersist()
        chosen = ranked_chosen
    budget = ", ".join(x for x in (budget_items and f"{budget_items} items",
                                   budget_minutes and f"{budget_minutes:g} minutes") if x) or "none"
    every = (f"{chunk_items} items" if target_s is None else
             f"{chunk_items} items, then chunks sized to about {target_s / 60:g} min at the measured rate")
    log.info("reason_items: %d of %d items need knowledge, %d sent to %s this run in priority order (budget: %s), "
             "%d skipped as dead-lettered (prompt %s, %d partitions x %d in flight, committed every %s)",
             n_work, total_items, n, model, budget, len(dead), PROMPT_VERSION, partitions, config.max_concurrency,
             every)
    metrics = {"prompt_version": PROMPT_VERSION, "model": model, "work_set": n_work, "scheduled": n,
               "catalog": total_items, "partitions": partitions, "per_partition_concurrency": config.max_concurrency,
               "dead_letter_after": limit, "dead_lettered_skipped": len(dead),
               "budget_items": budget_items, "budget_minutes": budget_minutes, "commit_every_items": chunk_items,
               "commit_every_minutes": None if target_s is None else target_s / 60}
    if n == 0:
        chosen.unpersist()
        write_quarantine(ctx, dead_records)
        _log_dead_letters(dead, [], limit, PROMPT_VERSION, model)
        return JobResult(rows_in=len(dead), rows_out=0, rows_quarantined=len(dead),
                         metrics={**metrics, "llm_calls": 0, "failed": 0, "newly_dead_lettered": 0, "answered": 0,
                                  "attempted": 0, "backlog": 0, "budget_stop": None, "chunks": 0})
    result_schema = to_arrow_schema(spark.createDataFrame([], RESULT_DDL).schema)
    # Wall clock, not monotonic: the deadline is compared in the Spark workers' own processes.
    deadline = None if budget_minutes is None else time.time() + 60.0 * budget_minutes
    fan_out = _partition_fn(config.model_dump_json(), result_schema, deadline)
    # Which items sent had a failure counter as the run began (a few, normally none), read once: a chunk's
    # commit reads the counters again only when it holds one of them or a failure, instead of joining
    # ops.llm_attempts against every chunk.
    with_counters = {tuple(r[k] for k in dead_letter.KEY) for r in counters.join(
        chosen.select("item_id", "content_hash"), ["item_id", "content_hash"], "left_semi")
        .select(*dead_letter.KEY).collect()}
    totals = ChunkTotals()
    t0 = time.monotonic()
    # Chunk c is committed in a thread while chunk c+1's requests run, so the server does not wait for
    # Delta: a kill loses at most the chunk in flight and the one being committed.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reason_items-commit") as committer:
        committing = None
        start = 0
        try:
            while start < n:
                if start and deadline is not None and time.time() >= deadline:
                    break  # the chunks left are the backlog, as items a partition never started are
                if committing is not None and committing.done():
                    committing.result()  # a failed commit stops the run before more requests are sent
                end = min(n, start + chunk_items)
                chunk = chosen.filter((F.col("_rank") >= start) & (F.col("_rank") < end)) if chunked else chosen
                asked = time.monotonic()
                results = _ask(for_fan_out(chunk, order, partitions).mapInArrow(fan_out, RESULT_DDL))
                # The server's rate over this chunk's fan-out alone (a slow commit must not shrink the next).
                took = time.monotonic() - asked
                if committing is not None:
                    # The server idles while the loop waits here: the cost of committing as the run goes.
                    waited = time.monotonic()
                    committing.result()
                    totals.commit_wait_s += time.monotonic() - waited
                committing = committer.submit(_commit, ctx, results, with_counters, model, limit, totals)
                totals.sizes.append(end - start)
                if chunked:
                    log.info(progress_line(f"reason_items: chunk {len(totals.sizes)} ({end - start:,} items) "
                                           "answered, committing", end, n, time.monotonic() - t0, "items"))
                chunk_items = next_chunk_items(end - start, took, target_s,
                                               chunk_items if target_s is None else totals.sizes[0], CHUNK_MAX_ITEMS)
                start = end
            if committing is not None:
                committing.result()
        finally:
            chosen.unpersist()
    seconds = time.monotonic() - t0
    attempted = totals.ok + len(totals.failed)
    if attempted > n or (deadline is None and attempted != n):
        raise RuntimeError(f"reason_items accounting broken: {n} items sent, {attempted} results "
                           f"({totals.ok} ok, {len(totals.failed)} failed)")
    write_quarantine(ctx, dead_records)
    _log_dead_letters(dead, sorted(totals.newly_dead), limit, PROMPT_VERSION, model)
    answers = totals.valid + sum(totals.rejected.values())
    backlog = n_work - attempted
    # What stopped the run short of the whole work set: the deadline (items sent but never started),
    # else the item cap (items never sent); None when the work set was done.
    stop = "minutes" if attempted < n else "items" if n < n_work else None
    metrics.update({
        "ok": totals.ok, "failed": len(totals.failed), "seconds": round(seconds, 2),
        "items_per_second": round(attempted / seconds, 2) if seconds else None,
        "tokens_in": totals.tokens_in, "tokens_out": totals.tokens_out, "llm_calls": totals.llm_calls,
        "newly_dead_lettered": len(totals.newly_dead), "chunks": totals.chunks,
        # Every answer the model gave, checked on receipt against the agent's schema: the share that
        # was valid, and why the others were refused (they were repaired or sampled again).
        "answers": answers, "answers_rejected": dict(totals.rejected),
        "schema_valid_rate": round(totals.valid / answers, 4) if answers else None,
        "answered": totals.ok, "attempted": attempted, "backlog": backlog, "budget_stop": stop,
        # Whether committing while the next chunk's requests run keeps up as the table grows: the first and
        # last chunks' commit seconds, and how long the fan-out waited on commits in all.
        "commit_seconds": _spread(totals.commit_s), "commit_wait_seconds": round(totals.commit_wait_s, 2),
        "chunk_items": _spread(totals.sizes),
    })
    if backlog:
        log.info("reason_items: %d items answered by %s, %d failed, %d wait in the backlog for the next run "
                 "(stopped by the %s budget: %s)", totals.ok, model, len(totals.failed), backlog, stop, budget)
    # Every item attempted ends as a knowledge row or a quarantine row (a failure), every dead letter as a
    # quarantine row; the backlog (not attempted) is counted in the metrics, not in rows_in.
    return JobResult(rows_in=attempted + len(dead), rows_out=totals.ok,
                     rows_quarantined=len(totals.failed) + len(dead), metrics=metrics)


def _spread(seconds: list[float], ends: int = 5) -> dict:
    """Per-chunk values (seconds, items) summed up: total, max, and the means of the first and of the last
    `ends` chunks."""
    if not seconds:
        return {}
    k = max(1, min(ends, len(seconds) // 2))  # the first and last apart, however few the chunks
    return {"chunks": len(seconds), "total": round(sum(seconds), 2), "max": round(max(seconds), 2),
            "first": round(sum(seconds[:k]) / k, 2), "last": round(sum(seconds[-k:]) / k, 2)}


def _ask(answers):
    """The chunk's answers, computed exactly once (checkpointed before anything reads them twice)."""
    from feature_store.spark import interruptibly

    try:
        # Hours of requests on a local engine: on a helper thread so that Ctrl-C cancels them.
        return interruptibly(answers.sparkSession, lambda: answers.localCheckpoint(eager=True))
    except Exception as exc:  # a circuit opened inside a worker arrives wrapped by Spark
        from llm_agents.config import unavailable_message

        if (message := unavailable_message(exc)) is not None:
            raise StageFailed(message) from None
        raise


@dataclass
class ChunkTotals:
    """What the chunks committed so far, summed for the run's metrics."""

    chunks: int = 0
    ok: int = 0
    failed: list = field(default_factory=list)
    newly_dead: list = field(default_factory=list)
    tokens_in: int = 0
    tokens_out: int = 0
    llm_calls: int = 0
    valid: int = 0
    rejected: Counter = field(default_factory=Counter)
    commit_s: list = field(default_factory=list)  # each chunk's commit, in order
    sizes: list = field(default_factory=list)  # each chunk's items sent, in order
    commit_wait_s: float = 0.0  # the fan-out loop blocked on the previous chunk's commit


def _commit(ctx: RunContext, results, with_counters: set, model: str, limit: int, totals: ChunkTotals) -> None:
    """One chunk's answers into the tables: knowledge rows, quarantine rows for failures, the failure
    counters (ops.llm_attempts; `with_counters`: the keys of the run's items that had one as it began);
    then its counts into `totals`. The chunk's small columns are streamed to the driver a partition at a
    time, which keeps the failures and the sums, never the chunk (the offline heuristic's one chunk is
    the whole run); the knowledge rows go from the executors to one MERGE."""
    from pyspark.sql import functions as F

    from feature_store import delta
    from llm_agents import PROMPT_VERSION

    spark = ctx.spark
    started = time.monotonic()
    ok = F.col("status") == "ok"
    small = results.select("item_id", "content_hash", "status", "error", F.when(~ok, F.col("raw")).alias("raw"),
                           "tokens_in", "tokens_out", "llm_calls", "answers_valid", "answers_rejected_json")
    failed, succeeded, n_ok = [], [], 0
    sums = Counter()
    rejected = Counter()
    for r in small.toLocalIterator(prefetchPartitions=True):
        if r["status"] == "ok":
            n_ok += 1
            if (key := (r["item_id"], r["content_hash"], PROMPT_VERSION, model)) in with_counters:
                succeeded.append(key)
        else:
            failed.append(r)
        for k in ("tokens_in", "tokens_out", "llm_calls", "answers_valid"):
            sums[k] += int(r[k] or 0)
        if r["answers_rejected_json"] and r["answers_rejected_json"] != "{}":
            rejected.update({k: int(v) for k, v in json.loads(r["answers_rejected_json"]).items()})
    if n_ok:
        knowledge = (
            results.filter(ok)
            .withColumn("attributes", F.from_json("attributes_json", "map<string,string>"))
            .withColumn("field_confidence", F.from_json("field_confidence_json", "map<string,double>"))
            .withColumn("field_source", F.from_json("field_source_json", "map<string,string>"))
            .withColumn("ds", F.lit(ctx.ds))
            .withColumn("run_id", F.lit(ctx.run_id))
        )
        # Unique keys by construction (one row per item sent, bronze.catalog_items keyed by item_id): the
        # duplicate-key check, a Spark job of its own per chunk, is skipped.
        delta.merge(spark, knowledge, "silver.item_knowledge", ctx.root, keys_unique=True)
    write_quarantine(ctx, [
        {
            "source_table": "silver.item_knowledge",
            "key": r["item_id"],
            "stage": "reason_items",
            "reason": (r["error"] or "failed")[:500],
            "payload": json.dumps({"content_hash": r["content_hash"], "prompt_version": PROMPT_VERSION,
                                   "model": model, "raw": (r["raw"] or "")[:4000]}),
        }
        for r in failed
    ])
    # Count this chunk's failures, and close the counters of keys that succeeded now, from the counters as
    # they are now (an operator may have requeued an item since the run began); read only when this chunk
    # has a failure or an item that had a counter. Items the deadline kept from starting have no result
    # row, so their counters are untouched.
    keys = [(r["item_id"], r["content_hash"], PROMPT_VERSION, model) for r in failed] + succeeded
    previous = {}
    if keys:
        wanted = set(keys)
        ids = sorted({k[0] for k in keys})
        for row in attempts(ctx, PROMPT_VERSION, model).filter(F.col("item_id").isin(ids)).collect():
            if (key := tuple(row[k] for k in dead_letter.KEY)) in wanted:
                previous[key] = row.asDict()
    attempt_rows = dead_letter.attempt_rows(
        previous,
        [{"item_id": r["item_id"], "content_hash": r["content_hash"], "prompt_version": PROMPT_VERSION,
          "model": model, "reason": r["error"]} for r in failed],
        succeeded, ctx.ds, ctx.run_id,
    )
    if attempt_rows:
        delta.upsert_rows(spark, attempt_rows, dead_letter.TABLE, ctx.root)
    totals.rejected.update(rejected)
    totals.chunks += 1
    totals.ok += n_ok
    totals.failed += failed
    totals.newly_dead += [r["item_id"] for r in attempt_rows
                          if r["status"] == "failing" and 0 < limit <= r["failures"]]
    totals.tokens_in += sums["tokens_in"]
    totals.tokens_out += sums["tokens_out"]
    totals.llm_calls += sums["llm_calls"]
    totals.valid += sums["answers_valid"]
    totals.commit_s.append(time.monotonic() - started)


if __name__ == "__main__":
    raise SystemExit(cli_main("reason_items"))
