"""Recipes: a YAML/JSON file naming a model, one calibration set and a list of stages.

```yaml
model: ../shared/models/stories260K
calibration: {dataset: tinystories, nsamples: 64, seqlen: 256, seed: 0}
stages:
  - osscar: {mlp_ratio: 0.25}
  - ppl-window: {num_layers: 1}
  - sparsegpt: {sparsity: 0.5, pattern: "2:4"}
eval: {ppl: [tinystories]}
out: out/stories-3stage
```

A stage is ``{method: {options}}``, ``{method: name, option: value...}`` or just the method name
(its defaults). Any key can be overridden with ``--set path=value`` (``stages.1.num_layers=6``:
the options of the second stage; the value is read as YAML).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from pare.config import STAGES, CalibrationConfig, PruneConfig, RuntimeConfig, checked_value, stage_class
from pare.errors import ConfigError

TOP_KEYS: dict[str, type] = {"model": str, "out": str, "overwrite": bool, "no_save": bool, "dtype": str,
                             "arch_override": str, "json": bool, "verbose": bool, "report": bool,
                             "component": str, "images": str}
"""Top-level recipe keys besides ``calibration``, ``runtime``, ``stages`` and ``eval``, with their types."""

EVAL_KEYS: dict[str, type] = {"seqlen": int, "max_windows": int, "batch_size": int, "speed": bool, "tasks": str,
                              "limit": int}
"""``eval`` options besides ``ppl`` (a data set name or a list of them); ``tasks``: zero-shot tasks, comma-separated."""


@dataclass
class Recipe:
    """A parsed recipe.

    Attributes:
        stages: the method configs, in order.
        model: hub id or local directory (None: the caller gives it).
        calibration / runtime: shared by every stage.
        ppl: data sets to measure perplexity on, before the first stage and after each one.
        eval: ``seqlen`` / ``max_windows`` / ``batch_size`` / ``speed`` of those evaluations.
        top: the other top-level keys (``out``, ``overwrite``, ``dtype``, ``arch_override``...).
    """

    stages: list[PruneConfig]
    model: str | None = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    ppl: list[str] = field(default_factory=list)
    eval: dict[str, Any] = field(default_factory=dict)
    top: dict[str, Any] = field(default_factory=dict)


def apply_set(data: dict[str, Any], assignment: str) -> None:
    """Set one dotted key of a recipe dict in place: ``stages.1.num_layers=6``, ``calibration.nsamples=32``.

    A stage written ``{method: {options}}`` is looked into transparently: ``stages.1.num_layers``
    sets ``num_layers`` in the options of the second stage.
    """
    path, sep, text = assignment.partition("=")
    if not sep or not path.strip():
        raise ConfigError(f"--set {assignment!r}: write key=value, e.g. --set stages.1.num_layers=6")
    value = yaml.safe_load(text) if text.strip() else None
    keys = path.strip().split(".")
    node: Any = data
    for depth, key in enumerate(keys[:-1]):
        node = _child(node, key, keys[: depth + 1], create=True)
        node = _stage_options(node, keys[depth + 1])
    last = keys[-1]
    if isinstance(node, list):
        node[_index(node, last, keys)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"--set {path}: {'.'.join(keys[:-1])} is not a mapping or a list")


def _index(node: list, key: str, path: list[str]) -> int:
    if not key.lstrip("-").isdigit() or not -len(node) <= int(key) < len(node):
        raise ConfigError(f"--set {'.'.join(path)}: {key!r} is not an index of a list of {len(node)} item(s) "
                          f"(0 to {len(node) - 1})")
    return int(key)


def _child(node: Any, key: str, path: list[str], create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, key, path)]
    if not isinstance(node, dict):
        raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[:-1]) or 'the recipe'} is not a mapping")
    if node.get(key) is None and create:
        node[key] = {}
    return node[key]


def _stage_options(node: Any, next_key: str) -> Any:
    """``{method: {options}}`` -> the options dict, unless the next key names the method itself."""
    if isinstance(node, dict) and len(node) == 1:
        (name, opts), = node.items()
        if name in STAGES and name != next_key and next_key != "method":
            if opts is None:
                opts = node[name] = {}
            return opts
    return node


def stage_config(entry: Any, index: int) -> PruneConfig:
    """One recipe stage as its method config."""
    where = f"stages[{index}]"
    if isinstance(entry, str):
        name, opts = entry, {}
    elif isinstance(entry, dict) and "method" in entry:
        opts = dict(entry)
        name = opts.pop("method")
    elif isinstance(entry, dict) and len(entry) == 1:
        (name, opts), = entry.items()
        opts = {} if opts is None else opts
    else:
        raise ConfigError(f"{where} must be a method name or {{method: {{options}}}} (e.g. - osscar: "
                          f"{{mlp_ratio: 0.25}}), got {entry!r}")
    if not isinstance(opts, dict):
        raise ConfigError(f"{where}: the options of {name!r} must be a mapping, got {opts!r}")
    try:
        config: PruneConfig = stage_class(name).config_class.from_dict(opts)
    except ConfigError as exc:
        raise ConfigError(f"{where} ({name}): {exc}") from None
    return config


def parse_recipe(data: dict[str, Any]) -> Recipe:
    """A :class:`Recipe` from a recipe dict (a file's content after ``--set``)."""
    if not isinstance(data, dict):
        raise ConfigError(f"a recipe must be a mapping with a 'stages' list, got {type(data).__name__}")
    data = dict(data)
    stages = data.pop("stages", None)
    if not isinstance(stages, list) or not stages:
        raise ConfigError("a recipe needs a non-empty 'stages' list, e.g. stages: [{osscar: {mlp_ratio: 0.25}}, "
                          "{sparsegpt: {pattern: '2:4'}}]")
    configs = [stage_config(entry, i) for i, entry in enumerate(stages)]
    calib = _section(data.pop("calibration", None), "calibration")
    runtime = _section(data.pop("runtime", None), "runtime")
    ppl, eval_opts = _eval_section(data.pop("eval", None))
    top: dict[str, Any] = {}
    for key, value in data.items():
        k = key.replace("-", "_")
        if k not in TOP_KEYS:
            raise ConfigError(f"recipe key {key!r} is unknown; recipe keys are "
                              f"{sorted([*TOP_KEYS, 'calibration', 'runtime', 'stages', 'eval'])}")
        top[k] = checked_value("recipe", k, TOP_KEYS[k], value)
    return Recipe(stages=configs, model=top.pop("model", None),
                  calibration=CalibrationConfig.from_dict(calib), runtime=RuntimeConfig.from_dict(runtime),
                  ppl=ppl, eval=eval_opts, top=top)


def _section(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"recipe {name} must be a mapping, got {value!r}")
    return value


def _eval_section(value: Any) -> tuple[list[str], dict[str, Any]]:
    """``eval: tinystories``, ``eval: [a, b]`` or ``eval: {ppl: [...], max_windows: 16...}``."""
    if value is None:
        return [], {}
    if isinstance(value, (str, list)):
        value = {"ppl": value}
    if not isinstance(value, dict):
        raise ConfigError(f"recipe eval must be a data set name, a list of them or a mapping, got {value!r}")
    value = dict(value)
    ppl = value.pop("ppl", [])
    ppl = [ppl] if isinstance(ppl, str) else ppl
    if not isinstance(ppl, list) or not all(isinstance(p, str) for p in ppl):
        raise ConfigError(f"recipe eval.ppl must be a data set name or a list of them, got {ppl!r}")
    opts = {}
    for key, item in value.items():
        if key not in EVAL_KEYS:
            raise ConfigError(f"recipe eval key {key!r} is unknown; eval keys are {sorted(['ppl', *EVAL_KEYS])}")
        opts[key] = checked_value("recipe eval", key, EVAL_KEYS[key], item)
        if EVAL_KEYS[key] is int and opts[key] < 1:
            raise ConfigError(f"recipe eval.{key} must be a positive integer, got {item!r}")
    return ppl, opts
