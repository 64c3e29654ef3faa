"""``pare.save`` never loses a user's data: what it refuses to replace, the race with someone creating the
output meanwhile, leftovers of killed saves, and what an interrupted save leaves on disk."""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import pare
import pare.io.outdir as outdir
from pare.errors import ConfigError, OutputExistsError, SaveInterrupted
from tiny import tiny_batch, tiny_model


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"" for p in sorted(path.rglob("*"))}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(tiny_batch(1, 8)).logits


def _hf_dir(path: Path, seed: int = 0) -> Path:
    tiny_model("llama", seed=seed).save_pretrained(path)
    return path


class _Hook:
    """A stand-in tokenizer whose save runs ``action`` (the last step before the final rename)."""

    def __init__(self, action) -> None:
        self.action = action

    def save_pretrained(self, path) -> None:
        self.action(Path(path))


@pytest.fixture(params=["renameat2", "fallback"])
def rename_mode(request, monkeypatch, tmp_path_factory) -> str:
    """Run a test with Linux renameat2, and with the portable check-then-rename fallback."""
    if request.param == "fallback":
        monkeypatch.setattr(outdir, "_renameat2", lambda *_a: False)
    else:
        probe = tmp_path_factory.mktemp("probe")
        (probe / "a").mkdir()
        if not outdir._renameat2(probe / "a", probe / "b", 1):
            pytest.skip("renameat2(RENAME_NOREPLACE) is not available here")
    return request.param


# --------------------------------------------------------------------------- what overwrite may replace
def test_the_working_directory_and_its_parents_are_never_replaced(tmp_path: Path, monkeypatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    before = _tree(tmp_path)
    for out in (".", "..", str(work), str(tmp_path)):
        with pytest.raises(ConfigError, match="current directory"):
            pare.save(tiny_model("llama"), None, out, overwrite=True)
    assert _tree(tmp_path) == before


def test_a_directory_of_unrelated_files_is_never_replaced(tmp_path: Path) -> None:
    notes = tmp_path / "notes_dir"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    before = _tree(tmp_path)
    with pytest.raises(OutputExistsError, match=r"does not look like a saved model.*todo\.txt"):
        pare.save(tiny_model("llama"), None, notes, overwrite=True)
    assert _tree(tmp_path) == before


def test_the_input_model_and_its_parents_are_never_replaced(tmp_path: Path) -> None:
    source = _hf_dir(tmp_path / "models" / "dense")
    model = AutoModelForCausalLM.from_pretrained(source)  # records where it came from
    other = _hf_dir(tmp_path / "other")
    before = _tree(tmp_path)
    with pytest.raises(ConfigError, match="is the input model's directory"):
        pare.save(model, None, source, overwrite=True)
    with pytest.raises(ConfigError, match="contains the input model"):
        pare.save(model, None, source.parent, overwrite=True)
    with pytest.raises(ConfigError, match="is the input model's directory"):  # named explicitly
        pare.save(tiny_model("llama"), None, other, overwrite=True, source=other)
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("extra", [
    {"config.json": '{"model_type": "llama"}', "src/app.py": "print(1)"},  # a web app with a config.json
    {"config.json": '{"model_type": "llama"}', "model.safetensors": "x", "README.md": "mine"},
    {"config.json": '{"name": "webapp"}', "model.safetensors": "x"},  # config.json without a model_type
    {"config.json": '{"model_type": "llama"}'},  # no weights
    {"pare.json": '{"hello": 1}'},  # a pare.json pare did not write
    {".env": "SECRET=1", "config.json": '{"model_type": "llama"}', "model.safetensors": "x"},
])
def test_only_a_saved_model_is_replaced(tmp_path: Path, extra: dict[str, str]) -> None:
    out = tmp_path / "webapp"
    for name, text in extra.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = _tree(tmp_path)
    with pytest.raises(OutputExistsError, match="does not look like a saved model") as err:
        pare.save(tiny_model("llama"), None, out, overwrite=True)
    odd = [n for n in extra if n.split("/")[0] not in ("config.json", "model.safetensors", "pare.json")]
    assert all(n.split("/")[0] in str(err.value) for n in odd)  # names what it found
    assert _tree(tmp_path) == before


def test_saved_models_are_replaced(tmp_path: Path) -> None:
    model = tiny_model("llama", seed=3)
    plain = _hf_dir(tmp_path / "plain")  # a transformers save: config.json with a model_type + weights
    report = pare.prune(tiny_model("llama"), pare.MagnitudeConfig(sparsity=0.5),
                       runtime=pare.RuntimeConfig(progress=False))
    by_pare = pare.save(tiny_model("llama"), None, tmp_path / "by-pare", report)
    empty = tmp_path / "empty"  # nothing to lose
    empty.mkdir()
    for out in (plain, by_pare, empty):
        pare.save(model, None, out, overwrite=True)
        assert torch.equal(_logits(pare.load(out)), _logits(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["by-pare", "empty", "plain"]  # no second copy left
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="empty path"):
        pare.save(model, None, "")


def test_the_manifest_records_the_size_before_the_rename(tmp_path: Path) -> None:
    model = tiny_model("llama")
    report = pare.prune(model, pare.MagnitudeConfig(sparsity=0.5), runtime=pare.RuntimeConfig(progress=False))
    seen: dict[str, object] = {}
    real = outdir.move_into_place

    def record(tmp, *args, **kwargs):
        seen["manifest"] = json.loads((tmp / "pare.json").read_text())
        return real(tmp, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(importlib.import_module("pare.io.save"), "move_into_place", record)
        out = pare.save(model, None, tmp_path / "m", report)
    written = json.loads((out / "pare.json").read_text())
    assert written == seen["manifest"]  # nothing rewritten after the rename
    assert written["figures"]["size_on_disk_bytes_after"] == (out / "model.safetensors").stat().st_size
    assert report.figures["size_on_disk_bytes_after"] == written["figures"]["size_on_disk_bytes_after"]


# --------------------------------------------------------------------------- races
def test_an_output_created_meanwhile_is_left_alone(tmp_path: Path, rename_mode: str) -> None:
    out = tmp_path / "out"

    def someone_else(_tmp: Path) -> None:
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")

    model = tiny_model("llama")
    with pytest.raises(OutputExistsError, match="created by someone else") as err:
        pare.save(model, _Hook(someone_else), out)
    assert _tree(out) == {"theirs.txt": b"theirs"}
    kept = tmp_path / "out.pare-new"
    assert str(kept) in str(err.value)
    assert torch.equal(_logits(pare.load(kept)), _logits(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.pare-new"]


def test_an_empty_directory_created_meanwhile_is_not_replaced(tmp_path: Path, rename_mode: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="created by someone else"):
        pare.save(tiny_model("llama"), _Hook(lambda _tmp: out.mkdir()), out)
    assert out.is_dir() and not any(out.iterdir())


def test_overwrite_rechecks_the_target_at_the_swap(tmp_path: Path, rename_mode: str) -> None:
    out = _hf_dir(tmp_path / "out", seed=1)

    def replaced(_tmp: Path) -> None:  # the saved model makes way for someone's files while we write
        for p in out.iterdir():
            p.unlink()
        (out / "theirs.txt").write_text("theirs")

    with pytest.raises(OutputExistsError, match=r"no longer looks like a saved model.*theirs\.txt"):
        pare.save(tiny_model("llama"), _Hook(replaced), out, overwrite=True)
    assert _tree(out) == {"theirs.txt": b"theirs"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_swaps_and_leaves_no_second_copy(tmp_path: Path, rename_mode: str) -> None:
    out = _hf_dir(tmp_path / "out", seed=1)
    model = tiny_model("llama", seed=2)
    pare.save(model, None, out, overwrite=True)
    assert torch.equal(_logits(pare.load(out)), _logits(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --------------------------------------------------------------------------- killed and interrupted saves
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_killed_saves_are_removed_and_reported(tmp_path: Path, caplog) -> None:
    dead = _dead_pid()
    stale = [tmp_path / f".out.tmp-{dead}-abc123", tmp_path / f".out.old-{dead}"]
    running = tmp_path / f".out.tmp-{os.getpid()}-live"  # a save still running in this process
    unrelated = [tmp_path / f".other.tmp-{dead}-abc", tmp_path / "out.tmp-1-x"]
    for d in [*stale, running, *unrelated]:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    with caplog.at_level(logging.WARNING, logger="pare"):
        pare.save(tiny_model("llama"), None, tmp_path / "out")
    assert not any(d.exists() for d in stale)
    assert running.exists() and all(d.exists() for d in unrelated)
    text = caplog.text
    assert all(d.name in text for d in stale) and f"process {dead} is gone" in text


@pytest.mark.parametrize("existed", [False, True])
def test_an_interrupt_while_writing_leaves_the_output_as_it_was(tmp_path: Path, existed: bool,
                                                                 rename_mode: str) -> None:
    out = tmp_path / "out"
    if existed:
        _hf_dir(out, seed=1)
    before = _tree(tmp_path)

    def interrupt(_tmp: Path) -> None:
        raise KeyboardInterrupt

    with pytest.raises(SaveInterrupted) as err:
        pare.save(tiny_model("llama"), _Hook(interrupt), out, overwrite=existed)
    assert not err.value.saved
    assert ("was not changed" if existed else "nothing was saved") in str(err.value)
    assert _tree(tmp_path) == before  # no partial files, the old model untouched


def test_an_interrupt_after_the_rename_says_the_model_is_saved(tmp_path: Path, monkeypatch,
                                                               rename_mode: str) -> None:
    out = _hf_dir(tmp_path / "out", seed=1)
    model = tiny_model("llama", seed=2)
    real = outdir.shutil.rmtree
    calls = []

    def interrupted_once(path, *args, **kwargs):  # Ctrl-C while the replaced model is being deleted
        calls.append(path)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(outdir.shutil, "rmtree", interrupted_once)
    with pytest.raises(SaveInterrupted) as err:
        pare.save(model, None, out, overwrite=True)
    assert err.value.saved and "holds the complete saved model" in str(err.value)
    monkeypatch.undo()
    assert torch.equal(_logits(pare.load(out)), _logits(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old copy went anyway


def test_a_model_moved_aside_by_a_killed_save_is_put_back(tmp_path: Path, caplog) -> None:
    out = tmp_path / "out"
    aside = _hf_dir(tmp_path / f".out.old-{_dead_pid()}", seed=1)  # killed between the two renames
    previous = _logits(pare.load(aside))
    with caplog.at_level(logging.WARNING, logger="pare"), pytest.raises(OutputExistsError, match="already exists"):
        pare.save(tiny_model("llama"), None, out)  # without overwrite: the previous model is not replaced
    assert "put back the model" in caplog.text
    assert torch.equal(_logits(pare.load(out)), previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
