"""ShortGPT: remove the layers with the lowest Block Influence.

Men et al., 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect"
(arXiv 2403.03853). For each decoder layer ``i`` with input ``x_i`` and output ``x_{i+1}``:

    BI_i = 1 - E_{X,t} [ x_{i,t}^T x_{i+1,t} / (||x_{i,t}|| ||x_{i+1,t}||) ]

averaged over every token ``t`` of the calibration windows ``X``, on the dense model (each layer sees
the unpruned model's inputs). The ``k`` layers with the smallest BI are removed, consecutive or not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pare.arch.surgery.depth import choose_layers
from pare.config import register
from pare.methods.base import PruneContext
from pare.methods.layers import CountedDepthPruner, DepthConfig, apply_layer_removal
from pare.ops.similarity import token_cosine


def block_influences(ctx: PruneContext) -> list[float]:
    """BI of every layer over all calibration tokens (dense inputs)."""
    runner = ctx.runner(sequential=False)
    scores = [float("inf")] * ctx.arch.num_layers  # a layer the data never runs is never chosen
    for step in runner.steps():
        assert step.dense_outputs is not None
        total, count = 0.0, 0
        for x_in, x_out in zip(step.inputs, step.dense_outputs, strict=True):
            cos = token_cosine(x_in, x_out)
            total, count = total + float(cos.sum()), count + cos.numel()
        scores[step.index] = 1.0 - total / count
    return scores


@dataclass(frozen=True)
class ShortGPTConfig(DepthConfig):
    """Remove the ``k`` layers of lowest Block Influence (not necessarily consecutive)."""

    method: ClassVar[str] = "shortgpt"


@register
class ShortGPTPruner(CountedDepthPruner):
    """Block Influence ranking over calibration tokens, then whole-layer removal."""

    config_class = ShortGPTConfig
    prunes_vision: ClassVar[bool] = True
    config: ShortGPTConfig

    @torch.no_grad()
    def run(self, ctx: PruneContext) -> None:
        k = self.config.layer_count(ctx.model, ctx.arch)
        bi = block_influences(ctx)
        order = sorted(range(len(bi)), key=lambda i: (bi[i], i))
        chosen, skipped = choose_layers(ctx.model, ctx.arch, order, k)
        ctx.report.scores["block_influence"] = {str(i): s for i, s in enumerate(bi)}
        why = (f"lowest Block Influence (1 - mean cos(input, output)) of {len(bi)} layers: "
               + ", ".join(f"{i}: {bi[i]:.4f}" for i in chosen))
        if skipped:
            why += "; skipped (cannot be removed): " + "; ".join(skipped)
        apply_layer_removal(ctx, chosen, why)
