"""``pare report`` and ``pare prune --report`` from the command line, on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pare.cli import main
from tiny import tiny_model, tiny_tokenizer


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    path = tmp_path / "dense"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_prune_report_writes_beside_the_saved_model(model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(model_dir), "--method", "layers", "--layers", "1", "--out", str(out),
            "--no-progress", "--report"]
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert f"report: {out / 'report.html'}" in said
    page = (out / "report.html").read_text()
    assert "layers" in page and "removed layers [1]" in page
    assert (out / "report.md").is_file()
    # the saved model is untouched by the report: it still loads, and the manifest is the prune's
    import pare

    assert pare.load(out) is not None
    assert json.loads((out / "pare.json").read_text())["method"] == "layers"


def test_prune_report_needs_out(model_dir: Path, capsys) -> None:
    assert main(["prune", "--model", str(model_dir), "--method", "magnitude", "--report", "--no-save",
                 "--no-progress"]) == 2
    assert "--report writes report.html" in capsys.readouterr().err


def test_report_command_compares_runs(model_dir: Path, tmp_path: Path, capsys) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["prune", "--model", str(model_dir), "--method", "magnitude", "--out", str(a), "--no-progress"]) == 0
    assert main(["prune", "--model", str(model_dir), "--method", "layers", "--layers", "0", "--out", str(b),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["report", str(a), str(b), "--html", str(tmp_path / "r.html"), "--md", str(tmp_path / "r.md"),
                 "--no-plots"]) == 0
    said = capsys.readouterr().out
    assert f"wrote {tmp_path / 'r.html'}" in said and f"wrote {tmp_path / 'r.md'}" in said
    text = (tmp_path / "r.md").read_text()
    assert "| a | magnitude |" in text and "| b | layers |" in text
    assert main(["report", str(model_dir), "--html", str(tmp_path / "x.html")]) == 2
    assert "has no pare.json" in capsys.readouterr().err
