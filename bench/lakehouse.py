"""Feature lakehouses of the real datasets for the consumer benchmarks, built by the real pipeline.

    python -m bench.lakehouse scientific            # build (or refresh) and print the root
    python -m bench.lakehouse movielens_100k --force

The ranker and beyond-log benchmarks measure what the pipeline writes, so they read Delta tables produced
by the same stages `make run` executes (jobs.runtime.execute, in one local Spark session, no Airflow
overhead), under ~/.cache/reaseq/bench/lakehouse-<dataset> (REASEQ_BENCH_CACHE overrides the parent).
A rebuild is incremental like any nightly rerun: unchanged items are not reasoned about or embedded
again, so a second call costs the Spark stages only. Benchmarks reuse an existing build as it is (and
say so when the pipeline code or data changed since); `python -m bench.lakehouse` (`make
bench-lakehouse`) refreshes it, skipping the stages when the build is current (see `_fingerprint`).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import time
from pathlib import Path

from bench.common import CACHE_DIR, REPO_ROOT, log

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


def root_for(name: str) -> Path:
    return Path(CACHE_DIR) / f"lakehouse-{name}"


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


def ensure(name: str, force: bool = False, refresh: bool = False, spark=None) -> Path:
    """Root of the dataset's feature lakehouse, building or refreshing it when the code or data changed."""
    if name not in DATASETS:
        raise SystemExit(f"unknown benchmark dataset {name!r}; choose from {', '.join(DATASETS)}")
    loader, data = DATASETS[name]
    if not data.exists():
        raise SystemExit(f"{data} not found: the benchmark needs the shared dataset there")
    base = root_for(name)
    base.mkdir(parents=True, exist_ok=True)
    # One builder at a time per dataset: a second caller waits, then finds the stamp current.
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build(name, loader, data, base, force, refresh, spark)


def _build(name: str, loader: str, data: Path, base: Path, force: bool, refresh: bool, spark) -> Path:
    from jobs.context import RunContext
    from jobs.runtime import execute
    from jobs.stages import PIPELINE

    stamp = base / "BUILT.json"
    fp = _fingerprint(data)
    if not force and stamp.exists():
        built = json.loads(stamp.read_text()).get("fingerprint")
        if built == fp or not refresh:
            if built != fp:
                log(f"{name}: the feature lakehouse was built by other pipeline code or data; using it as is "
                    f"(`make bench-lakehouse` refreshes it)")
            return base
    ctx = RunContext.create(ds=DS, overrides={
        "lakehouse": str(base / "lakehouse"), "artifacts": str(base / "artifacts"),
        "reports": str(base / "reports"), "dataset": loader, "data": str(data),
        # The consumer benchmarks' lakehouses are built with the offline heuristic (its rows say
        # offline-heuristic-v1): the local engine answers a few items a minute on two cores, so all of
        # Scientific's 4,344 items take many nights through the backlog; what the model's knowledge is
        # worth against the catalog is measured on its own (see docs/llm-engine.md).
        "llm": {"backend": "offline"},
    })
    if spark is not None:
        ctx._spark = spark
    log(f"building the {name} feature lakehouse under {base} (the pipeline's stages, incremental) ...")
    start = time.perf_counter()
    for i, stage in enumerate(PIPELINE, 1):
        t0 = time.perf_counter()
        res = execute(stage, ctx)
        log(f"  [{i}/{len(PIPELINE)}] {stage}: {res.rows_out} rows in {time.perf_counter() - t0:.0f}s")
    stamp.write_text(json.dumps({"fingerprint": fp, "dataset": loader, "data": str(data),
                                 "seconds": round(time.perf_counter() - start, 1)}, indent=2))
    return base


def lakehouse_root(name: str, **kw) -> str:
    return str(ensure(name, **kw) / "lakehouse")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lakehouse",
                                description="Build the real datasets' feature lakehouses the consumer "
                                "benchmarks read (the nightly pipeline's stages, in one Spark session).")
    # Checked by hand: Python 3.11's argparse rejects an empty nargs="*" positional that has `choices`.
    p.add_argument("datasets", nargs="*", metavar="DATASET",
                   help=f"benchmark datasets, of {', '.join(DATASETS)} (default: all)")
    p.add_argument("--force", action="store_true", help="run the stages even if the last build is current")
    args = p.parse_args(argv)
    unknown = [d for d in args.datasets if d not in DATASETS]
    if unknown:
        p.error(f"unknown dataset {', '.join(unknown)}; choose from {', '.join(DATASETS)}")
    for name in args.datasets or list(DATASETS):
        print(ensure(name, force=args.force, refresh=True) / "lakehouse")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
