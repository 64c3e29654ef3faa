"""Contract matrix generated from the registry: every registered stage x every tiny architecture
(the 13 table families plus GPT-J, Bloom, Falcon): prune -> save -> reload -> identical logits
(``from_pretrained`` too for uniform results), and 2- and 3-stage recipes per architecture.

The fast suite runs a rotation in which every stage and every architecture appear, and the 3-stage
recipe on every architecture; the 2-stage recipes are marked ``slow`` (``make test`` runs them) and
the full matrix ``matrix`` (``make test-matrix``: about 20 minutes on two cores, too long for CI).
"""

from __future__ import annotations

import pytest

from pare import MagnitudeConfig, OsscarConfig, ShortGPTConfig, SparseGPTConfig, WandaConfig
from pare.methods import METHODS
from stage_contract import check_recipe, example, stage_cases
from tiny import ALL_TINY_ARCHS

BUILTIN = sorted(METHODS)


@pytest.mark.parametrize(("method", "arch"), stage_cases(BUILTIN, fast=True))
def test_stage_contract_fast(method: str, arch: str, tmp_path) -> None:
    check_recipe(arch, [example(method)], tmp_path / "o")


@pytest.mark.parametrize(("method", "arch"), stage_cases(BUILTIN, fast=False))
def test_stage_contract_full(method: str, arch: str, tmp_path) -> None:
    check_recipe(arch, [example(method)], tmp_path / "o")


TWO = [OsscarConfig(mlp_ratio=0.25), WandaConfig(sparsity=0.5)]
THREE = [OsscarConfig(mlp_ratio=0.25), ShortGPTConfig(num_layers=1), SparseGPTConfig(sparsity=0.5)]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ALL_TINY_ARCHS)
def test_two_stage_recipe(arch: str, tmp_path) -> None:
    reports = check_recipe(arch, TWO, tmp_path / "o")
    assert reports[1].figures["params_before"] == reports[0].figures["params_after"]


@pytest.mark.parametrize("arch", ALL_TINY_ARCHS)
def test_three_stage_recipe(arch: str, tmp_path) -> None:
    reports = check_recipe(arch, THREE, tmp_path / "o")
    assert reports[2].figures["params_after"] < reports[0].figures["params_before"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_stage_may_run_twice(arch: str, tmp_path) -> None:
    check_recipe(arch, [MagnitudeConfig(sparsity=0.3), ShortGPTConfig(num_layers=1), MagnitudeConfig(sparsity=0.5)],
                 tmp_path / "o")
