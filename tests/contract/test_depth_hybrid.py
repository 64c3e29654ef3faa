"""Depth removal on hybrid models keeps ``layer_types`` and the cache layout consistent: it never
removes the last layer of a kind, never leaves a layer where the shortened config builds another
kind, and the result generates with the KV cache exactly as without it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pare.arch import describe
from pare.arch.surgery.depth import choose_layers, removal_problem, remove_layers
from pare.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from tiny_configs import build, tiny_config


def _model(model_type: str):
    return build(AutoModelForCausalLM, tiny_config(model_type))


def test_last_layer_of_a_kind_is_kept_and_generation_matches_the_cache() -> None:
    model = _model("qwen3_next")  # layer_types: three linear-attention layers, one full-attention layer
    arch = describe(model)
    kinds = list(model.config.layer_types)
    full = kinds.index("full_attention")
    assert kinds.count("full_attention") == 1
    with pytest.raises(ConfigError, match="full_attention"):
        remove_layers(model, arch, [full])
    chosen, skipped = choose_layers(model, arch, [full, 0, 1], 1)
    assert chosen == [0] and "full_attention" in skipped[0]
    remove_layers(model, arch, chosen)
    assert list(model.config.layer_types) == [k for i, k in enumerate(kinds) if i != 0]
    ids = torch.randint(3, 200, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
        plain = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, plain)


def test_a_pattern_set_by_a_period_only_loses_whole_periods() -> None:
    model = _model("jamba")  # attn_layer_period=2, offset=1: mamba, attention, mamba, attention
    arch = describe(model)
    why = removal_problem(model, arch, [0])
    assert why is not None and "pattern" in why
    assert removal_problem(model, arch, [0, 1]) is None
    with pytest.raises(ConfigError, match="pattern"):
        remove_layers(model, arch, [0])
