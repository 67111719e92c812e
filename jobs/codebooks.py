"""Where the quantizers' codebooks live, which version is current, and the embeddings they are trained on
and assign from: shared by train_quantizer, assign_semantic_ids and the stages that read semantic IDs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jobs.context import RunContext


def current_version(ctx: RunContext) -> str:
    pinned = ctx.config["quantizer"]["codebook_version"]
    if pinned:
        return pinned
    latest = Path(ctx.artifacts) / "quantizers" / "LATEST"
    if not latest.exists():
        raise RuntimeError(f"no trained quantizer under {latest.parent}: run train_quantizer first")
    return latest.read_text().strip()


def checkpoint_dir(ctx: RunContext, version: str) -> Path:
    return Path(ctx.artifacts) / "quantizers" / version


def load_embeddings(ctx: RunContext, embedder: str, version: int | None = None):
    """Current catalog items' embeddings as (item_ids, matrix, bad rows) from a pinned table version."""
    import pyarrow.compute as pc

    from feature_store import delta

    emb = delta.read_arrow("silver.item_embeddings", ctx.root, version=version,
                           columns=["item_id", "embedder", "embedding", "dim"],
                           filter=pc.field("embedder") == embedder)
    current = set(delta.read_arrow("bronze.catalog_items", ctx.root, columns=["item_id"])["item_id"].to_pylist())
    ids, vecs, bad = [], [], []
    dims = [len(v) for v in emb["embedding"].to_pylist() if v is not None]
    expected = max(set(dims), key=dims.count) if dims else 0
    for item_id, vec in zip(emb["item_id"].to_pylist(), emb["embedding"].to_pylist(), strict=True):
        if item_id not in current:
            continue
        if vec is None or len(vec) != expected:
            bad.append((item_id, f"wrong_dimension: {0 if vec is None else len(vec)} != {expected}"))
            continue
        arr = np.asarray(vec, dtype=np.float32)
        if not np.isfinite(arr).all():
            bad.append((item_id, "non_finite_embedding: NaN or inf values"))
            continue
        ids.append(item_id)
        vecs.append(arr)
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
    ids = [ids[i] for i in order]
    mat = np.stack([vecs[i] for i in order]) if vecs else np.zeros((0, expected), np.float32)
    return ids, mat, bad
