"""2:4 detection and the CUDA semi-structured speed measurement (skipped cleanly without CUDA)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pare.eval.semi_structured import is_two_four, measure_two_four_speedup, unavailable_reason
from pare.ops.masks import nm_mask


def _two_four_linear(out_f: int = 256, in_f: int = 256) -> nn.Linear:
    lin = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        lin.weight.masked_fill_(nm_mask(lin.weight.abs(), 2, 4), 0)
    return lin


def test_is_two_four() -> None:
    lin = _two_four_linear(8, 16)
    assert is_two_four(lin.weight)
    dense = torch.randn(8, 16) + 10
    assert not is_two_four(dense)
    assert not is_two_four(torch.zeros(8, 6))  # width not a multiple of 4


def test_cpu_run_says_why_it_measured_nothing() -> None:
    model = nn.Sequential(_two_four_linear())
    res = measure_two_four_speedup(model)
    assert res.skipped is not None and "CUDA" in res.skipped and res.speedup is None
    assert unavailable_reason(torch.device("cpu")) is not None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_two_four_speedup_is_measured() -> None:
    device = torch.device("cuda")
    reason = unavailable_reason(device)
    if reason is not None:
        pytest.skip(reason)
    model = nn.Sequential(_two_four_linear(4096, 4096), _two_four_linear(4096, 4096)).to(device)
    res = measure_two_four_speedup(model, tokens=4096, repeats=5)
    assert res.skipped is None and len(res.modules) == 2 and res.speedup is not None and res.speedup > 0
