"""Where the text comes from: local copies of the named sets, local files, or the Hub.

Named sets (``wikitext2``, ``ptb``, ``c4``, ``tinystories``) are looked up under :func:`data_dir`
first (full copies, then the partial ones in ``../shared``), then through ``datasets.load_dataset``
with the ids the published pruning code uses. Each reader returns the documents (rows) of a file.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pare.errors import ConfigError, DataNotFoundError

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".json.gz", ".jsonl.gz", ".parquet")
END_OF_TEXT = "<|endoftext|>"
C4_EVAL_DOCUMENTS = 1100

Reader = Callable[[Path], list[str]]


def data_dir() -> Path | None:
    """Where pare looks for local copies of the named data sets.

    Returns:
        ``$PARE_DATA_DIR`` when set (whether or not it exists), else the first existing of
        ``<cwd>/../shared/data`` and ``<repo>/../shared/data``, else None.
    """
    env = os.environ.get("PARE_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return next((d for d in _default_data_dirs() if d.is_dir()), None)


def _default_data_dirs() -> list[Path]:
    repo = Path(__file__).resolve().parents[3]
    return [Path.cwd().parent / "shared" / "data", repo.parent / "shared" / "data"]


def local_data_root(looked: list[str]) -> Path | None:
    """:func:`data_dir`; when there is none, None, with the reason added to ``looked`` (the places a
    :class:`DataNotFoundError` lists)."""
    root = data_dir()
    if root is None:
        dirs = " nor ".join(str(p) for p in _default_data_dirs())
        looked.append(f"local copies: PARE_DATA_DIR is not set, and neither {dirs} exists")
    return root


def hub_failure(call: str, exc: Exception) -> str:
    """A failed Hub load (``call`` describes it) as one of the places a :class:`DataNotFoundError` lists."""
    if isinstance(exc, ImportError):
        return f"{call}: the datasets package is not installed"
    return f"{call}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


# ---------------------------------------------------------------------------------------------
# File readers: each returns the documents (rows) of one file.


class _UnreadableError(Exception):
    """A local file exists but cannot be read here (pyarrow missing): try the next candidate."""


def _open(path: Path) -> TextIO:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_wikitext_raw(path: Path) -> list[str]:
    """Rows as the ``wikitext`` loader yields them: each line with its newline; blank lines -> ""."""
    with _open(path) as f:
        return [row if row.strip() else "" for row in f]


def _read_stripped_lines(path: Path) -> list[str]:
    """One sentence per line, stripped, as the ``ptb_text_only`` loader yields them."""
    with _open(path) as f:
        return [line.strip() for line in f]


def _read_txt_documents(path: Path) -> list[str]:
    """Documents split on ``<|endoftext|>`` when the file has it, else on blank lines."""
    with _open(path) as f:
        text = f.read()
    parts = text.split(END_OF_TEXT) if END_OF_TEXT in text else re.split(r"\n[ \t]*\n", text)
    return [p.strip() for p in parts if p.strip()]


def _record_text(record: Any, path: Path, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    fields = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ConfigError(f"{path} {where}: expected a string or an object with a 'text' field, got {fields}")


def _read_json(path: Path) -> list[str]:
    """A JSON array of strings/objects, or JSON lines (one object per line; C4's .json.gz)."""
    with _open(path) as f:
        text = f.read()
    try:
        if text.lstrip().startswith("["):
            return [_record_text(r, path, f"item {i}") for i, r in enumerate(json.loads(text))]
        # split on "\n" only: JSON strings may hold raw U+2028, which str.splitlines would break on
        lines = [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
        return [_record_text(json.loads(line), path, f"line {n}") for n, line in lines]
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON or JSON lines: {exc}") from exc


def _read_parquet(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise _UnreadableError("reading .parquet needs pyarrow: pip install 'pare[data]'") from exc
    table = pq.read_table(path)
    if "text" not in table.column_names:
        raise ConfigError(f"{path} has no 'text' column; its columns are {table.column_names}")
    return [t or "" for t in table.column("text").to_pylist()]


def _checked(reader: Reader) -> Reader:
    """``reader``, with a ConfigError when the file is not UTF-8 text or not a whole gzip stream (a binary
    file given as text, a truncated download) instead of a decoding traceback."""

    def read(path: Path) -> list[str]:
        try:
            return reader(path)
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start} cannot be decoded): pass a text file "
                              f"saved as UTF-8 ({', '.join(FILE_SUFFIXES)}) or a named set such as c4") from None
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise ConfigError(f"{path} is not a complete gzip file ({exc}): download it again, or pass it "
                              "uncompressed") from None

    return read


def _reader_for(path: Path) -> Reader:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return _checked(_read_parquet)
    if name.endswith((".jsonl", ".json", ".json.gz", ".jsonl.gz")):
        return _checked(_read_json)
    if name.endswith(".txt"):
        return _checked(_read_txt_documents)
    raise ConfigError(f"{path}: unsupported file type; pare reads {', '.join(FILE_SUFFIXES)}")


# ---------------------------------------------------------------------------------------------
# Named sets.


@dataclass(frozen=True)
class _HubSource:
    path: str
    name: str | None
    column: str
    splits: dict[str, str]  # pare split -> hub split
    data_files: dict[str, str] = field(default_factory=dict)  # hub split -> file in the repo

    def describe(self, split: str) -> str:
        hub_split = self.splits[split]
        args = [repr(self.path)] + ([repr(self.name)] if self.name else [])
        if hub_split in self.data_files:
            args.append(f"data_files={{{hub_split!r}: {self.data_files[hub_split]!r}}}")
        return f"datasets.load_dataset({', '.join([*args, f'split={hub_split!r}'])})"


@dataclass(frozen=True)
class _NamedSet:
    local: dict[str, tuple[tuple[str, Reader], ...]]  # split -> (path under data_dir, reader)
    hub: _HubSource
    documents: bool  # calibrate with get_c4's document protocol rather than one token stream
    eval_join: str
    train_join: str
    eval_max_documents: int | None = None


def _files(reader: Reader, *paths: str) -> tuple[tuple[str, Reader], ...]:
    return tuple((path, _checked(reader)) for path in paths)


_WT = "wikitext-2-raw-v1/"
_TS = "tinystories/"
_SAME_SPLITS = {s: s for s in SPLITS}
_NO_TEST = {"train": "train", "validation": "validation", "test": "validation"}  # test = validation
_C4_TRAIN = "c4-train.00000-of-01024.json.gz"
_C4_VALID = "c4-validation.00000-of-00008.json.gz"
_C4_HUB = f"en/{_C4_VALID}"
_C4_EVAL = _files(_read_json, f"c4/{_C4_VALID}", "c4/c4-sample-1000.json.gz")
_TS_EVAL = _files(_read_txt_documents, _TS + "TinyStories-valid.txt", _TS + "validation-head.txt")

# Full copies first (a user may put them in PARE_DATA_DIR), then the partial ones in ../shared.
_NAMED: dict[str, _NamedSet] = {
    "wikitext2": _NamedSet(
        {
            "train": _files(_read_parquet, _WT + "train-00000-of-00001.parquet")
            + _files(_read_wikitext_raw, _WT + "wiki.train.raw", _WT + "train.partial-first-1MB.txt"),
            "validation": _files(_read_parquet, _WT + "validation-00000-of-00001.parquet")
            + _files(_read_wikitext_raw, _WT + "wiki.valid.raw"),
            "test": _files(_read_parquet, _WT + "test-00000-of-00001.parquet")
            + _files(_read_wikitext_raw, _WT + "wiki.test.raw"),
        },
        _HubSource("wikitext", "wikitext-2-raw-v1", "text", _SAME_SPLITS),
        documents=False, eval_join="\n\n", train_join=" ",
    ),
    "ptb": _NamedSet(
        {s: _files(_read_stripped_lines, f"ptb/ptb.{s[:5]}.txt") for s in SPLITS},  # ptb.valid.txt
        _HubSource("ptb_text_only", "penn_treebank", "sentence", _SAME_SPLITS),
        documents=False, eval_join=" ", train_join=" ",
    ),
    "c4": _NamedSet(
        {
            "train": _files(_read_json, f"c4/{_C4_TRAIN}", "c4/c4-train.00000-of-01024.first1000.jsonl"),
            "validation": _C4_EVAL,
            "test": _C4_EVAL,
        },
        _HubSource("allenai/c4", None, "text", _NO_TEST, {"train": f"en/{_C4_TRAIN}", "validation": _C4_HUB}),
        documents=True, eval_join=" ", train_join="\n\n", eval_max_documents=C4_EVAL_DOCUMENTS,
    ),
    "tinystories": _NamedSet(
        {
            "train": _files(_read_txt_documents, _TS + "TinyStories-train.txt", _TS + "train-head.txt"),
            "validation": _TS_EVAL,
            "test": _TS_EVAL,
        },
        _HubSource("roneneldan/TinyStories", None, "text", _NO_TEST),
        documents=True, eval_join="\n\n", train_join="\n\n",
    ),
}

_ALIASES = {"wikitext": "wikitext2", "wikitext-2": "wikitext2", "penn_treebank": "ptb"}
DATASETS = tuple(_NAMED)


def _load_hub_dataset(path: str, name: str | None, split: str, data_files: dict[str, str] | None) -> Any:
    """``datasets.load_dataset`` (imported lazily: it is an optional extra). Tests replace this."""
    import datasets

    kwargs: dict[str, Any] = {"data_files": data_files} if data_files else {}
    return datasets.load_dataset(path, name, split=split, **kwargs)


def split_label(source: str, split: str) -> str:
    """The split a named set really serves for ``split`` (C4 and TinyStories have no test split:
    their validation text is used), for labels; a file path keeps the name asked."""
    name = _named(source)
    return _NAMED[name].hub.splits.get(split, split) if name else split


def _named(source: str) -> str | None:
    key = _ALIASES.get(source.lower(), source.lower())
    return key if key in _NAMED else None


def _source_path(source: str) -> Path:
    """The local file ``source`` names; ConfigError if it is neither a known set nor a file."""
    path = Path(source).expanduser()
    looks_like_path = source.lower().endswith(FILE_SUFFIXES) or "/" in source or os.sep in source
    if not looks_like_path and not path.exists():
        raise ConfigError(
            f"unknown data set {source!r}: known names are {', '.join(DATASETS)}; "
            f"or pass a path to a {', '.join(FILE_SUFFIXES)} file"
        )
    if not path.is_file():
        raise DataNotFoundError(f"data file {path} does not exist or is not a file (source {source!r})")
    return path


def _load_named(name: str, split: str) -> list[str]:
    spec = _NAMED[name]
    looked: list[str] = []
    root = local_data_root(looked)
    if root is not None:
        for rel, reader in spec.local[split]:
            path = root / rel
            if not path.is_file():
                looked.append(f"{path} (missing)")
                continue
            try:
                docs = reader(path)
            except _UnreadableError as exc:
                looked.append(f"{path} (unreadable: {exc})")
                continue
            partial = " (a partial copy)" if "partial" in path.name or "-head" in path.name else ""
            logger.info("%s %s: %d documents from %s%s", name, split, len(docs), path, partial)
            return docs
    hub, call = spec.hub, spec.hub.describe(split)
    hub_split = hub.splits[split]
    files = {hub_split: hub.data_files[hub_split]} if hub_split in hub.data_files else None
    try:
        dataset = _load_hub_dataset(hub.path, hub.name, hub_split, files)
        docs = [t or "" for t in dataset[hub.column]]
    except Exception as exc:  # any hub failure (offline, missing, renamed) means "not found there"
        looked.append(hub_failure(call, exc))
    else:
        logger.info("%s %s: %d documents from %s", name, split, len(docs), call)
        return docs
    raise DataNotFoundError(_not_found_message(name, split, looked))


def _not_found_message(name: str, split: str, looked: list[str]) -> str:
    wanted = " or ".join(rel for rel, _ in _NAMED[name].local[split])
    return (
        f"could not find the {split!r} split of {name!r}. Looked in:\n"
        + "".join(f"  - {place}\n" for place in looked)
        + "Fix: set PARE_DATA_DIR to a directory holding "
        + f"{wanted}; or pip install 'pare[data]' and allow network access so datasets can "
        + f"download it; or pass a local {', '.join(FILE_SUFFIXES)} file as the source."
    )
