"""The files side of a streamed prune: the skeleton, reading each layer in, writing each layer out.

:class:`StreamFiles` is the :class:`~pare.calibration.stream.LayerIO` of :class:`StreamRunner`: it
fills a layer of the skeleton from the source checkpoint, and once the layer is stepped it counts
what the report needs, writes the layer's shard, the next layer's inputs and the progress record,
in that order (see :mod:`pare.io.partial`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pare.arch.roles import ModelArch
from pare.calibration.stream import MappedBatches
from pare.errors import ConfigError, ModelNotFoundError
from pare.eval.size import nonzero_by_parameter
from pare.io.checkpoint import Checkpoint, KeyMap
from pare.io.partial import PartialOutput, shard_name

log = logging.getLogger(__name__)

Event = Callable[[str, int], None]
"""Called as ``event(stage, layer)`` at ``pruned``, ``writing`` (shard written, not yet renamed),
``written`` and ``recorded`` (tests interrupt a run there)."""

RECORD_VERSION = 1


def build_skeleton(name_or_path: str, dtype: torch.dtype | None) -> nn.Module:
    """The model from its config with every parameter on ``meta`` (buffers are computed as usual)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from pare.io.load import causal_lm_config

    try:
        config = causal_lm_config(name_or_path)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"cannot read a model config from {str(name_or_path)!r}: {exc}") from exc
    resolved = dtype or _config_dtype(config) or torch.float32
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=resolved)
    model.config.name_or_path = str(name_or_path)
    tie(model)  # from_config on meta leaves the tied parameters apart
    return model.eval()


def _config_dtype(config: Any) -> torch.dtype | None:
    value = getattr(config, "dtype", None)
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return getattr(torch, value)
    return None


def assign(model: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    """Put ``tensors`` (model names) in place of the skeleton's parameters/buffers, in their dtype."""
    for name, value in tensors.items():
        path, _, attr = name.rpartition(".")
        module = model.get_submodule(path)
        if attr in module._parameters:
            old = module._parameters[attr]
            dtype = old.dtype if old is not None else value.dtype
            module._parameters[attr] = nn.Parameter(value.to(device=device, dtype=dtype), requires_grad=False)
        elif attr in module._buffers:
            old_buf = module._buffers[attr]
            module._buffers[attr] = value.to(device=device, dtype=old_buf.dtype if old_buf is not None else None)
        else:
            raise ConfigError(f"the checkpoint's {name} has no place in the model")


def buffers_to(module: nn.Module, device: torch.device) -> None:
    """Move ``module``'s computed (non-meta) buffers to ``device``."""
    for sub in module.modules():
        for key, buf in list(sub._buffers.items()):
            if buf is not None and not buf.is_meta and buf.device != device:
                sub._buffers[key] = buf.to(device)


def tie(model: nn.Module) -> list[str]:
    """Point every tied parameter at its source (the skeleton's tie was to a meta tensor); returns
    the tied names (never written: ``from_pretrained`` ties them again)."""
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    for target, source in tied.items():
        t_path, _, t_attr = target.rpartition(".")
        s_path, _, s_attr = source.rpartition(".")
        model.get_submodule(t_path)._parameters[t_attr] = model.get_submodule(s_path)._parameters[s_attr]
    return list(tied)


def to_checkpoint_names(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors named as ``save_pretrained`` names them (transformers' conversions reverted)."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(state))  # type: ignore[arg-type]


def fingerprint(source: str, ckpt: Checkpoint, settings: dict[str, Any], ids: torch.Tensor | None) -> dict[str, Any]:
    """What must not change between a run and its ``--resume``."""
    files = {}
    if ckpt.root is not None:
        for name in sorted(set(ckpt.weight_map.values())):
            st = (ckpt.root / name).stat()
            files[name] = [st.st_size, int(st.st_mtime)]
    digest = None if ids is None else hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
    return {"source": str(Path(source).absolute()) if ckpt.root is not None else source, "files": files,
            "calibration_sha256": digest, **json.loads(json.dumps(settings, default=str))}


class StreamFiles:
    """Reads layers from ``ckpt`` into ``model`` and writes finished ones into ``part``.

    Args:
        model: the skeleton.
        arch: its description.
        ckpt, keymap: the source checkpoint and its names.
        part: the locked work directory.
        stage: the stage (for the measured sparsity of its targets and its accumulated state).
        record: the progress record so far (a resumed run's), updated after each layer.
        mapped: the activations' memory-mapped files, or None when they stay in memory.
    """

    def __init__(self, model: nn.Module, arch: ModelArch, ckpt: Checkpoint, keymap: KeyMap, part: PartialOutput,
                 stage: Any, record: dict[str, Any], mapped: bool, event: Event | None = None) -> None:
        self.model, self.arch, self.ckpt, self.keymap, self.part = model, arch, ckpt, keymap, part
        self.stage = stage
        self.record = record
        self.mapped = mapped
        self.event = event or (lambda stage, index: None)
        self.n_shards = arch.num_layers + 1
        self._before = 0
        self._started = time.perf_counter()
        self.seconds_before = float(record.get("seconds", 0.0))

    def read(self, key: str) -> torch.Tensor:
        return self.ckpt.read(key)

    def load_outside(self, device: torch.device) -> None:
        """The parameters outside the decoder layers (embeddings, final norm, head), tied as the model ties."""
        names = self.keymap.names_under(None, excluded=[self.arch.layers_path])
        assign(self.model, self.keymap.load(names, self.read), device)
        tie(self.model)
        prefix = self.arch.layers_path + "."
        for name, module in self.model.named_modules():
            if not (name == self.arch.layers_path or name.startswith(prefix)):
                for key, buf in list(module._buffers.items()):
                    if buf is not None and not buf.is_meta and buf.device != device:
                        module._buffers[key] = buf.to(device)
        missing = [n for n, p in self.model.named_parameters()
                   if p.is_meta and not (n == self.arch.layers_path or n.startswith(prefix))]
        if missing:
            raise ConfigError(f"the checkpoint has no weights for {missing[:3]}: it does not match its config")

    def write_outside(self) -> None:
        """Shard 0: everything outside the decoder layers (tied copies left out)."""
        name = shard_name(0, self.n_shards)
        if name in self.record.get("shards", {}):
            return
        tied = set(getattr(self.model, "all_tied_weights_keys", None) or {})
        prefix = self.arch.layers_path + "."
        state = {k: v for k, v in self.model.state_dict().items()
                 if not k.startswith(prefix) and k not in tied and not v.is_meta}
        nonzero = sum(nonzero_by_parameter(self.model).values())  # only the outside is materialised
        out = to_checkpoint_names(self.model, state)
        self.part.write_shard(name, out)
        self.record.setdefault("shards", {})[name] = {k: v.numel() * v.element_size() for k, v in out.items()}
        self.record["outside_nonzero"] = nonzero
        self.record["done"] = -1
        self._save_record()

    def free_outside(self) -> None:
        prefix = self.arch.layers_path + "."
        for name, module in self.model.named_modules():
            if name == self.arch.layers_path or name.startswith(prefix):
                continue
            for key, p in list(module._parameters.items()):
                if p is not None and not p.is_meta:
                    module._parameters[key] = nn.Parameter(p.to("meta"), requires_grad=False)
        tie(self.model)

    # --------------------------------------------------------------- LayerIO
    def load_layer(self, index: int, layer: nn.Module, device: torch.device) -> None:
        prefix = self.arch.layer_prefix(index)
        tensors = self.keymap.load(self.keymap.names_under(prefix), self.read)
        assign(self.model, tensors, device)
        del tensors
        buffers_to(layer, device)
        missing = [n for n, p in layer.named_parameters() if p.is_meta]
        if missing:
            raise ConfigError(f"the checkpoint has no weights for {prefix}.{missing[0]} ({len(missing)} missing)")
        self._before = sum(nonzero_by_parameter(layer).values())

    def layer_done(self, index: int, layer: nn.Module, next_inputs: Sequence[torch.Tensor] | None) -> None:
        self.event("pruned", index)
        rec = self.record
        rec.setdefault("modules", {}).update(self.stage.layer_modules_report(self.arch, index, layer))
        rec["nonzero_before"] = rec.get("nonzero_before", 0) + self._before
        rec["nonzero_after"] = rec.get("nonzero_after", 0) + sum(nonzero_by_parameter(layer).values())
        prefix = self.arch.layer_prefix(index)
        state = {f"{prefix}.{k}": v for k, v in layer.state_dict().items()}
        out = to_checkpoint_names(self.model, state)
        name = shard_name(index + 1, self.n_shards)
        self.part.write_shard(name, out, before_rename=lambda _tmp: self.event("writing", index))
        rec.setdefault("shards", {})[name] = {k: v.numel() * v.element_size() for k, v in out.items()}
        self.event("written", index)
        old_inputs = rec.get("inputs")
        if next_inputs is not None:
            if isinstance(next_inputs, MappedBatches):
                rec["inputs"] = {"mapped": next_inputs.flip()}
                next_inputs.flush()
            else:
                file = f"inputs-{index + 1:05d}.safetensors"
                self.part.save_tensors(file, list(next_inputs))
                rec["inputs"] = file
        rec["stage"] = self.stage.layer_state()
        rec["done"] = index
        self._save_record()
        if isinstance(old_inputs, str) and old_inputs != rec.get("inputs"):
            (self.part.work / old_inputs).unlink(missing_ok=True)
        self.event("recorded", index)

    def _save_record(self) -> None:
        from pare.eval.memory import peak_rss_mb

        self.record["seconds"] = self.seconds_before + time.perf_counter() - self._started
        self.record["peak_rss_mb"] = max(float(self.record.get("peak_rss_mb", 0.0)), peak_rss_mb())
        self.record["version"] = RECORD_VERSION
        self.part.record(copy.deepcopy(self.record))
