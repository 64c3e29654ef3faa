"""Pruning methods: one file per method, each a config dataclass plus a pruner.

``METHODS`` maps the CLI / config name of each method to its pruner class.
"""

from __future__ import annotations

from pare.errors import ConfigError
from pare.methods.angular import AngularConfig, AngularPruner
from pare.methods.base import PruneContext, Pruner, SparsityConfig, SparsityPruner
from pare.methods.experts import ExpertsConfig, ExpertsPruner
from pare.methods.layers import LayersConfig, LayersPruner
from pare.methods.magnitude import MagnitudeConfig, MagnitudePruner
from pare.methods.osscar import OsscarConfig, OsscarPruner
from pare.methods.ppl_window import PplWindowConfig, PplWindowPruner
from pare.methods.shortgpt import ShortGPTConfig, ShortGPTPruner
from pare.methods.slicegpt import SliceGPTConfig, SliceGPTPruner
from pare.methods.sparsegpt import SparseGPTConfig, SparseGPTPruner
from pare.methods.sublayer import SublayerConfig, SublayerPruner
from pare.methods.wanda import WandaConfig, WandaPruner
from pare.methods.width import WidthConfig, WidthPruner

METHODS: dict[str, type[Pruner]] = {
    "magnitude": MagnitudePruner,
    "osscar": OsscarPruner,
    "width": WidthPruner,
    "wanda": WandaPruner,
    "sparsegpt": SparseGPTPruner,
    "shortgpt": ShortGPTPruner,
    "angular": AngularPruner,
    "ppl-window": PplWindowPruner,
    "layers": LayersPruner,
    "sublayer": SublayerPruner,
    "slicegpt": SliceGPTPruner,
    "experts": ExpertsPruner,
}


DEFAULT_METHOD = "wanda" if "wanda" in METHODS else "magnitude"
"""The method ``make demo`` and the docs lead with: Wanda needs no weight update and little memory."""


def pruner_for(method: str) -> type[Pruner]:
    """The pruner class of a method name, with the list of valid names on error."""
    try:
        return METHODS[method]
    except KeyError:
        raise ConfigError(f"unknown method {method!r}; choose one of {sorted(METHODS)}") from None


__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "AngularConfig",
    "AngularPruner",
    "ExpertsConfig",
    "ExpertsPruner",
    "LayersConfig",
    "LayersPruner",
    "MagnitudeConfig",
    "MagnitudePruner",
    "OsscarConfig",
    "OsscarPruner",
    "PplWindowConfig",
    "PplWindowPruner",
    "PruneContext",
    "Pruner",
    "ShortGPTConfig",
    "ShortGPTPruner",
    "SliceGPTConfig",
    "SliceGPTPruner",
    "SparseGPTConfig",
    "SparseGPTPruner",
    "SparsityConfig",
    "SparsityPruner",
    "SublayerConfig",
    "SublayerPruner",
    "WandaConfig",
    "WandaPruner",
    "WidthConfig",
    "WidthPruner",
    "pruner_for",
]
