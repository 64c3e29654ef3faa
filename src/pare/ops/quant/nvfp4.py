"""NVFP4: FP4 E2M1 elements in blocks of 16 with an FP8 E4M3 block scale and an FP32 tensor scale.

NVIDIA's format (Blackwell, 2025): ``w ~= e * s_block * s_tensor`` with ``s_tensor = amax(W) /
(448 * 6)`` (FP32, one per tensor) so that ``s_block = amax(block) / 6 / s_tensor`` fits E4M3's
range, ``s_block`` rounded to E4M3, and elements ``e = E2M1(w / (s_block * s_tensor))`` rounded to
nearest even and saturated at 6.
"""

from __future__ import annotations

import torch

from pare.ops.quant.mx import E2M1, E4M3, fp_round

NVFP4_BLOCK = 16


def nvfp4_tensor_scale(W: torch.Tensor) -> float:
    """The FP32 per-tensor scale ``amax(W) / (448 * 6)`` (1 for an all-zero tensor)."""
    amax = float(W.detach().abs().max()) if W.numel() else 0.0
    return amax / (E4M3.max * E2M1.max) if amax > 0 else 1.0


def nvfp4_block_scale(W: torch.Tensor, tensor_scale: float) -> torch.Tensor:
    """Effective scale ``s_block * s_tensor`` of each row of ``W: [out, 16]`` -> ``[out, 1]`` fp32.

    A block whose E4M3 scale rounds to 0 gets the smallest positive E4M3 value (its elements are 0
    or tiny)."""
    s = fp_round(W.abs().amax(dim=1, keepdim=True) / E2M1.max / tensor_scale, E4M3)
    s = torch.where(s > 0, s, torch.full_like(s, 2.0 ** (E4M3.emin - E4M3.mbits)))
    return s * tensor_scale


def nvfp4_quantize(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """NVFP4-quantize ``W: [out, in]`` (``in`` a multiple of 16).

    Returns:
        ``(dequantized [out, in] fp32, elements [out, in], effective block scales [out, in / 16],
        tensor scale)``.
    """
    rows, cols = W.shape
    blocks = W.detach().to(torch.float32).reshape(-1, NVFP4_BLOCK)
    ts = nvfp4_tensor_scale(W)
    scale = nvfp4_block_scale(blocks, ts)
    elems = fp_round(blocks / scale, E2M1)
    return (elems * scale).reshape(rows, cols), elems.reshape(rows, cols), scale.reshape(rows, -1), ts
