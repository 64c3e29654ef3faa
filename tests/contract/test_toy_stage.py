"""A method added in one file: a toy stage registered here appears in ``pare methods``, runs in a
recipe (Python and ``pare run``) and is covered by the contract matrix, with no other file edited."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import pare
from pare.cli import main
from pare.config import PruneConfig, check_ratio, help_field, register, unregister
from pare.methods.base import PruneContext, Pruner
from stage_contract import check_recipe
from tiny import ALL_TINY_ARCHS, tiny_model, tiny_text, tiny_tokenizer


@dataclass(frozen=True)
class ToyConfig(PruneConfig):
    """Zero the first columns of every decoder-layer matrix (a test stage).

    Attributes:
        fraction: fraction of input columns zeroed.
    """

    method: ClassVar[str] = "toy-columns"

    fraction: float = help_field(0.25, "fraction of input columns zeroed")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ratio("fraction", self.fraction)


class ToyStage(Pruner):
    """Zero the first columns of every 2-D weight inside the decoder layers."""

    config_class = ToyConfig
    config: ToyConfig
    needs_calibration: ClassVar[bool] = False

    def run(self, ctx: PruneContext) -> None:
        count = 0
        for layer in ctx.arch.layer_modules(ctx.model):
            for p in layer.parameters():
                if p.dim() == 2:
                    p[:, : int(p.shape[1] * self.config.fraction)] = 0
                    count += 1
        ctx.report.scores["matrices"] = count


@pytest.fixture(scope="module", autouse=True)
def toy_registered() -> Iterator[None]:
    register(ToyStage)
    yield
    unregister("toy-columns")


def test_toy_is_listed_by_pare_methods(capsys) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "toy-columns" in out and "--fraction" in out and "A method added in one file" in out


FAST = ("llama", "gpt2", "mixtral", "falcon")


@pytest.mark.parametrize("arch", [a if a in FAST else pytest.param(a, marks=pytest.mark.slow) for a in ALL_TINY_ARCHS])
def test_toy_keeps_the_stage_contract(arch: str, tmp_path: Path) -> None:
    check_recipe(arch, [pare.METHODS["toy-columns"].example_config()], tmp_path / "o")


def test_toy_in_a_python_recipe(tmp_path: Path) -> None:
    reports = check_recipe("llama", [ToyConfig(fraction=0.5), pare.ShortGPTConfig(num_layers=1)], tmp_path / "o")
    assert reports[0].scores["matrices"] == 3 * 7 and reports[1].edits


def test_toy_in_a_recipe_file(tmp_path: Path, capsys) -> None:
    model_dir = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "text.txt"
    text.write_text(tiny_text(60))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {model_dir}\ncalibration: {{dataset: {text}, nsamples: 4, seqlen: 32}}\n"
                      "stages:\n  - toy-columns: {fraction: 0.5}\n  - shortgpt: {num_layers: 1}\n"
                      f"out: {tmp_path / 'out'}\nruntime: {{device: cpu, progress: false}}\n")
    assert main(["run", str(recipe), "--set", "stages.0.fraction=0.25", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [s["method"] for s in shown["stages"]] == ["toy-columns", "shortgpt"]
    manifest = json.loads((tmp_path / "out" / "pare.json").read_text())
    assert manifest["stages"][0]["config"] == ToyConfig(fraction=0.25).to_dict()
    w = pare.load(tmp_path / "out").model.layers[0].mlp.down_proj.weight
    assert torch.equal(w[:, :24], torch.zeros_like(w[:, :24])) and w[:, 24:].abs().sum() > 0
