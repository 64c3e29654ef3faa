"""Recipe files: stages, --set overrides, sections and their errors."""

from __future__ import annotations

import pytest
import yaml

from pare.errors import ConfigError
from pare.methods import OsscarConfig, PplWindowConfig, ShortGPTConfig, SparseGPTConfig
from pare.recipe import apply_set, parse_recipe

RECIPE = """
model: ../shared/models/stories260K
calibration: {dataset: tinystories, nsamples: 64, seqlen: 256, seed: 0}
stages:
  - osscar: {mlp_ratio: 0.25}
  - ppl-window: {num_layers: 1}
  - sparsegpt: {sparsity: 0.5, pattern: "2:4"}
eval: {ppl: [tinystories]}
out: out/stories-3stage
"""


def test_the_issue_recipe_parses() -> None:
    recipe = parse_recipe(yaml.safe_load(RECIPE))
    assert recipe.stages == [OsscarConfig(mlp_ratio=0.25), PplWindowConfig(num_layers=1),
                             SparseGPTConfig(sparsity=0.5, pattern="2:4")]
    assert recipe.model == "../shared/models/stories260K" and recipe.top["out"] == "out/stories-3stage"
    assert recipe.calibration.nsamples == 64 and recipe.calibration.dataset == "tinystories"
    assert recipe.ppl == ["tinystories"]


def test_set_reaches_into_a_stages_options_and_any_section() -> None:
    data = yaml.safe_load(RECIPE)
    apply_set(data, "stages.1.num_layers=2")
    apply_set(data, "calibration.nsamples=8")
    apply_set(data, "stages.0.attn_ratio=0.5")
    apply_set(data, "out=elsewhere")
    recipe = parse_recipe(data)
    assert recipe.stages[1] == PplWindowConfig(num_layers=2)
    assert recipe.stages[0] == OsscarConfig(mlp_ratio=0.25, attn_ratio=0.5)
    assert recipe.calibration.nsamples == 8 and recipe.top["out"] == "elsewhere"


def test_stage_forms_and_errors() -> None:
    recipe = parse_recipe({"stages": ["shortgpt", {"method": "osscar", "mlp_ratio": 0.5}]})
    assert recipe.stages == [ShortGPTConfig(), OsscarConfig(mlp_ratio=0.5)]
    with pytest.raises(ConfigError, match="non-empty 'stages'"):
        parse_recipe({"stages": []})
    with pytest.raises(ConfigError, match=r"stages\[0\] \(osscar\).*max_swaps"):
        parse_recipe({"stages": [{"osscar": {"max_swaps": "3"}}]})
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        parse_recipe({"stages": ["nope"]})
    with pytest.raises(ConfigError, match="recipe key 'modle' is unknown"):
        parse_recipe({"stages": ["shortgpt"], "modle": "x"})
    with pytest.raises(ConfigError, match="eval key"):
        parse_recipe({"stages": ["shortgpt"], "eval": {"ppl": "wikitext2", "windows": 3}})


def test_set_errors_say_what_works() -> None:
    data = yaml.safe_load(RECIPE)
    with pytest.raises(ConfigError, match="key=value"):
        apply_set(data, "stages.1.num_layers")
    with pytest.raises(ConfigError, match="not an index of a list of 3"):
        apply_set(data, "stages.7.num_layers=1")
