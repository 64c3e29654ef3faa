"""OWL: outlier-weighted layer-wise sparsity ratios.

Yin et al., 2024, "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning
LLMs to High Sparsity" (arXiv:2310.05175). The outlier ratio of layer ``l`` is the share of its
Wanda scores ``A_ij = |W_ij| * ||X_j||_2`` above ``M`` times the layer's mean score

    D_l = #{A_ij > M * mean(A)} / #A                                                (paper, Sec. 3)

Layers with more outliers are pruned less: ``1 - D_l`` is min-max scaled to ``[0, 2*lambda]``
and recentred on the target sparsity ``S`` (the rule of the authors' released code, which produced
the paper's results and which llm-compressor also follows). The spread is ``2*lambda`` from the
least to the most pruned layer; a single outlying layer can sit more than ``lambda`` from ``S``.
``bounded=True`` shrinks the deviations so every layer stays within ``S +- lambda`` as the paper's
text describes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch

log = logging.getLogger(__name__)


def outlier_count(scores: torch.Tensor, threshold: float) -> int:
    """How many entries of ``scores`` exceed ``threshold``."""
    return int((scores > threshold).sum())


def layer_outlier_ratio(scores: Iterable[torch.Tensor], m: float = 5.0) -> float:
    """``D_l``: share of the scores of all matrices of a layer above ``m`` times their mean.

    Args:
        scores: the layer's score tensors (any shapes), e.g. ``|W| * ||X||`` per matrix.
        m: the outlier multiple of the mean.
    """
    scores = list(scores)
    total = sum(float(s.double().sum()) for s in scores)
    numel = sum(s.numel() for s in scores)
    if numel == 0:
        return 0.0
    threshold = m * total / numel
    return sum(outlier_count(s, threshold) for s in scores) / numel


def owl_sparsities(
    outlier_ratios: Sequence[float],
    target: float,
    lam: float = 0.08,
    weights: Sequence[float] | None = None,
    max_sparsity: float = 0.99,
    bounded: bool = False,
) -> list[float]:
    """Per-layer sparsities from outlier ratios, with the weighted mean exactly ``target``.

    ``1 - D_l`` is min-max scaled to ``[0, 2*lambda]``; the values are then centred on their
    parameter-weighted mean (the plain mean when the layers are equal, as in the reference code) and
    shifted onto ``target``. Skewed scaled values give deviations beyond ``lambda``; with
    ``bounded`` they are shrunk by one common factor, so every layer stays within
    ``target +- lambda`` and the order and the mean are kept. Finally the ratios are clamped to
    ``[0, max_sparsity]``, and whatever the clamp removed is spread over the unclamped layers.

    Args:
        outlier_ratios: ``D_l`` per layer.
        target: the overall sparsity ``S``.
        lam: the spread ``lambda``.
        weights: parameters per layer (default: equal).
        max_sparsity: upper clamp.
        bounded: keep every layer within ``target +- lambda``.

    Returns:
        One sparsity per layer.
    """
    d = torch.tensor(list(outlier_ratios), dtype=torch.float64)
    w = torch.ones_like(d) if weights is None else torch.tensor(list(weights), dtype=torch.float64)
    w = w / w.sum()
    inv = 1.0 - d
    span = float(inv.max() - inv.min()) if len(d) else 0.0
    scaled = (inv - inv.min()) / span * (2 * lam) if span > 0 else torch.zeros_like(d)
    dev = scaled - (scaled * w).sum()
    biggest = float(dev.abs().max()) if len(d) else 0.0
    if bounded and biggest > lam > 0:
        dev = dev * (lam / biggest)
    s = target + dev
    for _ in range(50):
        clamped = s.clamp(0.0, max_sparsity)
        gap = target - float((clamped * w).sum())
        free = (clamped > 0) & (clamped < max_sparsity) if gap else torch.zeros_like(d, dtype=torch.bool)
        s = clamped
        if abs(gap) < 1e-12 or not bool(free.any()):
            break
        s = s + torch.where(free, gap / float(w[free].sum()), 0.0)
    if abs(float((s * w).sum()) - target) > 1e-9:
        log.warning("OWL: clamping to [0, %.2f] moved the mean sparsity to %.4f", max_sparsity, float((s * w).sum()))
    return [float(v) for v in s]
