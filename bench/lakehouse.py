"""Feature lakehouses of the real datasets for the consumer benchmarks, built by the real pipeline.

    python -m bench.lakehouse scientific            # build (or refresh) and print the root
    python -m bench.lakehouse movielens_100k --force
    python -m bench.lakehouse scientific --knowledge local [--budget-items 500]

The ranker and beyond-log benchmarks measure what the pipeline writes, so they read Delta tables produced
by the same stages `make run` executes (jobs.runtime.execute, in one local Spark session, no Airflow
overhead), under ~/.cache/reaseq/bench/lakehouse-<dataset> (REASEQ_BENCH_CACHE overrides the parent).
A rebuild is incremental like any nightly rerun: unchanged items are not reasoned about or embedded
again, so a second call costs the Spark stages only. Benchmarks reuse an existing build as it is (and
say so when the pipeline code or data changed since); `python -m bench.lakehouse` (`make
bench-lakehouse`) refreshes it, skipping the stages when the build is current (see `_fingerprint`).

Knowledge: by default the offline heuristic answers (`lakehouse-<dataset>`, rows `offline-heuristic-v1`).
`--knowledge local` builds `lakehouse-<dataset>-local`, where the local engine's model answers every
item (k = 1, no nightly time budget): Scientific's 4,344 items take about 12 hours on two cores. It is
resumable: reason_items commits every `llm.local.commit_every_items` answers, so a build stopped at any
point (Ctrl-C, a reboot) continues where it stopped when run again, and `--budget-items N` caps one
call at N items, leaving the rest in the backlog for the next call (BUILT.json counts what is left).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import time
from pathlib import Path

from bench.common import CACHE_DIR, REPO_ROOT, exit_on_sigterm, log

DATASETS = {
    # benchmark name: (jobs.sources loader, folder)
    "scientific": ("amazon-json", REPO_ROOT.parent / "shared" / "data" / "amazon18_scientific"),
    "movielens_100k": ("movielens", REPO_ROOT.parent / "shared" / "data" / "movielens_100k"),
}
DS = "2026-11-22"
# Code whose change must rebuild the benchmark lakehouse (the rest of the repo may change freely).
_FINGERPRINT_PATHS = (
    "jobs", "llm_agents", "feature_store/catalog.py", "feature_store/delta.py", "models/configs.py",
    "models/embedder.py", "models/quantizers.py", "models/rq.py", "models/mpq.py", "models/diffusion.py",
)
# Consumers living in jobs/ (trainers) do not change the features.
_FINGERPRINT_SKIP = ("jobs/train_ranker.py", "jobs/train_generative.py", "jobs/cli.py", "jobs/report.py",
                     "jobs/report_data.py", "jobs/report_plots.py", "jobs/progress.py", "jobs/point_in_time.py",
                     "jobs/airflow_server.py", "jobs/spark_cluster.py", "jobs/callbacks.py")


KNOWLEDGE = ("offline", "local")


def root_for(name: str, knowledge: str = "offline") -> Path:
    return Path(CACHE_DIR) / (f"lakehouse-{name}" if knowledge == "offline" else f"lakehouse-{name}-{knowledge}")


def llm_settings(knowledge: str, budget_items: int | None = None) -> dict:
    """The `llm` section of a build: the offline heuristic, or the local engine over the whole catalog."""
    if knowledge == "offline":
        return {"backend": "offline"}
    # k = 1: what bench-knowledge measured (9.9 s and 485 tokens an item); no time budget, so a build runs
    # until the work set is done or `budget_items` items were sent.
    return {"backend": "local", "samples_k": 1, "budget_items": budget_items, "local": {"budget_minutes": None}}


def _fingerprint(data: Path) -> str:
    h = hashlib.sha256()
    for rel in _FINGERPRINT_PATHS:
        base = REPO_ROOT / rel
        if not base.exists():
            continue
        files = [base] if base.is_file() else sorted(base.rglob("*.py"))
        for f in files:
            if str(f.relative_to(REPO_ROOT)) in _FINGERPRINT_SKIP:
                continue
            h.update(str(f.relative_to(REPO_ROOT)).encode())
            h.update(f.read_bytes())
    for f in sorted(data.iterdir()):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def available(name: str) -> bool:
    return DATASETS[name][1].exists()


def ensure(name: str, force: bool = False, refresh: bool = False, spark=None, knowledge: str = "offline",
           budget_items: int | None = None) -> Path:
    """Root of the dataset's feature lakehouse, building or refreshing it when the code or data changed
    (or, with `refresh`, when an earlier build left items without knowledge)."""
    if name not in DATASETS:
        raise SystemExit(f"unknown benchmark dataset {name!r}; choose from {', '.join(DATASETS)}")
    loader, data = DATASETS[name]
    if not data.exists():
        raise SystemExit(f"{data} not found: the benchmark needs the shared dataset there")
    if knowledge not in KNOWLEDGE:
        raise SystemExit(f"unknown knowledge source {knowledge!r}; choose from {', '.join(KNOWLEDGE)}")
    base = root_for(name, knowledge)
    base.mkdir(parents=True, exist_ok=True)
    # One builder at a time per dataset: a second caller waits, then finds the stamp current.
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build(name, loader, data, base, force, refresh, spark, knowledge, budget_items)


def _build(name: str, loader: str, data: Path, base: Path, force: bool, refresh: bool, spark,
           knowledge: str = "offline", budget_items: int | None = None) -> Path:
    from jobs.context import RunContext
    from jobs.runtime import execute
    from jobs.stages import PIPELINE

    stamp = base / "BUILT.json"
    fp = _fingerprint(data)
    if not force and stamp.exists():
        last = json.loads(stamp.read_text())
        built = last.get("fingerprint")
        # A build that left items without knowledge (the backlog, or failures the next run retries) is
        # continued by a refresh even when the code is unchanged.
        unfinished = last.get("backlog") or (last.get("reason_items") or {}).get("failed")
        if (built == fp and not (refresh and unfinished)) or not refresh:
            if built != fp:
                log(f"{name}: the feature lakehouse was built by other pipeline code or data; using it as is "
                    f"(`make bench-lakehouse` refreshes it)")
            return base
    ctx = RunContext.create(ds=DS, overrides={
        "lakehouse": str(base / "lakehouse"), "artifacts": str(base / "artifacts"),
        "reports": str(base / "reports"), "dataset": loader, "data": str(data),
        # By default the offline heuristic (its rows say offline-heuristic-v1): the local engine answers a
        # few items a minute on two cores, so all of Scientific's 4,344 items take about 12 hours
        # (`--knowledge local`, resumable); what the model's knowledge is worth against the catalog is
        # also measured on its own (bench-knowledge).
        "llm": llm_settings(knowledge, budget_items),
    })
    if spark is not None:
        ctx._spark = spark
    log(f"building the {name} feature lakehouse under {base} (the pipeline's stages, incremental; "
        f"knowledge: {knowledge}) ...")
    start = time.perf_counter()
    reasoning: dict = {}
    for i, stage in enumerate(PIPELINE, 1):
        t0 = time.perf_counter()
        if stage == "reason_items" and knowledge == "local":
            from llm_agents import local_engine

            # The engine only while the model answers: the Spark stages after it get both cores.
            with local_engine.engine("bench-lakehouse", slots=8):
                res = execute(stage, ctx)
        else:
            res = execute(stage, ctx)
        if stage == "reason_items":
            reasoning = {k: res.metrics.get(k) for k in ("model", "work_set", "answered", "failed", "backlog",
                                                         "seconds", "tokens_in", "tokens_out", "llm_calls")}
        log(f"  [{i}/{len(PIPELINE)}] {stage}: {res.rows_out} rows in {time.perf_counter() - t0:.0f}s")
    stamp.write_text(json.dumps({"fingerprint": fp, "dataset": loader, "data": str(data), "knowledge": knowledge,
                                 "backlog": reasoning.get("backlog"), "reason_items": reasoning,
                                 "seconds": round(time.perf_counter() - start, 1)}, indent=2))
    if reasoning.get("backlog"):
        log(f"{name}: {reasoning['backlog']} items still wait for knowledge; run the same command again to continue")
    return base


def lakehouse_root(name: str, **kw) -> str:
    return str(ensure(name, **kw) / "lakehouse")


def unusable(name: str, knowledge: str = "offline") -> str | None:
    """Why a consumer benchmark cannot read this dataset's lakehouse (it skips the dataset and says so),
    or None: the shared data is absent, or a model's lakehouse has no build yet (hours of engine time,
    never started from a consumer benchmark)."""
    if not available(name):
        return f"its shared data is absent ({DATASETS[name][1]} not found)"
    if knowledge != "offline" and not (root_for(name, knowledge) / "BUILT.json").exists():
        return (f"no lakehouse answered by the {knowledge} model yet: run `make bench-lakehouse "
                f"KNOWLEDGE={knowledge} DATASETS={name}` first (resumable)")
    return None


def consumer_lakehouse(name: str, knowledge: str = "offline") -> tuple[str, dict]:
    """(root, build record) of the lakehouse a consumer benchmark reads. The offline heuristic's is built
    when it has no build yet, else read as it is (`make bench-lakehouse` refreshes it); a model's is hours
    of engine time, built by its own command only: a clear exit when it has no build yet, a warning while
    it still has a backlog. The record (BUILT.json) says whether it matches the current pipeline code."""
    home = root_for(name, knowledge)
    stamp = home / "BUILT.json"
    if knowledge != "offline":
        if not stamp.exists():
            raise SystemExit(f"{name}: no lakehouse answered by the {knowledge} model yet: run "
                             f"`make bench-lakehouse KNOWLEDGE={knowledge} DATASETS={name}` first (resumable)")
        if json.loads(stamp.read_text()).get("backlog"):
            log(f"{name}: the {knowledge} model's lakehouse still has a backlog (BUILT.json): the benchmark "
                f"reads knowledge for part of the catalog only")
    if stamp.exists():
        root = str(home / "lakehouse")
        log(f"{name}: reading the lakehouse built as {json.loads(stamp.read_text()).get('fingerprint')} ({root})")
    else:
        root = lakehouse_root(name, knowledge=knowledge)
    build = json.loads(stamp.read_text()) if stamp.exists() else {}
    build["matches_current_code"] = available(name) and build.get("fingerprint") == _fingerprint(DATASETS[name][1])
    if not build["matches_current_code"]:
        log(f"{name}: the lakehouse was built by other pipeline code or data; read as it is "
            f"(`make bench-lakehouse{'' if knowledge == 'offline' else f' KNOWLEDGE={knowledge}'} DATASETS={name}` "
            "refreshes it)")
    return root, build


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lakehouse",
                                description="Build the real datasets' feature lakehouses the consumer "
                                "benchmarks read (the nightly pipeline's stages, in one Spark session).")
    # Checked by hand: Python 3.11's argparse rejects an empty nargs="*" positional that has `choices`.
    p.add_argument("datasets", nargs="*", metavar="DATASET",
                   help=f"benchmark datasets, of {', '.join(DATASETS)} (default: all)")
    p.add_argument("--force", action="store_true", help="run the stages even if the last build is current")
    p.add_argument("--knowledge", choices=KNOWLEDGE, default="offline",
                   help="who answers reason_items: the offline heuristic (default) or the local engine's model "
                   "(a separate lakehouse, lakehouse-<dataset>-local; ~12 h for Scientific on 2 cores, resumable)")
    p.add_argument("--budget-items", type=int, default=None, metavar="N",
                   help="--knowledge local: send at most N items this call (the rest waits for the next call)")
    args = p.parse_args(argv)
    # The stages' own lines (reason_items: each chunk committed, done of total, rate, ETA): a local build
    # runs for hours, and the per-partition lines alone do not say how far the whole is.
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("reaseq").setLevel(logging.INFO)
    if args.budget_items is not None and args.budget_items < 1:
        p.error("--budget-items must be at least 1")
    unknown = [d for d in args.datasets if d not in DATASETS]
    if unknown:
        p.error(f"unknown dataset {', '.join(unknown)}; choose from {', '.join(DATASETS)}")
    for name in args.datasets or list(DATASETS):
        print(ensure(name, force=args.force, refresh=True, knowledge=args.knowledge,
                     budget_items=args.budget_items) / "lakehouse")
    return 0


if __name__ == "__main__":
    exit_on_sigterm()
    raise SystemExit(main())
