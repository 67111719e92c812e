"""Semantic-ID bookkeeping that needs no torch: the collision digit and codebook quality metrics.

Kept free of torch so the assignment job and analysts can recompute metrics from the gold table alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def add_collision_digit(codes: np.ndarray, item_ids: Sequence[str]) -> np.ndarray:
    """Append one digit that makes every item's ID unique: 0, 1, 2, ... within each shared L-code prefix.

    Items sharing a prefix are numbered in string order of their item_id, so the same items with the same
    codes always get the same digits, whatever order the rows arrive in. Adding or removing items that share
    a prefix can shift the digits of that prefix's other items; a new codebook version is the boundary.
    """
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be a 2-D array (n x L), got shape {codes.shape}")
    n = codes.shape[0]
    ids = [str(i) for i in item_ids]
    if len(ids) != n:
        raise ValueError(f"{len(ids)} item ids for {n} rows of codes")
    if len(set(ids)) != n:
        # A repeated id would get two different digits depending on row order: not stable.
        raise ValueError(f"item_ids contain {n - len(set(ids))} duplicates; ids must be unique")
    out = np.zeros((n, codes.shape[1] + 1), dtype=np.int32)
    out[:, :-1] = codes
    if n == 0:
        return out
    # Sort by (prefix, item_id); lexsort takes its primary key last.
    id_rank = np.empty(n, dtype=np.int64)
    id_rank[sorted(range(n), key=ids.__getitem__)] = np.arange(n)
    order = np.lexsort((id_rank, *codes.T[::-1]))
    sorted_codes = codes[order]
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = np.any(sorted_codes[1:] != sorted_codes[:-1], axis=1)
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    out[order, -1] = np.arange(n) - group_start
    return out


def usage_stats(codes: np.ndarray, codebook_size: int) -> tuple[float, float]:
    """(utilization, perplexity) of one column of codes: used codes / K and exp(entropy of code usage)."""
    codes = np.asarray(codes).ravel()
    if codes.size == 0:
        return 0.0, 0.0
    counts = np.bincount(codes.astype(np.int64), minlength=codebook_size)
    p = counts[counts > 0] / codes.size
    return float((counts > 0).sum() / codebook_size), float(np.exp(-(p * np.log(p)).sum()))


def shared_row_mask(rows: np.ndarray) -> np.ndarray:
    """True for rows equal to at least one other row."""
    rows = np.asarray(rows)
    if rows.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    _, inverse, counts = np.unique(rows, axis=0, return_inverse=True, return_counts=True)
    return counts[inverse.ravel()] > 1


def codebook_metrics(
    rq_codes: np.ndarray | None = None,
    codebook_size: int | None = None,
    *,
    full_ids: np.ndarray | None = None,
    mpq_tokens: np.ndarray | None = None,
    mpq_codebook_size: int | None = None,
    embeddings: np.ndarray | None = None,
    rq_reconstruction: np.ndarray | None = None,
    mpq_reconstruction: np.ndarray | None = None,
) -> dict:
    """Quality of an assignment, as a flat JSON-ready dict (floats, ints, lists).

    rq_codes: n x L hierarchical codes *before* the collision digit; full_ids: n x (L+1) after it.
    mpq_tokens: n x M, one token per expert. Reconstructions are in the space of `embeddings`.
    Keys only appear for the inputs given.
    """
    out: dict = {}
    if rq_codes is not None:
        rq_codes = np.asarray(rq_codes)
        k = int(codebook_size if codebook_size is not None else rq_codes.max(initial=-1) + 1)
        stats = [usage_stats(rq_codes[:, level], k) for level in range(rq_codes.shape[1])]
        out["rq_n_items"] = int(rq_codes.shape[0])
        out["rq_levels"] = int(rq_codes.shape[1])
        out["rq_codebook_size"] = k
        out["rq_utilization"] = [u for u, _ in stats]
        out["rq_perplexity"] = [p for _, p in stats]
        shared = shared_row_mask(rq_codes)
        out["rq_collision_rate"] = float(shared.mean()) if shared.size else 0.0
        out["rq_items_colliding"] = int(shared.sum())
        out["rq_unique_prefixes"] = int(np.unique(rq_codes, axis=0).shape[0]) if shared.size else 0
    if full_ids is not None:
        full_ids = np.asarray(full_ids)
        shared = shared_row_mask(full_ids)
        out["rq_unique_full_id_share"] = float(1.0 - shared.mean()) if shared.size else 1.0
        out["rq_max_collision_digit"] = int(full_ids[:, -1].max(initial=0))
    if mpq_tokens is not None:
        mpq_tokens = np.asarray(mpq_tokens)
        d = int(mpq_codebook_size if mpq_codebook_size is not None else mpq_tokens.max(initial=-1) + 1)
        stats = [usage_stats(mpq_tokens[:, m], d) for m in range(mpq_tokens.shape[1])]
        shared = shared_row_mask(mpq_tokens)
        out["mpq_experts"] = int(mpq_tokens.shape[1])
        out["mpq_codebook_size"] = d
        out["mpq_utilization"] = [u for u, _ in stats]
        out["mpq_perplexity"] = [p for _, p in stats]
        out["mpq_tuple_unique_share"] = float(1.0 - shared.mean()) if shared.size else 1.0
        out["mpq_items_in_duplicate_tuples"] = int(shared.sum())
        out["mpq_duplicate_tuple_groups"] = (
            int((np.unique(mpq_tokens, axis=0, return_counts=True)[1] > 1).sum()) if shared.size else 0
        )
    if embeddings is not None:
        if rq_reconstruction is not None:
            out["rq_recon_mse"] = mean_squared(embeddings, rq_reconstruction)
        if mpq_reconstruction is not None:
            out["mpq_recon_mse"] = mean_squared(embeddings, mpq_reconstruction)
        out["embedding_mean_sq"] = mean_squared(embeddings)
    return out


# Rows per block of mean_squared: 65,536 x 384 float64 values are 200 MB.
_MSE_ROWS = 65_536


def squared_sum(x: np.ndarray, y: np.ndarray | None = None) -> float:
    """Sum of (x - y)^2 (or of x^2) in float64, block by block of rows."""
    total = 0.0
    for s in range(0, len(x), _MSE_ROWS):
        d = np.asarray(x[s : s + _MSE_ROWS], dtype=np.float64)
        if y is not None:
            d = d - np.asarray(y[s : s + _MSE_ROWS], dtype=np.float64)
        total += float(np.einsum("ij,ij->", d, d))
    return total


def mean_squared(x: np.ndarray, y: np.ndarray | None = None) -> float:
    """mean((x - y)^2), or mean(x^2), accumulated in float64 over blocks of rows.

    A whole float64 copy of a float32 matrix is twice its size, and the difference another: at a million
    384-d items, 9 GB for what is one number.
    """
    x = np.asarray(x)
    return squared_sum(x, y) / x.size if x.size else float("nan")
