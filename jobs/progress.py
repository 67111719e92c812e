"""Progress of long work, in one format everywhere: done of total, rate, ETA; and durations for people.

    reason_items partition 2/4: 15/102 items (15%), 0.12/s, ETA 12 min 5 s
    train_ranker[all s0]: epoch 3/60 loss 7.1234 valid recall@10 0.1200 (best 0.1200 @ 3) 950 seq/s ETA 1 min 4 s

Loops over items (`Progress`, `progress_line`) and training loops (`EpochProgress`) use it; so do the run
summary and the report (`duration`).
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("reaseq")


def duration(seconds: float | None, tenths: bool = False) -> str:
    """'45 s', '12 min 5 s', '3 h 4 min'; `tenths`: '4.2 s' under a minute (short stages)."""
    if seconds is None:
        return "?"
    if tenths and seconds < 60:
        return f"{max(seconds, 0.0):.1f} s"
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def rate(per_second: float) -> str:
    return f"{per_second:.2g}" if per_second < 10 else f"{per_second:.0f}"  # 0.12/s on a slow engine, not 0.1


def progress_line(what: str, done: int, total: int, elapsed: float, unit: str = "") -> str:
    """'what: 15/102 items (15%), 0.12/s, ETA 12 min 5 s': one format for every long loop's progress."""
    per_second = done / max(elapsed, 1e-9)
    pct = 100.0 * done / total if total else 100.0
    unit = f" {unit}" if unit else ""
    eta = duration((total - done) / per_second if per_second else None)
    return f"{what}: {done:,}/{total:,}{unit} ({pct:.0f}%), {rate(per_second)}/s, ETA {eta}"


class Progress:
    """Logs done of total, rate and ETA at most every `every_s` seconds (for long loops in task logs)."""

    def __init__(self, what: str, total: int, every_s: float = 5.0, logger: logging.Logger | None = None,
                 unit: str = ""):
        self.what, self.total, self.every_s, self.unit = what, total, every_s, unit
        self.log = logger or log
        self.start = self.last = time.monotonic()
        self.done = 0

    def __call__(self, done: int, total: int | None = None) -> None:
        self.done = done
        if total is not None:
            self.total = total
        now = time.monotonic()
        if now - self.last >= self.every_s or done >= self.total:
            self.last = now
            self.log.info(self.line())

    def line(self) -> str:
        return progress_line(self.what, self.done, self.total, time.monotonic() - self.start, self.unit)


class EpochProgress:
    """A training loop's lines: within an epoch every `every_s` seconds (sequences done, rate), and after
    each epoch its loss, the validation metric, and the ETA to where early stopping would end the run."""

    def __init__(self, prefix: str, patience: int, select_metric: str, every_s: float = 15.0):
        self.prefix, self.patience, self.select_metric, self.every_s = prefix, patience, select_metric, every_s
        self.last = self.epoch_start = time.monotonic()
        self.epoch_times: list[float] = []

    def step(self, seqs: int, per_epoch: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            return
        self.last = now
        total = f"/{per_epoch:,}" if per_epoch else ""
        log.info("%s: epoch %d, %s%s sequences, %s seq/s", self.prefix, len(self.epoch_times) + 1, f"{seqs:,}",
                 total, rate(seqs / max(now - self.epoch_start, 1e-9)))

    def epoch_done(self, epoch: int, max_epochs: int, best_epoch: int, early_stopping: bool = True) -> tuple[str, str]:
        """Record an epoch's end; (ETA to the early stop, ETA to max_epochs), mean of the last 3 epochs."""
        self.epoch_times.append(time.monotonic() - self.epoch_start)
        per = sum(self.epoch_times[-3:]) / len(self.epoch_times[-3:])
        stop_by = min(max_epochs, best_epoch + self.patience) if early_stopping else max_epochs
        self.epoch_start = self.last = time.monotonic()
        return duration((stop_by - epoch) * per), duration((max_epochs - epoch) * per)

    def restart(self) -> None:
        """A new training stage (the generative model's alignment after its base training)."""
        self.epoch_times = []
        self.epoch_start = self.last = time.monotonic()
