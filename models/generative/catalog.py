"""The token catalogue: each item's MPQ tuple, the inverted index constrained decoding walks, the items
without tokens or sharing one tuple (counted)."""


from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from models.configs import GenerativeConfig  # noqa: F401  (defined there; re-exported)
from models.ranker_data import DataError, ItemFeatures

# ---------------------------------------------------------------- the token catalogue


@dataclass
class TokenCatalog:
    """MPQ tuples of the item vocabulary (row i = item index i, row 0 padding) and their inverted index."""

    codes: torch.Tensor  # long [N+1, M]; D = "missing"
    has_tokens: torch.Tensor  # bool [N+1]
    sizes: list[int]  # real tokens per expert
    buckets: torch.Tensor  # long [M, D, Cmax]: items holding token t of expert m (0 = pad)
    tuple_count: torch.Tensor  # long [N+1]: items sharing this item's tuple (0 without tokens)
    token_count: torch.Tensor  # long [M, D]: items holding each token
    stats: dict = field(default_factory=dict)

    @property
    def n_experts(self) -> int:
        return int(self.codes.shape[1])

    @property
    def n_tokens(self) -> int:
        return int(max(self.sizes))

    @property
    def n_items(self) -> int:
        return int(self.codes.shape[0] - 1)

    def to(self, device) -> TokenCatalog:
        return TokenCatalog(self.codes.to(device), self.has_tokens.to(device), self.sizes, self.buckets.to(device),
                            self.tuple_count.to(device), self.token_count.to(device), self.stats)


def build_catalog(feats: ItemFeatures) -> TokenCatalog:
    cols = [c for c, name in enumerate(feats.sid_columns) if name.startswith("mpq_")]
    if not cols:
        raise DataError(f"gold.item_semantic_ids has no MPQ tokens under codebook version {feats.codebook_version!r}: "
                        "train the quantizer with MPQ experts (quantizer.mpq_experts > 0)")
    raw = feats.sid_codes[:, cols]
    missing_code = np.asarray([feats.sid_sizes[c] - 1 for c in cols])
    sizes = [int(s) for s in missing_code]
    d = max(sizes)
    has = (raw != missing_code[None, :]).all(axis=1)
    partial = int(((raw != missing_code[None, :]).any(axis=1) & ~has)[1:].sum())
    has[0] = False
    codes = np.where(has[:, None], raw, d).astype(np.int64)
    if not has.any():
        raise DataError(f"no item has MPQ tokens under codebook version {feats.codebook_version!r}")
    m = codes.shape[1]
    rows = np.flatnonzero(has)
    token_count = np.zeros((m, d), dtype=np.int64)
    for e in range(m):
        token_count[e] = np.bincount(codes[rows, e], minlength=d)[:d]
    cmax = int(token_count.max())
    buckets = np.zeros((m, d, cmax), dtype=np.int64)
    for e in range(m):
        order = rows[np.argsort(codes[rows, e], kind="stable")]
        toks = codes[order, e]
        starts = np.concatenate([[0], np.cumsum(token_count[e])[:-1]])
        slot = np.arange(len(order)) - starts[toks]
        buckets[e, toks, slot] = order
    _, inverse, counts = np.unique(codes[rows], axis=0, return_inverse=True, return_counts=True)
    tuple_count = np.zeros(len(codes), dtype=np.int64)
    tuple_count[rows] = counts[inverse.ravel()]
    stats = {
        "mpq_experts": m, "mpq_codebook_sizes": sizes, "items_with_mpq": int(has.sum()),
        "items_without_mpq": int(len(has) - 1 - has.sum()), "items_with_partial_mpq": partial,
        "items_sharing_a_tuple": int((tuple_count > 1).sum()), "shared_tuples": int((counts > 1).sum()),
        "max_items_per_token": cmax,
        "shared_tuple_rule": "a shared tuple's probability is split evenly among its items (they tie)",
    }
    return TokenCatalog(torch.from_numpy(codes), torch.from_numpy(has), sizes, torch.from_numpy(buckets),
                        torch.from_numpy(tuple_count), torch.from_numpy(token_count), stats)
