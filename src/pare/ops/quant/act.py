"""Simulated dynamic per-token activation quantization (the "A8" of W8A8): int8 or FP8 (E4M3).

Each token's input vector ``x: [..., d]`` gets its own scale from its largest magnitude, computed at
run time (dynamic), and is replaced by its dequantized value:

- ``int8``: ``scale = amax / 127.5``, codes ``clamp(round(x / scale), -128, 127)`` (the symmetric
  integer rule of :mod:`pare.ops.quant.rtn`, which is compressed-tensors' rule for dynamic tokens);
- ``fp8``: ``scale = amax / 448`` and elements rounded to FP8 E4M3 (nearest, ties to even, saturating),
  as vLLM's and compressed-tensors' dynamic per-token FP8 do.

A token of zeros stays zero. The arithmetic runs in fp32 and the result is cast back to ``x``'s dtype.
"""

from __future__ import annotations

import torch

from pare.ops.quant.mx import E4M3, fp_round
from pare.ops.quant.rtn import int_params, int_quantize

ACTIVATION_KINDS = ("int8", "fp8")


def quantize_tokens(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Fake-quantize every token (last dimension) of ``x: [..., d]`` with its own dynamic scale."""
    if kind not in ACTIVATION_KINDS:
        raise ValueError(f"activation quantization must be one of {', '.join(ACTIVATION_KINDS)}, got {kind!r}")
    rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
    if kind == "int8":
        scale, _ = int_params(rows, 8, True)
        dq, _ = int_quantize(rows, scale, None, 8)
    else:
        amax = rows.abs().amax(dim=1, keepdim=True)
        scale = torch.where(amax > 0, amax / E4M3.max, torch.ones_like(amax))
        dq = fp_round(rows / scale, E4M3) * scale
    return dq.reshape(x.shape).to(x.dtype)


class TokenQuantHook:
    """A forward pre-hook that fake-quantizes a module's first input per token (see :func:`quantize_tokens`)."""

    def __init__(self, kind: str) -> None:
        if kind not in ACTIVATION_KINDS:
            raise ValueError(f"activation quantization must be one of {', '.join(ACTIVATION_KINDS)}, got {kind!r}")
        self.kind = kind

    def __call__(self, module: torch.nn.Module, args: tuple) -> tuple:
        if not args or not isinstance(args[0], torch.Tensor):
            return args
        return (quantize_tokens(args[0], self.kind), *args[1:])
