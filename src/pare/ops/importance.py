"""Channel / group importance scores for structured width pruning (pure tensor math).

A *channel* is one index of a width dimension shared by several matrices: an MLP intermediate
channel ``j`` is row ``j`` of gate/up and column ``j`` of down; a hidden channel is a column of every
reader (q/k/v/gate/up) and a row of every writer (o/down); a head is ``head_dim`` consecutive channels
of the attention width. Scores here are per channel, ``[C]``; :func:`group_sum` folds them per head.
Higher means more important. All matrices are ``W: [out, in]``.
"""

from __future__ import annotations

import torch


def magnitude_out(w: torch.Tensor, p: int = 1) -> torch.Tensor:
    """``sum_i |W[j, i]|^p`` per output row ``j`` (group L1 for p=1, squared L2 for p=2). ``[out]``."""
    return w.float().abs().pow(p).sum(1)


def magnitude_in(w: torch.Tensor, p: int = 1) -> torch.Tensor:
    """``sum_o |W[o, j]|^p`` per input column ``j``. ``[in]``."""
    return w.float().abs().pow(p).sum(0)


def activation_in(w: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """Wanda-style channel score (Sun et al., 2023, arXiv 2306.11695) for input columns.

    ``S_j = sum_o |W[o, j]| * ||X_j||_2``: the Wanda element score ``|W_oj| ||X_j||`` summed over
    the structure that removing input channel ``j`` deletes.

    Args:
        w: ``[out, in]``.
        x_norm: ``||X_j||_2`` over calibration tokens, ``[in]``.
    """
    return w.float().abs().sum(0) * x_norm.float().to(w.device)


def taylor(w: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """First-order Taylor element importance ``|w * dL/dw|`` (LLM-Pruner, Ma et al., 2023,
    arXiv 2305.11627, eq. 4: ``I(W) ~ |dL/dW . W|``); sum it over a group for the group score."""
    return (w.float() * grad.float()).abs()


def fluctuation(w: torch.Tensor, x_var: torch.Tensor) -> torch.Tensor:
    """FLAP fluctuation metric (An et al., 2024, arXiv 2312.11983, eq. 5) per input channel.

    ``S_j = Var_t(X[t, j]) * ||W[:, j]||_2^2``: how much the output moves when channel ``j`` is
    replaced by its mean (the baseline the bias compensation restores).

    Args:
        w: ``[out, in]``.
        x_var: variance of each input channel over calibration tokens, ``[in]``.
    """
    return x_var.float().to(w.device) * w.float().pow(2).sum(0)


def bias_compensation(w: torch.Tensor, x_mean: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """FLAP bias compensation (eq. 6): ``b' = W[:, P] @ mean(X[:, P])`` for the pruned inputs ``P``.

    Adding ``b'`` to the output bias replaces every removed channel by its calibration mean
    instead of zero. Returns ``[out]`` in ``w``'s dtype.
    """
    p = pruned.to(w.device)
    return (w[:, p].float() @ x_mean.float().to(w.device)[p]).to(w.dtype)


def group_sum(scores: torch.Tensor, group: int) -> torch.Tensor:
    """Sum consecutive blocks of ``group`` channels: ``[C] -> [C / group]`` (per-head scores)."""
    return scores.reshape(-1, group).sum(1)


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """``(s - mean) / std`` so that scores of different layers can be ranked together (FLAP's
    adaptive structure search standardises per layer before the global ranking)."""
    s = scores.float()
    std = s.std() if s.numel() > 1 else s.new_tensor(1.0)
    return (s - s.mean()) / (std + 1e-12)


def keep_top(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Sorted indices of the ``n_keep`` highest scores (ties broken by lower index)."""
    if n_keep >= scores.numel():
        return torch.arange(scores.numel(), device=scores.device)
    order = torch.argsort(scores.float(), descending=True, stable=True)
    return order[:n_keep].sort().values


def round_width(width: float, total: int, multiple: int = 1, power_of_two: bool = False,
                minimum: int = 1) -> int:
    """A kept width near ``width``: a multiple of ``multiple`` (rounded to nearest, at least one
    multiple when possible), or the nearest power of two; clipped to ``[minimum, total]``."""
    w = float(width)
    if power_of_two:
        k = max(0, round(torch.log2(torch.tensor(max(w, 1.0))).item()))
        out = 2**k
    elif multiple > 1:
        out = max(multiple, round(w / multiple) * multiple)
    else:
        out = round(w)
    return int(min(total, max(minimum, out)))


__all__ = [
    "activation_in",
    "bias_compensation",
    "fluctuation",
    "group_sum",
    "keep_top",
    "magnitude_in",
    "magnitude_out",
    "round_width",
    "standardize",
    "taylor",
]
