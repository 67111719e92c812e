"""PARS and MSRA: preference alignment of the base model against a frozen reference copy (DPO-style)."""


from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models.configs import GenerativeConfig  # noqa: F401  (defined there; re-exported)
from models.generative.catalog import TokenCatalog
from models.generative.decode import _chunks, banned_matrix, beam_search, dense_scores
from models.generative.model import GenerativeRecommender, token_loss
from models.generative.optim import StageResult, _optimizer, _select
from models.ranker import _autocast
from models.ranker_data import CATALOG, ItemFeatures, Pinned, SequenceStream, newest_knowledge, normalize_text
from models.training import optimizer_step

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


@dataclass(frozen=True)
class ItemKind:
    """What the knowledge says an item is: its product type and the product types it goes with."""

    product_type: str
    complements: frozenset[str]


def load_item_kinds(pinned: Pinned, feats: ItemFeatures, batch_size: int = 4096) -> tuple[list, dict]:
    """Per item index, its ItemKind from its newest `ok` silver.item_knowledge row that has a product type
    not marked as a catalog fact (`field_source`), older rows standing in where the newest has none; None
    where no row has one. The source of PARS's knowledge credit. The row's writer may be a language
    model or the offline heuristic (whose product types are parsed from the catalog's fields), so the
    statistics say which wrote them (`product_type_sources`) and how concentrated the types are: a type
    most items share gives most wrong items the same credit."""
    index = feats.index()

    def usable(row: dict) -> bool:
        source = dict(row["field_source"] or [])
        return source.get("product_type", row["model"]) != "catalog" and normalize_text(row["product_type"]) is not None

    newest, rows = newest_knowledge(pinned, index, ["product_type", "complements", "field_source", "model"],
                                    batch_size, usable=usable)
    kinds: list = [None] * (feats.n_items + 1)
    models: dict[str, int] = {}
    types: dict[str, int] = {}
    for i, row in newest.items():
        source = dict(row["field_source"] or [])
        complements = frozenset(c for x in (row["complements"] or []) if (c := normalize_text(x))) \
            if source.get("complements", row["model"]) != "catalog" else frozenset()
        kinds[i] = ItemKind(normalize_text(row["product_type"]), complements)
        models[row["model"]] = models.get(row["model"], 0) + 1
        types[kinds[i].product_type] = types.get(kinds[i].product_type, 0) + 1
    top = max(types.items(), key=lambda kv: (kv[1], kv[0]), default=(None, 0))
    return kinds, {"knowledge_rows": rows, "items_with_product_type": len(newest),
                   "items_without_product_type": feats.n_items - len(newest),
                   "product_types": len(types), "most_common_product_type": top[0],
                   "most_common_product_type_share": round(top[1] / len(newest), 4) if newest else None,
                   "product_type_sources": dict(sorted(models.items()))}


def knowledge_credit(kinds: list, target: int, item: int) -> float:
    """1 when the knowledge gives both items the same product type, 0.5 when the item's type is one the
    target's complements name, else 0 (also when either has no knowledge)."""
    a, b = kinds[target], kinds[item]
    if a is None or b is None:
        return 0.0
    if a.product_type == b.product_type:
        return 1.0
    return 0.5 if b.product_type in a.complements else 0.0


@dataclass
class Credit:
    """Where a wrong item's partial reward comes from: the catalog's category paths (per item index,
    load_category_paths), and, for +pars_knowledge, the knowledge's item kinds (load_item_kinds; None:
    catalog credit only)."""

    paths: list
    kinds: list | None = None


def item_rewards(cands: np.ndarray, target: int, future: np.ndarray, credit: Credit, config: GenerativeConfig,
                 msra: bool) -> np.ndarray:
    """Reward of each candidate: 1 for the target; for a wrong item, catalog credit by category-path overlap
    and, when `credit.kinds` is given, knowledge credit by product type, the larger of the two (each weighted;
    both < 1, so the target stays first); with MSRA, max(that, msra_weight * msra_discount**(k-1)) for the
    k-th next training interaction."""
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
        r[j] = config.pars_catalog_credit * catalog_credit(credit.paths, target, c)
        if credit.kinds is not None:
            r[j] = max(r[j], config.pars_knowledge_credit * knowledge_credit(credit.kinds, target, c))
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
               credit: Credit, config: GenerativeConfig, device: torch.device, msra: bool,
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
            item_rewards(cands[i].cpu().numpy(), e.target, e.future, credit, config, msra)
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
          examples: list[Example], credit: Credit, config: GenerativeConfig, device: torch.device, msra: bool,
          on_epoch: Callable[[dict], None] | None = None, stage: str | None = None,
          ) -> tuple[GenerativeRecommender, StageResult]:
    """PARS (and with msra=True, MSRA): a short preference-alignment stage from the base model.

    DPO-style pairwise preference optimisation against a frozen reference copy of the starting model.
    Each epoch the *current* model decodes every alignment example (fixed order, history excluded) and its
    top `pars_negatives` wrong items become the rejected side; the chosen side is the true next training
    item. Rewards: 1 for the target, `pars_catalog_credit` x the shared catalog category-path fraction
    (bronze.catalog_items) for a wrong item, or, where `credit.kinds` is given and it is larger,
    `pars_knowledge_credit` x the knowledge credit (same product type 1, a type the target's complements
    name 0.5); with MSRA the user's next `msra_horizon` training
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
        mined = mine_pairs(model, ref, cat, examples, credit, config, device, msra, gen)
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
            optimizer_step(model, opt, loss, scaler)
            total += float(loss.detach())
            pairs += n_pairs
            steps += 1
        seconds = time.perf_counter() - t0
        train_time += seconds
        score = _select(model, cat, streams, config, device)
        if score > best:
            best, best_epoch = score, epoch
            best_state = copy.deepcopy(model.state_dict())
        rec = {"stage": stage or ("msra" if msra else "pars"), "epoch": epoch, "loss": total / max(steps, 1), "pairs": pairs,
               "valid": score, "best": best, "best_epoch": best_epoch, "train_seconds": seconds,
               "examples": len(examples), "max_epochs": config.pars_epochs}
        history.append(rec)
        if on_epoch is not None:
            on_epoch(rec)
    if best_state is not None:
        model.load_state_dict(best_state)
    return model, StageResult(best_epoch, len(history), best, history, train_time)
