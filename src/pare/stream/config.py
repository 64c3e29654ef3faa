"""Options of a streamed prune (``--stream``) and byte sizes as a user writes them (``8GB``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pare.config import BaseConfig, help_field
from pare.errors import ConfigError

ACTIVATIONS = ("auto", "device", "cpu", "disk")

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int | float) -> int:
    """``8GB`` (10^9), ``8GiB`` (2^30), ``512MB``, ``1.5GiB`` or a plain number of bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"max_memory must be a size such as 8GB, 8GiB or 512MB, got {text!r}")
        value, unit = float(m.group(1)), m.group(2).lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"max_memory must be positive, got {text!r}")
    return size


def fmt_bytes(n: float) -> str:
    """``n`` bytes in GiB (or MiB below one GiB), for messages."""
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.0f} MiB"


@dataclass(frozen=True)
class StreamConfig(BaseConfig):
    """Streaming options: read the model from disk one decoder layer at a time.

    Attributes:
        stream: read the embeddings, each decoder layer in turn and the head from the safetensors
            files, prune each layer and write it to the output at once (models larger than memory).
        max_memory: the memory the run may use on the compute device (RAM on the CPU); the run is
            refused before any work when one layer plus the activations do not fit (default: what
            is available now).
        activations: where the calibration activations live between layers: ``device``, ``cpu``,
            ``disk`` (a memory-mapped file beside the output) or ``auto`` (the device when they fit,
            else the CPU, else disk).
        resume: continue an interrupted ``--stream`` run to the same ``--out`` from its last finished
            layer (starts afresh when there is nothing to resume).
    """

    stream: bool = help_field(False, "read the model from disk one decoder layer at a time (models larger than "
                                     "memory); each pruned layer is written at once")
    max_memory: str | None = help_field(None, "with --stream: memory the run may use on the compute device, e.g. 8GB "
                                              "or 8GiB; refused before any work when a layer does not fit")
    activations: str = help_field("auto", "with --stream: where calibration activations live: auto, device, cpu, "
                                          "or disk (memory-mapped)")
    resume: bool = help_field(False, "with --stream: continue an interrupted run to the same --out")

    def __post_init__(self) -> None:
        self._check_field_types()
        if self.activations not in ACTIVATIONS:
            raise ConfigError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {self.activations!r}")
        if self.max_memory is not None:
            parse_bytes(self.max_memory)
        if not self.stream and (self.resume or self.max_memory is not None or self.activations != "auto"):
            raise ConfigError("--resume, --max-memory and --activations apply to a streamed prune: add --stream")

    @property
    def max_bytes(self) -> int | None:
        return None if self.max_memory is None else parse_bytes(self.max_memory)
