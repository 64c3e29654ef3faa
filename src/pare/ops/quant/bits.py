"""What storing a (sparse, quantized) matrix costs, bit by bit.

The account follows what a compressed checkpoint would hold:

- elements: ``bits`` per stored weight (all of them when dense; the kept ones when sparse);
- scales: one per row and group: 16 bits for integer schemes (stored in the model's 16-bit dtype,
  as compressed-tensors does), 8 bits (E8M0) per MX block of 32, 8 bits (E4M3) per NVFP4 block of
  16 plus one 32-bit tensor scale;
- zero points (asymmetric integer schemes): ``bits`` per row and group;
- sparsity metadata: N:M keeps ``M - N`` of every ``M`` weights, each with a ``ceil(log2 M)``-bit
  index in its group (the 2:4 layout of sparse tensor cores: 2 bits per kept weight); unstructured
  sparsity stores a bitmask of one bit per weight and only the non-zero elements.

Unquantized matrices count ``value_bits`` (their dtype's width) per stored element.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from pare.ops.quant.scheme import INT_SCHEMES, QuantScheme

INT_SCALE_BITS = 16
E8M0_BITS = 8
E4M3_BITS = 8
FP32_BITS = 32


@dataclass
class BitsAccount:
    """Bits of one or more matrices, by kind; ``params`` is their dense parameter count."""

    params: int = 0
    element_bits: int = 0
    scale_bits: int = 0
    zero_bits: int = 0
    metadata_bits: int = 0

    @property
    def total_bits(self) -> int:
        return self.element_bits + self.scale_bits + self.zero_bits + self.metadata_bits

    @property
    def bytes(self) -> int:
        """The total bits / 8, rounded up."""
        return math.ceil(self.total_bits / 8)

    @property
    def bits_per_param(self) -> float:
        return self.total_bits / self.params if self.params else 0.0

    def __add__(self, other: BitsAccount) -> BitsAccount:
        return BitsAccount(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values(), strict=True)))

    def to_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "total_bits": self.total_bits, "bytes": self.bytes,
                "bits_per_param": self.bits_per_param}


def matrix_bits(
    shape: tuple[int, int],
    scheme: QuantScheme | None,
    *,
    nm: tuple[int, int] | None = None,
    nonzero: int | None = None,
    value_bits: int = 16,
) -> BitsAccount:
    """The storage of one ``[out, in]`` matrix.

    Args:
        shape: ``(out, in)``.
        scheme: its quantization, or None for values stored at ``value_bits``.
        nm: ``(N, M)`` when N of every M weights are pruned (N:M metadata).
        nonzero: unstructured sparsity: the number of non-zero weights (bitmask + kept values);
            None for a dense matrix. Ignored with ``nm``.
        value_bits: bits per element when ``scheme`` is None.
    """
    rows, cols = shape
    numel = rows * cols
    elem = value_bits if scheme is None else scheme.bits
    acct = BitsAccount(params=numel)
    if nm is not None:
        n, m = nm
        kept = numel // m * (m - n)
        acct.element_bits = kept * elem
        acct.metadata_bits = kept * math.ceil(math.log2(m))
    elif nonzero is not None:
        acct.element_bits = nonzero * elem
        acct.metadata_bits = numel
    else:
        acct.element_bits = numel * elem
    if scheme is None:
        return acct
    groups = rows * (cols // scheme.group(cols))
    if scheme.name in INT_SCHEMES:
        acct.scale_bits = groups * INT_SCALE_BITS
        acct.zero_bits = 0 if scheme.symmetric else groups * scheme.bits
    elif scheme.name == "nvfp4":
        acct.scale_bits = groups * E4M3_BITS + FP32_BITS
    else:
        acct.scale_bits = groups * E8M0_BITS
    return acct
