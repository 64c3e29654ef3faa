"""``pare prune --stream``: the same model as without it, and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from pare.cli import main


def _error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    return capsys.readouterr().err


def test_stream_flag_gives_the_in_memory_model(model_dir: Path, text_file: Path, tmp_path: Path, capsys) -> None:
    common = ["--model", str(model_dir), "--method", "sparsegpt", "--sparsity", "0.5", "--calib", str(text_file),
              "--seqlen", "16", "--nsamples", "8", "--batch-size", "4", "--no-progress"]
    assert main(["prune", *common, "--out", str(tmp_path / "mem")]) == 0
    capsys.readouterr()
    assert main(["prune", *common, "--out", str(tmp_path / "st"), "--stream", "--max-memory", "4GiB",
                 "--activations", "disk", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["runtime"]["stream"]["activations"] == "disk"
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "mem").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "st").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "st" / "tokenizer.json").is_file() or (tmp_path / "st" / "tokenizer_config.json").is_file()
    manifest = json.loads((tmp_path / "st" / "pare.json").read_text())
    assert manifest["figures"]["size_on_disk_bytes_before"] > 0


def test_stream_refusals(model_dir: Path, text_file: Path, tmp_path: Path, capsys) -> None:
    base = ["prune", "--model", str(model_dir), "--method", "wanda", "--calib", str(text_file), "--seqlen", "16",
            "--nsamples", "8", "--no-progress"]
    assert "add --stream" in _error(capsys, [*base, "--resume", "--out", str(tmp_path / "o")])
    assert "pass --out" in _error(capsys, [*base, "--stream", "--no-save"])
    assert "pare eval" in _error(capsys, [*base, "--stream", "--eval", str(text_file), "--out", str(tmp_path / "o")])
    err = _error(capsys, [*base, "--stream", "--max-memory", "2MB", "--out", str(tmp_path / "o")])
    assert "not enough RAM" in err and "largest decoder layer" in err
    err = _error(capsys, ["prune", "--model", str(model_dir), "--method", "shortgpt", "--num-layers", "1", "--calib",
                          str(text_file), "--seqlen", "16", "--stream", "--out", str(tmp_path / "o")])
    assert "cannot stream" in err
    assert not (tmp_path / "o").exists()


def _recipe(tmp_path: Path, model_dir: Path, text_file: Path, stages: list) -> Path:
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"model": str(model_dir), "stages": stages, "calibration": {
        "dataset": str(text_file), "seqlen": 16, "nsamples": 8, "batch_size": 4}}))
    return recipe


def test_run_recipe_stream_gives_the_in_memory_model(model_dir: Path, text_file: Path, tmp_path: Path,
                                                     capsys) -> None:
    recipe = _recipe(tmp_path, model_dir, text_file, [{"sparsegpt": {"sparsity": 0.5}},
                                                     {"quantize": {"scheme": "int4", "group_size": 32}}])
    assert main(["run", str(recipe), "--out", str(tmp_path / "mem"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["run", str(recipe), "--out", str(tmp_path / "st"), "--no-progress", "--stream", "--activations",
                 "disk", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [s["method"] for s in shown["stages"]] == ["sparsegpt", "quantize"]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "mem").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "st").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    manifest = json.loads((tmp_path / "st" / "pare.json").read_text())
    assert [s["method"] for s in manifest["stages"]] == ["sparsegpt", "quantize"]


def test_run_recipe_stream_refuses_a_whole_model_stage(model_dir: Path, text_file: Path, tmp_path: Path,
                                                       capsys) -> None:
    recipe = _recipe(tmp_path, model_dir, text_file, [{"wanda": {}}, {"shortgpt": {"num_layers": 1}}])
    err = _error(capsys, ["run", str(recipe), "--out", str(tmp_path / "o"), "--stream"])
    assert "stage 2 (shortgpt) cannot stream" in err and "iB of weights" in err
    assert not (tmp_path / "o").exists()
