"""Masked discrete diffusion over semantic-token sequences (LLaDA-style) for beyond-log inference.

A user's history is a sequence of items; every item is its group of G semantic tokens (the RQ codes plus
the collision digit, so a full group names exactly one item). The model is a bidirectional transformer
with one position per item: a position's input is the sum of its G token embeddings, where a masked token
uses its level's [MASK] embedding, and G output heads predict each level's token. Grouping tokens by item
keeps sequences G times shorter than a flat token layout (the attention cost is what bounds CPU
training) while every token is still masked and recovered on its own.

Training (forward process): per sequence draw t ~ U(eps, 1) and mask each token independently with
probability t; the loss is the cross-entropy on masked tokens weighted by 1/t and divided by the number
of tokens, LLaDA's bound on the negative log-likelihood. Half of the sequences have only their last k
items noised ("suffix" masking, LLaDA's SFT recipe), because inference
asks exactly that: what comes after a history. (`crop_prob` can also cut sequences at a random end first;
it lowered the next-item hit rate on both benchmark datasets, so it is off by default.) Callers pass training prefixes only; the job and the
benchmark drop validation and test targets before this module sees a sequence.

Positions count back from a sequence's last item, so the slots appended at inference sit where the
noised suffixes sat in training whatever the history's length; histories are cut to the last
`max_len - slots` items so every position was trained.

Inference (reverse process): append `slots` fully masked items after the history, then for
`slots * G / tokens_per_step` steps predict every masked token, commit the `tokens_per_step` most
confident ones and remask the rest (low-confidence remasking). Decoded groups map back to items through
the semantic-ID table; groups that name no item, or an item already in the history, are skipped and
counted. The top-N list is the decoded items first, in slot order (the next item first), then the
remaining catalog ranked by the all-masked pass's factorised first-slot log-likelihood
sum_g log p_g(code_g(item)) (`fill: any_slot` takes the logsumexp over slots instead: it measured lower
on MovieLens), so every user gets N items even when fewer slots decode to a valid, unseen item. Scores are log-likelihoods: of
the committed tokens for decoded items, of the factorised marginal for the rest; the list order is the
rank (equal scores: the lower item index first).

Ranking the rest does not score every item for every user (users x items: ~30 hours at a million of
each on two cores, and a [batch, slots, items] tensor of 3 GB per batch). The first-slot score is a sum
over levels, so the items under a two-token prefix score at most that prefix's two log-probs plus the
best log-prob of each later level: `top_items` scores the items of the best-bounded prefixes, takes the
N-th best score found as a threshold, and scores only the prefixes whose bound reaches it. The lists
are exactly those of scoring every item (tests compare them, and `exhaustive=True` still does that);
how many items were scored is counted per user.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from models.configs import DiffusionConfig  # noqa: F401  (defined there; re-exported)
from models.device import resolve_device

MODEL_FAMILY = "masked-diffusion-v2"  # bump when a change makes old checkpoints unloadable or different
MIN_STEPS_PER_EPOCH = 30


@dataclass
class SemanticVocab:
    """Items <-> token groups of one codebook version. Group lengths must agree; codes are >= 0."""

    item_ids: list[str]
    codes: np.ndarray                     # [n_items, G] int64
    level_sizes: list[int] = field(default_factory=list)
    _index: dict[str, int] = field(default_factory=dict, repr=False)
    _by_group: dict[tuple, int] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, item_ids: Sequence[str], codes: Sequence[Sequence[int]]) -> SemanticVocab:
        if len(item_ids) != len(codes):
            raise ValueError("item_ids and codes differ in length")
        if not item_ids:
            raise ValueError("no items with semantic IDs: run assign_semantic_ids first")
        lengths = {len(c) for c in codes}
        if len(lengths) != 1:
            raise ValueError(f"semantic IDs of different lengths {sorted(lengths)}: mixed codebook versions?")
        arr = np.asarray(codes, dtype=np.int64)
        if (arr < 0).any():
            raise ValueError("negative semantic code")
        vocab = cls(list(item_ids), arr, [int(arr[:, g].max()) + 1 for g in range(arr.shape[1])])
        vocab._index = {it: i for i, it in enumerate(vocab.item_ids)}
        vocab._by_group = {}
        for i, row in enumerate(arr):
            # several items on one group would make decoding ambiguous: keep the first, count the rest
            vocab._by_group.setdefault(tuple(int(x) for x in row), i)
        return vocab

    @property
    def groups(self) -> int:
        return int(self.codes.shape[1])

    @property
    def ambiguous_groups(self) -> int:
        return len(self.item_ids) - len(self._by_group)

    def index(self, item_id: str) -> int | None:
        return self._index.get(item_id)

    def item_for(self, group: Sequence[int]) -> int | None:
        return self._by_group.get(tuple(int(x) for x in group))

    def encode(self, items: Sequence[str]) -> tuple[list[int], int]:
        """Item indices of a history, skipping items without a semantic ID; returns (indices, skipped)."""
        out = [self._index[i] for i in items if i in self._index]
        return out, len(items) - len(out)


class MaskedDiffusionLM(nn.Module):
    def __init__(self, level_sizes: Sequence[int], config: DiffusionConfig):
        super().__init__()
        self.level_sizes = list(level_sizes)
        self.config = config
        d = config.d_model
        # index size_g is level g's [MASK]; padding positions are excluded by the attention mask
        self.tok = nn.ModuleList(nn.Embedding(n + 1, d) for n in self.level_sizes)
        self.pos = nn.Embedding(config.max_len, d)
        layer = nn.TransformerEncoderLayer(d, config.n_heads, 4 * d, config.dropout, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, config.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.heads = nn.ModuleList(nn.Linear(d, n) for n in self.level_sizes)

    @property
    def mask_ids(self) -> list[int]:
        return list(self.level_sizes)

    def forward(self, tokens: torch.Tensor, pad: torch.Tensor, at: torch.Tensor | None = None) -> list[torch.Tensor]:
        """tokens [B, T, G] (mask id = level size), pad [B, T] True where no item -> G logits [B, T, V_g].

        With `at` [B, S] (positions), logits only there ([B, S, V_g]): inference needs the slots only.
        """
        b, t, g = tokens.shape
        # positions count back from each sequence's last item: the slots after a history always sit
        # where training's noised suffixes sat, whatever the history's length
        lengths = (~pad).sum(1, keepdim=True)
        pos = (lengths - 1 - torch.arange(t, device=tokens.device).view(1, t)).clamp(min=0)
        h = self.pos(pos)
        for level in range(g):
            h = h + self.tok[level](tokens[..., level])
        h = self.encoder(h, src_key_padding_mask=pad)
        if at is not None:
            h = h[torch.arange(b, device=h.device).view(b, 1), at]
        h = self.norm(h)
        return [head(h) for head in self.heads]


def mask_tokens(tokens: torch.Tensor, pad: torch.Tensor, lengths: torch.Tensor, mask_ids: Sequence[int],
                generator: torch.Generator, suffix_prob: float, min_t: float, max_suffix: int):
    """Forward process. Returns (noised tokens, mask [B,T,G] bool, t [B]).

    Each sequence draws t ~ U(min_t, 1); tokens are masked independently with probability t. With
    probability suffix_prob a sequence is noised only on its last k items (k uniform in 1..max_suffix,
    at most length-1 so some history stays visible). Padding is never masked. At least one real token
    per sequence is masked so every sequence contributes to the loss.
    """
    b, t, g = tokens.shape
    dev = tokens.device
    tt = min_t + (1 - min_t) * torch.rand(b, generator=generator, device=dev)
    m = torch.rand(b, t, g, generator=generator, device=dev) < tt.view(b, 1, 1)
    pos = torch.arange(t, device=dev).view(1, t)
    suffix = torch.rand(b, generator=generator, device=dev) < suffix_prob
    kmax = torch.clamp(torch.minimum(lengths - 1, torch.full_like(lengths, max_suffix)), min=1)
    k = 1 + (torch.rand(b, generator=generator, device=dev) * kmax).long()
    in_suffix = pos >= (lengths - k).view(b, 1)
    allowed = (~pad) & torch.where(suffix.view(b, 1), in_suffix, torch.ones_like(in_suffix))
    m = m & allowed.unsqueeze(-1)
    # guarantee one masked token: the first level of the last real item, when nothing else is masked
    none = ~m.flatten(1).any(1)
    if none.any():
        last = (lengths - 1).clamp(min=0)
        m[none, last[none], torch.randint(0, g, (int(none.sum()),), generator=generator, device=dev)] = True
    ids = torch.tensor(mask_ids, device=dev).view(1, 1, g).expand(b, t, g)
    return torch.where(m, ids, tokens), m, tt


def diffusion_loss(logits: list[torch.Tensor], targets: torch.Tensor, mask: torch.Tensor, t: torch.Tensor,
                   n_tokens: torch.Tensor) -> torch.Tensor:
    """LLaDA's objective: sum over masked tokens of CE / t, divided by each sequence's token count."""
    per_seq = torch.zeros(targets.shape[0], device=targets.device)
    for level, lg in enumerate(logits):
        ce = F.cross_entropy(lg.transpose(1, 2), targets[..., level], reduction="none")  # [B, T]
        per_seq = per_seq + (ce * mask[..., level]).sum(1)
    return (per_seq / t / n_tokens.clamp(min=1)).mean()


def _batch(vocab: SemanticVocab, seqs: Sequence[Sequence[int]], max_len: int, extra: int, device):
    """Right-aligned to the left: items at positions 0..len-1, `extra` slots after, padding beyond."""
    seqs = [s[-max_len:] for s in seqs]
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    width = int(lengths.max()) + extra if len(seqs) else extra
    g = vocab.groups
    tokens = torch.zeros(len(seqs), width, g, dtype=torch.long)
    pad = torch.ones(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        if s:
            tokens[i, : len(s)] = torch.from_numpy(vocab.codes[np.asarray(s)])
        pad[i, : len(s) + extra] = False
    return tokens.to(device), pad.to(device), lengths.to(device)


@dataclass
class TrainStats:
    sequences: int
    epochs: int
    steps: int
    seconds: float
    first_loss: float
    last_loss: float
    losses: list[float]


def epochs_within(config: DiffusionConfig, steps_per_epoch: int) -> int:
    """`config.epochs`, or fewer whole epochs (at least one) when they would pass `config.max_steps`."""
    if config.max_steps is None or steps_per_epoch * config.epochs <= config.max_steps:
        return config.epochs
    return max(1, math.ceil(config.max_steps / steps_per_epoch))


def train(vocab: SemanticVocab, sequences: Sequence[Sequence[int]], config: DiffusionConfig,
          progress: Callable[[str], None] | None = None) -> tuple[MaskedDiffusionLM, TrainStats]:
    """Train on item-index sequences (training prefixes only; each needs at least 2 items)."""
    if config.max_len <= config.slots:
        raise ValueError(f"max_len={config.max_len} must exceed slots={config.slots}")
    seqs = [list(s)[-config.max_len:] for s in sequences if len(s) >= 2]
    if not seqs:
        raise ValueError("no training sequence with at least 2 items with semantic IDs")
    device = resolve_device(config.device)
    if config.threads and device.type == "cpu":
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    gen = torch.Generator(device=device).manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = MaskedDiffusionLM(vocab.level_sizes, config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    # small catalogs of long histories (MovieLens: 943 users) would get a handful of steps per epoch
    batch_size = max(16, min(config.batch_size, math.ceil(len(seqs) / MIN_STEPS_PER_EPOCH)))
    steps_per_epoch = math.ceil(len(seqs) / batch_size)
    epochs = epochs_within(config, steps_per_epoch)
    # OneCycleLR divides by its warm-up length (pct_start * total - 1): a tiny catalog (a few steps in all)
    # needs at least two warm-up steps, or the first step divides by zero.
    total_steps = max(4, steps_per_epoch * epochs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=total_steps,
                                                pct_start=max(0.1, 2 / total_steps))
    use_amp = device.type == "cuda"
    # sort by length inside shuffled chunks so padding stays small without a fixed batch order
    lengths = np.array([len(s) for s in seqs])
    start = time.perf_counter()
    losses, step = [], 0
    model.train()
    for epoch in range(epochs):
        order = rng.permutation(len(seqs))
        chunks = [order[i: i + batch_size * 16] for i in range(0, len(order), batch_size * 16)]
        batches = []
        for c in chunks:
            c = c[np.argsort(lengths[c], kind="stable")]
            batches += [c[i: i + batch_size] for i in range(0, len(c), batch_size)]
        rng.shuffle(batches)
        total, count = 0.0, 0
        for idx in batches:
            batch = []
            for i in idx:
                s = seqs[i]
                if len(s) > 2 and rng.random() < config.crop_prob:
                    s = s[: int(rng.integers(2, len(s) + 1))]
                batch.append(s)
            tokens, pad, lens = _batch(vocab, batch, config.max_len, 0, device)
            noised, m, tt = mask_tokens(tokens, pad, lens, model.mask_ids, gen, config.suffix_prob,
                                        config.min_mask_t, config.slots)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = model(noised, pad)
            loss = diffusion_loss([lg.float() for lg in logits], tokens, m, tt, lens * vocab.groups)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            total += loss.item() * len(idx)
            count += len(idx)
        losses.append(total / count)
        if progress:
            el = time.perf_counter() - start
            eta = el / (epoch + 1) * (epochs - epoch - 1)
            progress(f"diffusion training: epoch {epoch + 1}/{epochs} loss {losses[-1]:.3f} "
                     f"{len(seqs) * (epoch + 1) / el:.0f} seq/s ETA {eta:.0f}s")
    model.eval()
    return model, TrainStats(len(seqs), epochs, step, time.perf_counter() - start,
                             losses[0], losses[-1], losses)


@torch.no_grad()
def unmask(model: MaskedDiffusionLM, tokens: torch.Tensor, pad: torch.Tensor, lengths: torch.Tensor,
           slots: int, tokens_per_step: int = 1):
    """Reverse process on `slots` masked items after each history (tokens [B, T+slots, G]).

    Returns (decoded [B, slots, G], confidence [B, slots, G], order [B, slots*G] flat slot-token
    indices in commit order, first-pass (all slots masked) log-probs per level [B, slots, V_g]).
    """
    b, _, g = tokens.shape
    dev = tokens.device
    mask_ids = torch.tensor(model.mask_ids, device=dev)
    slot_pos = lengths.view(b, 1) + torch.arange(slots, device=dev).view(1, slots)     # [B, S]
    bi = torch.arange(b, device=dev).view(b, 1)
    tokens = tokens.clone()
    tokens[bi, slot_pos] = mask_ids.view(1, 1, g).expand(b, slots, g)
    masked = torch.ones(b, slots * g, dtype=torch.bool, device=dev)
    conf = torch.zeros(b, slots * g, device=dev)
    order = torch.full((b, slots * g), -1, dtype=torch.long, device=dev)
    first_logp: list[torch.Tensor] = []
    n_done = 0
    while n_done < slots * g:
        logits = model(tokens, pad, at=slot_pos)
        probs, preds = [], []
        for level in range(g):
            lp = F.log_softmax(logits[level].float(), dim=-1)                         # [B, S, V_g]
            if n_done == 0:
                first_logp.append(lp)
            best = lp.max(-1)
            probs.append(best.values.exp())
            preds.append(best.indices)
        p = torch.stack(probs, -1).reshape(b, slots * g)                               # slot-major
        pred = torch.stack(preds, -1).reshape(b, slots * g)
        p = torch.where(masked, p, torch.full_like(p, -1.0))
        k = min(tokens_per_step, slots * g - n_done)
        top = p.topk(k, dim=-1).indices                                               # most confident first
        rows = torch.arange(b, device=dev)
        for j in range(k):
            flat = top[:, j]
            tokens[rows, slot_pos[rows, flat // g], flat % g] = pred[rows, flat]
            conf[rows, flat] = p[rows, flat]
            masked[rows, flat] = False
            order[:, n_done + j] = flat
        n_done += k
    decoded = tokens[bi, slot_pos]
    return decoded, conf.view(b, slots, g), order, first_logp


class PrefixIndex:
    """The vocabulary's items grouped by the first two tokens of their group, for `top_items`.

    A first-slot score is a sum over levels, sum_g lp_g(code_g), so every item under a two-token prefix
    (c0, c1) scores at most lp_0(c0) + lp_1(c1) + the best log-prob of each later level. Bounding the
    prefixes first lets the ranking score only the items of prefixes that can still reach the top N,
    instead of every item for every user (users x items: ~30 hours at a million of each here).
    """

    def __init__(self, codes: np.ndarray):
        codes = np.asarray(codes, dtype=np.int64)
        self.codes = codes
        n, g = codes.shape
        self.split = min(2, g)  # tokens in a prefix (a one-level code has one)
        head = codes[:, : self.split]
        self.order = np.lexsort(head.T[::-1]) if n else np.zeros(0, np.int64)  # items by prefix
        sorted_head = head[self.order]
        new = np.ones(n, dtype=bool)
        new[1:] = np.any(sorted_head[1:] != sorted_head[:-1], axis=1)
        firsts = np.flatnonzero(new)
        self.prefixes = sorted_head[firsts]                                        # [P, split]
        self.starts = firsts
        self.ends = np.append(firsts[1:], n)

    def items_of(self, prefix_rows: np.ndarray) -> np.ndarray:
        """Item indices of the given prefixes, without a Python loop over them."""
        starts, lengths = self.starts[prefix_rows], self.ends[prefix_rows] - self.starts[prefix_rows]
        total = int(lengths.sum())
        if total == 0:
            return np.zeros(0, np.int64)
        offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
        return self.order[np.arange(total) - offsets + np.repeat(starts, lengths)]


# Prefixes taken, best bound first, for the first guess at the N-th score (then x4 while too few).
_FIRST_PREFIXES = 16
# Slack on the pruning test, absolute plus relative to the threshold: far above the float32 rounding of
# a sum of G log-probs (G ulps of its size), far below the gaps that prune.
_BOUND_MARGIN = 1e-3


def top_items(level_lp: Sequence[np.ndarray], index: PrefixIndex, excluded: np.ndarray, need: int
              ) -> tuple[np.ndarray, np.ndarray, int]:
    """The `need` best items by sum_g level_lp[g][code_g] outside `excluded`, best first, equal scores
    by item index: (item indices, scores, items scored). Exact: the same items and scores as scoring
    every item.

    A first guess scores the items of the best-bounded prefixes to find a score tau that `need` items
    reach; every prefix whose bound reaches tau is then scored in full. The rest cannot reach tau.
    """
    split = index.split
    # Bounds in float64; the test against tau has slack, so an item whose float32 score rounds above its
    # prefix's bound is still found. A NaN log-prob bounds nothing: its prefixes are always scored.
    bound = sum(level_lp[g][index.prefixes[:, g]].astype(np.float64) for g in range(split))   # [P]
    bound += sum(float(np.nanmax(level_lp[g])) for g in range(split, len(level_lp)))
    bound[np.isnan(bound)] = np.inf
    n_prefixes = len(bound)
    scored = 0

    def score(items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        nonlocal scored
        items = items[~np.isin(items, excluded)] if len(excluded) else items
        scored += len(items)
        codes = index.codes[items]
        values = sum(level_lp[g][codes[:, g]] for g in range(len(level_lp)))
        return items, np.where(np.isnan(values), -np.inf, values)  # NaN ranks last, as no score

    chosen = np.zeros(0, np.int64)  # prefixes whose items are scored
    items, scores = np.zeros(0, np.int64), np.zeros(0, np.float32)
    k = min(_FIRST_PREFIXES, n_prefixes)
    while True:
        best = np.argpartition(-bound, k - 1)[:k] if k < n_prefixes else np.arange(n_prefixes)
        more, more_scores = score(index.items_of(np.setdiff1d(best, chosen)))
        items, scores = np.concatenate([items, more]), np.concatenate([scores, more_scores])
        chosen = np.union1d(chosen, best)
        if len(items) >= need or k == n_prefixes:
            break
        k = min(k * 4, n_prefixes)
    if need and len(items) >= need and len(chosen) < n_prefixes:
        tau = float(np.partition(scores, len(scores) - need)[len(scores) - need])  # the need-th best so far
        slack = _BOUND_MARGIN + 2 * len(level_lp) * float(np.finfo(np.float32).eps) * abs(tau)
        more, more_scores = score(index.items_of(np.setdiff1d(np.flatnonzero(bound >= tau - slack), chosen)))
        items, scores = np.concatenate([items, more]), np.concatenate([scores, more_scores])
    ranked = np.lexsort((items, -scores))[:need]  # equal scores: the lower item index first
    return items[ranked], scores[ranked], scored


@dataclass
class Inference:
    item_idx: list[int]
    scores: list[float]
    decoded_valid: int
    decoded_invalid: int
    decoded_seen: int
    scored: int = 0  # catalog items whose likelihood was computed for the rest of the list


@torch.no_grad()
def infer(model: MaskedDiffusionLM, vocab: SemanticVocab, histories: Sequence[Sequence[int]], top_n: int,
          batch_size: int = 256, progress: Callable[[int, int], None] | None = None,
          exhaustive: bool = False) -> list[Inference]:
    """Top-N unseen items per history (item indices of `vocab`); histories must be non-empty.

    `exhaustive` scores every item for every user even where the prefix bounds would prune (the same
    lists, at users x items cost: for checks and benchmarks)."""
    cfg = model.config
    dev = next(model.parameters()).device
    # next_slot ranks by a sum over levels, which the prefix bounds prune (top_items); any_slot's
    # logsumexp over slots is not a sum over levels, so it scores every item for every user.
    next_slot = cfg.fill == "next_slot" and not exhaustive
    index = PrefixIndex(vocab.codes) if next_slot else None
    codes = None if next_slot else torch.from_numpy(vocab.codes).to(dev)            # [N, G]
    # batches of similar length: padding would otherwise cost most of the attention work
    order = sorted(range(len(histories)), key=lambda i: min(len(histories[i]), cfg.max_len - cfg.slots))
    out: list[Inference | None] = [None] * len(histories)
    for start in range(0, len(order), batch_size):
        ids = order[start: start + batch_size]
        chunk = [list(histories[i])[-(cfg.max_len - cfg.slots):] for i in ids]
        tokens, pad, lengths = _batch(vocab, chunk, cfg.max_len, cfg.slots, dev)
        decoded, conf, _, first_logp = unmask(model, tokens, pad, lengths, cfg.slots, cfg.tokens_per_step)
        if next_slot:  # the first slot's log-probs per level: an item's score is their sum at its codes
            level_np = [first_logp[level][:, 0].float().cpu().numpy() for level in range(vocab.groups)]
        else:  # factorised log-likelihood of every item per slot: sum over levels of log p_g(code_g)
            slot_lp = sum(first_logp[level][:, :, codes[:, level]] for level in range(vocab.groups))  # [B, S, N]
            item_lp = slot_lp[:, 0] if cfg.fill == "next_slot" else torch.logsumexp(slot_lp, dim=1)
            item_lp_np = item_lp.float().cpu().numpy()
        decoded_np = decoded.cpu().numpy()
        joint_np = conf.clamp(min=1e-12).log().sum(-1).cpu().numpy()                  # [B, S]
        for i in range(len(chunk)):
            seen = set(histories[ids[i]])  # the whole history, not only what the model saw
            picked, scores = [], []
            n_scored = 0
            valid = invalid = seen_n = 0
            for s in range(decoded_np.shape[1] if cfg.decoded_first else 0):
                idx = vocab.item_for(decoded_np[i, s])
                if idx is None:
                    invalid += 1
                elif idx in seen or idx in picked:
                    seen_n += 1
                else:
                    valid += 1
                    picked.append(idx)
                    scores.append(float(joint_np[i, s]))
            if len(picked) < top_n and next_slot:
                excluded = np.fromiter(seen.union(picked), dtype=np.int64)
                rest, rest_scores, n_scored = top_items([lv[i] for lv in level_np], index, excluded,
                                                        top_n - len(picked))
                finite = np.isfinite(rest_scores)  # an item a level rules out entirely is not a pick
                picked += rest[finite].tolist()
                scores += [float(x) for x in rest_scores[finite]]
            elif len(picked) < top_n:
                row_lp = item_lp_np[i]
                row_lp[list(seen)] = -np.inf
                row_lp[picked] = -np.inf
                n_scored = len(row_lp)
                need = top_n - len(picked)
                if need >= len(row_lp):
                    cand = np.arange(len(row_lp))
                else:  # every item reaching the need-th score: ties across the cut keep the lower index
                    cand = np.flatnonzero(row_lp >= -np.partition(-row_lp, need - 1)[need - 1])
                cand = cand[np.lexsort((cand, -row_lp[cand]))]  # equal scores: the lower item index first
                for c in cand:
                    if len(picked) >= top_n or not np.isfinite(row_lp[c]):
                        break
                    picked.append(int(c))
                    scores.append(float(row_lp[c]))
            out[ids[i]] = Inference(picked[:top_n], scores[:top_n], valid, invalid, seen_n, n_scored)
        if progress:
            progress(min(start + batch_size, len(histories)), len(histories))
    return out  # type: ignore[return-value]


def model_version(config: DiffusionConfig, codebook_version: str, data_fingerprint: str) -> str:
    h = hashlib.sha256(f"{MODEL_FAMILY}|{config.config_hash()}|{codebook_version}|{data_fingerprint}".encode())
    return f"{MODEL_FAMILY}-{h.hexdigest()[:12]}"


def save(model: MaskedDiffusionLM, vocab: SemanticVocab, path: str | Path, meta: dict) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "model.pt.tmp"
    torch.save({"state": model.state_dict(), "level_sizes": model.level_sizes,
                "config": asdict(model.config)}, tmp)
    tmp.replace(path / "model.pt")
    (path / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))


def load(path: str | Path, device: str = "auto") -> MaskedDiffusionLM:
    blob = torch.load(Path(path) / "model.pt", map_location="cpu", weights_only=True)
    config = DiffusionConfig(**blob["config"])
    model = MaskedDiffusionLM(blob["level_sizes"], config)
    model.load_state_dict(blob["state"])
    return model.to(resolve_device(device)).eval()
