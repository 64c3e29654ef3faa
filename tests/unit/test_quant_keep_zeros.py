"""Quantizing an already pruned matrix keeps its zeros (GPTQ's ``keep_zero``, the stage's ``keep_zeros``)."""

from __future__ import annotations

import pytest
import torch

from pare.errors import ConfigError
from pare.ops.hessian import inverse_hessian_factor
from pare.ops.quant.gptq import PruneSpec, act_order_perm, gptq_quantize
from pare.ops.quant.scheme import QuantScheme, quantize


def _inputs(n: int = 256, d: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 8, generator=g)
    return base @ torch.randn(8, d, generator=g) + 0.3 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(("name", "group"), [("int4", 32), ("int4", 0), ("mxfp4", 32)])
def test_gptq_keeps_the_zeros_it_is_given(name: str, group: int, act_order: bool) -> None:
    x = _inputs()
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=g)
    w[torch.rand(16, 64, generator=g) < 0.5] = 0.0
    zeros = w == 0
    H = 2 * x.t() @ x / x.shape[0]
    perm = act_order_perm(H) if act_order else None
    factor = inverse_hessian_factor(H if perm is None else H[perm][:, perm], 0.01)
    scheme = QuantScheme(name, group)
    kept = gptq_quantize(w, factor, scheme, perm=perm, keep_zero=zeros)
    assert bool((kept.weight[zeros] == 0).all())
    free = gptq_quantize(w, factor, scheme, perm=perm)
    assert int((free.weight[zeros] != 0).sum()) > 0  # without the mask the updates fill the holes
    err = lambda a: float((x @ (a - w).t()).square().sum())  # noqa: E731
    assert err(kept.weight) < err(quantize(w, scheme).dequant)  # still better than rounding


def test_keep_zero_is_not_for_joint_pruning() -> None:
    factor = inverse_hessian_factor(torch.eye(64), 0.01)
    with pytest.raises(ConfigError, match="keep_zero"):
        gptq_quantize(torch.randn(4, 64), factor, QuantScheme("int4", 32), prune=PruneSpec(sparsity=0.5),
                      keep_zero=torch.zeros(4, 64, dtype=torch.bool))
