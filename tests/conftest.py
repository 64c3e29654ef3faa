"""Shared fixtures: tiny models on sys.path, the real checkpoint in ../shared, quiet logs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PARE_SHARED_DIR", REPO.parent / "shared"))
STORIES = SHARED / "models" / "stories260K"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def stories_path() -> Path:
    """The real pretrained stories260K Llama, or skip when ../shared is absent."""
    if not (STORIES / "config.json").is_file():
        pytest.skip(f"real checkpoint not found at {STORIES}")
    return STORIES


@pytest.fixture
def shared_data() -> Path:
    data = Path(os.environ.get("PARE_DATA_DIR", SHARED / "data"))
    if not data.is_dir():
        pytest.skip(f"shared data not found at {data}")
    return data


@pytest.fixture
def stories_calibration(stories_path, shared_data):
    """(tokenizer, 8 TinyStories-train windows of 128 tokens) for the real stories260K model."""
    from transformers import AutoTokenizer

    from pare.calibration.data import calibration_windows

    tok = AutoTokenizer.from_pretrained(stories_path)
    return tok, calibration_windows(tok, "tinystories", 8, 128, seed=0, split="train")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A saved tiny Llama with its tokenizer (the CLI tests' model)."""
    from tiny import tiny_model, tiny_tokenizer

    path = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    """A small text file for --calib / --eval."""
    from tiny import tiny_text

    path = tmp_path / "text.txt"
    path.write_text(tiny_text(60))
    return path
