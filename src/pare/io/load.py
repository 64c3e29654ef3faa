"""Load a model saved by pare: plain ``from_pretrained`` for uniform shapes, otherwise rebuild the
recorded structural edits on a model built from the config and load the weights into it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from pare.errors import ModelNotFoundError, PareError
from pare.io.save import MANIFEST
from pare.report import REPORT_VERSION

log = logging.getLogger(__name__)


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The ``pare.json`` manifest of a saved model, or None when it has none."""
    f = Path(path) / MANIFEST
    if not f.is_file():
        return None
    try:
        manifest = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PareError(f"{f} is not a valid pare manifest ({exc}); delete it to load the directory as a plain "
                        "model (the edits it recorded are then lost)") from exc
    if not isinstance(manifest, dict):
        raise PareError(f"{f} is not a valid pare manifest (a JSON {type(manifest).__name__}, not an object); delete "
                        "it to load the directory as a plain model")
    version = manifest.get("version", REPORT_VERSION)
    if not isinstance(version, int) or version > REPORT_VERSION:
        raise PareError(f"{f} has manifest version {version!r}, newer than this pare reads ({REPORT_VERSION}): "
                        "upgrade pare (pip install -U pare) to load it")
    return manifest


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(path / name)))
    return state


def _from_pretrained(path: Path, dtype: torch.dtype | None, pare_saved: bool) -> PreTrainedModel:
    """``from_pretrained``, refusing weights it would have to initialise at random in a pare directory.

    Raises:
        PareError: ``pare_saved`` and weights are missing (a tied ``lm_head`` is fine) or left unused:
            the config does not describe the saved model.
    """
    loaded: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", output_loading_info=True)
    model: PreTrainedModel = loaded[0]
    info: dict[str, Any] = loaded[1]
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    missing = sorted(k for k in info["missing_keys"] if not (tied and "lm_head" in k))
    unexpected = sorted(info["unexpected_keys"])
    if not (missing or unexpected):
        return model
    what = f"missing {len(missing)} weight(s) {missing[:5]}, unused {len(unexpected)} {unexpected[:5]}"
    if not pare_saved:
        log.warning("%s: %s; transformers initialised the missing ones at random", path, what)
        return model
    raise PareError(
        f"{str(path)!r} does not hold the model its config and {MANIFEST} describe ({what}); loading it "
        "would fill them with random weights. It was probably saved without the reports of all its structural "
        "prunes: save the pruned model again with pare.save(model, tok, out, [report1, report2]) (every "
        "report, in the order applied)."
    )


def load(path: str | Path, device: str | torch.device | None = None,
         dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Load a pruned model, rebuilding non-uniform shapes from the manifest when needed.

    Args:
        path: directory written by :func:`pare.save` (or any Hugging Face model directory).
        device: where to put the model (default: CPU).
        dtype: override the saved dtype.

    Raises:
        ModelNotFoundError: no ``config.json`` in ``path``.
        PareError: a pare directory whose weights do not fit the model its config and manifest
            describe (e.g. saved without the reports of all its structural prunes).
    """
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ModelNotFoundError(f"{str(p)!r} is not a saved model directory (no config.json)")
    manifest = read_manifest(p) or {}
    edits = manifest.get("edits") or []
    if manifest.get("uniform", True) or not edits:
        model = _from_pretrained(p, dtype, pare_saved=bool(manifest))
    else:
        from pare.arch.surgery import replay

        config = AutoConfig.from_pretrained(p)
        saved_dtype = getattr(config, "dtype", None) or torch.float32
        if isinstance(saved_dtype, str):
            saved_dtype = getattr(torch, saved_dtype)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or saved_dtype)
        from pare.io.save import manifest_override

        replay(model, edits, manifest_override(manifest))
        state = _state_dict(p)
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {k for k in missing if "lm_head" in k and getattr(config, "tie_word_embeddings", False)}
        if unexpected or set(missing) - tied:
            raise PareError(
                f"{str(p)!r}: weights do not fit the rebuilt model (missing {sorted(set(missing) - tied)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}); the manifest may be from another pare version"
            )
        if tied:
            model.tie_weights()
    if device is not None:
        model.to(device)  # type: ignore[arg-type]
    return model.eval()


def meta_model(name_or_path: str) -> Any:
    """Build the model on the meta device from its config (no weights read), replaying pare edits."""
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"cannot read a model config from {name_or_path!r}: {exc}") from exc
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    manifest = read_manifest(name_or_path) if Path(name_or_path).is_dir() else None
    if manifest and not manifest.get("uniform", True):
        from pare.arch.surgery import replay
        from pare.io.save import manifest_override

        replay(model, manifest.get("edits") or [], manifest_override(manifest))
    return model
