"""Vision-language models: pare prunes the text decoder only; the vision tower and projector stay
bit-identical, and the saved model reloads with ``AutoModelForImageTextToText`` and still answers an
image + text prompt. Tiny random models from ``bench/tiny_configs.py`` (calibration from text)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForImageTextToText

import pare
from pare.arch import describe

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from tiny_configs import build, tiny_config

RUNTIME = pare.RuntimeConfig(device="cpu", progress=False)


def _text(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 200, (n, 16), generator=torch.Generator().manual_seed(seed))


def _prompt(image_token: int, count: int) -> torch.Tensor:
    text = _text(1, seed=1)[0]
    return torch.cat([text[:3], torch.full((count,), image_token), text[3:9]])[None]


def _llava_like(config: Any, count: int) -> dict[str, torch.Tensor]:
    size = config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    return {"input_ids": _prompt(config.image_token_id, count), "pixel_values": pixels}


def _llava(config: Any) -> dict[str, torch.Tensor]:
    v = config.vision_config
    return _llava_like(config, (v.image_size // v.patch_size) ** 2)


def _gemma3(config: Any) -> dict[str, torch.Tensor]:
    return _llava_like(config, config.mm_tokens_per_image)


def _smolvlm(config: Any) -> dict[str, torch.Tensor]:
    v = config.vision_config
    count = (v.image_size // v.patch_size) ** 2 // config.scale_factor**2
    inputs = _llava_like(config, count)
    inputs["pixel_values"] = inputs["pixel_values"][:, None]  # [batch, images, C, H, W]
    return inputs


def _qwen2_vl(config: Any) -> dict[str, torch.Tensor]:
    v = config.vision_config
    grid = torch.tensor([[1, 4, 4]])  # t, h, w patches: 16 patches, merged 2x2 into 4 tokens
    dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
    pixels = torch.randn(16, dim, generator=torch.Generator().manual_seed(2))
    ids = _prompt(config.image_token_id, 16 // v.spatial_merge_size**2)
    return {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": grid,
            "mm_token_type_ids": (ids == config.image_token_id).long()}


FAMILIES = {"llava": _llava, "gemma3": _gemma3, "smolvlm": _smolvlm, "idefics3": _smolvlm, "qwen2_vl": _qwen2_vl,
            "qwen2_5_vl": _qwen2_vl}


def _outside_decoder(model: torch.nn.Module, layers_path: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(layers_path + ".")
            and "language_model" not in k and "text_model" not in k and "lm_head" not in k}


def _image_features(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    kwargs = {k: v for k, v in inputs.items() if k not in ("input_ids", "mm_token_type_ids")}
    with torch.no_grad():
        out = model.get_image_features(**kwargs)
    first = out if isinstance(out, torch.Tensor) else getattr(out, "pooler_output", None)
    if first is None:
        first = out[0]
    if isinstance(first, (tuple, list)):
        first = torch.cat([t.flatten() for t in first])
    return first


FAST = {("llava", "wanda"), ("qwen2_vl", "shortgpt")}
"""In ``make test``; the other cases run with ``make test-matrix``."""
CASES = [
    c if c in FAST else pytest.param(*c, marks=pytest.mark.matrix)
    for c in [(f, "wanda") for f in sorted(FAMILIES)] + [("llava", "shortgpt"), ("qwen2_vl", "shortgpt"),
                                                        ("gemma3", "shortgpt")]
]


@pytest.mark.parametrize(("family", "method"), CASES)
def test_text_decoder_pruned_vision_untouched_and_reload_answers_images(family: str, method: str,
                                                                         tmp_path: Path) -> None:
    config = tiny_config(family)
    model = build(AutoModelForImageTextToText, config)
    inputs = FAMILIES[family](model.config)
    arch = describe(model)
    assert "vision" not in arch.layers_path and "visual" not in arch.layers_path
    vision_before = _image_features(model, inputs)
    outside = _outside_decoder(model, arch.layers_path)
    cfg = pare.WandaConfig(sparsity=0.5) if method == "wanda" else pare.ShortGPTConfig(num_layers=1)
    report = pare.prune(model, cfg, _text(4), runtime=RUNTIME, batch_size=2)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in outside.items())  # vision tower, projector, embeddings
    assert torch.equal(_image_features(model, inputs), vision_before)
    if method == "shortgpt":
        assert model.config.get_text_config().num_hidden_layers == arch.num_layers - 1
    with torch.no_grad():
        want = model(**inputs).logits
    pare.save(model, None, tmp_path / "out", report)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, want)
        answer = reloaded.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert answer.shape[1] == inputs["input_ids"].shape[1] + 3
    assert torch.equal(_image_features(reloaded, inputs), vision_before)
    assert torch.equal(pare.load(tmp_path / "out")(**inputs).logits, want)
