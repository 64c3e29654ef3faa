"""pare: prune Hugging Face causal LMs and prove what each cut costs."""

__version__ = "0.1.0"

from pare.api import evaluate, load, load_model, prune, save
from pare.arch import ArchOverride, describe
from pare.config import CalibrationConfig, RuntimeConfig
from pare.methods import (
    METHODS,
    AngularConfig,
    ExpertsConfig,
    LayersConfig,
    MagnitudeConfig,
    OsscarConfig,
    PplWindowConfig,
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
    "Report",
    "RuntimeConfig",
    "ShortGPTConfig",
    "SliceGPTConfig",
    "SparseGPTConfig",
    "SublayerConfig",
    "WandaConfig",
    "WidthConfig",
    "__version__",
    "describe",
    "evaluate",
    "load",
    "load_model",
    "prune",
    "save",
]
