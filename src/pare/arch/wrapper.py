"""A module that stands in another's place (a decoder layer, an experts block) and lets attribute reads
fall through to it."""

from __future__ import annotations

from typing import Any

from torch import nn


class LayerWrapper(nn.Module):
    """Holds a module as ``inner``; attributes it does not have itself are read from ``inner``, so model
    code that reads e.g. ``layer.attention_type`` keeps working. Subclasses define ``forward``.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


__all__ = ["LayerWrapper"]
