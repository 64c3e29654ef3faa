"""Fixtures shared by the CLI tests: a saved tiny Llama with its tokenizer, and a text file."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny import tiny_model, tiny_text, tiny_tokenizer


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(tiny_text(60))
    return path
