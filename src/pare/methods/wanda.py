"""Wanda: prune by ``|W_ij| * ||X_j||_2`` within each output row, no weight update.

Sun, Liu, Bair & Kolter, 2023, "A Simple and Effective Pruning Approach for Large Language Models"
(arXiv:2306.11695), Eq. 1. Statistics: the L2 norm of every input feature over the calibration
tokens, gathered layer by layer (each layer sees the already-pruned layers' outputs unless
``RuntimeConfig(sequential=False)``). The math is in :mod:`pare.ops.wanda`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pare.arch.roles import ModelArch
from pare.arch.targets import Target
from pare.calibration.stats import STAT_NORMS, InputStats, RouterWeightedStats
from pare.config import help_field, register
from pare.errors import ConfigError, PareError
from pare.methods.base import SparsityConfig, SparsityPruner
from pare.ops.finite import check_finite_weight, non_finite_hint
from pare.ops.masks import make_mask
from pare.ops.wanda import wanda_prune_

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WandaConfig(SparsityConfig):
    """Wanda options: those of :class:`SparsityConfig` (sparsity, pattern, profile...).

    Attributes:
        router_weighted: inside MoE experts, weight each token's activations by the router's gate value
            for that expert before taking ``||X_j||`` (MoE-Pruner, Xie et al., 2024, arXiv 2410.12013):
            tokens the router barely sends to an expert count less in its scores. Other matrices are
            scored as plain Wanda.
    """

    method: ClassVar[str] = "wanda"

    router_weighted: bool = help_field(False, "MoE experts: gate-weighted activation norms (MoE-Pruner)")


@register
class WandaPruner(SparsityPruner):
    """Zero the lowest ``|W| * ||X||`` scores of every row (or of every group of M inputs)."""

    config_class = WandaConfig
    prunes_vision: ClassVar[bool] = True
    config: WandaConfig
    stats: ClassVar[frozenset[str]] = frozenset({STAT_NORMS})

    def check(self, model: nn.Module, arch: ModelArch) -> None:
        super().check(model, arch)
        if self.config.router_weighted and not any(r.experts is not None for r in arch.layers):
            raise ConfigError(f"router_weighted weights expert activations by the router's gates, but "
                              f"{arch.model_type} has no routed experts: drop --router-weighted")

    def new_stats(self, target: Target) -> InputStats:
        if self.config.router_weighted and target.expert is not None:
            return RouterWeightedStats()
        return super().new_stats(target)

    def prune_target(self, target: Target, stats: InputStats | None, sparsity: float) -> None:
        w = target.weight()
        if stats is None or stats.tokens == 0:
            log.warning("%s received no calibration tokens: pruned by magnitude instead", target.name)
            w.masked_fill_(make_mask(w.abs().float(), sparsity, self.config.nm, per_row=True), 0)
        else:
            norms = stats.norms()
            if not bool(torch.isfinite(norms).all()):
                raise PareError(f"{target.name}: its calibration activations hold NaN or inf, so its scores mean "
                                f"nothing; {non_finite_hint(w.dtype)}")
            check_finite_weight(w, target.name)
            wanda_prune_(w, norms, sparsity, self.config.nm)
