"""Width surgery: MLP channels, attention heads, hidden size (structured width pruning)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

REPLAY: dict[str, Callable[[nn.Module, dict[str, Any]], None]] = {}
