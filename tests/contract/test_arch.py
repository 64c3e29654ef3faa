"""The architecture description is right for every supported family (tiny random models)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from pare.arch import ArchOverride, describe, get_weight
from pare.arch.targets import layer_targets
from pare.errors import UnsupportedArchitectureError
from tiny import TINY_ARCHS, tiny_model

MOE = {"mixtral", "qwen2_moe", "qwen3_moe"}


def _heads(config) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim


@pytest.mark.parametrize("model_type", TINY_ARCHS)
def test_roles_match_config_and_shapes(model_type: str) -> None:
    model = tiny_model(model_type)
    arch = describe(model)
    cfg = model.config
    heads, kv, head_dim = _heads(cfg)
    layers = arch.layer_modules(model)
    assert arch.num_layers == cfg.num_hidden_layers == len(layers)
    assert arch.tied == bool(getattr(cfg, "tie_word_embeddings", False))
    assert model.get_submodule(arch.embed_path) is model.get_input_embeddings()
    assert model.get_submodule(arch.lm_head_path) is model.get_output_embeddings()
    assert arch.final_norm_path is not None
    hidden = cfg.hidden_size
    for i, roles in enumerate(arch.layers):
        layer = layers[i]
        att = roles.attention
        assert att is not None
        assert (att.num_heads, att.num_kv_heads, att.head_dim) == (heads, kv, head_dim)
        if att.qkv is not None:
            w = get_weight(layer.get_submodule(att.qkv.path), att.qkv)
            assert tuple(w.shape) == ((heads + 2 * kv) * head_dim, hidden)
        else:
            for proj, n in ((att.q, heads), (att.k, kv), (att.v, kv)):
                assert proj is not None
                assert tuple(get_weight(layer.get_submodule(proj.path), proj).shape) == (n * head_dim, hidden)
        assert tuple(get_weight(layer.get_submodule(att.o.path), att.o).shape) == (hidden, heads * head_dim)
        assert len(roles.norms) >= 2
        assert roles.parallel_residual == (model_type == "gpt_neox")
        if model_type in MOE:
            ex = roles.experts
            assert ex is not None and roles.mlp is None
            n_exp = getattr(cfg, "num_local_experts", None) or cfg.num_experts
            inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
            assert (ex.num_experts, ex.intermediate, ex.top_k) == (n_exp, inter, cfg.num_experts_per_tok)
            assert (ex.shared is not None) == (model_type == "qwen2_moe")
        else:
            mlp = roles.mlp
            assert mlp is not None
            down = get_weight(layer.get_submodule(mlp.down.path), mlp.down)
            inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None) or 4 * hidden
            assert tuple(down.shape) == (hidden, inter)
            for proj in mlp.inputs:
                w = get_weight(layer.get_submodule(proj.path), proj)
                assert w.shape[1] == hidden
                assert w.shape[0] == (2 * inter if proj is mlp.gate_up else inter)
            assert mlp.gated == (model_type not in ("gpt_neox", "gpt2", "opt"))


@pytest.mark.parametrize("model_type", TINY_ARCHS)
def test_targets_cover_every_projection_and_expert(model_type: str) -> None:
    model = tiny_model(model_type)
    arch = describe(model)
    layer = arch.layer_modules(model)[0]
    targets = layer_targets(layer, arch.layers[0], arch.layer_prefix(0))
    names = [t.name for t in targets]
    assert len(names) == len(set(names))
    linear = [m for n, m in layer.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    routers = 1 if model_type == "qwen2_moe" else 0  # shared_expert_gate (a Linear) is a router
    experts = arch.layers[0].experts
    n_expert_targets = 2 * experts.num_experts if experts else 0
    assert len(targets) == len(linear) - routers + n_expert_targets
    for t in targets:
        assert t.weight().dim() == 2


def test_weight_view_is_live_for_conv1d_and_experts() -> None:
    for model_type in ("gpt2", "mixtral"):
        model = tiny_model(model_type)
        arch = describe(model)
        t = layer_targets(arch.layer_modules(model)[0], arch.layers[0], arch.layer_prefix(0))[0]
        t.weight()[0, 0] = 123.0
        assert (getattr(t.module, t.param) == 123.0).sum() == 1


class _OddBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(8, 8)
        self.ffn_in = nn.Linear(8, 16)
        self.ffn_out = nn.Linear(16, 8)


def test_unknown_architecture_names_what_failed_and_how_to_override() -> None:
    model = tiny_model("llama")
    layers = model.model.layers
    for i in range(len(layers)):
        layers[i] = _OddBlock()
    model._no_split_modules = ["_OddBlock"]
    with pytest.raises(UnsupportedArchitectureError) as err:
        describe(model)
    msg = str(err.value)
    assert "attention projections" in msg and "ArchOverride" in msg and "mix" in msg


def test_override_names_modules_of_a_renamed_llama() -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    model = LlamaForCausalLM(cfg)
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.wq = attn.q_proj
        del attn.q_proj
    override = ArchOverride(names={"q": "self_attn.wq"})
    arch = describe(model, override)
    assert arch.layers[0].attention is not None
    assert arch.layers[0].attention.q is not None and arch.layers[0].attention.q.path == "self_attn.wq"


def test_a_decoder_config_without_a_head_count_is_refused_with_the_reason() -> None:
    """Florence-2's BART decoder names its heads ``decoder_attention_heads``: a pare error, no traceback."""
    from types import SimpleNamespace

    from pare.arch.infer import config_head_counts

    with pytest.raises(UnsupportedArchitectureError, match="num_attention_heads"):
        config_head_counts(SimpleNamespace(model_type="florence2", hidden_size=64))
    assert config_head_counts(SimpleNamespace(num_attention_heads=4, hidden_size=64)) == (4, 4, 16)
