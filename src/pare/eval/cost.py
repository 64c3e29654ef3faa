"""Wall time and peak resident memory of a block of work."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil

from pare.eval.memory import peak_rss_mb


@dataclass
class Cost:
    seconds: float = 0.0
    peak_rss_mb: float = 0.0


@contextlib.contextmanager
def measure_cost(interval: float = 0.02) -> Iterator[Cost]:
    """Time the block and find this process's peak RSS during it.

    When the block raises the process's lifetime peak (:func:`peak_rss_mb`), that peak is exact; otherwise
    a thread samples the RSS every ``interval`` seconds (a shorter spike below the earlier peak can
    be missed).
    """
    cost = Cost()
    lifetime_before = peak_rss_mb()
    proc = psutil.Process(os.getpid())
    peak = [proc.memory_info().rss]
    stop = threading.Event()

    def sample() -> None:  # the start and the end are read by the caller: a short block costs no sample
        while not stop.wait(interval):
            peak[0] = max(peak[0], proc.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    thread.start()
    try:
        yield cost
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], proc.memory_info().rss)
        cost.seconds = time.perf_counter() - start
        cost.peak_rss_mb = peak[0] / 2**20
        lifetime_after = peak_rss_mb()
        if lifetime_after > lifetime_before:  # the block set a new high-water mark: read it exactly
            cost.peak_rss_mb = max(cost.peak_rss_mb, lifetime_after)
