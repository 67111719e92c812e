"""Beyond-log inference on real data: the masked diffusion model against popularity and random.

    python -m bench.beyond_log                          # scientific and movielens_100k
    python -m bench.beyond_log --datasets scientific --threads 2

Reads the feature lakehouse the real pipeline writes for each dataset (bench.lakehouse: built on first
use, cached after), so the model sees exactly the pipeline's gold.user_sequences and semantic IDs. Per
user with a validation target, the input is the training prefix (the history without the validation
and test targets); each method proposes 10 items the input does not contain, and

* hit_rate_at_10: share of users whose validation or test item is among the 10 (the issue's measure:
  "an inferred item is the held-out next item or among the validation/test items");
* next_item_hit_rate_at_10: share whose held-out next item (the validation target) is among them.

Methods: `diffusion` (models.diffusion trained here on the training prefixes with the pipeline's
configuration; train_seconds and inference users_per_second recorded), `popularity` (most frequent
items of the training prefixes), `random` (uniform over the catalog, seeded), and with --llm-users N
`llm`: the pipeline's LLM method (`beyond_log.method: llm`, jobs/beyond_llm.py through Spark) with a
language model's interests, on N seeded evaluation users: the embedded engine's Gemma 3 270M by default,
or any OpenAI-compatible server (--llm-url, --llm-model). Its users see only their training prefix, as
the others; every method is also scored on those N users (`on_llm_users`), the fair comparison. Writes
bench/results/beyond_log.json ({"<dataset>": {"diffusion": {...}, "popularity": {...}, "random": {...}}}),
beyond_log_meta.json (machine, date, configuration, ratios), beyond_log.md (the table) and
beyond_log.png (hit rates per method). All methods run in one process on
the same users, so the ratios hold even on a noisy machine; seconds are this machine's.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from bench.common import REPO_ROOT, exit_on_sigterm, log, machine_info, utc_now

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see the Makefile
DEFAULT_OUT = REPO_ROOT / "bench" / "results"
TOP_N = 10


def parse_args(argv=None):
    from bench.lakehouse import DATASETS

    p = argparse.ArgumentParser(prog="python -m bench.beyond_log", description=(
        "Hit rate at 10 of beyond-log inference (masked diffusion vs popularity vs random) on the real "
        "datasets' feature lakehouses."))
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="override the configured training epochs")
    p.add_argument("--llm-users", type=int, default=0,
                   help="also the LLM method on this many seeded evaluation users (0: off, the default; "
                   "~4 s per user on the local engine on 2 cores)")
    p.add_argument("--llm-url", default=os.environ.get("LLM_URL") or None,
                   help="an OpenAI-compatible /v1 URL for the LLM method (default: the local engine)")
    p.add_argument("--llm-model", default=os.environ.get("LLM_MODEL") or None, help="the served model name")
    a = p.parse_args(argv)
    if a.llm_url and not a.llm_model:
        p.error("--llm-url needs --llm-model")
    return a


def evaluation_users(sequences, vocab, ids: list | None = None):
    """(input item indices, validation index, test index) of users with both targets and an input;
    `ids`, when given, receives (user id, item ids) of each of them, in the same order."""
    out = []
    for user_id, items in sequences:
        if not items or len(items) < 3:
            continue
        inp, _ = vocab.encode(items[:-2])
        valid, test = vocab.index(items[-2]), vocab.index(items[-1])
        if inp:
            out.append((inp, valid, test))
            if ids is not None:
                ids.append((user_id, items))
    return out


def hit_rates(recs: list[list[int]], users) -> dict:
    any_hit = [bool({v, t} & set(r)) for r, (_, v, t) in zip(recs, users, strict=True)]
    nxt = [v in r for r, (_, v, _) in zip(recs, users, strict=True)]
    return {"hit_rate_at_10": round(float(np.mean(any_hit)), 4),
            "next_item_hit_rate_at_10": round(float(np.mean(nxt)), 4), "users": len(users)}


def popularity(train_seqs, users, n_items) -> list[list[int]]:
    counts = np.bincount([i for s in train_seqs for i in s], minlength=n_items)
    ranked = np.argsort(-counts, kind="stable")
    recs = []
    for inp, _, _ in users:
        seen = set(inp)
        recs.append([int(i) for i in ranked[: TOP_N + len(seen)] if i not in seen][:TOP_N])
    return recs


def random_recs(users, n_items, seed=0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    recs = []
    for inp, _, _ in users:
        seen, pick = set(inp), []
        while len(pick) < TOP_N:
            c = int(rng.integers(n_items))
            if c not in seen and c not in pick:
                pick.append(c)
        recs.append(pick)
    return recs


def llm_recs(root: str, base: Path, picked: list[tuple[str, list[str]]], vocab, args) -> tuple[list[list[int]], dict]:
    """The pipeline's LLM method on the picked users: their history without the validation and test
    targets (the stage itself drops the last event as the test target, so it is given items[:-1])."""
    from jobs.beyond_llm import infer_detailed
    from jobs.context import RunContext

    llm = ({"backend": "openai", "base_url": args.llm_url, "model": args.llm_model} if args.llm_url else
           {"backend": "local", "local": {"budget_minutes": None}})
    overrides = {"lakehouse": root, "artifacts": str(base / "artifacts"), "beyond_log": {"method": "llm"},
                 "llm": {**llm, "samples_k": 1, "partitions": 2}}

    def run() -> tuple[dict, float, str]:
        ctx = RunContext.create(overrides=overrides)
        seqs = ctx.spark.createDataFrame([(u, items[:-1]) for u, items in picked],
                                         "user_id string, item_ids array<string>")
        start = time.perf_counter()
        out = infer_detailed(ctx, seqs, TOP_N)
        rows = {r["user_id"]: r for r in out.frame.select("user_id", "item_ids", "status", "model_version").collect()}
        return rows, time.perf_counter() - start, next(iter(rows.values()))["model_version"] if rows else "?"

    if args.llm_url:
        rows, seconds, model = run()
    else:
        from llm_agents import local_engine

        with local_engine.engine("bench-beyond", slots=8):
            rows, seconds, model = run()
    recs = []
    for user_id, _ in picked:
        r = rows.get(user_id)
        idx = [vocab.index(i) for i in ((r["item_ids"] or []) if r else [])]
        recs.append([i for i in idx if i is not None][:TOP_N])
    statuses: dict[str, int] = {}
    for r in rows.values():
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    return recs, {"model_version": model, "seconds": round(seconds, 1),
                  "users_per_second": round(len(picked) / seconds, 3), "status": statuses}


def run_dataset(name: str, args) -> dict:
    import torch

    from bench.lakehouse import ensure
    from jobs.context import RunContext
    from jobs.infer_beyond_log import diffusion_config, load_sequences, load_vocab, training_prefixes
    from models import diffusion as D

    base = ensure(name)
    root = str(base / "lakehouse")
    codebook = (base / "artifacts" / "quantizers" / "LATEST").read_text().strip()
    vocab = load_vocab(root, codebook)
    sequences = load_sequences(root)
    train_seqs, _ = training_prefixes(vocab, sequences)
    ids: list = []
    users = evaluation_users(sequences, vocab, ids)
    # the pipeline's configuration, as the nightly job would train it
    cfg = diffusion_config(RunContext.create(overrides={"lakehouse": root}))
    cfg.device, cfg.threads = "auto", args.threads
    if args.epochs:
        cfg.epochs = args.epochs
    torch.set_num_threads(args.threads)
    log(f"{name}: {len(vocab.item_ids)} items, {len(sequences)} users, {len(train_seqs)} training prefixes, "
        f"{len(users)} evaluation users; training {cfg.epochs} epochs ...")
    model, stats = D.train(vocab, train_seqs, cfg, progress=lambda m: log(f"  {m}"))
    start = time.perf_counter()
    inferred = D.infer(model, vocab, [u[0] for u in users], TOP_N)
    infer_s = time.perf_counter() - start
    diff = hit_rates([r.item_idx for r in inferred], users)
    decoded = sum(r.decoded_valid for r in inferred)
    slots = sum(r.decoded_valid + r.decoded_invalid + r.decoded_seen for r in inferred)
    diff.update({
        "train_seconds": round(stats.seconds, 1), "users_per_second": round(len(users) / infer_s, 1),
        "training_sequences": stats.sequences, "epochs": stats.epochs,
        "first_loss": round(stats.first_loss, 4), "last_loss": round(stats.last_loss, 4),
        "decoded_valid_slot_share": round(decoded / max(slots, 1), 4),
    })
    pop = hit_rates(popularity(train_seqs, users, len(vocab.item_ids)), users)
    rnd = hit_rates(random_recs(users, len(vocab.item_ids)), users)
    res = {"diffusion": diff, "popularity": pop, "random": rnd}
    if args.llm_users:
        import random

        picked = sorted(random.Random(0).sample(range(len(users)), min(args.llm_users, len(users))))
        log(f"{name}: the LLM method on {len(picked)} seeded evaluation users ...")
        recs, info = llm_recs(root, base, [ids[k] for k in picked], vocab, args)
        sample = [users[k] for k in picked]
        res["llm"] = {**hit_rates(recs, sample), **info}
        everyone = {"diffusion": [r.item_idx for r in inferred],
                    "popularity": popularity(train_seqs, users, len(vocab.item_ids)),
                    "random": random_recs(users, len(vocab.item_ids))}
        res["on_llm_users"] = {m: hit_rates([v[k] for k in picked], sample) for m, v in everyone.items()}
        res["on_llm_users"]["llm"] = hit_rates(recs, sample)
        log(f"{name}: on the {len(picked)} users: " + ", ".join(
            f"{m} {r['hit_rate_at_10']:.4f}" for m, r in res["on_llm_users"].items()))
    meta = {"items": len(vocab.item_ids), "users": len(sequences), "codebook_version": codebook,
            "config": dict(cfg.__dict__),
            "diffusion_over_popularity": round(diff["hit_rate_at_10"] / max(pop["hit_rate_at_10"], 1e-9), 3)}
    log(f"{name}: diffusion {diff['hit_rate_at_10']:.4f}, popularity {pop['hit_rate_at_10']:.4f}, "
        f"random {rnd['hit_rate_at_10']:.4f}")
    return res, meta


def table(results: dict, meta: dict) -> str:
    lines = ["| dataset | method | hit rate@10 (valid or test) | next-item hit@10 | train s | users/s |",
             "|---|---|---:|---:|---:|---:|"]
    for ds, res in results.items():
        for m in ("diffusion", "popularity", "random"):
            r = res[m]
            lines.append(f"| {ds} | {m} | {r['hit_rate_at_10']:.4f} | {r['next_item_hit_rate_at_10']:.4f} | "
                         f"{r.get('train_seconds', '')} | {r.get('users_per_second', '')} |")
        lines.append(f"| {ds} | diffusion / popularity | {meta[ds]['diffusion_over_popularity']:.2f}x | | | |")
        if "on_llm_users" in res:
            n = res["llm"]["users"]
            for m, r in res["on_llm_users"].items():
                extra = f" ({res['llm']['model_version']})" if m == "llm" else ""
                lines.append(f"| {ds}, {n} sampled users | {m}{extra} | {r['hit_rate_at_10']:.4f} | "
                             f"{r['next_item_hit_rate_at_10']:.4f} | | "
                             f"{res['llm']['users_per_second'] if m == 'llm' else ''} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.5), squeeze=False)
    for ax, ds in zip(axes[0], names, strict=True):
        methods = ["diffusion", "popularity", "random"]
        a = [results[ds][m]["hit_rate_at_10"] for m in methods]
        b = [results[ds][m]["next_item_hit_rate_at_10"] for m in methods]
        x = np.arange(len(methods))
        ax.bar(x - 0.2, a, 0.4, label="valid or test in top 10")
        ax.bar(x + 0.2, b, 0.4, label="next item in top 10")
        ax.set_xticks(x, methods)
        ax.set_title(ds)
        ax.set_ylabel("hit rate")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    from bench.lakehouse import available

    args = parse_args(argv)
    results, meta = {}, {}
    # A run over some datasets keeps the others' results and meta from the files it rewrites.
    if (args.out / "beyond_log.json").exists() and (args.out / "beyond_log_meta.json").exists():
        results = json.loads((args.out / "beyond_log.json").read_text())
        meta = json.loads((args.out / "beyond_log_meta.json").read_text()).get("datasets", {})
        results = {k: v for k, v in results.items() if k in meta}
    measured = 0
    for name in args.datasets:
        if not available(name):
            log(f"{name}: data not found under ../shared/data, skipped")
            continue
        results[name], meta[name] = run_dataset(name, args)
        measured += 1
    if not measured:
        log("no dataset available: nothing measured, results left as they were")
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "beyond_log.json").write_text(json.dumps(results, indent=2) + "\n")
    meta = {"date": utc_now(), "machine": machine_info(), "top_n": TOP_N, "datasets": meta}
    (args.out / "beyond_log_meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    md = table(results, meta["datasets"])
    (args.out / "beyond_log.md").write_text(md)
    plot(results, args.out / "beyond_log.png")
    print(md)
    return 0


if __name__ == "__main__":
    exit_on_sigterm()
    raise SystemExit(main())
