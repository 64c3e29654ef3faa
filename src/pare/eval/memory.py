"""Memory figures of this process."""

from __future__ import annotations

import sys

import psutil


def _vm_hwm_kib() -> int | None:
    """``VmHWM`` of ``/proc/self/status`` (Linux), in KiB; None where the file or the field is missing."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss_mb() -> float:
    """The peak resident set size of this process so far, in MiB.

    On Linux, ``VmHWM`` from ``/proc/self/status``: the high-water mark of this process's own memory.
    (``ru_maxrss`` is not: a process started by fork + exec begins with the forking process's RSS as
    its peak, so a small child of a large parent reports the parent's size.) Elsewhere
    ``resource.getrusage`` (``ru_maxrss``: KiB on Linux, bytes on macOS); on Windows, psutil's peak
    working set.
    """
    hwm = _vm_hwm_kib()
    if hwm is not None:
        return hwm / 2**10
    try:
        import resource
    except ImportError:  # Windows
        info = psutil.Process().memory_info()
        return float(getattr(info, "peak_wset", info.rss)) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def return_freed_memory() -> bool:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``); False where there is none.

    glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, so after the first
    large tensor the many blocks of a few MiB that a layer's work allocates come from the heap, whose
    free holes the system keeps counting as resident. A streamed run calls this after each layer, so
    that one layer's holes do not add to the next layer's peak.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False
