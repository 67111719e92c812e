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
    """Current catalog items' embeddings as (item_ids sorted, float32 matrix, bad rows) from a pinned
    table version.

    Columnar all the way: each Arrow batch's vectors are flattened straight into numpy, so the driver
    holds the matrix (4 bytes a value: 1.5 GB at a million 384-d items) and the ids, never one Python
    float per value (about 30 bytes each, and a Python loop over every row, as an earlier version did).
    A vector of another length than the most common one, a null one, or one with NaN or inf values is
    returned as a bad row with its reason.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from feature_store import delta

    current = delta.read_arrow("bronze.catalog_items", ctx.root, columns=["item_id"])["item_id"]
    blocks: list[tuple[pa.Array, pa.Array]] = []  # (item ids, vectors) of current items, per batch
    lengths: dict[int, int] = {}
    for batch in delta.arrow_batches("silver.item_embeddings", ctx.root, version=version,
                                     columns=["item_id", "embedding"], batch_size=65_536,
                                     filter=pc.field("embedder") == embedder):
        batch = batch.filter(pc.is_in(batch.column("item_id"), value_set=current))
        if batch.num_rows == 0:
            continue
        vectors = batch.column("embedding")
        for row in pc.value_counts(pc.list_value_length(vectors).drop_null()).to_pylist():
            lengths[row["values"]] = lengths.get(row["values"], 0) + row["counts"]
        blocks.append((batch.column("item_id"), vectors))
    expected = max(lengths, key=lambda d: (lengths[d], d)) if lengths else 0
    ids: list[str] = []
    mats: list[np.ndarray] = []
    bad: list[tuple[str, str]] = []
    for item_ids, vectors in blocks:
        sizes = pc.fill_null(pc.list_value_length(vectors), 0)
        right = pc.equal(sizes, expected).to_numpy(zero_copy_only=False)
        for item_id, size in zip(item_ids.filter(pa.array(~right)).to_pylist(),
                                 sizes.filter(pa.array(~right)).to_pylist(), strict=True):
            bad.append((item_id, f"wrong_dimension: {size} != {expected}"))
        kept = vectors.filter(pa.array(right))
        # A null inside a vector becomes NaN here, and is caught with the non-finite values.
        mat = (pc.list_flatten(kept).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
               .reshape(len(kept), expected))
        finite = np.isfinite(mat).all(axis=1)
        kept_ids = item_ids.filter(pa.array(right)).to_pylist()
        bad += [(i, "non_finite_embedding: NaN or inf values") for i, ok in zip(kept_ids, finite, strict=True)
                if not ok]
        ids += [i for i, ok in zip(kept_ids, finite, strict=True) if ok]
        mats.append(mat[finite])
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
    mat = np.concatenate(mats)[order] if mats else np.zeros((0, expected), np.float32)
    return [ids[i] for i in order], mat, bad
