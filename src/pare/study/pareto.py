"""The Pareto front of quality against size."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def pareto_front(points: Sequence[dict[str, Any]], x: str = "bytes", y: str = "ppl",
                 lower_is_better: bool = True) -> list[dict[str, Any]]:
    """The points no other point beats on both ``x`` (smaller is better) and ``y``.

    A point is dominated when another is at most as large and at least as good, and strictly better
    on one of the two. Points missing ``x`` or ``y`` are left out. Ties (same ``x`` and ``y``) keep
    the first. Returns the front sorted by ``x``.

    Args:
        points: dicts holding ``x`` and ``y``.
        lower_is_better: ``y`` is a loss (perplexity); False for an accuracy.
    """
    sign = 1.0 if lower_is_better else -1.0
    usable = [p for p in points if isinstance(p.get(x), (int, float)) and isinstance(p.get(y), (int, float))]
    ordered = sorted(enumerate(usable), key=lambda ip: (ip[1][x], sign * ip[1][y], ip[0]))
    front: list[dict[str, Any]] = []
    best = float("inf")
    for _, p in ordered:
        score = sign * float(p[y])
        if score < best:
            front.append(p)
            best = score
    return front


def best_within(points: Sequence[dict[str, Any]], budget: float, x: str = "bytes", y: str = "ppl",
                lower_is_better: bool = True) -> dict[str, Any] | None:
    """The best point by ``y`` among those with ``x <= budget`` (None when none fits)."""
    fits = [p for p in points if isinstance(p.get(x), (int, float)) and p[x] <= budget
            and isinstance(p.get(y), (int, float))]
    if not fits:
        return None
    return min(fits, key=lambda p: (1 if lower_is_better else -1) * p[y])
