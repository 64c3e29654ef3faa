"""Vision-tower pruning (``component="vision"``): weight sparsity, MLP width, attention heads and depth of the
vision encoder layers of SigLIP / CLIP towers (LLaVA with either, Gemma 3, Idefics3, SmolVLM) and Qwen-VL towers;
the text decoder stays bit-identical, the saved model reloads with ``AutoModelForImageTextToText`` (with
``pare.load`` after a head cut, which the config cannot state) and answers an image + text prompt; cuts that
would break a patch embedding, a position table, a head layout or a layer index read from outside the tower
are refused before any work. Tiny random models from
``bench/tiny_configs.py``."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForImageTextToText

import pare
from pare.arch import ArchOverride, describe
from pare.arch.surgery.vision import remap_feature_layer
from pare.calibration.images import patchify
from pare.errors import ConfigError, UnsupportedArchitectureError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_multimodal import FAMILIES

from tiny_configs import build, tiny_config

RUNTIME = pare.RuntimeConfig(device="cpu", progress=False)
VISION = ArchOverride(component="vision")

VISION_FAMILIES = ("llava", "llava_siglip", "gemma3", "smolvlm", "idefics3", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
PROMPTS = {"llava_siglip": "llava", "qwen3_vl": "qwen2_vl"}
"""Families whose image + text prompt is built as another's."""


def _config(family: str, **vision: Any) -> Any:
    config = tiny_config("llava" if family == "llava_siglip" else family)
    if family == "llava_siglip":  # LLaVA with a SigLIP tower (no CLS token: every patch is a feature)
        from transformers import SiglipVisionConfig

        config.vision_feature_select_strategy = "full"
        config.vision_config = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                                  num_attention_heads=4, image_size=32, patch_size=8,
                                                  vision_use_head=False)
    v = config.vision_config
    if family == "gemma3":
        v.vision_use_head = False  # as Gemma 3's checkpoints: no attention-pooling head
    if family == "qwen2_5_vl":
        v.fullatt_block_indexes = [1]  # the default names blocks past the tiny depth
    if family == "qwen3_vl":
        v.deepstack_visual_indexes = [0]
    for key, value in vision.items():
        setattr(v, key, value)
    return config


def _model(family: str, **vision: Any) -> Any:
    return build(AutoModelForImageTextToText, _config(family, **vision))


def _inputs(model: Any, family: str) -> dict[str, torch.Tensor]:
    return FAMILIES[PROMPTS.get(family, family)](model.config)


def _text_part(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()
            if "language_model" in k or "text_model" in k or "lm_head" in k}


def _reloads_the_same(model: Any, report: pare.Report, inputs: dict[str, torch.Tensor],
                      path: Path) -> tuple[Any, torch.Tensor]:
    """Save, reload with ``AutoModelForImageTextToText``: (the reloaded model, the logits both give)."""
    with torch.no_grad():
        want = model(**inputs).logits
    pare.save(model, None, path, report)
    reloaded = AutoModelForImageTextToText.from_pretrained(path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, want)
    return reloaded, want


def _stage(method: str) -> pare.PruneConfig:
    return {"wanda": pare.WandaConfig(sparsity=0.5),
            "magnitude": pare.MagnitudeConfig(sparsity=0.5),
            "width": pare.WidthConfig(pruning_ratio=0.5, hidden=False, heads=False, importance="activation"),
            "shortgpt": pare.ShortGPTConfig(num_layers=1),
            "angular": pare.AngularConfig(num_layers=1)}[method]


FAST = {("llava", "width"), ("llava_siglip", "angular"), ("gemma3", "shortgpt"), ("smolvlm", "wanda"),
        ("idefics3", "width"), ("qwen2_vl", "width"), ("qwen2_5_vl", "shortgpt"), ("qwen3_vl", "wanda")}
"""One method per family in ``make test``; the rest with ``make test-matrix``."""
CASES = [c if c in FAST else pytest.param(*c, marks=pytest.mark.matrix)
         for c in [(f, m) for f in VISION_FAMILIES for m in ("wanda", "width", "shortgpt", "angular", "magnitude")]]


@pytest.mark.parametrize(("family", "method"), CASES)
def test_vision_cut_keeps_the_decoder_and_reloads_with_the_auto_class(family: str, method: str,
                                                                      tmp_path: Path) -> None:
    model = _model(family)
    inputs = _inputs(model, family)
    arch = describe(model, VISION)
    width, layers = arch.mlp_width(model, 0), arch.num_layers
    text = _text_part(model)
    with torch.no_grad():
        dense = model(**inputs).logits
    report = pare.prune(model, _stage(method), None, runtime=RUNTIME, batch_size=2, component="vision")
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in text.items())  # the decoder, embeddings and lm_head
    assert report.uniform
    assert (report.calibration is None) == (method == "magnitude")  # random images, recorded
    cut = describe(model, VISION)
    vc = model.config.vision_config
    if method == "width":
        assert cut.mlp_width(model, 0) == width // 2
        assert all(cut.mlp_width(model, r.index) == width // 2 for r in cut.layers)
    if method in ("shortgpt", "angular"):
        assert cut.num_layers == layers - 1 and getattr(vc, cut.fields.layers) == layers - 1
    if method in ("wanda", "magnitude"):
        first = cut.layer_modules(model)[0].get_submodule(cut.layers[0].mlp.down.path).weight
        assert float((first == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
    reloaded, want = _reloads_the_same(model, report, inputs, tmp_path / "out")
    if not family.startswith("llava") or method not in ("shortgpt", "angular"):  # LLaVA never reads its last layer
        assert not torch.equal(want, dense)  # the tower's cut reaches the answer
    with torch.no_grad():
        answer = reloaded.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert answer.shape[1] == inputs["input_ids"].shape[1] + 3
    assert torch.equal(pare.load(tmp_path / "out")(**inputs).logits, want)


def _attention(model: Any) -> list[tuple[Any, Any]]:
    """Per vision layer: (the attention module, its output projection)."""
    arch = describe(model, VISION)
    out = []
    for r, layer in zip(arch.layers, arch.layer_modules(model), strict=True):
        out.append((layer.get_submodule(r.attention.path), layer.get_submodule(r.attention.o.path)))
    return out


def _kept_heads(dense_o: torch.Tensor, cut_o: torch.Tensor, head_dim: int) -> list[int]:
    """Which dense heads the cut output projection's column blocks are (matched by their weights)."""
    dense = dense_o.reshape(dense_o.shape[0], -1, head_dim).transpose(0, 1)
    cut = cut_o.reshape(cut_o.shape[0], -1, head_dim).transpose(0, 1)
    return [next(h for h in range(len(dense)) if torch.equal(dense[h], c)) for c in cut]


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_vision_head_cut_is_masking_the_heads_and_reloads_with_pare_load(family: str, tmp_path: Path) -> None:
    """Half the heads of every vision layer go: the pruned model answers as the dense one with those heads'
    output columns zeroed; the config keeps the dense head count, so only ``pare.load`` rebuilds it (plain
    ``from_pretrained`` refuses the shapes), with the same logits and a bit-identical text decoder."""
    model = _model(family)
    inputs = _inputs(model, family)
    masked = copy.deepcopy(model)
    dense_o = [o.weight.detach().clone() for _, o in _attention(model)]
    text = _text_part(model)
    vc, heads_field = model.config.vision_config, describe(model, VISION).fields.heads
    stated = getattr(vc, heads_field)
    report = pare.prune(model, pare.WidthConfig(pruning_ratio=0.5, hidden=False, mlp=False, importance="activation"),
                        None, runtime=RUNTIME, batch_size=2, component="vision")
    assert not report.uniform and [e.op for e in report.edits] == ["heads"] * len(dense_o)
    arch = describe(model, VISION)
    assert [r.attention.num_heads for r in arch.layers] == [stated // 2] * arch.num_layers
    assert getattr(vc, heads_field) == stated  # the config keeps the dense count
    d = arch.layers[0].attention.head_dim
    for (attn, o), (_, o_masked), before in zip(_attention(model), _attention(masked), dense_o, strict=True):
        assert attn.num_heads == stated // 2 and attn.head_dim == d
        gone = sorted(set(range(stated)) - set(_kept_heads(before, o.weight.detach(), d)))
        assert len(gone) == stated // 2
        with torch.no_grad():
            o_masked.weight[:, torch.cat([torch.arange(h * d, (h + 1) * d) for h in gone])] = 0
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in text.items())
    with torch.no_grad():
        want = model(**inputs).logits
        torch.testing.assert_close(want, masked(**inputs).logits, rtol=1e-5, atol=1e-5)
    pare.save(model, None, tmp_path / "out", report)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    reloaded = pare.load(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, want)
        answer = reloaded.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert answer.shape[1] == inputs["input_ids"].shape[1] + 3
    state = reloaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in text.items())


def test_vision_heads_and_mlp_cut_together_reload_with_pare_load(tmp_path: Path) -> None:
    model = _model("llava")
    inputs = _inputs(model, "llava")
    report = pare.prune(model, pare.WidthConfig(pruning_ratio=0.5, hidden=False, importance="flap"), None,
                        runtime=RUNTIME, batch_size=2, component="vision")
    vc = model.config.vision_config
    assert (vc.intermediate_size, vc.num_attention_heads) == (64, 4)  # the width is stated, the heads are not
    assert sorted({e.op for e in report.edits}) == ["heads", "mlp_channels"] and not report.uniform
    with torch.no_grad():
        want = model(**inputs).logits
    pare.save(model, None, tmp_path / "out", report)
    reloaded = pare.load(tmp_path / "out")
    layer = reloaded.model.vision_tower.encoder.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (32, 64) and layer.mlp.fc1.weight.shape == (64, 64)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, want)


def test_calibration_images_are_used_and_recorded() -> None:
    reports, masks = [], []
    for seed in (0, 1):
        model = _model("llava")
        images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 10))
        reports.append(pare.prune(model, pare.WandaConfig(sparsity=0.5), images, runtime=RUNTIME, batch_size=2,
                                  component="vision"))
        masks.append(model.model.vision_tower.encoder.layers[1].mlp.fc1.weight == 0)
    assert reports[0].calibration == {"nsamples": 4, "images": "tensor", "size": [32, 32]}
    assert not torch.equal(masks[0], masks[1])  # other images, other activation norms, other masks


def test_random_images_without_calibration_are_recorded() -> None:
    model = _model("qwen2_vl")
    report = pare.prune(model, pare.WandaConfig(sparsity=0.5), None, runtime=RUNTIME, component="vision")
    assert report.calibration == {"nsamples": 16, "images": "random", "seed": 0, "size": [64, 64]}


def test_unread_last_layer_of_llava_goes_without_changing_its_image_features() -> None:
    """LLaVA reads ``hidden_states[-2]``: the last layer is never read, so removing it leaves the image
    features bit-identical once ``vision_feature_layer`` follows (-2 becomes -1)."""
    model = _model("llava")
    inputs = _inputs(model, "llava")
    with torch.no_grad():
        before = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        logits = model(**inputs).logits
    pare.prune(model, pare.LayersConfig(layers="3"), component="vision")
    assert model.config.vision_feature_layer == -1
    with torch.no_grad():
        after = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        assert torch.equal(torch.cat(list(after)), torch.cat(list(before)))
        assert torch.equal(model(**inputs).logits, logits)


@pytest.mark.parametrize(("value", "kept", "n", "want"), [
    (-2, [0, 1, 2], 4, -1), (-2, [0, 2, 3], 4, -2), (-1, [0, 1, 2], 4, -1), (2, [1, 2, 3], 4, 1),
    (4, [0, 1, 3], 4, 3), (0, [1, 2, 3], 4, 0), (-5, [0, 1], 4, -3),
])
def test_feature_layer_points_at_the_same_kept_layers(value: int, kept: list[int], n: int, want: int) -> None:
    assert remap_feature_layer(value, kept, n) == want


def test_qwen2_5_full_attention_blocks_follow_a_depth_cut(tmp_path: Path) -> None:
    model = _model("qwen2_5_vl", depth=4, fullatt_block_indexes=[1, 3])
    inputs = _inputs(model, "qwen2_5_vl")
    report = pare.prune(model, pare.LayersConfig(layers="1"), component="vision")
    assert model.config.vision_config.fullatt_block_indexes == [2]
    assert model.model.visual.fullatt_block_indexes == [2]  # the copy the tower's forward reads
    reloaded, _ = _reloads_the_same(model, report, inputs, tmp_path / "out")
    assert reloaded.config.vision_config.fullatt_block_indexes == [2]


def test_qwen3_deepstack_indexes_follow_and_their_layers_are_refused(tmp_path: Path) -> None:
    model = _model("qwen3_vl", depth=4, deepstack_visual_indexes=[0, 2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"deepstack_visual_indexes=\[0, 2\].*merger without its input"):
        pare.prune(model, pare.LayersConfig(layers="2"), component="vision")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # refused before any work
    report = pare.prune(model, pare.ShortGPTConfig(num_layers=2), None, runtime=RUNTIME, component="vision")
    assert report.scores["removed_layers"] == [1, 3]
    assert model.config.vision_config.deepstack_visual_indexes == [0, 1]
    assert model.model.visual.deepstack_visual_indexes == [0, 1]
    reloaded, _ = _reloads_the_same(model, report, _inputs(model, "qwen3_vl"), tmp_path / "out")
    assert reloaded.model.visual.deepstack_visual_indexes == [0, 1]


def test_patchify_lays_out_patches_as_the_qwen2_vl_processor() -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    rows, grid = patchify(images, 8, 2, 2)
    processor = Qwen2VLImageProcessorPil()
    parts = [processor.patchify(image.numpy(), patch_size=8, merge_size=2, temporal_patch_size=2) for image in images]
    assert torch.equal(rows, torch.cat([torch.from_numpy(p) for p, _, _ in parts]))
    assert grid.tolist() == [[1, gh, gw] for _, gh, gw in parts] == [[1, 4, 6]] * 2


# --------------------------------------------------------------------------- refusals
def _refused(model: Any, stage: pare.PruneConfig, match: str, calibration: Any = None,
             error: type[Exception] = ConfigError) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        pare.prune(model, stage, calibration, runtime=RUNTIME, component="vision")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_text_model_has_no_vision_component() -> None:
    from tiny import tiny_model

    with pytest.raises(UnsupportedArchitectureError, match=r"no vision tower.*components it has: \['text'\]"):
        pare.prune(tiny_model("llama"), pare.MagnitudeConfig(), component="vision")


def test_unknown_component_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"component must be one of \['text', 'vision'\], got 'audio'"):
        pare.prune(_model("llava"), pare.MagnitudeConfig(), component="audio")


def test_mllama_vision_tower_is_refused_with_its_two_stacks() -> None:
    model = build(AutoModelForImageTextToText, tiny_config("mllama"))
    with pytest.raises(UnsupportedArchitectureError, match=r"2 encoder stacks.*intermediate_layers_indices"):
        describe(model, VISION)


@pytest.mark.parametrize(("options", "match"), [
    ({"heads": False}, r"hidden size 64: the output channels of the patch embedding convolution.*--no-hidden"),
    ({"hidden": False, "pruning_ratio": 0.3}, r"fraction 0.3 of the attention heads cannot be realised with 4 query"),
    ({"hidden": False, "heads": False, "importance": "taylor"}, r"taylor needs the language-modelling loss"),
    ({"hidden": False, "heads": False, "allocation": "global"}, r"allocation=global.*cannot state"),
])
def test_width_cuts_that_break_the_tower_are_refused(options: dict[str, Any], match: str) -> None:
    _refused(_model("llava"), pare.WidthConfig(**{"pruning_ratio": 0.5, **options}), match)


def test_width_shared_with_a_pooling_head_is_refused() -> None:
    _refused(_model("gemma3", vision_use_head=True), pare.WidthConfig(pruning_ratio=0.5, hidden=False, heads=False),
             r"intermediate_size also sizes \['model.vision_tower.head.mlp")


def test_qwen2_vl_width_must_be_a_whole_mlp_ratio() -> None:
    _refused(_model("qwen2_vl"), pare.WidthConfig(pruning_ratio=0.3, hidden=False, heads=False),
             r"keeps 179 of 256 MLP channels.*mlp_ratio.*ratios that work: \[0.75, 0.5, 0.25\]")


def test_methods_that_need_text_are_refused_naming_those_that_work() -> None:
    _refused(_model("llava"), pare.SparseGPTConfig(), r"sparsegpt do\(es\) not prune a vision tower.*wanda")


def test_angular_last_token_is_refused() -> None:
    _refused(_model("llava"), pare.AngularConfig(tokens="last"), r"tokens='last'.*use tokens='all'")


def test_text_calibration_and_wrong_images_are_refused() -> None:
    model = _model("llava")
    _refused(model, pare.WandaConfig(), r"calibrates on images", calibration=pare.CalibrationConfig())
    _refused(model, pare.WandaConfig(), r"the images are 16x16; the vision tower takes 32x32",
             calibration=torch.randn(2, 3, 16, 16))
    _refused(model, pare.WandaConfig(), r"floating tensor pixel_values", calibration=torch.zeros(2, 8).long())
