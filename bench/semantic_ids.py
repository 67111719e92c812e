"""Semantic-ID quantizers on a real catalog: RQ-VAE vs RQ-KMeans vs MPQ with the default configuration.

    python -m bench.semantic_ids                      # Amazon "Scientific" from ../shared/data
    python -m bench.semantic_ids --data DIR --out bench/results --threads 1

Items are read with jobs.sources.load_source (the ingest loaders, no Spark) and embedded with the packaged
MiniLM (models.embedder), the text built by bench.common.item_text: title, brand and categories, then the
description standing in for the pipeline's LLM knowledge summary, which only exists inside the pipeline.
Embeddings are cached under ~/.cache/reaseq/bench/ (REASEQ_BENCH_CACHE overrides), keyed by a hash of
the texts: the first run embeds (minutes on a busy CPU), later runs start at training.

Each method is trained with models.quantizers.train_one on the same embeddings and config (3 x 256
hierarchical codes, MPQ M=4 experts x D=256), then all items are assigned with assign_one, best of
--repeats. Writes, under --out:

* semantic_ids.json: {"rq_vae": {...}, "rq_kmeans": {...}, "mpq": {...}, "meta": {...}}. Per method:
  train_seconds, assign_items_per_second (a full assign_one call: nearest codes, de-dup, collision digit
  and metrics), collision_rate (items sharing their code tuple, before the collision digit and after the
  de-dup; MPQ: 1 - tuple unique rate), unique_id_rate (share of items with an ID of their own: RQ full
  ID with the digit, MPQ tuple), level_utilization and perplexity (per level, per expert for MPQ),
  reconstruction_mse (of the published codes), the before-de-dup figures (collision_rate_nearest,
  dedup_moved_items; MPQ also unique_id_rate_nearest and dedup_unresolved_items), training statistics
  and the raw assign_one metrics.
  meta: items, dim, machine, torch threads, date, config, and train/assign time ratios.
* semantic_ids.md: the table printed at the end.
* semantic_ids.png: code usage per level / expert (codes ranked by item count) for each method.

Absolute seconds depend on what else runs on the machine; compare the ratios (meta.ratios), which the
three methods share the noise of. Only the CPU is used unless --device says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from bench.common import REPO_ROOT, cached_embeddings, load_items, log, machine_info, utc_now

METHODS = ("rq_vae", "rq_kmeans", "mpq")
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "amazon18_scientific"
DEFAULT_OUT = REPO_ROOT / "bench" / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.semantic_ids",
        description="Train RQ-VAE, RQ-KMeans and MPQ semantic-ID quantizers on a catalog's item "
        "embeddings and compare train time, assignment speed, collisions, code usage and reconstruction.",
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder (default: %(default)s)")
    p.add_argument("--dataset", default="amazon-json", help="jobs.sources loader name (default: %(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to run")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device for training and assignment")
    p.add_argument("--repeats", type=int, default=3, help="assignment timings, best kept (default: 3)")
    p.add_argument("--max-items", type=int, default=None, help="use only the first N items (smoke runs)")
    p.add_argument("--epochs", type=int, default=None, help="override the config's epochs (smoke runs)")
    return p.parse_args(argv)


def summarize(method: str, model, train_seconds: float, assign_seconds: float, n: int, metrics: dict) -> dict:
    """The per-method record of semantic_ids.json."""
    base = {
        "train_seconds": round(train_seconds, 3),
        "assign_seconds": round(assign_seconds, 4),
        "assign_items_per_second": round(n / assign_seconds, 1),
        "codebook_size": int(model.codebook_size),
    }
    if method == "mpq":
        unique = metrics["mpq_tuple_unique_share"]
        unique_raw = metrics["mpq_tuple_unique_rate_nearest"]
        rec = {
            **base,
            "experts": int(model.experts),
            "collision_rate": 1.0 - unique,
            "unique_id_rate": unique,
            "level_utilization": metrics["mpq_utilization"],
            "perplexity": metrics["mpq_perplexity"],
            "reconstruction_mse": metrics["mpq_recon_mse"],
            "collision_rate_nearest": 1.0 - unique_raw,
            "unique_id_rate_nearest": unique_raw,
            "dedup_moved_items": metrics["mpq_dedup_moved_items"],
            "dedup_unresolved_items": metrics["mpq_dedup_unresolved_items"],
        }
    else:
        rec = {
            **base,
            "levels": int(model.levels),
            "collision_rate": metrics["rq_collision_rate"],
            "unique_id_rate": metrics["rq_unique_full_id_share"],
            "level_utilization": metrics["rq_utilization"],
            "perplexity": metrics["rq_perplexity"],
            "reconstruction_mse": metrics["rq_recon_mse"],
            # Before the last-level de-dup. Full IDs are unique either way: the collision digit.
            "collision_rate_nearest": metrics["rq_collision_rate_nearest"],
            "dedup_moved_items": metrics["rq_dedup_moved_items"],
            "max_collision_digit": metrics["rq_max_collision_digit"],
        }
    rec["train_stats"] = getattr(model, "train_stats", {})
    rec["assign_metrics"] = metrics
    return rec


def _fmt_list(values: list[float], digits: int) -> str:
    return "/".join(f"{v:.{digits}f}" for v in values)


def markdown_table(results: dict, meta: dict) -> str:
    rows = [
        "| method | train s | assign items/s | collisions before fix | collisions after fix | unique IDs "
        "| utilization per level/expert | perplexity per level/expert | recon MSE |",
        "|---|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for method, r in results.items():
        rows.append(
            f"| {method} | {r['train_seconds']:.1f} | {r['assign_items_per_second']:,.0f} "
            f"| {r['collision_rate_nearest']:.2%} | {r['collision_rate']:.2%} | {r['unique_id_rate']:.2%} "
            f"| {_fmt_list(r['level_utilization'], 2)} | {_fmt_list(r['perplexity'], 0)} "
            f"| {r['reconstruction_mse']:.5f} |"
        )
    m, c = meta["machine"], meta["config"]
    notes = [
        "",
        f"{meta['items']} items, {meta['dim']}-d {meta['embedder']} embeddings; config {meta['config_hash']} "
        f"(L={c['levels']} x K={c['codebook_size']}, MPQ M={c['mpq_experts']} x D={c['mpq_codebook_size']}); "
        f"{m['cpu_count']} CPUs, {m['torch_threads']} torch thread(s), load {m['load_average_1m']}, "
        f"{meta['date']}.",
        "Collisions: share of items whose code tuple (RQ: L codes before the collision digit; MPQ: M tokens) "
        "is shared, with nearest codes (before) and after the de-dup (RQ last level, MPQ tuples). "
        "RQ full IDs carry the collision digit, so they are always unique.",
    ]
    if meta.get("ratios"):
        notes.append("Ratios: " + "; ".join(f"{k} {v:.2f}" for k, v in meta["ratios"].items()) + ".")
    return "\n".join(rows + notes) + "\n"


def plot(results: dict, codes: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.2), squeeze=False, sharey=True)
    for ax, (method, r) in zip(axes[0], results.items(), strict=True):
        c = codes[method]
        cols = c.shape[1] - (0 if method == "mpq" else 1)  # the collision digit is no codebook
        label = "expert" if method == "mpq" else "level"
        for j in range(cols):
            counts = np.sort(np.bincount(c[:, j], minlength=r["codebook_size"]))[::-1]
            ax.plot(
                np.arange(1, counts.size + 1),
                np.maximum(counts, 0.8),  # unused codes drawn just under 1 on the log axis
                label=f"{label} {j + 1}: util {r['level_utilization'][j]:.2f}, ppl {r['perplexity'][j]:.0f}",
            )
        ax.axhline(c.shape[0] / r["codebook_size"], color="grey", lw=0.8, ls="--", label="uniform")
        ax.set_yscale("log")
        ax.set_xlabel("code rank")
        ax.set_ylabel("items per code")
        shared = f"{r['collision_rate_nearest']:.1%} -> {r['collision_rate']:.1%}"
        ax.set_title(f"{method}: items sharing codes {shared}", fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle("Code usage per level / expert (codes ranked by item count)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ratios(results: dict) -> dict:
    out = {}
    t = {m: r["train_seconds"] for m, r in results.items()}
    a = {m: r["assign_items_per_second"] for m, r in results.items()}
    if "rq_kmeans" in t:
        for m in ("rq_vae", "mpq"):
            if m in t:
                out[f"train_seconds {m} / rq_kmeans"] = t[m] / t["rq_kmeans"]
    if "rq_vae" in t and "mpq" in t:
        out["train_seconds mpq / rq_vae"] = t["mpq"] / t["rq_vae"]
    if "rq_kmeans" in a:
        for m in ("rq_vae", "mpq"):
            if m in a:
                out[f"assign_items_per_second rq_kmeans / {m}"] = a["rq_kmeans"] / a[m]
    return out


def warm_up(device: str) -> None:
    """Train and assign a tiny MPQ once, so that torch's lazy imports (the first optimizer step pulls in
    torch._dynamo: tens of seconds on a busy CPU) are not billed to whichever method is timed first."""
    from models.quantizers import QuantizerConfig, assign_one, train_one

    x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    cfg = QuantizerConfig(
        codebook_size=4, mpq_codebook_size=4, mpq_experts=2, latent_dim=4, hidden_dims=(8,),
        mpq_hidden_dims=(8,), epochs=1, kmeans_iters=2,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 64 items in 4 x 4 tuples cannot all be unique
        for method in METHODS:
            model, _ = train_one(method, x, cfg, device=device)
            assign_one(model, x, [str(i) for i in range(len(x))], cfg)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from models.quantizers import QuantizerConfig, assign_one, train_one

    started = time.perf_counter()
    log(f"loading {args.dataset} items from {args.data}")
    ids, texts = load_items(args.dataset, args.data)
    if args.max_items:
        ids, texts = ids[: args.max_items], texts[: args.max_items]
    x, cache_hit = cached_embeddings(texts)
    log(f"{len(ids)} items, {x.shape[1]}-d embeddings ({'cache' if cache_hit else 'embedded now'})")

    log("warming up torch (imports, kernels) ...")
    warm_up(args.device)
    # The pipeline's default configuration; each RQ method runs with rq_method set to itself.
    base = QuantizerConfig(**({"epochs": args.epochs} if args.epochs else {}))
    results, codes = {}, {}
    for method in args.methods:
        cfg = base if method == "mpq" else base.model_copy(update={"rq_method": method})
        every = max(1, cfg.epochs // 4)

        def progress(stage: str, step: int, total: int, every=every) -> None:
            if step == total or stage == "rq_kmeans" or step % every == 0:
                unit = "level" if stage == "rq_kmeans" else "epoch"
                log(f"  {stage}: {unit} {step}/{total}")

        log(f"training {method} ...")
        model, seconds = train_one(method, x, cfg, device=args.device, progress=progress)
        times = []
        for _ in range(max(1, args.repeats)):
            t0 = time.perf_counter()
            out, metrics = assign_one(model, x, ids, cfg)
            times.append(time.perf_counter() - t0)
        codes[method] = out
        results[method] = summarize(method, model, seconds, min(times), len(ids), metrics)
        r = results[method]
        log(
            f"{method}: trained in {seconds:.1f}s, assigns {r['assign_items_per_second']:,.0f} items/s, "
            f"collisions {r['collision_rate_nearest']:.2%} -> {r['collision_rate']:.2%}"
        )

    meta = {
        "items": len(ids),
        "dim": int(x.shape[1]),
        "dataset": args.dataset,
        "data": str(args.data),
        "embedder": "all-MiniLM-L6-v2@local",
        "embedding_text": "title, then brand and categories as 'key: value' pairs, then description "
        "(bench.common.item_text; no LLM knowledge summary outside the pipeline)",
        "embeddings_from_cache": cache_hit,
        "device": args.device,
        "assign_repeats": args.repeats,
        "config": base.model_dump(mode="json"),
        "config_hash": base.config_hash(),
        "machine": machine_info(),
        "date": utc_now(),
        "ratios": ratios(results),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "semantic_ids.json").write_text(json.dumps({**results, "meta": meta}, indent=2) + "\n")
    table = markdown_table(results, meta)
    (args.out / "semantic_ids.md").write_text("# Semantic-ID quantizers\n\n" + table)
    plot(results, codes, args.out / "semantic_ids.png")
    print(table)
    for name, value in meta["ratios"].items():
        print(f"{name}: {value:.2f}")
    log(f"wrote {args.out}/semantic_ids.json, .md, .png in {meta['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
