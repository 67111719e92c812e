"""Training: the base model with early stopping on fixed-order validation recall, then the variants."""


from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import numpy as np
import torch

from models.configs import GenerativeConfig  # noqa: F401  (defined there; re-exported)
from models.device import resolve_device
from models.generative.align import Credit, Example, align, alignment_examples, user_sequences
from models.generative.catalog import TokenCatalog
from models.generative.decode import evaluate
from models.generative.model import (
    ALIGNED,
    DEFAULT_VARIANTS,
    INFERENCE_MODES,
    VARIANTS,
    GenerativeRecommender,
    token_loss,
)
from models.generative.optim import StageResult, _optimizer, _select
from models.ranker import _autocast, seed_everything
from models.ranker_data import ItemFeatures, Pinned, SequenceStream
from models.training import EarlyStopping, optimizer_step


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
            optimizer_step(model, opt, loss, scaler)
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


def fit_variants(pinned: Pinned, feats: ItemFeatures, cat: TokenCatalog, credit: Credit, config: GenerativeConfig,
                 variants: tuple[str, ...] = DEFAULT_VARIANTS, on_epoch: Callable[[dict], None] | None = None,
                 on_step: Callable[[int, int], None] | None = None, on_eval: Callable[[str, int], None] | None = None,
                 save: Callable[[str, GenerativeRecommender, StageResult], None] | None = None) -> dict:
    """Train the base model once, evaluate its inference modes, then fine-tune +pars / +msra /
    +pars_knowledge from it.

    Returns {variant: {"test": metrics, "users_per_second", "train_seconds", "valid_select", "best_epoch",
    "epochs", ...}, "_extra": {...}}. fixed_order / +dynamic_paths / +corp share the base model (they differ
    at inference); +pars is PARS from the base (catalog credit), +msra is PARS with MSRA rewards from the
    base, +pars_knowledge is +pars with the knowledge credit too (`credit.kinds`, which it needs; the same
    seed as +pars, so the credit is the only difference); all three are decoded with dynamic paths + CORP. train_seconds: the stages that produced the variant's weights,
    validation passes included (base, or base + alignment).
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown generative variants {unknown}; choose from {', '.join(VARIANTS)}")
    if "+pars_knowledge" in variants and credit.kinds is None:
        raise ValueError("+pars_knowledge needs the items' kinds from silver.item_knowledge (load_item_kinds)")
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
    aligned = [v for v in ALIGNED if v in variants]
    if aligned:
        examples = build_examples(pinned, feats, config)
        out["_extra"]["alignment_examples"] = len(examples)
        for variant in aligned:
            seed_everything(config.seed + (11 if variant == "+msra" else 7))
            t1 = time.perf_counter()
            used = credit if variant == "+pars_knowledge" else Credit(credit.paths)
            model, res = align(copy.deepcopy(base), cat, streams, examples, used, config, device,
                               msra=variant == "+msra", on_epoch=on_epoch, stage=variant.lstrip("+"))
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
