"""Constrained beam search over the catalogue (fixed order, dynamic paths, CORP) and evaluation."""


from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from models.configs import GenerativeConfig  # noqa: F401  (defined there; re-exported)
from models.generative.catalog import TokenCatalog
from models.generative.model import INFERENCE_MODES, GenerativeRecommender
from models.ranker import _autocast, metrics_from_ranks, rank_of_target
from models.ranker_data import SequenceStream

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
