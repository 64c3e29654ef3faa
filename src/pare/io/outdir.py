"""The output directory of a save: what may be replaced, stale leftovers, and the final rename.

A save writes into a hidden sibling ``.<out>.tmp-<pid>-<random>`` and renames it into place. What
``pare.save`` promises, and how this module keeps it:

* It never replaces the working directory or a directory holding it, nor the input model's
  directory or a directory holding it (:func:`check_output`).
* ``overwrite`` replaces only a directory that holds a saved model: a ``pare.json`` written by pare,
  or a ``config.json`` with a ``model_type`` plus weight files, and nothing but the files a save
  writes, or an empty directory (:func:`saved_model_problem`).
* Without ``overwrite`` the finished model is moved into place by a rename that fails when anything
  exists at ``out`` by then (Linux ``renameat2(RENAME_NOREPLACE)``). Where that call is missing (not
  Linux, an old libc, a file system without it) a check is followed by ``os.rename``, which also
  refuses a non-empty directory or a file; only an *empty* directory created in the instant between
  the check and the rename could be replaced, and it holds no data. If the target appeared while the
  weights were written, the finished model is kept beside it under a visible name that the error
  names (:func:`move_into_place`).
* With ``overwrite`` the swap is atomic where ``renameat2(RENAME_EXCHANGE)`` exists: ``out`` always
  holds a complete model (the old one or the new one). The directory swapped out is checked again
  once it sits under pare's private name (nobody else writes there); if it no longer holds a saved
  model (replaced by someone else in the meantime) the swap is undone and the save refused. Without
  that call the old directory is renamed aside as ``.<out>.old-<pid>``, checked, then the new one
  renamed in; the old copy is deleted right after, so no second copy stays after a successful save.
* A save killed (``kill -9``, power loss) leaves its ``.tmp-<pid>-...`` or ``.old-<pid>`` sibling
  behind. The next save to the same place removes those whose process is gone and says so
  (:func:`remove_stale`); ``out`` itself is never half-written.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from pare.errors import ConfigError, OutputExistsError

log = logging.getLogger(__name__)

MANIFEST = "pare.json"

SAVE_FILES = frozenset({
    "config.json", "generation_config.json", MANIFEST, "model.safetensors.index.json",
    "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json", "tokenizer.tiktoken",
    "bpe.codes", "preprocessor_config.json", "processor_config.json", "pare_export.json",
})
"""Files a save writes (the model's, the tokenizer's, the manifest), besides the weight files."""
WEIGHTS = re.compile(r"^(model(-\d{5}-of-\d{5})?\.safetensors|pytorch_model(-\d{5}-of-\d{5})?\.bin)$")
TEMPLATES_DIR = "additional_chat_templates"  # the one sub-directory a tokenizer save writes (*.jinja)

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


# --------------------------------------------------------------------------- what may be replaced
def saved_model_problem(path: Path) -> str | None:
    """Why the existing directory ``path`` is not a saved model that ``overwrite`` may replace, or None.

    A saved model has a ``pare.json`` written by pare (its ``method`` and ``versions.pare``), or a
    ``config.json`` with a ``model_type`` plus weight files; and nothing else than the files a save
    writes (config, generation config, weights and their index, tokenizer files, ``pare.json``). An
    empty directory holds nothing to lose: it may be replaced too.
    """
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return None
    others = [n for n in names if not _save_writes(path / n)]
    if others:
        return (f"it holds {len(others)} entr{'y' if len(others) == 1 else 'ies'} a save does not write "
                f"({', '.join(others[:5])}{', ...' if len(others) > 5 else ''})")
    if _pare_manifest(path / MANIFEST):
        return None
    weights = [n for n in names if WEIGHTS.match(n)]
    model_type = _model_type(path / "config.json")
    if model_type and weights:
        return None
    found = ", ".join(names[:5])
    missing = "a config.json with a model_type" if not model_type else "weight files (*.safetensors)"
    return f"it has no pare.json written by pare and lacks {missing} (found {found})"


def _save_writes(path: Path) -> bool:
    if path.is_symlink():
        return False
    if path.name == TEMPLATES_DIR and path.is_dir():
        return all(p.is_file() and p.suffix == ".jinja" for p in path.iterdir())
    return path.is_file() and (path.name in SAVE_FILES or bool(WEIGHTS.match(path.name)))


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _pare_manifest(path: Path) -> bool:
    data = _read_json(path) if path.is_file() else None
    versions = data.get("versions") if data else None
    return bool(data and isinstance(data.get("method"), str) and isinstance(versions, dict) and "pare" in versions)


def _model_type(path: Path) -> str | None:
    data = _read_json(path) if path.is_file() else None
    value = data.get("model_type") if data else None
    return value if isinstance(value, str) and value else None


# --------------------------------------------------------------------------- checks before any work
def check_output(out: str | Path, overwrite: bool, source: str | Path | None = None,
                 loaded_from: str | Path | None = None) -> Path:
    """Refuse an output directory that saving would fail on or that ``overwrite`` would destroy.

    Cheap and side-effect free (a probe directory is created and removed): call it before any long
    work; :func:`pare.save` calls it again.

    Args:
        out: the output directory.
        overwrite: whether an existing saved model at ``out`` may be replaced.
        source: the input model's local directory, if any (never replaced, nor a directory holding it).
        loaded_from: the directory the model says it was loaded from (its ``name_or_path``): kept as safe.

    Returns:
        ``out`` as an absolute path.

    Raises:
        ConfigError: ``out`` is empty, the working directory or holds it, the input model's directory or
            holds it, a file or a symbolic link, or cannot be created.
        OutputExistsError: ``out`` exists and ``overwrite`` is False, or it is not a saved model.
    """
    if not str(out).strip():
        raise ConfigError("no output directory given (an empty path): name a new directory to save into")
    path = Path(out).absolute()
    real = path.resolve()
    for model_dir in (source, loaded_from):
        _check_not_source(out, real, model_dir)
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        where = "is" if real == cwd else "contains"
        raise ConfigError(f"output directory {str(out)!r} {where} the current directory: replacing it would "
                          "delete what is in it; choose another output directory (--out), a new one")
    if path.is_symlink():
        raise ConfigError(f"output path {str(out)!r} is a symbolic link: pare replaces only a real directory; "
                          "choose another output directory (--out)")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output path {str(out)!r} is a file, not a directory: choose another output directory "
                          "(--out), or remove the file yourself")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output directory {str(out)!r} already exists; pass overwrite=True (--overwrite) "
                                "to replace it, or choose another output directory (--out)")
    if path.exists():
        problem = saved_model_problem(path)
        if problem:
            raise OutputExistsError(f"output directory {str(out)!r} does not look like a saved model: {problem}. "
                                    "pare will not replace it, even with overwrite; choose another output "
                                    "directory (--out), or remove it yourself")
    _check_writable(out, path)
    return path


def _check_not_source(out: str | Path, real: Path, source: str | Path | None) -> None:
    if source is None or not str(source) or not Path(source).exists():
        return
    src = Path(source).resolve()
    if real == src:
        raise ConfigError(f"output directory {str(out)!r} is the input model's directory: overwriting would "
                          "replace the model being pruned; choose another output directory (--out)")
    if real in src.parents:
        raise ConfigError(f"output directory {str(out)!r} contains the input model {str(source)!r}: replacing "
                          "it would delete the model; choose another output directory (--out)")


def _check_writable(out: str | Path, path: Path) -> None:
    """Saving creates a directory beside ``path`` (making missing parents first): try that in the
    nearest existing ancestor."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot write {str(out)!r}: {str(parent)!r} is a file, not a directory; choose another "
                          "output directory (--out)")
    try:
        Path(tempfile.mkdtemp(prefix=".pare-check-", dir=parent)).rmdir()
    except OSError as exc:
        raise ConfigError(f"cannot write {str(out)!r}: cannot create a directory in {str(parent)!r} "
                          f"({exc.strerror or exc}); choose another output directory (--out)") from None


# --------------------------------------------------------------------------- leftovers of killed saves
def temp_dir(path: Path) -> Path:
    """A new private directory beside ``path`` whose name carries this process id (so a later save can
    tell a leftover of a dead process from a save still running)."""
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))


def _leftover_pid(name: str, out_name: str) -> int | None:
    m = re.fullmatch(rf"\.{re.escape(out_name)}\.(?:tmp-(\d+)-[A-Za-z0-9_]+|old-(\d+))", name)
    return int(m.group(1) or m.group(2)) if m else None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(path: Path) -> list[Path]:
    """Remove the ``.<out>.tmp-<pid>-*`` / ``.<out>.old-<pid>`` siblings of ``path`` whose process is
    gone (saves killed before they finished), with a warning for each; return what was removed.

    A save killed between moving the previous model aside and renaming the new one in (only where
    ``renameat2`` is missing) leaves ``path`` absent and the previous model as ``.old-<pid>``: that one
    is put back at ``path`` instead, with a warning.
    """
    if not path.parent.is_dir():
        return []
    removed = []
    for entry in sorted(path.parent.iterdir()):
        pid = _leftover_pid(entry.name, path.name)
        if pid is None or _alive(pid) or entry.is_symlink() or not entry.is_dir():
            continue
        if ".old-" in entry.name and not os.path.lexists(path) and saved_model_problem(entry) is None:
            try:
                rename_noreplace(entry, path)
            except OSError:  # something appeared at ``path`` meanwhile: this copy is an outdated one
                pass
            else:
                log.warning("put back the model at %s: a save killed before it finished (process %d) had "
                            "moved it aside to %s", path, pid, entry)
                continue
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed.append(entry)
            log.warning("removed %s, left behind by an interrupted save to %s (process %d is gone)",
                        entry, path, pid)
    return removed


# --------------------------------------------------------------------------- the final rename
def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False when the call or the flag is not available here."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, failing with FileExistsError when anything exists at ``dst``."""
    try:
        if _renameat2(src, dst, _RENAME_NOREPLACE):
            return
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
        raise
    if os.path.lexists(dst):  # fallback: os.rename would replace an empty directory
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
        raise


def _keep_aside(tmp: Path, path: Path) -> Path:
    """Give the finished model in ``tmp`` a visible name beside ``path`` (``<out>.pare-new``, ``-2``...)."""
    for i in range(1, 1000):
        kept = path.with_name(f"{path.name}.pare-new" + (f"-{i}" if i > 1 else ""))
        try:
            rename_noreplace(tmp, kept)
            return kept
        except FileExistsError:
            continue
    return tmp


def _appeared(tmp: Path, path: Path, out: str | Path) -> OutputExistsError:
    kept = _keep_aside(tmp, path)
    return OutputExistsError(
        f"{str(out)!r} was created by someone else while the model was being written; it was left untouched. "
        f"The finished model is at {str(kept)!r}: move it into place yourself, or save again with "
        "overwrite=True (--overwrite)")


def move_into_place(tmp: Path, path: Path, out: str | Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``path``; with ``overwrite``, swap out the saved model there.

    Raises:
        OutputExistsError: ``path`` exists without ``overwrite`` (the model is kept aside, the message
            says where), or with ``overwrite`` no longer holds a saved model (nothing is changed).
    """
    if not overwrite or not os.path.lexists(path):
        try:
            rename_noreplace(tmp, path)
        except FileExistsError:
            if overwrite:  # appeared between the two lines above: swap it like any existing target
                return move_into_place(tmp, path, out, overwrite)
            raise _appeared(tmp, path, out) from None
        return
    if path.is_symlink() or not path.is_dir():
        raise OutputExistsError(f"{str(out)!r} was replaced by a file or link while the model was being written; "
                                "it was left untouched")
    try:
        swapped = _renameat2(tmp, path, _RENAME_EXCHANGE)
    except FileNotFoundError:  # removed meanwhile: nothing to swap
        return move_into_place(tmp, path, out, overwrite=False)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    aside = tmp if swapped else old
    if not swapped:
        os.rename(path, old)
    problem = saved_model_problem(aside)
    if problem:  # replaced by someone else since the check before the save: put it back
        if swapped:
            _renameat2(tmp, path, _RENAME_EXCHANGE)
        else:
            rename_noreplace(old, path)
        raise OutputExistsError(f"{str(out)!r} changed while the model was being written and no longer looks "
                                f"like a saved model: {problem}. It was left untouched; nothing was written")
    if swapped:
        os.rename(tmp, old)  # checked: from here on only ever deleted, under a name settle() knows
    else:
        try:
            rename_noreplace(tmp, path)
        except FileExistsError:
            raise _appeared(tmp, path, out) from None
    shutil.rmtree(old, ignore_errors=True)
    if old.exists():
        log.warning("could not remove the replaced model at %s; remove it yourself", old)
    return None


def identity(path: Path) -> tuple[int, int]:
    """(device, inode) of ``path``: tells afterwards whether a rename put it somewhere."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def settle(tmp: Path, path: Path, ident: tuple[int, int]) -> bool:
    """After a save failed or was interrupted: leave one complete model at ``path`` and no leftovers.

    Args:
        tmp: the save's temporary directory (``ident`` is its identity before the final rename).
        path: the output directory.

    Returns:
        True when ``path`` holds the new model (the final rename had happened), else False (``path``
        is as it was: the previous model, put back if it had been moved aside, or absent).
    """
    try:
        placed = identity(path) == ident
    except OSError:
        placed = False
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if placed and tmp.is_dir() and saved_model_problem(tmp):  # swapped out before its re-check: undo
        placed = not _renameat2(tmp, path, _RENAME_EXCHANGE)
    if placed:
        for leftover in (tmp, old):
            shutil.rmtree(leftover, ignore_errors=True)
        return True
    shutil.rmtree(tmp, ignore_errors=True)
    if old.is_dir() and not os.path.lexists(path):
        with contextlib.suppress(OSError):
            rename_noreplace(old, path)  # put the previous model back
    return False
