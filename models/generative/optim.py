"""What every training stage of the generative model shares: the optimiser, the validation score that
selects a model, and a stage's result (one step is models.training.optimizer_step, as the ranker's)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.generative.decode import evaluate


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


def _select(model, cat, streams, config, device) -> float:
    res = evaluate(model, cat, streams["valid"], config, device, modes=("fixed_order",),
                   max_users=config.select_users or None)
    return res["metrics"]["fixed_order"][config.select_metric]
