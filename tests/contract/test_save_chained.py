"""Saving models pruned more than once: every report is needed, and nothing reloads with random weights.

``pare.save`` rebuilds the architecture its manifest describes (on the meta device) and refuses
to write anything when it differs from the model; ``pare.load`` refuses a pare directory whose
weights do not cover the model its config and manifest describe.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import pare
from pare.errors import ConfigError, PareError
from tiny import tiny_batch, tiny_model

QUIET = pare.RuntimeConfig(progress=False, device="cpu")
CALIB = tiny_batch(4, 16, seed=1)
IDS = tiny_batch(2, 12)
HINT = "pare.save(model, tok, out, [report1, report2])"


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


def sublayer_then_layer(model_type: str = "llama"):
    """The attention of layer 2 removed, then layer 0: the attention-less layer is renumbered 1."""
    model = tiny_model(model_type)
    r1 = pare.prune(model, pare.SublayerConfig(num_sublayers=1, parts=("attention",), layers="2"), CALIB, runtime=QUIET)
    r2 = pare.prune(model, pare.LayersConfig(layers="0"), runtime=QUIET)
    return model, r1, r2


def listing(path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen2_moe"])
def test_chained_sublayer_then_layers_reloads_identically(model_type: str, tmp_path) -> None:
    model, r1, r2 = sublayer_then_layer(model_type)
    assert r1.edits[0].layer == 2 and not r1.uniform and r2.uniform
    out = pare.save(model, None, tmp_path / "m", [r1, r2])
    manifest = json.loads((out / "pare.json").read_text())
    assert manifest["uniform"] is False and manifest["method"] == "layers"
    assert [h["method"] for h in manifest["stages"]] == ["sublayer", "layers"]
    assert manifest["stages"][0]["edits"][0]["layer"] == 2  # each report as it was
    assert [e["op"] for e in manifest["edits"]] == ["remove_sublayer", "remove_layers"]
    assert manifest["edits"][0]["layer"] == 1  # replayed on the 2-layer model built from the saved config
    assert torch.equal(logits(pare.load(out)), logits(model))


def test_sublayer_edit_of_a_removed_layer_is_dropped(tmp_path) -> None:
    model = tiny_model("llama")
    r1 = pare.prune(model, pare.SublayerConfig(num_sublayers=1, layers="1"), CALIB, runtime=QUIET)
    r2 = pare.prune(model, pare.LayersConfig(layers="1"), runtime=QUIET)
    out = pare.save(model, None, tmp_path / "m", [r1, r2])
    assert [e["op"] for e in json.loads((out / "pare.json").read_text())["edits"]] == ["remove_layers"]
    assert torch.equal(logits(pare.load(out)), logits(model))


def test_only_the_last_report_is_refused_and_nothing_is_written(tmp_path) -> None:
    model, _, r2 = sublayer_then_layer()
    with pytest.raises(ConfigError, match=r"random values") as err:
        pare.save(model, None, tmp_path / "m", r2)
    assert HINT in str(err.value) and "self_attn" in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no output, no temporary directory


def test_refused_overwrite_leaves_the_existing_output_untouched(tmp_path) -> None:
    model, _, r2 = sublayer_then_layer()
    out = pare.save(tiny_model("llama"), None, tmp_path / "m")
    before = listing(tmp_path)
    with pytest.raises(ConfigError, match="Nothing was written"):
        pare.save(model, None, out, r2, overwrite=True)
    assert listing(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_no_report_on_a_non_uniform_model_is_refused(tmp_path) -> None:
    model, _, _ = sublayer_then_layer()
    with pytest.raises(ConfigError, match=r"with no report.*its config alone") as err:
        pare.save(model, None, tmp_path / "m")
    assert "pare.save(model, tok, out, report)" in str(err.value)
    assert not (tmp_path / "m").exists()


def test_reports_in_the_wrong_order_are_refused(tmp_path) -> None:
    model, r1, r2 = sublayer_then_layer()
    with pytest.raises(ConfigError, match="refusing to save"):
        pare.save(model, None, tmp_path / "m", [r2, r1])
    assert list(tmp_path.iterdir()) == []


def test_not_a_report_is_refused(tmp_path) -> None:
    model, r1, _ = sublayer_then_layer()
    with pytest.raises(ConfigError, match="list of them"):
        pare.save(model, None, tmp_path / "m", [r1, r1.to_dict()])  # type: ignore[list-item]


def test_two_layer_removals_stay_uniform_and_load_with_from_pretrained(tmp_path) -> None:
    model = tiny_model("llama", num_hidden_layers=4)
    r1 = pare.prune(model, pare.LayersConfig(layers="0"), runtime=QUIET)
    r2 = pare.prune(model, pare.LayersConfig(layers="1"), runtime=QUIET)  # original layer 2
    out = pare.save(model, None, tmp_path / "m", [r1, r2])
    manifest = json.loads((out / "pare.json").read_text())
    assert manifest["uniform"] is True
    (cut,) = manifest["edits"]
    assert cut["kept"] == [1, 3] and cut["removed"] == [0, 2] and cut["num_layers_before"] == 4
    ref = logits(model)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out)), ref)
    assert torch.equal(logits(pare.load(out)), ref)
    # the config alone describes the result: the last report (or none) is enough here
    assert torch.equal(logits(pare.load(pare.save(model, None, tmp_path / "last", r2))), ref)


def test_single_report_manifest_unchanged(tmp_path) -> None:
    model = tiny_model("llama")
    report = pare.prune(model, pare.LayersConfig(layers="1"), runtime=QUIET)
    one = pare.save(model, None, tmp_path / "one", report)
    listed = pare.save(model, None, tmp_path / "listed", [report])
    expected = json.loads(json.dumps(report.to_dict(), default=str))
    assert json.loads((one / "pare.json").read_text()) == expected
    assert json.loads((listed / "pare.json").read_text()) == expected


@pytest.mark.parametrize(("model_type", "attn_ratio"), [("llama", 0.0), ("gpt2", 0.5)])
def test_osscar_then_ppl_window_as_in_the_readme(model_type: str, attn_ratio: float, tmp_path) -> None:
    """llama: both cuts uniform; GPT-2 with heads cut: osscar is non-uniform (heads x head_dim != hidden)."""
    model = tiny_model(model_type, num_hidden_layers=4)
    r1 = pare.prune(model, pare.OsscarConfig(mlp_ratio=0.5, attn_ratio=attn_ratio, max_swaps=2), CALIB,
                    runtime=QUIET)
    r2 = pare.prune(model, pare.PplWindowConfig(num_layers=1), CALIB, runtime=QUIET)
    assert r1.uniform is (attn_ratio == 0.0)
    out = pare.save(model, None, tmp_path / "m", [r1, r2])
    assert torch.equal(logits(pare.load(out)), logits(model))
    if not r1.uniform:
        with pytest.raises(ConfigError, match="shape"):
            pare.save(model, None, tmp_path / "last", r2)
        assert not (tmp_path / "last").exists()


def test_load_refuses_a_manifest_that_misses_edits(tmp_path) -> None:
    model, r1, r2 = sublayer_then_layer()
    out = pare.save(model, None, tmp_path / "m", [r1, r2])
    manifest = json.loads((out / "pare.json").read_text())
    # what an older pare wrote with the last report only
    manifest.update(uniform=True, edits=[e.to_dict() for e in r2.edits])
    (out / "pare.json").write_text(json.dumps(manifest))
    with pytest.raises(PareError, match=r"missing 4 weight\(s\).*self_attn.*random weights") as err:
        pare.load(out)
    assert HINT in str(err.value)


def test_load_of_a_plain_directory_still_works(tmp_path, caplog) -> None:
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "plain")
    assert torch.equal(logits(pare.load(tmp_path / "plain")), logits(model))
    tied = tiny_model("qwen2", tie_word_embeddings=True)
    tied.save_pretrained(tmp_path / "tied")
    assert torch.equal(logits(pare.load(tmp_path / "tied")), logits(tied))
    # no manifest: not pare's to judge; the missing weights are logged (transformers warns too)
    model, _, _ = sublayer_then_layer()
    model.save_pretrained(tmp_path / "bare")
    with caplog.at_level("WARNING", logger="pare.io.load"):
        pare.load(tmp_path / "bare")
    assert "missing 4 weight(s)" in caplog.text


def test_a_chain_that_ends_uniform_reloads_from_its_config(tmp_path) -> None:
    """depth -> global width (non-uniform MLPs) -> depth -> OSSCAR (one MLP width again): the final
    config describes the model, so the manifest is uniform; replaying the earlier edits on that
    config could not work."""
    model = tiny_model("llama", num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
    ids = tiny_batch(8, 32, seed=1)
    configs = (pare.PplWindowConfig(num_layers=1),
               pare.WidthConfig(pruning_ratio=0.25, importance="taylor", allocation="global"),
               pare.LayersConfig(layers="1"), pare.OsscarConfig(mlp_ratio=0.5))
    reports = [pare.prune(model, cfg, ids, runtime=QUIET) for cfg in configs]
    assert not reports[1].uniform
    out = pare.save(model, None, tmp_path / "chain", reports)
    assert json.loads((out / "pare.json").read_text())["uniform"] is True
    probe = tiny_batch(1, 16, seed=9)
    with torch.no_grad():
        assert torch.allclose(pare.load(out)(probe).logits, model(probe).logits, atol=1e-5)
        assert torch.allclose(AutoModelForCausalLM.from_pretrained(out)(probe).logits, model(probe).logits, atol=1e-5)
