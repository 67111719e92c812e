"""Where the quantizers' codebooks live, which version is current, and the embeddings they are trained on
and assign from: shared by train_quantizer, assign_semantic_ids and the stages that read semantic IDs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jobs.context import RunContext

# Rows per Arrow batch read from silver.item_embeddings: 65,536 x 384 float32 values are 100 MB.
BATCH_ROWS = 65_536


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

    Columnar and in one pass: each Arrow batch's vectors are copied straight into numpy as it is read
    and the batch let go, so the driver holds the matrix (4 bytes a value: 1.5 GB at a million 384-d
    items) and the ids once, never one Python float per value (about 30 bytes each, as an earlier version
    did) nor every Arrow batch beside the matrix (the version before this one: twice the matrix, and
    Arrow's allocator kept the freed batches: 3.8 GB of RSS after loading a million). The sorted matrix
    is filled block by block while the blocks are freed, so sorting adds one block, not a copy. A vector of another length than the most common one, a null one, or one with NaN or inf values
    is returned as a bad row with its reason.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from feature_store import delta

    current = delta.read_arrow("bronze.catalog_items", ctx.root, columns=["item_id"])["item_id"]
    blocks: list[tuple[int, list[str], np.ndarray]] = []  # (vector length, item ids, ids x length float32)
    lengths: dict[int, int] = {}
    for batch in delta.arrow_batches("silver.item_embeddings", ctx.root, version=version,
                                     columns=["item_id", "embedding"], batch_size=BATCH_ROWS,
                                     filter=pc.field("embedder") == embedder, readahead=False):
        batch = batch.filter(pc.is_in(batch.column("item_id"), value_set=current))
        if batch.num_rows == 0:
            continue
        # A null vector is size -1 here: no vote for the common length, reported as a wrong dimension (0).
        vectors = batch.column("embedding")
        sizes = pc.if_else(pc.is_null(vectors), -1, pc.list_value_length(vectors))
        distinct = pc.unique(sizes).to_pylist()
        for size in distinct:
            rows = batch if len(distinct) == 1 else batch.filter(pc.equal(sizes, size))
            if size == -1:
                blocks.append((size, rows.column("item_id").to_pylist(), None))
                continue
            # A null inside a vector becomes NaN here, and is caught with the non-finite values. Copied
            # out of Arrow: a view would keep Arrow's buffers, which its allocator holds on to once freed.
            mat = np.array(pc.list_flatten(rows.column("embedding")).to_numpy(zero_copy_only=False),
                           dtype=np.float32).reshape(rows.num_rows, size)
            blocks.append((size, rows.column("item_id").to_pylist(), mat))
            lengths[size] = lengths.get(size, 0) + rows.num_rows
        batch = rows = mat = vectors = None
    pa.default_memory_pool().release_unused()  # the batches' memory back to the system, not kept for reuse
    expected = max(lengths, key=lambda d: (lengths[d], d)) if lengths else 0
    ids: list[str] = []
    bad: list[tuple[str, str]] = []
    kept: list[np.ndarray] = []
    while blocks:
        size, item_ids, mat = blocks.pop(0)
        if size != expected:
            bad += [(i, f"wrong_dimension: {max(size, 0)} != {expected}") for i in item_ids]
            continue
        finite = np.isfinite(mat).all(axis=1)
        bad += [(i, "non_finite_embedding: NaN or inf values") for i, ok in zip(item_ids, finite, strict=True)
                if not ok]
        ids += [i for i, ok in zip(item_ids, finite, strict=True) if ok]
        kept.append(mat if finite.all() else mat[finite])
        mat = None
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
    rank = np.empty(len(ids), dtype=np.int64)
    rank[order] = np.arange(len(ids))
    out = np.empty((len(ids), expected), dtype=np.float32)
    start = 0
    while kept:
        mat = kept.pop(0)
        out[rank[start : start + len(mat)]] = mat
        start += len(mat)
        mat = None  # freed here: the output's pages fill as the blocks' are released
    return [ids[i] for i in order], out, bad
