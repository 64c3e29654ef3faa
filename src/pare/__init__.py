"""pare: prune Hugging Face causal LMs and prove what each cut costs."""

__version__ = "0.1.0"

from pare.api import evaluate, load, load_model, prune, run, save
from pare.arch import ArchOverride, describe
from pare.config import CalibrationConfig, PruneConfig, RuntimeConfig, config_from_dict, register
from pare.io.export import export
from pare.methods import (
    METHODS,
    AngularConfig,
    ExpertsConfig,
    LayersConfig,
    MagnitudeConfig,
    OsscarConfig,
    PplWindowConfig,
    QuantizeConfig,
    ShortGPTConfig,
    SliceGPTConfig,
    SparseGPTConfig,
    SublayerConfig,
    WandaConfig,
    WidthConfig,
)
from pare.report import Report

__all__ = [
    "METHODS",
    "AngularConfig",
    "ArchOverride",
    "CalibrationConfig",
    "ExpertsConfig",
    "LayersConfig",
    "MagnitudeConfig",
    "OsscarConfig",
    "PplWindowConfig",
    "PruneConfig",
    "QuantizeConfig",
    "Report",
    "RuntimeConfig",
    "ShortGPTConfig",
    "SliceGPTConfig",
    "SparseGPTConfig",
    "SublayerConfig",
    "WandaConfig",
    "WidthConfig",
    "__version__",
    "config_from_dict",
    "describe",
    "evaluate",
    "export",
    "load",
    "load_model",
    "prune",
    "register",
    "run",
    "save",
]
