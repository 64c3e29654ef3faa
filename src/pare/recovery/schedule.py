"""Sparsity schedules of gradual pruning.

Zhu & Gupta (2017), "To prune, or not to prune", eq. 1: after step ``t`` of ``n``,
``s_t = s_f + (s_i - s_f) * (1 - t / n)^3`` (``cubic``: large cuts early, while the network still
has redundancy, small ones near the end); ``linear`` is ``s_i + (s_f - s_i) * t / n``.
"""

from __future__ import annotations

SCHEDULES = ("cubic", "linear")


def sparsity_schedule(initial: float, final: float, steps: int, kind: str = "cubic") -> list[float]:
    """The sparsity to reach after each of ``steps`` prune steps; the last is ``final``."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    out = []
    for t in range(1, steps + 1):
        frac = t / steps
        s = final + (initial - final) * (1 - frac) ** 3 if kind == "cubic" else initial + (final - initial) * frac
        out.append(final if t == steps else s)
    return out
