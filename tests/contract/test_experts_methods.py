"""Expert pruning on every MoE family: invariance, clear refusals, save -> load, generation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import pare
from pare.arch import describe
from pare.arch.surgery.experts import remove_experts, sync_expert_config
from pare.calibration.stats import RoutingStats, record_routing
from pare.config import RuntimeConfig
from pare.errors import ConfigError
from pare.methods.experts import ExpertsConfig
from pare.report import Report
from tiny import TINY_SPECS, VOCAB, tiny_batch, tiny_model

E = 8
CALIB = tiny_batch(8, 32, seed=1)
IDS = tiny_batch(2, 16, seed=2)
QUIET = RuntimeConfig(progress=False)
EXTRA_SPECS = {  # MoE families the description knows beyond the contract suite's
    "olmoe": dict(hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, num_experts_per_tok=2,
                  pad_token_id=0, bos_token_id=0, eos_token_id=0),
    "gpt_oss": dict(hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=256,
                    num_experts_per_tok=2, sliding_window=8, pad_token_id=0, bos_token_id=0, eos_token_id=0),
}
COUNT_FIELD = {"mixtral": "num_local_experts", "gpt_oss": "num_local_experts"}
MOE_ARCHS = [t for t, spec in TINY_SPECS.items() if "num_experts_per_tok" in spec] + list(EXTRA_SPECS)


def moe_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A random MoE model with 8 routed experts per layer, top-2."""
    count = {COUNT_FIELD.get(model_type, "num_experts"): E}
    if model_type in TINY_SPECS:
        return tiny_model(model_type, seed=seed, **count)
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**EXTRA_SPECS[model_type], **count})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "norm" not in name:
                p.normal_(0.0, 0.08)
    return model.eval()


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _never_route_to(model, expert: int) -> None:
    """Make layer 0's router never select ``expert``: a constant hidden channel (an embedding column of
    ones that attention does not write to) and a very negative router weight on it."""
    arch = describe(model)
    layer = arch.layer_modules(model)[0]
    roles = arch.layers[0]
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 1.0
        layer.get_submodule(roles.attention.o.path).weight[0, :] = 0.0
        router = layer.get_submodule(roles.experts.router).weight
        router[expert] = 0.0
        router[expert, 0] = -1e3


@pytest.mark.parametrize("model_type", MOE_ARCHS)
def test_removing_a_never_selected_expert_keeps_logits(model_type):
    model = moe_model(model_type)
    _never_route_to(model, 5)
    before = _logits(model)
    arch = describe(model)
    st = RoutingStats(E)
    experts = arch.layer_modules(model)[0].get_submodule(arch.layers[0].experts.path)
    with record_routing(experts, st):
        _logits(model)
    assert not experts._forward_pre_hooks and not experts._forward_hooks  # the hook is gone
    assert st.sums["count"][5] == 0 and st.sums["count"].sum() == IDS.numel() * 2
    edit = remove_experts(model, arch, 0, [e for e in range(E) if e != 5])
    assert edit.to_dict() == {"op": "experts", "layer": 0, "num_experts": E - 1, "top_k": None}
    torch.testing.assert_close(_logits(model), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("importance", ["reap", "frequency", "gate", "reconstruction"])
def test_every_importance_removes_the_never_selected_expert(importance):
    model = moe_model("qwen3_moe")
    _never_route_to(model, 3)
    report = pare.prune(model, ExpertsConfig(num_experts=E - 1, importance=importance), CALIB, runtime=QUIET)
    row = report.scores["experts"][0]
    assert row["scores"][3] == 0.0 and 3 not in row["kept"] and len(row["kept"]) == E - 1


@pytest.mark.parametrize("model_type", MOE_ARCHS)
@pytest.mark.parametrize("merge", [False, True])
def test_prune_save_reload_and_generate(model_type, merge, tmp_path):
    model = moe_model(model_type)
    report = pare.prune(model, ExpertsConfig(expert_ratio=0.5, merge=merge), CALIB, runtime=QUIET)
    arch = describe(model)
    assert report.uniform and [r.experts.num_experts for r in arch.layers if r.experts] == [4] * 3
    field = COUNT_FIELD.get(model_type, "num_experts")
    assert getattr(model.config, field) == 4
    assert all(len(e["kept"]) == 4 for e in report.scores["experts"])
    before = _logits(model)
    pare.save(model, None, tmp_path / "m", report)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(_logits(plain), before, atol=1e-5, rtol=1e-5)
    loaded = pare.load(tmp_path / "m")
    torch.testing.assert_close(_logits(loaded), before, atol=1e-5, rtol=1e-5)
    out = loaded.generate(IDS[:1, :6], max_new_tokens=6, do_sample=False, use_cache=True)
    no_cache = loaded.generate(IDS[:1, :6], max_new_tokens=6, do_sample=False, use_cache=False)
    assert out.shape == (1, 12) and torch.equal(out, no_cache)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_per_layer_counts_reload_through_the_manifest(model_type, tmp_path):
    model = moe_model(model_type)
    arch = describe(model)
    report = Report(method="experts", config={})
    for i, k in enumerate((6, 3, 8)):
        report.edits.append(remove_experts(model, arch, i, list(range(E - k, E))))
    report.uniform = sync_expert_config(model, describe(model), None)
    assert not report.uniform
    before = _logits(model)
    pare.save(model, None, tmp_path / "m", report)
    loaded = pare.load(tmp_path / "m")
    assert [r.experts.num_experts for r in describe(loaded).layers] == [6, 3, 8]
    torch.testing.assert_close(_logits(loaded), before, atol=1e-5, rtol=1e-5)
    assert loaded.generate(IDS[:1, :4], max_new_tokens=4, do_sample=False).shape == (1, 8)


def test_global_allocation_keeps_the_total_and_reloads(tmp_path):
    model = moe_model("qwen3_moe")
    _never_route_to(model, 2)
    report = pare.prune(model, ExpertsConfig(num_experts=5, allocation="global"), CALIB, runtime=QUIET)
    counts = [r.experts.num_experts for r in describe(model).layers]
    assert sum(counts) == 15 and min(counts) >= 2
    assert 2 not in report.scores["experts"][0]["kept"]
    before = _logits(model)
    pare.save(model, None, tmp_path / "m", report)
    torch.testing.assert_close(_logits(pare.load(tmp_path / "m")), before, atol=1e-5, rtol=1e-5)


def test_keeping_fewer_experts_than_top_k_is_a_clear_error():
    model = moe_model("mixtral")
    with pytest.raises(ConfigError, match=r"fewer than the 2 each token selects.*top_k \(--top-k"):
        pare.prune(model, ExpertsConfig(num_experts=1), CALIB, runtime=QUIET)
    with pytest.raises(ConfigError, match="top_k=3 is more than the 2 experts kept"):
        pare.prune(model, ExpertsConfig(num_experts=2, top_k=3), CALIB, runtime=QUIET)


def test_top_k_option_lets_one_expert_remain(tmp_path):
    model = moe_model("mixtral")
    report = pare.prune(model, ExpertsConfig(num_experts=1, top_k=1), CALIB, runtime=QUIET)
    assert model.config.num_local_experts == 1 and model.config.num_experts_per_tok == 1
    before = _logits(model)
    pare.save(model, None, tmp_path / "m", report)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m")), before)


def test_shared_expert_is_never_removed():
    model = moe_model("qwen2_moe")
    shared = {n: p.clone() for n, p in model.named_parameters() if "shared_expert" in n}
    pare.prune(model, ExpertsConfig(num_experts=2, merge=True), CALIB, runtime=QUIET)
    after = dict(model.named_parameters())
    assert shared and all(torch.equal(after[n], p) for n, p in shared.items())


def test_merge_averages_removed_experts_into_kept_ones():
    model = moe_model("qwen3_moe")
    arch = describe(model)
    experts = arch.layer_modules(model)[0].get_submodule(arch.layers[0].experts.path)
    before = experts.gate_up_proj.detach().clone()
    report = pare.prune(model, ExpertsConfig(num_experts=4, merge=True), CALIB, runtime=QUIET)
    row = report.scores["experts"][0]
    freq = torch.tensor(row["frequency"], dtype=torch.float64)
    for pos, kept in enumerate(row["kept"]):
        members = [kept, *row.get("merged", {}).get(str(kept), [])]
        w = freq[members] / freq[members].sum()
        expected = (before[members].double() * w[:, None, None]).sum(0).float()
        torch.testing.assert_close(experts.gate_up_proj[pos], expected)
    assert sum(len(v) for v in row["merged"].values()) == E - 4


def test_config_refuses_what_cannot_work():
    assert ExpertsConfig().expert_ratio == 0.25 and ExpertsConfig(num_experts=6).expert_ratio == 0.0
    assert ExpertsConfig.from_dict(ExpertsConfig(num_experts=6).to_dict()).num_experts == 6
    with pytest.raises(ConfigError, match="not both"):
        ExpertsConfig(num_experts=2, expert_ratio=0.5)
    with pytest.raises(ConfigError, match="removes nothing"):
        ExpertsConfig(expert_ratio=0.0)
    with pytest.raises(ConfigError, match="importance must be one of"):
        ExpertsConfig(num_experts=2, importance="taylor")
    with pytest.raises(ConfigError, match="no routed experts"):
        pare.prune(tiny_model("llama"), ExpertsConfig(num_experts=2), CALIB, runtime=QUIET)


@pytest.mark.parametrize("model_type", MOE_ARCHS)
def test_one_expert_pass_gives_the_same_statistics_and_outputs(model_type):
    """Dense mode records routing and keeps the layer's outputs in one expert pass: the statistics and
    the outputs equal those of a pre-hook plus the experts' own forward, and the experts module runs
    once, on one row per routed (token, expert) pair; its hooks are gone afterwards."""
    from pare.calibration.stats import record_routing_once

    model = moe_model(model_type)
    arch = describe(model)
    i = next(r.index for r in arch.layers if r.experts)
    layer, ex = arch.layer_modules(model)[i], arch.layers[i].experts
    experts = layer.get_submodule(ex.path)
    hidden = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).unsqueeze(0).expand(2, -1)
    emb = model.model.rotary_emb(hidden, pos) if hasattr(model.model, "rotary_emb") else None
    kwargs = {"position_embeddings": emb, "attention_mask": None}
    calls = []
    handle = experts.register_forward_hook(lambda _m, _a, out: calls.append(out.shape[0]))  # rows computed
    try:
        two, one = RoutingStats(E), RoutingStats(E)
        with torch.no_grad(), record_routing(experts, two):
            ref = layer(hidden, **kwargs)
        assert len(calls) == 1
        with torch.no_grad(), record_routing_once(experts, one):
            got = layer(hidden, **kwargs)
        assert len(calls) == 2 and calls[1] == int(one.sums["count"].sum()) != calls[0]
        assert not experts._forward_pre_hooks and len(experts._forward_hooks) == 1  # only the test's own
    finally:
        handle.remove()
    ref, got = (x[0] if isinstance(x, tuple) else x for x in (ref, got))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert one.tokens == two.tokens
    for key, value in two.sums.items():
        torch.testing.assert_close(one.sums[key], value)


def test_dense_mode_one_pass_chooses_as_sequential_scoring_of_the_dense_model():
    """RuntimeConfig(sequential=False) (dense activations, one expert pass) removes the experts that
    scoring every layer on the dense model's own activations (allocation=global's pass) ranks lowest."""
    model = moe_model("qwen3_moe")
    dense = pare.prune(moe_model("qwen3_moe"), ExpertsConfig(num_experts=5),
                       CALIB, runtime=RuntimeConfig(progress=False, sequential=False))
    ranked = pare.prune(model, ExpertsConfig(num_experts=5, allocation="global"), CALIB, runtime=QUIET)
    for row_dense, row_ranked in zip(dense.scores["experts"], ranked.scores["experts"], strict=True):
        torch.testing.assert_close(torch.tensor(row_dense["scores"]), torch.tensor(row_ranked["scores"]))


def _replayed_and_full(model_type, monkeypatch, prepare=lambda model: model):
    """Sequential removal (keep 5 of 8) as pare runs it and with a full forward of every pruned layer
    (no block replay), on two copies of one model (``prepare`` applied to each): their report rows,
    after checking that both keep the same experts, and the two pruned models."""
    from pare.methods.experts import ExpertsPruner

    replayed, reference = prepare(moe_model(model_type)), prepare(moe_model(model_type))
    got = pare.prune(replayed, ExpertsConfig(num_experts=5), CALIB, runtime=QUIET).scores["experts"]
    with monkeypatch.context() as m:
        m.setattr(ExpertsPruner, "_replayable", lambda *_: False)
        want = pare.prune(reference, ExpertsConfig(num_experts=5), CALIB, runtime=QUIET).scores["experts"]
    assert [r["kept"] for r in got] == [r["kept"] for r in want]
    return got, want, replayed, reference


def _assert_scores_close(got, want):
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(torch.tensor(a["scores"]), torch.tensor(b["scores"]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("model_type", MOE_ARCHS)
def test_sequential_replay_matches_full_forwards(model_type, monkeypatch):
    """Sequential removal runs each layer once and updates its outputs from the MoE block alone (only
    tokens whose routing changed run their experts again): the scores, the experts kept and the pruned
    model equal those of a full forward of every pruned layer."""
    got, want, replayed, reference = _replayed_and_full(model_type, monkeypatch)
    _assert_scores_close(got, want)
    rerouted = [r["rerouted_tokens"] for r in got[:-1]]  # the last layer's outputs are not needed
    assert all(0 < n <= CALIB.numel() for n in rerouted) and "rerouted_tokens" not in got[-1]
    torch.testing.assert_close(_logits(replayed), _logits(reference), rtol=1e-5, atol=1e-5)


def test_a_layer_that_does_not_add_its_block_output_gets_full_forwards(monkeypatch):
    """A layer whose output is not residual + block output (here: a hook doubles it) fails the check
    against a full forward, and its outputs are recomputed in full, as without the replay."""

    def doubled(model):
        for layer in describe(model).layer_modules(model):
            layer.register_forward_hook(lambda _m, _a, out: (out[0] * 2, *out[1:]) if isinstance(out, tuple)
                                        else out * 2)
        return model

    got, want, *_ = _replayed_and_full("qwen3_moe", monkeypatch, doubled)
    _assert_scores_close(got[1:], want[1:])  # from layer 1 on, the inputs depend on the fallback


def test_a_block_that_calls_its_experts_twice_gets_full_forwards(monkeypatch):
    """A MoE block whose forward calls its experts module more than once cannot be replayed from one
    recorded call: pruning falls back to a full forward of each pruned layer and matches that path."""

    def twice(model):
        for layer in describe(model).layer_modules(model):
            def again(block, args, _out):
                hidden = args[0].reshape(-1, args[0].shape[-1])
                _logits, weights, index = block.gate(hidden)
                block.experts(hidden, index, weights)  # a second call; its result is not used
            layer.mlp.register_forward_hook(again)
        return model

    got, want, *_ = _replayed_and_full("qwen3_moe", monkeypatch, twice)
    assert all("rerouted_tokens" not in r for r in got)
    _assert_scores_close(got, want)
