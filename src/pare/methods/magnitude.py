"""Magnitude pruning: zero the weights with the smallest ``|W_ij|``.

The classic data-free baseline (Han et al., 2015, "Learning both Weights and Connections"). Scores
are compared across the whole matrix (``granularity="layer"``, the baseline of the SparseGPT and
Wanda papers and llm-compressor's magnitude mask) or within each output row (``granularity="row"``,
Wanda's comparison group); an N:M pattern compares within each group of M inputs. Neither wins
everywhere (the README has the comparison).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pare.arch.targets import Target
from pare.calibration.stats import InputStats
from pare.config import help_field, register
from pare.errors import ConfigError
from pare.methods.base import SparsityConfig, SparsityPruner
from pare.ops.finite import check_finite_weight
from pare.ops.masks import make_mask, zero_masked_


@dataclass(frozen=True)
class MagnitudeConfig(SparsityConfig):
    """Magnitude pruning options.

    Attributes:
        granularity: ``layer`` (compare across the whole matrix) or ``row`` (within each output row).
    """

    method: ClassVar[str] = "magnitude"

    granularity: str = help_field("layer", "compare weights across the whole matrix ('layer') or within each 'row'")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.granularity not in ("row", "layer"):
            raise ConfigError(f"granularity must be 'row' or 'layer', got {self.granularity!r}")


@register
class MagnitudePruner(SparsityPruner):
    """Zero the smallest-magnitude weights of every target matrix."""

    config_class = MagnitudeConfig
    prunes_vision: ClassVar[bool] = True
    config: MagnitudeConfig
    needs_calibration: ClassVar[bool] = False

    def prune_target(self, target: Target, stats: InputStats | None, sparsity: float) -> None:
        w = target.weight()
        check_finite_weight(w, target.name)  # NaN sorts anywhere: a mask from it would be arbitrary
        mask = make_mask(w.abs().float(), sparsity, self.config.nm, per_row=self.config.granularity == "row")
        zero_masked_(w, mask)
