"""The work directory of a streamed recipe, ``.<out>.recipe/``, kept to the guards of a save.

What :mod:`pare.io.outdir` promises for an output, this module keeps for the directory that holds a
streamed recipe's intermediate models (``stage-K/``, each published atomically by its own streamed
prune, with its ``.stage-K.stream/`` work directory while it runs):

* pare writes only into a directory it made: one holding pare's ``recipe.json`` (written atomically
  when the directory is made). A file, a symbolic link, or a directory without that record at the
  work directory's place is refused before any work, and never written into or removed.
* ``--resume`` continues only the recipe the record describes: same source files, stages,
  calibration, batch size, dtype and devices; other settings are refused with the keys that changed
  (a finished ``stage-K`` of other settings is never taken as this run's).
* One process at a time: the directory is locked while a recipe runs in it.
* Once the output is in place the directory is renamed aside (``.<out>.recipe.del-<pid>``) and only
  then deleted, so a run killed while deleting leaves no half-deleted ``stage-K`` that a resume could
  take as finished; the next run removes such a leftover once its process is gone. Entries pare does
  not write (a user's files) are never deleted: the intermediate models are removed around them,
  the record first, and a warning names what was left.
* A run killed after publishing the output but before removing the directory leaves one whose
  stages are the output's last ones: the next run to that output removes it, with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from pare.config import CalibrationConfig, PruneConfig, RuntimeConfig
from pare.errors import ConfigError
from pare.io.outdir import MANIFEST, saved_model_problem
from pare.io.partial import WORK_FILE, lock_exclusive, replace_atomically

log = logging.getLogger(__name__)

RECORD = "recipe.json"
LOCK = "lock"
OWN = re.compile(r"^(recipe\.json(\.partial)?|lock|stage-\d+|\.stage-\d+\.(stream|tmp-\d+-[A-Za-z0-9_]+|old-\d+))$")
"""The names a streamed recipe writes into its work directory."""


def recipe_work_dir(out: str | Path) -> Path:
    """Where the intermediate models of a streamed recipe to ``out`` live."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}.recipe"


def recipe_settings(
    source: str,
    configs: Sequence[PruneConfig],
    calibration: CalibrationConfig | torch.Tensor | None,
    runtime: RuntimeConfig,
    batch_size: int | None,
    dtype: torch.dtype | None,
) -> dict[str, Any]:
    """What must not change between a streamed recipe and its ``--resume`` (JSON)."""
    root = Path(source)
    files = (
        {p.name: [p.stat().st_size, int(p.stat().st_mtime)] for p in sorted(root.glob("*.safetensors"))}
        if root.is_dir()
        else {}
    )
    if isinstance(calibration, torch.Tensor):
        calib: Any = hashlib.sha256(calibration.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
    else:
        calib = None if calibration is None else calibration.to_dict()
    return json.loads(
        json.dumps(
            {
                "source": str(root.absolute()) if root.is_dir() else source,
                "files": files,
                "stages": [c.to_dict() for c in configs],
                "calibration": calib,
                "batch_size": batch_size,
                "dtype": str(dtype),
                "sequential": runtime.sequential,
                "device": runtime.device,
                "devices": list(runtime.devices),
            },
            default=str,
        )
    )


def _own(entry: Path) -> bool:
    """Whether ``entry`` of a recipe's work directory is one a streamed recipe writes: its record and
    lock, a published stage (a saved model), a stage's stream work directory or a killed save's leftover."""
    if entry.is_symlink() or not OWN.match(entry.name):
        return False
    if entry.name.startswith("stage-"):
        return entry.is_dir() and saved_model_problem(entry) is None
    if entry.name.endswith(".stream"):
        return entry.is_dir() and all(WORK_FILE.match(f.name) and not f.is_symlink() for f in entry.iterdir())
    if entry.name.startswith("."):
        return entry.is_dir()
    return entry.is_file()


def _read_record(path: Path) -> dict[str, Any] | None:
    """The record a streamed recipe wrote at ``path``, or None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if not path.is_symlink() else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("pare") == "streamed recipe" else None


def _is_record(path: Path) -> bool:
    return _read_record(path) is not None


def _delete_record_last(path: Path) -> None:
    """Delete a recipe's work directory (renamed aside), its record last: a deletion killed midway
    leaves a directory the next run recognises and finishes deleting."""
    for entry in path.iterdir():
        if entry.name == RECORD:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    (path / RECORD).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.rmdir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RecipeWork:
    """The work directory of one streamed recipe to ``out`` (see the module docstring).

    Args:
        out: the recipe's output directory.
        settings: :func:`recipe_settings` of this run.
    """

    def __init__(self, out: str | Path, settings: dict[str, Any]) -> None:
        self.out = Path(out).absolute()
        self.path = recipe_work_dir(out)
        self.settings = settings

    def stage_dir(self, k: int) -> Path:
        """Where stage ``k`` (0-based) of the recipe is published."""
        return self.path / f"stage-{k + 1}"

    # ----------------------------------------------------------------------- before any work
    def check(self, resume: bool) -> None:
        """Refuse a work directory pare may not use; remove one a published run left behind.

        Raises:
            ConfigError: not a directory pare made, an interrupted recipe without ``resume``, or one
                with other settings.
        """
        self._remove_deleted()
        path = self.path
        if not os.path.lexists(path):
            return
        if path.is_symlink() or not path.is_dir():
            kind = "a symbolic link" if path.is_symlink() else "a file"
            raise ConfigError(
                f"{str(path)!r}, where a streamed recipe to {str(self.out)!r} keeps its intermediate "
                f"models, is {kind}: pare will not write through it nor remove it; remove it yourself, "
                "or choose another --out"
            )
        record = self._record()
        if record is None:
            raise ConfigError(
                f"{str(path)!r}, where a streamed recipe to {str(self.out)!r} keeps its intermediate "
                f"models, exists but was not made by pare (no readable {RECORD}): pare will not write "
                "into it nor remove it; remove it yourself, or choose another --out"
            )
        if self._published_by(record) and not self.foreign():
            log.warning(
                "removing %s: the intermediate models of the streamed recipe that published %s (it was "
                "stopped before it removed them)",
                path,
                self.out,
            )
            self.discard()
            return
        if not resume:
            raise ConfigError(
                f"an interrupted streamed recipe to {str(self.out)!r} left its finished stages in "
                f"{str(path)!r}: pass --resume to continue it, or remove that directory to start over"
            )
        before = record.get("settings") or {}
        changed = sorted(k for k in {*before, *self.settings} if before.get(k) != self.settings.get(k))
        if changed:
            raise ConfigError(
                f"--resume: the interrupted streamed recipe to {str(self.out)!r} used other settings "
                f"({changed}); resume with the same ones, or remove {str(path)!r} to start over"
            )

    def _record(self) -> dict[str, Any] | None:
        return _read_record(self.path / RECORD)

    def _published_by(self, record: dict[str, Any]) -> bool:
        """Whether the output holds a model whose last stages are the recorded recipe's."""
        from pare.io.save import manifest_stages

        stages = (record.get("settings") or {}).get("stages")
        try:
            manifest = json.loads((self.out / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        done = [s.get("config") for s in manifest_stages(manifest)] if isinstance(manifest, dict) else []
        return isinstance(stages, list) and bool(stages) and done[-len(stages) :] == stages

    def foreign(self) -> list[str]:
        """Entries of the work directory that a streamed recipe does not write."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if not _own(p))

    # ----------------------------------------------------------------------- while the recipe runs
    @contextlib.contextmanager
    def locked(self) -> Iterator[RecipeWork]:
        """Make the directory (with its record) if needed and hold its lock while the block runs.

        Raises:
            ConfigError: another process runs a streamed recipe to the same output.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.mkdir(exist_ok=True)
        if self._record() is None:
            tmp = self.path / (RECORD + ".partial")
            tmp.write_text(
                json.dumps({"pare": "streamed recipe", "out": str(self.out), "settings": self.settings}, indent=1),
                encoding="utf-8",
            )
            replace_atomically(tmp, self.path / RECORD)
        fd = lock_exclusive(
            self.path / LOCK,
            f"another pare process runs a streamed recipe to {str(self.out)!r} "
            f"(its work directory {str(self.path)!r} is locked): wait for it, or choose another --out",
        )
        try:
            yield self
        finally:
            os.close(fd)

    # ----------------------------------------------------------------------- once the output is in place
    def discard(self) -> None:
        """Delete the intermediate models: the directory renamed aside, then deleted; a user's entries
        are left where they are (the record removed first, so the rest is no longer resumable)."""
        if not self.path.is_dir() or self.path.is_symlink():
            return
        others = self.foreign()
        if not others:
            aside = self.path.with_name(f"{self.path.name}.del-{os.getpid()}")
            os.rename(self.path, aside)
            _delete_record_last(aside)
            return
        (self.path / RECORD).unlink(missing_ok=True)
        for entry in sorted(self.path.iterdir()):
            if entry.name not in others:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        log.warning(
            "left %s in place: it holds entries a streamed recipe does not write (%s); its intermediate "
            "models were removed, remove the rest yourself",
            self.path,
            ", ".join(others[:5]),
        )

    def _remove_deleted(self) -> None:
        """Finish deleting what a run killed in :meth:`remove` renamed aside (its process is gone)."""
        if not self.path.parent.is_dir():
            return
        pattern = re.compile(rf"{re.escape(self.path.name)}\.del-(\d+)")
        for entry in self.path.parent.iterdir():
            m = pattern.fullmatch(entry.name)
            if (
                m
                and not entry.is_symlink()
                and entry.is_dir()
                and not _alive(int(m.group(1)))
                and _is_record(entry / RECORD)
            ):
                _delete_record_last(entry)
                log.warning(
                    "removed %s, left behind by a streamed recipe to %s stopped while deleting it", entry, self.out
                )
