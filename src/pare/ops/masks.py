"""Pruning masks from importance scores. ``True`` in a mask means *prune this weight*.

All functions take ``scores: [out, in]`` (higher = more important) and never modify them.
"""

from __future__ import annotations

import torch

from pare.errors import ConfigError


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """``"unstructured"``/None -> None; ``"2:4"`` -> (2, 4): prune N of every M consecutive inputs."""
    if pattern is None or pattern in ("", "unstructured"):
        return None
    try:
        n_str, m_str = pattern.split(":")
        n, m = int(n_str), int(m_str)
    except ValueError as exc:
        raise ConfigError(
            f"pattern {pattern!r} is not 'unstructured' or 'N:M' (e.g. '2:4', '4:8')"
        ) from exc
    if not (0 < n < m):
        raise ConfigError(
            f"pattern {pattern!r}: need 0 < N < M (N weights pruned in every group of M), e.g. 2:4 or 4:8"
        )
    return n, m


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``floor(in * sparsity)`` lowest scores of every output row (Wanda's comparison group)."""
    k = int(scores.shape[1] * sparsity)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k == 0:
        return mask
    idx = torch.topk(scores, k, dim=1, largest=False).indices
    return mask.scatter_(1, idx, True)


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``floor(numel * sparsity)`` lowest scores of the whole matrix."""
    k = int(scores.numel() * sparsity)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k == 0:
        return mask.view_as(scores)
    idx = torch.topk(scores.flatten(), k, largest=False).indices
    return mask.scatter_(0, idx, True).view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the ``n`` lowest scores in every group of ``m`` consecutive input columns of each row."""
    out_f, in_f = scores.shape
    if in_f % m:
        raise ConfigError(f"an {n}:{m} pattern needs the input width ({in_f}) to be a multiple of {m}")
    groups = scores.reshape(out_f, in_f // m, m)
    idx = torch.topk(groups, n, dim=2, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(out_f, in_f)


def make_mask(
    scores: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None, per_row: bool = True
) -> torch.Tensor:
    """Dispatch to :func:`nm_mask`, :func:`row_mask` or :func:`layer_mask`."""
    if pattern is not None:
        return nm_mask(scores, *pattern)
    return row_mask(scores, sparsity) if per_row else layer_mask(scores, sparsity)
