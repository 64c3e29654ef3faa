"""The whole recipe is checked before any work: every stage against the shapes the stages before it
will leave (their previews on a meta-device copy), before calibration and before the first cut."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import pare
import pare.api
from pare.arch import describe
from pare.arch.surgery.shadow import meta_copy
from pare.arch.surgery.width import cut_mlp_to, sync_config
from pare.config import PruneConfig, register, stage_for_config, unregister
from pare.errors import ConfigError
from pare.methods import LayersConfig, OsscarConfig, OsscarPruner, ShortGPTConfig, WidthConfig
from pare.methods.base import PruneContext, StructuralPruner
from tiny import tiny_batch, tiny_model

RUNTIME = pare.RuntimeConfig(device="cpu", progress=False)
NINE_HEADS = dict(hidden_size=72, num_attention_heads=9, num_key_value_heads=3, head_dim=8)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], v) for k, v in before.items())


def test_a_hidden_cut_the_config_cannot_hold_is_refused_before_any_work() -> None:
    """SmolLM2's case (9 heads, hidden cut at 0.15 left a size no multiple of 9), on a tiny model."""
    model = tiny_model("llama", **NINE_HEADS)
    before = _state(model)
    with pytest.raises(ConfigError, match=r"hidden size would become 61 of 72.*multiple of the number of attention "
                                          r"heads.*nearest hidden sizes that work: 54 .*63 .*hidden=False") as err:
        pare.prune(model, WidthConfig(pruning_ratio=0.15, heads=False), tiny_batch(4, 16), runtime=RUNTIME)
    assert "0.125" in str(err.value)  # 63 of 72: the ratio that works
    assert _unchanged(model, before)
    pare.api.check(model, WidthConfig(pruning_ratio=0.125, heads=False))  # the ratio it names works


def test_the_ratio_the_refusal_names_prunes_and_saves(tmp_path) -> None:
    model = tiny_model("llama", **NINE_HEADS)
    report = pare.prune(model, WidthConfig(pruning_ratio=0.125, heads=False), tiny_batch(4, 16), runtime=RUNTIME)
    assert model.config.hidden_size == 63
    ids = tiny_batch(1, 8)
    with torch.no_grad():
        assert torch.equal(pare.load(pare.save(model, None, tmp_path / "o", report))(ids).logits, model(ids).logits)


def test_a_later_stage_is_checked_on_the_shapes_an_earlier_cut_will_leave(monkeypatch) -> None:
    ran = []
    monkeypatch.setattr(OsscarPruner, "run", lambda self, ctx: ran.append(ctx))
    model = tiny_model("llama")  # MLP width 96: 70% kept is 67 channels, which 2:4 cannot divide
    before = _state(model)
    stages = [OsscarConfig(mlp_ratio=0.3), pare.SparseGPTConfig(pattern="2:4")]
    with pytest.raises(ConfigError, match=r"stage 2 \(sparsegpt\), on the shapes osscar will leave: .*2:4.*67 inputs"):
        pare.run(model, stages, tiny_batch(4, 16), runtime=RUNTIME)
    assert not ran and _unchanged(model, before)
    pare.run(tiny_model("llama"), [OsscarConfig(mlp_ratio=0.25), pare.SparseGPTConfig(pattern="2:4")],
             tiny_batch(4, 16), runtime=RUNTIME)  # 72 channels: accepted and run


def test_a_recipe_is_checked_before_calibration_windows_are_needed() -> None:
    model = tiny_model("llama", **NINE_HEADS)  # 3 layers
    with pytest.raises(ConfigError, match=r"stage 2 \(width\), on the shapes layers will leave: the hidden size"):
        pare.run(model, [LayersConfig(layers="0"), WidthConfig(pruning_ratio=0.15, heads=False)], runtime=RUNTIME)
    with pytest.raises(ConfigError, match=r"stage 2 \(layers\).*shortgpt.*outside the model: it has 1 layers"):
        pare.run(tiny_model("llama"), [ShortGPTConfig(num_layers=2), LayersConfig(layers="1")], runtime=RUNTIME)


@pytest.mark.parametrize("arch_name", ["llama", "qwen2_moe", "gpt2", "phi3"])
@pytest.mark.parametrize("config", [
    OsscarConfig(mlp_ratio=0.25, attn_ratio=0.5),
    WidthConfig(pruning_ratio=0.5),
    WidthConfig(pruning_ratio=0.5, hidden=False, head_mode="kv"),
    LayersConfig(layers="1"),
    ShortGPTConfig(num_layers=1),
], ids=["osscar", "width", "width-kv", "layers", "shortgpt"])
def test_a_preview_leaves_the_shapes_the_run_leaves(arch_name: str, config) -> None:
    model = tiny_model(arch_name)
    arch = describe(model)
    stage = stage_for_config(config)(config)
    try:
        stage.check(model, arch)
    except ConfigError as exc:
        pytest.skip(f"{arch_name} refuses {config.method}: {exc}")
    shadow = meta_copy(model)
    assert shadow is not None and all(p.device.type == "meta" for p in shadow.parameters())
    stage.preview(shadow, arch, None)
    pare.prune(model, config, tiny_batch(4, 16), runtime=RUNTIME, batch_size=2)
    assert {k: v.shape for k, v in shadow.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert shadow.config.to_dict() == model.config.to_dict()
    assert all(p.device.type == "cpu" for p in model.parameters())  # the real model was never on meta


@dataclass(frozen=True)
class TrimConfig(PruneConfig):
    """Cut every MLP to 96 channels (a test stage without a preview)."""

    method: ClassVar[str] = "trim-mlp-test"


class TrimStage(StructuralPruner):
    config_class = TrimConfig
    needs_calibration: ClassVar[bool] = False

    def run(self, ctx: PruneContext) -> None:
        for r in ctx.arch.layers:
            ctx.report.edits.append(cut_mlp_to(ctx.model, ctx.arch, r.index, 96))
        ctx.report.uniform = sync_config(ctx.model, ctx.describe())


def test_after_a_cut_without_preview_later_stages_are_checked_when_they_run() -> None:
    register(TrimStage)
    try:
        model = tiny_model("llama", intermediate_size=98)  # 2:4 cannot divide 98, but the stage before leaves 96
        reports = pare.run(model, [TrimConfig(), pare.MagnitudeConfig(pattern="2:4")], runtime=RUNTIME)
        assert reports[1].pattern == "2:4" and model.config.intermediate_size == 96
        with pytest.raises(ConfigError, match="multiple of 4"):  # without the cut, refused
            pare.run(tiny_model("llama", intermediate_size=98), [pare.MagnitudeConfig(pattern="2:4")], runtime=RUNTIME)
    finally:
        unregister("trim-mlp-test")
