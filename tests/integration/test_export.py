"""pare export: compressed-tensors and GGUF checkpoints reload (plain from_pretrained, transformers' GGUF
loader) and give the saved fake-quantized model's logits; bad input is refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pare
from pare.cli import main
from pare.errors import ConfigError
from tiny import tiny_model, tiny_tokenizer

pytest.importorskip("compressed_tensors")
pytest.importorskip("gguf")

QUIET = pare.RuntimeConfig(progress=False, device="cpu")
IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))


def _saved(tmp_path: Path, name: str, config, dtype=torch.bfloat16, calib: bool = False,
           model_type: str = "llama") -> Path:
    model = tiny_model(model_type).to(dtype)
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1)) if calib else None
    report = pare.prune(model, config, ids, runtime=QUIET)
    out = tmp_path / name
    pare.save(model, tiny_tokenizer(), out, report)
    return out


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(autouse=True)
def _quiet_transformers():
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)


@pytest.mark.parametrize("dtype,scheme,group", [(torch.bfloat16, "int4", 32), (torch.float16, "int8", 0),
                                                (torch.float32, "int4", 64)], ids=["bf16-w4g32", "fp16-w8ch",
                                                                                   "fp32-w4g64"])
def test_compressed_tensors_reloads_with_the_fake_quantized_logits(tmp_path, dtype, scheme, group) -> None:
    from transformers import AutoModelForCausalLM

    if group == 64:  # the tiny MLP's 96 inputs are not a multiple of 64: leave down_proj unquantized
        cfg = pare.QuantizeConfig(scheme=scheme, group_size=group, ignore=(r"down_proj",))
    else:
        cfg = pare.QuantizeConfig(scheme=scheme, group_size=group)
    src = _saved(tmp_path, "q", cfg, dtype)
    rec = pare.export(src, "compressed-tensors", tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    assert loaded.dtype == dtype
    assert torch.equal(_logits(loaded), _logits(pare.load(src)))
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["quant_method"] == "compressed-tensors"
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == int(scheme[3:])
    n_ignored = 3 if group == 64 else 0
    assert rec["matrices"] == 21 - n_ignored and len(rec["unquantized_linears"]) == 1 + n_ignored  # + lm_head
    # bytes of the packed codes + scales equal pare's bits account (16-bit scales; fp32 models store 32)
    assert rec["matches_account"] == (dtype != torch.float32)
    if dtype == torch.float32:
        assert rec["quantized_tensor_bytes"] == rec["account_bytes"] + rec["account"]["scale_bits"] // 8
    assert json.loads((tmp_path / "ct" / "pare_export.json").read_text())["format"] == "compressed-tensors"


def test_joint_sparse_quantized_model_exports_with_its_zeros(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    cfg = pare.SparseGPTConfig(pattern="2:4", quantize="int4", group_size=32)
    src = _saved(tmp_path, "sq", cfg, torch.bfloat16, calib=True)
    rec = pare.export(src, "compressed-tensors", tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    assert torch.equal(_logits(loaded), _logits(pare.load(src)))
    w = loaded.model.layers[1].mlp.up_proj.weight
    assert bool((w.reshape(w.shape[0], -1, 4) == 0).sum(-1).ge(2).all())  # the 2:4 pattern survives
    # zeros are stored as codes (dense packing): the sparse account of the manifest is smaller
    assert rec["matches_account"] and rec["manifest_account"]["sparse_format"] == "2:4 indices"


@pytest.mark.parametrize("dtype,scheme,group,qtype", [(torch.bfloat16, "int4", 32, "q4_0"),
                                                      (torch.float16, "int8", 0, "q8_0"),
                                                      (torch.bfloat16, "int4", 0, "q4_0")])
def test_gguf_quantized_reloads_with_the_fake_quantized_logits(tmp_path, dtype, scheme, group, qtype) -> None:
    from transformers import AutoModelForCausalLM

    src = _saved(tmp_path, "q", pare.QuantizeConfig(scheme=scheme, group_size=group), dtype)
    rec = pare.export(src, "gguf", tmp_path / "m.gguf")
    assert rec["tensor_types"][qtype] == 21 and rec["matrix_type"] == qtype
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=dtype)
    assert torch.equal(_logits(loaded), _logits(pare.load(src)))


@pytest.mark.parametrize("dtype,ftype", [(torch.bfloat16, "bf16"), (torch.float32, "f32")])
def test_gguf_unquantized_pruned_model(tmp_path, dtype, ftype) -> None:
    from transformers import AutoModelForCausalLM

    src = _saved(tmp_path, "p", pare.MagnitudeConfig(sparsity=0.5), dtype)
    rec = pare.export(src, "gguf", tmp_path / "p.gguf")
    assert rec["float_type"] == ftype and rec["matrix_type"] is None
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="p.gguf", dtype=dtype)
    assert torch.equal(_logits(loaded), _logits(pare.load(src)))


def test_w8a8_int8_exports_with_dynamic_token_activations(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    cfg = pare.QuantizeConfig(scheme="int8", group_size=0, act_quant="int8")
    src = _saved(tmp_path, "w8a8", cfg, torch.float32)
    reloaded = pare.load(src)  # the manifest puts the activation hooks back
    plain = AutoModelForCausalLM.from_pretrained(src)  # weights only
    assert not torch.equal(_logits(reloaded), _logits(plain))
    pare.export(src, "compressed-tensors", tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    acts = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert acts["group_0"]["input_activations"]["strategy"] == "token"
    assert torch.equal(_logits(loaded), _logits(reloaded))  # compressed-tensors' dynamic int8 rule == pare's
    with pytest.raises(ConfigError, match="activations"):
        pare.export(src, "gguf", tmp_path / "x.gguf")


def test_w8a8_simulation_changes_the_outputs_and_reloads(tmp_path) -> None:
    for kind in ("int8", "fp8"):
        model = tiny_model("llama")
        report = pare.prune(model, pare.QuantizeConfig(scheme="int8", group_size=0, act_quant=kind), runtime=QUIET)
        assert report.scores["quantization"]["activations"] == kind
        weights_only = tiny_model("llama")
        pare.prune(weights_only, pare.QuantizeConfig(scheme="int8", group_size=0), runtime=QUIET)
        assert not torch.equal(_logits(model), _logits(weights_only))
        pare.save(model, None, tmp_path / kind, report)
        assert torch.equal(_logits(pare.load(tmp_path / kind)), _logits(model))
    with pytest.raises(ConfigError, match="act_quant must be one of int8, fp8"):
        pare.QuantizeConfig(act_quant="int4")


@pytest.mark.parametrize("case,fmt,match", [
    ("dense", "compressed-tensors", "is not quantized"),
    ("mxfp4", "compressed-tensors", "no pack-quantized layout"),
    ("mxfp4", "gguf", "compressed-tensors"),
    ("asym", "compressed-tensors", "asymmetric"),
    ("asym", "gguf", "symmetric"),
    ("int4g16", "gguf", "multiple of 32"),
    ("int3", "gguf", "--format compressed-tensors"),
    ("fp32", "gguf", "fp16 scales"),
    ("qwen2", "gguf", "Llama family"),
])
def test_formats_that_cannot_hold_the_model_are_refused_before_any_work(tmp_path, case, fmt, match) -> None:
    configs = {
        "dense": (pare.MagnitudeConfig(sparsity=0.5), torch.bfloat16, "llama"),
        "mxfp4": (pare.QuantizeConfig(scheme="mxfp4"), torch.bfloat16, "llama"),
        "asym": (pare.QuantizeConfig(scheme="int4", group_size=32, symmetric=False), torch.bfloat16, "llama"),
        "int4g16": (pare.QuantizeConfig(scheme="int4", group_size=16), torch.bfloat16, "llama"),
        "int3": (pare.QuantizeConfig(scheme="int3", group_size=32), torch.bfloat16, "llama"),
        "fp32": (pare.QuantizeConfig(scheme="int4", group_size=32), torch.float32, "llama"),
        "qwen2": (pare.QuantizeConfig(scheme="int4", group_size=32), torch.bfloat16, "qwen2"),
    }
    cfg, dtype, arch = configs[case]
    src = _saved(tmp_path, case, cfg, dtype, model_type=arch)
    out = tmp_path / ("out.gguf" if fmt == "gguf" else "out")
    with pytest.raises(ConfigError, match=match):
        pare.export(src, fmt, out)
    assert not out.exists()


def test_weights_changed_after_quantization_are_refused(tmp_path) -> None:
    src = _saved(tmp_path, "q", pare.QuantizeConfig(scheme="int4", group_size=32), torch.bfloat16)
    from safetensors.torch import load_file, save_file

    state = load_file(src / "model.safetensors")
    w = state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.1.mlp.up_proj.weight"] = w + 0.01 * torch.randn_like(w)  # a later, non-grid update
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.mlp\.up_proj.*not on the int4 group 32 grid"):
        pare.export(src, "compressed-tensors", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_export_cli(tmp_path, capsys) -> None:
    src = _saved(tmp_path, "q", pare.QuantizeConfig(scheme="int4", group_size=32), torch.bfloat16)
    assert main(["export", str(src), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 0
    assert "pare's bits account" in capsys.readouterr().out
    assert main(["export", str(src), "--format", "gguf", "--out", str(tmp_path / "m.gguf"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tensor_types"]["q4_0"] == 21
    assert main(["export", str(src), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(src), "--format", "gguf", "--out", str(tmp_path / "m.gguf"), "--overwrite",
                 "--gguf-type", "f16"]) == 0
    assert main(["export", str(src), "--format", "gguf", "--out", str(tmp_path / "m.bin")]) == 2
    assert "*.gguf" in capsys.readouterr().err


def test_quantize_then_export_from_the_command_line(tmp_path, model_dir) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    assert main(["quantize", "--model", str(model_dir), "--scheme", "int8", "--group-size", "0",
                 "--act-quant", "int8", "--out", str(out)]) == 0
    assert json.loads((out / "pare.json").read_text())["scores"]["quantization"]["activations"] == "int8"
    assert main(["export", str(out), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    assert torch.equal(_logits(loaded), _logits(pare.load(out)))
