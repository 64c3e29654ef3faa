"""Width surgery on every tiny architecture: zero-weight invariance, GQA validity, reloads."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import pare
from pare.arch import describe
from pare.arch.roles import get_weight
from pare.arch.surgery import replay
from pare.arch.surgery.width import (
    head_count_for_ratio,
    prune_heads,
    prune_hidden,
    prune_mlp_channels,
    sync_config,
)
from pare.errors import ConfigError
from pare.report import Report
from tiny import TINY_ARCHS, tiny_batch, tiny_model

IDS = tiny_batch(2, 32)
RMS_ARCHS = [a for a in TINY_ARCHS if a not in ("gpt2", "opt", "gpt_neox")]


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _mlp_width(model, arch, i):
    r = arch.layers[i]
    if r.experts is not None:
        return r.experts.intermediate
    return get_weight(arch.layer_modules(model)[i].get_submodule(r.mlp.down.path), r.mlp.down).shape[1]


def _zero_down_columns(model, arch, i, drop):
    layer, r = arch.layer_modules(model)[i], arch.layers[i]
    if r.experts is not None:
        getattr(layer.get_submodule(r.experts.path), r.experts.down_param).data[:, :, drop] = 0
    else:
        get_weight(layer.get_submodule(r.mlp.down.path), r.mlp.down)[:, drop] = 0


@pytest.mark.parametrize("model_type", TINY_ARCHS)
def test_pruning_zero_mlp_channels_keeps_logits(model_type):
    model = tiny_model(model_type)
    arch = describe(model)
    keeps = []
    for i in range(arch.num_layers):
        width = _mlp_width(model, arch, i)
        step = 4 if arch.layers[i].experts is not None else 1  # fp32 experts: widths multiple of 4
        keep = torch.arange(width - 8) if step > 1 else torch.tensor([j for j in range(width) if j % 3])
        drop = torch.tensor(sorted(set(range(width)) - set(keep.tolist())))
        _zero_down_columns(model, arch, i, drop)
        keeps.append(keep)
    before = _logits(model)
    for i, keep in enumerate(keeps):
        edit = prune_mlp_channels(model, arch, i, keep)
        assert edit.to_dict() == {"op": "mlp_channels", "layer": i, "width": len(keep), "shared_width": None}
    assert torch.allclose(_logits(model), before, atol=1e-5)
    assert all(_mlp_width(model, describe(model), i) == len(k) for i, k in enumerate(keeps))


@pytest.mark.parametrize("model_type", TINY_ARCHS)
def test_pruning_zero_heads_keeps_logits_gqa_valid_and_reloads(model_type, tmp_path):
    model = tiny_model(model_type)
    arch = describe(model)
    att = arch.layers[0].attention
    h, kv, d = att.num_heads, att.num_kv_heads, att.head_dim
    group = h // kv
    keep = torch.arange(0, h, group) if group > 1 else torch.arange(h - 1)  # one query head per KV group
    for i, r in enumerate(arch.layers):
        w = get_weight(arch.layer_modules(model)[i].get_submodule(r.attention.o.path), r.attention.o)
        for head in set(range(h)) - set(keep.tolist()):
            w[:, head * d:(head + 1) * d] = 0
    before = _logits(model)
    edits = [prune_heads(model, arch, i, keep_query_heads=keep) for i in range(arch.num_layers)]
    assert torch.allclose(_logits(model), before, atol=1e-5)
    after = describe(model).layers[0].attention
    assert after.num_heads == len(keep) and after.num_kv_heads == (kv if group > 1 else len(keep))
    assert after.num_heads % after.num_kv_heads == 0
    uniform = sync_config(model, describe(model))
    report = Report(method="test", config={}, edits=edits, uniform=uniform)
    pare.save(model, None, tmp_path / "m", report=report)
    assert torch.allclose(_logits(pare.load(tmp_path / "m")), before, atol=1e-5)
    if uniform:  # attention width tied to hidden (GPT-2/OPT/NeoX) needs the manifest replay
        assert model.config.num_attention_heads == len(keep)
        fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
        assert torch.allclose(_logits(fresh), before, atol=1e-5)
    else:
        assert model_type in ("gpt2", "opt", "gpt_neox")


@pytest.mark.parametrize("model_type", TINY_ARCHS)
def test_kv_group_pruning(model_type):
    model = tiny_model(model_type)
    arch = describe(model)
    att = arch.layers[0].attention
    before = _logits(model)
    edit = prune_heads(model, arch, 0, keep_kv_groups=torch.arange(att.num_kv_heads - 1))
    group = att.num_heads // att.num_kv_heads
    assert edit.num_kv_heads == att.num_kv_heads - 1
    assert edit.num_heads == (att.num_kv_heads - 1) * group
    out = _logits(model)
    assert out.shape == before.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("model_type", RMS_ARCHS)
def test_pruning_zero_hidden_channels_keeps_logits(model_type):
    """Zero residual channels (embedding columns, o/down rows, expert down rows) then remove them:
    RMSNorm's sqrt(H/H') weight scaling makes this exact up to eps (set tiny here)."""
    model = tiny_model(model_type, rms_norm_eps=1e-12)
    arch = describe(model)
    hidden = model.get_input_embeddings().weight.shape[1]
    drop = torch.arange(hidden - 16, hidden)
    keep = torch.arange(hidden - 16)
    model.get_input_embeddings().weight.data[:, drop] = 0
    for i, r in enumerate(arch.layers):
        layer = arch.layer_modules(model)[i]
        get_weight(layer.get_submodule(r.attention.o.path), r.attention.o)[drop] = 0
        if r.mlp is not None:
            get_weight(layer.get_submodule(r.mlp.down.path), r.mlp.down)[drop] = 0
        if r.experts is not None:
            getattr(layer.get_submodule(r.experts.path), r.experts.down_param).data[:, drop] = 0
            if r.experts.shared is not None:
                layer.get_submodule(r.experts.shared.down.path).weight.data[drop] = 0
    if hasattr(model.get_input_embeddings(), "embed_scale"):
        pytest.skip("Gemma scales embeddings by sqrt(hidden_size): the cut changes that scale by design")
    before = _logits(model)
    prune_hidden(model, arch, keep, rms_scale=(hidden / len(keep)) ** 0.5)
    assert torch.allclose(_logits(model), before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", TINY_ARCHS)
@pytest.mark.parametrize("tied", [True, False])
def test_hidden_pruning_reloads_tied_and_untied(model_type, tied, tmp_path):
    model = tiny_model(model_type, tie_word_embeddings=tied)
    arch = describe(model)
    if model_type in ("gpt2", "opt", "gpt_neox"):  # attention width is the hidden size: cut heads too
        for i in range(arch.num_layers):
            prune_heads(model, arch, i, keep_query_heads=torch.arange(3))
        keep = torch.arange(48)
    else:
        keep = torch.arange(8, 64)
    prune_hidden(model, arch, keep)
    assert sync_config(model, describe(model))
    assert model.config.hidden_size == len(keep)
    before = _logits(model)
    model.save_pretrained(tmp_path)
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(_logits(fresh), before, atol=1e-5)
    assert (fresh.get_output_embeddings().weight is fresh.get_input_embeddings().weight) == tied


def test_invalid_head_ratio_lists_valid_ratios():
    # Qwen2-7B: 28 query heads, 4 KV heads: dropping query heads evenly gives only k/7
    with pytest.raises(ConfigError, match=r"nearest valid ratios: \[0\.2857, 0\.1429"):
        head_count_for_ratio(28, 4, 0.25, "query")
    assert head_count_for_ratio(28, 4, 0.25, "kv") == (21, 3)
    assert head_count_for_ratio(28, 4, 4 / 7, "query") == (12, 4)
    with pytest.raises(ConfigError, match="same number of query heads"):
        model = tiny_model("llama")
        prune_heads(model, describe(model), 0, keep_query_heads=torch.tensor([0, 1, 2]))


def test_moe_expert_width_must_stay_aligned():
    model = tiny_model("mixtral")
    with pytest.raises(ConfigError, match="multiple of 4"):
        prune_mlp_channels(model, describe(model), 0, torch.arange(50))


@pytest.mark.parametrize("model_type", ["llama", "phi3", "qwen2_moe", "gpt2"])
def test_non_uniform_round_trip_and_replay(model_type, tmp_path):
    model = tiny_model(model_type)
    arch = describe(model)
    edits = []
    for i in range(arch.num_layers):
        width = _mlp_width(model, arch, i)
        n = width - 4 * (i + 1) if arch.layers[i].experts is not None else width - 10 * (i + 1)
        edits.append(prune_mlp_channels(model, arch, i, torch.arange(n)))
    edits.append(prune_heads(model, arch, 1, keep_query_heads=torch.tensor([0, 2]) if model_type != "gpt2"
                             else torch.tensor([0, 1])))
    assert not sync_config(model, describe(model))
    before = _logits(model)
    pare.save(model, None, tmp_path / "m", report=Report(method="t", config={}, edits=edits, uniform=False))
    assert torch.equal(_logits(pare.load(tmp_path / "m")), before)
    fresh = tiny_model(model_type, seed=1)
    replay(fresh, edits)
    shapes = {k: v.shape for k, v in fresh.state_dict().items()}
    assert shapes == {k: v.shape for k, v in model.state_dict().items()}
