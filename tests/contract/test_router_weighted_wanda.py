"""Wanda with router-weighted expert activations (MoE-Pruner's score)."""

from __future__ import annotations

import pytest
import torch

import pare
from pare.calibration.stats import InputStats, RouterWeightedStats
from pare.config import RuntimeConfig
from pare.errors import ConfigError
from tiny import tiny_batch, tiny_model

CALIB = tiny_batch(8, 32, seed=1)
QUIET = RuntimeConfig(progress=False)


def _pruned(model_type: str, router_weighted: bool, **overrides) -> dict[str, torch.Tensor]:
    model = tiny_model(model_type, **overrides)
    pare.prune(model, pare.WandaConfig(sparsity=0.5, router_weighted=router_weighted), CALIB, runtime=QUIET)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_router_weighted_norms_scale_each_token_by_its_gate():
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    gate = torch.tensor([0.5, 2.0])
    plain, weighted = InputStats(), RouterWeightedStats()
    plain.add_routed(x, gate)
    weighted.add_routed(x, gate)
    assert torch.allclose(plain.norms(), x.pow(2).sum(0).sqrt())
    assert torch.allclose(weighted.norms(), torch.tensor([(0.25 + 36.0) ** 0.5, (1.0 + 4.0) ** 0.5]))


def test_gates_all_one_give_plain_wanda():
    # top-1 Mixtral renormalises its one gate to 1 for every token: the weighting changes nothing
    assert all(torch.equal(a, b) for a, b in zip(_pruned("mixtral", True, num_experts_per_tok=1).values(),
                                                 _pruned("mixtral", False, num_experts_per_tok=1).values(),
                                                 strict=True))


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_only_expert_masks_change(model_type):
    weighted, plain = _pruned(model_type, True), _pruned(model_type, False)
    changed = {n for n in weighted if not torch.equal(weighted[n], plain[n])}
    # layer 0 sees the same inputs either way (later layers see the differently pruned layers' outputs)
    first = {n for n in changed if n.startswith("model.layers.0.")}
    assert first and all(".experts." in n for n in first), changed
    for n in changed:  # same sparsity, other positions
        assert (weighted[n] == 0).sum() == (plain[n] == 0).sum()


def test_router_weighted_needs_experts():
    with pytest.raises(ConfigError, match="no routed experts"):
        pare.prune(tiny_model("llama"), pare.WandaConfig(router_weighted=True), CALIB, runtime=QUIET)
