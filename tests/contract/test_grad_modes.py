"""Every method prunes the same way whatever autograd mode the caller is in."""

from __future__ import annotations

import contextlib

import pytest
import torch

import pare
from pare.methods import METHODS
from tiny import tiny_batch, tiny_model

QUIET = pare.RuntimeConfig(progress=False, device="cpu")
OPTIONS = {"layers": {"layers": "1"}, "width": {"importance": "taylor"},
           "quantize": {"group_size": 32, "algorithm": "gptq"},
           "recover": {"data": "calibration", "tokens": 64, "seqlen": 8, "batch_size": 2, "eval_windows": 1},
           "gradual": {"prune_steps": 2, "recover": {"mode": "full", "data": "calibration", "tokens": 32, "seqlen": 8}}}
ARCH = {"experts": "mixtral"}  # a method that needs a family of its own
MODES = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "grad": contextlib.nullcontext}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_under_the_callers_autograd_mode(method: str, mode: str) -> None:
    torch.manual_seed(0)
    cfg = METHODS[method].config_class(**OPTIONS.get(method, {}))
    arch = ARCH.get(method, "llama")
    ref = tiny_model(arch)
    pare.prune(ref, cfg, tiny_batch(4, 16), runtime=QUIET)
    model = tiny_model(arch)
    with MODES[mode]():
        ids = tiny_batch(4, 16)  # made inside the mode, as a caller would
        pare.prune(model, cfg, ids, runtime=QUIET)
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, msg=name)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())

