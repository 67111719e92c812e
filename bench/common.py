"""Shared benchmark plumbing: catalog loading, embedding text, an on-disk embedding cache, machine info.

No Spark here: items come from the pure-Python loaders in jobs.sources, embeddings from models.embedder.
"""

from __future__ import annotations

import hashlib
import os
import platform
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = Path(os.environ.get("REASEQ_BENCH_CACHE", Path.home() / ".cache" / "reaseq" / "bench"))


def exit_on_sigterm() -> None:
    """A SIGTERM (kill, a scheduler's stop) becomes SystemExit, so `finally` blocks run: a benchmark that
    started the local LLM engine stops it instead of leaving it on both cores (Python's default ends the
    process at once, and the engine lives in a session of its own)."""
    def stop(signum, _frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def item_text(row: dict) -> str:
    """Embedding text of one bronze item row, shaped like jobs.embed_items.embedding_text_column.

    The pipeline embeds `title summary attributes` (attributes as "key: value" pairs sorted by key, joined
    with "; "), where summary and attributes come from the LLM knowledge step (silver.item_knowledge).
    Outside the pipeline there is no knowledge summary, so brand, categories (root first, joined with
    " > ") and any catalog attributes stand in for the knowledge attributes and the raw description for
    the summary. The description goes last: unlike a summary it is long, and MiniLM truncates the text at
    256 word pieces, which would otherwise cut the brand and categories off. Empty parts are left out.
    """
    attrs = {str(k): str(v) for k, v in (row.get("attributes") or {}).items()}
    if row.get("brand"):
        attrs["brand"] = row["brand"]
    if row.get("categories"):
        attrs["categories"] = " > ".join(row["categories"])
    attr_text = "; ".join(f"{k}: {v}" for k, v in sorted(attrs.items()))
    parts = [row["title"], attr_text, row.get("description") or ""]
    return " ".join(p for p in parts if p).strip()


def load_items(dataset: str, path: str | Path) -> tuple[list[str], list[str]]:
    """(item_ids, embedding texts) of a source dataset, in the loader's row order."""
    from jobs.sources import load_source

    batch = load_source(dataset, path)
    rows = batch.items.to_pylist()
    if batch.quarantine:
        log(f"{len(batch.quarantine)} source rows quarantined by the loader (left out)")
    return [r["item_id"] for r in rows], [item_text(r) for r in rows]


def texts_key(texts: list[str], model_name: str) -> str:
    """sha256 over the model name and every text (length-prefixed, so no two lists share a key)."""
    h = hashlib.sha256(model_name.encode())
    for t in texts:
        b = t.encode()
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:20]


def cached_embeddings(texts: list[str], cache_dir: Path = CACHE_DIR) -> tuple[np.ndarray, bool]:
    """(embeddings n x d float32, whether they came from the cache) with the packaged MiniLM.

    The cache file is named by a hash of the model name and the exact texts, so any change to the
    catalog or to `item_text` embeds again. Written atomically.
    """
    from models.embedder import EmbedderConfig, embed_texts

    config = EmbedderConfig()
    path = Path(cache_dir) / f"emb-{texts_key(texts, config.name)}.npy"
    if path.exists():
        emb = np.load(path)
        if emb.shape[0] == len(texts):
            return emb, True
    log(f"embedding {len(texts)} texts with {config.name} (cached afterwards under {path.parent}) ...")
    start = time.perf_counter()
    emb = embed_texts(texts, config)
    log(f"embedded in {time.perf_counter() - start:.0f}s")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, emb)
    os.replace(tmp, path)
    return emb, False


def machine_info() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def recall_bars(results: dict, path: Path, baseline: str | None = None) -> None:
    """One panel per dataset: test Recall@10 per variant (mean, error bar = std over seeds), and its ratio
    to `baseline` above each bar when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.8), squeeze=False)
    for ax, (ds, res) in zip(axes[0], results.items(), strict=True):
        names = list(res)
        means = [res[v]["recall@10"]["mean"] for v in names]
        stds = [res[v]["recall@10"]["std"] for v in names]
        ax.bar(range(len(names)), means, yerr=stds, capsize=4, color="#4878a8")
        ax.set_xticks(range(len(names)), names, rotation=25, ha="right")
        ax.set_ylabel("test Recall@10")
        ax.set_title(ds)
        lo = min(m - s for m, s in zip(means, stds, strict=True))
        top = max(m + s for m, s in zip(means, stds, strict=True))
        ax.set_ylim(max(0.0, lo * 0.9), top * 1.08)
        if baseline in res and res[baseline]["recall@10"]["mean"] > 0:
            base = res[baseline]["recall@10"]["mean"]
            for k, (m, s) in enumerate(zip(means, stds, strict=True)):
                ax.text(k, m + s + top * 0.005, f"{m / base:.2f}×", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(out: Path, name: str, results: dict, meta: dict, md: str, plot, seconds: float) -> None:
    """A benchmark's outputs under `out`: <name>.json (results + meta), <name>.md (the tables, also
    printed) and <name>.png (`plot(path)`)."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({**results, "meta": meta}, indent=2) + "\n")
    (out / f"{name}.md").write_text(md)
    plot(out / f"{name}.png")
    print(md)
    log(f"wrote {out / name}.json, {name}.md and {name}.png in {seconds:.0f}s")
