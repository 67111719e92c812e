"""How the nightly refresh scales: every stage on synthetic catalogs of growing size, in one Spark session.

    python -m bench.scale                          # 10,000 and 100,000 items (make bench-scale)
    python -m bench.scale --sizes 1000000          # a million (adds to bench/results/scale.json)
    python -m bench.scale --sizes 10000 --keep     # keep the lakehouse under ~/.cache/reaseq/bench/scale-<n>
    python -m bench.scale --quantizer --keep --sizes 100000,1000000   # the two quantizer stages alone
    python -m bench.scale --beyond-log --sizes 100000,1000000         # then the beyond-log ranking on their IDs

Each size is a fresh lakehouse built by the stages `make run` executes (jobs.runtime.execute, in the
DAG's order, no Airflow), on the synthetic catalog with as many users as items (~13 events each). Per
stage and size: wall time, time per unit of what drives the stage (items, events or users, see
UNITS), the peak resident memory (sampled every 0.2 s) of the Python driver, the JVM (in local mode
the driver and the executors) and the Python workers, and rows in, out and quarantined; per table
after the run, the Delta files, bytes and rows of the current version.

Two stand-ins keep a size's run within hours on two cores, both named in what the stage writes:
- knowledge by the offline heuristic (rows say offline-heuristic-v1): the language model is a GPU
  server's work, and the fan-out to one at 10,000 items is bench-llm's measurement;
- embeddings by `feature-hashing-384@hashing` (models/embedder.py): MiniLM embeds ~15 texts a second
  per core here, hours per million; at scale embedding is a /v1/embeddings GPU server's work too.

Results of other sizes already in scale.json are kept, so a long size can run on its own night.
Targets (issue 19), reported, never asserted: time per unit at the largest size within 1.5x of the
smallest, and the driver (JVM + Python) under 4 GB at every size.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from bench.common import CACHE_DIR, REPO_ROOT, log, machine_info, utc_now

DEFAULT_SIZES = (10_000, 100_000)
DS = "2026-11-22"  # the day after the synthetic interactions end: every event is in
SAMPLE_S = 0.2
DRIVER_LIMIT_MB = 4096
PER_UNIT_LIMIT = 1.5
# What each stage's work grows with: the catalog (items), the logs (events) or the users.
UNITS = {
    "ingest_catalog": "items", "ingest_interactions": "events", "validate_bronze": "events",
    "reason_items": "items", "embed_items": "items", "train_quantizer": "items",
    "assign_semantic_ids": "items", "build_user_sequences": "events", "infer_beyond_log": "users",
    "build_user_features": "events", "validate_gold": "users", "publish": "users",
}


class MemorySampler:
    """Peak RSS of this process (the Python driver), its JVM and Python worker descendants, sampled in a
    thread. Workers forked from pyspark's daemon share pages, so their summed RSS overstates what they
    hold together; the largest single worker is reported beside the sum."""

    def __init__(self, every_s: float = SAMPLE_S):
        import psutil

        self._psutil = psutil
        self._me = psutil.Process(os.getpid())
        self._every = every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.peak: dict[str, float] = {}

    def _sample(self) -> None:
        ps = self._psutil
        mb = 1024 * 1024
        now = {"driver_python_mb": self._me.memory_info().rss / mb, "jvm_mb": 0.0, "workers_mb": 0.0,
               "largest_worker_mb": 0.0}
        for child in self._me.children(recursive=True):
            try:
                name, rss = child.name(), child.memory_info().rss / mb
            except (ps.NoSuchProcess, ps.AccessDenied):
                continue
            if name == "java":
                now["jvm_mb"] += rss
            elif name.startswith("python"):
                now["workers_mb"] += rss
                now["largest_worker_mb"] = max(now["largest_worker_mb"], rss)
        now["driver_mb"] = now["driver_python_mb"] + now["jvm_mb"]
        for k, v in now.items():
            self.peak[k] = max(self.peak.get(k, 0.0), v)

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            self._sample()

    def __enter__(self) -> MemorySampler:
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        self.peak = {k: round(v, 1) for k, v in self.peak.items()}


def own_peak_mb() -> float:
    """This process's peak RSS in MB since it started its program: VmHWM, the high-water mark of its own
    address space. Not getrusage's ru_maxrss: Linux carries that across fork and exec, so a stage spawned
    from this benchmark would report the benchmark's own memory at the fork whenever that was larger (it
    made reason_items look like 0.9 GB at a million items, where it held 0.2 GB)."""
    import resource

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    # Without /proc, the best there is: KiB on Linux, bytes on macOS.
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10), 1)


# Runs before own_peak_mb recorded getrusage's figure (`driver_python_peak_mb`), which can be the benchmark's
# own memory: the tables show their sampled RSS instead, marked.
SAMPLED_NOTE = "figures marked ~ are sampled RSS, from runs before the high-water mark was recorded"


def python_peak(memory: dict) -> str:
    """A stage process's Python peak for the tables: its own high-water mark, else (older runs) its
    sampled RSS, marked ~."""
    if "driver_python_own_peak_mb" in memory:
        return f"{memory['driver_python_own_peak_mb']:,.0f}"
    return f"~{memory.get('driver_python_mb', 0):,.0f}"


def delta_layout(root: str) -> dict[str, dict]:
    """Per table of the catalog: files, bytes and rows of its current version (from the Delta log)."""
    from deltalake import DeltaTable

    from feature_store import delta
    from feature_store.catalog import TABLES

    out = {}
    for name in TABLES:
        if not delta.exists(name, root):
            continue
        adds = DeltaTable(delta.table_path(name, root)).get_add_actions(flatten=True)
        sizes = adds.column("size_bytes").to_pylist()
        records = adds.column("num_records").to_pylist() if "num_records" in adds.column_names else []
        out[name] = {"files": len(sizes), "bytes": int(sum(sizes)),
                     "rows": int(sum(r or 0 for r in records)) if records else None}
    return out


def settings(n: int, base: Path) -> dict:
    return {
        "lakehouse": str(base / "lakehouse"), "artifacts": str(base / "artifacts"),
        "reports": str(base / "reports"), "dataset": "synthetic",
        "synthetic": {"n_items": n, "n_users": n, "seed": 1},
        "llm": {"backend": "offline"},
        "embedding": {"backend": "hashing", "model": "feature-hashing-384"},
    }


def run_size(n: int, spark=None, keep: bool = False) -> tuple[dict, object]:
    """Every stage at `n` items and users on a fresh lakehouse: (the size's results, the Spark session)."""
    from jobs.context import RunContext
    from jobs.runtime import execute
    from jobs.stages import PIPELINE

    base = Path(CACHE_DIR) / f"scale-{n}"
    shutil.rmtree(base, ignore_errors=True)  # a fresh first run each time: what a new catalog costs
    ctx = RunContext.create(ds=DS, overrides=settings(n, base))
    if spark is not None:
        ctx._spark = spark
    stages: dict[str, dict] = {}
    counts: dict[str, int] = {"items": n, "users": n}
    start = time.perf_counter()
    result: dict = {"items": n, "users": n, "stages": stages}
    for i, stage in enumerate(PIPELINE, 1):
        t0 = time.perf_counter()
        try:
            with MemorySampler() as mem:
                res = execute(stage, ctx)
        except Exception as e:  # noqa: BLE001  a size that breaks a stage is a result, not a crash
            stages[stage] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                             "seconds": round(time.perf_counter() - t0, 2), "memory": mem.peak}
            log(f"{n:,} items [{i}/{len(PIPELINE)}] {stage} FAILED after {time.perf_counter() - t0:.0f}s: "
                f"{stages[stage]['error']}; later stages need it, so this size stops here")
            result["failed_stage"] = stage
            break
        seconds = time.perf_counter() - t0
        if stage == "ingest_interactions":
            counts["events"] = res.rows_out
        unit = UNITS[stage]
        units = counts.get(unit) or n
        stages[stage] = {"seconds": round(seconds, 2), "unit": unit, "units": units,
                         "us_per_unit": round(seconds / units * 1e6, 2), "rows_in": res.rows_in,
                         "rows_out": res.rows_out, "rows_quarantined": res.rows_quarantined, "memory": mem.peak,
                         "metrics": json.loads(json.dumps(res.metrics, default=str))}
        elapsed = time.perf_counter() - start
        log(f"{n:,} items [{i}/{len(PIPELINE)}] {stage}: {seconds:.1f}s ({seconds / units * 1e6:.0f} µs per "
            f"{unit[:-1]}), driver peak {mem.peak['driver_mb']:.0f} MB, workers {mem.peak['workers_mb']:.0f} MB; "
            f"{elapsed / 60:.1f} min so far")
    result["events"] = counts.get("events")
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["tables"] = delta_layout(ctx.root)
    spark = ctx._spark
    if not keep:
        shutil.rmtree(base, ignore_errors=True)
    return result, spark


def nightly_merge(n: int, spark=None, changed: float = 0.01) -> tuple[dict, object]:
    """What the next night's catalog MERGE costs when `changed` of the items changed, against the first
    night's full load: ingest_catalog on a fresh lakehouse, then `changed` of the bronze rows edited
    (so the unchanged source differs from them again, as if it had changed those items), then
    ingest_catalog the next day. Per night: seconds, rows updated, files added and removed, bytes."""
    import datetime as dt

    from feature_store import delta
    from jobs.context import RunContext
    from jobs.runtime import execute

    base = Path(CACHE_DIR) / f"scale-merge-{n}"
    shutil.rmtree(base, ignore_errors=True)
    out: dict = {"items": n, "changed_share": changed}
    day = dt.date.fromisoformat(DS)
    for night, ds in (("first_load", day), ("one_percent_changed", day + dt.timedelta(days=1))):
        ctx = RunContext.create(ds=ds.isoformat(), overrides=settings(n, base))
        if spark is not None:
            ctx._spark = spark
        spark = ctx.spark
        if night == "one_percent_changed":
            path = delta.table_path("bronze.catalog_items", ctx.root)
            # Every hundredth item by a hash of its id: spread over the table as real edits are.
            spark.sql(f"UPDATE delta.`{path}` SET title = concat(title, ' (edited)'), "
                      f"content_hash = sha2(concat(content_hash, 'edited'), 256) "
                      f"WHERE pmod(hash(item_id), {round(1 / changed)}) = 0")
        t0 = time.perf_counter()
        res = execute("ingest_catalog", ctx)
        seconds = time.perf_counter() - t0
        if night == "first_load":
            # The partitioned table's first write too: its files per day partition (see delta.merge).
            execute("ingest_interactions", ctx)
            inter = delta_layout(ctx.root)["bronze.interactions"]
            out["interactions_first_load"] = {**inter, "days": res_days(ctx)}
        merge = res.metrics.get("merge") or {}
        out[night] = {"seconds": round(seconds, 2),
                      **{k: merge.get(k) for k in ("numTargetRowsUpdated", "numTargetRowsInserted",
                                                   "numTargetRowsDeleted", "numTargetRowsCopied",
                                                   "numTargetFilesAdded", "numTargetFilesRemoved",
                                                   "numTargetBytesAdded", "numTargetBytesRemoved",
                                                   "executionTimeMs", "fast_path", "rows_changed",
                                                   "rows_vanished")}}
        out[night]["table_files"] = delta_layout(ctx.root)["bronze.catalog_items"]["files"]
        log(f"{n:,} items, {night}: ingest_catalog {out[night]['seconds']:.1f}s, "
            f"{out[night].get('numTargetRowsUpdated')} rows updated, "
            f"{out[night].get('numTargetFilesRemoved')} of {out[night]['table_files']} files rewritten")
    shutil.rmtree(base, ignore_errors=True)
    return out, spark


QUANTIZER_STAGES = ("train_quantizer", "assign_semantic_ids")


def write_quantizer_inputs(n: int, base: Path, chunk_rows: int = 100_000, embeddings: bool = True) -> dict:
    """bronze.catalog_items and silver.item_embeddings for the synthetic catalog of `n` items, written by
    delta-rs chunk by chunk, without the stages before the quantizers: the items are the synthetic
    source's (what ingest_catalog would load), each embedded by the hashing stand-in from its title and
    description (the stages embed the knowledge text; the quantizers see 384-d unit vectors either way).
    At a million items the stages before would take hours here; the quantizers' input is all they read.
    `embeddings=False`: the catalog alone (the LLM stage's input)."""
    import datetime as dt

    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    from deltalake import write_deltalake

    from feature_store import delta
    from feature_store.catalog import CATALOG_ITEMS, ITEM_EMBEDDINGS
    from jobs.progress import Progress
    from jobs.sources import synthetic
    from models.embedder import EmbedderConfig, embed_texts

    root = str(base / "lakehouse")
    embedder = EmbedderConfig.from_dict(settings(n, base)["embedding"])
    day = dt.date.fromisoformat(DS)
    bar = Progress("quantizer inputs: items written" if embeddings else "catalog: items written", n)
    t0 = time.perf_counter()
    done = 0
    for batch in synthetic.iter_catalog(options=settings(n, base)["synthetic"], chunk_rows=chunk_rows):
        items, m = batch.items, batch.items.num_rows
        if m == 0:  # the source's last chunk may hold only events' bookkeeping
            continue
        stamp = {"source": pa.array(["synthetic"] * m), "first_seen_ds": pa.array([day] * m, pa.date32()),
                 "last_seen_ds": pa.array([day] * m, pa.date32()), "ds": pa.array([day] * m, pa.date32()),
                 "run_id": pa.array([f"bench_scale__{DS}"] * m)}
        catalog = pa.table({f.name: items.column(f.name) if f.name in items.column_names else stamp[f.name]
                            for f in CATALOG_ITEMS.schema}).cast(CATALOG_ITEMS.schema)
        write_deltalake(delta.table_path("bronze.catalog_items", root), catalog, mode="append")
        done += m
        bar(done, n)
        if not embeddings:
            continue
        texts = pc.binary_join_element_wise(items.column("title"), pc.fill_null(items.column("description"), ""),
                                            " ").to_pylist()
        vectors = embed_texts(texts, embedder)
        dim = vectors.shape[1]
        vectors_table = pa.table({
            "item_id": items.column("item_id"), "embedder": pa.array([embedder.name] * m),
            "embedding": pa.ListArray.from_arrays(pa.array(np.arange(0, (m + 1) * dim, dim, dtype=np.int32)),
                                                  pa.array(vectors.ravel())),
            "dim": pa.array([dim] * m, pa.int32()), "text_hash": pa.array(["bench"] * m),
            "prompt_version": pa.nulls(m, pa.string()), "model": pa.nulls(m, pa.string()),
            "ds": stamp["ds"], "run_id": stamp["run_id"]}).cast(ITEM_EMBEDDINGS.schema)
        write_deltalake(delta.table_path("silver.item_embeddings", root), vectors_table, mode="append")
    return {"items": done, "seconds": round(time.perf_counter() - t0, 1),
            "embedder": embedder.name if embeddings else None}


def _stage_alone(stage: str, n: int, base: str, overrides: dict | None = None, ds: str = DS) -> dict:
    """One stage in this (spawned) process, as an Airflow task runs it: seconds, result, peak memory.
    The Python driver's peak is exact (own_peak_mb); the JVM's is sampled. `overrides`: the run's settings
    (default: `settings(n, base)`)."""
    from jobs.context import RunContext
    from jobs.runtime import execute

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    ctx = RunContext.create(ds=ds, overrides=overrides or settings(n, Path(base)))
    t0 = time.perf_counter()
    with MemorySampler() as mem:
        res = execute(stage, ctx)
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 2), "unit": "items", "units": n,
            "us_per_unit": round(seconds / n * 1e6, 2), "rows_in": res.rows_in, "rows_out": res.rows_out,
            "rows_quarantined": res.rows_quarantined,
            "memory": {**mem.peak, "driver_python_own_peak_mb": own_peak_mb()},
            "metrics": json.loads(json.dumps(res.metrics, default=str))}


def quantizer_stages(n: int, keep: bool = False) -> dict:
    """train_quantizer and assign_semantic_ids at `n` items, each in its own process (as the DAG runs
    them), on inputs from write_quantizer_inputs."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    base = Path(CACHE_DIR) / f"scale-quantizer-{n}"
    shutil.rmtree(base, ignore_errors=True)
    log(f"{n:,} items: writing the quantizers' inputs ...")
    out: dict = {"items": n, "inputs": write_quantizer_inputs(n, base), "stages": {}}
    for stage in QUANTIZER_STAGES:
        with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
            r = pool.submit(_stage_alone, stage, n, str(base)).result()
        out["stages"][stage] = r
        log(f"{n:,} items: {stage} {r['seconds']:.0f}s ({r['us_per_unit']:,.0f} µs per item), Python driver "
            f"peak {python_peak(r['memory'])} MB, JVM {r['memory']['jvm_mb']:,.0f} MB")
    out["measured_at"] = utc_now()
    if not keep:
        shutil.rmtree(base, ignore_errors=True)
    return out


# The LLM stage at scale (--llm): a night's budget of items against a fake server whose capacity is
# set below what this machine's two cores can drive (client, server and Spark share them), so the
# fan-out's own efficiency is what is measured; bench-llm measures the client's CPU limit separately.
LLM_BUDGET = 25_000  # items a night
LLM_CAPACITY = 64  # the fake server's slots
LLM_LATENCY_S = 0.2  # per request: 320 requests a second
LLM_MODEL = "fake-model"


def _llm_settings(n: int, base: Path, base_url: str, budget: int, capacity: int) -> dict:
    return {**settings(n, base), "llm": {
        "backend": "openai", "base_url": base_url, "model": LLM_MODEL, "timeout_s": 30, "partitions": 2,
        # 1.5x the server's slots in flight: requests queue there, as vLLM's scheduler queues them.
        "max_concurrency": int(capacity * 1.5), "budget_items": budget}}


def prefill_knowledge(root: str, count: int, ds: str, seed: int = 0, chunk_rows: int = 200_000) -> dict:
    """`count` of the catalog's items (a seeded random choice) given knowledge rows for this prompt version
    and the fake model, written by delta-rs as if earlier nights had answered them: the table the night's
    commits MERGE into and the work set's anti-join reads. Only the keys are real; the rows say what
    they are (summary, run_id)."""
    import numpy as np
    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    from feature_store import delta
    from feature_store.catalog import ITEM_KNOWLEDGE
    from llm_agents import PROMPT_VERSION

    keys = DeltaTable(delta.table_path("bronze.catalog_items", root)).to_pyarrow_table(columns=["item_id", "content_hash"])
    chosen = np.sort(np.random.default_rng(seed).choice(keys.num_rows, size=count, replace=False))
    path = delta.table_path("silver.item_knowledge", root)
    day = np.datetime64(ds, "D")
    for start in range(0, count, chunk_rows):
        part = keys.take(pa.array(chosen[start:start + chunk_rows]))
        m = part.num_rows
        given = {"item_id": part["item_id"], "content_hash": part["content_hash"],
                 "prompt_version": pa.array([PROMPT_VERSION] * m), "model": pa.array([LLM_MODEL] * m),
                 "summary": pa.array(["bench-scale prefill: an earlier night's answer"] * m),
                 "status": pa.array(["ok"] * m), "ds": pa.array(np.full(m, day)),
                 "run_id": pa.array(["bench_scale_prefill"] * m)}
        table = pa.table({f.name: given[f.name] if f.name in given else pa.nulls(m, f.type)
                          for f in ITEM_KNOWLEDGE.schema}).cast(ITEM_KNOWLEDGE.schema)
        write_deltalake(path, table, mode="append")
    return {"rows": count, "files": len(DeltaTable(path).file_uris())}


def _knowledge_rows(root: str) -> dict:
    """silver.item_knowledge's rows and distinct keys for the fake model, and its files."""
    import pyarrow.compute as pc
    from deltalake import DeltaTable

    from feature_store import delta

    dt = DeltaTable(delta.table_path("silver.item_knowledge", root))
    t = dt.to_pyarrow_table(columns=["item_id", "content_hash", "model"], filters=[("model", "=", LLM_MODEL)])
    keys = pc.binary_join_element_wise(t["item_id"], t["content_hash"], "|")
    return {"rows": t.num_rows, "distinct_keys": len(pc.unique(keys)), "files": len(dt.file_uris())}


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and everything under it (the stage's JVM and its Python workers): a crash, not
    a shutdown."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = [root, *root.children(recursive=True)]
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def _night(n: int, base: Path, overrides: dict, ds: str, base_url: str, capacity_rps: float) -> dict:
    """reason_items for one night in its own process, with the server's count of what it served."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from bench.llm_fanout import _server_stats

    _server_stats(base_url, reset=True)
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        r = pool.submit(_stage_alone, "reason_items", n, str(base), overrides, ds).result()
    served = _server_stats(base_url)
    m = r["metrics"]
    window = served.get("service_window_s") or 0.0
    r["server"] = {k: served.get(k) for k in ("ok", "requests", "max_queued", "service_window_s")}
    # How busy the fan-out kept the server: in the server's window (first request to last answer), and
    # over the stage's fan-out and commits (its own seconds).
    r["efficiency"] = round(served.get("ok", 0) / window / capacity_rps, 4) if window else None
    r["job_efficiency"] = round(m["llm_calls"] / m["seconds"] / capacity_rps, 4) if m.get("seconds") else None
    r["us_per_answered_item"] = round(r["seconds"] / max(m.get("ok") or 1, 1) * 1e6, 1)
    r["knowledge"] = _knowledge_rows(overrides["lakehouse"])
    return r


def llm_stage(n: int, budget: int = LLM_BUDGET, capacity: int = LLM_CAPACITY, latency: float = LLM_LATENCY_S,
              keep: bool = False) -> dict:
    """reason_items over an `n`-item catalog whose knowledge table already holds all but two nights'
    budget: night 1 runs its budget through; night 2 is killed (SIGKILL, the JVM and workers too) once
    the server has answered half its budget's requests, then run again. Measured per night: the stage's
    seconds and memory, the server's efficiency, each chunk's commit time and the fan-out's wait on
    commits, the work set and backlog; after the kill: the rows committed, and how many items the
    rerun asked for again."""
    import datetime as dt
    import multiprocessing as mp

    from bench.llm_fanout import _server_stats, _start_server

    base = Path(CACHE_DIR) / f"scale-llm-{n}"
    shutil.rmtree(base, ignore_errors=True)
    root = str(base / "lakehouse")
    prefill = max(0, n - 2 * budget)
    out: dict = {"items": n, "budget_items": budget, "server_capacity": capacity, "server_latency_s": latency,
                 "server_capacity_rps": capacity / latency}
    log(f"{n:,} items: writing the catalog, then knowledge rows for {prefill:,} of them (earlier nights) ...")
    out["catalog"] = write_quantizer_inputs(n, base, embeddings=False)
    t0 = time.perf_counter()
    out["prefill"] = {**prefill_knowledge(root, prefill, DS), "seconds": round(time.perf_counter() - t0, 1)} \
        if prefill else {"rows": 0}
    os.environ.setdefault("OPENAI_API_KEY", "bench-key")
    server, base_url = _start_server(capacity, latency)
    overrides = _llm_settings(n, base, base_url, budget, capacity)
    nights = [DS, (dt.date.fromisoformat(DS) + dt.timedelta(days=1)).isoformat()]
    try:
        log(f"{n:,} items, night 1: {budget:,} items against {capacity} slots x {latency}s ...")
        out["night"] = _night(n, base, overrides, nights[0], base_url, capacity / latency)
        calls_per_item = out["night"]["metrics"]["llm_calls"] / max(out["night"]["metrics"]["ok"], 1)
        before = _knowledge_rows(root)["rows"]
        # Night 2, killed once the server has answered half of its budget's requests.
        _server_stats(base_url, reset=True)
        target = budget * calls_per_item / 2
        log(f"{n:,} items, night 2: killed after {target:,.0f} answers ...")
        proc = mp.get_context("spawn").Process(target=_stage_alone,
                                               args=("reason_items", n, str(base), overrides, nights[1]))
        proc.start()
        t0 = time.perf_counter()
        while proc.is_alive() and _server_stats(base_url).get("ok", 0) < target:
            time.sleep(0.5)
        _kill_tree(proc.pid)
        proc.join()
        killed_at = time.perf_counter() - t0
        asked_before_kill = _server_stats(base_url).get("requests", 0)
        committed = _knowledge_rows(root)["rows"] - before
        log(f"{n:,} items: killed after {killed_at:.0f}s, {committed:,} items committed; running night 2 again ...")
        resumed = _night(n, base, overrides, nights[1], base_url, capacity / latency)
        m = resumed["metrics"]
        asked_items = (asked_before_kill + m["llm_calls"]) / calls_per_item
        out["killed"] = {
            "killed_after_s": round(killed_at, 1), "requests_before_kill": asked_before_kill,
            "items_committed_before_kill": committed, "resumed": resumed,
            "resumed_work_set": m["work_set"], "resumed_answered": m["ok"],
            # Items the two runs of night 2 asked for, beyond the night's budget: the chunks in flight and
            # being committed when the process died.
            "items_asked_again": round(asked_items - budget),
            "knowledge_after": resumed["knowledge"],
            "every_item_once": resumed["knowledge"]["rows"] == resumed["knowledge"]["distinct_keys"]
                                == prefill + 2 * budget,
        }
    finally:
        server.terminate()
        server.wait(timeout=10)
    out["measured_at"] = utc_now()
    if not keep:
        shutil.rmtree(base, ignore_errors=True)
    return out


def compaction(files: int = 1_000, rows_per_file: int = 25) -> dict:
    """What compaction buys a table written a little at a time: `files` appends of `rows_per_file`
    quarantine rows (a year of nightly chunk and record commits is thousands), read whole by delta-rs and
    by Spark before and after `delta.compact`, each read timed once, warm."""
    import datetime as dt

    import pyarrow as pa
    from deltalake import write_deltalake

    from feature_store import delta
    from feature_store.catalog import QUARANTINE
    from jobs.spark import get_spark

    base = Path(CACHE_DIR) / "scale-compaction"
    shutil.rmtree(base, ignore_errors=True)
    root = str(base / "lakehouse")
    name = "silver.quarantine"
    path = delta.table_path(name, root)
    day = dt.date.fromisoformat(DS)
    t0 = time.perf_counter()
    for f in range(files):
        rows = [{"source_table": "silver.item_knowledge", "key": f"item-{f}-{k}", "stage": "reason_items",
                 "reason": "timeout: no answer in 30 s", "payload": "{}", "ds": day, "run_id": f"run-{f}"}
                for k in range(rows_per_file)]
        write_deltalake(path, pa.Table.from_pylist(rows, schema=QUARANTINE.schema), mode="append")
    out: dict = {"files": files, "rows": files * rows_per_file, "write_s": round(time.perf_counter() - t0, 1)}
    spark = get_spark()

    def reads() -> dict:
        delta.read_arrow(name, root)  # warm: each read below is the second of its kind
        delta.read_spark(spark, name, root).count()
        a = time.perf_counter()
        n = delta.read_arrow(name, root).num_rows
        b = time.perf_counter()
        m = delta.read_spark(spark, name, root).count()
        c = time.perf_counter()
        assert n == m == out["rows"], (n, m)
        return {"delta_rs_read_s": round(b - a, 3), "spark_count_s": round(c - b, 3),
                "table_files": len(delta.delta_table(name, root).file_uris())}

    out["before"] = reads()
    t0 = time.perf_counter()
    out["compact"] = {**delta.compact(None, name, root, min_files=64, target_mb=128),
                      "seconds": round(time.perf_counter() - t0, 2)}
    out["after"] = reads()
    shutil.rmtree(base, ignore_errors=True)
    log(f"compaction: {files:,} files -> {out['after']['table_files']} in {out['compact']['seconds']}s; delta-rs read "
        f"{out['before']['delta_rs_read_s']}s -> {out['after']['delta_rs_read_s']}s, Spark count "
        f"{out['before']['spark_count_s']}s -> {out['after']['spark_count_s']}s")
    out["lookups"] = lookups()
    out["measured_at"] = utc_now()
    return out


def lookups(rows: int = 200_000, appends: int = 40, target_mb: int = 16, probes: int = 20) -> dict:
    """What Z-ordering buys a point lookup: bronze.catalog_items (cluster_by item_id) written as `appends`
    appends in random id order (every file spans every id, as nightly MERGEs leave it), ~1.2 KB of
    incompressible description a row; `probes` lookups by item_id through the Arrow dataset (what DuckDB
    and `make sql` read, file statistics skipping files) before compaction, after a plain compaction and
    after the Z-order compaction does for a clustered table. Files of `target_mb` (16) over this ~150 MB
    table stand for 128 MB files over a ~1 GB one: what counts is how many of the files a lookup opens."""
    import datetime as dt
    import random

    import duckdb
    import pyarrow as pa
    import pyarrow.compute as pc
    from deltalake import DeltaTable, write_deltalake

    from feature_store import delta
    from feature_store.catalog import CATALOG_ITEMS

    base = Path(CACHE_DIR) / "scale-lookups"
    shutil.rmtree(base, ignore_errors=True)
    root = str(base / "lakehouse")
    name = CATALOG_ITEMS.name
    path = delta.table_path(name, root)
    rng = random.Random(0)
    ids = [f"item-{k:08d}" for k in range(rows)]
    rng.shuffle(ids)
    day = dt.date.fromisoformat(DS)
    for a in range(appends):
        part = ids[a::appends]
        batch = [{"item_id": i, "title": f"Item {i}", "description": os.urandom(600).hex(), "categories": ["A", "B"],
                  "brand": "b", "price": 1.0, "attributes": [("k", "v")], "content_hash": i, "source": "bench",
                  "first_seen_ds": day, "last_seen_ds": day, "ds": day, "run_id": "r"} for i in part]
        write_deltalake(path, pa.Table.from_pylist(batch, schema=CATALOG_ITEMS.schema), mode="append")
    sample = rng.sample(ids, probes)

    def measure() -> dict:
        table = DeltaTable(path)
        dataset = table.to_pyarrow_dataset()
        opened = [len(list(dataset.get_fragments(filter=pc.field("item_id") == i))) for i in sample]
        con = duckdb.connect()
        con.register("t", dataset)
        for i in sample[:2]:  # warm
            dataset.to_table(filter=pc.field("item_id") == i)
        a = time.perf_counter()
        for i in sample:
            assert dataset.to_table(filter=pc.field("item_id") == i).num_rows == 1
        b = time.perf_counter()
        for i in sample:
            assert con.execute("SELECT count(*) FROM t WHERE item_id = ?", [i]).fetchone()[0] == 1
        c = time.perf_counter()
        files = table.file_uris()
        return {"files": len(files), "mb": round(sum(os.path.getsize(f) for f in files) / 1e6, 1),
                "files_opened_per_lookup": round(sum(opened) / len(opened), 2),
                "arrow_lookup_ms": round((b - a) / probes * 1000, 1), "duckdb_lookup_ms": round((c - b) / probes * 1000, 1)}

    out: dict = {"rows": rows, "appends": appends, "target_mb": target_mb, "probes": probes, "appended": measure()}
    plain = str(base / "plain")
    shutil.copytree(path, plain)  # the same appends, compacted without sorting, for comparison
    t0 = time.perf_counter()
    DeltaTable(plain).optimize.compact(target_size=target_mb << 20)
    seconds = round(time.perf_counter() - t0, 1)
    path, kept = plain, path
    out["compacted"] = {**measure(), "seconds": seconds}
    path = kept
    t0 = time.perf_counter()
    done = delta.compact(None, name, root, min_files=1, target_mb=target_mb)  # what publish does
    assert done["sorted_by"] == ["item_id"], done
    out["z_ordered"] = {**measure(), "seconds": round(time.perf_counter() - t0, 1)}
    shutil.rmtree(base, ignore_errors=True)
    z, c = out["z_ordered"], out["compacted"]
    log(f"lookups: {c['files']} files compacted, {c['files_opened_per_lookup']} opened per lookup, "
        f"{c['duckdb_lookup_ms']} ms; Z-ordered {z['files']} files, {z['files_opened_per_lookup']} opened, "
        f"{z['duckdb_lookup_ms']} ms")
    return out


def llm_table(data: dict) -> list[str]:
    runs = sorted((data.get("llm_stage") or {}).values(), key=lambda r: r["items"])
    if not runs:
        return []
    r0 = runs[0]
    lines = ["", f"reason_items at scale (`--llm`): a night's budget of {r0['budget_items']:,} items against the fake "
             f"OpenAI-compatible server ({r0['server_capacity']} slots x {r0['server_latency_s']} s = "
             f"{r0['server_capacity_rps']:,.0f} requests/s), the knowledge table already holding the rest of the "
             "catalog but two nights; the stage in its own process. Then night 2 killed (SIGKILL of the "
             f"process, its JVM and workers) at half its answers and run again ({SAMPLED_NOTE}):", "",
             "| items | knowledge rows before | work set | answered / backlog | stage s | µs per answered item "
             "| efficiency: server window / whole stage | commit s: first / last chunks, max | fan-out waited on "
             "commits | Python driver / JVM / workers MB | killed: committed, asked again, every item once |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    before = sorted((v for key, v in (data.get("llm_stage_before") or {}).items() if key != "note"),
                    key=lambda r: r["items"])
    for r in runs + before:
        label = f"{r['items']:,}" + (" (before: every chunk 1,000 items)" if r in before else "")
        nt, m, k = r["night"], r["night"]["metrics"], r.get("killed") or {}
        c, mem = m.get("commit_seconds") or {}, nt["memory"]
        lines.append(
            f"| {label} | {r['prefill']['rows']:,} | {m['work_set']:,} | {m['ok']:,} / {m['backlog']:,} | "
            f"{nt['seconds']:,.0f} | {nt['us_per_answered_item']:,.0f} | {nt['efficiency']:.3f} / "
            f"{nt['job_efficiency']:.3f} | {c.get('first', 0):.1f} / {c.get('last', 0):.1f}, {c.get('max', 0):.1f} | "
            f"{m.get('commit_wait_seconds', 0):.1f} s | {python_peak(mem)} / {mem.get('jvm_mb', 0):,.0f} "
            f"/ {mem.get('workers_mb', 0):,.0f} | {k.get('items_committed_before_kill', 0):,}, "
            f"{k.get('items_asked_again', 0):,}, {'yes' if k.get('every_item_once') else 'NO'} |")
    return lines


def beyond_log_inference(n: int, users: int = 20_000, exhaustive_users: int = 500, max_steps: int = 1_000) -> dict:
    """infer_beyond_log's inference over an `n`-item catalog: the ranking pruned by prefix bounds against
    scoring every item, on the same model and users.

    The semantic IDs are those `--quantizer --keep` left for this size (a real codebook of the synthetic
    catalog); the users are the synthetic source's first `users` (their events, in order); the model is
    the default diffusion configuration trained for `max_steps` steps on their training prefixes. Every
    user is ranked with pruning; the first `exhaustive_users` also by scoring every item (in batches of
    32: a batch of 256 would hold a [256, slots, n] tensor, 3 GB at a million) and with pruning in the
    same batches, and those lists must agree item for item and score for score.
    """
    from jobs.infer_beyond_log import load_vocab, training_prefixes
    from jobs.sources import synthetic
    from models import diffusion as D

    base = Path(CACHE_DIR) / f"scale-quantizer-{n}"
    latest = base / "artifacts" / "quantizers" / "LATEST"
    if not latest.exists():
        raise SystemExit(f"no semantic IDs for {n:,} items under {base}: run "
                         f"`python -m bench.scale --quantizer --keep --sizes {n}` first")
    vocab = load_vocab(str(base / "lakehouse"), latest.read_text().strip())
    log(f"{n:,} items: {len(vocab.item_ids):,} semantic IDs; generating the first {users:,} users' events ...")
    events: dict[str, list[tuple[int, str]]] = {}
    for batch in synthetic.iter_interactions(options=settings(n, base)["synthetic"], chunk_rows=20_000):
        t = batch.interactions
        for u, i, ts in zip(t["user_id"].to_pylist(), t["item_id"].to_pylist(), t["event_ts"].to_pylist(),
                            strict=True):
            events.setdefault(u, []).append((ts, i))
        if len(events) >= users:
            break
    sequences = [(u, [i for _, i in sorted(ev)]) for u, ev in list(events.items())[:users]]
    train_seqs, _ = training_prefixes(vocab, sequences)
    cfg = D.DiffusionConfig(max_steps=max_steps, device="cpu")
    t0 = time.perf_counter()
    model, stats = D.train(vocab, train_seqs, cfg)
    train_s = time.perf_counter() - t0
    histories = [idx for _, items in sequences if (idx := vocab.encode(items[:-1])[0])]
    log(f"{n:,} items: trained on {len(train_seqs):,} sequences in {train_s:.0f}s (loss {stats.first_loss:.2f} -> "
        f"{stats.last_loss:.2f}); ranking {len(histories):,} users with pruning ...")
    out: dict = {"items": n, "vocab_items": len(vocab.item_ids), "users": len(histories), "top_n": 10,
                 "train": {"sequences": len(train_seqs), "steps": stats.steps, "seconds": round(train_s, 1),
                           "first_loss": round(stats.first_loss, 3), "last_loss": round(stats.last_loss, 3)}}
    few = histories[:exhaustive_users]
    # The lists are compared on the same users in the same batches: a batch's shape changes the model's
    # float results in their last bits (batched kernels), and so near-equal scores' order.
    for name, hist, kwargs in (("pruned", histories, {}), ("pruned_same_batches", few, {"batch_size": 32}),
                               ("every_item", few, {"exhaustive": True, "batch_size": 32})):
        with MemorySampler() as mem:
            t0 = time.perf_counter()
            res = D.infer(model, vocab, hist, 10, **kwargs)
            seconds = time.perf_counter() - t0
        out[name] = {"users": len(hist), "seconds": round(seconds, 2), "users_per_s": round(len(hist) / seconds, 1),
                     "items_scored_per_user": round(sum(r.scored for r in res) / len(res), 1),
                     "peak_mb": mem.peak["driver_python_mb"]}
        out[f"_{name}"] = res
        log(f"{n:,} items: {name}: {len(hist):,} users in {seconds:.1f}s ({len(hist) / seconds:,.1f} users/s), "
            f"{out[name]['items_scored_per_user']:,.0f} items scored per user")
    out.pop("_pruned")
    pruned, every = out.pop("_pruned_same_batches"), out.pop("_every_item")
    out["lists_identical"] = all(a.item_idx == b.item_idx and a.scores == b.scores
                                 for a, b in zip(pruned, every, strict=True))
    out["speedup"] = round(out["pruned_same_batches"]["users_per_s"] / out["every_item"]["users_per_s"], 1)
    out["measured_at"] = utc_now()
    return out


def beyond_log_table(data: dict) -> list[str]:
    runs = sorted((data.get("beyond_log_inference") or {}).values(), key=lambda r: r["items"])
    if not runs:
        return []
    lines = ["", "infer_beyond_log's ranking (`--beyond-log`): the rest of each user's top 10 by prefix bounds "
             "against scoring every item, on the same model (default configuration, step-capped) and the "
             "synthetic source's first users, with the semantic IDs of the `--quantizer` run:", "",
             "| items | users | pruned, batches of 256: users/s | items scored per user | the first users in batches "
             "of 32: pruned / every item, users/s | speedup | lists identical | Python MB pruned / every item |",
             "|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in runs:
        p, same, e = r["pruned"], r["pruned_same_batches"], r["every_item"]
        lines.append(f"| {r['vocab_items']:,} | {r['users']:,} | {p['users_per_s']:,.0f} | "
                     f"{p['items_scored_per_user']:,.0f} | {same['users_per_s']:,.0f} / {e['users_per_s']:,.1f} | "
                     f"{r['speedup']:,.1f}x | {'yes' if r['lists_identical'] else 'NO'} ({e['users']:,} users) | "
                     f"{p['peak_mb']:,.0f} / {e['peak_mb']:,.0f} |")
    return lines


def res_days(ctx) -> int:
    """Day partitions of bronze.interactions."""
    from feature_store import delta

    return len(set(delta.read_arrow("bronze.interactions", ctx.root, columns=["ds"])["ds"].to_pylist()))


def verdicts(sizes: dict[str, dict]) -> dict[str, dict]:
    """Per stage: time per unit at the largest size over the smallest, and the largest driver peak."""
    ordered = sorted(sizes.values(), key=lambda r: r["items"])
    out: dict[str, dict] = {}
    if not ordered:
        return out
    small, large = ordered[0], ordered[-1]
    for stage in UNITS:
        a, b = small["stages"].get(stage), large["stages"].get(stage)
        peaks = [r["stages"][stage]["memory"].get("driver_mb", 0) for r in ordered if stage in r["stages"]]
        v: dict = {"driver_peak_mb": max(peaks) if peaks else None}
        if a and b and "error" not in a and "error" not in b and large is not small:
            v["per_unit_ratio"] = round(b["us_per_unit"] / a["us_per_unit"], 2)
            v["meets_time"] = v["per_unit_ratio"] <= PER_UNIT_LIMIT
        if v["driver_peak_mb"] is not None:
            v["meets_memory"] = v["driver_peak_mb"] < DRIVER_LIMIT_MB
        if b and "error" in b:
            v["error_at_largest"] = b["error"]
        out[stage] = v
    return out


def markdown(data: dict) -> str:
    sizes = sorted(data["sizes"].values(), key=lambda r: r["items"])
    names = [f"{r['items']:,}" for r in sizes]
    lines = ["# Scale: every stage of the nightly refresh by catalog size", "",
             f"One local Spark session, {data['meta']['machine']['cpu_count']} cores; synthetic catalog, as many "
             "users as items; knowledge by the offline heuristic, embeddings by feature-hashing-384 (stand-ins, "
             "see bench/scale.py). Time per unit: microseconds per item, event or user, whichever drives the "
             "stage. Memory: peak RSS, sampled every 0.2 s. The JVM (driver and executors in local mode) has its "
             "heap capped by spark.driver_memory (4g) and grows its RSS towards the cap lazily, so its RSS says "
             "little about need; what a stage collects to the driver shows in the Python driver's RSS, and a JVM "
             "that needed more than its cap would fail the stage (listed below).", "",
             "| stage | unit | " + " | ".join(f"µs/unit @ {s}" for s in names) + " | ratio largest÷smallest | "
             + " | ".join(f"Python driver MB @ {s}" for s in names) + " | JVM MB (largest size) | "
             "Python workers MB (largest size) |",
             "|---|---|" + "---:|" * (2 * len(names) + 3)]
    v = data["verdicts"]
    for stage, unit in UNITS.items():
        per = [r["stages"].get(stage, {}) for r in sizes]
        cells = ["failed" if "error" in p else (f"{p['us_per_unit']:,.0f}" if p else "–") for p in per]
        mem = [f"{p['memory'].get('driver_python_mb', 0):,.0f}" if p else "–" for p in per]
        ratio = v.get(stage, {}).get("per_unit_ratio")
        flag = "" if ratio is None or ratio <= PER_UNIT_LIMIT else " ✗"
        last = per[-1].get("memory", {}) if per and per[-1] else {}
        jvm, workers = last.get("jvm_mb"), last.get("workers_mb")
        lines.append(f"| {stage} | {unit} | " + " | ".join(cells) + f" | {'–' if ratio is None else f'{ratio:.2f}'}{flag} | "
                     + " | ".join(mem) + f" | {'–' if jvm is None else f'{jvm:,.0f}'} | "
                     f"{'–' if workers is None else f'{workers:,.0f}'} |")
    lines += ["", "| size | events | wall time | failed stage |", "|---:|---:|---:|---|"]
    for r in sizes:
        lines.append(f"| {r['items']:,} | {r.get('events') or 0:,} | {r['seconds'] / 60:.1f} min | "
                     f"{r.get('failed_stage') or '–'} |")
    lines += ["", "Delta tables after each size's run (current version):", "",
              "| table | " + " | ".join(f"files @ {s}" for s in names) + " | " + " | ".join(f"MB @ {s}" for s in names) + " |",
              "|---|" + "---:|" * (2 * len(names))]
    tables = sorted({t for r in sizes for t in r.get("tables", {})})
    for t in tables:
        files = [str(r.get("tables", {}).get(t, {}).get("files", "–")) for r in sizes]
        mbs = [f"{r['tables'][t]['bytes'] / 1e6:,.1f}" if t in r.get("tables", {}) else "–" for r in sizes]
        lines.append(f"| {t} | " + " | ".join(files) + " | " + " | ".join(mbs) + " |")
    lines += quantizer_table(data)
    lines += beyond_log_table(data)
    lines += llm_table(data)
    if c := data.get("compaction"):
        lines += ["", f"Compaction (`--compaction`): silver.quarantine written as {c['files']:,} appends of "
                  f"{c['rows'] // c['files']} rows, read whole before and after `delta.compact` ({c['compact']['seconds']} s):",
                  "", "| | files | delta-rs read s | Spark count s |", "|---|---:|---:|---:|"]
        for k in ("before", "after"):
            lines.append(f"| {k} | {c[k]['table_files']:,} | {c[k]['delta_rs_read_s']} | {c[k]['spark_count_s']} |")
        if lk := c.get("lookups"):
            lines += ["", f"Point lookups by item_id (`--compaction`): bronze.catalog_items, {lk['rows']:,} rows appended "
                      f"{lk['appends']} times in random id order, files of {lk['target_mb']} MB, {lk['probes']} lookups "
                      "through the Arrow dataset (what `make sql` reads) and DuckDB over it:", "",
                      "| table | files | MB | files opened per lookup | Arrow ms | DuckDB ms | compaction s |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
            for k, label in (("appended", "as appended"), ("compacted", "compacted"), ("z_ordered", "Z-ordered by item_id")):
                r = lk[k]
                lines.append(f"| {label} | {r['files']} | {r['mb']} | {r['files_opened_per_lookup']} | "
                             f"{r['arrow_lookup_ms']} | {r['duckdb_lookup_ms']} | {r.get('seconds', '')} |")
    merges = sorted((data.get("nightly_merge") or {}).values(), key=lambda r: r["items"])
    if merges:
        lines += ["", "The next night's catalog MERGE (ingest_catalog) with 1% of the items changed, against the "
                  "first night's full load (`--nightly-merge`):", "",
                  "| items | first load | 1% changed | rows in the diff | rows updated | rows copied "
                  "| files removed / added | MB written |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for m in merges:
            a, b = m["first_load"], m["one_percent_changed"]
            diff = "–" if b.get("rows_changed") is None else f"{b['rows_changed']:,}"
            lines.append(f"| {m['items']:,} | {a['seconds']:.1f} s | {b['seconds']:.1f} s | {diff} | "
                         f"{b.get('numTargetRowsUpdated') or 0:,} | {b.get('numTargetRowsCopied') or 0:,} | "
                         f"{b.get('numTargetFilesRemoved') or 0} / {b.get('numTargetFilesAdded') or 0} | "
                         f"{(b.get('numTargetBytesAdded') or 0) / 1e6:,.1f} |")
        lines += ["", "| items | bronze.interactions after its first load: files | day partitions | MB |",
                  "|---:|---:|---:|---:|"]
        for m in merges:
            i = m.get("interactions_first_load") or {}
            lines.append(f"| {m['items']:,} | {i.get('files', '–')} | {i.get('days', '–')} | "
                         f"{(i.get('bytes') or 0) / 1e6:,.1f} |")
    return "\n".join(lines) + "\n"


def quantizer_table(data: dict) -> list[str]:
    quant = sorted((data.get("quantizer_stages") or {}).values(), key=lambda r: r["items"])
    if not quant:
        return []
    lines = ["", "The two quantizer stages alone (`--quantizer`), each in its own process as the DAG runs them, "
             "on the synthetic catalog's items embedded by the hashing stand-in (no earlier stage run); "
             f"the Python driver's peak is exact (the process's own high-water mark), the JVM's sampled; {SAMPLED_NOTE}:",
             "",
             "| items | stage | trained on | seconds | µs per item | Python driver peak MB | JVM MB |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for q in quant:
        for stage, r in q["stages"].items():
            trained = r["metrics"].get("trained_on")
            lines.append(f"| {q['items']:,} | {stage} | {'–' if trained is None else f'{trained:,}'} | "
                         f"{r['seconds']:,.0f} | {r['us_per_unit']:,.0f} | "
                         f"{python_peak(r['memory'])} | {r['memory'].get('jvm_mb', 0):,.0f} |")
    return lines


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(data["sizes"].values(), key=lambda r: r["items"])
    xs = [r["items"] for r in sizes]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.6))
    for k, stage in enumerate(UNITS):  # tab20: twelve stages, twelve colours (the default cycle has ten)
        pts = [(r["items"], r["stages"][stage]["us_per_unit"]) for r in sizes
               if stage in r["stages"] and "error" not in r["stages"][stage]]
        if pts:
            a.plot(*zip(*pts, strict=True), marker="o", label=stage, color=plt.cm.tab20(k),
                   linestyle="-" if k % 2 == 0 else "--")
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel("catalog items (= users)")
    a.set_ylabel("µs per unit (item, event or user)")
    a.set_title("time per unit: flat means it scales")
    a.legend(fontsize=7, ncol=2)
    for key, label in (("driver_mb", "driver (JVM + Python)"), ("jvm_mb", "JVM"),
                       ("driver_python_mb", "Python driver"), ("workers_mb", "Python workers (sum)")):
        b.plot(xs, [max(s["memory"].get(key, 0) for s in r["stages"].values()) for r in sizes], marker="o",
               label=label)
    b.axhline(DRIVER_LIMIT_MB, color="grey", linestyle="--", linewidth=1, label="4 GB target (driver)")
    b.set_xscale("log")
    b.set_xlabel("catalog items (= users)")
    b.set_ylabel("peak RSS over the stages, MB")
    b.set_title("memory")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write(out: Path, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scale.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    if data.get("sizes"):
        (out / "scale.md").write_text(markdown(data))
        plot(data, out / "scale.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Results: bench/results/scale.json, .md and .png. A million items takes "
                                       "hours on two cores: run it on its own (--sizes 1000000).")
    p.add_argument("--sizes", default=",".join(str(s) for s in DEFAULT_SIZES),
                   help="catalog sizes, comma-separated (default %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep each size's lakehouse (under the bench cache)")
    p.add_argument("--nightly-merge", action="store_true",
                   help="only the next night's catalog MERGE with 1%% of the items changed, against the first "
                        "night's full load, at each size (results under nightly_merge)")
    p.add_argument("--quantizer", action="store_true",
                   help="only train_quantizer and assign_semantic_ids, each in its own process, on the synthetic "
                        "catalog's items written straight to their input tables, at each size (results under "
                        "quantizer_stages; a million items takes about half an hour)")
    p.add_argument("--beyond-log", action="store_true",
                   help="only infer_beyond_log's ranking, pruned against scoring every item, at each size (needs "
                        "`--quantizer --keep` at that size first; results under beyond_log_inference)")
    p.add_argument("--llm", action="store_true",
                   help=f"only reason_items: a night's budget ({LLM_BUDGET:,} items) against a fake server of known "
                        "capacity on a catalog whose knowledge table holds the rest, then a night killed halfway and "
                        "run again, at each size (results under llm_stage; about 20 minutes a size)")
    p.add_argument("--compaction", action="store_true",
                   help="only what compaction buys: a table of 1,000 small appends read before and after, and point "
                   "lookups on a table of 200,000 rows as appended, compacted and Z-ordered (a few minutes)")
    p.add_argument("--llm-budget", type=int, default=LLM_BUDGET, metavar="ITEMS",
                   help="with --llm: the night's llm.budget_items (default %(default)s)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    args = p.parse_args(argv)
    # The stages' own progress (diffusion epochs, quantizer levels, rows merged) is logged at INFO.
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    try:
        sizes = sorted({int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        p.error(f"--sizes {args.sizes!r}: give whole numbers, e.g. 10000,100000")
    if not sizes or min(sizes) < 100:
        p.error("--sizes: at least 100 items per size")
    path = args.out / "scale.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("sizes", {})
    spark = None
    start = time.perf_counter()
    if args.compaction:
        data["compaction"] = compaction()
        _write(args.out, data)
        return 0
    if args.llm:
        data.setdefault("llm_stage", {})
        for n in sizes:
            data["llm_stage"][str(n)] = llm_stage(n, budget=args.llm_budget, keep=args.keep)
            _write(args.out, data)
        print("\n".join(llm_table(data)))
        return 0
    if args.beyond_log:
        data.setdefault("beyond_log_inference", {})
        for n in sizes:
            data["beyond_log_inference"][str(n)] = beyond_log_inference(n)
            _write(args.out, data)
        print("\n".join(beyond_log_table(data)))
        return 0
    if args.quantizer:
        data.setdefault("quantizer_stages", {})
        for n in sizes:
            data["quantizer_stages"][str(n)] = quantizer_stages(n, keep=args.keep)
            _write(args.out, data)
        print("\n".join(quantizer_table(data)))
        return 0
    if args.nightly_merge:
        data.setdefault("nightly_merge", {})
        for n in sizes:
            data["nightly_merge"][str(n)], spark = nightly_merge(n, spark)
            _write(args.out, data)
        if data.get("sizes"):
            print(markdown(data))
        return 0
    for k, n in enumerate(sizes, 1):
        log(f"size {k} of {len(sizes)}: {n:,} items and users, every stage ...")
        result, spark = run_size(n, spark, keep=args.keep)
        result["measured_at"] = utc_now()
        data["sizes"][str(n)] = result
        data["verdicts"] = verdicts(data["sizes"])
        data["meta"] = {"machine": machine_info(), "ds": DS, "sample_s": SAMPLE_S,
                        "targets": {"per_unit_ratio_max": PER_UNIT_LIMIT, "driver_peak_mb_max": DRIVER_LIMIT_MB},
                        "stand_ins": {"knowledge": "offline-heuristic-v1", "embedder": "feature-hashing-384@hashing"}}
        _write(args.out, data)  # after every size: a long run stopped later keeps what it measured
    print(markdown(data))
    log(f"wrote {path}, scale.md and scale.png in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
