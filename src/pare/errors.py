"""Exceptions pare raises for bad input. Each message says what is wrong and what would work."""

from __future__ import annotations


class PareError(Exception):
    """Base class for every error pare raises on purpose."""


class ConfigError(PareError, ValueError):
    """A configuration value is invalid (ratio out of range, bad pattern, unknown field...)."""


class UnsupportedArchitectureError(PareError, ValueError):
    """pare could not infer a model's roles (layers, attention, MLP) and has no override for it."""


class DataNotFoundError(PareError, FileNotFoundError):
    """A named data set or data file could not be found in any of the places pare looked."""


class NotEnoughDataError(PareError, ValueError):
    """The data holds fewer tokens than the calibration or evaluation asks for."""


class OutputExistsError(PareError, FileExistsError):
    """The output directory exists and overwriting was not asked for."""


class ModelNotFoundError(PareError, OSError):
    """A model id or path could not be loaded."""


class CorruptFileError(PareError, ValueError):
    """A model file is damaged or tampered with: truncated weights, a weight index naming files outside the
    model directory, a manifest whose edits cannot describe a model."""


class NotCausalLMError(UnsupportedArchitectureError):
    """The model is not a causal (decoder-only) LM, e.g. an encoder-decoder such as T5."""


class SaveError(PareError, OSError):
    """Writing a model failed (a full disk...); the partial files were removed."""
