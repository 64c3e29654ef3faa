"""Load a model saved by pare: plain ``from_pretrained`` for uniform shapes, otherwise rebuild the
recorded structural edits on a model built from the config and load the weights into it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from pare.errors import ConfigError, CorruptFileError, ModelNotFoundError, NotCausalLMError, PareError
from pare.io.manifest import check_manifest
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
    config = None
    if (Path(path) / "config.json").is_file():
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError):  # the loader reports a config it cannot read; check what does not need it
            log.debug("no config to check %s against", f, exc_info=True)
    check_manifest(manifest, str(f), config)
    return manifest


def auto_class(config: Any) -> Any:
    """The transformers Auto class that builds a model of ``config``: ``AutoModelForCausalLM``, or
    ``AutoModelForImageTextToText`` for a vision-language model whose text decoder pare prunes."""
    from transformers import AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    saved = saved_class(config)
    if saved is not None:
        return saved
    if getattr(config, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    return AutoModelForImageTextToText


def build_from_config(config: Any, **kwargs: Any) -> Any:
    """A model of ``config``'s class (:func:`auto_class`) with fresh weights."""
    cls = auto_class(config)
    if hasattr(cls, "from_config"):  # an Auto class
        return cls.from_config(config, **kwargs)
    return cls._from_config(config, **kwargs)


def saved_class(config: Any) -> Any:
    """The generating class the config names in ``architectures`` (``MllamaForConditionalGeneration``),
    when transformers has it: the exact class that was saved (an Auto mapping may pick another, e.g. the
    text-only ``MllamaForCausalLM`` for a Mllama config)."""
    import transformers

    names = getattr(config, "architectures", None) or []
    name = names[0] if names else ""
    if not name.endswith(("ForCausalLM", "ForConditionalGeneration")):
        return None
    return getattr(transformers, name, None)


def causal_lm_config(name_or_path: str | Path) -> Any:
    """The config of a model, refused when transformers has no causal-LM class for it (T5, BERT...);
    a vision-language model (``AutoModelForImageTextToText``) is accepted for its text decoder.

    Raises:
        NotCausalLMError: an encoder-decoder or encoder-only model, which pare cannot prune.
        OSError, ValueError: as ``AutoConfig.from_pretrained`` (no config, an unknown model type).
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    config = AutoConfig.from_pretrained(name_or_path)
    model_type = getattr(config, "model_type", None)
    known = (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
    if not any(model_type in names for names in known) and saved_class(config) is None:
        archs = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
        raise NotCausalLMError(
            f"{str(name_or_path)!r} is a {model_type} model ({archs}), not a causal LM: pare prunes decoder-only "
            "models that AutoModelForCausalLM loads (Llama, Mistral, Qwen, Gemma, Phi-3, GPT-2, OPT, Mixtral...)"
        )
    return config


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` resolves inside ``root``, or into the Hub cache's ``blobs/`` of the snapshot ``root``
    is (the cache stores a snapshot's files as links there)."""
    target = path.resolve()
    base = root.resolve()
    if target.is_relative_to(base):
        return True
    return base.parent.name == "snapshots" and target.is_relative_to(base.parent.parent / "blobs")


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a model directory, checked before any is loaded: every shard its
    ``model.safetensors.index.json`` names lies inside the directory (no ``../x``, absolute path or link
    out of it) and exists, and every file is whole (its header matches its size).

    Raises:
        CorruptFileError: a damaged index, a shard outside the directory or missing, a truncated file.
    """
    from safetensors import SafetensorError, safe_open

    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise CorruptFileError(f"{index} is not a valid weight index ({exc}); restore it or save the model "
                                   "again") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v for v in weight_map.values()):
            raise CorruptFileError(f"{index}: 'weight_map' must map weight names to file names in the directory")
        files = []
        for name in sorted(set(weight_map.values())):
            file = root / name
            if Path(name).is_absolute() or ".." in Path(name).parts or not _inside(file, root):
                raise CorruptFileError(f"{index} names {name!r}, outside the model directory: pare loads weights "
                                       "only from files inside it; restore the index or save the model again")
            if not file.is_file():
                raise CorruptFileError(f"{index} names {name!r}, which is missing: copy the whole model directory")
            files.append(file)
    else:
        files = [f for f in [root / "model.safetensors"] if f.is_file()]
    for file in files:
        try:
            with safe_open(str(file), "pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise CorruptFileError(f"{file} is damaged or truncated ({exc}): download or save the model again"
                                   ) from None
    return files


def _state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
"""accelerate's placement strategies ``device_map`` accepts (a model larger than one device)."""


def check_device_map(device_map: str | None) -> None:
    """A ConfigError unless ``device_map`` is None or one of :data:`DEVICE_MAPS`."""
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise ConfigError(f"device_map must be one of {', '.join(DEVICE_MAPS)} (accelerate places the layers over "
                          f"the GPUs, then the CPU), got {device_map!r}")


def _from_pretrained(path: Path, dtype: torch.dtype | None, pare_saved: bool,
                     device_map: str | None = None) -> PreTrainedModel:
    """``from_pretrained``, refusing weights it would have to initialise at random in a pare directory.

    Raises:
        PareError: ``pare_saved`` and weights are missing (a tied ``lm_head`` is fine) or left unused:
            the config does not describe the saved model.
    """
    loaded: Any = auto_class(AutoConfig.from_pretrained(path)).from_pretrained(
        path, dtype=dtype or "auto", output_loading_info=True,
        **({"device_map": device_map} if device_map is not None else {}))
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


def tied_head_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of the output embeddings when the config ties them to the input ones (a
    saved model leaves them out): ``lm_head.weight``, GPT-NeoX-Japanese's ``embed_out.weight``..."""
    config: Any = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return set()
    get: Any = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    names = {f"{n}.weight" for n, m in model.named_modules() if head is not None and m is head}
    return names | {k for k in model.state_dict() if "lm_head" in k}


def load(path: str | Path, device: str | torch.device | None = None,
         dtype: torch.dtype | None = None, device_map: str | None = None) -> PreTrainedModel:
    """Load a pruned model, rebuilding non-uniform shapes from the manifest when needed.

    Args:
        path: directory written by :func:`pare.save` (or any Hugging Face model directory).
        device: where to put the model (default: CPU).
        dtype: override the saved dtype.
        device_map: place the layers over the GPUs (then the CPU) with accelerate (``auto``,
            ``balanced``, ``sequential``...: see :data:`DEVICE_MAPS`), for a model larger than one
            device; not with ``device``. Models whose shapes only the manifest describes are refused.

    Raises:
        ModelNotFoundError: no ``config.json`` in ``path``.
        NotCausalLMError: not a causal LM (T5...).
        CorruptFileError: a tampered manifest or weight index, or truncated weights.
        PareError: a pare directory whose weights do not fit the model its config and manifest
            describe (e.g. saved without the reports of all its structural prunes).
    """
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ModelNotFoundError(f"{str(p)!r} is not a saved model directory (no config.json)")
    config = causal_lm_config(p)
    manifest = read_manifest(p) or {}
    edits = manifest.get("edits") or []
    files = weight_files(p)  # tampered or truncated files fail here, before transformers opens them
    check_device_map(device_map)
    if device_map is not None and device is not None:
        raise ConfigError("give device or device_map, not both")
    if device_map is not None and not (manifest.get("uniform", True) or not edits):
        raise ConfigError(f"{str(p)!r} has shapes its config cannot describe (pare.load rebuilds them from the "
                          "manifest), so accelerate cannot place it with a device map; load it on one device")
    if manifest.get("uniform", True) or not edits:
        model = _from_pretrained(p, dtype, pare_saved=bool(manifest), device_map=device_map)
    else:
        from pare.arch.surgery import replay

        saved_dtype = getattr(config, "dtype", None) or torch.float32
        if isinstance(saved_dtype, str):
            saved_dtype = getattr(torch, saved_dtype)
        model = build_from_config(config, dtype=dtype or saved_dtype)
        from pare.io.save import manifest_override

        replay(model, edits, manifest_override(manifest))
        state = _state_dict(files)
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = set(missing) & tied_head_keys(model)
        if unexpected or set(missing) - tied:
            raise PareError(
                f"{str(p)!r}: weights do not fit the rebuilt model (missing {sorted(set(missing) - tied)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}); the manifest may be from another pare version"
            )
        if tied:
            model.tie_weights()
    if manifest:
        from pare.methods.quantize import restore_activation_quant

        restore_activation_quant(model, manifest)  # simulated W8A8 activations live in hooks, not weights
    if device is not None:
        model.to(device)  # type: ignore[arg-type]
    return model.eval()


def meta_model(name_or_path: str) -> Any:
    """Build the model on the meta device from its config (no weights read), replaying pare edits."""
    try:
        config = causal_lm_config(name_or_path)  # a non-causal model (T5...) is said to be one
    except PareError:
        raise
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"cannot read a model config from {name_or_path!r}: {exc}") from exc
    with torch.device("meta"):
        model = build_from_config(config)
    manifest = read_manifest(name_or_path) if Path(name_or_path).is_dir() else None
    if manifest and not manifest.get("uniform", True):
        from pare.arch.surgery import replay
        from pare.io.save import manifest_override

        replay(model, manifest.get("edits") or [], manifest_override(manifest))
    return model
