"""Memory figures of this process."""

from __future__ import annotations

import sys

import psutil


def peak_rss_mb() -> float:
    """The peak resident set size of this process so far, in MiB.

    Uses ``resource.getrusage`` (``ru_maxrss``: KiB on Linux, bytes on macOS) where it exists;
    on Windows, psutil's peak working set; elsewhere the current RSS, the best psutil knows.
    """
    try:
        import resource
    except ImportError:  # Windows
        info = psutil.Process().memory_info()
        return float(getattr(info, "peak_wset", info.rss)) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
