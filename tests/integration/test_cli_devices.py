"""Devices: ``--devices`` and ``--device`` checked before any work, ``pare eval --device-map`` through
accelerate; the CUDA paths run where CUDA is (and skip cleanly elsewhere)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pare
from pare.cli import main
from pare.config import RuntimeConfig
from pare.errors import ConfigError

CUDA = torch.cuda.is_available()


def _error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    return capsys.readouterr().err


def test_devices_are_parsed_from_commas_or_spaces() -> None:
    assert RuntimeConfig(devices=("cpu",)).devices == ("cpu",)
    assert RuntimeConfig(devices=("cuda:0,cuda:1",)).devices == ("cuda:0", "cuda:1")
    assert RuntimeConfig(devices=("cuda:0", "cuda:1")).devices == ("cuda:0", "cuda:1")
    assert RuntimeConfig(devices=("cpu",)).compute_device() == torch.device("cpu")


@pytest.mark.parametrize(("devices", "device", "says"), [
    (("npu-x",), None, "not a device name"),
    (("cpu", "cpu"), None, "lists a device twice"),
    (("cpu",), "cpu", "not both"),
])
def test_bad_devices_are_refused_with_the_reason(devices, device, says) -> None:
    with pytest.raises(ConfigError, match=says):
        RuntimeConfig(devices=devices, device=device)


@pytest.mark.skipif(CUDA, reason="checks the message on a machine without CUDA")
def test_cuda_devices_without_cuda_say_so() -> None:
    with pytest.raises(ConfigError, match=r"CUDA is not available.*usable here: cpu"):
        RuntimeConfig(devices=("cuda:0,cuda:1",)).compute_device()
    with pytest.raises(ConfigError, match="CUDA is not available"):
        RuntimeConfig(device="cuda:1").compute_device()


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_a_cuda_index_past_the_last_gpu_is_refused() -> None:
    n = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=f"{n} CUDA device"):
        RuntimeConfig(device=f"cuda:{n}").compute_device()


@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_several_gpus_split_the_batches(model_dir: Path, text_file: Path, capsys) -> None:
    assert RuntimeConfig(devices=("cuda:0,cuda:1",)).compute_devices() == [torch.device("cuda:0"),
                                                                          torch.device("cuda:1")]
    base = ["prune", "--model", str(model_dir), "--no-save", "--no-progress", "--devices", "cuda:0,cuda:1",
            "--calib", str(text_file), "--nsamples", "4", "--seqlen", "16"]
    assert main([*base, "--method", "wanda"]) == 0
    assert "cannot split its calibration batches" in _error(capsys, [*base, "--method", "slicegpt"])


def test_prune_devices_option(model_dir: Path, tmp_path: Path, capsys) -> None:
    base = ["prune", "--model", str(model_dir), "--method", "magnitude", "--no-save", "--no-progress"]
    assert main([*base, "--devices", "cpu"]) == 0
    assert "not a device name" in _error(capsys, [*base, "--devices", "bogus"])
    assert "not both" in _error(capsys, [*base, "--devices", "cpu", "--device", "cpu"])
    if not CUDA:
        assert "CUDA is not available" in _error(capsys, [*base, "--devices", "cuda:0,cuda:1"])


def test_eval_device_map_gives_the_single_device_figures(model_dir: Path, text_file: Path, capsys) -> None:
    base = ["eval", str(model_dir), "--ppl", str(text_file), "--seqlen", "16", "--max-windows", "4", "--no-speed",
            "--json"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*base, "--device-map", "auto"]) == 0
    mapped = json.loads(capsys.readouterr().out)
    assert mapped["ppl"] == pytest.approx(plain["ppl"], rel=1e-5)
    assert mapped["device_map"]
    assert "not both" in _error(capsys, [*base, "--device-map", "auto", "--device", "cpu"])
    assert "device_map must be one of" in _error(capsys, [*base, "--device-map", "everywhere"])


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_device_map_auto_puts_the_layers_on_the_gpus(model_dir: Path) -> None:
    model = pare.load(model_dir, device_map="auto")
    assert {str(d) for d in model.hf_device_map.values()} - {"cpu", "disk"}
