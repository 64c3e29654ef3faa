"""Read a safetensors checkpoint one decoder layer at a time, never the whole model.

:class:`Checkpoint` knows which file holds each tensor (``model.safetensors.index.json`` or one
``model.safetensors``; a hub id is downloaded shard by shard, when a shard is first needed) and
reads single tensors with :func:`safetensors.safe_open`. Each tensor is read through its own
handle and copied out of the file mapping, so the mapping is released at once: the process holds
the tensors it keeps plus one tensor in transit, never the pages of a whole shard.

:class:`KeyMap` ties checkpoint names to the model's parameter names with transformers' own
conversion rules (``embed_out`` -> ``lm_head``, Mixtral's per-expert matrices -> the fused
``gate_up_proj``...), applied to the tensors of one layer at a time. Pickled ``.bin`` checkpoints
are refused, never unpickled.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pare.errors import ConfigError

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def refuse_pickled(name: str, files: Iterable[str]) -> None:
    """ConfigError when ``files`` (names in a model repository) hold pickled weights and no safetensors."""
    names = set(files)
    if INDEX in names or SINGLE in names:
        return
    pickled = sorted(n for n in names if n.endswith(".bin") or n in PICKLED)
    if pickled:
        raise ConfigError(
            f"{name!r} holds only pickled PyTorch weights ({', '.join(pickled[:3])}): streaming reads one layer at a "
            "time from safetensors files and never unpickles a checkpoint (unpickling runs code from the file). "
            "Convert it once to safetensors (model.save_pretrained(dir) after loading it in memory, on a machine "
            "where it fits), or prune without --stream")
    raise ConfigError(f"{name!r} has no {SINGLE} nor {INDEX}: streaming needs a safetensors checkpoint")


@dataclass
class Checkpoint:
    """Where each tensor of a safetensors checkpoint lives.

    Attributes:
        name: the local directory or hub id.
        weight_map: tensor name -> file name (relative to the directory or repository).
        root: the local directory (None for a hub id until a shard is downloaded).
        repo: the hub id when not local.
    """

    name: str
    weight_map: dict[str, str]
    root: Path | None = None
    repo: str | None = None
    revision: str | None = None
    _local: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def open(cls, name_or_path: str | Path, revision: str | None = None) -> Checkpoint:
        """The checkpoint of a local directory or a hub id (only its index is fetched here).

        Raises:
            ConfigError: only pickled ``.bin`` weights, or no weights at all.
            CorruptFileError: a damaged index or truncated shard (local directories).
        """
        path = Path(name_or_path)
        if path.is_dir():
            from pare.io.load import weight_files

            refuse_pickled(str(name_or_path), (p.name for p in path.iterdir()))
            files = weight_files(path)  # index inside the directory, shards whole
            return cls(str(name_or_path), _weight_map(path, files), root=path)
        try:
            return cls._from_hub(str(name_or_path), revision)
        except ConfigError:
            raise
        except Exception as exc:  # offline, unknown repository, no access: said as such, not a traceback
            from pare.errors import ModelNotFoundError

            raise ModelNotFoundError(f"cannot stream {str(name_or_path)!r}: it is not a local directory and the "
                                     f"Hugging Face Hub did not serve it ({type(exc).__name__}: {exc})") from exc

    @classmethod
    def _from_hub(cls, repo: str, revision: str | None) -> Checkpoint:
        """A hub repository: its file list and index only; shards are downloaded when first read."""
        from huggingface_hub import hf_hub_download, list_repo_files

        files = list_repo_files(repo, revision=revision)
        refuse_pickled(repo, files)
        if INDEX in files:
            index = json.loads(Path(hf_hub_download(repo, INDEX, revision=revision)).read_text(encoding="utf-8"))
            weight_map = dict(index["weight_map"])
        else:
            from safetensors import safe_open

            with safe_open(hf_hub_download(repo, SINGLE, revision=revision), "pt") as f:
                weight_map = dict.fromkeys(f.keys(), SINGLE)
        return cls(repo, weight_map, repo=repo, revision=revision)

    def file(self, key: str) -> Path:
        """The local file holding ``key`` (a hub shard is downloaded the first time it is needed)."""
        name = self.weight_map[key]
        if self.root is not None:
            return self.root / name
        if name not in self._local:
            from huggingface_hub import hf_hub_download

            assert self.repo is not None
            log.info("downloading %s of %s", name, self.repo)
            self._local[name] = Path(hf_hub_download(self.repo, name, revision=self.revision))
        return self._local[name]

    def read(self, key: str, dtype: torch.dtype | None = None, device: torch.device | None = None) -> torch.Tensor:
        """One tensor, as an owned copy (the file mapping is released before returning)."""
        from safetensors import safe_open

        with safe_open(str(self.file(key)), "pt") as f:
            mapped = f.get_tensor(key)
            # .to() returns the mapped tensor itself when nothing changes: clone then, so no page of
            # the file stays mapped once this handle closes
            out = mapped.to(device=device, dtype=dtype)
            owned = out.clone() if out.data_ptr() == mapped.data_ptr() else out
            del mapped, out
        return owned


def _weight_map(root: Path, files: list[Path]) -> dict[str, str]:
    index = root / INDEX
    if index.is_file():
        return dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    from safetensors import safe_open

    out: dict[str, str] = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            out.update(dict.fromkeys(f.keys(), file.name))
    return out


@dataclass
class _Group:
    """The checkpoint tensors that make up one model parameter (or several, for a split)."""

    transform: Any  # a transformers WeightTransform (a renaming or a converter)
    sources: list[tuple[str, str]]  # (checkpoint key, matched source pattern)


class KeyMap:
    """Checkpoint names -> the model's parameter names, by transformers' own loading rules.

    Args:
        model: the model skeleton (meta parameters are fine).
        keys: every tensor name of the checkpoint.
    """

    def __init__(self, model: nn.Module, keys: Iterable[str]) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        self.model = model
        transforms = get_model_conversion_mapping(model)  # type: ignore[arg-type]
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        meta_sd = model.state_dict()
        prefix = getattr(model, "base_model_prefix", None)
        self.groups: dict[str, _Group] = {}
        self.unused: list[str] = []
        for key in sorted(keys):
            renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta_sd)
            if renamed not in meta_sd and key in meta_sd:
                renamed, pattern = key, None
            if renamed not in meta_sd:
                self.unused.append(key)
                continue
            group = self.groups.get(renamed)
            if group is None:
                transform = copy.deepcopy(by_pattern[pattern]) if pattern is not None else WeightRenaming(key, renamed)
                group = self.groups[renamed] = _Group(transform, [])
            group.sources.append((key, pattern if pattern is not None else key))
        if self.unused:
            log.debug("checkpoint tensors the model has no place for (ignored, as from_pretrained does): %s",
                      self.unused[:5])

    def names_under(self, prefix: str | None, excluded: Iterable[str] = ()) -> list[str]:
        """The parameter groups whose name starts with ``prefix.`` (None: outside every ``excluded`` prefix)."""
        skip = tuple(p + "." for p in excluded)
        if prefix is None:
            return [k for k in self.groups if not k.startswith(skip)]
        return [k for k in self.groups if k.startswith(prefix + ".")]

    def load(self, names: Iterable[str], read: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model tensors of the groups ``names``: their checkpoint tensors read with ``read`` and
        converted as ``from_pretrained`` converts them."""
        out: dict[str, torch.Tensor] = {}
        for name in names:
            group = self.groups[name]
            transform = copy.deepcopy(group.transform)
            for key, pattern in group.sources:
                transform.add_tensor(name, key, pattern, lambda k=key: read(k))
            converted = transform.convert(name, model=self.model, config=getattr(self.model, "config", None))
            for target, value in converted.items():
                out[target] = value[0] if isinstance(value, list) else value
        return out

    def missing(self, parameter_names: Iterable[str], tied: Iterable[str] = ()) -> list[str]:
        """Parameters no checkpoint tensor fills (tied ones excepted)."""
        filled = set(self.groups)
        skip = set(tied)
        return [n for n in parameter_names if n not in filled and n not in skip]
