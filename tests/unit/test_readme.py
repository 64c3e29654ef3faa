"""The README's recipe and its "add a method in one file" example are what pare accepts."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import yaml

import pare
from pare.config import unregister
from pare.errors import ConfigError
from pare.pipeline import Pipeline
from pare.recipe import parse_recipe
from tiny import tiny_model

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def _block(heading: str, lang: str) -> str:
    section = README.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    match = re.search(rf"```{lang}\n(.*?)```", section, re.S)
    assert match, f"no {lang} block under '## {heading}'"
    return match.group(1)


def test_the_readme_recipe_is_the_issues_three_stages() -> None:
    recipe = parse_recipe(yaml.safe_load(_block("Recipes: several stages in one run", "yaml")))
    assert [s.method for s in recipe.stages] == ["osscar", "ppl-window", "sparsegpt"]
    assert recipe.stages[0] == pare.OsscarConfig(mlp_ratio=0.25, round_to=4)
    assert recipe.stages[2] == pare.SparseGPTConfig(sparsity=0.5, pattern="2:4")


def test_without_round_to_the_recipe_is_refused_before_any_work_as_the_readme_says() -> None:
    model = tiny_model("llama", intermediate_size=172)  # stories260K's MLP width
    stages = [pare.OsscarConfig(mlp_ratio=0.25), pare.PplWindowConfig(num_layers=1),
              pare.SparseGPTConfig(pattern="2:4")]
    with pytest.raises(ConfigError, match=r"stage 3 \(sparsegpt\).*129 inputs"):
        Pipeline(model, stages)
    Pipeline(model, [pare.OsscarConfig(mlp_ratio=0.25, round_to=4), *stages[1:]])  # the README's: accepted
    assert "172 x 0.75 = 129" in README


def test_the_readme_method_example_registers_and_runs_in_a_recipe(monkeypatch) -> None:
    module = types.ModuleType("readme_example")
    monkeypatch.setitem(sys.modules, "readme_example", module)  # dataclasses look their module up
    namespace = module.__dict__
    exec(compile(_block("Adding a method in one file", "python"), "README.md", "exec"), namespace)
    try:
        config = namespace["ScaleDownConfig"](ratio=0.2)
        assert pare.METHODS["scale-down"] is namespace["ScaleDown"]
        assert pare.config_from_dict(config.to_dict()) == config
        reports = pare.run(tiny_model("llama"), [config, pare.MagnitudeConfig(sparsity=0.5)],
                           runtime=pare.RuntimeConfig(device="cpu", progress=False))
        assert [r.method for r in reports] == ["scale-down", "magnitude"]
    finally:
        unregister("scale-down")
