"""Data sources, evaluation token streams and calibration windows (offline, tiny word tokenizer)."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from pare.calibration import sources
from pare.calibration.data import (
    calibration_windows,
    data_dir,
    eval_token_ids,
    load_documents,
    load_text,
)
from pare.errors import ConfigError, DataNotFoundError, NotEnoughDataError

N_WORDS = 400


def word_tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    """One token per word ``w0``..``w399`` (and ``t*``/``v*`` words), ids 3.. ; BOS=1 like Llama."""
    words = [f"{p}{i}" for p in ("w", "t", "v") for i in range(N_WORDS)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def words(prefix: str, start: int, n: int) -> str:
    return " ".join(f"{prefix}{(start + j) % N_WORDS}" for j in range(n))


@pytest.fixture
def tok() -> PreTrainedTokenizerFast:
    return word_tokenizer()


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("offline in tests")

    monkeypatch.setattr(sources, "_load_hub_dataset", offline)


@pytest.fixture
def tiny_sets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_hub: None) -> Path:
    """A PARE_DATA_DIR with TinyStories (train: t-words; validation: v-words) and WikiText-2."""
    ts = tmp_path / "tinystories"
    ts.mkdir()
    train = [words("t", 10 * i, 30) for i in range(20)]
    (ts / "train-head.txt").write_text("\n<|endoftext|>\n".join(train) + "\n<|endoftext|>\n")
    (ts / "validation-head.txt").write_text("\n\n".join(words("v", 7 * i, 25) for i in range(10)))
    wt = tmp_path / "wikitext-2-raw-v1"
    wt.mkdir()
    (wt / "wiki.test.raw").write_text(" \n = w1 = \n \n w2 w3 \n")
    (wt / "train.partial-first-1MB.txt").write_text("".join(f" {words('t', i, 50)} \n" for i in range(4)))
    monkeypatch.setenv("PARE_DATA_DIR", str(tmp_path))
    return tmp_path


# --- sources -------------------------------------------------------------------------------------


def test_txt_file_splits_on_blank_lines_and_endoftext(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("w1 w2\nw3\n\nw4 w5\n\n\nw6\n")
    assert load_documents(str(plain), "train") == ["w1 w2\nw3", "w4 w5", "w6"]
    assert load_text(str(plain)) == "w1 w2\nw3\n\nw4 w5\n\nw6"
    marked = tmp_path / "marked.txt"
    marked.write_text("w1\n\nw2\n<|endoftext|>\nw3\n<|endoftext|>\n")
    assert load_documents(str(marked), "train") == ["w1\n\nw2", "w3"]


def test_jsonl_json_gz_and_json_array_files(tmp_path: Path) -> None:
    records = [{"text": "w1 w2", "url": "u"}, {"text": "w3"}]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    gz = tmp_path / "b.json.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in records))
    array = tmp_path / "c.json"
    array.write_text(json.dumps(["w1 w2", "w3"]))
    for path in (jsonl, gz, array):
        assert load_documents(str(path), "test") == ["w1 w2", "w3"]


def test_parquet_file(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": ["", " w1 \n", "w2"]}), path)
    assert load_documents(str(path), "test") == ["", " w1 \n", "w2"]


def test_json_record_without_text_field_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"content": "w1"}) + "\n")
    with pytest.raises(ConfigError, match="content"):
        load_documents(str(path), "train")


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(ConfigError) as err:
        load_documents("wikitext103", "test")
    for name in ("wikitext2", "ptb", "c4", "tinystories"):
        assert name in str(err.value)


def test_unknown_split_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="split"):
        load_documents("wikitext2", "dev")
    with pytest.raises(DataNotFoundError):
        load_documents(str(tmp_path / "nope.jsonl"), "train")


def test_missing_data_lists_every_place_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_hub: None
) -> None:
    monkeypatch.setenv("PARE_DATA_DIR", str(tmp_path))
    with pytest.raises(DataNotFoundError) as err:
        load_documents("wikitext2", "test")
    message = str(err.value)
    assert str(tmp_path / "wikitext-2-raw-v1" / "wiki.test.raw") in message
    assert str(tmp_path / "wikitext-2-raw-v1" / "test-00000-of-00001.parquet") in message
    assert "datasets.load_dataset('wikitext', 'wikitext-2-raw-v1', split='test')" in message
    assert "offline in tests" in message
    assert "PARE_DATA_DIR" in message and "pare[data]" in message


def test_data_dir_env_then_shared_beside_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARE_DATA_DIR", str(tmp_path / "x"))
    assert data_dir() == tmp_path / "x"
    monkeypatch.delenv("PARE_DATA_DIR")
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "main").mkdir()
    monkeypatch.chdir(tmp_path / "main")
    found = data_dir()
    assert found is not None and found.resolve() == (tmp_path / "shared" / "data").resolve()


def test_the_places_looked_read_the_same_for_every_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    looked: list[str] = []
    monkeypatch.setenv("PARE_DATA_DIR", str(tmp_path))
    assert sources.local_data_root(looked) == tmp_path and looked == []
    monkeypatch.delenv("PARE_DATA_DIR")
    places = [tmp_path / "a", tmp_path / "b"]
    monkeypatch.setattr(sources, "_default_data_dirs", lambda: places)
    assert sources.local_data_root(looked) is None
    assert looked == [f"local copies: PARE_DATA_DIR is not set, and neither {places[0]} nor {places[1]} exists"]
    assert sources.hub_failure("load()", ImportError("x")) == "load(): the datasets package is not installed"
    assert sources.hub_failure("load()", ConnectionError("offline\nmore")) == "load(): ConnectionError: offline"
    assert sources.hub_failure("load()", ValueError()) == "load(): ValueError: "


def test_named_sets_read_local_copies(tiny_sets: Path) -> None:
    # the wikitext loader keeps blank rows as "" so that "\n\n".join reproduces the papers' text
    assert load_documents("wikitext2", "test") == ["", " = w1 = \n", "", " w2 w3 \n"]
    assert load_text("wikitext2", "test") == "\n\n = w1 = \n\n\n\n\n w2 w3 \n"
    assert load_documents("tinystories", "test") == load_documents("tinystories", "validation")
    assert len(load_documents("tinystories", "train")) == 20


# --- tokens --------------------------------------------------------------------------------------


def test_eval_token_ids_tokenizes_once_with_one_bos(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = tmp_path / "eval.txt"
    path.write_text(words("w", 0, 300) + "\n\n" + words("w", 5, 200))
    ids = eval_token_ids(tok, str(path))
    assert ids.shape == (1, 501) and ids.dtype == torch.long
    assert ids[0, 0] == 1 and (ids[0, 1:] != 1).all()
    assert eval_token_ids(tok, str(path), max_tokens=64).shape == (1, 64)
    with pytest.raises(ConfigError):
        eval_token_ids(tok, str(path), max_tokens=0)


def test_windows_are_seeded_reproducible_and_from_train(tiny_sets: Path, tok: PreTrainedTokenizerFast) -> None:
    a = calibration_windows(tok, "tinystories", nsamples=4, seqlen=16, seed=3)
    b = calibration_windows(tok, "tinystories", nsamples=4, seqlen=16, seed=3)
    c = calibration_windows(tok, "tinystories", nsamples=4, seqlen=16, seed=4)
    assert a.shape == (4, 16) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    train_ids = set(range(3 + N_WORDS, 3 + 2 * N_WORDS)) | {1}  # t-words and BOS, no v-words
    assert set(a.flatten().tolist()) <= train_ids


def test_document_protocol_matches_get_c4(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    docs = [words("w", 13 * i, 20 + 9 * i) for i in range(12)]
    path = tmp_path / "c4.jsonl"
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    got = calibration_windows(tok, str(path), nsamples=5, seqlen=32, seed=7)
    # SparseGPT/Wanda get_c4, with a local generator instead of random.seed
    rng, expected = random.Random(7), []
    encoded = [tok(d)["input_ids"] for d in docs]
    while len(expected) < 5:
        ids = encoded[rng.randint(0, len(docs) - 1)]
        if len(ids) <= 32:
            continue
        start = rng.randint(0, len(ids) - 32 - 1)
        expected.append(ids[start : start + 32])
    assert got.tolist() == expected


def test_short_documents_are_concatenated(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = tmp_path / "short.jsonl"
    path.write_text("\n".join(json.dumps({"text": words("w", 5 * i, 6)}) for i in range(40)))
    windows = calibration_windows(tok, str(path), nsamples=3, seqlen=20, seed=0)
    assert windows.shape == (3, 20)
    # each document brings its own BOS, so a 20-token window spans documents and holds a BOS
    assert all((w == 1).any() for w in windows)
    no_bos = word_tokenizer(bos=False)
    windows = calibration_windows(no_bos, str(path), nsamples=3, seqlen=20, seed=0)
    assert all((w == no_bos.eos_token_id).any() for w in windows)


def test_wikitext_train_is_one_stream(tiny_sets: Path, tok: PreTrainedTokenizerFast) -> None:
    windows = calibration_windows(tok, "wikitext2", nsamples=3, seqlen=40, seed=1)
    stream = tok(load_text("wikitext2", "train"))["input_ids"]
    rng = random.Random(1)
    starts = [rng.randint(0, len(stream) - 40 - 1) for _ in range(3)]
    assert windows.tolist() == [stream[s : s + 40] for s in starts]


def test_not_enough_tokens(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = tmp_path / "small.txt"
    path.write_text(words("w", 0, 30))  # 31 tokens with BOS
    with pytest.raises(NotEnoughDataError, match="31 tokens"):
        calibration_windows(tok, str(path), nsamples=1, seqlen=64)
    with pytest.raises(NotEnoughDataError, match="nsamples"):
        calibration_windows(tok, str(path), nsamples=4, seqlen=16)
    assert calibration_windows(tok, str(path), nsamples=4, seqlen=16, allow_repeats=True).shape == (4, 16)


@pytest.mark.parametrize(("nsamples", "seqlen"), [(0, 8), (4, 0), (-1, 8), (2.5, 8)])
def test_sizes_must_be_positive(tmp_path: Path, tok: PreTrainedTokenizerFast, nsamples: int, seqlen: int) -> None:
    path = tmp_path / "t.txt"
    path.write_text(words("w", 0, 100))
    with pytest.raises(ConfigError):
        calibration_windows(tok, str(path), nsamples=nsamples, seqlen=seqlen)


def test_split_labels_say_which_text_is_scored() -> None:
    from pare.calibration.sources import split_label

    assert split_label("tinystories", "test") == "validation"
    assert split_label("c4", "test") == "validation"
    assert split_label("wikitext2", "test") == "test"
    assert split_label("some/file.txt", "test") == "test"
