"""slicegpt x tiny architectures: exact rotation at slicing 0, sliced save -> from_pretrained, refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import pare
from pare import SliceGPTConfig
from pare.api import check
from pare.arch import describe
from pare.config import RuntimeConfig
from pare.errors import ConfigError
from tiny import ALL_TINY_ARCHS, TINY_ARCHS, tiny_batch, tiny_model

RT = RuntimeConfig(device="cpu", progress=False)
CALIB = tiny_batch(4, 32, seed=1)
IDS = tiny_batch(2, 32, seed=2)
REFUSED = {"gemma2": "sandwich norm", "gemma3_text": "sandwich norm"}
ROTATABLE = [a for a in TINY_ARCHS if a not in REFUSED]
ATTN_IS_HIDDEN = ("gpt2", "opt", "gpt_neox")
# beyond the table: Bloom (a LayerNorm on the embeddings) and Falcon (parallel blocks whose shared norm
# feeds a reader without a bias) are refused, see test_families_outside_the_table_refused_with_reason
EXACT = [a for a in ALL_TINY_ARCHS if a not in REFUSED and a not in ("bloom", "falcon")]


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _model(model_type, **overrides):
    """A tiny model whose norms have random weights (and LayerNorm biases): the fusion is not a no-op."""
    model = tiny_model(model_type, **overrides)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("rotation", ["shared", "per-layer"])
@pytest.mark.parametrize("model_type", EXACT)
def test_rotation_without_slicing_keeps_logits(model_type, rotation):
    model = _model(model_type)
    if model_type == "gptj":  # one LayerNorm shared by parallel blocks whose q/k/v have no bias to take its own
        with torch.no_grad():
            for layer in model.transformer.h:
                layer.ln_1.bias.zero_()
    before = _logits(model)
    report = pare.prune(model, SliceGPTConfig(slicing=0.0, rotation=rotation), CALIB, runtime=RT)
    assert torch.allclose(_logits(model), before, atol=1e-4)
    if rotation == "shared":  # per-layer wraps the layers: the description no longer applies
        arch = describe(model)
        norms = [model.get_submodule(f"{arch.layer_prefix(i)}.{n}") for i, r in enumerate(arch.layers) for n in r.norms]
        assert norms and all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    assert report.scores["slicegpt"]["hidden_after"] == report.scores["slicegpt"]["hidden_before"]


@pytest.mark.parametrize("model_type", [a for a in ROTATABLE if a not in ATTN_IS_HIDDEN])
def test_sliced_model_reloads_with_from_pretrained(model_type, tmp_path):
    model = _model(model_type)
    report = pare.prune(model, SliceGPTConfig(slicing=0.25), CALIB, runtime=RT)
    assert report.uniform and [e.to_dict() for e in report.edits] == [{"op": "hidden", "width": 48}]
    assert model.config.hidden_size == 48
    assert model.get_input_embeddings().weight.shape[1] == 48
    before = _logits(model)
    assert torch.isfinite(before).all()
    pare.save(model, None, tmp_path / "m", report=report)
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert fresh.config.hidden_size == 48 and fresh.config.head_dim == 16  # head_dim kept explicit
    assert torch.allclose(_logits(fresh), before, atol=1e-5)


def test_tied_head_stays_tied_when_final_norm_is_uniform(tmp_path):
    model = tiny_model("llama", tie_word_embeddings=True)  # norms are ones
    report = pare.prune(model, SliceGPTConfig(slicing=0.25), CALIB, runtime=RT)
    assert report.scores["slicegpt"]["head_tied"]
    assert model.lm_head.weight is model.get_input_embeddings().weight
    pare.save(model, None, tmp_path / "m", report=report)
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert fresh.config.tie_word_embeddings
    assert torch.allclose(_logits(fresh), _logits(model), atol=1e-5)


def test_tied_head_is_untied_when_final_norm_weights_differ():
    model = _model("llama", tie_word_embeddings=True)
    before = _logits(model)
    report = pare.prune(model, SliceGPTConfig(slicing=0.0), CALIB, runtime=RT)
    assert not report.scores["slicegpt"]["head_tied"]
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    assert not model.config.tie_word_embeddings
    assert torch.allclose(_logits(model), before, atol=1e-4)


def test_slicing_keeps_most_of_a_low_rank_stream():
    """A stream that lives in a 16-dim subspace: rotation then slicing to 48 loses nothing."""
    model = tiny_model("llama")
    basis = torch.linalg.qr(torch.randn(64, 16, generator=torch.Generator().manual_seed(0)))[0]
    proj = basis @ basis.T  # every writer writes inside span(basis)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight @ proj)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.copy_(proj @ layer.self_attn.o_proj.weight)
            layer.mlp.down_proj.weight.copy_(proj @ layer.mlp.down_proj.weight)
    before = _logits(model)
    pare.prune(model, SliceGPTConfig(slicing=0.25), CALIB, runtime=RT)
    # the norms now divide by sqrt(48) instead of sqrt(64): readers carry sqrt(64/48); eps differs a little
    assert torch.allclose(_logits(model), before, atol=1e-3)


def test_per_layer_keeps_what_each_layer_writes():
    """Each layer writes into directions its input does not have (the stream grows from 16 to 32
    dimensions): the per-layer bases follow each layer's output, so slicing to 48 loses nothing."""
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    full = torch.linalg.qr(torch.randn(64, 64, generator=g))[0]
    n = len(model.model.layers)
    with torch.no_grad():
        base = full[:, :16]
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight @ base @ base.T)
        for i, layer in enumerate(model.model.layers):
            span = torch.cat([full[:, :16], full[:, 16 + 16 * i // n: 16 + 16 * (i + 1) // n]], dim=1)
            # this layer writes inside the embeddings' directions plus new ones, strongly enough to matter
            proj = 10 * span @ span.T
            layer.self_attn.o_proj.weight.copy_(proj @ layer.self_attn.o_proj.weight)
            layer.mlp.down_proj.weight.copy_(proj @ layer.mlp.down_proj.weight)
    before = _logits(model)
    shared = _model_copy(model)
    pare.prune(model, SliceGPTConfig(slicing=0.25, rotation="per-layer"), CALIB, runtime=RT)
    assert torch.allclose(_logits(model), before, atol=1e-3)
    pare.prune(shared, SliceGPTConfig(slicing=0.25), CALIB, runtime=RT)  # 32 directions also fit one basis
    assert torch.allclose(_logits(shared), before, atol=1e-3)


def _model_copy(model):
    import copy

    return copy.deepcopy(model)


MOE = ("mixtral", "qwen2_moe", "qwen3_moe")


@pytest.mark.parametrize("slice_head", [True, False])
@pytest.mark.parametrize("model_type", [a for a in ROTATABLE if a not in ATTN_IS_HIDDEN])
def test_per_layer_rotation_saves_and_reloads_with_pare_load(model_type, slice_head, tmp_path):
    model = _model(model_type)
    cfg = SliceGPTConfig(slicing=0.25, rotation="per-layer", slice_head=slice_head)
    if not slice_head and model_type in MOE:
        with pytest.raises(ConfigError, match="slice_head"):
            check(model, cfg)
        return
    report = pare.prune(model, cfg, CALIB, runtime=RT)
    assert not report.uniform
    shortcuts = report.edits[-1]
    assert shortcuts.op == "residual_shortcuts" and shortcuts.width == model.config.hidden_size == 48
    assert shortcuts.layers == tuple(range(model.config.num_hidden_layers))  # every residual addition
    assert shortcuts.head_width == (None if slice_head else 64)
    assert model.get_output_embeddings().weight.shape[1] == (48 if slice_head else 64)
    before = _logits(model)
    assert torch.isfinite(before).all()
    pare.save(model, None, tmp_path / "m", report=report)
    loaded = pare.load(tmp_path / "m")
    assert torch.equal(_logits(loaded), before)
    out = loaded.generate(IDS[:1, :6], max_new_tokens=4, do_sample=False, use_cache=True)
    assert torch.equal(out, loaded.generate(IDS[:1, :6], max_new_tokens=4, do_sample=False, use_cache=False))


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_sandwich_norms_refused_before_any_work(model_type):
    with pytest.raises(ConfigError, match=r"post-norm|sandwich"):
        check(tiny_model(model_type), SliceGPTConfig(slicing=0.0))


@pytest.mark.parametrize("model_type", ATTN_IS_HIDDEN)
def test_attention_width_from_hidden_refuses_slicing(model_type):
    check(tiny_model(model_type), SliceGPTConfig(slicing=0.0))  # a pure rotation is fine
    with pytest.raises(ConfigError, match="head_dim"):
        check(tiny_model(model_type), SliceGPTConfig(slicing=0.25))


def test_post_norm_opt_refused():
    with pytest.raises(ConfigError, match="post-norm"):
        check(tiny_model("opt", do_layer_norm_before=False), SliceGPTConfig(slicing=0.0))


def test_hidden_rounded_to_what_the_config_accepts():
    model = tiny_model("llama")
    # 0.3 of 64 -> 44 -> multiple of 8: 40; Llama needs hidden % heads (4) == 0: 40 works
    report = pare.prune(model, SliceGPTConfig(slicing=0.3), CALIB, runtime=RT)
    assert report.scores["slicegpt"]["hidden_after"] == 40
    # 0.2 of 48 -> 38 (a multiple of 2), which 3 heads do not divide: 36
    model = tiny_model("llama", hidden_size=48, num_attention_heads=3, num_key_value_heads=1, head_dim=16)
    report = pare.prune(model, SliceGPTConfig(slicing=0.2, round_to=2), CALIB, runtime=RT)
    assert report.scores["slicegpt"]["hidden_after"] == 36


@pytest.mark.parametrize("bad", [dict(slicing=1.0), dict(slicing=-0.1), dict(rotation="both"), dict(round_to=0),
                                 dict(damp=2.0)])
def test_config_validation(bad):
    with pytest.raises(ConfigError):
        SliceGPTConfig(**bad)


@pytest.mark.parametrize(("kind", "why"), [("gptj", "bias"), ("bloom", "embeddings"), ("falcon", "output")])
def test_families_outside_the_table_refused_with_reason(kind, why):
    from transformers import BloomConfig, FalconConfig, GPTJConfig

    torch.manual_seed(0)
    cfg = {
        "gptj": GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128, vocab_size=256),
        "bloom": BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=256),
        "falcon": FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
                               new_decoder_architecture=False, multi_query=True),
    }[kind]
    model = AutoModelForCausalLM.from_config(cfg).eval()
    if kind == "gptj":  # parallel blocks sharing one LayerNorm: fine while its bias is zero
        check(model, SliceGPTConfig(slicing=0.0))
        with torch.no_grad():
            model.transformer.h[0].ln_1.bias.fill_(0.1)  # q/k/v have no bias to take it
    with pytest.raises(ConfigError, match=why):
        check(model, SliceGPTConfig(slicing=0.0))
