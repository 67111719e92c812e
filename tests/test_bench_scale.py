"""bench.scale's memory figures: what a stage's process reports must be its own."""

from __future__ import annotations

import multiprocessing as mp
import resource
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest

from bench.scale import own_peak_mb


def _child_peaks() -> tuple[float, float]:
    return own_peak_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status is Linux's")
def test_a_spawned_stage_reports_its_own_peak_not_the_parents():
    held = bytearray(400 * 2**20)
    held[::4096] = b"\1" * len(held[::4096])  # resident, not just reserved
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        own, inherited = pool.submit(_child_peaks).result()
    # getrusage's figure carries this process's 400 MB into the child (the trap the benchmark fell in);
    # the child's own high-water mark is what it used itself.
    assert inherited > 400 and own < 200
    assert own_peak_mb() > 400  # and here, where the 400 MB live, it sees them
    del held
