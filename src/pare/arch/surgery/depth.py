"""Depth surgery: remove decoder layers and attention/MLP sub-layers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

REPLAY: dict[str, Callable[[nn.Module, dict[str, Any]], None]] = {}
