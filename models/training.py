"""What the ranker and the generative model share in training: one optimiser step, and early stopping on a
validation score."""

from __future__ import annotations

import copy

from torch import nn


def optimizer_step(model: nn.Module, opt, loss, scaler) -> None:
    """Backward through the (mixed-precision) scaler, gradients clipped to norm 1, one step."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(opt)
    scaler.update()


class EarlyStopping:
    """Keeps the best validation score, its epoch and a copy of the weights then; says when `patience`
    epochs in a row have not improved on it; puts the best weights back at the end."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best, self.best_epoch, self.bad = -1.0, 0, 0
        self._state: dict | None = None

    def update(self, epoch: int, score: float, model: nn.Module) -> bool:
        """Record an epoch's score; True when it is a new best (strictly higher)."""
        if score > self.best:
            self.best, self.best_epoch, self.bad = score, epoch, 0
            self._state = copy.deepcopy(model.state_dict())
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad >= self.patience

    def restore(self, model: nn.Module) -> None:
        if self._state is not None:
            model.load_state_dict(self._state)
