"""What every export format reads from a saved model: its tensors as stored, its config, the
quantization its manifest records, and the integer grid of each quantized matrix recovered exactly
from the fake-quantized weights (:func:`pare.ops.quant.grid.fit_int_grid`).

Checks that need no weights come first (:func:`read_source`): a directory that is not a model, a
non-uniform model, several quantization stages of different schemes. The grids are fitted next
(:func:`fit_grids`); a matrix the quantization selected but whose weights are off its grid (changed by
a later stage) is refused, naming it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pare.errors import ConfigError, ModelNotFoundError
from pare.ops.quant.grid import IntGrid, fit_int_grid
from pare.ops.quant.scheme import INT_SCHEMES

log = logging.getLogger(__name__)

EXPORT_RECORD = "pare_export.json"


@dataclass(frozen=True)
class QuantInfo:
    """The quantization a manifest records (one scheme for the whole model).

    Attributes:
        scheme: e.g. ``int4``, ``mxfp4``.
        group_size: inputs per scale; 0 = per output channel.
        symmetric: no zero point.
        selective: the stage named ``targets``/``ignore``: matrices off the grid may be unquantized ones.
        activations: simulated activation quantization (``int8``, ``fp8``), or empty.
    """

    scheme: str
    group_size: int
    symmetric: bool
    selective: bool = False
    activations: str = ""

    @property
    def bits(self) -> int | None:
        """Bits of an integer scheme, None for MX / NVFP4."""
        return INT_SCHEMES.get(self.scheme)

    def label(self) -> str:
        group = "per channel" if self.group_size == 0 else f"group {self.group_size}"
        return f"{self.scheme} {group}{'' if self.symmetric else ' asymmetric'}"


@dataclass
class Matrix:
    """One quantized matrix: its stored tensor's key, group size and recovered grid."""

    key: str
    group: int
    grid: IntGrid


@dataclass
class Source:
    """A saved model read for export."""

    path: Path
    config: Any
    manifest: dict[str, Any] | None
    tensors: dict[str, torch.Tensor]
    quant: QuantInfo | None
    linears: list[str] = field(default_factory=list)  # keys of the decoder layers' 2-D linear weights
    matrices: dict[str, Matrix] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        floats = [t.dtype for t in self.tensors.values() if t.is_floating_point()]
        return max(set(floats), key=floats.count) if floats else torch.float32


def quant_info(manifest: dict[str, Any] | None) -> QuantInfo | None:
    """The one quantization recorded in ``manifest`` (None when it records none).

    Raises:
        ConfigError: stages quantized with different schemes.
    """
    from pare.io.save import manifest_stages

    found: list[QuantInfo] = []
    for stage in manifest_stages(manifest):
        q = (stage.get("scores") or {}).get("quantization")
        if not isinstance(q, dict):
            continue
        cfg = stage.get("config") or {}
        found.append(QuantInfo(str(q.get("scheme")), int(q.get("group_size") or 0), bool(q.get("symmetric", True)),
                               bool(cfg.get("targets") or cfg.get("ignore")), str(cfg.get("act_quant") or "")))
    kinds = {(f.scheme, f.group_size, f.symmetric) for f in found}
    if len(kinds) > 1:
        raise ConfigError(f"the model was quantized by several stages with different schemes "
                          f"({', '.join(f.label() for f in found)}): a checkpoint format holds one; quantize once")
    return found[-1] if found else None


def read_source(path: str | Path) -> Source:
    """Read the tensors, config and manifest of a saved model (no grid fitting yet).

    Raises:
        ModelNotFoundError: no ``config.json`` or weights.
        ConfigError: a non-uniform model (only ``pare.load`` rebuilds its shapes), or mixed schemes.
    """
    from safetensors.torch import load_file

    from pare.io.load import causal_lm_config, read_manifest, weight_files

    p = Path(path)
    if not (p / "config.json").is_file():
        raise ModelNotFoundError(f"{str(p)!r} is not a saved model directory (no config.json)")
    config = causal_lm_config(p)
    manifest = read_manifest(p)
    if manifest is not None and not manifest.get("uniform", True):
        raise ConfigError(f"{str(p)!r} has non-uniform shapes (layers of different widths), which only pare.load "
                          "rebuilds: no checkpoint format that from_pretrained or llama.cpp reads can hold it. Export "
                          "a uniform result (a cut applied to every layer alike, or sparsity / quantization)")
    files = [f for f in weight_files(p) if f.suffix == ".safetensors"]
    if not files:
        raise ModelNotFoundError(f"{str(p)!r} holds no *.safetensors weights to export")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    src = Source(p, config, manifest, tensors, quant_info(manifest))
    src.linears = decoder_linears(p, tensors)
    return src


def decoder_linears(path: Path, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Stored keys of every 2-D ``nn.Linear`` weight inside a decoder layer (what pare quantizes)."""
    from pare.arch import describe
    from pare.arch.targets import layer_targets
    from pare.io.load import meta_model

    model = meta_model(str(path))
    arch = describe(model)
    keys = []
    for i, layer in enumerate(arch.layer_modules(model)):
        for t in layer_targets(layer, arch.layers[i], arch.layer_prefix(i)):
            if t.expert is not None or t.conv1d:
                continue
            key = f"{t.name}.weight"
            if key in tensors and tensors[key].dim() == 2:
                keys.append(key)
    return keys


def fit_grids(src: Source, formats_hint: str) -> dict[str, Matrix]:
    """Recover the integer grid of every quantized decoder linear of ``src`` (into ``src.matrices``).

    Args:
        src: from :func:`read_source`, with an integer ``quant``.
        formats_hint: what to say when a matrix is off its grid (which formats could still hold it).

    Raises:
        ConfigError: a matrix partly off its grid, or wholly off it while the quantization selected every
            matrix: a later stage changed it.
    """
    q = src.quant
    assert q is not None and q.bits is not None
    out: dict[str, Matrix] = {}
    for key in src.linears:
        w = src.tensors[key]
        group = q.group_size or w.shape[1]
        if w.shape[1] % group:
            if q.selective:
                continue
            raise ConfigError(f"{key} has {w.shape[1]} inputs, not a multiple of the group {group}: it cannot have "
                              f"been quantized with {q.label()}")
        grid = fit_int_grid(w, q.bits, group, q.symmetric)
        if grid.all_fitted:
            out[key] = Matrix(key, group, grid)
            continue
        share = float(grid.fitted.float().mean())
        if q.selective and share < 0.5:
            log.info("%s is not on the %s grid: exported unquantized (the stage's targets/ignore left it out)",
                     key, q.label())
            continue
        raise ConfigError(f"{key}: {1 - share:.1%} of its groups are not on the {q.label()} grid the manifest records, "
                          "so a stage after the quantization changed it (e.g. SparseGPT or a recovery step run after "
                          f"quantize). Quantize last, or use SparseGPT's joint pass (--quantize); {formats_hint}")
    if not out:
        raise ConfigError(f"no decoder matrix of {str(src.path)!r} is on the {q.label()} grid its manifest records")
    src.matrices = out
    return out


def write_record(directory: Path, src: Source, fmt: str, extra: dict[str, Any]) -> None:
    """``pare_export.json``: what was exported from where, and the byte account."""
    record = {"format": fmt, "source": str(src.path),
              "quantization": None if src.quant is None else src.quant.__dict__, **extra}
    (directory / EXPORT_RECORD).write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
