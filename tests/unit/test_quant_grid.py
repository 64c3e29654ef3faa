"""Exact recovery of integer grids from fake-quantized weights, 16-bit scales, and W8A8 token quantization."""

from __future__ import annotations

import pytest
import torch

from pare.ops.hessian import inverse_hessian_factor
from pare.ops.quant.act import TokenQuantHook, quantize_tokens
from pare.ops.quant.gptq import PruneSpec, gptq_quantize
from pare.ops.quant.grid import fit_int_grid
from pare.ops.quant.mx import E4M3, fp_round
from pare.ops.quant.scheme import QuantScheme, quantize

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rebuild(grid, group: int, dtype: torch.dtype) -> torch.Tensor:
    zero = 0 if grid.zero is None else grid.zero.repeat_interleave(group, 1).float()
    return ((grid.codes.float() - zero) * grid.scale.float().repeat_interleave(group, 1)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,symmetric", [("int8", True), ("int4", True), ("int4", False), ("int3", True),
                                            ("int2", False)])
@pytest.mark.parametrize("group", [32, 0])
def test_rtn_grid_is_recovered_bit_for_bit(dtype: torch.dtype, name: str, symmetric: bool, group: int) -> None:
    w = (torch.randn(48, 128, generator=_gen(0)) * 0.03).to(dtype)
    scheme = QuantScheme(name, group, symmetric).for_weight(dtype)
    saved = quantize(w, scheme).dequant.to(dtype)  # what the model holds after record_quantized
    g = group or 128
    grid = fit_int_grid(saved, scheme.bits, g, symmetric)
    assert grid.all_fitted
    assert torch.equal(_rebuild(grid, g, dtype), saved)
    assert grid.scale.dtype == (dtype if dtype != torch.float32 else torch.float32)
    lo, hi = (-(2 ** (scheme.bits - 1)), 2 ** (scheme.bits - 1) - 1) if symmetric else (0, 2**scheme.bits - 1)
    assert int(grid.codes.min()) >= lo and int(grid.codes.max()) <= hi


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_joint_sparse_gptq_grid_is_recovered_with_its_zeros(dtype: torch.dtype) -> None:
    x = torch.randn(512, 64, generator=_gen(1))
    factor = inverse_hessian_factor(2 * x.t() @ x / 512, 0.01)
    w = torch.randn(16, 64, generator=_gen(2)).to(dtype)
    scheme = QuantScheme("int4", 32).for_weight(dtype)
    res = gptq_quantize(w, factor, scheme, blocksize=32, prune=PruneSpec(nm=(2, 4)))
    saved = res.weight.to(dtype)
    grid = fit_int_grid(saved, 4, 32, True)
    assert grid.all_fitted and torch.equal(_rebuild(grid, 32, dtype), saved)
    assert bool((grid.codes[saved == 0] == 0).all())


def test_weights_moved_off_the_grid_are_not_fitted() -> None:
    w = torch.randn(8, 64, generator=_gen(3)).to(torch.bfloat16)
    saved = quantize(w, QuantScheme("int4", 32).for_weight(torch.bfloat16)).dequant.to(torch.bfloat16)
    saved[3, 40] = saved[3, 40] * 1.37 + 0.011  # a later stage changed one weight
    grid = fit_int_grid(saved, 4, 32, True)
    assert not grid.all_fitted
    assert grid.fitted.sum() == grid.fitted.numel() - 1 and not bool(grid.fitted[3, 1])
    dense = torch.randn(8, 64, generator=_gen(4)).to(torch.bfloat16)  # never quantized
    assert float(fit_int_grid(dense, 4, 32, True).fitted.float().mean()) < 0.5


def test_all_zero_groups_fit_with_scale_one() -> None:
    w = torch.zeros(4, 64)
    grid = fit_int_grid(w, 4, 32, False)
    assert grid.all_fitted and bool((grid.scale == 1).all()) and bool((grid.codes == 0).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_integer_scales_are_kept_in_the_weights_16_bit_dtype(dtype: torch.dtype) -> None:
    w = torch.randn(16, 128, generator=_gen(5)).to(dtype)
    q = quantize(w, QuantScheme("int4", 32).for_weight(dtype))
    assert torch.equal(q.scale.to(dtype).float(), q.scale)
    # the dequantized value is exact in fp32 (4-bit code x 16-bit scale) and rounds once to the dtype,
    # which is what compressed-tensors' dequantization (q * scale in the scale's dtype) computes
    assert torch.equal(q.dequant.to(dtype), (q.codes.to(dtype) * q.scale.repeat_interleave(32, 1).to(dtype)))
    assert QuantScheme("int4", 32).for_weight(torch.float32).scale_dtype == torch.float32


def test_int8_tokens_use_their_own_scale() -> None:
    x = torch.randn(3, 5, 64, generator=_gen(6)) * torch.logspace(-3, 2, 5)[None, :, None]
    x[1, 2] = 0.0
    dq = quantize_tokens(x, "int8")
    scale = x.abs().amax(-1, keepdim=True) / 127.5
    codes = dq / torch.where(scale > 0, scale, torch.ones_like(scale))
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert float(codes.min()) >= -128 - 1e-3 and float(codes.max()) <= 127 + 1e-3
    assert bool(((dq - x).abs() <= scale / 2 * (1 + 1e-4) + 1e-12).all())
    assert bool((dq[1, 2] == 0).all())


def test_fp8_tokens_are_e4m3_values_times_amax_over_448() -> None:
    x = torch.randn(7, 96, generator=_gen(7)) * 3.0
    dq = quantize_tokens(x, "fp8")
    scale = x.abs().amax(-1, keepdim=True) / 448
    assert torch.allclose(dq, fp_round(x / scale, E4M3) * scale, rtol=1e-6, atol=0)
    assert torch.allclose(dq.abs().amax(-1), x.abs().amax(-1), rtol=1e-6)  # the largest maps to 448 exactly


def test_token_hook_quantizes_the_first_input_only() -> None:
    lin = torch.nn.Linear(32, 8)
    handle = lin.register_forward_pre_hook(TokenQuantHook("int8"))
    x = torch.randn(4, 32, generator=_gen(8))
    try:
        assert torch.equal(lin(x), torch.nn.functional.linear(quantize_tokens(x, "int8"), lin.weight, lin.bias))
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="int8, fp8"):
        TokenQuantHook("int4")


@pytest.mark.parametrize("name", ["int4", "int8"])
def test_gptq_with_identity_hessian_equals_rtn_with_16_bit_scales(name: str) -> None:
    w = torch.randn(24, 128, generator=_gen(9)).to(torch.bfloat16)
    scheme = QuantScheme(name, 32).for_weight(torch.bfloat16)
    factor = inverse_hessian_factor(torch.eye(128), 0.0)
    res = gptq_quantize(w, factor, scheme)
    rtn = quantize(w, scheme)
    assert torch.equal(res.weight, rtn.dequant) and torch.equal(res.scale, rtn.scale)
    assert torch.equal(rtn.scale.to(torch.bfloat16).float(), rtn.scale)
