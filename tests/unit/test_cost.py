"""The wall time and peak RSS that every report carries."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest

from pare.eval.cost import measure_cost
from pare.eval.memory import peak_rss_mb

_HELD_INSIDE = """
import json, time, psutil, torch
from pare.eval.cost import measure_cost
before = psutil.Process().memory_info().rss / 2**20
with measure_cost(interval=0.005) as cost:
    block = torch.ones(32 * 2**20)  # 128 MiB, every page written
    time.sleep(0.05)
    del block
after = psutil.Process().memory_info().rss / 2**20
print(json.dumps({"before": before, "after": after, "peak": cost.peak_rss_mb, "seconds": cost.seconds}))
"""


def _fresh(code: str) -> dict:
    """The JSON line that ``code`` prints, run in a new Python process."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_measure_cost_sees_memory_held_inside_the_block() -> None:
    # A fresh process: in a long test session the block may reuse pages the process already holds
    # (no RSS growth to see), and a loaded machine may not schedule the sampler within 50 ms.
    got = _fresh(_HELD_INSIDE)
    assert got["peak"] >= got["before"] + 100
    assert got["after"] < got["peak"]
    assert got["seconds"] >= 0.05


def test_measure_cost_of_a_short_block_is_its_rss() -> None:
    now = psutil.Process().memory_info().rss / 2**20
    with measure_cost() as cost:
        pass
    assert abs(cost.peak_rss_mb - now) < 64
    assert cost.seconds >= 0


_SPIKE = """
import json, psutil, torch
from pare.eval.cost import measure_cost
from pare.eval.memory import peak_rss_mb
rss = psutil.Process().memory_info().rss / 2**20
extra = peak_rss_mb() - rss + 128  # enough to set a new lifetime peak
with measure_cost(interval=3600) as cost:  # the sampler never wakes: only the high-water mark sees it
    block = torch.ones(int(extra * 2**20) // 4)
    del block
print(json.dumps({"rss": rss, "extra": extra, "peak": cost.peak_rss_mb}))
"""


def test_a_spike_between_samples_is_read_from_the_high_water_mark() -> None:
    # In a long session the spike may reuse resident pages; a fresh process has none. The spike is
    # sized from the child's own peak, so it sets a new one whatever that peak starts from.
    need = peak_rss_mb() + 256
    if need > psutil.virtual_memory().available / 2**20 / 2:
        pytest.skip(f"a spike of about {need:.0f} MiB would not leave half the free memory")
    got = _fresh(_SPIKE)
    assert got["peak"] >= got["rss"] + got["extra"] - 32


_SMALL_CHILD = """
import importlib.util, json, psutil
spec = importlib.util.spec_from_file_location("memory", {path!r})
memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory)  # the module alone: no torch, so the child stays small
print(json.dumps({{"peak": memory.peak_rss_mb(), "rss": psutil.Process().memory_info().rss / 2**20}}))
"""

_BIG_PARENT = """
import json, subprocess, sys
held = b"x" * (512 * 2**20)  # every page written: 512 MiB resident in the forking process
out = subprocess.run([sys.executable, "-c", {child!r}], capture_output=True, text=True, check=True)
print(out.stdout.strip().splitlines()[-1])
"""


def test_a_child_of_a_large_process_reports_its_own_peak() -> None:
    """``ru_maxrss`` starts a fork + exec child at its parent's RSS; the peak must be the child's own."""
    if sys.platform != "linux":
        pytest.skip("the inherited peak is a Linux fact; other systems use ru_maxrss as it is")
    if psutil.virtual_memory().available < 4 * 2**30:
        pytest.skip("needs about 600 MiB for the large parent")
    import pare.eval.memory as memory

    got = _fresh(_BIG_PARENT.format(child=_SMALL_CHILD.format(path=memory.__file__)))
    assert got["peak"] >= got["rss"] * 0.9
    assert got["peak"] < 256, got  # a bare Python with psutil; the parent held 512 MiB


def test_freed_heap_memory_goes_back_to_the_system() -> None:
    """Many freed blocks of a few MiB (below glibc's raised mmap threshold) stay resident until trimmed."""
    import sys

    import psutil
    import torch

    from pare.eval.memory import return_freed_memory

    big = torch.empty(16 * 2**20, dtype=torch.uint8)  # freeing a mmapped block raises glibc's mmap threshold
    big.fill_(1)
    del big
    blocks = [torch.ones(2**20, dtype=torch.float32) for _ in range(100)]  # 400 MiB from the heap
    del blocks[:-1]  # holes below the one still alive: free() alone cannot give them back
    before = psutil.Process().memory_info().rss
    trimmed = return_freed_memory()
    after = psutil.Process().memory_info().rss
    if not sys.platform.startswith("linux"):
        assert trimmed is False
    else:
        assert after < before - 200 * 2**20, (before, after)
