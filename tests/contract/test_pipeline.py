"""The stage runner: the caller's ArchOverride travels everywhere (prune, save, reload), each stage
is built once and the model described once per CLI run, later stages are checked on the model the
earlier ones leave."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pare
import pare.arch
import pare.pipeline
from pare.arch import ArchOverride
from pare.cli import main
from pare.errors import ConfigError
from pare.io import read_manifest
from pare.methods import LayersConfig, MagnitudePruner, OsscarConfig, WidthConfig
from tiny import tiny_batch, tiny_model, tiny_tokenizer

RUNTIME = pare.RuntimeConfig(device="cpu", progress=False)


@pytest.fixture
def describe_calls(monkeypatch) -> list:
    """Every ``describe`` call's override argument (pipeline, stages, surgery replay)."""
    calls: list = []
    real = pare.arch.describe

    def spy(model, override=None):
        calls.append(override)
        return real(model, override)

    monkeypatch.setattr(pare.arch, "describe", spy)
    monkeypatch.setattr(pare.pipeline, "describe", spy)
    return calls


@pytest.mark.parametrize("config", [OsscarConfig(mlp_ratio=0.25, attn_ratio=0.5),
                                    WidthConfig(pruning_ratio=0.25, allocation="global", hidden=False, heads=False,
                                                importance="activation")])
def test_an_overridden_architecture_prunes_saves_and_reloads_like_an_inferred_one(
        config, describe_calls: list, tmp_path: Path) -> None:
    override = ArchOverride(names={"up": "mlp.up_proj", "down": "mlp.down_proj"})
    ids = tiny_batch(4, 16)
    inferred, overridden = tiny_model("llama"), tiny_model("llama")
    pare.prune(inferred, config, ids, runtime=RUNTIME, batch_size=2)
    describe_calls.clear()
    report = pare.prune(overridden, config, ids, runtime=RUNTIME, batch_size=2, arch_override=override)
    assert len(describe_calls) >= 2 and all(o is override for o in describe_calls)  # before and after the cut
    assert report.arch_override == override.to_dict()
    with torch.no_grad():
        assert torch.equal(inferred(ids).logits, overridden(ids).logits)
    pare.save(overridden, None, tmp_path / "o", report)
    assert read_manifest(tmp_path / "o")["arch_override"] == override.to_dict()
    describe_calls.clear()
    with torch.no_grad():
        assert torch.equal(pare.load(tmp_path / "o")(ids).logits, overridden(ids).logits)
    assert all(o == override for o in describe_calls)  # replay describes with the recorded override


def test_arch_override_round_trips() -> None:
    from pare.arch.overrides import BUILTIN_OVERRIDES

    for override in BUILTIN_OVERRIDES.values():
        assert ArchOverride.from_dict(json.loads(json.dumps(override.to_dict()))) == override


def test_a_cli_prune_builds_the_stage_once_and_describes_the_model_once(
        describe_calls: list, monkeypatch, tmp_path: Path) -> None:
    built = []
    real_init = MagnitudePruner.__init__

    def counting_init(self, config):
        built.append(config)
        real_init(self, config)

    monkeypatch.setattr(MagnitudePruner, "__init__", counting_init)
    path = tmp_path / "m"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    assert main(["prune", "--model", str(path), "--method", "magnitude", "--no-progress", "--no-save", "--json"]) == 0
    assert len(built) == 1 and len(describe_calls) == 1


def test_a_later_stage_is_checked_on_the_model_the_earlier_ones_leave() -> None:
    model = tiny_model("llama")  # 3 layers: the second stage's layer 2 is gone after the first
    with pytest.raises(ConfigError, match="layer"):
        pare.run(model, [LayersConfig(layers="0"), LayersConfig(layers="2")], runtime=RUNTIME)


def test_run_refuses_what_is_not_a_list_of_method_configs() -> None:
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="non-empty list"):
        pare.run(model, [], runtime=RUNTIME)
    with pytest.raises(ConfigError, match="registered method config"):
        pare.run(model, [{"method": "wanda"}], runtime=RUNTIME)  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="needs calibration data"):
        pare.run(model, [LayersConfig(layers="0"), pare.WandaConfig()], runtime=RUNTIME)
