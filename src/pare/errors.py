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


class SaveInterrupted(KeyboardInterrupt):
    """Ctrl-C during (or right after) a save; the message says what is on disk at ``path`` now.

    Attributes:
        path: the output directory.
        saved: True when ``path`` holds the complete new model (the final rename had happened).
    """

    def __init__(self, path: object, saved: bool, existed: bool = False) -> None:
        self.path = path
        self.saved = saved
        if saved:
            text = f"{str(path)!r} holds the complete saved model"
        elif existed:
            text = f"{str(path)!r} was not changed (it still holds the model that was there); no partial files remain"
        else:
            text = f"nothing was saved ({str(path)!r} was not created; no partial files remain)"
        super().__init__(text)
