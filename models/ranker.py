"""The sequential ranker: a SASRec-style causal transformer over the feature tables, and its training loop.

Item representation (one table for input and output; the output layer is tied to it, so an item that
is rare in the logs still gets a score from its features):

    e(i) = LayerNorm( id(i) [+ sum of its semantic-token embeddings] [+ sum of its catalog-fact embeddings]
                            [+ mean of its knowledge-token embeddings + W · summary(i)] )

Each bracket is a feature family a variant switches on (`VARIANTS`), so the ablation says where a gain
comes from, and whether a language model's knowledge adds anything over the catalog it started from:

* semantic tokens (`semantic_ids`): one embedding table per RQ level (collision digit left out) and per
  MPQ expert, summed per item; an RQ level's token is the code path up to it, (c1), (c1, c2), ...
  (`sid_prefix`: a residual code means something only under its parents), a path only one item has
  counts as missing; an item without semantic IDs uses each table's "missing" row;
* catalog facts (`catalog`, from bronze.catalog_items, no agent involved): one embedding table per
  category-path level (the path up to it), brand and price band, a value only one item has counting
  as missing;
* the agents' knowledge beyond the catalog (`llm_knowledge`, silver.item_knowledge fields whose source
  is a model): the mean embedding of its shared tokens (product type, attributes the catalog does not
  list, audiences, scenarios, occasions, complements, substitutes) and its summary's frozen embedding
  through a learned projection (a learned "missing" vector for items without one);
* beyond-log context: a learned bonus per context rank is added to the scores of the user's inferred
  items (`beyond_log_copy`); optionally (`beyond_log_attend`, off: it lowered validation Recall@10) the
  items are also prepended as extra tokens, embedded with the same item table plus a learned segment
  vector and no position, attending only to each other.
  Point in time (the default, `beyond_log_point_in_time`): the published table
  (gold.user_augmented_behaviors) was made from every event but the test target, so it scores the test
  target only; the validation target is scored with an inference made as of the validation cut and
  the last training target with one made as of its own cut, each by a model that never saw that target
  (jobs.point_in_time.point_in_time_contexts; `BeyondLogContexts`). A context is visible to the last
  position only, the one whose target it was made for; the other training positions learn without it.
  With `beyond_log_point_in_time=false` the published inference is the context of every position and
  split (it has seen each training target's future), so it is dropped at random in training
  (`context_dropout`) and the validation target is scored without it (`valid_context`).

Training: full softmax cross-entropy over the whole catalogue at every position of the prefix before
the validation target (no sampled negatives). Selection: early stopping on validation Recall@10, the
best epoch's weights are evaluated once on the test target. Metrics: full ranking over all items,
items already in the user's history excluded (RecBole's convention), ties counted against the target
(`rank_of_target`). CPU by default; CUDA with bf16 autocast (fp16 + GradScaler on older GPUs) when
present; seeded (torch, numpy and the shuffle buffer).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.configs import RankerConfig  # noqa: F401  (defined there; re-exported)
from models.device import resolve_device
from models.ranker_data import BeyondLogContexts, ItemFeatures, SequenceStream
from models.training import EarlyStopping, optimizer_step
from models.variants import FAMILIES, VARIANTS  # noqa: F401  (re-exported: callers import them from here)

MODEL_VERSION = "sasrec-tied-composite-v4"  # v4: catalog and LLM-knowledge families apart
KS = (5, 10, 20)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ---------------------------------------------------------------- metrics


def rank_of_target(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's target among all columns; ties count against the target.

    rank = #(score > s_target) + #(score == s_target, other items): a model that scores everything
    equally gets the worst rank, and the result never depends on item order.
    """
    t = scores.gather(1, target[:, None])
    higher = (scores > t).sum(1)
    ties = (scores == t).sum(1) - 1
    return higher + ties


def metrics_from_ranks(ranks: torch.Tensor | np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Recall@k (hit rate with one target) and NDCG@k = 1/log2(rank + 2) when rank < k, averaged."""
    r = torch.as_tensor(ranks, dtype=torch.float64)
    out: dict[str, float] = {}
    if r.numel() == 0:
        return {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg")}
    for k in ks:
        hit = r < k
        out[f"recall@{k}"] = float(hit.double().mean())
        out[f"ndcg@{k}"] = float(torch.where(hit, 1.0 / torch.log2(r + 2.0), torch.zeros_like(r)).mean())
    return out


# ---------------------------------------------------------------- model


class ItemEncoder(nn.Module):
    """The composite item table [N+1, d]: ID + the embeddings of the feature families switched on."""

    def __init__(self, feats: ItemFeatures, d: int, use_sid: bool, use_catalog: bool, use_llm: bool,
                 knowledge_mlp: bool = False, sid_prefix: bool = True):
        super().__init__()
        n = feats.n_items + 1
        self.id = nn.Embedding(n, d, padding_idx=0)
        nn.init.normal_(self.id.weight, std=0.02)
        self.use_sid = use_sid and bool(feats.sid_sizes)
        if self.use_sid:
            codes, sizes = feats.sid_prefix_codes() if sid_prefix else (feats.sid_codes, feats.sid_sizes)
            self.register_buffer("codes", torch.as_tensor(codes, dtype=torch.long), persistent=False)
            self.sid = nn.ModuleList(nn.Embedding(size, d) for size in sizes)
            for emb in self.sid:
                nn.init.normal_(emb.weight, std=0.02)
        # Catalog facts: one table per column, row 0 the learned "missing or rare" value.
        self.use_catalog = use_catalog and feats.catalog_fields is not None and bool(feats.catalog_sizes)
        if self.use_catalog:
            self.register_buffer("catalog_values", torch.as_tensor(feats.catalog_fields, dtype=torch.long),
                                 persistent=False)
            self.catalog = nn.ModuleList(nn.Embedding(size, d) for size in feats.catalog_sizes)
            for emb in self.catalog:
                nn.init.normal_(emb.weight, std=0.02)
        # The agents' knowledge: a bag of shared tokens (padding 0 left out of the mean) and the summary.
        self.use_tokens = use_llm and feats.llm_tokens is not None and bool(feats.llm_vocab)
        if self.use_tokens:
            self.register_buffer("tokens", torch.as_tensor(feats.llm_tokens, dtype=torch.long), persistent=False)
            self.bag = nn.EmbeddingBag(len(feats.llm_vocab) + 1, d, mode="mean", padding_idx=0)
            nn.init.normal_(self.bag.weight, std=0.02)
            with torch.no_grad():
                self.bag.weight[0].zero_()
        self.use_summary = use_llm and bool(feats.knowledge_ok.any())
        if self.use_summary:
            know = torch.as_tensor(feats.knowledge, dtype=torch.float32)
            ok = torch.as_tensor(feats.knowledge_ok, dtype=torch.bool)
            # Unit-normalise the frozen vectors so the projection's scale does not depend on the embedder.
            know = F.normalize(know, dim=1) * ok[:, None]
            self.register_buffer("knowledge", know, persistent=False)
            self.register_buffer("knowledge_ok", ok, persistent=False)
            # A hidden layer lets the frozen text space be bent to the interaction space, not only rotated.
            self.proj = (nn.Sequential(nn.Linear(know.shape[1], 2 * d), nn.GELU(), nn.Linear(2 * d, d))
                         if knowledge_mlp else nn.Linear(know.shape[1], d))
            self.missing = nn.Parameter(torch.zeros(d))
        self.norm = nn.LayerNorm(d)

    def forward(self) -> torch.Tensor:
        e = self.id.weight
        if self.use_sid:
            for c, emb in enumerate(self.sid):
                e = e + emb(self.codes[:, c])
        if self.use_catalog:
            for c, emb in enumerate(self.catalog):
                e = e + emb(self.catalog_values[:, c])
        if self.use_tokens:
            e = e + self.bag(self.tokens)
        if self.use_summary:
            e = e + torch.where(self.knowledge_ok[:, None], self.proj(self.knowledge), self.missing)
        return self.norm(e)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        # Dropout on the residual branches only (not on attention weights or inside the feed-forward):
        # Scientific's validation Recall@10 stayed within noise and a CPU step got about 10% cheaper.
        self.ff = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if allowed.dtype != q.dtype:  # autocast: q is bf16/fp16, the additive mask float32
            allowed = allowed.to(q.dtype)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.ff(self.ln2(x)))


class SASRec(nn.Module):
    def __init__(self, feats: ItemFeatures, config: RankerConfig):
        super().__init__()
        d = config.d_model
        self.config = config
        self.items = ItemEncoder(feats, d, config.use_semantic_ids, config.use_catalog, config.use_llm_knowledge,
                                 config.knowledge_mlp, config.sid_prefix)
        self.pos = nn.Embedding(config.max_len, d)  # position 0 = the most recent item
        nn.init.normal_(self.pos.weight, std=0.02)
        self.use_context = config.use_beyond_log
        self.context_last_only = config.beyond_log_point_in_time
        if self.use_context:
            self.segment = nn.Parameter(torch.zeros(d))
        self.copy = nn.Parameter(torch.zeros(config.beyond_log_k)) if self.use_context and config.beyond_log_copy else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(d, config.n_heads, config.dropout) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(d)
        self.scale = d**-0.5  # both sides are layer-normed: keeps the initial logits near unit scale

    def encode(self, inp: torch.Tensor, table: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [B, L, d] of the history positions (left-padded input, 0 = pad)."""
        b, length = inp.shape
        rev = torch.arange(length - 1, -1, -1, device=inp.device).clamp(max=self.pos.num_embeddings - 1)
        x = table[inp] + self.pos(rev)[None]
        valid = inp != 0
        n_ctx = 0
        if self.use_context and self.config.beyond_log_attend and context is not None and context.shape[1] > 0:
            ctx_valid = context != 0
            ctx = table[context]
            if self.config.beyond_log_pool:
                w = ctx_valid.unsqueeze(-1).to(ctx.dtype)
                ctx = (ctx * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1.0)
                ctx_valid = ctx_valid.any(1, keepdim=True)
            n_ctx = ctx.shape[1]
            x = torch.cat([ctx + self.segment, x], dim=1)
            valid = torch.cat([ctx_valid, valid], dim=1)
        x = self.drop(x)
        t = n_ctx + length
        i = torch.arange(t, device=inp.device)
        # query i may see key j: context keys from the positions allowed to (all, or in point-in-time mode
        # only the last one, whose target the context was made for), history keys causally, context
        # queries only context; every token sees itself (keeps padded rows finite).
        sees_context = (i < n_ctx) | (i == t - 1) if self.context_last_only else torch.ones_like(i, dtype=torch.bool)
        is_ctx = i < n_ctx
        structure = ((is_ctx[None, :] & sees_context[:, None])
                     | (~is_ctx[:, None] & ~is_ctx[None, :] & (i[None, :] <= i[:, None])))
        allowed = (structure[None] & valid[:, None, :]) | torch.eye(t, dtype=torch.bool, device=inp.device)[None]
        # One additive mask for every block and head (a boolean mask is converted inside each call).
        allowed = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill_(~allowed, float("-inf"))
        allowed = allowed[:, None]
        for block in self.blocks:
            x = block(x, allowed)
        return self.norm(x[:, n_ctx:])

    def forward(self, inp: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        table = self.items()
        return self.encode(inp, table, context), table

    def scores(self, h: torch.Tensor, table: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Tied output layer: similarity to every item's composite representation, column 0 masked.

        context [rows, K] (0 = none): each row's context items get the learned bonus of their rank.
        """
        s = (h @ table.T).float() * self.scale
        s[:, 0] = float("-inf")
        if self.copy is not None and context is not None and context.shape[1] > 0:
            k = min(context.shape[1], self.copy.numel())
            context = context[:, :k]
            bonus = self.copy[:k].float()[None].expand(context.shape[0], k) * (context != 0)
            s = s.scatter_add(1, context, bonus)  # pads add 0 to column 0, which stays -inf
        return s

    def context_rows(self, context: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor | None:
        """The context of each training row h[mask]: the last position's only (point in time), or every one."""
        if self.copy is None or context is None:
            return None
        b, length = mask.shape
        if self.context_last_only:
            full = context.new_zeros(b, length, context.shape[1])
            full[:, -1] = context
        else:
            full = context[:, None].expand(b, length, context.shape[1])
        return full[mask]


# ---------------------------------------------------------------- training and evaluation


@dataclass
class FitResult:
    best_epoch: int
    epochs: int
    valid: dict[str, float]
    test: dict[str, float]
    history: list[dict]
    train_seconds: float  # the training loops only
    sequences_per_second: float  # training sequences per second of training loop
    fit_seconds: float  # wall time of fit(): training, the validation pass of every epoch, the test pass
    train_sequences: int
    eval_users: int
    device: str
    stopped_early: bool
    counts: dict = field(default_factory=dict)


def _autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def evaluate(model: SASRec, stream: SequenceStream, device: torch.device, amp: bool = True,
             exclude_history: bool = True) -> tuple[dict[str, float], int]:
    model.eval()
    ranks = []
    with _autocast(device, amp):
        table = model.items()
        for batch in stream:
            inp = batch["input"].to(device, non_blocking=True)
            ctx = batch.get("context")
            ctx = ctx.to(device, non_blocking=True) if ctx is not None else None
            h = model.encode(inp, table, ctx)[:, -1]
            scores = model.scores(h, table, ctx)
            if exclude_history:
                scores.scatter_(1, batch["history"].to(device), float("-inf"))
            ranks.append(rank_of_target(scores, batch["target"].to(device)).cpu())
    r = torch.cat(ranks) if ranks else torch.zeros(0)
    return metrics_from_ranks(r), int(r.numel())


def fit(feats: ItemFeatures, streams: dict[str, SequenceStream], config: RankerConfig,
        on_epoch: Callable[[dict], None] | None = None, on_step: Callable[[int, int], None] | None = None,
        max_seconds: float | None = None) -> tuple[SASRec, FitResult]:
    """Train with early stopping on the validation target, then evaluate the best weights on the test target."""
    fit_start = time.perf_counter()
    seed_everything(config.seed)
    device = resolve_device(config.device)
    model = SASRec(feats, config).to(device)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name or name.endswith("bias") else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    fp16 = device.type == "cuda" and config.amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    train = streams["train"]
    stopper = EarlyStopping(config.patience)
    history: list[dict] = []
    train_time = 0.0
    sequences = 0
    epoch_sequences = None
    stopped_early = False
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        train.set_epoch(epoch)
        t0 = time.perf_counter()
        total, positions, seqs, step = 0.0, 0, 0, 0
        for batch in train:
            inp = batch["input"].to(device, non_blocking=True)
            tgt = batch["target"].to(device, non_blocking=True)
            ctx = batch.get("context")
            ctx = ctx.to(device, non_blocking=True) if ctx is not None else None
            if ctx is not None and config.effective_context_dropout > 0:
                dropped = torch.rand(ctx.shape[0], device=device) < config.effective_context_dropout
                ctx = ctx.masked_fill(dropped[:, None], 0)
            with _autocast(device, config.amp):
                h, table = model(inp, ctx)
                mask = tgt != 0
                logits = model.scores(h[mask], table, model.context_rows(ctx, mask))
                loss = F.cross_entropy(logits, tgt[mask])
            optimizer_step(model, opt, loss, scaler)
            n_pos = int(mask.sum())
            total += float(loss.detach()) * n_pos
            positions += n_pos
            seqs += inp.shape[0]
            step += 1
            if on_step is not None:
                on_step(seqs, epoch_sequences or 0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        train_time += seconds
        sequences += seqs
        epoch_sequences = seqs
        valid, n_valid = evaluate(model, streams["valid"], device, config.amp, config.exclude_history)
        stopper.update(epoch, valid[config.select_metric], model)
        rec = {"epoch": epoch, "loss": total / max(positions, 1), "train_seconds": seconds,
               "sequences_per_second": seqs / max(seconds, 1e-9), "valid": valid, "best_epoch": stopper.best_epoch,
               "best": stopper.best, "max_epochs": config.max_epochs, "elapsed": train_time}
        history.append(rec)
        if on_epoch is not None:
            on_epoch(rec)
        if stopper.should_stop:
            stopped_early = True
            break
        if max_seconds is not None and train_time >= max_seconds:
            break
    stopper.restore(model)
    best_epoch = stopper.best_epoch
    test, n_test = evaluate(model, streams["test"], device, config.amp, config.exclude_history)
    valid_best = history[best_epoch - 1]["valid"] if best_epoch else {}
    counts = {s: dict(streams[s].last_counts) for s in streams}
    result = FitResult(
        best_epoch=best_epoch, epochs=len(history), valid=valid_best, test=test, history=history,
        train_seconds=train_time, sequences_per_second=sequences / max(train_time, 1e-9),
        fit_seconds=time.perf_counter() - fit_start,
        train_sequences=epoch_sequences or 0, eval_users=n_test, device=str(device),
        stopped_early=stopped_early, counts=counts,
    )
    return model, result


def make_streams(pinned, feats: ItemFeatures, config: RankerConfig,
                 beyond_log: BeyondLogContexts | dict[str, np.ndarray] | None = None) -> dict[str, SequenceStream]:
    """The three splits' streams; beyond_log: per-split contexts (point in time) or the published map."""
    split_ctx: dict[str, dict | None] = {"train": None, "valid": None, "test": None}
    if config.use_beyond_log:
        if config.beyond_log_point_in_time:
            if not isinstance(beyond_log, BeyondLogContexts):
                raise ValueError("beyond_log_point_in_time needs per-split contexts (BeyondLogContexts, from "
                                 "jobs.train_ranker.load_data); got the published map only")
            split_ctx = {"train": beyond_log.train, "valid": beyond_log.valid, "test": beyond_log.test}
        else:
            published = beyond_log.test if isinstance(beyond_log, BeyondLogContexts) else beyond_log
            split_ctx = {"train": published, "valid": published if config.valid_context else None,
                         "test": published}
    common = dict(max_len=config.max_len, beyond_log_k=config.beyond_log_k, read_batch_rows=config.read_batch_rows)
    return {
        "train": SequenceStream(pinned, feats, "train", batch_size=config.batch_size, seed=config.seed,
                                buffer_size=config.shuffle_buffer, beyond_log=split_ctx["train"], **common),
        "valid": SequenceStream(pinned, feats, "valid", batch_size=config.eval_batch_size,
                                beyond_log=split_ctx["valid"], **common),
        "test": SequenceStream(pinned, feats, "test", batch_size=config.eval_batch_size,
                               beyond_log=split_ctx["test"], **common),
    }


def finite(x: float) -> float | None:
    return x if isinstance(x, float) and math.isfinite(x) else None
