"""GPTQ solver options: row-stacked solves, quantization-aware N:M choice in the joint pass, range search."""

from __future__ import annotations

import pytest
import torch

from pare.errors import ConfigError
from pare.methods.quantize import QuantizeConfig
from pare.methods.sparsegpt import SparseGPTConfig
from pare.ops.hessian import inverse_hessian_factor, lower_inverse
from pare.ops.quant.gptq import PruneSpec, act_order_perm, gptq_quantize
from pare.ops.quant.rtn import int_params, int_params_searched, int_quantize
from pare.ops.quant.scheme import QuantScheme, quantize


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _hessian(d: int = 128, n: int = 1024, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    x = (torch.randn(n, d, generator=g) @ (torch.eye(d) + 2 * torch.randn(d, d, generator=g) / d**0.5)) \
        * torch.exp(torch.randn(d, generator=g))
    return 2 * x.t() @ x / n


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(("name", "group", "symmetric"), [("int4", 32, True), ("int4", 32, False), ("mxfp4", 32, True)])
def test_stacked_rows_solve_like_separate_matrices(act_order: bool, name: str, group: int, symmetric: bool) -> None:
    H = _hessian()
    perm = act_order_perm(H) if act_order else None
    factor = inverse_hessian_factor(H if perm is None else H[perm][:, perm], 0.01)
    scheme = QuantScheme(name, group, symmetric)
    a, b = torch.randn(24, 128, generator=_gen(1)), torch.randn(8, 128, generator=_gen(2))
    both = gptq_quantize(torch.cat([a, b]), factor, scheme, blocksize=64, perm=perm)
    for rows, w in ((slice(0, 24), a), (slice(24, 32), b)):
        alone = gptq_quantize(w, factor, scheme, blocksize=64, perm=perm)
        torch.testing.assert_close(both.weight[rows], alone.weight, rtol=0, atol=1e-5 * float(w.abs().max()))
        assert float(both.row_loss[rows].sum()) == pytest.approx(alone.loss, rel=1e-4)


@pytest.mark.parametrize(("name", "group"), [("int4", 32), ("int4", 0), ("mxfp4", 32), ("nvfp4", 16)])
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_quant_aware_nm_choice_keeps_the_exact_pattern(name: str, group: int, nm) -> None:
    factor = inverse_hessian_factor(_hessian(seed=5), 0.01)
    w = torch.randn(32, 128, generator=_gen(6))
    scheme = QuantScheme(name, group)
    plain = gptq_quantize(w, factor, scheme, blocksize=32, prune=PruneSpec(nm=nm))
    aware = gptq_quantize(w, factor, scheme, blocksize=32, prune=PruneSpec(nm=nm, nm_quant=True))
    n, m = nm
    assert bool((aware.pruned.reshape(32, -1, m).sum(-1) == n).all())
    assert bool((aware.weight[aware.pruned] == 0).all())
    assert not torch.equal(aware.pruned, plain.pruned)  # the quantization error changes some choices


@pytest.mark.parametrize("symmetric", [True, False])
def test_range_search_never_rounds_worse_and_starts_from_the_full_range(symmetric: bool) -> None:
    w = torch.randn(64, 32, generator=_gen(7)) * torch.exp(torch.randn(64, 1, generator=_gen(8)))
    full = int_params(w, 4, symmetric)
    found = int_params_searched(w, 4, symmetric)
    err = lambda p: (int_quantize(w, p[0], p[1], 4)[0] - w).square().sum(1)  # noqa: E731
    assert bool((err(found) <= err(full)).all())
    assert bool((err(found) < err(full)).any())  # Gaussian rows: a slightly clipped range often rounds better
    assert torch.equal(int_params_searched(w, 4, symmetric, steps=0)[0], full[0])


def test_identity_hessian_gptq_with_range_search_is_rounding_with_searched_ranges() -> None:
    w = torch.randn(16, 128, generator=_gen(9))
    factor = inverse_hessian_factor(torch.eye(128), 0.0)
    res = gptq_quantize(w, factor, QuantScheme("int4", 32), clip_search=True)
    scale, _ = int_params_searched(w.reshape(-1, 32), 4, True)
    expected = int_quantize(w.reshape(-1, 32), scale, None, 4)[0].reshape(16, 128)
    assert torch.equal(res.weight, expected)
    assert not torch.equal(res.weight, quantize(w, QuantScheme("int4", 32)).dequant)


def test_lower_inverse_by_halves_matches_a_triangular_solve() -> None:
    L = torch.linalg.cholesky(_hessian(d=600, n=2400) + 0.01 * torch.eye(600))
    ref = torch.linalg.solve_triangular(L, torch.eye(600), upper=False)
    got = lower_inverse(L, leaf=64)
    assert torch.equal(torch.triu(got, 1), torch.zeros_like(got))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="nm_quant"):
        SparseGPTConfig(pattern="2:4", nm_quant=True)
    with pytest.raises(ConfigError, match="nm_quant"):
        SparseGPTConfig(sparsity=0.5, quantize="int4", nm_quant=True)
    with pytest.raises(ConfigError, match="clip_search"):
        SparseGPTConfig(pattern="2:4", quantize="mxfp4", clip_search=True)
    with pytest.raises(ConfigError, match="clip_search"):
        QuantizeConfig(scheme="int4", clip_search=True)  # rtn
    with pytest.raises(ConfigError, match="joint must be one of"):
        SparseGPTConfig(pattern="2:4", quantize="int4", joint="together")
    with pytest.raises(ConfigError, match="nm_quant"):
        SparseGPTConfig(pattern="2:4", quantize="int4", nm_quant=True)  # the default joint mode picks no groups
    SparseGPTConfig(pattern="2:4", quantize="int4", group_size=32, nm_quant=True, clip_search=True, joint="interleaved")
