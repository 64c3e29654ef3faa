"""Integer round-to-nearest quantization (int8 / int4 / int3 / int2), symmetric or asymmetric.

Per group of consecutive inputs of a row (or a whole row: per channel), with ``b`` bits:

- symmetric: ``scale = amax / (2^(b-1) - 1/2)`` and codes ``q = clamp(round(w / scale), -2^(b-1),
  2^(b-1) - 1)``, dequantized as ``q * scale`` (the convention of the GPTQ reference code and of
  compressed-tensors: the whole code range is used, the largest positive weight is clipped by at
  most half a step);
- asymmetric: the range ``[min(w, 0), max(w, 0)]`` spread over ``2^b - 1`` steps,
  ``zero = round(-min / scale)`` and ``q = clamp(round(w / scale) + zero, 0, 2^b - 1)``, dequantized
  as ``(q - zero) * scale``.

Both represent 0 exactly, so pruned weights stay zero. Rounding is half to even (``torch.round``);
every dequantized value is within ``scale / 2`` of the weight.
"""

from __future__ import annotations

import torch


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The codes' ``(qmin, qmax)``."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def round_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Positive fp32 ``scale`` rounded to ``dtype`` (kept fp32); one that would underflow to 0 becomes the
    smallest positive value of ``dtype``."""
    if dtype == torch.float32:
        return scale
    rounded = scale.to(dtype).to(torch.float32)
    tiny = torch.tensor(2.0 ** -24 if dtype == torch.float16 else torch.finfo(dtype).tiny, dtype=torch.float32)
    return torch.where(rounded > 0, rounded, tiny.to(scale.device))


def int_params(W: torch.Tensor, bits: int, symmetric: bool,
               scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) of each row of ``W: [out, g]`` (fp32).

    Args:
        W: one group's weights of every row.
        bits: code width.
        symmetric: no zero point.
        scale_dtype: the scales are rounded to this dtype (a 16-bit model's own: what a compressed
            checkpoint stores); the zero point is computed from the rounded scale.

    Returns:
        ``(scale [out, 1], zero [out, 1] or None)`` fp32; an all-zero row gets scale 1.
    """
    if symmetric:
        amax = W.abs().amax(dim=1, keepdim=True)
        scale = amax / (2 ** (bits - 1) - 0.5)
        return round_scale(torch.where(amax > 0, scale, torch.ones_like(scale)), scale_dtype), None
    lo = W.amin(dim=1, keepdim=True).clamp(max=0)
    hi = W.amax(dim=1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / (2**bits - 1)
    scale = round_scale(torch.where(hi > lo, scale, torch.ones_like(scale)), scale_dtype)
    return scale, torch.round(-lo / scale).clamp_(0, 2**bits - 1)


def int_params_searched(W: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype = torch.float32,
                        steps: int = 20, min_shrink: float = 0.5) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`int_params` with the range shrunk per row to the factor of ``1, 1 - d, ..., min_shrink``
    (``d = (1 - min_shrink) / steps``) whose rounding error ``sum (q(w) - w)^2`` is least: clipping a
    few large weights buys a finer step for all the others (the GPTQ reference code's ``mse`` grid
    search on the quantizer range, with the squared error).

    Returns:
        ``(scale [out, 1], zero [out, 1] or None)`` fp32; shrink 1 gives :func:`int_params`' values.
    """
    best_scale, best_zero = int_params(W, bits, symmetric, scale_dtype)
    best = (int_quantize(W, best_scale, best_zero, bits)[0] - W).square().sum(1, keepdim=True)
    lo = W.amin(dim=1, keepdim=True).clamp(max=0)
    hi = W.amax(dim=1, keepdim=True).clamp(min=0)
    for k in range(1, steps + 1):
        f = 1.0 - (1.0 - min_shrink) * k / steps
        span = torch.cat([lo * f, hi * f], dim=1) if not symmetric else torch.cat([-(W.abs().amax(1, True) * f),
                                                                                W.abs().amax(1, True) * f], dim=1)
        scale, zero = int_params(span, bits, symmetric, scale_dtype)
        err = (int_quantize(W, scale, zero, bits)[0] - W).square().sum(1, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None and best_zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def int_quantize(
    W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized values of ``W: [out, k]`` with per-row ``scale``/``zero`` ``[out, 1]``.

    Returns:
        ``(dequantized [out, k] fp32, codes [out, k] fp32 holding integers)``.
    """
    qmin, qmax = int_range(bits, zero is None)
    if zero is None:
        q = torch.round(W / scale).clamp_(qmin, qmax)
        return q * scale, q
    q = (torch.round(W / scale) + zero).clamp_(qmin, qmax)
    return (q - zero) * scale, q
