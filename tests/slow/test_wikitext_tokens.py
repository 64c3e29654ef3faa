"""WikiText-2 test, joined with "\\n\\n", has the token counts the papers and transformers report."""

from __future__ import annotations

from pathlib import Path

import pytest

from pare.calibration.data import data_dir, eval_token_ids

pytestmark = pytest.mark.slow


def _shared() -> tuple[Path, Path]:
    root = data_dir()
    if root is None or not (root / "wikitext-2-raw-v1").is_dir():
        pytest.skip("WikiText-2 is not under PARE_DATA_DIR or ../shared/data")
    return root, root.parent / "tokenizers"


@pytest.mark.parametrize(("name", "expected"), [("llama2", 341_469), ("gpt2", 287_644)])
def test_wikitext2_test_token_count(name: str, expected: int) -> None:
    transformers = pytest.importorskip("transformers")
    _, tokenizers = _shared()
    if not (tokenizers / name).is_dir():
        pytest.skip(f"tokenizer {tokenizers / name} is missing")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizers / name)
    ids = eval_token_ids(tokenizer, "wikitext2", "test")
    assert ids.shape == (1, expected)
    if name == "llama2":
        assert ids[0, 0].item() == tokenizer.bos_token_id
