"""Quantization grids (RTN, OCP MX v1.0, NVFP4), GPTQ and the joint SparseGPT + quantization pass."""

from __future__ import annotations

import math

import pytest
import torch

from pare.errors import ConfigError
from pare.ops.hessian import inverse_hessian_factor
from pare.ops.quant.bits import matrix_bits
from pare.ops.quant.gptq import PruneSpec, act_order_perm, gptq_quantize
from pare.ops.quant.mx import E2M1, E2M3, E3M2, E4M3, E5M2, MXINT8_MAX, FPFormat, fp_round, mx_quantize, mx_scale
from pare.ops.quant.nvfp4 import nvfp4_quantize
from pare.ops.quant.rtn import int_range
from pare.ops.quant.scheme import SCHEMES, QuantScheme, quantize

FP_FORMATS = (E2M1, E3M2, E2M3, E4M3, E5M2)
FINITE_CODES = {"e2m1": 8, "e3m2": 32, "e2m3": 32, "e4m3": 127, "e5m2": 124}  # non-negative finite encodings


def spec_values(ebits: int, mbits: int, bias: int, name: str) -> list[float]:
    """Every non-negative finite value of a format, in code order, from the OCP MX v1.0 definitions:
    exponent field 0 is subnormal ``m / 2^M * 2^(1 - bias)``, others ``(1 + m / 2^M) * 2^(e - bias)``;
    E4M3's S.1111.111 is NaN, E5M2's exponent 11111 is inf/NaN, FP6/FP4 have no special values."""
    out = []
    for e in range(2**ebits):
        for m in range(2**mbits):
            if name == "e4m3" and e == 15 and m == 7:
                continue
            if name == "e5m2" and e == 31:
                continue
            out.append(m / 2**mbits * 2.0 ** (1 - bias) if e == 0 else (1 + m / 2**mbits) * 2.0 ** (e - bias))
    return out


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("fmt", FP_FORMATS, ids=lambda f: f.name)
def test_every_value_of_the_spec_round_trips(fmt: FPFormat) -> None:
    vals = spec_values(fmt.ebits, fmt.mbits, fmt.bias, fmt.name)
    assert len(vals) == FINITE_CODES[fmt.name]
    assert vals == sorted(vals) and max(vals) == fmt.max
    t = torch.tensor(vals + [-v for v in vals])
    assert torch.equal(fp_round(t, fmt), t)


@pytest.mark.parametrize("fmt", FP_FORMATS, ids=lambda f: f.name)
def test_midpoints_round_to_even_and_neighbours_to_nearest(fmt: FPFormat) -> None:
    vals = spec_values(fmt.ebits, fmt.mbits, fmt.bias, fmt.name)
    lo, hi = torch.tensor(vals[:-1], dtype=torch.float64), torch.tensor(vals[1:], dtype=torch.float64)
    mid = ((lo + hi) / 2).float()
    even = torch.tensor([vals[i] if i % 2 == 0 else vals[i + 1] for i in range(len(vals) - 1)])  # even code
    assert torch.equal(fp_round(mid, fmt), even)
    assert torch.equal(fp_round(-mid, fmt), -even)
    gap = (hi - lo).float()
    assert torch.equal(fp_round(mid - gap / 8, fmt), lo.float())
    assert torch.equal(fp_round(mid + gap / 8, fmt), hi.float())


@pytest.mark.parametrize("fmt", FP_FORMATS, ids=lambda f: f.name)
def test_saturation_to_the_largest_magnitude(fmt: FPFormat) -> None:
    big = torch.tensor([fmt.max * 1.01, fmt.max * 4, 1e30, float("inf")])
    assert torch.equal(fp_round(big, fmt), torch.full_like(big, fmt.max))
    assert torch.equal(fp_round(-big, fmt), torch.full_like(big, -fmt.max))


@pytest.mark.parametrize("fmt", FP_FORMATS, ids=lambda f: f.name)
def test_mx_scale_rule_and_elements_on_the_grid(fmt: FPFormat) -> None:
    w = torch.randn(16, 128, generator=_gen(0)) * torch.logspace(-4, 2, 16)[:, None]
    dq, elems, scales = mx_quantize(w, fmt)
    blocks = w.reshape(-1, 32)
    for b, s in zip(blocks, scales.flatten(), strict=True):
        amax = float(b.abs().max())
        assert float(s) == 2.0 ** (math.floor(math.log2(amax)) - fmt.emax)
    grid = set(spec_values(fmt.ebits, fmt.mbits, fmt.bias, fmt.name))
    assert {abs(v) for v in elems.flatten().tolist()} <= grid
    assert torch.equal(dq, elems * scales.repeat_interleave(32, dim=1))
    assert torch.equal(elems, fp_round(w / scales.repeat_interleave(32, dim=1), fmt))


def test_mx_scale_of_hand_picked_blocks() -> None:
    w = torch.zeros(3, 32)
    w[0, 5] = 5.0  # floor(log2 5) = 2; E2M1's emax is 2: scale 1
    w[1, 0] = -0.3  # floor(log2 0.3) = -2: scale 2^-4
    assert mx_scale(w, E2M1.emax).flatten().tolist() == [1.0, 2.0**-4, 2.0**-127]  # an all-zero block: 2^-127
    assert mx_scale(w, E4M3.emax).flatten().tolist()[:2] == [2.0**-6, 2.0**-10]


def test_mxint8_elements() -> None:
    w = torch.randn(4, 64, generator=_gen(1))
    _, elems, scales = mx_quantize(w, None)
    assert torch.equal(elems * 64, torch.round(elems * 64))
    assert float(elems.abs().max()) <= MXINT8_MAX
    for b, s in zip(w.reshape(-1, 32), scales.flatten(), strict=True):
        assert float(s) == 2.0 ** math.floor(math.log2(float(b.abs().max())))  # emax_elem = 0
    k = torch.arange(-127, 128, dtype=torch.float32)[None, :32] / 64 * 4  # k/64 * 2^2 round-trips
    assert torch.equal(mx_quantize(torch.cat([k, torch.full((1, 32), 0.0)], 0).reshape(1, 64), None)[0][0, :32],
                       k[0])


def test_nvfp4_block_scales_are_e4m3_and_elements_e2m1() -> None:
    w = torch.randn(8, 64, generator=_gen(2))
    dq, elems, scales, ts = nvfp4_quantize(w)
    assert ts == float(w.abs().max()) / (448 * 6)
    assert torch.allclose(fp_round(scales / ts, E4M3), scales / ts, atol=0, rtol=1e-6)  # E4M3 block scales
    assert torch.equal(dq, elems * scales.repeat_interleave(16, dim=1))
    assert {abs(v) for v in elems.flatten().tolist()} <= set(spec_values(2, 1, 1, "e2m1"))


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [0, 32, 64, 128])
def test_rtn_invariants(bits: int, symmetric: bool, group: int) -> None:
    w = torch.randn(12, 256, generator=_gen(bits)) * 0.05
    w[0, :group or 256] = 0.0  # an all-zero group
    q = quantize(w, QuantScheme(f"int{bits}", group, symmetric))
    qmin, qmax = int_range(bits, symmetric)
    assert torch.equal(q.codes, torch.round(q.codes))
    assert int(q.codes.min()) >= qmin and int(q.codes.max()) <= qmax
    g = group or 256
    scale = q.scale.repeat_interleave(g, dim=1)
    assert bool(((q.dequant - w).abs() <= scale / 2 + 1e-6 * float(w.abs().max())).all())  # fp32 rounding
    zero = 0 if q.zero is None else q.zero.repeat_interleave(g, dim=1)
    assert torch.equal(q.dequant, (q.codes - zero) * scale)
    assert bool((q.dequant[w == 0] == 0).all())  # zero is exact


@pytest.mark.parametrize("name", SCHEMES)
def test_gptq_with_identity_hessian_equals_rtn(name: str) -> None:
    scheme = QuantScheme(name, 128 if name.startswith("int") else QuantScheme(name, 16 if name == "nvfp4"
                                                                              else 32).group_size)
    w = torch.randn(24, 256, generator=_gen(3))
    factor = inverse_hessian_factor(torch.eye(256), 0.0)
    rtn = quantize(w, scheme)
    res = gptq_quantize(w, factor, scheme)
    assert torch.equal(res.weight, rtn.dequant)
    assert torch.equal(res.scale, rtn.scale)
    perm = act_order_perm(torch.eye(256))
    assert torch.equal(gptq_quantize(w, factor, scheme, perm=perm).weight, rtn.dequant)


def correlated(n: int = 2048, d: int = 128, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    mix = torch.eye(d) + 2.0 * torch.randn(d, d, generator=g) / d**0.5
    return (torch.randn(n, d, generator=g) @ mix) * torch.exp(torch.randn(d, generator=g))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_reconstructs_better_than_rtn(act_order: bool) -> None:
    x = correlated()
    w = torch.randn(32, 128, generator=_gen(4))
    H = 2 * x.t() @ x / x.shape[0]
    perm = act_order_perm(H) if act_order else None
    factor = inverse_hessian_factor(H if perm is None else H[perm][:, perm], 0.01)
    scheme = QuantScheme("int3", 32)
    res = gptq_quantize(w, factor, scheme, perm=perm, blocksize=64)
    err = lambda a: float((x @ (a - w).t()).square().sum())  # noqa: E731
    assert err(res.weight) < 0.8 * err(quantize(w, scheme).dequant)
    codes = torch.round(res.weight / res.scale.repeat_interleave(32, dim=1))
    assert torch.allclose(codes * res.scale.repeat_interleave(32, dim=1), res.weight, atol=0, rtol=1e-6)
    assert int(codes.min()) >= -4 and int(codes.max()) <= 3


@pytest.mark.parametrize("name,group", [("int4", 32), ("int4", 0), ("mxfp4", 32), ("nvfp4", 16)])
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_joint_keeps_the_exact_nm_pattern_and_kept_values_on_the_grid(name: str, group: int, nm) -> None:
    x = correlated(d=128, seed=5)
    w = torch.randn(16, 128, generator=_gen(6))
    factor = inverse_hessian_factor(2 * x.t() @ x / x.shape[0], 0.01)
    scheme = QuantScheme(name, group)
    res = gptq_quantize(w, factor, scheme, blocksize=32, prune=PruneSpec(nm=nm))
    n, m = nm
    assert bool((res.pruned.reshape(16, -1, m).sum(-1) == n).all())  # exactly N pruned in every group of M
    assert bool((res.weight[res.pruned] == 0).all())
    g = scheme.group(128)
    scale = res.scale.repeat_interleave(g, dim=1)
    if name == "int4":
        codes = res.weight / scale
        assert torch.allclose(codes, torch.round(codes), atol=1e-5, rtol=0)
        assert float(codes.min()) >= -8 - 1e-5 and float(codes.max()) <= 7 + 1e-5
    elif name == "mxfp4":
        elems = res.weight / scale  # a power-of-two scale divides exactly
        assert torch.equal(fp_round(elems, E2M1), elems)
    else:
        elems = res.weight / scale  # NVFP4's scales are not powers of two: equal up to fp32 rounding
        assert torch.allclose(fp_round(elems, E2M1), elems, atol=0, rtol=1e-6)


def test_joint_unstructured_prunes_each_row_exactly() -> None:
    x = correlated(d=128, seed=7)
    w = torch.randn(8, 128, generator=_gen(8))
    factor = inverse_hessian_factor(2 * x.t() @ x / x.shape[0], 0.01)
    res = gptq_quantize(w, factor, QuantScheme("int8", 64), prune=PruneSpec(sparsity=0.5))
    assert res.pruned.sum(1).tolist() == [64] * 8
    assert bool((res.weight[res.pruned] == 0).all())


def test_scheme_validation() -> None:
    with pytest.raises(ConfigError, match="blocks of 32"):
        QuantScheme("mxfp4", 64)
    with pytest.raises(ConfigError, match="symmetric by definition"):
        QuantScheme("mxfp8-e4m3", 32, symmetric=False)
    with pytest.raises(ConfigError, match="unknown quantization scheme"):
        QuantScheme("int5")
    with pytest.raises(ConfigError, match="multiple of 128"):
        quantize(torch.zeros(2, 100), QuantScheme("int4", 128))


def test_bits_account_by_hand() -> None:
    a = matrix_bits((4096, 4096), QuantScheme("int4", 128))
    assert a.element_bits == 4096 * 4096 * 4 and a.scale_bits == 4096 * 32 * 16 and a.zero_bits == 0
    assert a.bits_per_param == 4.125
    assert matrix_bits((4096, 4096), QuantScheme("int4", 128, symmetric=False)).bits_per_param == 4.125 + 4 / 128
    assert matrix_bits((64, 256), QuantScheme("int8", 0)).bits_per_param == 8 + 16 / 256
    assert matrix_bits((64, 256), QuantScheme("mxfp4", 32)).bits_per_param == 4.25
    assert matrix_bits((64, 256), QuantScheme("mxfp8-e4m3", 32)).bits_per_param == 8.25
    assert matrix_bits((64, 256), QuantScheme("mxfp6-e2m3", 32)).bits_per_param == 6.25
    nv = matrix_bits((64, 256), QuantScheme("nvfp4", 16))
    assert nv.total_bits == 64 * 256 * 4 + 64 * 16 * 8 + 32
    joint = matrix_bits((8, 128), QuantScheme("int4", 128), nm=(2, 4))  # 512 kept x (4 + 2 index bits) + 8 scales
    assert (joint.element_bits, joint.metadata_bits, joint.scale_bits) == (2048, 1024, 128)
    assert joint.bytes == 400 and joint.bits_per_param == 3200 / 1024
    sparse = matrix_bits((32, 32), None, nonzero=500, value_bits=16)  # bitmask + the non-zero values
    assert sparse.total_bits == 500 * 16 + 1024
    assert (joint + sparse).params == 1024 + 1024
