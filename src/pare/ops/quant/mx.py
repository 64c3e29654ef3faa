"""OCP Microscaling (MX v1.0) formats: MXFP8 (E4M3, E5M2), MXFP6 (E3M2, E2M3), MXFP4 (E2M1), MXINT8.

OCP "Microscaling Formats (MX) Specification" v1.0 (2023): a block of ``K = 32`` consecutive
elements (here: consecutive inputs of a weight row) shares one E8M0 scale ``X = 2^e`` (an 8-bit
power of two, exponents -127..127; 0xFF is NaN). Section 6.3's conversion:

    shared_exp = floor(log2(max_i |V_i|)) - emax_elem,     P_i = quantize(V_i / 2^shared_exp)

where ``emax_elem`` is the exponent of the element format's largest normal number, the element
rounding is round-to-nearest-even and values beyond the element's largest magnitude saturate to it.

Element formats (sign, exponent, mantissa bits; bias; largest magnitude):

============  =====  ====  ==========  ==================================================
format        E, M   bias  max         special values
============  =====  ====  ==========  ==================================================
FP8 E4M3      4, 3   7     448         no inf; S.1111.111 is NaN
FP8 E5M2      5, 2   15    57344       exponent 11111 is inf / NaN (IEEE-like)
FP6 E3M2      3, 2   3     28          none (all encodings finite)
FP6 E2M3      2, 3   1     7.5         none
FP4 E2M1      2, 1   1     6           none
INT8          --     --    127/64      two's complement with an implicit scale of 2^-6
============  =====  ====  ==========  ==================================================

An exponent field of 0 encodes subnormals ``m / 2^M * 2^(1 - bias)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MX_BLOCK = 32
E8M0_MIN, E8M0_MAX = -127, 127


@dataclass(frozen=True)
class FPFormat:
    """A small floating-point element format.

    Attributes:
        name: e.g. ``e4m3``.
        ebits: exponent bits.
        mbits: mantissa (fraction) bits.
        bias: exponent bias.
        max: largest finite magnitude.
    """

    name: str
    ebits: int
    mbits: int
    bias: int
    max: float

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number (subnormals share its step)."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest normal number (``emax_elem`` of the MX scale rule)."""
        return int(torch.tensor(self.max).log2().floor())


E4M3 = FPFormat("e4m3", 4, 3, 7, 448.0)
E5M2 = FPFormat("e5m2", 5, 2, 15, 57344.0)
E3M2 = FPFormat("e3m2", 3, 2, 3, 28.0)
E2M3 = FPFormat("e2m3", 2, 3, 1, 7.5)
E2M1 = FPFormat("e2m1", 2, 1, 1, 6.0)
FORMATS = {f.name: f for f in (E4M3, E5M2, E3M2, E2M3, E2M1)}

MXINT8_FRAC = 6  # MXINT8 elements: sign, one integer bit, six fraction bits
MXINT8_MAX = 127 / 64


def floor_log2(x: torch.Tensor) -> torch.Tensor:
    """``floor(log2(x))`` exactly for positive finite fp32 ``x`` (from the binary exponent, not ``log2``)."""
    return torch.frexp(x)[1].to(torch.float32) - 1


def fp_round(x: torch.Tensor, fmt: FPFormat) -> torch.Tensor:
    """Round fp32 ``x`` to the nearest value of ``fmt`` (ties to even), saturating at ``+-fmt.max``."""
    a = x.abs().clamp(max=fmt.max)
    tiny = torch.finfo(torch.float32).tiny
    e = floor_log2(a.clamp(min=tiny)).clamp(min=fmt.emin)
    step = torch.exp2(e - fmt.mbits)
    q = (torch.round(a / step) * step).clamp(max=fmt.max)  # a tie may round up into the next binade
    return torch.copysign(q, x)


def mx_scale(W: torch.Tensor, emax_elem: int) -> torch.Tensor:
    """E8M0 scale ``2^(floor(log2 amax) - emax_elem)`` of each row of ``W: [out, 32]`` -> ``[out, 1]``.

    The exponent is clamped to E8M0's range; an all-zero block gets ``2^-127`` (its elements are 0).
    """
    amax = W.abs().amax(dim=1, keepdim=True)
    e = torch.where(amax > 0, floor_log2(amax.clamp(min=torch.finfo(torch.float32).tiny)) - emax_elem,
                    torch.full_like(amax, E8M0_MIN))
    return torch.exp2(e.clamp(E8M0_MIN, E8M0_MAX))


def mx_elements(V: torch.Tensor, fmt: FPFormat | None) -> torch.Tensor:
    """Element values of ``V`` (already divided by the scale): an FP format, or MXINT8 for ``None``."""
    if fmt is None:
        return (torch.round(V * 2**MXINT8_FRAC) / 2**MXINT8_FRAC).clamp(-MXINT8_MAX, MXINT8_MAX)
    return fp_round(V, fmt)


def mx_emax(fmt: FPFormat | None) -> int:
    """``emax_elem`` of an element format (MXINT8: 0, its largest magnitude is below 2)."""
    return 0 if fmt is None else fmt.emax


def mx_quantize(W: torch.Tensor, fmt: FPFormat | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MX-quantize ``W: [out, in]`` (``in`` a multiple of 32) in blocks of 32 along the input.

    Returns:
        ``(dequantized [out, in] fp32, elements [out, in] fp32, scales [out, in / 32] fp32 powers of 2)``.
    """
    rows, cols = W.shape
    blocks = W.detach().to(torch.float32).reshape(rows * cols // MX_BLOCK, MX_BLOCK)
    scale = mx_scale(blocks, mx_emax(fmt))
    elems = mx_elements(blocks / scale, fmt)
    return (elems * scale).reshape(rows, cols), elems.reshape(rows, cols), scale.reshape(rows, cols // MX_BLOCK)
