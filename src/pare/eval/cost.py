"""Wall time and peak resident memory of a block of work."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil


@dataclass
class Cost:
    seconds: float = 0.0
    peak_rss_mb: float = 0.0


@contextlib.contextmanager
def measure_cost(interval: float = 0.02) -> Iterator[Cost]:
    """Time the block and sample this process's RSS in a thread to find its peak during the block."""
    cost = Cost()
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
