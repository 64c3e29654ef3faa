"""Magnitude pruning through the whole path: prune -> report -> save -> reload, every family."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import pare
from pare.errors import ConfigError, OutputExistsError
from tiny import TINY_ARCHS, tiny_batch, tiny_model

QUIET = pare.RuntimeConfig(progress=False, device="cpu")


@pytest.mark.parametrize("model_type", TINY_ARCHS)
def test_prune_save_reload_identical_logits(model_type: str, tmp_path) -> None:
    model = tiny_model(model_type)
    report = pare.prune(model, pare.MagnitudeConfig(sparsity=0.5), runtime=QUIET)
    for name, info in report.modules.items():
        assert info["sparsity"] == pytest.approx(0.5, abs=1 / info["shape"][1]), name
    assert report.overall_sparsity == pytest.approx(0.5, abs=0.01)
    out = pare.save(model, None, tmp_path / "out", report)
    manifest = json.loads((out / "pare.json").read_text())
    assert manifest["method"] == "magnitude" and manifest["config"]["sparsity"] == 0.5
    assert manifest["uniform"] is True and manifest["prune_seconds"] >= 0 and manifest["peak_rss_mb"] > 0
    assert set(manifest["versions"]) >= {"pare", "torch", "transformers"}
    assert list((out).glob("*.safetensors"))
    ids = tiny_batch()
    with torch.no_grad():
        ref = model(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(out)(ids).logits
        ours = pare.load(out)(ids).logits
    assert torch.equal(ref, plain) and torch.equal(ref, ours)


def test_row_granularity_is_exact_per_row_and_layer_per_matrix() -> None:
    model = tiny_model("llama")
    pare.prune(model, pare.MagnitudeConfig(sparsity=0.25, granularity="row"), runtime=QUIET)
    w = model.model.layers[0].mlp.down_proj.weight
    assert ((w == 0).sum(1) == int(w.shape[1] * 0.25)).all()
    model = tiny_model("llama")
    pare.prune(model, pare.MagnitudeConfig(sparsity=0.25, granularity="layer"), runtime=QUIET)
    w = model.model.layers[0].mlp.down_proj.weight
    assert int((w == 0).sum()) == int(w.numel() * 0.25)
    assert len(set((w == 0).sum(1).tolist())) > 1  # rows differ: the comparison was across the matrix


def test_targets_and_ignore_select_modules() -> None:
    model = tiny_model("llama")
    report = pare.prune(model, pare.MagnitudeConfig(sparsity=0.5, targets=(r"mlp\.",), ignore=(r"down_proj",)),
                        runtime=QUIET)
    assert report.modules and all("mlp" in n and "down_proj" not in n for n in report.modules)
    assert int((model.model.layers[0].self_attn.q_proj.weight == 0).sum()) == 0
    assert int((model.model.embed_tokens.weight == 0).sum()) == 0 and int((model.lm_head.weight == 0).sum()) == 0


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, "half", True])
def test_bad_sparsity_is_a_clear_error(bad) -> None:
    with pytest.raises(ConfigError, match="sparsity"):
        pare.MagnitudeConfig(sparsity=bad)


def test_regex_matching_nothing_is_an_error() -> None:
    with pytest.raises(ConfigError, match="matches no prunable module"):
        pare.prune(tiny_model("llama"), pare.MagnitudeConfig(targets=("nonexistent_proj",)), runtime=QUIET)


def test_existing_output_is_refused_and_left_intact(tmp_path) -> None:
    model = tiny_model("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="overwrite"):
        pare.save(model, None, out)
    with pytest.raises(OutputExistsError, match=r"does not look like a saved model.*keep\.txt"):
        pare.save(model, None, out, overwrite=True)  # not a saved model: never replaced
    assert (out / "keep.txt").read_text() == "precious" and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    saved = tmp_path / "saved"
    pare.save(tiny_model("llama", seed=1), None, saved)
    pare.save(model, None, saved, overwrite=True)
    assert torch.equal(pare.load(saved).model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "saved"]  # no temporary directory left behind


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch) -> None:
    model = tiny_model("llama")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(model), "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        pare.save(model, None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("content", "match"), [
    ("{", "not a valid pare manifest"),
    ("[1, 2]", "not an object"),
    ('{"version": 99}', "newer than this pare reads"),
])
def test_a_broken_manifest_is_a_clear_error(tmp_path, content: str, match: str) -> None:
    from pare.errors import PareError

    model = tiny_model("llama")
    report = pare.prune(model, pare.MagnitudeConfig(sparsity=0.5), runtime=pare.RuntimeConfig(progress=False))
    out = pare.save(model, None, tmp_path / "out", report)
    (out / "pare.json").write_text(content)
    with pytest.raises(PareError, match=match):
        pare.load(out)


def test_saved_files_have_the_usual_permissions(tmp_path) -> None:
    import os

    model = tiny_model("llama")
    report = pare.prune(model, pare.MagnitudeConfig(sparsity=0.5), runtime=pare.RuntimeConfig(progress=False))
    out = pare.save(model, None, tmp_path / "out", report)
    mask = os.umask(0o022)
    os.umask(mask)
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}
    assert "model.safetensors" in modes
    assert set(modes.values()) == {0o666 & ~mask}, modes


def test_the_manifest_records_how_the_run_went(tmp_path) -> None:
    model = tiny_model("llama")
    runtime = pare.RuntimeConfig(progress=False, device="cpu", sequential=False)
    report = pare.prune(model, pare.WandaConfig(sparsity=0.5), tiny_batch(4, 16), runtime=runtime, batch_size=3)
    out = pare.save(model, None, tmp_path / "out", report)
    saved = json.loads((out / "pare.json").read_text())
    assert saved["runtime"] == {"device": "cpu", "dtype": "torch.float32", "sequential": False, "offload": True,
                                "batch_size": 3}
