"""Recover integer codes and scales from fake-quantized weights, exactly.

A matrix pare quantized with an integer scheme holds, in each group of ``g`` inputs of a row, the
values ``cast((c_i) * s)`` for integer codes ``c_i = q_i - z`` (``z = 0`` when symmetric) and one
scale ``s`` (in the weights' dtype for 16-bit models, fp32 otherwise; see
:meth:`pare.ops.quant.scheme.QuantScheme.for_weight`), where ``cast`` rounds the exact product to
the weights' dtype once. Exporting the matrix to a real low-bit format needs ``c`` and ``s`` back.
Whatever stage produced the grid (RTN, GPTQ, the joint SparseGPT pass, a later pruning that only
zeroed weights), the element of largest magnitude carries the largest code magnitude ``k``, so
``s`` lies within an ulp or two of ``|w_max| / k`` (rounded to the scale dtype). For each group,
candidate scales are tried for ``k`` from the largest code down, and a group is *fitted* by the
first candidate whose codes are integers in range and reproduce every weight bit for bit:
``cast(c * s) == w``. Any fit reproduces the weights exactly (several may exist when all codes share
a factor). A group with no fit is not on the grid: it was changed after quantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ULPS = 2  # candidate scales on each side of |w_max| / k, in ulps of the scale dtype


@dataclass
class IntGrid:
    """The integer grid of a ``[out, in]`` matrix, group ``g`` along the input.

    Attributes:
        codes: ``[out, in]`` int16: ``q`` (symmetric: in ``[-2^(b-1), 2^(b-1) - 1]``; asymmetric: in
            ``[0, 2^b - 1]``).
        scale: ``[out, in / g]`` in the scale dtype.
        zero: ``[out, in / g]`` int16 zero points in ``[0, 2^b - 1]`` (asymmetric), else None.
        fitted: ``[out, in / g]`` bool: the group's weights are reproduced exactly.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    fitted: torch.Tensor

    @property
    def all_fitted(self) -> bool:
        return bool(self.fitted.all())


def _neighbours(x: torch.Tensor, dtype: torch.dtype, ulps: int) -> list[torch.Tensor]:
    """``x`` (fp32, positive) rounded to ``dtype`` and the ``ulps`` values of ``dtype`` on each side, as fp32."""
    base = x.to(dtype)
    out = [base]
    up, down = base, base
    inf = torch.tensor(float("inf"), dtype=dtype)
    for _ in range(ulps):
        up = torch.nextafter(up, inf)
        down = torch.nextafter(down, -inf)
        out += [up, down]
    return [c.to(torch.float32) for c in out]


def _codes_for(blocks: torch.Tensor, target: torch.Tensor, s: torch.Tensor, bits: int, symmetric: bool,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes ``c = round(w / s)`` of ``blocks [G, g]`` (fp32) for scales ``s [G, 1]``, whether they fit,
    and the zero points (asymmetric)."""
    c = torch.round(blocks / s)
    exact = ((c * s).to(dtype) == target).all(dim=1)
    if symmetric:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        ok = exact & (c.amin(dim=1) >= lo) & (c.amax(dim=1) <= hi)
        return c, ok, torch.zeros_like(s)
    zero = (-c.amin(dim=1, keepdim=True)).clamp(min=0)
    ok = exact & ((c.amax(dim=1, keepdim=True) + zero).squeeze(1) <= 2**bits - 1)
    return c + zero, ok, zero


def fit_int_grid(W: torch.Tensor, bits: int, group: int, symmetric: bool,
                 scale_dtype: torch.dtype | None = None) -> IntGrid:
    """Recover codes and scales of ``W: [out, in]`` on a ``bits``-bit integer grid in groups of ``group``.

    Args:
        W: the fake-quantized weights in their stored dtype (``cast`` rounds to it).
        bits: code width (2..8).
        group: inputs per group (``in`` for per channel); must divide ``in``.
        symmetric: codes centred on zero (no zero point).
        scale_dtype: the scales' dtype (default: ``W``'s when 16-bit, else fp32).
    """
    rows, cols = W.shape
    dtype = W.dtype
    sdtype = scale_dtype or (dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32)
    target = W.reshape(-1, group)
    blocks = target.to(torch.float32)
    n = blocks.shape[0]
    ref = blocks.abs().amax(dim=1, keepdim=True)
    codes = torch.zeros_like(blocks)
    scale = torch.ones(n, 1, dtype=torch.float32, device=W.device)
    zero = torch.zeros(n, 1, dtype=torch.float32, device=W.device)
    fitted = (ref == 0).squeeze(1)  # an all-zero group: codes 0 (plus zero), scale 1
    kmax = 2 ** (bits - 1) if symmetric else 2**bits - 1
    for k in range(kmax, 0, -1):
        todo = (~fitted).nonzero().squeeze(1)
        if todo.numel() == 0:
            break
        for s in _neighbours(ref[todo] / k, sdtype, ULPS):
            left = ~fitted[todo]
            idx, s = todo[left], s[left]
            s = torch.where(s > 0, s, torch.ones_like(s))
            c, ok, z = _codes_for(blocks[idx], target[idx], s, bits, symmetric, dtype)
            hit = idx[ok]
            codes[hit], scale[hit], zero[hit] = c[ok], s[ok], z[ok]
            fitted[hit] = True
    shape = (rows, cols // group)
    return IntGrid(
        codes=codes.reshape(rows, cols).to(torch.int16),
        scale=scale.reshape(shape).to(sdtype),
        zero=None if symmetric else zero.reshape(shape).to(torch.int16),
        fitted=fitted.reshape(shape),
    )
