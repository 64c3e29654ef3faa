"""Corrupt, tampered and odd input: a one-line error, exit code 2, and nothing written."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import T5Config

import pare
from pare.cli import main
from pare.errors import CorruptFileError, NotCausalLMError, PareError


def _error(capsys, argv: list[str]) -> str:
    capsys.readouterr()  # what earlier steps printed
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def _usage_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def _prune(model: Path, *extra: str) -> list[str]:
    return ["prune", "--model", str(model), "--method", "magnitude", "--no-progress", *extra]


def test_binary_calibration_file(model_dir: Path, tmp_path: Path, capsys) -> None:
    binary = tmp_path / "calib.txt"
    binary.write_bytes(bytes(range(256)) * 40)
    out = tmp_path / "out"
    err = _error(capsys, ["prune", "--model", str(model_dir), "--method", "wanda", "--calib", str(binary),
                          "--nsamples", "2", "--seqlen", "16", "--no-progress", "--out", str(out)])
    assert "not UTF-8 text" in err and str(binary) in err
    assert not out.exists()


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def test_truncated_weights_for_prune_eval_and_load(model_dir: Path, tmp_path: Path, capsys) -> None:
    saved = tmp_path / "saved"
    assert main(_prune(model_dir, "--out", str(saved))) == 0
    capsys.readouterr()
    _truncate(model_dir / "model.safetensors")
    _truncate(saved / "model.safetensors")
    out = tmp_path / "out"
    assert "damaged or truncated" in _error(capsys, _prune(model_dir, "--out", str(out)))
    assert not out.exists()
    assert "damaged or truncated" in _error(capsys, ["eval", str(model_dir), "--ppl", "none", "--no-speed"])
    assert "damaged or truncated" in _error(capsys, ["eval", str(saved), "--ppl", "none", "--no-speed"])
    with pytest.raises(CorruptFileError, match="damaged or truncated"):
        pare.load(saved)


def test_full_disk_during_save_removes_the_partial_files(model_dir: Path, tmp_path: Path, monkeypatch,
                                                         capsys) -> None:
    import transformers.modeling_utils

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)  # a partial shard, as a disk filling up leaves
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    parent = tmp_path / "outputs"
    parent.mkdir()
    err = _error(capsys, _prune(model_dir, "--out", str(parent / "pruned")))
    assert "no space left" in err and "nothing was written" in err
    assert list(parent.iterdir()) == []  # neither the output nor a temporary directory


def test_config_file_sections_must_be_mappings(model_dir: Path, tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("calibration: c4\n")
    err = _error(capsys, _prune(model_dir, "--config", str(cfg)))
    assert "'calibration' must be a mapping" in err and "calib: c4" in err
    cfg.write_text("runtime: cpu\n")
    assert "'runtime' must be a mapping" in _error(capsys, _prune(model_dir, "--config", str(cfg)))


def test_a_closed_pipe_ends_quietly() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "pare", "methods"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=os.environ.copy())
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader goes away before pare writes a line, as `pare methods | head -0`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == ""


# --------------------------------------------------------------------------- tampered pare.json
def _with_manifest(model_dir: Path, edits: list) -> Path:
    (model_dir / "pare.json").write_text(json.dumps({"version": 1, "method": "width", "uniform": False,
                                                     "edits": edits}))
    return model_dir


GOOD_SUBLAYER = {"op": "remove_sublayer", "layer": 0, "part": "attention", "layers_path": "model.layers",
                 "path": "self_attn", "num_kv_heads": 2, "head_dim": 16}


@pytest.mark.parametrize(("edit", "message"), [
    ({"op": "mlp_channels", "layer": 3, "width": 48}, "'layer' is 3, outside 0..2"),
    ({"op": "mlp_channels", "layer": -1, "width": 48}, "'layer' is -1, outside 0..2"),
    ({"op": "mlp_channels", "layer": 0, "width": 10**12}, "outside 1.."),
    ({"op": "mlp_channels", "layer": 0, "width": 0}, "'width' is 0"),
    ({"op": "mlp_channels", "layer": "0", "width": 48}, "'layer' must be an integer"),
    ({"op": "mlp_channels", "layer": 0.0, "width": 48}, "'layer' must be an integer"),
    ({"op": "heads", "layer": 0, "num_heads": 4, "num_kv_heads": True}, "'num_kv_heads' must be an integer"),
    ({"op": "heads", "layer": 0, "num_heads": 400, "num_kv_heads": 2}, "'num_heads' is 400"),
    ({"op": "hidden", "width": 10**9}, "'width' is 1000000000"),
    ({**GOOD_SUBLAYER, "path": "__class__"}, "'path' must be a module path"),
    ({**GOOD_SUBLAYER, "path": "self_attn.__dict__"}, "'path' must be a module path"),
    ({**GOOD_SUBLAYER, "path": "../x"}, "'path' must be a module path"),
    ({**GOOD_SUBLAYER, "layers_path": "model.__class__.__init__"}, "'layers_path' must be a module path"),
    ({**GOOD_SUBLAYER, "head_dim": 2**40}, "'head_dim' is"),
    ({"op": "remove_layers", "layers_path": "model.layers", "num_layers_before": 3, "kept": [0, 7],
      "removed": [1, 2]}, "'kept' must hold distinct increasing indices in 0..2"),
    ({"op": "remove_layers", "layers_path": "model.layers", "num_layers_before": 3, "kept": [0],
      "removed": [1]}, "'kept' and 'removed' must split the 3 layers"),
    ({"op": "bogus"}, "'bogus' is not one this version of pare knows"),
    ("mlp_channels", "an edit must be an object"),
])
def test_tampered_manifest_edits_are_refused_before_building(model_dir: Path, edit, message: str,
                                                             monkeypatch, capsys) -> None:
    _with_manifest(model_dir, [edit])
    built = []
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_config", lambda *a, **k: built.append(a))
    with pytest.raises(CorruptFileError, match=message.replace("(", r"\(").replace(".", r"\.")):
        pare.load(model_dir)
    assert built == []  # refused before any model was built
    err = _error(capsys, ["inspect", str(model_dir)])
    assert "pare.json, edit 0" in err and "restore the pare.json" in err


def test_a_well_formed_manifest_still_loads(model_dir: Path) -> None:
    _with_manifest(model_dir, [{"op": "mlp_channels", "layer": i, "width": 96, "shared_width": None}
                               for i in range(3)])
    assert pare.load(model_dir).model.layers[2].mlp.down_proj.weight.shape == (64, 96)


def test_tampered_history_edits_are_refused(model_dir: Path) -> None:
    (model_dir / "pare.json").write_text(json.dumps({"version": 1, "uniform": True, "edits": [], "history": [
        {"method": "sublayer", "edits": [{**GOOD_SUBLAYER, "path": "__class__"}]}]}))
    with pytest.raises(CorruptFileError, match="history 0, edit 0"):
        pare.load(model_dir)


# --------------------------------------------------------------------------- weight index
def _shard_elsewhere(model_dir: Path, name: str) -> Path:
    """Move the weights beside the model directory and write an index that names ``name`` for all of them."""
    outside = model_dir.parent / "outside.safetensors"
    shutil.move(model_dir / "model.safetensors", outside)
    from safetensors import safe_open

    with safe_open(str(outside), "pt") as f:
        keys = list(f.keys())
    (model_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": dict.fromkeys(keys, name)}))
    return outside


@pytest.mark.parametrize("kind", ["relative", "absolute", "symlink"])
def test_index_entries_outside_the_model_directory_are_refused(model_dir: Path, tmp_path: Path, kind: str,
                                                               monkeypatch, capsys) -> None:
    outside = model_dir.parent / "outside.safetensors"
    name = {"relative": "../outside.safetensors", "absolute": str(outside), "symlink": "shard.safetensors"}[kind]
    _shard_elsewhere(model_dir, name)
    if kind == "symlink":
        (model_dir / "shard.safetensors").symlink_to(outside)
    out = tmp_path / "out"
    assert "outside the model directory" in _error(capsys, _prune(model_dir, "--out", str(out)))
    assert not out.exists()
    assert "outside the model directory" in _error(capsys, ["eval", str(model_dir), "--ppl", "none", "--no-speed"])
    (model_dir / "pare.json").write_text(json.dumps({"version": 1, "uniform": True}))
    opened = []
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: opened.append(a))
    with pytest.raises(CorruptFileError, match="outside the model directory"):
        pare.load(model_dir)
    assert opened == []


def test_shards_inside_the_directory_load(model_dir: Path) -> None:
    _shard_elsewhere(model_dir, "shard.safetensors")
    shutil.move(model_dir.parent / "outside.safetensors", model_dir / "shard.safetensors")
    model, _ = pare.load_model(str(model_dir))
    assert model.model.layers[0].mlp.up_proj.weight.shape == (96, 64)


# --------------------------------------------------------------------------- NaN / inf weights
def _poison(model_dir: Path, value: float, dtype: torch.dtype = torch.float32) -> None:
    model = pare.load_model(str(model_dir))[0]
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = value
    model.to(dtype).save_pretrained(model_dir)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_data_free_methods_refuse_non_finite_weights(model_dir: Path, tmp_path: Path, value: float,
                                                     capsys) -> None:
    _poison(model_dir, value)
    out = tmp_path / "out"
    err = _error(capsys, _prune(model_dir, "--out", str(out)))
    assert "model.layers.1.mlp.down_proj: its weights hold NaN or inf" in err and "float16" not in err
    err = _error(capsys, ["prune", "--model", str(model_dir), "--method", "width", "--pruning-ratio", "0.5",
                          "--no-progress", "--out", str(out)])
    assert "down_proj: its weights hold NaN or inf" in err
    assert not out.exists()


def test_the_overflow_hint_names_float16_only_for_float16_models() -> None:
    from pare.ops.sparsegpt import inverse_hessian_factor

    h = torch.eye(4)
    h[1, 1] = float("inf")
    with pytest.raises(PareError) as fp32:
        inverse_hessian_factor(h, 0.01, torch.float32)
    assert "float16" not in str(fp32.value) and "NaN or inf" in str(fp32.value)
    with pytest.raises(PareError, match="a float16 model overflows"):
        inverse_hessian_factor(h, 0.01, torch.float16)


# --------------------------------------------------------------------------- options and defaults
@pytest.mark.parametrize("argv", [
    ["--eval-seqlen", "0"], ["--eval-batch-size", "0"], ["--eval-max-windows", "0"], ["--max_seq_len", "0"],
])
def test_zero_for_a_prune_option_with_a_default_is_refused(model_dir: Path, text_file: Path, argv: list[str],
                                                           capsys) -> None:
    err = _usage_error(capsys, [*_prune(model_dir, "--eval", str(text_file)), *argv])
    assert f"argument {argv[0]}: must be a positive integer" in err


@pytest.mark.parametrize("argv", [["--seqlen", "0"], ["--batch-size", "0"], ["--max-windows", "0"],
                                  ["--seqlen", "x"]])
def test_zero_for_an_eval_option_is_refused(model_dir: Path, argv: list[str], capsys) -> None:
    argv = ["eval", str(model_dir), "--ppl", "none", "--no-speed", *argv]  # today's zero ran a whole evaluation
    assert "must be a positive integer" in _usage_error(capsys, argv)


def test_prune_fits_the_calibration_window_to_a_short_context(model_dir: Path, text_file: Path, tmp_path: Path,
                                                              capsys) -> None:
    out = tmp_path / "wanda"  # the tiny model's context is 256 tokens, shorter than the default 2048
    assert main(["prune", "--model", str(model_dir), "--method", "wanda", "--calib", str(text_file),
                 "--nsamples", "2", "--no-progress", "--out", str(out)]) == 0
    assert json.loads((out / "pare.json").read_text())["calibration"]["seqlen"] == 256
    cfg = tmp_path / "cfg.yaml"  # a window chosen in a config file is kept
    cfg.write_text("calibration: {seqlen: 64}\n")
    assert main(["prune", "--model", str(model_dir), "--method", "wanda", "--calib", str(text_file),
                 "--nsamples", "2", "--no-progress", "--out", str(tmp_path / "w64"), "--config", str(cfg)]) == 0
    assert json.loads((tmp_path / "w64" / "pare.json").read_text())["calibration"]["seqlen"] == 64
    capsys.readouterr()
    # a data-free method never builds calibration windows: an unreadable --calib does not matter,
    # and the evaluation window defaults to the context as well
    assert main([*_prune(model_dir, "--calib", str(tmp_path / "missing.txt"), "--eval", str(text_file),
                         "--no-speed", "--json", "--eval-max-windows", "1", "--no-save")]) == 0
    assert json.loads(capsys.readouterr().out)["figures"]["seqlen_after"] == 256


# --------------------------------------------------------------------------- messages
def test_a_non_causal_model_is_named_as_such(tmp_path: Path, capsys) -> None:
    t5 = tmp_path / "t5"
    T5Config(vocab_size=128, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2).save_pretrained(t5)
    for argv in (_prune(t5, "--no-save"), ["eval", str(t5)], ["inspect", str(t5)]):
        err = _error(capsys, argv)
        assert "not a causal LM" in err and "no loadable config" not in err
    with pytest.raises(NotCausalLMError, match="t5 model"):
        pare.load(t5)


def test_option_lists_hold_no_class_variables(model_dir: Path, tmp_path: Path, capsys) -> None:
    err = _error(capsys, [*_prune(model_dir), "--layers", "1"])
    assert "its options are" in err and "'--method'" not in err and "'--sparsity'" in err
    assert main(["methods"]) == 0
    assert not [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("--method")]
