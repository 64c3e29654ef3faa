"""Write a pruned model atomically: into a temporary sibling directory, then renamed into place."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from pare.errors import OutputExistsError
from pare.report import Report

log = logging.getLogger(__name__)

MANIFEST = "pare.json"


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output directory unless ``overwrite`` (call before any long work)."""
    path = Path(out)
    if path.exists() and not overwrite:
        raise OutputExistsError(
            f"output directory {str(path)!r} already exists; pass overwrite=True (--overwrite) to replace "
            "it, or choose another --out"
        )
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output path {str(path)!r} exists and is not a directory")
    return path


def save(model: nn.Module, tokenizer: Any, out: str | Path, report: Report | None = None,
         overwrite: bool = False) -> Path:
    """Save ``model`` (safetensors), its config, ``tokenizer`` and ``report`` as ``pare.json``.

    The files are written to a temporary directory next to ``out`` and renamed into place, so an
    interruption never leaves a half-written model; an existing ``out`` is replaced only after the
    new one is complete.

    Raises:
        OutputExistsError: ``out`` exists and ``overwrite`` is False.
    """
    path = check_output(out, overwrite).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        if report is not None and not report.uniform:
            # Keep the model's own parameter names: pare.load rebuilds the shapes and loads them
            # directly, without transformers' legacy checkpoint renaming (e.g. Mixtral's experts).
            model.save_pretrained(tmp, save_original_format=False)  # type: ignore[operator]
        else:
            model.save_pretrained(tmp)  # type: ignore[operator]
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            manifest: dict[str, Any] = report.to_dict()
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str), encoding="utf-8")
        backup = None
        if path.exists():
            backup = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(backup)
        tmp.rename(path)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved to %s", path)
    return path
