"""Speed of 2:4 weights with PyTorch's semi-structured sparse kernels (CUDA only).

A 2:4-pruned checkpoint is stored dense; on GPUs with sparse tensor cores (Ampere and later)
``torch.sparse.to_sparse_semi_structured`` turns such a weight into the compressed format that
cuSPARSELt / CUTLASS multiply faster. This measures, for every 2:4 linear weight of a
model, ``x @ W.T`` dense vs semi-structured on the same inputs, and reports the per-module and
total speed-up. Without CUDA (or without the kernels) it says why and measures nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class SemiStructuredSpeed:
    """Total and per-module seconds of dense vs 2:4-sparse matmuls (None fields when skipped)."""

    skipped: str | None = None
    tokens: int = 0
    dense_seconds: float = 0.0
    sparse_seconds: float = 0.0
    modules: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        return self.dense_seconds / self.sparse_seconds if self.sparse_seconds else None

    def to_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "tokens": self.tokens, "dense_seconds": self.dense_seconds,
                "sparse_seconds": self.sparse_seconds, "speedup": self.speedup, "modules": self.modules}


def is_two_four(weight: torch.Tensor) -> bool:
    """True when every group of 4 consecutive inputs of every row holds at least 2 zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1) >= 2).all())


def unavailable_reason(device: torch.device) -> str | None:
    """Why the semi-structured kernels cannot run on ``device``, or None when they can."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return "2:4 sparse kernels need a CUDA device; none was used"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return "this torch build has no torch.sparse.to_sparse_semi_structured"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"2:4 sparse tensor cores need compute capability >= 8.0, this GPU has {major}.x"
    return None


def _time(fn, x: torch.Tensor, repeats: int) -> float:
    fn(x)
    torch.cuda.synchronize(x.device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    torch.cuda.synchronize(x.device)
    return (time.perf_counter() - start) / repeats


@torch.no_grad()
def measure_two_four_speedup(model: nn.Module, tokens: int = 2048, repeats: int = 20,
                             dtype: torch.dtype = torch.float16) -> SemiStructuredSpeed:
    """Dense vs semi-structured matmul time for every 2:4 ``nn.Linear`` weight of ``model``.

    Args:
        model: a model already on a CUDA device (2:4 pruned, e.g. ``pare prune --pattern 2:4``).
        tokens: rows of the random input ``x: [tokens, in]``.
        repeats: timed calls per module (after one warm-up call).
        dtype: compute dtype (the kernels take fp16 / bf16).
    """
    device = next(model.parameters()).device
    reason = unavailable_reason(device)
    if reason is not None:
        return SemiStructuredSpeed(skipped=reason)
    from torch.sparse import to_sparse_semi_structured

    out = SemiStructuredSpeed(tokens=tokens)
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not is_two_four(module.weight):
            continue
        w = module.weight.detach().to(dtype)
        x = torch.randn(tokens, w.shape[1], device=device, dtype=dtype)
        try:
            sparse_w = to_sparse_semi_structured(w)
        except (RuntimeError, ValueError) as exc:  # shape or dtype the kernels do not take
            log.info("skipping %s: %s", name, exc)
            continue
        dense_s = _time(lambda a, w=w: torch.mm(a, w.t()), x, repeats)
        sparse_s = _time(lambda a, sw=sparse_w: torch.mm(sw, a.t()).t(), x, repeats)
        out.modules[name] = {"dense_seconds": dense_s, "sparse_seconds": sparse_s, "speedup": dense_s / sparse_s}
        out.dense_seconds += dense_s
        out.sparse_seconds += sparse_s
    if not out.modules:
        out.skipped = "no linear weight is 2:4 sparse with a shape the kernels accept"
    return out
