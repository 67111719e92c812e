"""Ablation of REG4Rec's generative recommender on the real feature lakehouses: what each part is worth.

    python -m bench.generative                                   # both datasets, 5 variants x 3 seeds
    python -m bench.generative --datasets scientific --seeds 0   # a quick look

Reads the Delta tables bench.lakehouse built with the real pipeline (Amazon "Scientific", MovieLens-100k;
an existing build is used as it is) through the ranker's Arrow reader. Per (dataset, seed) the base model
is trained once and decoded three ways, then fine-tuned from it once per alignment variant:

* fixed_order: one path, experts committed in order 0..M-1, no alignment;
* +dynamic_paths: M paths (path p starts from expert p), confidence-based step order, paths averaged;
* +corp: + consistency-oriented pruning of invalid / disagreeing paths before averaging;
* +pars: + PARS preference alignment (DPO-style, category-path partial credit), decoded like +corp;
* +msra: + MSRA rewards (the next training interactions) in the alignment, decoded like +corp;
* +pars_knowledge: +pars whose partial credit also comes from the knowledge's product types (the same
  seed as +pars, so the credit is the only difference); by default only with `--knowledge local`, where a
  language model wrote them (the offline heuristic's product types re-parse catalog fields).

With `--knowledge local` the lakehouse the local engine's model answered is read (built by `make
bench-lakehouse KNOWLEDGE=local`; never started from here) and the files are generative_local.*; the
report says whether the knowledge credit helped on validation (+pars_knowledge against +pars), the
rule for keeping it.

Selection uses the validation target only (fixed-order validation Recall@10 for early stopping and for
the alignment epoch); the test target is decoded once per variant. Writes, under --out:

* generative.json: {"<dataset>": {"<variant>": {"recall@10": {"mean", "std", "values"}, ... "ndcg@20",
  "train_seconds", "users_per_second", "valid_select", "best_epoch"}}, "meta": {...}}; std is the sample
  standard deviation over seeds; train_seconds the wall time of the stages that made the variant's weights
  (base training with its validation passes, + the alignment stage); users_per_second the test decode's
  throughput (encoding + beam search + aggregation);
* generative.md: the tables; generative.png: Recall@10 per variant and dataset with error bars.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep, not spin

from bench.common import REPO_ROOT, log, machine_info, recall_bars, utc_now, write_results  # noqa: E402

DATASETS = ("scientific", "movielens_100k")
VARIANTS = ("fixed_order", "+dynamic_paths", "+corp", "+pars", "+msra", "+pars_knowledge")
METRICS = ("recall@5", "recall@10", "recall@20", "ndcg@5", "ndcg@10", "ndcg@20")
DEFAULT_OUT = REPO_ROOT / "bench" / "results"

# Per dataset, the same for every variant and seed; sized so the 6 (dataset, seed) runs fit in about
# 30 minutes on this 2-core machine. Chosen on validation figures only.
SETTINGS = {
    "scientific": {"max_epochs": 16, "patience": 3, "select_users": 1500, "beam": 30, "pars_epochs": 1,
                   "pars_examples_per_user": 1},
    "movielens_100k": {"max_epochs": 30, "patience": 4, "batch_size": 64, "select_users": 0, "beam": 30,
                       "pars_epochs": 2, "pars_examples_per_user": 6},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.generative", description="Ablation of the generative "
                                "recommender's parts on the real datasets' feature lakehouses (mean and std over seeds).")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--variants", nargs="+", choices=VARIANTS,
                   help="default: all but +pars_knowledge; all six with --knowledge local")
    p.add_argument("--knowledge", choices=("offline", "local"), default="offline",
                   help="the lakehouse read: the offline heuristic's (default) or the local engine's model's "
                   "(results go to generative_local.*)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any GenerativeConfig setting, for every dataset")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    a = p.parse_args(argv)
    if a.variants is None:
        a.variants = list(VARIANTS if a.knowledge != "offline" else VARIANTS[:5])
    return a


def summarize(values: list[float]) -> dict:
    import numpy as np

    a = np.asarray(values, dtype=float)
    return {"mean": round(float(a.mean()), 6), "std": round(float(a.std(ddof=1)) if len(a) > 1 else 0.0, 6),
            "values": [round(float(v), 6) for v in a]}


def _fmt(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def main(argv: list[str] | None = None) -> int:
    import yaml

    args = parse_args(argv)
    import torch

    from bench.lakehouse import consumer_lakehouse, unusable
    from jobs.train_generative import load_data
    from models.generative import GenerativeConfig, fit_variants

    torch.set_num_threads(args.threads)
    overrides = {}
    for s in args.set:
        k, _, v = s.partition("=")
        overrides[k] = yaml.safe_load(v)
    start = time.perf_counter()
    skipped = {d: why for d in args.datasets if (why := unusable(d, args.knowledge))}
    todo = [d for d in args.datasets if d not in skipped]
    for d, why in skipped.items():
        log(f"skipping {d}: {why}")
    if not todo:
        log("no dataset available: nothing measured")
        return 1
    total = len(todo) * len(args.seeds)
    done = 0
    results, infos = {}, {}
    for name in todo:
        root, build = consumer_lakehouse(name, args.knowledge)  # an existing build is used as it is
        settings = {**SETTINGS[name], **overrides}
        base_cfg = GenerativeConfig(**settings)
        t0 = time.perf_counter()
        pinned, feats, cat, credit, stats = load_data(root, base_cfg, knowledge="+pars_knowledge" in args.variants)
        kinds = (f", product types for {stats['items_with_product_type']} from {stats['product_type_sources']} "
                 f"({stats['product_types']} types, the most common {stats['most_common_product_type']!r} on "
                 f"{stats['most_common_product_type_share'] or 0:.0%})") if credit.kinds is not None else ""
        log(f"{name}: {feats.n_items} items ({stats['items_with_mpq']} with MPQ tokens, {stats['mpq_experts']} experts "
            f"x {max(stats['mpq_codebook_sizes'])} codes, {stats['items_sharing_a_tuple']} sharing a tuple), "
            f"{stats['users']} users, category paths for {stats['items_with_category_path']}{kinds}; read in "
            f"{time.perf_counter() - t0:.1f}s")
        runs = []
        for seed in args.seeds:
            cfg = GenerativeConfig(**{**settings, "seed": seed})
            t1 = time.perf_counter()

            def on_epoch(rec, name=name, seed=seed):
                log(f"  {name} s{seed} {rec['stage']} epoch {rec['epoch']}/{rec['max_epochs']} loss {rec['loss']:.4f} "
                    f"valid(fixed) recall@10 {rec['valid']:.4f} (best {rec['best']:.4f} @ {rec['best_epoch']}) "
                    f"{rec['train_seconds']:.0f}s")

            res = fit_variants(pinned, feats, cat, credit, cfg, tuple(args.variants), on_epoch=on_epoch)
            runs.append(res)
            done += 1
            elapsed = time.perf_counter() - start
            rate = elapsed / done
            summary = " ".join(f"{v} {res[v]['test']['recall@10']:.4f}" for v in args.variants)
            log(f"[{done}/{total}] {name} seed {seed} in {_fmt(time.perf_counter() - t1)}: test recall@10 {summary} | "
                f"{_fmt(rate)}/run, ETA {_fmt(rate * (total - done))}")
        out = {}
        for v in args.variants:
            recs = [r[v] for r in runs]
            rec = {m: summarize([r["test"][m] for r in recs]) for m in METRICS}
            rec["train_seconds"] = summarize([r["train_seconds"] for r in recs])
            rec["users_per_second"] = summarize([r["users_per_second"] for r in recs])
            rec["valid_select"] = summarize([r["valid_select"] for r in recs])
            rec["best_epoch"] = [r["best_epoch"] for r in recs]
            out[v] = rec
        results[name] = out
        extra = runs[0]["_extra"]
        infos[name] = {"table_versions": pinned.versions, "root": root, "lakehouse_build": build,
                       "items": feats.n_items, "users": stats["users"], "test_users": extra.get("test_users"),
                       "alignment_examples": extra.get("alignment_examples"),
                       "path_counts": [r["_extra"]["path_counts"] for r in runs],
                       "settings": base_cfg.to_dict(), "data": stats, "seconds": round(time.perf_counter() - t0, 1)}
    meta = {"date": utc_now(), "machine": machine_info(), "threads": args.threads, "seeds": args.seeds,
            "variants": args.variants, "overrides": overrides, "datasets": infos, "skipped": skipped,
            "seconds": round(time.perf_counter() - start, 1),
            "selection": "fixed-order validation Recall@10 (early stopping, alignment epoch); test decoded once",
            "std": "sample standard deviation over seeds (ddof=1)"}
    meta["knowledge"] = args.knowledge
    meta["knowledge_credit"] = {ds: credit_verdict(res) for ds, res in results.items() if "+pars_knowledge" in res
                                and "+pars" in res}
    sci = results.get("scientific", {})
    core = [v for v in args.variants if v != "+pars_knowledge"]
    if "fixed_order" in sci and core[-1] != "fixed_order":
        full = core[-1]
        ratio = sci[full]["recall@10"]["mean"] / max(sci["fixed_order"]["recall@10"]["mean"], 1e-12)
        meta["target"] = {"full_variant": full, "ratio_recall@10": round(ratio, 4), "met": ratio > 1.0}
    write_results(args.out, "generative" if args.knowledge == "offline" else f"generative_{args.knowledge}", results,
                  meta, markdown(results, meta),
                  lambda path: recall_bars(results, path), meta["seconds"])
    return 0


def credit_verdict(res: dict) -> dict:
    """Whether the knowledge credit earns its place: +pars_knowledge against +pars on the validation
    Recall@10 that selected them, paired by seed (each pair shares its base model and seed, so the credit
    is the only difference): it helps only if it is higher in every seed, not on a mean one seed can
    carry. The test figures beside it, never the rule."""
    mine, theirs = res["+pars_knowledge"]["valid_select"], res["+pars"]["valid_select"]
    better = sum(a > b for a, b in zip(mine["values"], theirs["values"], strict=True))
    valid = mine["mean"] / max(theirs["mean"], 1e-12)
    test = res["+pars_knowledge"]["recall@10"]["mean"] / max(res["+pars"]["recall@10"]["mean"], 1e-12)
    return {"valid_recall@10_ratio": round(valid, 4), "test_recall@10_ratio": round(test, 4),
            "seeds_better": f"{better} of {len(mine['values'])}", "helps": better == len(mine["values"]) and valid > 1.0}


def markdown(results: dict, meta: dict) -> str:
    lines = [f"# Generative recommender ablation ({meta['date']}, seeds {meta['seeds']}, "
             f"{meta['machine']['cpu_count']} CPUs, torch threads {meta['threads']})", ""]
    for ds, res in results.items():
        info = meta["datasets"][ds]
        lines += [f"## {ds}: {info['items']:,} items, {info['test_users']:,} test users, "
                  f"{info['alignment_examples']:,} alignment examples" if info.get("alignment_examples") else
                  f"## {ds}: {info['items']:,} items, {info['test_users']:,} test users", "",
                  "| variant | Recall@5 | Recall@10 | Recall@20 | NDCG@5 | NDCG@10 | NDCG@20 | R@10 ÷ fixed_order "
                  "| train s | users/s |", "|---|" + "---:|" * 9]
        base = res.get("fixed_order", {}).get("recall@10", {}).get("mean")
        for v, r in res.items():
            cells = [f"{r[m]['mean']:.4f} ± {r[m]['std']:.4f}" for m in METRICS]
            ratio = f"{r['recall@10']['mean'] / base:.2f}×" if base else "–"
            lines.append(f"| {v} | " + " | ".join(cells) + f" | {ratio} | {r['train_seconds']['mean']:.0f} | "
                         f"{r['users_per_second']['mean']:.0f} |")
        lines.append("")
    for ds, v in meta.get("knowledge_credit", {}).items():
        data = meta["datasets"][ds]["data"]
        lines.append(f"{ds}: knowledge credit (product types of {data.get('items_with_product_type', 0):,} items from "
                     f"{data.get('product_type_sources')}): +pars_knowledge ÷ +pars validation Recall@10 "
                     f"{v['valid_recall@10_ratio']:.3f}× (higher in {v['seeds_better']} seeds), test "
                     f"{v['test_recall@10_ratio']:.3f}×: "
                     f"{'helps on validation, keep it' if v['helps'] else 'no help on validation, leave it off'}.")
    for ds, why in meta.get("skipped", {}).items():
        lines.append(f"{ds}: skipped ({why})")
    t = meta.get("target")
    if t:
        lines.append(f"Target `{t['full_variant']}` > `fixed_order` Recall@10 on scientific: "
                     f"{t['ratio_recall@10']:.3f}× ({'met' if t['met'] else 'not met'}).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
