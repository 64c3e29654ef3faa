"""Text data sets for calibration and evaluation: named sets, local files, token windows.

Named sets (``wikitext2``, ``ptb``, ``c4``, ``tinystories``; splits ``train``, ``validation``,
``test``) are read from local copies under :func:`data_dir` when present, and otherwise from the
Hugging Face Hub with ``datasets.load_dataset`` (the optional ``pare[data]`` extra), with the same
ids the published pruning code uses. Any local ``.txt``, ``.jsonl``, ``.json``, ``.json.gz`` or
``.parquet`` file also works as a source (JSON and Parquet records carry their text in ``text``).

Protocols, following the published SparseGPT (Frantar & Alistarh, 2023) and Wanda (Sun et al., 2023)
``datautils``/``data.py``, so figures are comparable with their tables:

* WikiText-2 evaluation: the test rows joined with ``"\\n\\n"``, tokenized once (341,469 Llama-2
  tokens including BOS). Calibration: the train rows joined with ``" "``, then random windows.
* PTB: sentences joined with ``" "`` for both train and evaluation, as in SparseGPT's final code
  (GPTQ's older ``get_ptb`` joined the *validation* split with ``"\\n\\n"``; pass
  ``split="validation"`` and build the text yourself to reproduce that variant).
* C4 evaluation: the first 1,100 validation documents joined with ``" "``; the papers then keep the
  first ``256 * seqlen`` tokens (pass ``max_tokens`` to :func:`eval_token_ids`). Calibration
  (``get_c4``): draw a random document with more than ``seqlen`` tokens, then a random window in it.
* TinyStories (no published pruning protocol): stories joined with ``"\\n\\n"`` for evaluation;
  calibration as for C4, or from the concatenated stories when the stories are shorter than
  ``seqlen`` (see :func:`calibration_windows`).

All randomness comes from ``random.Random(seed)``, which draws the same numbers as the papers'
``random.seed(seed)`` without touching the global generator.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pare.calibration.sources import (  # noqa: F401  (re-exported: the public data API)
    _NAMED,
    C4_EVAL_DOCUMENTS,
    DATASETS,
    END_OF_TEXT,
    FILE_SUFFIXES,
    SPLITS,
    _load_named,
    _named,
    _open,
    _reader_for,
    _source_path,
    data_dir,
)
from pare.errors import ConfigError, NotEnoughDataError

logger = logging.getLogger(__name__)

# Document sets larger than this (in characters) are tokenized lazily, one drawn document at a
# time, like the reference get_c4; smaller ones are tokenized up front so pare can check them.
_EAGER_CHARS = 16_000_000
# Lazy mode only: give up on the document protocol after this many too-short draws in a row.
_MAX_MISSES = 10_000
_BATCH_DOCS = 1000


def load_documents(source: str, split: str) -> list[str]:
    """The documents (rows, sentences, stories) of a named set's split or of a local file.

    Args:
        source: a name in :data:`DATASETS` or a path to a ``.txt``/``.jsonl``/``.json``/
            ``.json.gz``/``.parquet`` file. A file is a single split: ``split`` is ignored.
        split: ``"train"``, ``"validation"`` or ``"test"``.

    Returns:
        The documents in order, as the ``datasets`` loader yields them (WikiText-2 keeps its
        empty rows, so joining reproduces the papers' text).

    Raises:
        ConfigError: unknown name, split or file type.
        DataNotFoundError: no local copy and the Hub loader failed; lists every place looked.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    name = _named(source)
    if name is not None:
        return _load_named(name, split)
    path = _source_path(source)
    docs = _reader_for(path)(path)
    logger.info("%d documents from %s", len(docs), path)
    return docs


def load_text(source: str, split: str = "test") -> str:
    """One string in the published protocol for ``source`` and ``split`` (see the module doc).

    Evaluation splits of WikiText-2 join rows with ``"\\n\\n"``, PTB and C4 with ``" "`` (C4:
    first 1,100 documents); train splits join as the papers' calibration does. Local files join
    their documents with ``"\\n\\n"``.
    """
    return _join(source, split, load_documents(source, split))


def _join(source: str, split: str, docs: list[str]) -> str:
    name = _named(source)
    if name is None:
        return "\n\n".join(docs)
    spec = _NAMED[name]
    if split == "train":
        return spec.train_join.join(docs)
    return spec.eval_join.join(docs[: spec.eval_max_documents])


# ---------------------------------------------------------------------------------------------
# Tokens.


def _encode(tokenizer: Any, text: str | list[str], add_special_tokens: bool = True) -> Any:
    # verbose=False: long evaluation texts exceed model_max_length on purpose (they are cut into
    # windows later), so transformers' "sequence longer than max length" warning is noise here.
    return tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]


def _check_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        logger.warning("%s is a slow tokenizer: long texts take minutes; load a fast one (use_fast=True)",
                       type(tokenizer).__name__)


def eval_token_ids(
    tokenizer: Any, source: str, split: str = "test", max_tokens: int | None = None
) -> torch.Tensor:
    """Token ids of :func:`load_text`, tokenized once with the tokenizer's default special tokens.

    Args:
        tokenizer: a Hugging Face tokenizer (fast ones take seconds on WikiText-2's 1.3 MB).
        source: a named set or a local file (see :func:`load_documents`).
        split: the evaluation split.
        max_tokens: keep only the first ``max_tokens`` ids (the C4 protocol keeps
            ``256 * seqlen``).

    Returns:
        LongTensor ``[1, N]``; Llama-2's starts with one BOS. WikiText-2 test gives N = 341,469
        with the Llama-2 tokenizer and 287,644 with GPT-2's.
    """
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"max_tokens must be a positive number of tokens or None, got {max_tokens}")
    _check_fast(tokenizer)
    ids = _encode(tokenizer, load_text(source, split))
    ids = ids[:max_tokens]  # a None bound keeps all
    if not ids:
        raise NotEnoughDataError(f"{source!r} ({split}) holds no text to evaluate on")
    return torch.tensor([ids], dtype=torch.long)


class _DocumentTokens:
    """Token ids of documents, encoded on demand (or all at once) and cached."""

    def __init__(self, tokenizer: Any, docs: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.docs = docs
        self.ids: dict[int, list[int]] = {}

    def __getitem__(self, i: int) -> list[int]:
        if i not in self.ids:
            self.ids[i] = _encode(self.tokenizer, self.docs[i])
        return self.ids[i]

    def encode_all(self) -> None:
        for start in range(0, len(self.docs), _BATCH_DOCS):
            batch = list(self.docs[start : start + _BATCH_DOCS])
            for offset, ids in enumerate(_encode(self.tokenizer, batch)):
                self.ids[start + offset] = ids

    def stream(self, max_tokens: int | None = None) -> list[int]:
        """Documents in order, concatenated. Each carries the tokenizer's own special tokens
        (Llama: a BOS per document, as llama2.c trains on TinyStories); a tokenizer that adds none
        gets its EOS (or "\\n\\n" without one) between documents, as GPT-2 was trained."""
        probe = _encode(self.tokenizer, "a")
        adds_special = len(probe) != len(_encode(self.tokenizer, "a", add_special_tokens=False))
        eos = getattr(self.tokenizer, "eos_token_id", None)
        sep: list[int] = [] if adds_special else [eos] if eos is not None else _encode(
            self.tokenizer, "\n\n", add_special_tokens=False)
        out: list[int] = []
        for i in range(len(self.docs)):
            if max_tokens is not None and len(out) >= max_tokens:
                break
            out.extend(self[i] if not out else sep + self[i])
        return out


def _document_windows(
    tokens: _DocumentTokens, nsamples: int, seqlen: int, rng: random.Random, allow_repeats: bool
) -> torch.Tensor | None:
    """SparseGPT/Wanda ``get_c4``: a random document with more than ``seqlen`` tokens, then a
    random window in it. None when too few documents are that long (use the stream instead)."""
    eager = len(tokens.ids) == len(tokens.docs)
    if eager:
        long_tokens = sum(len(ids) for ids in tokens.ids.values() if len(ids) > seqlen)
        if long_tokens == 0 or (long_tokens < nsamples * seqlen and not allow_repeats):
            logger.warning("documents longer than seqlen=%d hold %d tokens (< nsamples*seqlen=%d): "
                           "drawing windows from the concatenated documents", seqlen, long_tokens,
                           nsamples * seqlen)
            return None
    windows: list[list[int]] = []
    misses = 0
    while len(windows) < nsamples:
        ids = tokens[rng.randint(0, len(tokens.docs) - 1)]
        if len(ids) <= seqlen:
            misses += 1
            if misses > _MAX_MISSES:
                logger.warning("%d draws found no document longer than seqlen=%d", misses, seqlen)
                return None
            continue
        misses = 0
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.tensor(windows, dtype=torch.long)


def check_ids_in_vocab(model: Any, ids: torch.Tensor, what: str) -> None:
    """Raise ConfigError when a token id does not index the model's input embedding (``what``: the
    ids' role, for the message): the tokenizer belongs to another model."""
    get_embeddings: Any = model.get_input_embeddings
    vocab = getattr(get_embeddings(), "num_embeddings", None)
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise ConfigError(f"{what} token ids run from {lo} to {hi}, but the model's embedding has {vocab} rows: "
                          "the tokenizer does not match the model; tokenize with the model's own tokenizer")


def _stream_windows(
    ids: list[int], nsamples: int, seqlen: int, rng: random.Random, allow_repeats: bool, label: str
) -> torch.Tensor:
    """SparseGPT/Wanda ``get_wikitext2``: windows at random starts in one token stream."""
    n = len(ids)
    if n < 3:
        raise NotEnoughDataError(f"{label} holds {n} tokens: is it empty? Give a text file with real content, "
                                 "or a named source (c4, wikitext2, ptb, tinystories)")
    if n < seqlen + 1:
        raise NotEnoughDataError(
            f"{label} holds {n} tokens; one calibration window of seqlen={seqlen} needs at least "
            f"{seqlen + 1}. Use seqlen <= {max(n - 1, 0)}, or a larger source (c4, wikitext2, a file)"
        )
    if n < nsamples * seqlen and not allow_repeats:
        raise NotEnoughDataError(
            f"{label} holds {n} tokens, fewer than nsamples*seqlen = {nsamples}*{seqlen} = "
            f"{nsamples * seqlen}, so the windows would repeat tokens. Use nsamples <= {n // seqlen} "
            f"at this seqlen, a smaller seqlen, a larger source (e.g. c4), or allow_repeats=True (--allow-repeats)"
        )
    stream = torch.tensor(ids, dtype=torch.long)
    starts = [rng.randint(0, n - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([stream[s : s + seqlen] for s in starts])


def _is_document_source(source: str, name: str | None) -> bool:
    """Whether a source is a set of separate documents (get_c4) rather than one text stream."""
    if name is not None:
        return _NAMED[name].documents
    path = Path(source).expanduser()
    lower = path.name.lower()
    if lower.endswith(".parquet"):
        return False  # rows, as in WikiText-2's parquet files
    if lower.endswith(".txt"):
        with _open(path) as f:
            return END_OF_TEXT in f.read()
    return True


def calibration_windows(
    tokenizer: Any,
    source: str,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    split: str = "train",
    *,
    allow_repeats: bool = False,
) -> torch.Tensor:
    """Seeded random windows of ``seqlen`` tokens for calibration, as the papers draw them.

    Document sets (C4, TinyStories, JSON files, ``.txt`` files with ``<|endoftext|>``) follow
    ``get_c4``: a random document with at least ``seqlen + 1`` tokens, then a random window in it.
    When the documents that long hold fewer than ``nsamples * seqlen`` tokens (TinyStories'
    stories are short), the documents are concatenated (see :class:`_DocumentTokens`) and the
    windows drawn from that stream. Other sources (WikiText-2, PTB, plain text) are tokenized once
    as :func:`load_text` joins them, with windows at random starts (``get_wikitext2``).

    Args:
        tokenizer: a Hugging Face tokenizer.
        source: a named set or a local file.
        nsamples: number of windows.
        seqlen: tokens per window.
        seed: seeds a local ``random.Random``; the same seed gives the same windows.
        split: the split to draw from; keep ``"train"`` so evaluation data stays unseen.
        allow_repeats: accept a source with fewer than ``nsamples * seqlen`` tokens (windows then
            overlap).

    Returns:
        LongTensor ``[nsamples, seqlen]``.

    Raises:
        ConfigError: nsamples or seqlen not positive; unknown source or split.
        DataNotFoundError: the split is nowhere to be found (PTB's train split is not in
            ``../shared``).
        NotEnoughDataError: the source holds too few tokens; the message says what would work.
    """
    for arg, value in (("nsamples", nsamples), ("seqlen", seqlen)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{arg} must be a positive integer, got {value!r}")
    name = _named(source)
    if name is not None and split != "train":
        logger.warning("calibrating on the %r split of %s, which evaluation also uses", split, name)
    _check_fast(tokenizer)
    docs = load_documents(source, split)
    label = f"{source!r} ({split})" if name is not None else repr(source)
    rng = random.Random(seed)
    if not _is_document_source(source, name):
        ids = _encode(tokenizer, _join(source, split, docs))
        return _stream_windows(ids, nsamples, seqlen, rng, allow_repeats, label)
    tokens = _DocumentTokens(tokenizer, docs)
    eager = sum(len(d) for d in docs) <= _EAGER_CHARS
    if eager:
        tokens.encode_all()
    windows = _document_windows(tokens, nsamples, seqlen, rng, allow_repeats)
    if windows is not None:
        return windows
    stream = tokens.stream(None if eager else 8 * nsamples * seqlen)
    return _stream_windows(stream, nsamples, seqlen, rng, allow_repeats, label)
