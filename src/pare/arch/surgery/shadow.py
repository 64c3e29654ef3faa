"""A parameter-free copy of a model, to try cuts on before any work.

A recipe's stages are checked before the first one runs; a stage after a cut must be checked on the
shapes the cut will leave. :func:`meta_copy` gives a copy whose parameters and buffers live on the
``meta`` device (shapes and dtypes only, no memory), so the earlier stages' cuts can be made on it
with the ordinary surgery and the result described and checked like the real model.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def meta_copy(model: nn.Module) -> nn.Module | None:
    """A deep copy of ``model`` (modules, config, attributes) with every parameter and buffer on the
    ``meta`` device; tied parameters stay tied. None when the model cannot be copied (a module holding
    something ``copy.deepcopy`` refuses): the caller then checks on the real shapes later."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    try:
        return copy.deepcopy(model, memo)
    except Exception:
        log.debug("cannot copy %s to the meta device", type(model).__name__, exc_info=True)
        return None


__all__ = ["meta_copy"]
