"""Pruning methods: one file per method, each a config dataclass plus a stage class registered
with ``@pare.config.register``.

``METHODS`` maps the CLI / config / recipe name of each registered method to its stage class; it is
the registry itself, so a method registered anywhere (a plugin, a test) is listed here too.
Third-party packages can register theirs through the ``pare.methods`` entry-point group: each entry
point names a module, imported here so that its ``@register`` runs.
"""

from __future__ import annotations

import logging

from pare.config import STAGES, stage_class
from pare.methods.angular import AngularConfig, AngularPruner
from pare.methods.base import PruneContext, Pruner, SparsityConfig, SparsityPruner, StructuralPruner
from pare.methods.experts import ExpertsConfig, ExpertsPruner
from pare.methods.gradual import GradualConfig, GradualStage
from pare.methods.layers import LayersConfig, LayersPruner
from pare.methods.magnitude import MagnitudeConfig, MagnitudePruner
from pare.methods.osscar import OsscarConfig, OsscarPruner
from pare.methods.ppl_window import PplWindowConfig, PplWindowPruner
from pare.methods.quantize import QuantizeConfig, QuantizePruner
from pare.methods.recover import RecoverConfig, RecoverStage
from pare.methods.shortgpt import ShortGPTConfig, ShortGPTPruner
from pare.methods.slicegpt import SliceGPTConfig, SliceGPTPruner
from pare.methods.sparsegpt import SparseGPTConfig, SparseGPTPruner
from pare.methods.sublayer import SublayerConfig, SublayerPruner
from pare.methods.wanda import WandaConfig, WandaPruner
from pare.methods.width import WidthConfig, WidthPruner

log = logging.getLogger(__name__)

METHODS: dict[str, type[Pruner]] = STAGES
"""Every registered method by name (the registry of :mod:`pare.config`)."""


def _load_entry_points() -> None:
    """Import the modules third-party packages list under the ``pare.methods`` entry-point group."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="pare.methods"):
        try:
            ep.load()
        except Exception as exc:  # a broken plugin must not break pare
            log.warning("method plugin %s could not be loaded: %s", ep.name, exc)


_load_entry_points()

DEFAULT_METHOD = "wanda" if "wanda" in METHODS else "magnitude"
"""The method ``make demo`` and the docs lead with: Wanda needs no weight update and little memory."""


def pruner_for(method: str) -> type[Pruner]:
    """The stage class of a method name, with the list of valid names on error."""
    stage: type[Pruner] = stage_class(method)
    return stage


__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "AngularConfig",
    "AngularPruner",
    "ExpertsConfig",
    "ExpertsPruner",
    "GradualConfig",
    "GradualStage",
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
    "QuantizeConfig",
    "QuantizePruner",
    "RecoverConfig",
    "RecoverStage",
    "ShortGPTConfig",
    "ShortGPTPruner",
    "SliceGPTConfig",
    "SliceGPTPruner",
    "SparseGPTConfig",
    "SparseGPTPruner",
    "SparsityConfig",
    "SparsityPruner",
    "StructuralPruner",
    "SublayerConfig",
    "SublayerPruner",
    "WandaConfig",
    "WandaPruner",
    "WidthConfig",
    "WidthPruner",
    "pruner_for",
]
