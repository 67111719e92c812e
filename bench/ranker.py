"""The ranker's ablation on the real feature lakehouses: which feature families help, and by how much.

    python -m bench.ranker                                   # both datasets, 7 variants x 3 seeds
    python -m bench.ranker --datasets scientific --seeds 0 --variants id_only all   # a quick look

Reads the Delta tables that bench.lakehouse builds with the real pipeline (Amazon "Scientific" and
MovieLens-100k; the first build takes minutes, later calls reuse it) through the ranker's own Arrow
reader, and trains models.ranker once per (variant, seed) with the same settings:

* id_only: item ID embeddings only (plain SASRec with a tied output layer);
* +catalog: + the catalog's own facts (bronze.catalog_items: category-path levels, brand, price band),
  no agent involved: the fair bar for anything a language model adds;
* +semantic_ids: + the summed RQ-code and MPQ-token embeddings of gold.item_semantic_ids;
* +llm_knowledge: + only what the agents said beyond the catalog (silver.item_knowledge fields whose
  source is a model: product type, text-only attributes, audiences, scenarios, occasions, complements,
  substitutes as a token bag, and the summary's embedding);
* +beyond_log: ID embeddings + the user's inferred items (gold.user_augmented_behaviors) as context;
* catalog+llm: the catalog facts and the agents' knowledge together (what the knowledge adds over
  +catalog is the honest measure of a model);
* all: every family.

Which model or heuristic wrote the knowledge is in meta.datasets.<name>.data.knowledge_sources (the
bench lakehouse is built with the offline heuristic unless bench.lakehouse is told otherwise), so a
ratio is never credited to a language model that did not produce it.

Selection is on the validation target only (early stopping on Recall@10); the test figures are read
once, from the best validation epoch. Seeds run in the outer loop so every variant shares the machine's
load of the moment. Writes, under --out:

* ranker.json: {"<dataset>": {"<variant>": {"recall@10": {"mean", "std", "values"}, ... "ndcg@20",
  "train_seconds", "sequences_per_second", "valid_recall@10", "best_epoch", "epochs"}}, "meta": {...}}
  with std the sample standard deviation over seeds; train_seconds is the wall time of a whole fit
  (training epochs, the validation pass after each, the test pass), sequences_per_second the training
  loop's throughput (training sequences per second, validation excluded); meta holds the machine, table versions, date,
  settings, the ratios of each variant to id_only and to +catalog, and whether `all` reached 1.15 x id_only on Recall@10.
* ranker.md: the tables printed at the end;
* ranker.png: test Recall@10 per variant and dataset (error bars: std over seeds), with the ratio to id_only.
With `--knowledge local` (the lakehouse the local engine's model filled) the files are ranker_local.*.
With `--beyond-log llm` the lakehouse whose beyond-log inferences the LLM method made (`make
bench-lakehouse BEYOND=llm`, over a copy of that knowledge build) is read and the files get `_beyond_llm`.
Its inferences cannot be rebuilt as of earlier cuts (point-in-time contexts are the diffusion model's),
so that run sets `beyond_log_point_in_time: false`: training reads the published inference with context
dropout 0.5 (it was made from the history up to the validation target, so it has seen the training
targets' futures, never the targets themselves, which are history and excluded from it), validation is
scored without context, and the test with the published inference; docs/ranker.md has the rule.

A dataset whose shared data is absent is skipped with a message (and listed in meta.skipped).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep, not spin

from bench.common import REPO_ROOT, log, machine_info, recall_bars, utc_now, write_results  # noqa: E402

DATASETS = ("scientific", "movielens_100k")
from models.variants import VARIANTS as _FAMILIES_OF  # noqa: E402

VARIANTS = tuple(_FAMILIES_OF)
METRICS = ("recall@5", "recall@10", "recall@20", "ndcg@5", "ndcg@10", "ndcg@20")
DEFAULT_OUT = REPO_ROOT / "bench" / "results"
TARGET = 1.15


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.ranker", description="Ablation of the sequential ranker's "
                                "feature families on the real datasets' feature lakehouses (mean and std over seeds).")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    p.add_argument("--max-epochs", type=int, default=None,
                   help="most epochs per run (default: per dataset, see SETTINGS)")
    p.add_argument("--patience", type=int, default=None, help="early-stopping patience (default: the config's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other RankerConfig setting")
    p.add_argument("--knowledge", choices=("offline", "local"), default="offline",
                   help="the lakehouse whose knowledge the variants read: the offline heuristic's (default) or the "
                   "local engine's model's (built by `python -m bench.lakehouse --knowledge local`; results go to "
                   "ranker_local.*)")
    p.add_argument("--beyond-log", choices=("diffusion", "llm"), default="diffusion",
                   help="whose beyond-log inferences +beyond_log reads: the diffusion model's (default) or the LLM "
                   "method's (built by `make bench-lakehouse BEYOND=llm`; results go to ranker[_local]_beyond_llm.*)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    return p.parse_args(argv)


# Settings per dataset, the same for every variant, chosen on validation Recall@10 only (seed 0).
# Scientific: d_model 128 with lr 1e-3 raised validation Recall@10 for id_only (0.1267 -> 0.1300) and
# all (0.1432 -> 0.1486) over d_model 64 with lr 3e-3; it plateaus after 6-10 epochs, so at most 25
# epochs with patience 4 never binds. MovieLens has 943 users, so a batch of 64 gives 15 updates per
# epoch instead of 4; lr 3e-3 reaches its (noisy) validation plateau within 10 epochs.
SETTINGS = {
    "scientific": {"d_model": 128, "lr": 1e-3, "max_epochs": 25, "patience": 4},
    "movielens_100k": {"lr": 3e-3, "max_epochs": 10, "patience": 4, "batch_size": 64},
}


def summarize(values: list[float]) -> dict:
    import numpy as np

    a = np.asarray(values, dtype=float)
    return {"mean": round(float(a.mean()), 6), "std": round(float(a.std(ddof=1)) if len(a) > 1 else 0.0, 6),
            "values": [round(float(v), 6) for v in a]}


def run_dataset(name: str, args, overrides: dict) -> tuple[dict, dict]:
    import torch

    from bench.lakehouse import consumer_lakehouse, root_for
    from jobs.train_ranker import load_data
    from models.ranker import RankerConfig, fit, make_streams

    home = root_for(name, args.knowledge, args.beyond_log)
    root, build = consumer_lakehouse(name, args.knowledge, args.beyond_log)
    settings = {**SETTINGS[name], **overrides}
    if args.beyond_log == "llm":  # the LLM method's inferences exist as published only (module docstring)
        settings["beyond_log_point_in_time"] = False
    if args.max_epochs:
        settings["max_epochs"] = args.max_epochs
    if args.patience:
        settings["patience"] = args.patience
    base = RankerConfig(**settings)
    t0 = time.perf_counter()
    # The point-in-time beyond-log contexts (an as-of diffusion model) only when a variant uses them.
    from models.ranker import VARIANTS as USES

    # One load serves every variant: read what the widest of them needs.
    needs = {"beyond_log", "llm_knowledge"} & set().union(*(USES[v] for v in args.variants))
    load_cfg = RankerConfig(**{**settings, "variant": "all" if needs else "id_only"})
    pinned, feats, beyond, stats = load_data(root, load_cfg, artifacts=str(home / "artifacts"))
    log(f"{name}: {feats.n_items} items, {stats['users']} users ({stats['users_too_short']} too short), "
        f"knowledge for {stats.get('items_with_knowledge')} items from {stats.get('knowledge_sources')}, "
        f"beyond-log for {stats['beyond_log_users']} users "
        f"({stats['beyond_log_model_version']}); read in {time.perf_counter() - t0:.1f}s")
    runs: dict[str, list] = {v: [] for v in args.variants}
    for seed in args.seeds:
        for variant in args.variants:
            cfg = RankerConfig(**{**settings, "variant": variant, "seed": seed})
            torch.set_num_threads(args.threads)
            start = time.perf_counter()
            model, res = fit(feats, make_streams(pinned, feats, cfg, beyond), cfg)
            res.counts["copy_bonus"] = ([round(float(v), 4) for v in model.copy.detach().cpu()]
                                        if model.copy is not None else None)
            log(f"{name} {variant:>14} seed {seed}: test recall@10 {res.test['recall@10']:.4f} "
                f"ndcg@10 {res.test['ndcg@10']:.4f} | valid recall@10 {res.valid['recall@10']:.4f} "
                f"best epoch {res.best_epoch}/{res.epochs} | {res.train_seconds:.0f}s train, "
                f"{res.sequences_per_second:.0f} seq/s, {time.perf_counter() - start:.0f}s total")
            runs[variant].append(res)
    out: dict = {}
    for variant, results in runs.items():
        rec = {m: summarize([r.test[m] for r in results]) for m in METRICS}
        rec["train_seconds"] = summarize([r.fit_seconds for r in results])
        rec["sequences_per_second"] = summarize([r.sequences_per_second for r in results])
        rec["valid_recall@10"] = summarize([r.valid["recall@10"] for r in results])
        rec["best_epoch"] = [r.best_epoch for r in results]
        rec["epochs"] = [r.epochs for r in results]
        if results[0].counts.get("copy_bonus") is not None:
            # the learned score bonus per beyond-log context rank, one list per seed: how far the ranker trusts it
            rec["beyond_log_copy_bonus"] = [r.counts["copy_bonus"] for r in results]
        out[variant] = rec
    info = {"table_versions": pinned.versions, "root": root, "lakehouse_build": build, "items": feats.n_items, "users": stats["users"],
            "eval_users": runs[args.variants[0]][0].eval_users,
            "train_sequences": runs[args.variants[0]][0].train_sequences, "settings": base.to_dict(),
            "data": stats, "seconds": round(time.perf_counter() - t0, 1)}
    return out, info


def ratios(res: dict, base: str = "id_only") -> dict:
    ref = res.get(base)
    if not ref:
        return {}
    return {v: {m: round(r[m]["mean"] / ref[m]["mean"], 4) if ref[m]["mean"] else None
                for m in ("recall@10", "ndcg@10")} for v, r in res.items()}


def _x(value) -> str:
    return "–" if value is None else f"{value:.2f}×"


def markdown(results: dict, meta: dict) -> str:
    lines = [f"# Ranker ablation ({meta['date']}, seeds {meta['seeds']}, {meta['machine']['cpu_count']} CPUs, "
             f"torch threads {meta['threads']})", ""]
    for ds, res in results.items():
        info = meta["datasets"][ds]
        sources = info["data"].get("knowledge_sources") or {}
        lines += [f"## {ds}: {info['items']:,} items, {info['eval_users']:,} test users, "
                  f"{info['train_sequences']:,} training sequences", "",
                  "Knowledge read by +llm_knowledge, written by: "
                  + (", ".join(f"{m} ({k:,} items)" for m, k in sources.items()) if sources else "nothing") + ".", "",
                  "| variant | Recall@5 | Recall@10 | Recall@20 | NDCG@5 | NDCG@10 | NDCG@20 | R@10 ÷ id_only "
                  "| R@10 ÷ +catalog | train s | seq/s |", "|---|" + "---:|" * 10]
        rat = meta["ratios"].get(ds, {})
        over = meta.get("ratios_over_catalog", {}).get(ds, {})
        for v, r in res.items():
            cells = [f"{r[m]['mean']:.4f} ± {r[m]['std']:.4f}" for m in METRICS]
            lines.append(f"| {v} | " + " | ".join(cells) + f" | {_x(rat.get(v, {}).get('recall@10'))} "
                         f"| {_x(over.get(v, {}).get('recall@10'))} | {r['train_seconds']['mean']:.0f} "
                         f"| {r['sequences_per_second']['mean']:.0f} |")
        lines.append("")
    for ds in meta.get("skipped", {}):
        lines.append(f"{ds}: skipped ({meta['skipped'][ds]})")
    t = meta.get("target")
    if t:
        lines.append(f"Target `all` ≥ {TARGET} × `id_only` Recall@10 on scientific: {t['ratio']:.3f} "
                     f"({'met' if t['met'] else 'not met'}).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import yaml

    from bench.lakehouse import unusable

    args = parse_args(argv)
    # The jobs' own progress lines (the as-of diffusion model's epochs, context inference) on stderr.
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("reaseq").setLevel(logging.INFO)
    overrides = {}
    for s in args.set:
        k, _, v = s.partition("=")
        overrides[k] = yaml.safe_load(v)
    start = time.perf_counter()
    results, infos, skipped = {}, {}, {}
    for name in args.datasets:
        if why := unusable(name, args.knowledge, args.beyond_log):
            skipped[name] = why
            log(f"skipping {name}: {why}")
            continue
        results[name], infos[name] = run_dataset(name, args, overrides)
    if not results:
        log("no dataset available: nothing measured")
        return 1
    meta = {
        "date": utc_now(), "machine": machine_info(), "threads": args.threads, "seeds": args.seeds,
        "variants": args.variants, "settings": overrides, "datasets": infos, "skipped": skipped,
        "knowledge": args.knowledge, "beyond_log_method": args.beyond_log,
        "ratios": {ds: ratios(r) for ds, r in results.items()},
        "ratios_over_catalog": {ds: ratios(r, "+catalog") for ds, r in results.items()}, "seconds": round(time.perf_counter() - start, 1),
        "selection": "early stopping on validation Recall@10; test read once at the best validation epoch",
        "std": "sample standard deviation over seeds (ddof=1)",
    }
    sci = meta["ratios"].get("scientific", {}).get("all")
    if sci and sci.get("recall@10") is not None:
        meta["target"] = {"ratio": sci["recall@10"], "required": TARGET, "met": sci["recall@10"] >= TARGET}
    # The local model's lakehouse writes beside the offline one, never over it.
    stem = "ranker" + ("" if args.knowledge == "offline" else f"_{args.knowledge}") + (
        "" if args.beyond_log == "diffusion" else f"_beyond_{args.beyond_log}")
    write_results(args.out, stem, results, meta,
                  markdown(results, meta),
                  lambda path: recall_bars(results, path, baseline="id_only"), meta["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
