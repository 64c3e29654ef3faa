"""DeepSeek-V2 / V3: multi-head latent attention (MLA) described and cut by heads, DeepSeek MoE (shared
experts, group-limited routing, a dense prefix of layers) pruned, saved and reloaded identically."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import pare
from pare.arch import describe
from pare.arch.surgery.depth import remove_layers
from pare.arch.surgery.experts import grouped_count_problem, remove_experts
from pare.arch.surgery.mla import prune_mla_heads
from pare.arch.surgery.width import prune_mlp_channels, sync_config
from pare.errors import ConfigError
from pare.io import read_manifest
from pare.report import Report
from tiny import tiny_batch, tiny_model

MLA = ("deepseek_v2", "deepseek_v3")
RT = pare.RuntimeConfig(device="cpu", progress=False)


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", MLA)
def test_mla_is_described_with_what_a_head_is(arch: str) -> None:
    model = tiny_model(arch)
    a = describe(model)
    for r in a.layers:
        assert r.attention is None and r.mixer is None and r.mla is not None
        assert (r.mla.num_heads, r.mla.nope_dim, r.mla.rope_dim, r.mla.v_dim, r.mla.kv_rank) == (4, 8, 8, 16, 16)
        assert not set(r.mla.norms) & set(r.norms)  # the latent norms are not on the residual stream
        assert a.part_of(f"{a.layer_prefix(r.index)}.{r.mla.kv_b.path}.weight") == "attention"
    q_lora = arch == "deepseek_v3"
    assert (a.layers[0].mla.q_a is not None) == q_lora and (a.layers[0].mla.q is None) == q_lora
    assert a.layers[0].mlp is not None and a.layers[1].experts is not None  # first_k_dense_replace=1
    assert a.layers[1].experts.shared is not None and a.layers[1].experts.shared.path == "mlp.shared_experts"
    assert (a.fields.moe_intermediate, a.fields.num_experts, a.fields.shared_count) == (
        "moe_intermediate_size", "n_routed_experts", "n_shared_experts")
    text = a.latent_attention()
    assert "kv_lora_rank=16" in text and "RoPE key" in text and "not cut" in text.lower()


@pytest.mark.parametrize("arch", MLA)
def test_mla_head_cut_equals_a_model_built_with_fewer_heads(arch: str, tmp_path) -> None:
    model, ids = tiny_model(arch), tiny_batch(2, 16)
    a = describe(model)
    for i in range(a.num_layers):
        prune_mla_heads(model, a, i, [3, 0])  # any order: rows, kv_b rows and o columns move together
    assert sync_config(model, describe(model))
    assert model.config.num_attention_heads == model.config.num_key_value_heads == 2
    fresh = AutoModelForCausalLM.from_config(copy.deepcopy(model.config)).eval()
    fresh.load_state_dict(model.state_dict())
    want = _logits(model, ids)
    assert torch.equal(_logits(fresh, ids), want)
    model.save_pretrained(tmp_path)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), ids), want)


@pytest.mark.parametrize("arch", MLA)
def test_removing_a_silent_head_changes_nothing(arch: str) -> None:
    """A head whose o_proj columns are zero contributes nothing: cutting it (and only its rows) must
    leave the logits as they were, which fails if any projection's rows are taken from another head."""
    model, ids = tiny_model(arch), tiny_batch(2, 16)
    a = describe(model)
    mla = a.layers[0].mla
    o = a.layer_modules(model)[0].get_submodule(mla.o.path)
    with torch.no_grad():
        o.weight[:, mla.v_dim:2 * mla.v_dim] = 0  # head 1
    want = _logits(model, ids)
    prune_mla_heads(model, a, 0, [0, 2, 3])
    torch.testing.assert_close(_logits(model, ids), want, rtol=1e-5, atol=1e-6)


def test_head_counts_the_config_refuses_are_replayed_by_pare_load(tmp_path) -> None:
    """DeepSeek-V2's config wants hidden % heads == 0: 3 heads of a 64-wide model are saved with the
    old count and the recorded cuts, and ``pare.load`` rebuilds them."""
    model, ids = tiny_model("deepseek_v2"), tiny_batch(4, 16)
    report = pare.prune(model, pare.OsscarConfig(attn_ratio=0.25, mlp_ratio=0.0), ids, runtime=RT, batch_size=2)
    assert not report.uniform and model.config.num_attention_heads == 4
    assert {describe(model).layers[i].mla.num_heads for i in range(3)} == {3}
    pare.save(model, None, tmp_path / "o", report)
    assert read_manifest(tmp_path / "o")["uniform"] is False
    assert torch.equal(_logits(pare.load(tmp_path / "o"), ids), _logits(model, ids))


@pytest.mark.parametrize("arch", MLA)
def test_width_cuts_heads_hidden_and_experts(arch: str, tmp_path) -> None:
    model, ids = tiny_model(arch), tiny_batch(4, 16)
    report = pare.prune(model, pare.WidthConfig(pruning_ratio=0.5, importance="activation"), ids, runtime=RT,
                        batch_size=2)
    cfg = model.config
    got = (cfg.num_attention_heads, cfg.hidden_size, cfg.intermediate_size, cfg.moe_intermediate_size)
    assert got == (2, 32, 48, 16)
    assert report.uniform
    pare.save(model, None, tmp_path / "o", report)
    want = _logits(model, ids)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "o").eval(), ids), want)


def test_shared_expert_width_the_config_cannot_state_is_replayed(tmp_path) -> None:
    """The shared expert is ``moe_intermediate_size * n_shared_experts`` wide: cut to another width,
    the config keeps the old expert width and ``pare.load`` cuts both from it."""
    model, ids = tiny_model("deepseek_v3"), tiny_batch(2, 16)
    a = describe(model)
    report = Report(method="test", config={})
    for i in (1, 2):
        report.edits.append(prune_mlp_channels(model, a, i, torch.arange(24), shared_keep=torch.arange(16)))
    report.uniform = sync_config(model, describe(model))
    assert not report.uniform and model.config.moe_intermediate_size == 32
    pare.save(model, None, tmp_path / "o", report)
    assert torch.equal(_logits(pare.load(tmp_path / "o"), ids), _logits(model, ids))


def test_group_limited_router_loses_experts_evenly() -> None:
    model = tiny_model("deepseek_v3")  # 8 experts in n_group=2 groups of 4, topk_group=1, top_k=2
    a = describe(model)
    router = a.layer_modules(model)[1].get_submodule(a.layers[1].experts.router)
    assert grouped_count_problem(router, 8, 6, 2) is None
    why = grouped_count_problem(router, 8, 5, 2)
    assert "[4, 6, 8]" in why
    with pytest.raises(ConfigError, match="not 3 of each"):
        remove_experts(model, a, 1, [0, 1, 2, 3, 4, 5])
    with pytest.raises(ConfigError, match="counts that work"):
        pare.prune(model, pare.ExpertsConfig(num_experts=5), tiny_batch(2, 16), runtime=RT, batch_size=2)
    with pytest.raises(ConfigError, match="uniform"):
        pare.prune(model, pare.ExpertsConfig(num_experts=6, allocation="global"), tiny_batch(2, 16), runtime=RT,
                   batch_size=2)


def test_removing_experts_the_router_never_selects_keeps_logits(tmp_path) -> None:
    """Experts 1 and 6 (one per group) get a correction bias that keeps them out of every top-2 and
    out of every group's score: removing them changes no token's routing."""
    model, ids = tiny_model("deepseek_v3"), tiny_batch(2, 16)
    a = describe(model)
    for i in (1, 2):
        router = a.layer_modules(model)[i].get_submodule(a.layers[i].experts.router)
        router.e_score_correction_bias[[1, 6]] = -100.0
    want = _logits(model, ids)
    report = Report(method="experts", config={})
    for i in (1, 2):
        report.edits.append(remove_experts(model, a, i, [0, 2, 3, 4, 5, 7]))
    torch.testing.assert_close(_logits(model, ids), want, rtol=1e-5, atol=1e-6)
    from pare.arch.surgery.experts import sync_expert_config

    report.uniform = sync_expert_config(model, describe(model), None)
    assert report.uniform and model.config.n_routed_experts == 6 and model.config.n_group == 2
    pare.save(model, None, tmp_path / "o", report)
    got = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "o").eval(), ids)
    assert torch.equal(got, _logits(model, ids))


def test_expert_pruning_keeps_each_group_balanced(tmp_path) -> None:
    model, ids = tiny_model("deepseek_v3"), tiny_batch(4, 16)
    report = pare.prune(model, pare.ExpertsConfig(expert_ratio=0.5), ids, runtime=RT, batch_size=2)
    for row in report.scores["experts"]:
        kept = torch.tensor(row["kept"])
        assert torch.bincount(kept // 4, minlength=2).tolist() == [2, 2]
    assert model.config.n_routed_experts == 4 and report.uniform
    pare.save(model, None, tmp_path / "o", report)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "o").eval(), ids), _logits(model, ids))


@pytest.mark.parametrize("arch", MLA)
def test_removing_a_dense_prefix_layer_moves_first_k_dense_replace(arch: str, tmp_path) -> None:
    model, ids = tiny_model(arch), tiny_batch(2, 16)
    edit = remove_layers(model, describe(model), [0])
    assert model.config.first_k_dense_replace == 0 and edit.config["first_k_dense_replace"] == 0
    want = _logits(model, ids)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(again, ids), want)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(again.generate(ids[:1, :8], use_cache=True, **kw),
                           again.generate(ids[:1, :8], use_cache=False, **kw))


@pytest.mark.parametrize("arch", MLA)
def test_slicegpt_rotates_latent_attention_readers_and_writer(arch: str, tmp_path) -> None:
    """q (or q_a) and kv_a read the stream through input_layernorm and o writes it; the latent norms
    are inside the block. Rotation without slicing keeps the logits; slicing reloads with from_pretrained."""
    model, ids = tiny_model(arch), tiny_batch(2, 32, seed=2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:  # norm weights that are not ones: the fusion is not a no-op
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    before = _logits(model, ids)
    calib = tiny_batch(4, 32, seed=1)
    pare.prune(model, pare.SliceGPTConfig(slicing=0.0), calib, runtime=RT)
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-4, rtol=0)
    report = pare.prune(model, pare.SliceGPTConfig(slicing=0.25), calib, runtime=RT)
    assert report.uniform and model.config.hidden_size == 48
    pare.save(model, None, tmp_path / "o", report)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "o").eval(), ids), _logits(model, ids))


def test_inspect_states_what_a_head_is_and_what_is_not_cut(tmp_path, capsys) -> None:
    import json

    from pare.cli import main

    tiny_model("deepseek_v3").save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "attention (latent)" in text and "kv_lora_rank=16, q_lora_rank=32" in text
    assert "shared mlp.shared_experts" in text
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "RoPE key" in data["latent_attention"] and data["layers"][1]["heads"] == 4


def test_latent_attention_is_not_removed_as_a_sublayer() -> None:
    from pare.arch.surgery.depth import remove_sublayer

    model = tiny_model("deepseek_v2")
    with pytest.raises(ConfigError, match="latent attention"):
        remove_sublayer(model, describe(model), 0, "attention")
