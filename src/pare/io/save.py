"""Write a pruned model atomically: into a temporary sibling directory, then renamed into place.

Before anything is written, :func:`save` checks that the manifest it is about to write really
describes the model: the architecture rebuilt from ``model.config`` (on the ``meta`` device, so no
memory is used), with the recorded structural edits replayed when the shapes are non-uniform, must
have exactly the model's parameter names and shapes. Otherwise ``pare.load`` would fill what the
manifest leaves out with random weights (``from_pretrained`` only warns), so ``save`` refuses.

Several stages applied one after the other are saved by passing every report, in order: their
edits are concatenated, the edits of earlier prunes re-indexed through the layers later prunes
removed (``pare.load`` builds the model from the final config, where those layers are gone).
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pare.arch.surgery.edits import Edit, edit_dicts
from pare.arch.surgery.reindex import chain_edits
from pare.errors import ConfigError, PareError, SaveError, SaveInterrupted
from pare.io.outdir import (
    MANIFEST,
    check_output,
    identity,
    move_into_place,
    remove_stale,
    settle,
    temp_dir,
)
from pare.report import Report

log = logging.getLogger(__name__)


CHAIN_HINT = ("pass every report of the prunes applied to this model, in order: "
              "pare.save(model, tok, out, [report1, report2])")


# --------------------------------------------------------------------------- reports -> manifest
def as_reports(report: Report | Sequence[Report] | None) -> list[Report]:
    """``report`` as a list (empty for None), or ConfigError when an item is not a Report."""
    if report is None:
        return []
    reports = [report] if isinstance(report, Report) else list(report)
    bad = [type(r).__name__ for r in reports if not isinstance(r, Report)]
    if bad:
        raise ConfigError(
            f"report must be a pare Report or a list of them (the values pare.prune returned), got {bad}"
        )
    return reports


def manifest_of(reports: Sequence[Report], model: nn.Module | None = None) -> dict[str, Any] | None:
    """The ``pare.json`` content: one report's dict, or for chained prunes the last report's with
    the edits of all (``chain_edits``), ``uniform`` only when all are, and ``stages`` (each dict).

    With ``model``, a chain whose last cut made the shapes uniform again (every layer's MLP cut to one
    width after a non-uniform cut) is marked uniform when the config alone rebuilds the model.
    """
    if not reports:
        return None
    if len(reports) == 1:
        return reports[0].to_dict()
    manifest = reports[-1].to_dict()
    manifest["edits"] = edit_dicts(chain_edits([r.edits for r in reports]))
    manifest["uniform"] = all(r.uniform for r in reports) or (model is not None and config_describes(model))
    manifest["stages"] = [r.to_dict() for r in reports]
    methods = " -> ".join(r.method for r in reports)
    manifest["notes"] = [*manifest["notes"], (
        f"stages: {methods}. 'edits' holds the structural edits of all, in replay order and "
        "re-indexed to the final layers; 'stages' holds each stage's own report (its config, scores, "
        "edits, sparsity, seconds, peak RSS and the figures after it)."
    )]
    return manifest


def manifest_stages(manifest: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every stage's report dict in a manifest, in order (``history`` in manifests of pare 0.1)."""
    if not manifest:
        return []
    stages = manifest.get("stages") or manifest.get("history")
    return list(stages) if stages else [manifest]


def manifest_override(manifest: dict[str, Any] | None) -> Any:
    """The ArchOverride a manifest records (None when the architecture was inferred)."""
    data = (manifest or {}).get("arch_override")
    if not data:
        return None
    from pare.arch import ArchOverride

    return ArchOverride.from_dict(data)


# --------------------------------------------------------------------------- does it describe the model?
def skeleton(model: nn.Module, edits: Sequence[Edit | dict[str, Any]] | None = None, override: Any = None) -> nn.Module:
    """The architecture ``pare.load`` would build for ``model``: from a copy of its config, on the
    ``meta`` device (no memory), with ``edits`` replayed when given (described with ``override``)."""
    from pare.io.load import build_from_config

    config: Any = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]  # what save_pretrained writes, so what load builds
    with torch.device("meta"):
        try:
            built = build_from_config(config)
        except (ValueError, KeyError):  # a class the auto mapping does not know: its own class
            built = type(model)(config)
    if edits:
        from pare.arch.surgery import replay

        replay(built, list(edits), override)
    return built


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def state_differences(model: nn.Module, rebuilt: nn.Module) -> list[str]:
    """What ``rebuilt`` lacks, adds or shapes differently from ``model`` (empty when they match).

    A tied output embedding (``lm_head``) missing from ``model`` is fine, as in ``pare.load``.
    """
    from pare.io.load import tied_head_keys

    have, want = _shapes(model), _shapes(rebuilt)
    tied = tied_head_keys(rebuilt)
    lost = sorted(k for k in set(have) - set(want))
    extra = sorted(k for k in set(want) - set(have) if k not in tied)
    shaped = sorted(k for k in set(have) & set(want) if have[k] != want[k])
    out = []
    if lost:
        out.append(f"{len(lost)} weight(s) of the model the rebuilt one has no place for (e.g. {lost[:3]})")
    if extra:
        out.append(f"{len(extra)} weight(s) the model lacks, which load would fill with random values "
                   f"(e.g. {extra[:3]})")
    if shaped:
        out.append(f"{len(shaped)} shape(s) that differ (e.g. "
                   + ", ".join(f"{k}: model {list(have[k])} vs rebuilt {list(want[k])}" for k in shaped[:3]) + ")")
    return out


def config_describes(model: nn.Module) -> bool:
    """Whether a model built from ``model.config`` alone has exactly ``model``'s parameter shapes."""
    try:
        return not state_differences(model, skeleton(model))
    except Exception:  # a config transformers cannot rebuild: nothing to compare with
        log.debug("the config of %s cannot be rebuilt on the meta device", type(model).__name__, exc_info=True)
        return False


def edits_rebuild(model: nn.Module, edits: Sequence[Edit | dict[str, Any]], override: Any = None) -> bool:
    """Whether ``model.config`` with ``edits`` replayed (described with ``override``) rebuilds exactly
    ``model``'s parameter names and shapes."""
    try:
        return not state_differences(model, skeleton(model, edits, override))
    except Exception:  # edits that cannot be replayed on this config do not rebuild the model
        log.debug("the edits do not replay on the config of %s", type(model).__name__, exc_info=True)
        return False


def check_describes(model: nn.Module, reports: Sequence[Report], manifest: dict[str, Any] | None) -> None:
    """Raise ConfigError unless the manifest about to be written rebuilds ``model``'s exact shapes.

    Raises:
        ConfigError: the config (plus the replayed edits when non-uniform) gives other parameter
            names or shapes than the model has, or the edits cannot be replayed.
    """
    uniform = manifest is None or manifest.get("uniform", True) or not manifest.get("edits")
    edits = [] if uniform else list(manifest["edits"] if manifest else [])
    given = (f"{len(reports)} report(s) ({', '.join(r.method for r in reports)})" if reports else "no report")
    how = "its config alone" if uniform else f"its config and the {len(edits)} edit(s) recorded"
    try:
        problems = state_differences(model, skeleton(model, edits, manifest_override(manifest)))
    except Exception as exc:  # any failure to replay means the edits do not fit the model
        problems = [f"replaying the edits failed ({exc.__class__.__name__}: {exc})"]
    if problems:
        hint = f"If the model was pruned more than once, {CHAIN_HINT}" if reports else (
            f"Pass the report of its structural prune (pare.save(model, tok, out, report)), or if it was pruned "
            f"more than once, {CHAIN_HINT}")
        raise ConfigError(
            f"refusing to save: with {given}, the saved model would be rebuilt from {how}, which does not "
            f"match this model: {'; '.join(problems)}. {hint}. Nothing was written."
        )


# --------------------------------------------------------------------------- save
def save(model: nn.Module, tokenizer: Any, out: str | Path, report: Report | Sequence[Report] | None = None,
         overwrite: bool = False, source: str | Path | None = None) -> Path:
    """Save ``model`` (safetensors), its config, ``tokenizer`` and the report(s) as ``pare.json``.

    The files are written to a temporary directory next to ``out`` and renamed into place, so an
    interruption never leaves a half-written model; an existing ``out`` is replaced only after the
    new one is complete, and only when it holds a saved model (see :mod:`pare.io.outdir`). Leftovers
    of earlier saves to ``out`` that were killed are removed first (with a warning). The manifest is
    complete before the rename: ``figures.size_on_disk_bytes_after`` (the bytes of the weight files
    written) is filled in, in the manifest and in the last report.

    Args:
        model: the (pruned) causal LM.
        tokenizer: saved beside it when not None.
        out: output directory.
        report: the report of the prune, or the reports of several prunes in the order they were
            applied (``[report1, report2]``); None for a model whose config describes it.
        overwrite: replace an existing ``out`` that holds a saved model.
        source: the input model's directory, never replaced nor a directory holding it; by default the
            local directory ``model`` was loaded from (its ``name_or_path``), when there is one.

    Raises:
        OutputExistsError: ``out`` exists and ``overwrite`` is False; or it does not hold a saved
            model; or it appeared while the model was written (the message says where the finished
            model was kept).
        ConfigError: ``out`` is the working directory, the input model's directory, a directory holding
            either, or a file; or the manifest would not rebuild the model's shapes (e.g. only the last
            of two prunes' reports given). Nothing is written then.
        SaveInterrupted: Ctrl-C during the save; its message says what ``out`` holds.
        SaveError: writing failed (a full disk...); the partial files are removed.
    """
    path = check_output(out, overwrite, source, loaded_from=_loaded_from(model))
    reports = as_reports(report)
    manifest = manifest_of(reports, model)
    check_describes(model, reports, manifest)
    existed = path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    if path.exists() and not existed:  # a model moved aside by a killed save was put back: check it again
        check_output(out, overwrite, source, loaded_from=_loaded_from(model))
        existed = True
    tmp = temp_dir(path)
    ident = identity(tmp)
    try:
        _write(model, tokenizer, tmp, manifest, reports)
        move_into_place(tmp, path, out, overwrite)
    except BaseException as exc:
        saved = settle(tmp, path, ident)
        if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, SaveInterrupted):
            raise SaveInterrupted(path, saved, existed) from exc
        if isinstance(exc, OSError) and not isinstance(exc, PareError):
            raise _write_error(exc, path) from exc
        raise
    log.info("saved to %s", path)
    return path


def _loaded_from(model: nn.Module) -> str | None:
    """The local directory ``model`` was loaded from (transformers records it), else None."""
    config = getattr(model, "config", None)
    for name in (getattr(model, "name_or_path", None), getattr(config, "_name_or_path", None)):
        if isinstance(name, str) and name and Path(name).is_dir():
            return name
    return None


def weights_bytes(path: Path) -> int:
    """Bytes of the weight files (``*.safetensors``, ``*.bin``) directly in ``path``."""
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in path.glob(pattern))


def _write(model: nn.Module, tokenizer: Any, tmp: Path, manifest: dict[str, Any] | None,
           reports: Sequence[Report]) -> None:
    """Write the weights, config, tokenizer and the completed manifest into ``tmp``."""
    if manifest is not None and not manifest["uniform"]:
        # Keep the model's own parameter names: pare.load rebuilds the shapes and loads them
        # directly, without transformers' legacy checkpoint renaming (e.g. Mixtral's experts).
        model.save_pretrained(tmp, save_original_format=False)  # type: ignore[operator]
    else:
        model.save_pretrained(tmp)  # type: ignore[operator]
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if manifest is not None:
        size = weights_bytes(tmp)
        reports[-1].figures["size_on_disk_bytes_after"] = size
        for entry in [manifest, *manifest.get("stages", [])[-1:]]:
            entry["figures"]["size_on_disk_bytes_after"] = size
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str), encoding="utf-8")
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; the output gets the usual permissions
    for f in tmp.rglob("*"):  # safetensors writes its files 0600: give every file the usual permissions
        if f.is_file():
            f.chmod(0o666 & ~_umask())


def _write_error(exc: OSError, path: Path) -> SaveError:
    """A one-line SaveError for a failed write (a full disk above all); the partial files are removed."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SaveError(f"no space left to save {str(path)!r} (disk or quota full); the partial files were removed "
                         "and nothing was written: free space, or choose an --out on another disk")
    return SaveError(f"cannot save {str(path)!r}: {exc.strerror or exc}; the partial files were removed and nothing "
                     "was written")


def _umask() -> int:
    """The process umask (reading it means setting it: it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
