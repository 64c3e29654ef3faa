"""``pare prune --out``: refused before any work when saving would fail or destroy something; what the
messages name; the size-on-disk figure when the dtype changes; config-file-only options."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pare.cli import main
from tiny import tiny_model, tiny_text, tiny_tokenizer


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    path = tmp_path / "w" / "dense"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def no_loading(monkeypatch) -> None:
    """Any load of the model fails the test: the checks must come first."""
    import pare.cli.commands as commands

    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(commands, "_load_any", refuse)


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def _prune(model: Path, out: str | Path, *extra: str) -> list[str]:
    return ["prune", "--model", str(model), "--method", "magnitude", "--out", str(out), "--no-progress", *extra]


def test_out_may_not_hold_the_model_or_the_current_directory(model_dir: Path, tmp_path: Path, no_loading,
                                                              monkeypatch, capsys) -> None:
    before = _tree(tmp_path)
    assert "contains the input model" in _error(capsys, _prune(model_dir, model_dir.parent, "--overwrite"))
    monkeypatch.chdir(model_dir.parent)
    assert "contains the input model" in _error(capsys, _prune(Path("dense"), ".", "--overwrite"))
    assert "is the input model's directory" in _error(capsys, _prune(Path("dense"), "dense", "--overwrite"))
    here = tmp_path / "here" / "deeper"
    here.mkdir(parents=True)
    (here / "config.json").write_text("{}")  # even a folder that looks like a model
    monkeypatch.chdir(here)
    assert "is the current directory" in _error(capsys, _prune(model_dir, ".", "--overwrite"))
    assert "contains the current directory" in _error(capsys, _prune(model_dir, "..", "--overwrite"))
    assert _tree(tmp_path) == sorted([*before, "here", "here/deeper", "here/deeper/config.json"])


def test_overwrite_replaces_only_a_saved_model(model_dir: Path, tmp_path: Path, capsys) -> None:
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("x")
    err = _error(capsys, _prune(model_dir, junk, "--overwrite"))
    assert "does not look like a saved model" in err and "remove it yourself" in err
    assert (junk / "notes.txt").read_text() == "x"
    out = tmp_path / "pruned"
    assert main(_prune(model_dir, out)) == 0
    assert main(_prune(model_dir, out, "--overwrite", "--sparsity", "0.25")) == 0
    assert json.loads((out / "pare.json").read_text())["config"]["sparsity"] == 0.25


def test_unusable_out_fails_before_loading(model_dir: Path, tmp_path: Path, no_loading, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    err = _error(capsys, _prune(model_dir, afile / "sub"))
    assert "is a file, not a directory" in err and "Traceback" not in err
    for extra in ([], ["--overwrite"]):
        err = _error(capsys, _prune(model_dir, afile, *extra))
        assert "is a file, not a directory" in err and "choose another output directory (--out)" in err
    assert afile.read_text() == "x"
    if Path("/proc/self").is_dir():  # a directory nobody can create folders in, even root
        assert "cannot write '/proc/pare-out'" in _error(capsys, _prune(model_dir, "/proc/pare-out"))


def test_eval_seqlen_error_names_eval_seqlen(model_dir: Path, tmp_path: Path, capsys) -> None:
    text = tmp_path / "text.txt"
    text.write_text(tiny_text(20))
    err = _error(capsys, ["prune", "--model", str(model_dir), "--method", "magnitude", "--eval", str(text),
                          "--eval-seqlen", "1024", "--no-progress", "--no-save"])
    assert "use --eval-seqlen 256 or less" in err


def test_config_file_only_fields_are_shown_as_such(model_dir: Path, capsys) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "module_sparsity (config file)" in out and "--module-sparsity" not in out
    err = _error(capsys, ["prune", "--model", str(model_dir), "--method", "magnitude", "--attn-ratio", "0.2",
                          "--no-save"])
    assert "'module_sparsity (config file)'" in err and "--module-sparsity" not in err


def test_size_on_disk_says_when_the_dtype_changed(model_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(_prune(model_dir, tmp_path / "half", "--dtype", "float16")) == 0
    out = capsys.readouterr().out
    assert "saved in float16, the input was float32" in out and "0.5x" in out
    manifest = json.loads((tmp_path / "half" / "pare.json").read_text())
    assert any("saved in float16" in n for n in manifest["notes"])
    assert main(_prune(model_dir, tmp_path / "same")) == 0
    assert "the input was" not in capsys.readouterr().out
    shutil.rmtree(tmp_path / "same")


def test_no_out_is_refused_unless_no_save(model_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    base = ["prune", "--model", str(model_dir), "--method", "magnitude", "--no-progress"]
    with monkeypatch.context() as mp:  # refused before the model is loaded
        mp.setattr("pare.cli.commands._load_any", lambda *_a, **_k: pytest.fail("loaded before --out was checked"))
        assert "pass --out DIR to save the pruned model, or --no-save" in _error(capsys, base)
        assert "no --out (an empty path)" in _error(capsys, [*base, "--out", ""])
        assert "contradict" in _error(capsys, [*base, "--out", "x", "--no-save"])
    before = _tree(tmp_path)
    assert main([*base, "--no-save"]) == 0
    assert _tree(tmp_path) == before  # writes nothing


def test_ctrl_c_says_what_is_on_disk(model_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import pare.cli.commands as commands
    import pare.io.outdir as outdir

    out = tmp_path / "pruned"
    with monkeypatch.context() as mp:  # before the save: nothing was written
        mp.setattr(commands, "_evaluate_figures", lambda *_a, **_k: (_ for _ in ()).throw(KeyboardInterrupt))
        assert main(_prune(model_dir, out, "--eval", "wikitext2")) == 130
    assert "nothing was written" in capsys.readouterr().err and not out.exists()
    assert main(_prune(model_dir, out)) == 0
    capsys.readouterr()
    real = outdir.shutil.rmtree
    calls: list[Path] = []

    def interrupted_once(path, *args, **kwargs):  # Ctrl-C right after the swap, while the old copy is deleted
        calls.append(path)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(outdir.shutil, "rmtree", interrupted_once)
        assert main(_prune(model_dir, out, "--overwrite", "--sparsity", "0.25")) == 130
    err = capsys.readouterr().err
    assert f"{str(out)!r} holds the complete saved model" in err and "nothing was written" not in err
    assert json.loads((out / "pare.json").read_text())["config"]["sparsity"] == 0.25
    assert sorted(p.name for p in tmp_path.iterdir() if "pruned" in p.name) == ["pruned"]


def test_the_cli_writes_the_manifest_only_inside_the_save(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """pare.save writes the complete pare.json before its atomic rename; the CLI never rewrites it."""
    import pare.io as io

    seen = {}
    real_save = io.save

    def watching_save(*args, **kwargs):
        path = real_save(*args, **kwargs)
        manifest = path / "pare.json"
        seen["stat"] = (manifest.stat().st_ino, manifest.stat().st_mtime_ns, manifest.read_bytes())
        return path

    monkeypatch.setattr(io, "save", watching_save)
    out = tmp_path / "o"
    assert main([*_prune(model_dir, out), "--report"]) == 0
    manifest = out / "pare.json"
    assert (manifest.stat().st_ino, manifest.stat().st_mtime_ns, manifest.read_bytes()) == seen["stat"]
    assert json.loads(manifest.read_text())["figures"]["size_on_disk_bytes_after"] > 0
