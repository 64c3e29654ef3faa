"""Angular distance: remove the ``n``-layer span whose input and output point the same way.

Gromov et al., 2024, "The Unreasonable Ineffectiveness of the Deeper Layers" (arXiv 2403.17887).
With ``x^l`` the hidden state entering layer ``l`` (``x^L`` the last layer's output):

    d(x^l, x^{l+n}) = (1/pi) arccos( x^l . x^{l+n} / (||x^l|| ||x^{l+n}||) )

averaged over the calibration tokens (``tokens="all"``; the paper uses the last token of each
sequence, ``tokens="last"``). Layers ``[l*, l*+n)`` with ``l* = argmin_l d`` are removed; the paper then
heals with a little fine-tuning, which pare does not do.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pare.arch.roles import ModelArch
from pare.arch.surgery.depth import first_valid_span
from pare.config import help_field, register
from pare.errors import ConfigError
from pare.methods.base import PruneContext
from pare.methods.layers import CountedDepthPruner, DepthConfig, apply_layer_removal
from pare.ops.similarity import angular_distance


def _mean_distance(a: list[torch.Tensor], b: list[torch.Tensor], last: bool) -> float:
    total, count = 0.0, 0
    for x, y in zip(a, b, strict=True):
        if last:
            x, y = x[:, -1], y[:, -1]
        d = angular_distance(x, y)
        total, count = total + float(d.sum()), count + d.numel()
    return total / count


def span_distances(ctx: PruneContext, n: int, last: bool = False) -> list[float]:
    """Mean angular distance between the inputs of layer ``l`` and ``l+n``, for l = 0..L-n.

    Keeps only the last ``n + 1`` layer inputs in memory.
    """
    runner = ctx.runner(sequential=False)
    window: deque[list[torch.Tensor]] = deque(maxlen=n + 1)
    out: list[float] = []
    for step in runner.steps():
        window.append(step.inputs)
        if len(window) == n + 1:
            out.append(_mean_distance(window[0], window[-1], last))
    assert runner.final_hidden is not None
    window.append(runner.final_hidden)
    out.append(_mean_distance(window[0], window[-1], last))
    return out


@dataclass(frozen=True)
class AngularConfig(DepthConfig):
    """Remove the ``n`` consecutive layers with the smallest input/output angular distance.

    Attributes:
        tokens: ``all`` (average over every token) or ``last`` (the paper's last token per window).
    """

    method: ClassVar[str] = "angular"

    tokens: str = help_field("all", "average the distance over 'all' tokens or the 'last' token of each window")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tokens not in ("all", "last"):
            raise ConfigError(f"tokens must be 'all' or 'last', got {self.tokens!r}")


@register
class AngularPruner(CountedDepthPruner):
    """Angular-distance span selection, then whole-layer removal."""

    config_class = AngularConfig
    prunes_vision: ClassVar[bool] = True
    config: AngularConfig

    def check(self, model: nn.Module, arch: ModelArch) -> None:
        super().check(model, arch)
        if arch.vision is not None and self.config.tokens == "last":
            raise ConfigError("component='vision': tokens='last' scores the last token of each text window; an "
                              "image's patches have no last token that sums it up: use tokens='all'")

    @torch.no_grad()
    def run(self, ctx: PruneContext) -> None:
        n = self.config.layer_count(ctx.model, ctx.arch)
        dist = span_distances(ctx, n, last=self.config.tokens == "last")
        order = sorted(range(len(dist)), key=lambda i: (dist[i], i))
        best, skipped = first_valid_span(ctx.model, ctx.arch, order, n)
        ctx.report.scores["angular_distance"] = [
            {"layers": list(range(s, s + n)), "distance": d} for s, d in enumerate(dist)
        ]
        why = (f"span {best}-{best + n - 1} has the smallest angular distance ({dist[best]:.4f}) "
               f"between its input and output among {len(dist)} spans of {n} layers")
        if skipped:
            why = why.replace("smallest", "smallest removable") + "; skipped: " + "; ".join(skipped)
        apply_layer_removal(ctx, list(range(best, best + n)), why)
