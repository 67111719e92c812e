"""One progress format for every long loop (jobs/progress.py): done of total, rate, ETA; and durations."""

from __future__ import annotations

import logging

import pytest

from jobs import progress
from jobs.progress import EpochProgress, Progress, duration, progress_line


@pytest.mark.parametrize(("seconds", "tenths", "text"), [
    (0.04, False, "0 s"), (44.6, False, "45 s"), (60, False, "1 min 0 s"), (725, False, "12 min 5 s"),
    (3599.6, False, "1 h 0 min"), (11_040, False, "3 h 4 min"), (4.24, True, "4.2 s"), (75, True, "1 min 15 s"),
    (None, False, "?"), (-3, False, "0 s"),
])
def test_durations_read_as_people_say_them(seconds, tenths, text):
    assert duration(seconds, tenths=tenths) == text


def test_a_progress_line_has_done_of_total_rate_and_eta():
    # 15 of 102 items in 125 s: 0.12 items/s (two significant digits on a slow engine), 87 left: 725 s.
    assert progress_line("reason_items partition 2/4", 15, 102, 125.0, "items") == \
        "reason_items partition 2/4: 15/102 items (15%), 0.12/s, ETA 12 min 5 s"
    assert progress_line("embed", 2_000, 2_000, 4.0) == "embed: 2,000/2,000 (100%), 500/s, ETA 0 s"
    assert progress_line("x", 0, 10, 3.0) == "x: 0/10 (0%), 0/s, ETA ?"  # nothing done yet: no ETA to give


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_progress_logs_at_most_every_interval_and_always_at_the_end(monkeypatch, caplog):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    p = Progress("items", 10, every_s=5.0)
    with caplog.at_level(logging.INFO, logger="reaseq"):
        for done in range(1, 11):
            clock.now += 1.0
            p(done)
    # 1 item/s: lines at 5 s and at the end (10 of 10), none in between
    assert [r.getMessage() for r in caplog.records] == ["items: 5/10 (50%), 1/s, ETA 5 s",
                                                        "items: 10/10 (100%), 1/s, ETA 0 s"]


def test_epoch_eta_counts_to_where_early_stopping_would_end_the_run(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    prog = EpochProgress("train", patience=5, select_metric="recall@10")
    clock.now += 30.0  # one epoch of 30 s; best at epoch 1, so training stops by epoch 6 of 60
    assert prog.epoch_done(epoch=1, max_epochs=60, best_epoch=1) == ("2 min 30 s", "29 min 30 s")
    clock.now += 90.0  # a slower epoch: the ETA is the mean of the last three epochs' times
    assert prog.epoch_done(epoch=2, max_epochs=60, best_epoch=2) == ("5 min 0 s", "58 min 0 s")
    clock.now += 60.0  # an alignment stage has no early stop: to max_epochs
    assert prog.epoch_done(epoch=3, max_epochs=4, best_epoch=2, early_stopping=False) == ("1 min 0 s", "1 min 0 s")
