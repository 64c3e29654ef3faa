"""What a study point's model would take to store, measured on its weights.

Every decoder-layer matrix is counted with :func:`pare.ops.quant.bits.matrix_bits` in the cheapest
layout its weights allow: dense, an N:M layout when every group of M holds at least N zeros
(2:4 and 4:8 are tried), or a bitmask of the non-zero weights. Quantized matrices count the
point's scheme (elements, scales, zero points); the others, and every parameter outside the
decoder layers (embeddings, norms, a separate ``lm_head``), count ``value_bits`` per value (16: the
bf16 / fp16 checkpoint). Tied parameters count once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pare.arch import describe
from pare.arch.targets import layer_targets
from pare.ops.quant.bits import BitsAccount, matrix_bits
from pare.ops.quant.scheme import QuantScheme

NM_LAYOUTS = ((2, 4), (4, 8))


def holds_nm(W: torch.Tensor, nm: tuple[int, int]) -> bool:
    """Whether every group of ``M`` consecutive inputs of ``W: [out, in]`` has at least ``N`` zeros."""
    n, m = nm
    rows, cols = W.shape
    if cols % m:
        return False
    zeros = (W.reshape(rows, cols // m, m) == 0).sum(dim=2)
    return bool((zeros >= n).all())


def cheapest_layout(W: torch.Tensor, scheme: QuantScheme | None, value_bits: int = 16) -> tuple[str, BitsAccount]:
    """The cheapest way to store ``W: [out, in]``: ``("dense" | "2:4" | "4:8" | "bitmask", account)``; an
    N:M layout wins a tie with the bitmask (2:4 at 16 bits: 9 bits per weight either way)."""
    shape = (int(W.shape[0]), int(W.shape[1]))
    options = [("dense", matrix_bits(shape, scheme, value_bits=value_bits))]
    nonzero = int(torch.count_nonzero(W))
    if nonzero < W.numel():
        for nm in NM_LAYOUTS:
            if holds_nm(W, nm):
                options.append((f"{nm[0]}:{nm[1]}", matrix_bits(shape, scheme, nm=nm, value_bits=value_bits)))
        options.append(("bitmask", matrix_bits(shape, scheme, nonzero=nonzero, value_bits=value_bits)))
    return min(options, key=lambda o: o[1].total_bits)  # the first of equal costs: N:M before a bitmask


def model_storage(model: nn.Module, scheme: QuantScheme | None, value_bits: int = 16) -> dict[str, Any]:
    """The storage of ``model`` with its decoder matrices in ``scheme`` (None: unquantized).

    Returns:
        ``bytes``, ``bits_per_param`` (over the parameters the model has now), ``params``,
        ``nonzero_params``, ``matrix_bytes`` (the decoder matrices), ``other_bytes`` (everything
        else), and ``layouts`` (how many matrices use each layout).
    """
    arch = describe(model)
    matrices = BitsAccount()
    layouts: dict[str, int] = {}
    seen: set[int] = set()
    for i, layer in enumerate(arch.layer_modules(model)):
        for t in layer_targets(layer, arch.layers[i], arch.layer_prefix(i)):
            w = t.weight()
            seen.add(id(getattr(t.module, t.param)))
            layout, acct = cheapest_layout(w.detach(), scheme, value_bits)
            matrices = matrices + acct
            layouts[layout] = layouts.get(layout, 0) + 1
    other = 0
    params = matrices.params
    nonzero = 0
    counted: set[int] = set()
    for p in model.parameters():  # parameters() yields a tied parameter once
        if id(p) in counted:
            continue
        counted.add(id(p))
        nonzero += int(torch.count_nonzero(p))
        if id(p) in seen:
            continue
        other += p.numel() * value_bits
        params += p.numel()
    total_bits = matrices.total_bits + other
    return {"bytes": -(-total_bits // 8), "bits_per_param": total_bits / params if params else 0.0,
            "params": params, "nonzero_params": nonzero, "matrix_bytes": matrices.bytes,
            "other_bytes": -(-other // 8), "layouts": layouts}
