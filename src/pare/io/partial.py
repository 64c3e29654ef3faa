"""A streamed output while it is written: shards, the progress record, and the final publish.

A streamed prune writes into ``.<out>.stream/`` beside the output directory (a fixed name, so a
later ``--resume`` finds it; :func:`pare.io.outdir.remove_stale` leaves it alone). After each
decoder layer the layer's shard is written (``.partial`` first, then renamed), then the next
layer's inputs, and last the progress record (``progress.json``, written to a temporary file and
renamed): a run killed anywhere resumes from the last layer whose record is complete, and a shard
or an inputs file written after that record is simply written again.

When every layer is written, :meth:`PartialOutput.publish` builds the output the way
:func:`pare.save` does: a private ``.<out>.tmp-<pid>-*`` directory (the shards hard-linked into it,
so the work directory stays whole until the output is in place), the index, config, tokenizer and
the complete manifest, then :func:`pare.io.outdir.move_into_place`; the work directory is removed
only after that rename. A run killed between the two leaves a work directory whose shards are the
output's own files: the next streamed run to the same output removes it, with a warning
(:meth:`PartialOutput.discard_if_published`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pare.errors import ConfigError, PareError
from pare.io.outdir import MANIFEST, identity, move_into_place, remove_stale, settle, temp_dir

log = logging.getLogger(__name__)

PROGRESS = "progress.json"
LOCK = "lock"
INDEX = "model.safetensors.index.json"
WORK_FILE = re.compile(r"^(lock|progress\.json|inputs-\d{5}\.safetensors|activations-[01]\.bin"
                       r"|model-\d{5}-of-\d{5}\.safetensors)(\.partial)?$")
"""The names a streamed run writes into its work directory."""


def shard_name(k: int, n: int) -> str:
    """The ``k``-th (0-based) of ``n`` output shards, named as transformers names its shards."""
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be synced
        _fsync_file(path)


def replace_atomically(tmp: Path, final: Path) -> None:
    """``tmp`` made durable, then renamed over ``final`` (and the rename made durable)."""
    _fsync_file(tmp)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def lock_exclusive(path: Path, busy: str) -> int:
    """Open (or create) the lock file ``path`` and take its exclusive lock; returns the descriptor
    (closing it releases the lock).

    Raises:
        ConfigError: ``busy``, when another open descriptor (another process) holds the lock.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(busy) from None
    return fd


class PartialOutput:
    """The work directory of one streamed prune to ``out``, locked while this process uses it.

    Args:
        out: the final output directory.
    """

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out).absolute()
        self.work = self.out.with_name(f".{self.out.name}.stream")
        self._lock: int | None = None

    @contextlib.contextmanager
    def locked(self) -> Iterator[PartialOutput]:
        """Create (or reuse) the work directory and hold its lock while the block runs.

        Raises:
            ConfigError: another process holds the lock (a streamed prune to the same output runs).
        """
        self.work.mkdir(parents=True, exist_ok=True)
        fd = lock_exclusive(self.work / LOCK, f"another pare process is streaming into {str(self.out)!r} (its work "
                            f"directory {str(self.work)!r} is locked): wait for it, or choose another --out")
        self._lock = fd
        try:
            yield self
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            self._lock = None

    def discard_if_published(self) -> bool:
        """Remove the work directory of a run that published ``out`` but was killed before it removed
        the work directory (a warning says so); return whether it did.

        Only a directory that is pare's own is removed: a real directory with pare's lock file, not
        locked by a running process, holding nothing but the files a streamed run writes, whose
        progress record names shards that are the very files (hard links) the output holds. A work
        directory of a run that never published (``--resume`` continues it) is left as it is.
        """
        work = self.work
        if work.is_symlink() or not work.is_dir():
            return False
        try:
            fd = os.open(work / LOCK, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:  # no lock file: not a work directory pare made
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a streamed run is using it
                return False
            if not self._published():
                return False
            others = [p.name for p in work.iterdir()
                      if p.is_symlink() or not p.is_file() or not WORK_FILE.match(p.name)]
            if others:
                log.warning("%s belongs to the published streamed run at %s but also holds %s: left as it is; "
                            "remove it yourself", work, self.out, ", ".join(sorted(others)[:5]))
                return False
            shutil.rmtree(work)
        finally:
            os.close(fd)
        log.warning("removed %s: the work directory of the streamed run that published %s (it was stopped before "
                    "it removed it)", work, self.out)
        return True

    def _published(self) -> bool:
        """Every shard of the progress record is the same file as the output's (publish links them)."""
        if self.out.is_symlink() or not self.out.is_dir():
            return False
        try:
            record = self.progress()
        except ConfigError:
            return False
        shards = (record or {}).get("shards")
        if not isinstance(shards, dict) or not shards:
            return False
        try:
            return all(WORK_FILE.match(n) and os.path.samefile(self.work / n, self.out / n) for n in shards)
        except (OSError, TypeError):
            return False

    # ----------------------------------------------------------------------- progress
    def progress(self) -> dict[str, Any] | None:
        """The last complete progress record, or None (nothing recorded yet)."""
        path = self.work / PROGRESS
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # renamed into place whole: a damaged one was edited by hand
            raise ConfigError(f"{path} cannot be read ({exc}): remove {str(self.work)!r} to start over") from None
        return data if isinstance(data, dict) else None

    def record(self, data: dict[str, Any]) -> None:
        """Write the progress record atomically (the last step of a layer)."""
        tmp = self.work / (PROGRESS + ".partial")
        tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
        replace_atomically(tmp, self.work / PROGRESS)

    def clear(self) -> None:
        """Forget an earlier run's files (progress first, so a kill in between leaves no stale record)."""
        (self.work / PROGRESS).unlink(missing_ok=True)
        for entry in self.work.iterdir():
            if entry.name == LOCK:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    # ----------------------------------------------------------------------- shards
    def write_shard(self, name: str, tensors: dict[str, torch.Tensor], before_rename: Any = None) -> int:
        """Write ``tensors`` as the shard ``name`` (via ``name.partial``); returns its tensor bytes.

        ``before_rename`` is called with the partial file's path once it is written (a hook to
        interrupt the write in tests).
        """
        final = self.work / name
        tmp = self.work / (name + ".partial")
        size = write_safetensors(tmp, tensors, {"format": "pt"})
        if before_rename is not None:
            before_rename(tmp)
        replace_atomically(tmp, final)
        return size

    def has_shard(self, name: str) -> bool:
        return (self.work / name).is_file()

    # ----------------------------------------------------------------------- activations
    def save_tensors(self, name: str, tensors: list[torch.Tensor]) -> None:
        """Save a list of tensors (the next layer's inputs) as ``name``, atomically."""
        tmp = self.work / (name + ".partial")
        write_safetensors(tmp, {str(i): t for i, t in enumerate(tensors)}, {"format": "pt"})
        replace_atomically(tmp, self.work / name)

    def load_tensors(self, name: str, device: torch.device) -> list[torch.Tensor]:
        from safetensors.torch import load_file

        data = load_file(str(self.work / name), device=str(device))
        return [data[str(i)] for i in range(len(data))]

    # ----------------------------------------------------------------------- publish
    def publish(self, shards: dict[str, dict[str, int]], write_rest: Any, overwrite: bool) -> Path:
        """Move the finished output into place through pare's atomic save.

        Args:
            shards: shard file name -> {tensor name: bytes}: the index's weight map.
            write_rest: called with the temporary directory to write config, tokenizer and manifest.
            overwrite: replace an existing saved model at ``out``.
        """
        path = self.out
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path)
        tmp = temp_dir(path)
        ident = identity(tmp)
        try:
            weight_map: dict[str, str] = {}
            total = 0
            for name, sizes in shards.items():
                os.link(self.work / name, tmp / name)  # the work copy stays until the output is in place
                weight_map.update(dict.fromkeys(sizes, name))
                total += sum(sizes.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
            write_rest(tmp)
            move_into_place(tmp, path, str(path), overwrite)
        except BaseException as exc:
            settle(tmp, path, ident)
            if isinstance(exc, OSError) and not isinstance(exc, PareError):
                raise PareError(f"cannot publish {str(path)!r}: {exc}; the streamed layers are kept in "
                                f"{str(self.work)!r}: run again with --resume") from exc
            raise
        shutil.rmtree(self.work, ignore_errors=True)
        return path


_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """Write ``tensors`` in the safetensors format, one tensor after the other from its own memory
    (``safetensors.torch.save_file`` first copies every tensor into bytes: a second copy of a layer).

    Tensors are laid out by decreasing element size, so every one starts aligned to its element
    size (the header is padded to 8 bytes). Returns the bytes of tensor data.
    """
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key in order:
        t = tensors[key]
        if t.dtype not in _DTYPES:
            raise ValueError(f"{key}: dtype {t.dtype} has no safetensors name")
        n = t.numel() * t.element_size()
        header[key] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for key in order:
            t = tensors[key].detach()
            cpu = t.to("cpu").contiguous() if t.device.type != "cpu" or not t.is_contiguous() else t
            if cpu.numel():
                f.write(cpu.view(-1).view(torch.uint8).numpy().data)
            del cpu
    return offset


def manifest_file(tmp: Path, manifest: dict[str, Any]) -> None:
    """Write ``pare.json`` into ``tmp``."""
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str), encoding="utf-8")
