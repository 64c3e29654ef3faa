"""The contract every registered stage keeps on every tiny architecture, as plain functions.

``tests/contract/test_stage_matrix.py`` runs them for every stage in the registry; a test that
registers its own stage calls them too, so a new method is covered by registering it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pare
from pare.config import PruneConfig
from pare.errors import ConfigError
from pare.io import read_manifest
from pare.methods import METHODS
from tiny import ALL_TINY_ARCHS, tiny_batch, tiny_model

RUNTIME = pare.RuntimeConfig(device="cpu", progress=False)


def example(name: str) -> PruneConfig:
    return METHODS[name].example_config()


def check_recipe(arch: str, configs: list[PruneConfig], out: Path) -> list[pare.Report]:
    """Run ``configs`` on a tiny ``arch`` model, save, reload, and compare logits exactly.

    A stage whose ``check`` refuses this architecture (a ConfigError before any work) skips the case
    with its message; any other failure fails it.
    """
    model = tiny_model(arch)
    ids = tiny_batch(4, 16)
    try:
        reports = pare.run(model, configs, ids, runtime=RUNTIME, batch_size=2)
    except ConfigError as exc:
        pytest.skip(f"{[c.method for c in configs]} refused on {arch}: {exc}")
    assert [r.method for r in reports] == [c.method for c in configs]
    for report, cfg in zip(reports, configs, strict=True):
        assert report.config == cfg.to_dict()
        for module in report.modules.values():  # the report's sparsity is the one in the weights
            assert 0.0 <= module["sparsity"] <= 1.0
    pare.save(model, None, out, reports)
    manifest = read_manifest(out) or {}
    if len(reports) > 1:
        assert [s["method"] for s in manifest["stages"]] == [c.method for c in configs]
    with torch.no_grad():
        want = model(ids).logits
        assert torch.equal(pare.load(out)(ids).logits, want)
        if manifest.get("uniform", True):
            from transformers import AutoModelForCausalLM

            assert torch.equal(AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits, want)
    return reports


def stage_cases(names: list[str], fast: bool) -> list:
    """``(method, arch)`` pairs: all of them, marked ``matrix`` (``make test-matrix``), or (``fast``)
    each architecture with one method in turn, so every method and every architecture appear in the
    fast suite."""
    pairs = [(m, a) for a in ALL_TINY_ARCHS for m in names]
    if fast:
        n = len(ALL_TINY_ARCHS)
        chosen = [(names[i % len(names)], a) for i, a in enumerate(ALL_TINY_ARCHS)]
        chosen += [(m, ALL_TINY_ARCHS[(i + n // 2) % n]) for i, m in enumerate(names)]
        return list(dict.fromkeys(chosen))
    return [pytest.param(m, a, marks=pytest.mark.matrix) for m, a in pairs]
