"""Similarity of hidden states across depth, and the scores depth pruning ranks layers by.

All functions are pure tensor math; hidden states are ``[..., H]`` (any leading batch/token dims)
and every token is one sample.
"""

from __future__ import annotations

import math

import torch


def token_cosine(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Cosine similarity of each token's hidden state: ``x, y: [..., H] -> [...]`` (float64).

    Computed in float64 so that accumulating over many tokens does not drift.
    """
    if x.shape != y.shape:
        raise ValueError(f"hidden states must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    a, b = x.double(), y.double()
    dot = (a * b).sum(-1)
    norm = a.norm(dim=-1) * b.norm(dim=-1)
    return dot / norm.clamp_min(eps)


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> float:
    """ShortGPT's Block Influence of a layer (Men et al., 2024, arXiv 2403.03853, eq. 1).

    ``BI_i = 1 - E_{X,t}[ x_{i,t}^T x_{i+1,t} / (||x_{i,t}|| ||x_{i+1,t}||) ]`` where ``x_i`` is the
    layer's input and ``x_{i+1}`` its output; low BI means the layer barely changes the residual
    stream and can be removed.

    Args:
        x_in: layer inputs ``[..., H]``.
        x_out: layer outputs, same shape.
    """
    return float(1.0 - token_cosine(x_in, x_out).mean())


def angular_distance(x_l: torch.Tensor, x_ln: torch.Tensor) -> torch.Tensor:
    """Per-token angular distance ``arccos(cos(x_l, x_{l+n})) / pi`` in [0, 1].

    Gromov et al., 2024, "The Unreasonable Ineffectiveness of the Deeper Layers" (arXiv 2403.17887,
    eq. 7): ``d(x^l, x^{l+n}) = (1/pi) arccos( x^l . x^{l+n} / (||x^l|| ||x^{l+n}||) )``, with ``x^l`` the
    input of layer ``l``. The span ``[l, l+n)`` with the smallest mean distance is pruned.

    Returns:
        ``[...]`` float64 distances (average them over tokens and samples).
    """
    return torch.arccos(token_cosine(x_l, x_ln).clamp(-1.0, 1.0)) / math.pi


def relative_change(base: float, after: float) -> float:
    """``(after - base) / base``."""
    if base <= 0:
        raise ValueError(f"base value must be positive, got {base}")
    return (after - base) / base


def normalized_relative_impact(ppl_base: float, ppl_after: float, params_removed: int) -> float:
    """NRI of removing a block: relative perplexity change per parameter removed.

    ``NRI = ((PPL_after - PPL_base) / PPL_base) / params_removed``. Blocks with the lowest NRI cost
    the least quality per parameter saved (negative: removing the block even helps).

    Raises:
        ValueError: ``params_removed`` is not positive.
    """
    if params_removed <= 0:
        raise ValueError(f"params_removed must be positive, got {params_removed}")
    return relative_change(ppl_base, ppl_after) / params_removed


def perplexity_of(nll: float, tokens: int) -> float:
    """``exp(nll / tokens)``."""
    if tokens <= 0:
        raise ValueError("no tokens scored")
    return math.exp(nll / tokens)


def best_span(distances: list[float]) -> int:
    """Index of the smallest distance (the first one on ties)."""
    if not distances:
        raise ValueError("no spans to choose from")
    return min(range(len(distances)), key=lambda i: (distances[i], i))


def lowest(scores: list[float], k: int) -> list[int]:
    """Indices of the ``k`` lowest scores (ties broken by index), sorted ascending by index."""
    if not 0 <= k <= len(scores):
        raise ValueError(f"k={k} must be between 0 and {len(scores)}")
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return sorted(order[:k])
