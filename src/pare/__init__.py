"""pare: prune Hugging Face causal LMs and prove what each cut costs."""

__version__ = "0.1.0"

from pare.api import evaluate, load, load_model, prune, save  # noqa: E402
from pare.arch import ArchOverride, describe  # noqa: E402
from pare.config import CalibrationConfig, RuntimeConfig  # noqa: E402
from pare.methods import METHODS, MagnitudeConfig  # noqa: E402
from pare.report import Report  # noqa: E402

__all__ = [
    "METHODS",
    "ArchOverride",
    "CalibrationConfig",
    "MagnitudeConfig",
    "Report",
    "RuntimeConfig",
    "__version__",
    "describe",
    "evaluate",
    "load",
    "load_model",
    "prune",
    "save",
]
