"""Feature lakehouses of the real datasets for the consumer benchmarks, built by the real pipeline.

    python -m bench.lakehouse scientific            # build (or refresh) and print the root
    python -m bench.lakehouse movielens_100k --force
    python -m bench.lakehouse scientific --knowledge local [--budget-items 500]
    python -m bench.lakehouse movielens_100k --knowledge local --beyond-log llm

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

Beyond-log: every build's gold.user_augmented_behaviors comes from the masked diffusion model.
`--beyond-log llm` copies a finished build to `lakehouse-<dataset>[-<knowledge>]-beyond_llm` (the
original is never changed) and runs infer_beyond_log there with `beyond_log.method: llm` (the
interests of the model that answered the items, one call per user, or the offline heuristic's for an
offline build, mapped to items) and the stages after it, so the ranker can compare the two methods'
`+beyond_log` (`python -m bench.ranker --beyond-log llm`).
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
# Who infers gold.user_augmented_behaviors: the masked diffusion model (every build), or the LLM method
# (`beyond_log.method: llm`, a language model's interests mapped to items): a copy of a finished build
# with infer_beyond_log and the stages after it run again (lakehouse-<...>-beyond_llm).
BEYOND = ("diffusion", "llm")


def root_for(name: str, knowledge: str = "offline", beyond: str = "diffusion") -> Path:
    base = f"lakehouse-{name}" if knowledge == "offline" else f"lakehouse-{name}-{knowledge}"
    return Path(CACHE_DIR) / (base if beyond == "diffusion" else f"{base}-beyond_{beyond}")


def build_command(name: str, knowledge: str = "offline", beyond: str = "diffusion") -> str:
    """The command that builds (or continues) a lakehouse, for messages."""
    return ("make bench-lakehouse" + ("" if knowledge == "offline" else f" KNOWLEDGE={knowledge}")
            + ("" if beyond == "diffusion" else f" BEYOND={beyond}") + f" DATASETS={name}")


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
           budget_items: int | None = None, beyond: str = "diffusion") -> Path:
    """Root of the dataset's feature lakehouse, building or refreshing it when the code or data changed
    (or, with `refresh`, when an earlier build left items without knowledge). `beyond="llm"`: the LLM
    method's beyond-log inferences over a copy of the finished `knowledge` build (_build_beyond_llm)."""
    if name not in DATASETS:
        raise SystemExit(f"unknown benchmark dataset {name!r}; choose from {', '.join(DATASETS)}")
    loader, data = DATASETS[name]
    if not data.exists():
        raise SystemExit(f"{data} not found: the benchmark needs the shared dataset there")
    if knowledge not in KNOWLEDGE:
        raise SystemExit(f"unknown knowledge source {knowledge!r}; choose from {', '.join(KNOWLEDGE)}")
    if beyond not in BEYOND:
        raise SystemExit(f"unknown beyond-log method {beyond!r}; choose from {', '.join(BEYOND)}")
    base = root_for(name, knowledge, beyond)
    base.mkdir(parents=True, exist_ok=True)
    # One builder at a time per dataset: a second caller waits, then finds the stamp current.
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if beyond == "llm":
            return _build_beyond_llm(name, loader, data, base, force, spark, knowledge)
        return _build(name, loader, data, base, force, refresh, spark, knowledge, budget_items)


def _context(base: Path, loader: str, data: Path, spark, **overrides):
    from jobs.context import RunContext

    ctx = RunContext.create(ds=DS, overrides={
        "lakehouse": str(base / "lakehouse"), "artifacts": str(base / "artifacts"),
        "reports": str(base / "reports"), "dataset": loader, "data": str(data), **overrides})
    if spark is not None:
        ctx._spark = spark
    return ctx


def _run_stages(ctx, stages: list[str], model_stages: set[str]) -> dict:
    """Run `stages` in order (each as a task runs it); the local engine runs only around `model_stages`
    (the ones that ask it), so the Spark stages get both cores. Returns each stage's JobResult."""
    from jobs.runtime import execute

    results = {}
    for i, stage in enumerate(stages, 1):
        t0 = time.perf_counter()
        if stage in model_stages:
            from llm_agents import local_engine

            with local_engine.engine("bench-lakehouse", slots=8):
                results[stage] = execute(stage, ctx)
        else:
            results[stage] = execute(stage, ctx)
        log(f"  [{i}/{len(stages)}] {stage}: {results[stage].rows_out} rows in {time.perf_counter() - t0:.0f}s")
    return results


def _build(name: str, loader: str, data: Path, base: Path, force: bool, refresh: bool, spark,
           knowledge: str = "offline", budget_items: int | None = None) -> Path:
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
    # By default the offline heuristic (its rows say offline-heuristic-v1): the local engine answers a
    # few items a minute on two cores, so all of Scientific's 4,344 items take about 12 hours
    # (`--knowledge local`, resumable); what the model's knowledge is worth against the catalog is
    # also measured on its own (bench-knowledge).
    ctx = _context(base, loader, data, spark, llm=llm_settings(knowledge, budget_items))
    log(f"building the {name} feature lakehouse under {base} (the pipeline's stages, incremental; "
        f"knowledge: {knowledge}) ...")
    start = time.perf_counter()
    res = _run_stages(ctx, PIPELINE, {"reason_items"} if knowledge == "local" else set())["reason_items"]
    reasoning = {k: res.metrics.get(k) for k in ("model", "work_set", "answered", "failed", "backlog",
                                                 "seconds", "tokens_in", "tokens_out", "llm_calls")}
    stamp.write_text(json.dumps({"fingerprint": fp, "dataset": loader, "data": str(data), "knowledge": knowledge,
                                 "backlog": reasoning.get("backlog"), "reason_items": reasoning,
                                 "seconds": round(time.perf_counter() - start, 1)}, indent=2))
    if reasoning.get("backlog"):
        log(f"{name}: {reasoning['backlog']} items still wait for knowledge; run the same command again to continue")
    return base


def _build_beyond_llm(name: str, loader: str, data: Path, base: Path, force: bool, spark, knowledge: str) -> Path:
    """The `knowledge` build with its beyond-log inferences made by the LLM method instead of diffusion:
    the finished build is copied (never changed), then infer_beyond_log runs with `beyond_log.method:
    llm` (a language model's interests per user, one call each, on the model that answered the items;
    the offline heuristic's, no call, for an offline build) and the stages after it run again on the
    copy. The gold gate may refuse the inferences (it wants half the users `ok`, which a small model
    misses): a benchmark still measures them, so the refusal is recorded in the stamp and said, and
    publish (which follows a passed gate) is skipped. Current while the source's stamp is the one copied."""
    import shutil

    from jobs.runtime import StageFailed
    from jobs.stages import PIPELINE

    source = root_for(name, knowledge)
    stamp = base / "BUILT.json"
    source.mkdir(parents=True, exist_ok=True)  # its lock lives there, as ensure() keeps it
    with open(source / ".lock", "w") as lock:  # not while a build of the source writes it
        fcntl.flock(lock, fcntl.LOCK_EX)
        source_stamp = source / "BUILT.json"
        if not source_stamp.exists():
            raise SystemExit(f"{name}: the {knowledge} lakehouse has no finished build to infer from: run "
                             f"`{build_command(name, knowledge)}` first")
        built_from = json.loads(source_stamp.read_text())
        if not force and stamp.exists() and json.loads(stamp.read_text()).get("source_build") == built_from:
            return base
        if built_from.get("backlog"):
            log(f"{name}: the {knowledge} lakehouse still has a backlog: the interests read knowledge for part "
                "of the catalog only")
        stamp.unlink(missing_ok=True)  # first: an interrupted copy must never look finished
        for part in ("lakehouse", "artifacts"):
            shutil.rmtree(base / part, ignore_errors=True)
            if (source / part).exists():
                shutil.copytree(source / part, base / part)
    ctx = _context(base, loader, data, spark, llm=llm_settings(knowledge), beyond_log={"method": "llm"})
    log(f"{name}: the LLM method's beyond-log inferences over a copy of the {knowledge} build, under {base} ...")
    start = time.perf_counter()
    first, gate_at = PIPELINE.index("infer_beyond_log"), PIPELINE.index("validate_gold")
    res = _run_stages(ctx, PIPELINE[first:gate_at],
                      {"infer_beyond_log"} if knowledge == "local" else set())["infer_beyond_log"]
    try:
        _run_stages(ctx, ["validate_gold"], set())
        gate = "passed"
    except StageFailed as exc:
        gate = str(exc)
        log(f"{name}: the gold gate refused the LLM method's inferences ({gate}); the benchmark measures them "
            "anyway, and its results carry this (lakehouse_build.validate_gold); publish skipped")
    if gate == "passed":
        _run_stages(ctx, PIPELINE[gate_at + 1:], set())
    stamp.write_text(json.dumps({**built_from, "beyond_log": "llm", "source_build": built_from,
                                 "infer_beyond_log": res.metrics, "validate_gold": gate,
                                 "beyond_seconds": round(time.perf_counter() - start, 1)}, indent=2, default=str))
    return base


def lakehouse_root(name: str, **kw) -> str:
    return str(ensure(name, **kw) / "lakehouse")


def unusable(name: str, knowledge: str = "offline", beyond: str = "diffusion") -> str | None:
    """Why a consumer benchmark cannot read this dataset's lakehouse (it skips the dataset and says so),
    or None: the shared data is absent, or a model's lakehouse has no build yet (hours of engine time,
    never started from a consumer benchmark)."""
    if not available(name):
        return f"its shared data is absent ({DATASETS[name][1]} not found)"
    if (knowledge, beyond) != ("offline", "diffusion") and not (root_for(name, knowledge, beyond) / "BUILT.json").exists():
        who = "the offline heuristic's lakehouse" if knowledge == "offline" else f"the {knowledge} model's lakehouse"
        return (f"no build yet of {who}" + ("" if beyond == "diffusion" else
                f" with the {beyond} method's beyond-log inferences") + f": run `{build_command(name, knowledge, beyond)}` "
                "first" + (" (resumable)" if beyond == "diffusion" else ""))
    return None


def consumer_lakehouse(name: str, knowledge: str = "offline", beyond: str = "diffusion") -> tuple[str, dict]:
    """(root, build record) of the lakehouse a consumer benchmark reads. The offline heuristic's is built
    when it has no build yet, else read as it is (`make bench-lakehouse` refreshes it); a model's is hours
    of engine time, built by its own command only: a clear exit when it has no build yet, a warning while
    it still has a backlog. The record (BUILT.json) says whether it matches the current pipeline code."""
    home = root_for(name, knowledge, beyond)
    stamp = home / "BUILT.json"
    if (knowledge, beyond) != ("offline", "diffusion"):
        if (why := unusable(name, knowledge, beyond)) is not None:
            raise SystemExit(f"{name}: {why}")
    if not stamp.exists():
        lakehouse_root(name, knowledge=knowledge)  # the offline heuristic's first build
    build = json.loads(stamp.read_text())  # read once: a build elsewhere may rewrite it meanwhile
    root = str(home / "lakehouse")
    log(f"{name}: reading the lakehouse built as {build.get('fingerprint')} ({root})")
    if knowledge != "offline" and build.get("backlog"):
        log(f"{name}: the {knowledge} model's lakehouse still has a backlog (BUILT.json): the benchmark "
            f"reads knowledge for part of the catalog only")
    build["matches_current_code"] = available(name) and build.get("fingerprint") == _fingerprint(DATASETS[name][1])
    # A copy (BEYOND=llm) follows its source: the source is refreshed first, then the copy made again.
    refresh = " then ".join(f"`{build_command(name, knowledge, b)}`" for b in dict.fromkeys(("diffusion", beyond)))
    if not build["matches_current_code"]:
        log(f"{name}: the lakehouse was built by other pipeline code or data; read as it is ({refresh} refreshes it)")
    source_stamp = root_for(name, knowledge) / "BUILT.json"
    if "source_build" in build and source_stamp.exists() and json.loads(source_stamp.read_text()) != build["source_build"]:
        build["source_changed_since"] = True
        log(f"{name}: the {knowledge} build was refreshed after this copy was made; read as it is "
            f"(`{build_command(name, knowledge, beyond)}` makes it again)")
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
    p.add_argument("--beyond-log", choices=BEYOND, default="diffusion",
                   help="who infers the beyond-log behaviours: the diffusion model (default, every build) or the "
                   "LLM method over a copy of the finished --knowledge build (lakehouse-<...>-beyond_llm; one "
                   "interests call per user: about an hour for MovieLens-100k's 943 users on the local engine)")
    p.add_argument("--budget-items", type=int, default=None, metavar="N",
                   help="--knowledge local: send at most N items this call (the rest waits for the next call)")
    args = p.parse_args(argv)
    # The stages' own lines (reason_items: each chunk committed, done of total, rate, ETA): a local build
    # runs for hours, and the per-partition lines alone do not say how far the whole is.
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("reaseq").setLevel(logging.INFO)
    if args.budget_items is not None and args.budget_items < 1:
        p.error("--budget-items must be at least 1")
    if args.budget_items is not None and args.beyond_log != "diffusion":
        p.error("--budget-items applies to the items' knowledge; --beyond-log llm infers for every user of a "
                "finished build")
    unknown = [d for d in args.datasets if d not in DATASETS]
    if unknown:
        p.error(f"unknown dataset {', '.join(unknown)}; choose from {', '.join(DATASETS)}")
    built = 0
    for name in args.datasets or list(DATASETS):
        source = root_for(name, args.knowledge) / "BUILT.json"
        if args.beyond_log != "diffusion" and not source.exists():
            log(f"skipping {name}: no finished {args.knowledge} build to copy yet "
                f"(`{build_command(name, args.knowledge)}` first)")
            continue
        print(ensure(name, force=args.force, refresh=True, knowledge=args.knowledge,
                     budget_items=args.budget_items, beyond=args.beyond_log) / "lakehouse")
        built += 1
    return 0 if built else 1


if __name__ == "__main__":
    exit_on_sigterm()
    raise SystemExit(main())
