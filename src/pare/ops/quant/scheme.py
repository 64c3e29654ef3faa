"""Quantization schemes by name, and the two operations every solver needs from one: the shared
parameters of a group of inputs, and the rounding of weights with given parameters.

=================  ============  ============  ======================================
scheme             element       group         scale (per row and group)
=================  ============  ============  ======================================
int8/int4/int3/2   integer       0 (row), 32,  fp32 (+ integer zero point if asymmetric)
                                 64, 128, ...
mxfp8-e4m3/e5m2,   FP8/FP6/FP4   32            E8M0 (a power of two)
mxfp6-e3m2/e2m3,
mxfp4
mxint8             INT8 (2^-6)   32            E8M0
nvfp4              FP4 E2M1      16            FP8 E4M3, times one FP32 scale per tensor
=================  ============  ============  ======================================
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from pare.errors import ConfigError
from pare.ops.quant.mx import E2M1, E2M3, E3M2, E4M3, E5M2, MX_BLOCK, FPFormat, mx_elements, mx_emax, mx_scale
from pare.ops.quant.nvfp4 import NVFP4_BLOCK, nvfp4_block_scale, nvfp4_tensor_scale
from pare.ops.quant.rtn import int_params, int_quantize

INT_SCHEMES = {"int8": 8, "int4": 4, "int3": 3, "int2": 2}
MX_SCHEMES: dict[str, FPFormat | None] = {
    "mxfp8-e4m3": E4M3, "mxfp8-e5m2": E5M2, "mxfp6-e3m2": E3M2, "mxfp6-e2m3": E2M3, "mxfp4": E2M1, "mxint8": None,
}
SCHEMES = (*INT_SCHEMES, *MX_SCHEMES, "nvfp4")


@dataclass(frozen=True)
class QuantScheme:
    """A weight quantization scheme.

    Attributes:
        name: one of :data:`SCHEMES`.
        group_size: consecutive inputs of a row sharing a scale; 0 = the whole row (per channel).
        symmetric: integer schemes only: no zero point.
        scale_dtype: integer schemes: the dtype the scales are rounded to (the weights' 16-bit dtype,
            so that a compressed checkpoint storing the scales in it dequantizes to exactly the
            fake-quantized weights, see :meth:`for_weight`); float32 keeps them unrounded.
    """

    name: str
    group_size: int = 128
    symmetric: bool = True
    scale_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.name not in SCHEMES:
            raise ConfigError(f"unknown quantization scheme {self.name!r}; choose one of {', '.join(SCHEMES)}")
        fixed = self.fixed_group
        if fixed is not None and self.group_size != fixed:
            raise ConfigError(f"{self.name} uses blocks of {fixed} inputs by definition; got group_size "
                              f"{self.group_size} (leave it at {fixed})")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 0:
            raise ConfigError(f"group_size must be 0 (per channel) or a positive integer such as 32, 64 or 128, "
                              f"got {self.group_size!r}")
        if not self.symmetric and self.name not in INT_SCHEMES:
            raise ConfigError(f"{self.name} is symmetric by definition; asymmetric (zero points) exists for "
                              f"{', '.join(INT_SCHEMES)} only")

    def for_weight(self, dtype: torch.dtype) -> QuantScheme:
        """This scheme with its integer scales kept in ``dtype`` when that is a 16-bit float (bfloat16,
        float16); float32 otherwise. compressed-tensors stores the scales in the model's dtype and
        dequantizes ``(q - z) * scale`` in it: with scales already in that dtype, that product (exact
        in fp32) rounds once, as pare's fake-quantized weights do."""
        target = dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32
        return self if target == self.scale_dtype else replace(self, scale_dtype=target)

    @property
    def fixed_group(self) -> int | None:
        """The block size the format defines (MX: 32, NVFP4: 16), None for integer schemes."""
        return fixed_group(self.name)

    @property
    def bits(self) -> int:
        """Bits per stored element."""
        if self.name in INT_SCHEMES:
            return INT_SCHEMES[self.name]
        if self.name == "nvfp4":
            return E2M1.bits
        fmt = MX_SCHEMES[self.name]
        return 8 if fmt is None else fmt.bits

    def group(self, cols: int) -> int:
        """Inputs per group for a matrix of ``cols`` inputs."""
        return cols if self.group_size == 0 else self.group_size

    def check_width(self, cols: int, what: str) -> None:
        """ConfigError unless the group size divides ``cols``."""
        g = self.group(cols)
        if cols % g:
            raise ConfigError(f"{self.name} with groups of {g} needs the input width to be a multiple of {g}; "
                              f"{what} has {cols} inputs: use a group size that divides it (or 0, per channel), "
                              "or leave it out with ignore")


def fixed_group(name: str) -> int | None:
    """The block size scheme ``name`` defines (MX: 32, NVFP4: 16), None for integer schemes."""
    if name in MX_SCHEMES:
        return MX_BLOCK
    return NVFP4_BLOCK if name == "nvfp4" else None


@dataclass
class GroupParams:
    """Parameters of one group of inputs for every row: ``scale [out, 1]`` and ``zero [out, 1]`` or None."""

    scale: torch.Tensor
    zero: torch.Tensor | None = None


def tensor_param(scheme: QuantScheme, W: torch.Tensor) -> float | None:
    """The per-tensor parameter a scheme needs before its groups (NVFP4's FP32 scale), else None."""
    return nvfp4_tensor_scale(W) if scheme.name == "nvfp4" else None


def group_params(scheme: QuantScheme, W: torch.Tensor, tensor_scale: float | None = None) -> GroupParams:
    """Parameters for ``W: [out, g]`` fp32, one group's weights of every row."""
    if scheme.name in INT_SCHEMES:
        scale, zero = int_params(W, scheme.bits, scheme.symmetric, scheme.scale_dtype)
        return GroupParams(scale, zero)
    if scheme.name == "nvfp4":
        return GroupParams(nvfp4_block_scale(W, tensor_scale if tensor_scale is not None else 1.0))
    return GroupParams(mx_scale(W, mx_emax(MX_SCHEMES[scheme.name])))


def quantize_with(scheme: QuantScheme, W: torch.Tensor, p: GroupParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Round ``W: [out, k]`` (fp32, columns of one group) with parameters ``p``.

    Returns:
        ``(dequantized [out, k], codes [out, k])``: integer codes, or element values for FP/MX.
    """
    if scheme.name in INT_SCHEMES:
        return int_quantize(W, p.scale, p.zero, scheme.bits)
    fmt = E2M1 if scheme.name == "nvfp4" else MX_SCHEMES[scheme.name]
    elems = mx_elements(W / p.scale, fmt)
    return elems * p.scale, elems


@dataclass
class Quantized:
    """A quantized matrix: ``dequant [out, in]`` fp32, ``codes [out, in]``, ``scale``/``zero``
    ``[out, in / g]`` (``zero`` None when symmetric), and NVFP4's tensor scale."""

    dequant: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    tensor_scale: float | None = None


def quantize(W: torch.Tensor, scheme: QuantScheme) -> Quantized:
    """Round-to-nearest quantization of ``W: [out, in]`` with ``scheme`` (groups along the input)."""
    rows, cols = W.shape
    scheme.check_width(cols, "the matrix")
    g = scheme.group(cols)
    Wf = W.detach().to(torch.float32)
    ts = tensor_param(scheme, Wf)
    blocks = Wf.reshape(rows * cols // g, g)
    p = group_params(scheme, blocks, ts)
    dq, codes = quantize_with(scheme, blocks, p)
    zero = None if p.zero is None else p.zero.reshape(rows, cols // g)
    return Quantized(dq.reshape(rows, cols), codes.reshape(rows, cols), p.scale.reshape(rows, cols // g), zero, ts)
