"""Wanda: prune by weight magnitude times input activation norm, within each output row.

Sun, Liu, Bair & Kolter, 2023, "A Simple and Effective Pruning Approach for Large Language Models"
(arXiv:2306.11695). The score of weight ``W_ij`` is

    S_ij = |W_ij| * ||X_j||_2                                                       (paper, Eq. 1)

where ``X_j`` is input feature ``j`` over all calibration tokens; weights are compared within each
output row (the paper's "per output" comparison group), or within each group of M inputs for N:M.
No weight is updated.
"""

from __future__ import annotations

import torch

from pare.errors import ConfigError


def wanda_scores(W: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``|W| * ||X_j||`` in fp32.

    Args:
        W: ``[out, in]`` weights.
        norms: ``[in]`` input-feature L2 norms over the calibration tokens.
    """
    return W.detach().float().abs() * norms.to(W.device, torch.float32).unsqueeze(0)


def lowest_indices(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    """Indices of the weights to prune: the ``floor(in * sparsity)`` lowest scores of every row
    (``[out, k]``), or the N lowest of every group of M consecutive inputs (``[out, in/M, N]``).

    The selection is unordered (``topk(sorted=False)``: the same set, without the sort).
    """
    out_f, in_f = scores.shape
    if nm is None:
        k = int(in_f * sparsity)
        return torch.topk(scores, k, dim=1, largest=False, sorted=False).indices
    n, m = nm
    if in_f % m:
        raise ConfigError(f"the {n}:{m} pattern needs the input width ({in_f}) to be a multiple of {m}")
    return torch.topk(scores.view(out_f, in_f // m, m), n, dim=2, largest=False, sorted=False).indices


def wanda_mask(
    W: torch.Tensor, norms: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None
) -> torch.Tensor:
    """Prune mask (``True`` = prune) of ``W: [out, in]``: the ``floor(in * sparsity)`` lowest scores
    of every row, or the N lowest of every M consecutive inputs with ``nm``."""
    scores = wanda_scores(W, norms)
    idx = lowest_indices(scores, sparsity, nm)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if nm is None:
        return mask.scatter_(1, idx, True)
    return mask.view(idx.shape[0], -1, nm[1]).scatter_(2, idx, True).view_as(scores)


def wanda_prune_(W: torch.Tensor, norms: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> None:
    """Zero the weights :func:`wanda_mask` selects, in place, without building the mask."""
    idx = lowest_indices(wanda_scores(W, norms), sparsity, nm)
    if not W.is_contiguous():  # e.g. GPT-2's Conv1D seen as [out, in] through a transpose
        W.masked_fill_(wanda_mask(W, norms, sparsity, nm), 0)
    elif nm is None:
        W.scatter_(1, idx, 0.0)
    else:
        W.view(idx.shape[0], -1, nm[1]).scatter_(2, idx, 0.0)
