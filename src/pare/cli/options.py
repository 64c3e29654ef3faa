"""Turn config dataclass fields into argparse options, and parsed options back into configs."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from pare.config import BaseConfig
from pare.errors import ConfigError


def _base_type(hint: Any) -> tuple[Any, bool]:
    """(element type, is_tuple) of a field annotation; Optional[...] unwrapped."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else (str, False)
    if origin is tuple:
        elems = typing.get_args(hint)
        return (elems[0] if elems else str), True
    if origin is typing.Literal:
        return str, False
    return hint, False


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (a 0 is refused, never replaced by a default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (1 or more), got {value}")
    return value


def flag_names(name: str, aliases: list[str] | None = None) -> list[str]:
    names = [f"--{name.replace('_', '-')}"]
    if "_" in name:
        names.append(f"--{name}")
    return names + list(aliases or [])


def file_only(cls: type[BaseConfig]) -> set[str]:
    """The fields of ``cls`` that have no flag (mappings): they are set in a config file only."""
    hints = typing.get_type_hints(cls)
    out = set()
    for f in dataclasses.fields(cls):
        elem, _ = _base_type(hints[f.name])
        if elem is dict or typing.get_origin(elem) is dict:
            out.add(f.name)
    return out


def option_label(cls: type[BaseConfig], name: str) -> str:
    """How a field is set: ``--module-name``, or ``module_name (config file)`` for a field with no flag."""
    return f"{name} (config file)" if name in file_only(cls) else f"--{name.replace('_', '-')}"


def add_config_options(parser: argparse.ArgumentParser, cls: type[BaseConfig], taken: set[str]) -> list[str]:
    """Add one option per field of ``cls`` not already in ``taken``; return the dests added."""
    hints = typing.get_type_hints(cls)
    added = []
    for f in dataclasses.fields(cls):
        if f.name in taken or not f.init:
            continue
        if f.name in file_only(cls):
            continue  # mappings come from the config file only
        elem, is_tuple = _base_type(hints[f.name])
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": f.metadata.get("help", "")}
        names = flag_names(f.name, f.metadata.get("aliases"))
        if elem is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = elem if elem in (int, float, str) else str
            if is_tuple:
                kwargs["nargs"] = "+"
        parser.add_argument(*names, **kwargs)
        taken.add(f.name)
        added.append(f.name)
    return added


def build_config(cls: type[BaseConfig], file_values: dict[str, Any], args: argparse.Namespace,
                 given: set[str]) -> Any:
    """A config of type ``cls`` from config-file values overridden by the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k.replace("-", "_"): v for k, v in file_values.items()}
    for name in names:
        value = getattr(args, name, None)
        if name in given and value is not None:
            values[name] = value
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no option(s) {unknown}; valid options are {sorted(names)}")
    return cls.from_dict(values)


def given_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests the user actually typed (so config-file values are only overridden by them)."""
    out = set()
    for action in parser._actions:
        if any(a == opt or a.startswith(opt + "=") for a in argv for opt in action.option_strings):
            out.add(action.dest)
    return out
