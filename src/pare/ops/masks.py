"""Pruning masks from importance scores. ``True`` in a mask means *prune this weight*.

All functions take ``scores: [out, in]`` (higher = more important) and never modify them.
"""

from __future__ import annotations

import numpy as np
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


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mark exactly the ``k`` lowest scores of every row of a 2-D tensor (ties: leftmost first).

    A per-row threshold (:func:`kth_smallest`; no ``int64`` index tensor as ``topk`` would make).
    When some row has ties at its threshold, the entries equal to it are added left to right until
    the row has exactly ``k``.
    """
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= scores.shape[1]:
        return torch.ones_like(scores, dtype=torch.bool)
    thr = kth_smallest(scores, k)
    mask = scores <= thr
    if int(torch.count_nonzero(mask)) == k * scores.shape[0]:  # no ties at any threshold
        return mask
    mask = scores < thr
    missing = k - mask.sum(1, keepdim=True)
    ties = scores == thr
    ties &= ties.cumsum(1) <= missing
    mask.logical_or_(ties)
    if bool((mask.sum(1) != k).any()):  # only NaN thresholds get here: NaN is neither below nor equal
        raise ValueError(f"cannot choose the {k} lowest scores of a row: scores contain NaN")
    return mask


def kth_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th smallest value of every row of a 2-D tensor, ``[rows, 1]`` (NaN sorts last).

    On the CPU, NumPy's introselect (``np.partition``) is used (faster than ``torch.kthvalue``; the
    README has the measurement). Other devices and dtypes use ``kthvalue``.
    """
    if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64):
        part = np.partition(scores.detach().numpy(), k - 1, axis=1)
        return torch.from_numpy(part[:, k - 1:k].copy())
    return scores.kthvalue(k, dim=1, keepdim=True).values


def zero_masked_(weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Set ``weight`` to zero where ``mask`` is True, in place: a multiply, then ``+ 0.0`` so that
    negative weights become ``+0.0`` rather than ``-0.0`` (cheaper than ``masked_fill_`` on CPU)."""
    weight.mul_(mask.logical_not()).add_(0.0)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``floor(in * sparsity)`` lowest scores of every output row (Wanda's comparison group)."""
    return lowest_k_mask(scores, int(scores.shape[1] * sparsity))


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``floor(numel * sparsity)`` lowest scores of the whole matrix."""
    return lowest_k_mask(scores.reshape(1, -1), int(scores.numel() * sparsity)).view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the ``n`` lowest scores in every group of ``m`` consecutive input columns of each row."""
    out_f, in_f = scores.shape
    if in_f % m:
        raise ConfigError(f"the {n}:{m} pattern needs the input width ({in_f}) to be a multiple of {m}")
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
