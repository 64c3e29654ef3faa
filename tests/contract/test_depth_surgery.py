"""Depth surgery on every tiny architecture: exact invariants of layer and sub-layer removal."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import pare
from pare.arch import describe
from pare.arch.roles import get_weight
from pare.arch.surgery.depth import layers_removed, remove_layers, remove_sublayer
from pare.errors import ConfigError
from pare.report import Report
from tiny import TINY_ARCHS, VOCAB, tiny_batch, tiny_model


def zero_residual(model, index: int, parts=("attention", "mlp")) -> None:
    """Zero the output projections (weights and biases) of a layer's attention and/or MLP/experts."""
    arch = describe(model)
    layer, roles = arch.layer_modules(model)[index], arch.layers[index]
    outs = []
    if "attention" in parts:
        outs.append(roles.attention.o.path)
    if "mlp" in parts:
        if roles.mlp is not None:
            outs.append(roles.mlp.down.path)
        if roles.experts is not None:
            ex = layer.get_submodule(roles.experts.path)
            getattr(ex, roles.experts.down_param).data.zero_()
            for name, p in ex.named_parameters():
                if "bias" in name:
                    p.data.zero_()
            if roles.experts.shared is not None:
                outs.append(roles.experts.shared.down.path)
    with torch.no_grad():
        for path in outs:
            mod = layer.get_submodule(path)
            mod.weight.data.zero_()
            if getattr(mod, "bias", None) is not None:
                mod.bias.data.zero_()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def greedy_no_cache(model, ids, steps: int):
    out = ids
    for _ in range(steps):
        nxt = logits(model, out)[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], dim=1)
    return out


def check_generate(model, ids):
    model.generation_config.eos_token_id = None  # random weights: never stop early
    with torch.no_grad():
        got = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0,
        )
    assert got.shape[1] == ids.shape[1] + 5
    assert torch.equal(got, greedy_no_cache(model, ids, 5))


@pytest.mark.parametrize("arch_name", TINY_ARCHS)
def test_remove_zeroed_layer_keeps_logits_and_generates(arch_name, tmp_path):
    model = tiny_model(arch_name, num_hidden_layers=4)
    zero_residual(model, 1)
    ids = tiny_batch(2, 12)
    before = logits(model, ids)
    edit = remove_layers(model, describe(model), [1])
    assert edit.kept == (0, 2, 3) and model.config.num_hidden_layers == 3
    assert len(describe(model).layers) == 3
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)
    check_generate(model, tiny_batch(1, 10, seed=3))
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.num_hidden_layers == 3
    assert torch.equal(logits(again, ids), logits(model, ids))
    check_generate(again, tiny_batch(1, 10, seed=3))


@pytest.mark.parametrize("arch_name", TINY_ARCHS)
def test_remove_sublayer_keep_logits_generate_and_reload(arch_name, tmp_path):
    model = tiny_model(arch_name, num_hidden_layers=3)
    zero_residual(model, 0, ("attention",))
    zero_residual(model, 1, ("mlp",))
    ids = tiny_batch(2, 12)
    before = logits(model, ids)
    report = Report(method="test", config={}, uniform=False)
    report.edits.append(remove_sublayer(model, describe(model), 0, "attention"))
    report.edits.append(remove_sublayer(model, describe(model), 1, "mlp"))
    arch = describe(model)  # the removed blocks have no roles any more
    assert arch.layers[0].attention is None and arch.layers[1].mlp is None and arch.layers[1].experts is None
    assert report.edits[0].params_removed > 0 and report.edits[1].params_removed > 0
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)
    check_generate(model, tiny_batch(1, 10, seed=3))  # attention of layer 0 (the cache-length slot) is gone
    pare.save(model, None, tmp_path / "m", report)
    again = pare.load(tmp_path / "m")
    assert torch.equal(logits(again, ids), logits(model, ids))
    check_generate(again, tiny_batch(1, 10, seed=3))
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in model.parameters())


def test_sliding_layer_types_follow_their_layers(tmp_path):
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    model = tiny_model("gemma3_text", num_hidden_layers=4, layer_types=types, sliding_window=4)
    zero_residual(model, 0)
    ids = tiny_batch(1, 14)
    before = logits(model, ids)
    remove_layers(model, describe(model), [0])
    assert model.config.layer_types == types[1:]
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)
    check_generate(model, tiny_batch(1, 10, seed=1))  # generation runs past the sliding window
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.layer_types == types[1:]
    assert torch.equal(logits(again, ids), logits(model, ids))


def test_qwen2_moe_sparse_layers_stay_sparse(tmp_path):
    model = tiny_model("qwen2_moe", num_hidden_layers=4, decoder_sparse_step=2)
    kinds = [r.experts is not None for r in describe(model).layers]
    assert kinds == [False, True, False, True]
    ids = tiny_batch(1, 10)
    remove_layers(model, describe(model), [0])
    assert [r.experts is not None for r in describe(model).layers] == kinds[1:]
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert [r.experts is not None for r in describe(again).layers] == kinds[1:]
    assert torch.equal(logits(again, ids), logits(model, ids))


def test_layer_idx_renumbered_and_temporary_removal_restores():
    model = tiny_model("llama", num_hidden_layers=4)
    arch = describe(model)
    ids = tiny_batch(1, 8)
    before = logits(model, ids)
    with layers_removed(model, arch, [0, 2]):
        assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
        assert model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
    assert model.config.num_hidden_layers == 4
    assert torch.equal(logits(model, ids), before)


@pytest.mark.parametrize("bad", [[], [0, 1, 2], [3], [-1]])
def test_bad_layer_indices_raise_config_error(bad):
    model = tiny_model("llama")
    with pytest.raises(ConfigError):
        remove_layers(model, describe(model), bad)


def test_bad_sublayer_requests_raise_config_error():
    model = tiny_model("llama")
    arch = describe(model)
    with pytest.raises(ConfigError):
        remove_sublayer(model, arch, 3, "attention")
    with pytest.raises(ConfigError):
        remove_sublayer(model, arch, 0, "ffn")
    remove_sublayer(model, arch, 0, "mlp")
    assert get_weight is not None and VOCAB == 128


def test_gpt2_inverse_layer_scaling_survives_removal_and_reload(tmp_path):
    model = tiny_model("gpt2", n_layer=4, scale_attn_by_inverse_layer_idx=True)
    zero_residual(model, 1)
    ids = tiny_batch(2, 12)
    before = logits(model, ids)
    edit = remove_layers(model, describe(model), [1])
    assert edit.uniform is False  # the config cannot say "scale layer 1 as if it were layer 2"
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)
    report = Report(method="layers", config={}, edits=[edit], uniform=False)
    pare.save(model, None, tmp_path / "m", report)
    again = pare.load(tmp_path / "m")
    assert torch.equal(logits(again, ids), logits(model, ids))
