"""Base configuration dataclasses: validation, versioned dict round-trip, file loading, and the
registry of stages.

Every method has a frozen config dataclass deriving from :class:`PruneConfig`. Fields carry their
help text in ``metadata["help"]``; the CLI builds its options from them. Every field is checked
against its annotation when the config is built, so a wrong type is a ConfigError naming the field.

A method's stage class registers itself with :func:`register` (keyed by its config type and its
method name); from then on the CLI, recipes, ``pare methods``, the manifest reader and the contract
tests know it. Adding a method is one new file in ``pare/methods`` (or any module imported before
use) and its tests.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from pare.errors import ConfigError

CONFIG_VERSION = 1

C = TypeVar("C", bound="BaseConfig")
S = TypeVar("S", bound=type)


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
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__} options must be a mapping of option: value, got {data!r}")
        cls._check_header(data)
        data = {k.replace("-", "_"): v for k, v in data.items() if k not in ("version", "method")}
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(
                f"{cls.__name__} has no option(s) {unknown}; valid options are {sorted(names)}"
            )
        hints = field_hints(cls)
        kwargs = {key: checked_value(cls.__name__, key, hints[key], value) for key, value in data.items()}
        return cls(**kwargs)

    @classmethod
    def _check_header(cls, data: dict[str, Any]) -> None:
        """Refuse a dict written for another method or by a newer version (plain configs have none)."""

    def _check_field_types(self) -> None:
        """Raise ConfigError for a field whose value does not fit its annotation (lists become tuples)."""
        hints = field_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            checked = checked_value(type(self).__name__, f.name, hints[f.name], value)
            if checked is not value:
                object.__setattr__(self, f.name, checked)


_HINTS: dict[type, dict[str, Any]] = {}


def field_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config class's fields (kept per class: resolving them is slow)."""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


_KINDS: dict[type, tuple[type, ...]] = {str: (str,), int: (int,), float: (int, float), bool: (bool,)}
_KIND_WORDS = {str: "text", int: "an integer", float: "a number", bool: "true or false"}


def _fits(kind: type, value: Any) -> bool:
    return isinstance(value, _KINDS[kind]) and (kind is bool or not isinstance(value, bool))


def checked_value(owner: str, name: str, hint: Any, value: Any) -> Any:
    """``value`` as field ``name`` of type ``hint`` wants it (lists become tuples, one text item of a
    list of regexes becomes a one-item tuple), or a ConfigError saying what was expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # X | None
        inner = [a for a in args if a is not type(None)]
        return None if value is None else checked_value(owner, name, inner[0], value)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{owner}.{name} must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        kind = args[0]
        if isinstance(value, str) and kind is str:
            return (value,)
        if not isinstance(value, (list, tuple)):
            example = '["mlp\\.down_proj"]' if kind is str else "[0.3, 0.5, 0.7]"
            raise ConfigError(f"{owner}.{name} must be a list, e.g. {name}: {example}; got {value!r}")
        for item in value:
            if not _fits(kind, item):
                raise ConfigError(f"{owner}.{name}: every item must be {_KIND_WORDS[kind]}, got {item!r}")
        return tuple(value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{owner}.{name} must be a mapping (regex: value), got {value!r}")
        return value
    if hint in _KINDS and not _fits(hint, value):
        hint_yaml = ""
        if hint is str and isinstance(value, (int, float)):
            hint_yaml = ": quote it in a YAML file (an unquoted 2:4 is even read as the number 124)"
        raise ConfigError(f"{owner}.{name} must be {_KIND_WORDS[hint]}, got {value!r}{hint_yaml}")
    return value


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
    """What every stage's config is: a method name, a version, and validated options.

    Attributes:
        method: the registered name (``wanda``, ``osscar``...): the CLI's ``--method``, a recipe's
            stage key, the manifest's ``method``.
        VERSION: bumped when the meaning of a field changes; ``from_dict`` refuses a newer one.
    """

    method: ClassVar[str] = ""
    VERSION: ClassVar[int] = CONFIG_VERSION

    def __post_init__(self) -> None:
        """Check every field's type; subclasses then validate values (ConfigError saying what would work)."""
        self._check_field_types()

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.VERSION, "method": self.method, **super().to_dict()}

    @classmethod
    def _check_header(cls, data: dict[str, Any]) -> None:
        method = data.get("method")
        if method is not None and method != cls.method:
            raise ConfigError(f"this is a config of method {method!r}, not of {cls.method!r} ({cls.__name__}); "
                              f"read it with pare.config_from_dict(data)")
        version = data.get("version", cls.VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ConfigError(f"{cls.__name__}: version must be a positive integer, got {version!r}")
        if version > cls.VERSION:
            raise ConfigError(f"this {cls.method!r} config is version {version}, written by a newer pare; this "
                              f"pare reads up to version {cls.VERSION}: upgrade pare")


StageClass = Any
"""A registered stage class (``pare.methods.base.Pruner`` subclass); typed loosely here so that the
registry has no import of the stages."""

STAGES: dict[str, StageClass] = {}
"""Every registered stage by method name, in registration order (``pare.METHODS`` is this dict)."""


def register(stage: S) -> S:
    """Class decorator: make a stage known by its config type and method name.

    The stage class names its config in ``config_class``; the config's ``method`` is the name used
    by the CLI, recipes and manifests. Registering a second stage under a taken name is an error
    (unless it is the same class, re-imported).
    """
    config_class = getattr(stage, "config_class", None)
    if not (isinstance(config_class, type) and issubclass(config_class, PruneConfig)):
        raise TypeError(f"{stage.__name__}.config_class must be a PruneConfig subclass to register it")
    name = config_class.method
    if not name or not isinstance(name, str):
        raise TypeError(f"{config_class.__name__}.method must name the method (e.g. 'wanda')")
    taken = STAGES.get(name)
    if taken is not None and taken.__qualname__ != stage.__qualname__:
        raise TypeError(f"method name {name!r} is already registered by {taken.__qualname__}")
    STAGES[name] = stage
    return stage


def unregister(name: str) -> None:
    """Forget a registered stage (for tests that register a toy one)."""
    STAGES.pop(name, None)


def stage_class(method: str) -> StageClass:
    """The stage class of a method name, with the list of valid names on error."""
    try:
        return STAGES[method]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown method {method!r}; choose one of {sorted(STAGES)}") from None


def stage_for_config(config: Any) -> StageClass:
    """The stage class registered for ``config``'s type (ConfigError for anything else)."""
    if isinstance(config, PruneConfig):
        stage = STAGES.get(config.method)
        if stage is not None and isinstance(config, stage.config_class):
            return stage
    raise ConfigError(f"a stage config must be a registered method config such as pare.WandaConfig(sparsity=0.5), "
                      f"got {type(config).__name__}; registered: {sorted(STAGES)}")


def config_from_dict(data: dict[str, Any]) -> PruneConfig:
    """The config a ``to_dict`` wrote, rebuilt by its ``method`` (version checked)."""
    if not isinstance(data, dict) or "method" not in data:
        raise ConfigError(f"a stage config dict needs its 'method' (one of {sorted(STAGES)}), got {data!r}")
    config: PruneConfig = stage_class(data["method"]).config_class.from_dict(data)
    return config


@dataclass(frozen=True)
class CalibrationConfig(BaseConfig):
    """Which text to calibrate on and how much of it."""

    dataset: str = help_field("c4", "named set (wikitext2, ptb, c4, tinystories) or a .txt/.jsonl/.parquet path")
    nsamples: int = help_field(128, "number of calibration windows")
    seqlen: int = help_field(2048, "tokens per calibration window (default 2048; pare prune takes the model's "
                                   "context when shorter)")
    seed: int = help_field(0, "random seed for the window positions")
    batch_size: int = help_field(8, "windows per forward pass in the layer-wise runner")
    allow_repeats: bool = help_field(False, "accept text shorter than nsamples x seqlen tokens (windows overlap)")

    def __post_init__(self) -> None:
        self._check_field_types()
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
    devices: tuple[str, ...] = help_field((), "compute devices, comma- or space-separated (cuda:0,cuda:1): the "
                                          "calibration batches are split across them, one copy of the current "
                                          "layer on each (wanda, sparsegpt, magnitude, quantize); one device "
                                          "acts as --device")

    def __post_init__(self) -> None:
        if isinstance(self.devices, str):
            object.__setattr__(self, "devices", (self.devices,))
        if isinstance(self.devices, list):
            object.__setattr__(self, "devices", tuple(self.devices))
        self._check_field_types()
        names = tuple(n.strip() for d in self.devices for n in d.split(",") if n.strip())
        object.__setattr__(self, "devices", names)  # "a,b" and "a b" both accepted
        for name in names:
            device_name(name)
        if len(set(names)) != len(names):
            raise ConfigError(f"devices lists a device twice: {list(names)}; each device holds a copy of the current "
                              "layer and a share of the batches, so list each one once")
        if names and self.device is not None:
            raise ConfigError(f"give the compute device once: device={self.device!r} or devices={list(names)}, "
                              "not both")

    def compute_device(self) -> torch.device:
        """The device the work runs on (the first of :meth:`compute_devices`), checked to work here."""
        return self.compute_devices()[0]

    def compute_devices(self) -> list[torch.device]:
        """The devices the work runs on, checked to work here (see :func:`usable_devices`): with several,
        the layer-wise runner splits the calibration batches across them (the first device holds the
        layer the method changes and the summed statistics)."""
        if not self.devices:
            return [usable_device(self.device)]
        return usable_devices(self.devices)


DTYPES = ("float32", "float16", "bfloat16", "float64")


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A load dtype from its name (None or ``auto``: the checkpoint's own)."""
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype if isinstance(dtype, torch.dtype) else None
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def usable_device(device: str | torch.device | None) -> torch.device:
    """The compute device to use (None: cuda when available, else cpu), checked to work here."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = device if isinstance(device, torch.device) else device_name(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} cannot be used on this machine: CUDA is not available (no GPU, "
                          "or a torch built without CUDA); usable here: cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"numbered from 0")
    if dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError) as exc:
            cuda = f"cuda ({torch.cuda.device_count()} device(s))" if torch.cuda.is_available() else None
            usable = ", ".join(d for d in ("cpu", cuda) if d)
            raise ConfigError(f"device {device!r} cannot be used on this machine ({exc}); usable here: {usable}") \
                from exc
    return dev


def device_name(name: str) -> torch.device:
    """``name`` as a torch device, or a ConfigError that says what a device name looks like."""
    try:
        return torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {name!r} is not a device name: use cpu, cuda, cuda:1, mps...") from exc


def usable_devices(names: Sequence[str | torch.device | None]) -> list[torch.device]:
    """Every device of ``names`` checked to work here (:func:`usable_device`): CUDA present, the index
    below the number of GPUs; one kind of device (a CPU does not share the work of GPUs). A device may
    repeat here (the layer-wise runner's tests split batches across ``["cpu", "cpu"]``);
    :class:`RuntimeConfig` refuses repeats."""
    found = [usable_device(n) for n in names]
    if len(found) > 1 and "cuda" in {d.type for d in found} and len(set(found)) > torch.cuda.device_count():
        raise ConfigError(f"devices {list(names)}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    kinds = sorted({d.type for d in found})
    if len(kinds) > 1:
        raise ConfigError(f"devices {list(names)} mix {' and '.join(kinds)}: give devices of one kind")
    return found


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
