"""osscar / width methods x tiny architectures: forward, shapes, save -> load, from_pretrained."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

import pare
from pare import OsscarConfig, WidthConfig
from pare.arch import describe
from pare.config import RuntimeConfig
from pare.errors import ConfigError
from tiny import TINY_ARCHS, tiny_batch, tiny_model

RT = RuntimeConfig(device="cpu", progress=False)
CALIB = tiny_batch(4, 32, seed=1)
IDS = tiny_batch(2, 32, seed=2)
ATTN_IS_HIDDEN = ("gpt2", "opt", "gpt_neox")


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _round_trip(model, report, tmp_path, model_type):
    before = _logits(model)
    assert torch.isfinite(before).all()
    pare.save(model, None, tmp_path / "m", report=report)
    if report.uniform:
        fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
        assert torch.allclose(_logits(fresh), before, atol=1e-5)
    assert torch.allclose(_logits(pare.load(tmp_path / "m")), before, atol=1e-5)


@pytest.mark.parametrize("model_type", TINY_ARCHS)
def test_osscar_mlp_and_heads(model_type, tmp_path):
    model = tiny_model(model_type)
    report = pare.prune(model, OsscarConfig(mlp_ratio=0.5, attn_ratio=0.5, max_swaps=4), CALIB, runtime=RT)
    arch = describe(model)
    att = arch.layers[0].attention
    assert att.num_heads == 2 and att.num_heads % att.num_kv_heads == 0
    assert report.figures["params_after"] < report.figures["params_before"]
    errors = report.scores.get("mlp_error", {})
    for e in errors.values():  # refit never reconstructs worse than keeping the old weights
        assert e["refit"] <= e["no_refit"] + 1e-9
    assert report.uniform == (model_type not in ATTN_IS_HIDDEN)
    _round_trip(model, report, tmp_path, model_type)


@pytest.mark.parametrize("model_type", TINY_ARCHS)
def test_width_magnitude_prunes_all_widths(model_type, tmp_path):
    model = tiny_model(model_type)
    report = pare.prune(model, WidthConfig(pruning_ratio=0.5), CALIB, runtime=RT)
    assert model.get_input_embeddings().weight.shape[1] == 32
    assert report.uniform
    assert model.config.hidden_size == 32
    _round_trip(model, report, tmp_path, model_type)


@pytest.mark.parametrize("importance", ["activation", "taylor", "flap"])
@pytest.mark.parametrize("model_type", ["llama", "phi3", "gpt2", "qwen2_moe"])
def test_width_importances(model_type, importance, tmp_path):
    model = tiny_model(model_type)
    report = pare.prune(model, WidthConfig(pruning_ratio=0.5, importance=importance), CALIB, runtime=RT)
    assert report.scores["widths"]["hidden"] == 32
    _round_trip(model, report, tmp_path, model_type)


def test_flap_bias_compensation_sets_config_flags_and_reloads(tmp_path):
    model = tiny_model("llama")
    cfg = WidthConfig(pruning_ratio=0.5, importance="flap", hidden=False, head_mode="kv")
    report = pare.prune(model, cfg, CALIB, runtime=RT)
    assert model.config.mlp_bias and model.config.attention_bias
    assert model.model.layers[0].mlp.down_proj.bias.abs().sum() > 0
    _round_trip(model, report, tmp_path, "llama")


def test_flap_compensation_preserves_the_mean_mlp_output():
    """With the pruned channels replaced by their calibration mean, the first MLP's mean output over
    the calibration tokens equals the dense one (its inputs are unchanged); without it, it does not."""
    def mean_out(m):
        seen = []
        h = m.model.layers[0].mlp.register_forward_hook(lambda _m, _a, out: seen.append(out.reshape(-1, 64)))
        with torch.no_grad():
            m(CALIB)
        h.remove()
        return seen[0].mean(0)

    cfg = dict(pruning_ratio=0.5, importance="flap", hidden=False, heads=False)
    with_b, without = tiny_model("llama"), tiny_model("llama")
    dense = mean_out(tiny_model("llama"))
    pare.prune(with_b, WidthConfig(**cfg), CALIB, runtime=RT)
    pare.prune(without, WidthConfig(**cfg, bias_compensation=False), CALIB, runtime=RT)
    assert torch.allclose(mean_out(with_b), dense, atol=1e-5)
    assert not torch.allclose(mean_out(without), dense, atol=1e-4)


def test_flap_without_bias_flag_is_noted():
    model = tiny_model("mistral")
    report = pare.prune(model, WidthConfig(pruning_ratio=0.5, importance="flap", hidden=False), CALIB, runtime=RT)
    assert any("mistral has no mlp_bias" in n for n in report.notes)


def test_global_allocation_is_non_uniform_and_round_trips(tmp_path):
    model = tiny_model("llama")
    for i, layer in enumerate(model.model.layers):  # make layers differ in importance
        layer.mlp.down_proj.weight.data *= 0.2 + i
    cfg = WidthConfig(pruning_ratio=0.5, importance="magnitude", allocation="global", hidden=False, heads=False)
    report = pare.prune(model, cfg, CALIB, runtime=RT)
    widths = report.scores["widths"]["mlp"]
    assert len(set(widths.values())) > 1 and not report.uniform
    assert abs(sum(widths.values()) - 0.5 * 96 * 3) <= 3
    _round_trip(model, report, tmp_path, "llama")


def test_global_allocation_with_a_hidden_cut_where_the_mlp_width_is_derived(tmp_path):
    """GPT-2's n_inner=None means 4 x hidden: a hidden cut must not shrink the width replay starts from."""
    model = tiny_model("gpt2")
    assert model.config.n_inner is None
    report = pare.prune(model, WidthConfig(pruning_ratio=0.25, importance="activation", allocation="global"),
                        CALIB, runtime=RT)
    assert not report.uniform and model.config.n_inner == 4 * 64
    _round_trip(model, report, tmp_path, "gpt2")


def test_an_edit_the_rebuilt_model_cannot_hold_is_refused():
    from pare.arch.surgery import replay
    from pare.errors import PareError

    with pytest.raises(PareError, match="MLP width as 96, fewer than the 500"):
        replay(tiny_model("llama"), [{"op": "mlp_channels", "layer": 0, "width": 500}])
    with pytest.raises(PareError, match="attention heads as 4"):
        replay(tiny_model("llama"), [{"op": "heads", "layer": 0, "num_heads": 8, "num_kv_heads": 2}])


def test_osscar_rounding_and_power_of_two():
    model = tiny_model("llama")
    pare.prune(model, OsscarConfig(mlp_ratio=0.3, round_to=32, max_swaps=2), CALIB, runtime=RT)
    assert model.config.intermediate_size == 64
    model = tiny_model("llama")
    pare.prune(model, OsscarConfig(mlp_ratio=0.4, power_of_two=True, max_swaps=2), CALIB, runtime=RT)
    assert model.config.intermediate_size == 64


def test_osscar_beats_magnitude_channel_selection_on_layer_error():
    """Selection + refit: the per-layer relative reconstruction error is below keeping the weights."""
    model = tiny_model("llama")
    report = pare.prune(model, OsscarConfig(mlp_ratio=0.5), CALIB, runtime=RT)
    for e in report.scores["mlp_error"].values():
        assert e["refit"] < e["no_refit"]


def test_configs_validate_with_useful_messages():
    with pytest.raises(ConfigError, match="importance must be one of"):
        WidthConfig(importance="random")
    with pytest.raises(ConfigError, match=r"outside \[0, 1\)"):
        WidthConfig(pruning_ratio=1.0)
    with pytest.raises(ConfigError, match="round_to"):
        OsscarConfig(round_to=0)
    with pytest.raises(ConfigError, match="head_mode"):
        OsscarConfig(head_mode="all")
    # the seed script's --pruning_ratio is the field name (the CLI adds --x_y next to --x-y)
    assert "pruning_ratio" in {f.name for f in dataclasses.fields(WidthConfig)}


def test_unrealisable_head_ratio_lists_valid_ratios():
    model = tiny_model("llama")  # 4 heads / 2 KV heads: query mode 0.5, kv mode 0.5
    with pytest.raises(ConfigError, match="nearest valid ratios"):
        pare.prune(model, OsscarConfig(mlp_ratio=0.0, attn_ratio=0.3, head_mode="query"), CALIB, runtime=RT)


def test_a_structured_run_that_removes_nothing_says_so(caplog) -> None:
    model = tiny_model("llama")
    before = sum(p.numel() for p in model.parameters())
    report = pare.prune(model, pare.OsscarConfig(mlp_ratio=0.25, round_to=4096), tiny_batch(4, 16),
                        runtime=RuntimeConfig(progress=False, device="cpu"))
    assert sum(p.numel() for p in model.parameters()) == before
    assert any("removed nothing" in n for n in report.notes)
    assert not any("weights are removed" in n for n in report.notes)
    assert "removed nothing" in caplog.text


def _outside_family(kind: str) -> torch.nn.Module:
    """Families pare has no override for (fused q/k/v of unknown order, MLP width not in the config)."""
    from transformers import BloomConfig, FalconConfig

    torch.manual_seed(0)
    cfg = {
        "bloom": BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=256),
        "falcon": FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
                               new_decoder_architecture=False, multi_query=True),
    }[kind]
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("kind", ["bloom", "falcon"])
def test_unknown_families_cut_mlp_channels_and_reload_but_refuse_unsafe_cuts(kind: str, tmp_path) -> None:
    quiet = RuntimeConfig(progress=False, device="cpu")
    model = _outside_family(kind)
    ids = tiny_batch(4, 16) % 256
    report = pare.prune(model, OsscarConfig(mlp_ratio=0.5), ids, runtime=quiet)
    assert report.figures["params_after"] < report.figures["params_before"]
    assert not report.uniform  # the config has no field for the MLP width: pare.load replays the edits
    pare.save(model, None, tmp_path / "o", report)
    with torch.no_grad():
        assert torch.equal(pare.load(tmp_path / "o")(ids).logits, model(ids).logits)
    with pytest.raises(ConfigError, match="stacks q/k/v in an order pare has no rule for"):
        pare.prune(_outside_family(kind), WidthConfig(pruning_ratio=0.5), ids, runtime=quiet)
    with pytest.raises(ConfigError, match="derives head_dim from the hidden size"):
        pare.prune(_outside_family(kind), WidthConfig(pruning_ratio=0.5, heads=False), ids, runtime=quiet)


def test_magnitude_width_needs_no_calibration() -> None:
    quiet = RuntimeConfig(progress=False, device="cpu")
    cfg = WidthConfig(importance="magnitude", pruning_ratio=0.5)
    with_data, without = tiny_model("llama"), tiny_model("llama")
    pare.prune(with_data, cfg, tiny_batch(4, 16), runtime=quiet)
    report = pare.prune(without, cfg, runtime=quiet)
    assert report.calibration is None
    for (name, a), (_, b) in zip(with_data.named_parameters(), without.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_head_counts_the_config_cannot_hold_are_refused_before_any_work(tmp_path):
    """Llama's config requires hidden % heads == 0: 8 heads -> 6 with hidden 64 cannot be saved."""
    def eight_heads():
        return tiny_model("llama", num_attention_heads=8, num_key_value_heads=4, head_dim=8)

    for cfg in (OsscarConfig(mlp_ratio=0.25, attn_ratio=0.25), WidthConfig(pruning_ratio=0.25, hidden=False)):
        with pytest.raises(ConfigError, match=r"leaves 6 attention heads.*ratios that work: \[0\.5"):
            pare.prune(eight_heads(), cfg, CALIB, runtime=RT)
    # with the hidden size cut too (64 -> 48), 6 heads divide it: the run saves and reloads
    model = eight_heads()
    report = pare.prune(model, WidthConfig(pruning_ratio=0.25, importance="magnitude"), CALIB, runtime=RT)
    assert model.config.num_attention_heads == 6 and model.config.hidden_size == 48
    _round_trip(model, report, tmp_path, "llama")


def test_osscar_after_an_mlp_block_was_removed(tmp_path):
    model = tiny_model("llama")
    first = pare.prune(model, pare.SublayerConfig(parts=("mlp",)), CALIB, runtime=RT)
    second = pare.prune(model, OsscarConfig(mlp_ratio=0.5), CALIB, runtime=RT)
    removed = [r for r in describe(model).layers if r.mlp is None]
    assert len(removed) == 1 and second.edits  # the other layers' MLPs were cut
    pare.save(model, None, tmp_path / "m", [first, second])
    assert torch.allclose(_logits(pare.load(tmp_path / "m")), _logits(model), atol=1e-5)


def test_taylor_scores_do_not_depend_on_the_batch_size():
    from pare.methods.width import taylor_tables

    model = tiny_model("llama")
    ids = tiny_batch(6, 32, seed=3)
    whole = taylor_tables(model, ids, batch_size=6, device=torch.device("cpu"))
    split = taylor_tables(model, ids, batch_size=4, device=torch.device("cpu"))  # batches of 4 and 2
    assert whole.keys() == split.keys() and whole
    for name in whole:
        for a, b in zip(whole[name], split[name], strict=True):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-9), name
