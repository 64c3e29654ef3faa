"""``pare inspect`` lists a vision tower's roles; ``pare prune --component vision`` cuts it from images."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText

from pare.cli import main
from tiny import tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from tiny_configs import VOCAB, build, tiny_config


@pytest.fixture
def llava_dir(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-llava"
    build(AutoModelForImageTextToText, tiny_config("llava")).save_pretrained(path)
    tiny_tokenizer(VOCAB).save_pretrained(path)
    return path


def test_inspect_lists_the_vision_towers_roles(llava_dir: Path, capsys) -> None:
    assert main(["inspect", str(llava_dir)]) == 0
    out = capsys.readouterr().out
    assert "vision tower (--component vision): 4 layers at model.vision_tower.encoder.layers" in out
    assert "mlp mlp.fc1, mlp.fc2 (width 128)" in out and "remapped by a depth cut: vision_feature_layer" in out
    assert "not cut: hidden size 64: the output channels of the patch embedding convolution" in out
    assert main(["inspect", str(llava_dir), "--component", "vision", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["component"] == "vision" and data["layers_path"] == "model.vision_tower.encoder.layers"
    assert [layer["mlp"] for layer in data["layers"]] == [128] * 4 and data["vision"]["heads"] == 4


def test_prune_component_vision_from_images_reloads(llava_dir: Path, tmp_path: Path, capsys) -> None:
    images = tmp_path / "images.safetensors"
    save_file({"pixel_values": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))}, images)
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(llava_dir), "--method", "width", "--pruning-ratio", "0.5", "--no-hidden",
                 "--no-heads", "--importance", "activation", "--component", "vision", "--images", str(images),
                 "--out", str(out), "--no-progress"]) == 0
    manifest = json.loads((out / "pare.json").read_text())
    assert manifest["arch_override"] == {"component": "vision"} and manifest["uniform"]
    assert manifest["calibration"] == {"nsamples": 4, "images": "tensor", "size": [32, 32]}
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert model.config.vision_config.intermediate_size == 64
    assert model.model.vision_tower.encoder.layers[0].mlp.fc1.weight.shape == (64, 64)
    capsys.readouterr()


def test_vision_options_out_of_place_are_errors(llava_dir: Path, tmp_path: Path, capsys) -> None:
    images = tmp_path / "images.safetensors"
    save_file({"pixels": torch.zeros(1, 3, 32, 32)}, images)
    base = ["prune", "--model", str(llava_dir), "--method", "magnitude", "--no-save", "--no-progress"]
    assert main([*base, "--images", str(images)]) == 2
    assert "--images calibrates a vision tower: add --component vision" in capsys.readouterr().err
    assert main([*base, "--method", "wanda", "--component", "vision", "--images", str(images)]) == 2
    assert "holds ['pixels'], not 'pixel_values'" in capsys.readouterr().err
    assert main([*base, "--component", "vision", "--stream"]) == 2
    assert "drop --stream" in capsys.readouterr().err
