"""Base configuration dataclasses: validation, versioned dict round-trip, file loading.

Every method has a frozen config dataclass deriving from :class:`PruneConfig`. Fields carry their
help text in ``metadata["help"]``; the CLI builds its options from them.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pare.errors import ConfigError

CONFIG_VERSION = 1

C = TypeVar("C", bound="BaseConfig")


def help_field(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with help text (used by the CLI and the docs)."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass(frozen=True)
class BaseConfig:
    """Frozen config with a versioned ``to_dict``/``from_dict`` round-trip."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        data = {k.replace("-", "_"): v for k, v in data.items() if k not in ("version", "method")}
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(
                f"{cls.__name__} has no option(s) {unknown}; valid options are {sorted(names)}"
            )
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in data.items():
            if isinstance(value, list) and "tuple" in str(hints.get(key, "")):
                value = tuple(value)
            kwargs[key] = value
        return cls(**kwargs)


def check_ratio(name: str, value: float, *, allow_zero: bool = True) -> None:
    """Raise ConfigError unless ``value`` is a number in [0, 1) (or (0, 1) without zero)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}")
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value < 1):
        lo = "[0" if allow_zero else "(0"
        raise ConfigError(
            f"{name}={value} is outside {lo}, 1): it is the fraction removed, so 0.5 removes half; "
            "1 or more would remove everything"
        )


def check_regexes(name: str, patterns: tuple[str, ...]) -> None:
    for p in patterns:
        try:
            re.compile(p)
        except re.error as exc:
            raise ConfigError(f"{name}: {p!r} is not a valid regular expression ({exc})") from exc


@dataclass(frozen=True)
class PruneConfig(BaseConfig):
    """Options shared by every pruning method.

    Attributes:
        targets: regexes over module names; a module is pruned when one matches (default: every
            linear inside a decoder layer).
        ignore: regexes over module names never to prune (embeddings and lm_head are never pruned).
    """

    method: ClassVar[str] = ""

    targets: tuple[str, ...] = help_field((), "regexes of module names to prune (default: all decoder linears)")
    ignore: tuple[str, ...] = help_field((), "regexes of module names never to prune")

    def __post_init__(self) -> None:
        check_regexes("targets", self.targets)
        check_regexes("ignore", self.ignore)

    def to_dict(self) -> dict[str, Any]:
        return {"version": CONFIG_VERSION, "method": self.method, **super().to_dict()}


@dataclass(frozen=True)
class CalibrationConfig(BaseConfig):
    """Which text to calibrate on and how much of it."""

    dataset: str = help_field("c4", "named set (wikitext2, ptb, c4, tinystories) or a .txt/.jsonl/.parquet path")
    nsamples: int = help_field(128, "number of calibration windows")
    seqlen: int = help_field(2048, "tokens per calibration window")
    seed: int = help_field(0, "random seed for the window positions")
    batch_size: int = help_field(8, "windows per forward pass in the layer-wise runner")

    def __post_init__(self) -> None:
        for name in ("nsamples", "seqlen", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class RuntimeConfig(BaseConfig):
    """Where the work runs."""

    device: str | None = help_field(None, "compute device (cpu, cuda, cuda:1...); default: cuda if available")
    offload: bool = help_field(True, "keep layers not being processed on the CPU")
    sequential: bool = help_field(
        True, "feed each layer the outputs of the already-pruned layers (False: dense inputs)"
    )
    progress: bool = help_field(True, "show progress bars")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict, with a clear error when it cannot be read."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {exc}") from exc
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:
        raise ConfigError(
            f"config file {str(p)!r} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {exc}"
        ) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of option: value, got {type(data).__name__}")
    return data
