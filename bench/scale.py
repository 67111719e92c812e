"""How the nightly refresh scales: every stage on synthetic catalogs of growing size, in one Spark session.

    python -m bench.scale                          # 10,000 and 100,000 items (make bench-scale)
    python -m bench.scale --sizes 1000000          # a million (adds to bench/results/scale.json)
    python -m bench.scale --sizes 10000 --keep     # keep the lakehouse under ~/.cache/reaseq/bench/scale-<n>

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
