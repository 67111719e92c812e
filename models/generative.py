"""REG4Rec's generative reasoning recommender over the MPQ tokens, and its training and decoding loops.

Model. A causal transformer (the ranker's `Block`s, positions counted back from the most recent item) encodes
the user's history, each item embedded as the layer-normed sum of its M MPQ token embeddings (one table per
expert codebook; an item without tokens uses each table's "missing" row). The user state h is the last
position's output. An *order-agnostic head* predicts the next item's tokens: given h and any set S of
already committed (expert, token) pairs it returns the logits of every expert,

    logits(· | h, S) = Out( z + FF(LN(z)) ),   z = h + sum_{(m, t) in S} C[m, t]

and only the uncommitted experts' rows are used. Training draws commit subsets at random (the empty set
plus `subsets_per_position` uniformly sized random subsets per position) and minimises the cross-entropy
of the uncommitted experts' true tokens, so every decoding order is one the head was trained for.

Constrained decoding (`beam_search`). Only token tuples that name a real catalogue item can be produced:
after the first commit each beam carries the list of catalogue items consistent with its committed tokens
(an inverted index per expert), and an expert's allowed tokens are those of the beam's live candidates.
Scores are the model's log-probabilities (not renormalised over the allowed tokens, so a tuple's score
stays its probability under the head), summed over the steps of a path; beam width `beam` per path.
Items of the user's history are removed from the candidates (the ranker's protocol).

* fixed_order: one path, experts committed in order 0..M-1.
* dynamic paths: M paths; path p commits expert p first, then at every step each beam commits the
  uncommitted expert whose best allowed token is most probable (REG4Rec's confidence-based step order).
  Path scores are aggregated per item as the log of the mean over paths of the path probabilities
  (an item a path did not reach has probability 0 there).
* CORP (consistency-oriented pruning): a path is dropped when it reaches no valid item, or when fewer
  than `corp_min_agreement` of its top-`corp_top_k` items appear in the union of the other paths' top
  sets; the survivors are aggregated as above (when every path of a user would be dropped, all paths
  that reached an item are kept and the fallback is counted).

Items no kept path reached score -inf and rank after every reached item; ties count against the target
(`models.ranker.rank_of_target`, the ranker's Recall/NDCG@5/10/20 with history excluded).

Bad input (see `TokenCatalog`): items without MPQ tokens cannot be generated (counted; as inputs they use
the "missing" embeddings; a target without tokens ranks last); items sharing one tuple (the MPQ
de-duplication leaves a few when no free tuple was near) split the tuple's probability evenly, i.e. each
gets the path score minus log(#items sharing it), and they tie (counted); no MPQ column at all, or a
codebook version that differs between the tables (checked by `models.ranker_data.load_item_features`),
raises DataError.

PARS and MSRA (`align`): see the function's docstring.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.configs import GenerativeConfig  # noqa: F401  (defined there; re-exported)
from models.device import resolve_device
from models.ranker import Block, _autocast, metrics_from_ranks, rank_of_target, seed_everything
from models.ranker_data import CATALOG, DataError, ItemFeatures, Pinned, SequenceStream
from models.training import EarlyStopping

MODEL_VERSION = "reg4rec-generative-v1"
VARIANTS = ("fixed_order", "+dynamic_paths", "+corp", "+pars", "+msra")
INFERENCE_MODES = ("fixed_order", "+dynamic_paths", "+corp")


def version_of(config: GenerativeConfig, pinned: Pinned, codebook_version: str) -> str:
    """12 hex digits over the configuration, the pinned table versions and the codebook version."""
    blob = json.dumps({"model": MODEL_VERSION, "config": config.model_dict(), "tables": pinned.versions,
                       "codebook_version": codebook_version}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


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


# ---------------------------------------------------------------- model


class GenerativeRecommender(nn.Module):
    def __init__(self, cat: TokenCatalog, config: GenerativeConfig):
        super().__init__()
        d, m, k = config.d_model, cat.n_experts, cat.n_tokens
        self.config, self.m, self.k = config, m, k
        self.register_buffer("codes", cat.codes.clone(), persistent=False)
        ok = torch.zeros(m, k, dtype=torch.bool)
        for e, s in enumerate(cat.sizes):
            ok[e, :s] = True
        self.register_buffer("token_ok", ok, persistent=False)
        self.tok_in = nn.ModuleList(nn.Embedding(k + 1, d) for _ in range(m))  # row k = missing / padding
        self.item_norm = nn.LayerNorm(d)
        self.pos = nn.Embedding(config.max_len, d)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(d, config.n_heads, config.dropout) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(d)
        self.commit = nn.Embedding(m * k, d)  # committed (expert, token) pairs
        self.head_ln = nn.LayerNorm(d)
        self.head_ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.out_ln = nn.LayerNorm(d)
        self.out = nn.Linear(d, m * k)
        for emb in [*self.tok_in, self.pos, self.commit]:
            nn.init.normal_(emb.weight, std=0.02)

    def item_table(self) -> torch.Tensor:
        e = self.tok_in[0](self.codes[:, 0])
        for c in range(1, self.m):
            e = e + self.tok_in[c](self.codes[:, c])
        return self.item_norm(e)

    def encode(self, inp: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, L, d] of a left-padded history (0 = pad)."""
        b, length = inp.shape
        rev = torch.arange(length - 1, -1, -1, device=inp.device).clamp(max=self.pos.num_embeddings - 1)
        x = self.drop(self.item_table()[inp] + self.pos(rev)[None])
        i = torch.arange(length, device=inp.device)
        allowed = ((i[None, :] <= i[:, None])[None] & (inp != 0)[:, None, :]) | torch.eye(
            length, dtype=torch.bool, device=inp.device)[None]
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill_(~allowed, float("-inf"))[:, None]
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def state(self, inp: torch.Tensor) -> torch.Tensor:
        return self.encode(inp)[:, -1]

    def head(self, h: torch.Tensor, committed: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [..., M, D] of every expert given the state h [..., d] and the committed pairs ([..., M])."""
        idx = torch.arange(self.m, device=h.device) * self.k + tokens.clamp(max=self.k - 1)
        c = (self.commit(idx) * committed.unsqueeze(-1).to(h.dtype)).sum(-2)
        z = h + c
        z = z + self.head_ff(self.head_ln(z))
        logits = self.out(self.out_ln(z)).view(*h.shape[:-1], self.m, self.k).float()
        return logits.masked_fill(~self.token_ok, float("-inf"))


def random_commits(n: int, m: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """[n, M] bool: a uniformly sized (1..M-1) random subset of experts per row."""
    ranks = torch.rand(n, m, device=device, generator=generator).argsort(1).argsort(1)
    size = torch.randint(1, max(m, 2), (n, 1), device=device, generator=generator)
    return ranks < size


def token_loss(model: GenerativeRecommender, h: torch.Tensor, tokens: torch.Tensor, subsets: int) -> torch.Tensor:
    """Mean cross-entropy of the uncommitted experts' tokens over the empty commit set + random subsets."""
    n, m = tokens.shape
    committed = torch.zeros(n, m, dtype=torch.bool, device=h.device)
    if subsets > 0 and m > 1:
        committed = torch.cat([committed, random_commits(n * subsets, m, h.device)])
        h = h.repeat(subsets + 1, 1)
        tokens = tokens.repeat(subsets + 1, 1)
    logits = model.head(h, committed, tokens)
    ce = F.cross_entropy(logits.reshape(-1, model.k), tokens.reshape(-1), reduction="none").view(-1, m)
    free = ~committed
    return (ce * free).sum() / free.sum().clamp(min=1)


# ---------------------------------------------------------------- constrained beam search


def banned_matrix(history: torch.Tensor, n_items: int) -> torch.Tensor:
    """[B, N+1] bool: items of the user's history (and the padding column)."""
    banned = torch.zeros(history.shape[0], n_items + 1, dtype=torch.bool, device=history.device)
    banned.scatter_(1, history, True)
    banned[:, 0] = True
    return banned


@torch.no_grad()
def beam_search(model: GenerativeRecommender, cat: TokenCatalog, h: torch.Tensor, banned: torch.Tensor,
                first_experts: list[int], dynamic: bool, beam: int,
                order: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Constrained beam search, one path per entry of first_experts.

    Returns (items, scores), both [B, P, K * Cmax]: the catalogue items the final beams name, with their
    path log-probability (minus log of the tuple's item count), -inf where a slot holds no item.
    With dynamic=False every path follows `order` (default 0..M-1 starting from its first expert).
    """
    b, m, k_tok = h.shape[0], cat.n_experts, cat.n_tokens
    p = len(first_experts)
    kb = max(1, beam)
    dev = h.device
    codes = cat.codes
    lp0 = torch.log_softmax(model.head(h, torch.zeros(b, m, dtype=torch.bool, device=dev),
                                       torch.zeros(b, m, dtype=torch.long, device=dev)), -1)  # [B, M, D]
    # Tokens with at least one item outside the user's history.
    bi, ii = banned[:, 1:].nonzero(as_tuple=True)
    ii = ii + 1
    keep = cat.has_tokens[ii]
    bi, ii = bi[keep], ii[keep]
    banned_count = torch.zeros(b, m, k_tok + 1, dtype=torch.long, device=dev)
    for e in range(m):
        banned_count[:, e].index_put_((bi, codes[ii, e]), torch.ones_like(bi), accumulate=True)
    valid0 = (cat.token_count[None] - banned_count[..., :k_tok]) > 0  # [B, M, D]
    first = torch.as_tensor(first_experts, device=dev)
    s0 = torch.where(valid0[:, first], lp0[:, first], float("-inf"))  # [B, P, D]
    logp, tok0 = s0.topk(min(kb, k_tok), dim=-1)  # [B, P, K]
    if kb > k_tok:  # fewer first tokens than beams: the extra beams start dead
        logp = F.pad(logp, (0, kb - k_tok), value=float("-inf"))
        tok0 = F.pad(tok0, (0, kb - k_tok), value=0)
    committed = torch.zeros(b, p, kb, m, dtype=torch.bool, device=dev)
    committed.scatter_(-1, first.view(1, p, 1, 1).expand(b, p, kb, 1), True)
    tokens = torch.zeros(b, p, kb, m, dtype=torch.long, device=dev)
    tokens.scatter_(-1, first.view(1, p, 1, 1).expand(b, p, kb, 1), tok0.unsqueeze(-1))
    cand = cat.buckets[first.view(1, p, 1), tok0]  # [B, P, K, C]
    alive = (cand != 0) & ~banned.gather(1, cand.view(b, -1)).view(cand.shape) & torch.isfinite(logp)[..., None]
    if order is None:
        order = list(range(m))
    hx = h[:, None, None, :].expand(b, p, kb, h.shape[-1])
    for step in range(1, m):
        lp = torch.log_softmax(model.head(hx, committed, tokens), -1)  # [B, P, K, M, D]
        ctok = codes[cand]  # [B, P, K, C, M]
        if dynamic:
            g = lp.gather(-1, ctok.transpose(-1, -2).clamp(max=k_tok - 1))  # [B, P, K, M, C]
            g = g.masked_fill(~alive[..., None, :], float("-inf"))
            best = g.amax(-1).masked_fill(committed, float("-inf"))  # [B, P, K, M]
            chosen = best.argmax(-1)  # [B, P, K]
        else:
            seq = torch.as_tensor([[order[(order.index(f) + step) % m] for f in first_experts]], device=dev)
            chosen = seq[..., None].expand(b, p, kb)
        ctok_m = ctok.gather(-1, chosen[..., None, None].expand(*cand.shape, 1)).squeeze(-1)  # [B, P, K, C]
        allowed = torch.zeros(b * p * kb, k_tok + 1, device=dev)
        allowed.scatter_add_(1, ctok_m.reshape(b * p * kb, -1), alive.reshape(b * p * kb, -1).float())
        allowed = allowed[:, :k_tok].view(b, p, kb, k_tok) > 0
        lp_m = lp.gather(-2, chosen[..., None, None].expand(b, p, kb, 1, k_tok)).squeeze(-2)  # [B, P, K, D]
        ext = (logp[..., None] + lp_m).masked_fill(~allowed, float("-inf")).view(b, p, kb * k_tok)
        logp, flat = ext.topk(kb, dim=-1)  # [B, P, K]
        parent, tok = flat // k_tok, flat % k_tok

        def pick(x: torch.Tensor, parent: torch.Tensor = parent) -> torch.Tensor:
            return x.gather(2, parent.view(b, p, kb, *([1] * (x.dim() - 3))).expand(b, p, kb, *x.shape[3:]))

        chosen_p = pick(chosen)
        committed = pick(committed).scatter(-1, chosen_p[..., None], True)
        tokens = pick(tokens).scatter(-1, chosen_p[..., None], tok[..., None])
        cand = pick(cand)
        alive = pick(alive) & (pick(ctok_m) == tok[..., None]) & torch.isfinite(logp)[..., None]
    share = cat.tuple_count[cand].clamp(min=1).float().log()
    scores = (logp[..., None] - share).masked_fill(~alive, float("-inf"))
    return cand.view(b, p, -1), scores.view(b, p, -1)


def dense_scores(items: torch.Tensor, scores: torch.Tensor, n_items: int) -> torch.Tensor:
    """[B, P, N+1] path scores per item (-inf where a path did not reach it; the best beam when several did)."""
    b, p, _ = items.shape
    out = torch.full((b, p, n_items + 1), float("-inf"), device=items.device)
    out.scatter_reduce_(2, items, scores, reduce="amax", include_self=True)
    out[..., 0] = float("-inf")
    return out


def aggregate(path_scores: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """log of the mean, over the kept paths, of each item's path probability (0 where unreached)."""
    s = path_scores if keep is None else path_scores.masked_fill(~keep[..., None], float("-inf"))
    n = (keep.sum(1) if keep is not None else torch.full(s.shape[:1], s.shape[1], device=s.device)).clamp(min=1)
    return torch.logsumexp(s, dim=1) - n.float().log()[:, None]


def corp_keep(path_scores: torch.Tensor, top_k: int, min_agreement: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep [B, P] bool, agreement [B, P]): drop paths with no valid item or whose top items disagree.

    Agreement of path p = |top_k(p) ∩ ∪_{q≠p} top_k(q)| / |top_k(p)| over the items each path reached.
    When every path of a user fails, all paths that reached an item are kept (a fallback, counted by the
    caller as keep == valid).
    """
    b, p, n = path_scores.shape
    valid = torch.isfinite(path_scores).any(-1)
    k = min(top_k, n)
    vals, idx = path_scores.topk(k, dim=-1)
    top = torch.zeros(b, p, n, dtype=torch.bool, device=path_scores.device)
    top.scatter_(-1, idx, torch.isfinite(vals))
    n_top = top.sum(-1)
    others = (top.sum(1, keepdim=True) - top.long()) > 0
    agreement = (top & others).sum(-1).float() / n_top.clamp(min=1).float()
    keep = valid & (agreement >= min_agreement)
    none = ~keep.any(1, keepdim=True)
    keep = torch.where(none, valid, keep)
    return keep, agreement


def score_modes(model: GenerativeRecommender, cat: TokenCatalog, h: torch.Tensor, banned: torch.Tensor,
                config: GenerativeConfig, modes: tuple[str, ...], timings: dict | None = None,
                counts: dict | None = None) -> dict[str, torch.Tensor]:
    """Dense item scores [B, N+1] per inference mode (fixed_order, +dynamic_paths, +corp)."""
    out: dict[str, torch.Tensor] = {}
    n = cat.n_items
    if "fixed_order" in modes:
        t0 = time.perf_counter()
        items, scores = beam_search(model, cat, h, banned, [0], dynamic=False, beam=config.beam)
        out["fixed_order"] = dense_scores(items, scores, n)[:, 0]
        if timings is not None:
            timings["fixed_order"] = timings.get("fixed_order", 0.0) + time.perf_counter() - t0
    if "+dynamic_paths" in modes or "+corp" in modes:
        t0 = time.perf_counter()
        items, scores = beam_search(model, cat, h, banned, list(range(cat.n_experts)), dynamic=True,
                                    beam=config.beam)
        paths = dense_scores(items, scores, n)
        t_decode = time.perf_counter() - t0
        if "+dynamic_paths" in modes:
            t1 = time.perf_counter()
            out["+dynamic_paths"] = aggregate(paths)
            if timings is not None:
                timings["+dynamic_paths"] = timings.get("+dynamic_paths", 0.0) + t_decode + time.perf_counter() - t1
        if "+corp" in modes:
            t1 = time.perf_counter()
            keep, _ = corp_keep(paths, config.corp_top_k, config.corp_min_agreement)
            out["+corp"] = aggregate(paths, keep)
            if timings is not None:
                timings["+corp"] = timings.get("+corp", 0.0) + t_decode + time.perf_counter() - t1
            if counts is not None:
                valid = torch.isfinite(paths).any(-1)
                counts["paths"] = counts.get("paths", 0) + int(valid.numel())
                counts["paths_without_item"] = counts.get("paths_without_item", 0) + int((~valid).sum())
                counts["paths_pruned"] = counts.get("paths_pruned", 0) + int((valid & ~keep).sum())
    return out


def _chunks(batch_size: int, total: int) -> Iterator[slice]:
    for s in range(0, total, batch_size):
        yield slice(s, min(total, s + batch_size))


@torch.no_grad()
def evaluate(model: GenerativeRecommender, cat: TokenCatalog, stream: SequenceStream, config: GenerativeConfig,
             device: torch.device, modes: tuple[str, ...] = INFERENCE_MODES, max_users: int | None = None,
             on_batch: Callable[[int], None] | None = None) -> dict:
    """Leave-one-out metrics per inference mode: {"metrics": {mode: {...}}, "users", "users_per_second", ...}."""
    model.eval()
    ranks: dict[str, list[torch.Tensor]] = {mode: [] for mode in modes}
    timings: dict[str, float] = {}
    counts: dict[str, int] = {}
    users = no_tokens = 0
    paths = cat.n_experts if any(mo != "fixed_order" for mo in modes) else 1
    per_chunk = max(1, config.beam_rows // (paths * config.beam))
    with _autocast(device, config.amp):
        for batch in stream:
            if max_users is not None and users >= max_users:
                break
            inp, tgt, hist = batch["input"], batch["target"], batch["history"]
            if max_users is not None:
                inp, tgt, hist = inp[: max_users - users], tgt[: max_users - users], hist[: max_users - users]
            inp, tgt, hist = inp.to(device), tgt.to(device), hist.to(device)
            t0 = time.perf_counter()
            h = model.state(inp).float()
            t_enc = time.perf_counter() - t0
            for mode in modes:
                timings[mode] = timings.get(mode, 0.0) + t_enc
            for sl in _chunks(per_chunk, len(tgt)):
                banned = banned_matrix(hist[sl], cat.n_items) if config.exclude_history else banned_matrix(
                    torch.zeros_like(hist[sl]), cat.n_items)
                scores = score_modes(model, cat, h[sl], banned, config, modes, timings, counts)
                for mode, s in scores.items():
                    ranks[mode].append(rank_of_target(s, tgt[sl]).cpu())
            no_tokens += int((~cat.has_tokens[tgt]).sum())
            users += len(tgt)
            if on_batch is not None:
                on_batch(users)
    out = {"metrics": {}, "users": users, "users_per_second": {}, "targets_without_mpq": no_tokens,
           "path_counts": counts}
    for mode in modes:
        r = torch.cat(ranks[mode]) if ranks[mode] else torch.zeros(0)
        out["metrics"][mode] = metrics_from_ranks(r)
        out["users_per_second"][mode] = users / max(timings.get(mode, 0.0), 1e-9)
    return out


# ---------------------------------------------------------------- training


@dataclass
class StageResult:
    best_epoch: int
    epochs: int
    valid: float
    history: list[dict]
    train_seconds: float
    stopped_early: bool = False


def _optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, prm in model.named_parameters():
        (no_decay if prm.ndim < 2 or "norm" in name or "_ln" in name or name.endswith("bias") else decay).append(prm)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def _step(model, opt, loss, scaler):
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(opt)
    scaler.update()


def _select(model, cat, streams, config, device) -> float:
    res = evaluate(model, cat, streams["valid"], config, device, modes=("fixed_order",),
                   max_users=config.select_users or None)
    return res["metrics"]["fixed_order"][config.select_metric]


def train_base(cat: TokenCatalog, streams: dict[str, SequenceStream], config: GenerativeConfig,
               device: torch.device, on_epoch: Callable[[dict], None] | None = None,
               on_step: Callable[[int, int], None] | None = None) -> tuple[GenerativeRecommender, StageResult]:
    """Token cross-entropy over random commit subsets; early stopping on fixed-order validation Recall@10."""
    seed_everything(config.seed)
    model = GenerativeRecommender(cat, config).to(device)
    opt = _optimizer(model, config.lr, config.weight_decay)
    fp16 = device.type == "cuda" and config.amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    train = streams["train"]
    stopper, history, train_time = EarlyStopping(config.patience), [], 0.0
    per_epoch = 0
    stopped = False
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        train.set_epoch(epoch)
        t0 = time.perf_counter()
        total, positions, seqs = 0.0, 0, 0
        for batch in train:
            inp, tgt = batch["input"].to(device), batch["target"].to(device)
            with _autocast(device, config.amp):
                hs = model.encode(inp)
                mask = (tgt != 0) & cat.has_tokens[tgt]
                loss = token_loss(model, hs[mask].float(), cat.codes[tgt[mask]], config.subsets_per_position)
            _step(model, opt, loss, scaler)
            n_pos = int(mask.sum())
            total += float(loss.detach()) * n_pos
            positions += n_pos
            seqs += inp.shape[0]
            if on_step is not None:
                on_step(seqs, per_epoch)
        per_epoch = seqs
        seconds = time.perf_counter() - t0
        train_time += seconds
        score = _select(model, cat, streams, config, device)
        stopper.update(epoch, score, model)
        rec = {"stage": "base", "epoch": epoch, "loss": total / max(positions, 1), "valid": score,
               "best": stopper.best, "best_epoch": stopper.best_epoch, "train_seconds": seconds, "sequences": seqs,
               "max_epochs": config.max_epochs}
        history.append(rec)
        if on_epoch is not None:
            on_epoch(rec)
        if stopper.should_stop:
            stopped = True
            break
    stopper.restore(model)
    return model, StageResult(stopper.best_epoch, len(history), stopper.best, history, train_time, stopped)


# ---------------------------------------------------------------- PARS and MSRA


def user_sequences(pinned: Pinned, feats: ItemFeatures, read_batch_rows: int = 2048) -> Iterator[tuple[str, np.ndarray]]:
    """(user_id, item indices of the whole stored history) per user with a validation target."""
    yield from SequenceStream(pinned, feats, "valid", read_batch_rows=read_batch_rows)._rows()


@dataclass
class Example:
    input: np.ndarray  # items before the target (at most max_len)
    target: int  # a training item
    future: np.ndarray  # the next training items after the target (MSRA); never the validation/test target
    history: np.ndarray  # every item before the target (excluded from the decode)


def alignment_examples(seq: np.ndarray, rng: np.random.Generator, per_user: int, max_len: int,
                       horizon: int) -> list[Example]:
    """Training positions of one user's stored history for PARS / MSRA.

    The last two stored items are the validation and test targets: targets are drawn among positions
    1 .. n-3 and a target's `future` stops before position n-2, so neither held-out item can ever be a
    target, a rewarded future item or (being after every target) an input.
    """
    n = len(seq)
    train_end = n - 2  # seq[:train_end] are the training interactions
    positions = np.arange(1, train_end)
    if len(positions) == 0:
        return []
    chosen = np.sort(rng.choice(positions, size=min(per_user, len(positions)), replace=False))
    out = []
    for t in chosen:
        t = int(t)
        out.append(Example(input=seq[max(0, t - max_len):t], target=int(seq[t]),
                           future=seq[t + 1: min(t + 1 + horizon, train_end)].copy(), history=seq[:t]))
    return out


def load_category_paths(pinned: Pinned, feats: ItemFeatures, batch_size: int = 4096) -> tuple[list, dict]:
    """Per item index, its category path as the catalog states it (bronze.catalog_items, one row per item):
    the source of PARS's catalog credit. No agent is involved, so the credit is named for the catalog."""
    index = feats.index()
    paths: list = [None] * (feats.n_items + 1)
    rows = 0
    for b in pinned.batches(CATALOG, ["item_id", "categories"], batch_size):
        for item, cats in zip(b.column("item_id").to_pylist(), b.column("categories").to_pylist(), strict=True):
            rows += 1
            i = index.get(item)
            path = [str(x).strip() for x in (cats or []) if x is not None and str(x).strip()]
            if i is not None and path:
                paths[i] = path
    with_path = sum(p is not None for p in paths)
    return paths, {"catalog_rows": rows, "items_with_category_path": with_path,
                   "items_without_category_path": feats.n_items - with_path}


def catalog_credit(paths: list, target: int, item: int) -> float:
    """Shared leading levels of the two category paths over the longer path's depth (0 when one is unknown)."""
    a, b = paths[target], paths[item]
    if not a or not b:
        return 0.0
    common = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        common += 1
    return common / max(len(a), len(b))


def item_rewards(cands: np.ndarray, target: int, future: np.ndarray, paths: list, config: GenerativeConfig,
                 msra: bool) -> np.ndarray:
    """Reward of each candidate: 1 for the target; catalog credit for a wrong item by category-path overlap;
    with MSRA, max(that, msra_weight * msra_discount**(k-1)) for the k-th next training interaction."""
    r = np.zeros(len(cands), dtype=np.float32)
    steps = {}
    if msra:
        for k, item in enumerate(future[: config.msra_horizon], 1):
            steps.setdefault(int(item), k)
    for j, c in enumerate(cands):
        c = int(c)
        if c == 0:
            continue
        if c == target:
            r[j] = 1.0
            continue
        r[j] = config.pars_catalog_credit * catalog_credit(paths, target, c)
        if c in steps:
            r[j] = max(r[j], config.msra_weight * config.msra_discount ** (steps[c] - 1))
    return r


def item_logprob(model: GenerativeRecommender, h: torch.Tensor, items: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Path log-probability [B, C] of each item's tuple when the experts are committed in `order` ([B, M])."""
    b, c = items.shape
    m = model.m
    tokens = model.codes[items].clamp(max=model.k - 1)  # [B, C, M]
    pos = order.argsort(1)  # step at which each expert is committed
    steps = torch.arange(m, device=h.device)
    committed = pos[:, None, :] < steps[None, :, None]  # [B, step, M]
    hx = h[:, None, None, :].expand(b, c, m, h.shape[-1])
    logits = model.head(hx, committed[:, None].expand(b, c, m, m), tokens[:, :, None, :].expand(b, c, m, m))
    lp = torch.log_softmax(logits, -1)  # [B, C, step, M, D]
    expert = order[:, None, :, None, None].expand(b, c, m, 1, model.k)
    lp_e = lp.gather(3, expert).squeeze(3)  # [B, C, step, D]
    tok_e = tokens.gather(2, order[:, None, :].expand(b, c, m))  # [B, C, step]
    return lp_e.gather(-1, tok_e[..., None]).squeeze(-1).sum(-1)


def _pad_rows(rows: list[np.ndarray], width: int | None = None, left: bool = True) -> torch.Tensor:
    width = width or max((len(r) for r in rows), default=1) or 1
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        r = r[-width:] if left else r[:width]
        if len(r):
            if left:
                out[i, width - len(r):] = r
            else:
                out[i, : len(r)] = r
    return torch.from_numpy(out)


@torch.no_grad()
def mine_pairs(model: GenerativeRecommender, ref: GenerativeRecommender, cat: TokenCatalog, examples: list[Example],
               paths: list, config: GenerativeConfig, device: torch.device, msra: bool,
               generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Candidates (target, [future], rejected from the current model's fixed-order decode), rewards,
    commit orders and reference log-probs of every example."""
    model.eval()
    n_cand = 1 + (config.msra_horizon if msra else 0) + config.pars_negatives
    all_c, all_r, all_o, all_ref = [], [], [], []
    bs = max(1, config.beam_rows // config.beam)
    for sl in _chunks(bs, len(examples)):
        ex = examples[sl]
        inp = _pad_rows([e.input for e in ex]).to(device)
        hist = _pad_rows([e.history for e in ex], left=False).to(device)
        tgt = torch.as_tensor([e.target for e in ex], device=device)
        with _autocast(device, config.amp):
            h = model.state(inp).float()
            items, scores = beam_search(model, cat, h, banned_matrix(hist, cat.n_items), [0], dynamic=False,
                                        beam=config.beam)
        dense = dense_scores(items, scores, cat.n_items)[:, 0]
        dense.scatter_(1, tgt[:, None], float("-inf"))
        futures = [e.future[: config.msra_horizon] if msra else np.zeros(0, np.int64) for e in ex]
        fut = _pad_rows(futures, width=max(1, config.msra_horizon) if msra else 1, left=False).to(device)
        if msra:
            dense.scatter_(1, fut, float("-inf"))
        vals, neg = dense.topk(config.pars_negatives, dim=1)
        neg = neg.masked_fill(~torch.isfinite(vals), 0)
        parts = [tgt[:, None], neg] if not msra else [tgt[:, None], fut, neg]
        cands = torch.cat(parts, 1)[:, :n_cand]
        cands = cands.masked_fill(~cat.has_tokens[cands], 0)
        rewards = torch.as_tensor(np.stack([
            item_rewards(cands[i].cpu().numpy(), e.target, e.future, paths, config, msra)
            for i, e in enumerate(ex)]), device=device)
        order = torch.rand(len(ex), cat.n_experts, generator=generator).argsort(1).to(device)
        with _autocast(device, config.amp):
            ref_lp = item_logprob(ref, ref.state(inp).float(), cands, order).float()
        all_c.append(cands.cpu()), all_r.append(rewards.cpu()), all_o.append(order.cpu()), all_ref.append(ref_lp.cpu())
    return {"cands": torch.cat(all_c), "rewards": torch.cat(all_r), "order": torch.cat(all_o),
            "ref": torch.cat(all_ref)}


def dpo_loss(policy_lp: torch.Tensor, ref_lp: torch.Tensor, rewards: torch.Tensor, valid: torch.Tensor,
             beta: float, min_margin: float) -> tuple[torch.Tensor, int]:
    """Reward-weighted pairwise DPO over every candidate pair (a, b) with r_a - r_b >= min_margin."""
    delta = beta * (policy_lp - ref_lp)  # [B, C]
    gap = rewards[:, :, None] - rewards[:, None, :]
    pair = (gap >= min_margin) & valid[:, :, None] & valid[:, None, :]
    if not pair.any():
        return policy_lp.sum() * 0.0, 0
    logits = delta[:, :, None] - delta[:, None, :]
    w = gap * pair
    loss = (-F.logsigmoid(logits) * w).sum() / w.sum()
    return loss, int(pair.sum())


def align(model: GenerativeRecommender, cat: TokenCatalog, streams: dict[str, SequenceStream],
          examples: list[Example], paths: list, config: GenerativeConfig, device: torch.device, msra: bool,
          on_epoch: Callable[[dict], None] | None = None) -> tuple[GenerativeRecommender, StageResult]:
    """PARS (and with msra=True, MSRA): a short preference-alignment stage from the base model.

    DPO-style pairwise preference optimisation against a frozen reference copy of the starting model.
    Each epoch the *current* model decodes every alignment example (fixed order, history excluded) and its
    top `pars_negatives` wrong items become the rejected side; the chosen side is the true next training
    item. Rewards: 1 for the target, `pars_catalog_credit` x the shared catalog category-path fraction
    (silver.item_knowledge) for a wrong item; with MSRA the user's next `msra_horizon` training
    interactions after the target join the candidates with reward msra_weight x msra_discount^(k-1).
    Every pair (a, b) with r_a - r_b >= pars_min_margin contributes -log σ(β[(π_a - ref_a) - (π_b - ref_b)])
    weighted by r_a - r_b; an item's log-prob is its path log-prob under one random commit order per example
    (shared by policy and reference, redrawn each epoch: over epochs, an average over orders, which is what
    the dynamic paths decode with). The training cross-entropy on the target (random commit subsets) is
    added with weight pars_sft_weight. Selection: fixed-order validation Recall@10 after each epoch; the
    best epoch (>= 1) is kept.
    """
    examples = [e for e in examples if bool(cat.has_tokens[e.target])]
    ref = copy.deepcopy(model).eval()
    for prm in ref.parameters():
        prm.requires_grad_(False)
    opt = _optimizer(model, config.pars_lr, 0.0)
    fp16 = device.type == "cuda" and config.amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    gen = torch.Generator().manual_seed(config.seed * 7919 + (2 if msra else 1))
    rng = np.random.default_rng([config.seed, 2 if msra else 1])
    best, best_epoch, best_state, history, train_time = -1.0, 0, None, [], 0.0
    for epoch in range(1, config.pars_epochs + 1):
        t0 = time.perf_counter()
        mined = mine_pairs(model, ref, cat, examples, paths, config, device, msra, gen)
        model.train()
        perm = rng.permutation(len(examples))
        total, pairs, steps = 0.0, 0, 0
        for sl in _chunks(config.batch_size, len(perm)):
            idx = perm[sl]
            ex = [examples[i] for i in idx]
            inp = _pad_rows([e.input for e in ex]).to(device)
            cands, rewards = mined["cands"][idx].to(device), mined["rewards"][idx].to(device)
            order, ref_lp = mined["order"][idx].to(device), mined["ref"][idx].to(device)
            with _autocast(device, config.amp):
                h = model.state(inp).float()
                lp = item_logprob(model, h, cands, order).float()
                loss, n_pairs = dpo_loss(lp, ref_lp, rewards, cands != 0, config.pars_beta, config.pars_min_margin)
                tgt = cands[:, 0]
                sft = token_loss(model, h, cat.codes[tgt], config.subsets_per_position)
                loss = loss + config.pars_sft_weight * sft
            _step(model, opt, loss, scaler)
            total += float(loss.detach())
            pairs += n_pairs
            steps += 1
        seconds = time.perf_counter() - t0
        train_time += seconds
        score = _select(model, cat, streams, config, device)
        if score > best:
            best, best_epoch = score, epoch
            best_state = copy.deepcopy(model.state_dict())
        rec = {"stage": "msra" if msra else "pars", "epoch": epoch, "loss": total / max(steps, 1), "pairs": pairs,
               "valid": score, "best": best, "best_epoch": best_epoch, "train_seconds": seconds,
               "examples": len(examples), "max_epochs": config.pars_epochs}
        history.append(rec)
        if on_epoch is not None:
            on_epoch(rec)
    if best_state is not None:
        model.load_state_dict(best_state)
    return model, StageResult(best_epoch, len(history), best, history, train_time)


def make_streams(pinned: Pinned, feats: ItemFeatures, config: GenerativeConfig) -> dict[str, SequenceStream]:
    common = dict(max_len=config.max_len, read_batch_rows=config.read_batch_rows)
    return {
        "train": SequenceStream(pinned, feats, "train", batch_size=config.batch_size, seed=config.seed,
                                buffer_size=config.shuffle_buffer, **common),
        "valid": SequenceStream(pinned, feats, "valid", batch_size=config.eval_batch_size, **common),
        "test": SequenceStream(pinned, feats, "test", batch_size=config.eval_batch_size, **common),
    }


def build_examples(pinned: Pinned, feats: ItemFeatures, config: GenerativeConfig) -> list[Example]:
    rng = np.random.default_rng([config.seed, 99])
    out: list[Example] = []
    for _, seq in user_sequences(pinned, feats, config.read_batch_rows):
        out.extend(alignment_examples(seq, rng, config.pars_examples_per_user, config.max_len, config.msra_horizon))
    return out


def fit_variants(pinned: Pinned, feats: ItemFeatures, cat: TokenCatalog, paths: list, config: GenerativeConfig,
                 variants: tuple[str, ...] = VARIANTS, on_epoch: Callable[[dict], None] | None = None,
                 on_step: Callable[[int, int], None] | None = None, on_eval: Callable[[str, int], None] | None = None,
                 save: Callable[[str, GenerativeRecommender, StageResult], None] | None = None) -> dict:
    """Train the base model once, evaluate its inference modes, then fine-tune +pars / +msra from it.

    Returns {variant: {"test": metrics, "users_per_second", "train_seconds", "valid_select", "best_epoch",
    "epochs", ...}, "_extra": {...}}. fixed_order / +dynamic_paths / +corp share the base model (they differ
    at inference); +pars is PARS from the base, +msra is PARS with MSRA rewards from the base; both are
    decoded with dynamic paths + CORP. train_seconds: the stages that produced the variant's weights,
    validation passes included (base, or base + alignment).
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown generative variants {unknown}; choose from {', '.join(VARIANTS)}")
    device = resolve_device(config.device)
    cat = cat.to(device)
    streams = make_streams(pinned, feats, config)
    seed_everything(config.seed)
    t0 = time.perf_counter()
    base, base_res = train_base(cat, streams, config, device, on_epoch, on_step)
    base_seconds = time.perf_counter() - t0
    if save is not None:
        save("base", base, base_res)
    out: dict = {"_extra": {"device": str(device), "history": list(base_res.history), "path_counts": {}}}
    modes = tuple(v for v in INFERENCE_MODES if v in variants)
    if modes:
        ev = evaluate(base, cat, streams["test"], config, device, modes,
                      on_batch=(lambda n: on_eval("base", n)) if on_eval else None)
        out["_extra"]["path_counts"]["base"] = ev["path_counts"]
        out["_extra"]["test_users"] = ev["users"]
        out["_extra"]["targets_without_mpq"] = ev["targets_without_mpq"]
        for mode in modes:
            out[mode] = {"test": ev["metrics"][mode], "users_per_second": ev["users_per_second"][mode],
                         "train_seconds": base_seconds, "valid_select": base_res.valid,
                         "best_epoch": base_res.best_epoch, "epochs": base_res.epochs}
    aligned = [v for v in ("+pars", "+msra") if v in variants]
    if aligned:
        examples = build_examples(pinned, feats, config)
        out["_extra"]["alignment_examples"] = len(examples)
        for variant in aligned:
            seed_everything(config.seed + (11 if variant == "+msra" else 7))
            t1 = time.perf_counter()
            model, res = align(copy.deepcopy(base), cat, streams, examples, paths, config, device,
                               msra=variant == "+msra", on_epoch=on_epoch)
            seconds = time.perf_counter() - t1
            if save is not None:
                save(variant.lstrip("+"), model, res)
            out["_extra"]["history"].extend(res.history)
            ev = evaluate(model, cat, streams["test"], config, device, ("+corp",),
                          on_batch=(lambda n, v=variant: on_eval(v, n)) if on_eval else None)
            out["_extra"]["path_counts"][variant] = ev["path_counts"]
            out["_extra"]["test_users"] = ev["users"]
            out[variant] = {"test": ev["metrics"]["+corp"], "users_per_second": ev["users_per_second"]["+corp"],
                            "train_seconds": base_seconds + seconds, "valid_select": res.valid,
                            "best_epoch": res.best_epoch, "epochs": res.epochs}
    return out


def finite(x: float) -> float | None:
    return x if isinstance(x, float) and math.isfinite(x) else None
