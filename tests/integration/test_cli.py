"""The ``pare`` command end to end on tiny offline models, and its errors on bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pare.cli import main
from tiny import tiny_model, tiny_tokenizer


def test_inspect_prints_roles_and_params(model_dir: Path, capsys) -> None:
    assert main(["inspect", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "llama" in out and "self_attn.q_proj" in out and "kv_heads" in out and "total" in out
    assert main(["inspect", str(model_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["layers"][0]["heads"] == 4 and data["layers"][0]["kv_heads"] == 2 and data["layers"][0]["mlp"] == 96
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert data["params"]["total"] == sum(p.numel() for p in model.parameters())


def test_inspect_honours_arch_override(model_dir: Path, tmp_path: Path, capsys) -> None:
    override = tmp_path / "override.yaml"
    override.write_text("names: {gate: mlp.up_proj, up: mlp.gate_proj}\n")  # the roles as the file says
    assert main(["inspect", str(model_dir)]) == 0
    assert "mlp: mlp.gate_proj, mlp.up_proj, mlp.down_proj" in capsys.readouterr().out
    assert main(["inspect", str(model_dir), "--arch-override", str(override)]) == 0
    assert "mlp: mlp.up_proj, mlp.gate_proj, mlp.down_proj" in capsys.readouterr().out
    override.write_text("layers_path: model.nowhere\n")
    assert "model.nowhere" in _error(capsys, ["inspect", str(model_dir), "--arch-override", str(override)])


def test_prune_then_eval(model_dir: Path, text_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "pruned"
    code = main(["prune", "--model", str(model_dir), "--method", "magnitude", "--sparsity", "0.5",
                 "--pattern", "2:4", "--out", str(out), "--eval", str(text_file), "--seqlen", "32",
                 "--no-progress", "--no-speed"])
    assert code == 0
    text = capsys.readouterr().out
    assert "ppl" in text and "before" in text and "after" in text and "pattern 2:4" in text
    manifest = json.loads((out / "pare.json").read_text())
    assert manifest["pattern"] == "2:4" and manifest["figures"]["ppl_after"] > 0
    assert manifest["figures"]["size_on_disk_bytes_after"] > 0
    w = AutoModelForCausalLM.from_pretrained(out).model.layers[0].mlp.up_proj.weight
    assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) == 2).all()
    assert main(["eval", str(out), "--ppl", str(text_file), "--seqlen", "32", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["ppl"] == pytest.approx(manifest["figures"]["ppl_after"], rel=1e-6)
    assert res["n_windows"] == res["text_tokens"] // 32 and res["decode_tokens_per_s"] > 0
    assert "CUDA" in res["two_four_skipped"] or res["two_four_linear_speedup"] > 0
    assert main(["eval", str(out), "--ppl", str(text_file), "--seqlen", "32", "--no-speed"]) == 0
    assert "tokens after tokenization" in capsys.readouterr().out


def test_config_file_and_cli_override(model_dir: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {model_dir}\nmethod: magnitude\nsparsity: 0.25\ngranularity: layer\n")
    out = tmp_path / "o"
    assert main(["prune", "--config", str(cfg), "--sparsity", "0.75", "--out", str(out), "--no-progress"]) == 0
    manifest = json.loads((out / "pare.json").read_text())
    assert manifest["config"]["sparsity"] == 0.75 and manifest["config"]["granularity"] == "layer"


def test_config_file_top_level_options_apply(model_dir: Path, text_file: Path, tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {model_dir}\nmethod: magnitude\ntargets: down_proj\neval: {text_file}\n"
                   "eval_seqlen: 16\neval_max_windows: 3\nspeed: false\njson: true\nprogress: false\nno_save: true\n")
    assert main(["prune", "--config", str(cfg)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["figures"]["n_windows_after"] == 3 and report["figures"]["seqlen_after"] == 16
    assert "prefill_tokens_per_s_after" not in report["figures"]
    assert set(report["modules"]) == {f"model.layers.{i}.mlp.down_proj" for i in range(len(report["modules"]))}


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_bad_inputs_are_clear_errors_and_lose_nothing(model_dir: Path, tmp_path: Path, text_file: Path, capsys) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    base = ["prune", "--model", str(model_dir), "--method", "magnitude", "--no-progress", "--no-save"]
    assert "already exists" in _error(capsys, [*base[:-1], "--out", str(out)])
    assert (out / "keep.txt").read_text() == "x"
    assert "outside [0, 1)" in _error(capsys, [*base, "--sparsity", "1.0"])
    assert "outside [0, 1)" in _error(capsys, [*base, "--sparsity", "-0.2"])
    assert "N < M" in _error(capsys, [*base, "--pattern", "4:4"])
    assert "cannot load model" in _error(capsys, ["prune", "--model", str(tmp_path / "nope"), "--method", "magnitude",
                                                  "--no-save"])
    assert "unknown method" in _error(capsys, ["prune", "--model", str(model_dir), "--method", "voodoo"])
    assert "does not exist" in _error(capsys, [*base, "--config", str(tmp_path / "missing.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("sparsity: [unclosed\n")
    assert "not valid YAML" in _error(capsys, [*base, "--config", str(bad)])
    assert "longer than the model's context" in _error(
        capsys, ["eval", str(model_dir), "--ppl", str(text_file), "--seqlen", "100000"]
    )
    assert "matches no prunable module" in _error(capsys, [*base, "--targets", "nothing_here"])
    assert "prunes 2 of every 4 weights" in _error(capsys, [*base, "--pattern", "2:4", "--sparsity", "0.7"])
    assert "do not apply to method 'osscar'" in _error(
        capsys, ["prune", "--model", str(model_dir), "--method", "osscar", "--targets", "mlp"])
    assert "not one of auto, float32" in _error(capsys, [*base, "--dtype", "bogus"])
    if not torch.cuda.is_available():
        assert "cannot be used on this machine" in _error(capsys, [*base, "--device", "cuda"])
        assert "cannot be used on this machine" in _error(capsys, ["eval", str(model_dir), "--device", "cuda"])
    assert "not a device name" in _error(capsys, [*base, "--device", "bogus"])
    yaml_file = tmp_path / "typed.yaml"
    yaml_file.write_text("pattern: 2:4\n")
    assert "pattern must be text, got 124" in _error(capsys, [*base, "--config", str(yaml_file)])
    yaml_file.write_text("eval_seqlen: many\n")
    assert "eval_seqlen must be an integer" in _error(capsys, [*base, "--config", str(yaml_file)])


def test_abbreviated_options_are_refused(model_dir: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["prune", "--model", str(model_dir), "--method", "magnitude", "--spars", "0.7"])
    assert "unrecognized arguments: --spars" in capsys.readouterr().err


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    return capsys.readouterr().out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_prune_help_lists_only_what_prune_runs(model_dir: Path, capsys) -> None:
    import dataclasses

    from pare.cli.options import file_only
    from pare.methods import METHODS, GradualConfig, RecoverConfig

    text = _help(capsys, ["prune", "--help"])
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", text))
    pruning = [c for c in METHODS.values() if c.config_class not in (RecoverConfig, GradualConfig)]
    for cls in pruning:  # every pruning method's options are there
        for f in dataclasses.fields(cls.config_class):
            assert f.name in file_only(cls.config_class) or _flag(f.name) in flags, (cls.config_class.method, f.name)
    from pare.cli import COMMON
    from pare.config import CalibrationConfig, RuntimeConfig
    from pare.stream.config import StreamConfig

    prune_fields = {f.name for c in [*(p.config_class for p in pruning), CalibrationConfig, RuntimeConfig,
                                     StreamConfig] for f in dataclasses.fields(c)} | COMMON
    own = {f.name for c in (RecoverConfig, GradualConfig) for f in dataclasses.fields(c)
           if f.name not in prune_fields and f.name not in file_only(c)}
    assert own and not {_flag(n) for n in own} & flags  # --lora-r, --teacher, --final-sparsity, ...
    assert "recover" not in text.split("--method METHOD", 1)[1].split("--", 1)[0]
    assert "gradual" not in text.split("--method METHOD", 1)[1].split("--", 1)[0]
    recover = _help(capsys, ["recover", "--help"])
    assert "--lora-r" in recover and "--teacher" in recover
    for method, where in (("recover", "pare recover"), ("gradual", "recipe")):
        message = _error(capsys, ["prune", "--model", str(model_dir), "--method", method, "--no-save"])
        assert "not run by `pare prune`" in message and where in message


def test_help_of_one_method_lists_its_options_only(capsys) -> None:
    import dataclasses

    from pare.cli.options import file_only
    from pare.methods import METHODS

    assert main(["prune", "--method", "wanda", "--help"]) == 0
    wanda = capsys.readouterr().out
    assert "usage: pare prune" in wanda and "--calib" in wanda and "--model" in wanda and "--sparsity" in wanda
    assert "--num-layers" not in wanda and "--scheme" not in wanda  # shortgpt's and quantize's
    assert main(["prune", "--method=shortgpt", "-h"]) == 0
    assert "--num-layers" in capsys.readouterr().out
    assert main(["quantize", "--help"]) == 0
    quant = capsys.readouterr().out
    assert "usage: pare quantize" in quant and "--sparsity" not in quant and "[--algorithm" not in quant
    assert "--method ALGORITHM" in quant and "rtn or gptq" in quant
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", quant))
    config = METHODS["quantize"].config_class
    for f in dataclasses.fields(config):
        assert f.name in file_only(config) or f.name == "algorithm" or _flag(f.name) in flags, f.name
    full = _help(capsys, ["prune", "--method", "not-a-method", "--help"])  # unknown: the full help
    assert "--num-layers" in full and "--scheme" in full


def test_unknown_model_type_is_reported(tmp_path: Path, capsys) -> None:
    path = tmp_path / "odd"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "not-a-real-arch", "hidden_size": 8}))
    assert "not-a-real-arch" in _error(capsys, ["inspect", str(path)])


def test_depth_prune_prints_choice_and_reloads(model_dir: Path, text_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "depth"
    code = main(["prune", "--model", str(model_dir), "--method", "ppl-window", "--num-layers", "1",
                 "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32", "--out", str(out), "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "removed layers: [" in text and "structural edits: 1 (uniform)" in text
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (["--method", "width", "--pruning-ratio", "0.3"], "head"),
        (["--method", "osscar", "--attn-ratio", "0.3"], "head"),
        (["--method", "layers", "--layers", "9"], "9"),
        (["--method", "magnitude", "--pattern", "3:7"], "multiple of 7"),
        (["--method", "wanda", "--layer-sparsity", "0.5"], "one value per layer"),
        (["--method", "wanda", "--nsamples", "100000", "--seqlen", "32"], "nsamples <="),
    ],
)
def test_bad_options_fail_before_the_dense_evaluation(model_dir: Path, text_file: Path, options: list[str],
                                                      match: str, monkeypatch, capsys) -> None:
    import pare.cli.commands as commands

    def no_evaluation(*_args, **_kwargs):
        raise AssertionError("the dense evaluation ran before the options were checked")

    monkeypatch.setattr(commands, "_evaluate_figures", no_evaluation)
    argv = ["prune", "--model", str(model_dir), "--calib", str(text_file), "--seqlen", "16", "--nsamples", "4",
            "--eval", str(text_file), "--no-progress", "--no-save", *options]
    assert re.search(match, _error(capsys, argv), re.IGNORECASE)


def test_pruning_a_pruned_output_keeps_every_edit(model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    import pare

    first, second = tmp_path / "sub", tmp_path / "sub-layers"
    common = ["--calib", str(text_file), "--nsamples", "4", "--seqlen", "32", "--no-progress"]
    assert main(["prune", "--model", str(model_dir), "--method", "sublayer", "--num-sublayers", "1",
                 "--out", str(first), *common]) == 0
    assert main(["prune", "--model", str(first), "--method", "layers", "--layers", "0",
                 "--out", str(second), *common]) == 0
    manifest = json.loads((second / "pare.json").read_text())
    assert [h["method"] for h in manifest["stages"]] == ["sublayer", "layers"]
    assert manifest["figures"]["size_on_disk_bytes_after"] > 0
    ids = torch.randint(0, 100, (1, 12))
    reloaded = pare.load(second)
    direct = pare.load(first)
    pare.prune(direct, pare.LayersConfig(layers="0"), runtime=pare.RuntimeConfig(progress=False, device="cpu"))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, direct(ids).logits)
    third = tmp_path / "sub-layers-osscar"  # a third prune keeps the whole history, not only the last entry
    assert main(["prune", "--model", str(second), "--method", "osscar", "--mlp-ratio", "0.5",
                 "--out", str(third), *common]) == 0
    manifest = json.loads((third / "pare.json").read_text())
    assert [h["method"] for h in manifest["stages"]] == ["sublayer", "layers", "osscar"]
    with torch.no_grad():
        assert torch.isfinite(pare.load(third)(ids).logits).all()


def test_allow_repeats_lets_a_short_text_calibrate(model_dir: Path, text_file: Path, tmp_path: Path, capsys) -> None:
    argv = ["prune", "--model", str(model_dir), "--method", "wanda", "--calib", str(text_file), "--seqlen", "32",
            "--nsamples", "100000", "--no-progress"]
    assert "--allow-repeats" in _error(capsys, [*argv, "--no-save"])
    assert main([*argv[:-3], "--nsamples", "64", "--allow-repeats", "--json", "--no-progress", "--no-save"]) == 0
    assert json.loads(capsys.readouterr().out)["calibration"]["allow_repeats"] is True


def test_out_may_not_be_the_input_model(model_dir: Path, capsys) -> None:
    before = sorted(p.name for p in model_dir.iterdir())
    err = _error(capsys, ["prune", "--model", str(model_dir), "--method", "magnitude", "--out", str(model_dir),
                          "--overwrite", "--no-progress"])
    assert "is the input model's directory" in err
    assert sorted(p.name for p in model_dir.iterdir()) == before


def test_saved_directory_has_the_usual_permissions_and_eval_fits_the_context(
        model_dir: Path, text_file: Path, tmp_path: Path, capsys) -> None:
    import os

    out = tmp_path / "o"
    assert main(["prune", "--model", str(model_dir), "--method", "magnitude", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    mask = os.umask(0o022)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask
    context = AutoModelForCausalLM.from_pretrained(out).config.max_position_embeddings
    assert main(["eval", str(out), "--ppl", str(text_file), "--no-speed", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["seqlen"] == min(2048, context)


def test_no_progress_hides_transformers_bars_and_restores_them(model_dir: Path, tmp_path: Path, capsys) -> None:
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    assert main(["prune", "--model", str(model_dir), "--method", "magnitude", "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "Writing model shards" not in err and "Loading weights" not in err
    assert hf_logging.is_progress_bar_enabled()


def test_methods_lists_each_method_with_one_sentence(capsys) -> None:
    from pare.methods import METHODS

    assert main(["methods"]) == 0
    heads = [line for line in capsys.readouterr().out.splitlines() if line and not line.startswith(" ")]
    assert [h.split()[0] for h in heads] == sorted(METHODS)
    for line in heads:
        summary = line.split(maxsplit=1)[1]
        assert summary.endswith(".") and "``" not in summary and summary.count(". ") == 0, line
    assert any(h.startswith("sparsegpt") and "SparseGPT: one-shot OBS pruning" in h for h in heads)


def test_chained_prunes_count_every_zero(model_dir: Path, text_file: Path, tmp_path: Path, capsys) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["--calib", str(text_file), "--nsamples", "2", "--seqlen", "16", "--no-progress",
              "--no-speed"]
    assert main(["prune", "--model", str(model_dir), "--method", "magnitude", "--out", str(first), *common]) == 0
    assert main(["prune", "--model", str(first), "--method", "wanda", "--sparsity", "0.6", "--targets", "mlp",
                 "--out", str(second), *common]) == 0
    text = capsys.readouterr().out
    figures = json.loads((second / "pare.json").read_text())["figures"]
    nonzero = sum(int((p != 0).sum()) for p in AutoModelForCausalLM.from_pretrained(second).parameters())
    before = json.loads((first / "pare.json").read_text())["figures"]["nonzero_after"]
    assert (figures["nonzero_before"], figures["nonzero_after"]) == (before, nonzero)
    assert re.search(rf"params not zeroed\s+{before:,}\s+{nonzero:,}", text), text


def test_a_tokenizer_of_another_model_is_refused_before_any_work(tmp_path: Path, text_file: Path, capsys) -> None:
    path = tmp_path / "small-vocab"
    tiny_model("llama", vocab_size=40).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)  # ids up to 127
    code = main(["prune", "--model", str(path), "--method", "wanda", "--calib", str(text_file), "--nsamples", "2",
                 "--seqlen", "16", "--eval", str(text_file), "--no-progress", "--no-speed", "--no-save"])
    err = capsys.readouterr().err
    assert code != 0 and "tokenizer does not match the model" in err and "Traceback" not in err


def test_expert_pruning_from_the_command_line(tmp_path: Path, text_file: Path, capsys) -> None:
    path = tmp_path / "tiny-moe"
    tiny_model("qwen3_moe", num_experts=8).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    out = tmp_path / "experts"
    argv = ["prune", "--model", str(path), "--method", "experts", "--calib", str(text_file), "--nsamples", "4",
            "--seqlen", "32", "--no-progress"]
    assert main([*argv, "--num-experts", "6", "--importance", "frequency", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "layer 0: kept experts [" in text and "structural edits: 3 (uniform)" in text
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_experts == 6 and model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 6
    assert re.search(r"fewer than the 2 each token selects.*--top-k",
                     _error(capsys, [*argv, "--num-experts", "1", "--no-save"]))
