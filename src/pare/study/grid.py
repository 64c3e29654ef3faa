"""The grid of a study: point specs parsed into stage configs, and the points they make.

Point specs are short strings separated by ``;``:

- pruning: ``none``, or ``METHOD[:ARG][,KEY=VALUE...]``. ``ARG`` is the method's main option:
  a sparsity (``sparsegpt:0.5``, ``wanda:0.5``, ``magnitude:0.5``) or an N:M pattern
  (``sparsegpt:2:4``); a width ratio (``osscar:0.25`` = ``mlp_ratio``, ``slicegpt:0.25`` =
  ``slicing``); a layer count (``ppl-window:4``, ``shortgpt:4``, ``angular:4`` = ``num_layers``).
  ``KEY=VALUE`` sets any other option of the method (``sparsegpt:0.5,percdamp=0.1``).
- quantization: ``none``, or ``[rtn-|gptq-]SCHEME[-gN][-asym][,KEY=VALUE...]``: ``int4-g128``,
  ``gptq-int4-g128``, ``int8-g0`` (per channel), ``mxfp4``, ``mxfp6`` (= ``mxfp6-e2m3``), ``mxfp8``
  (= ``mxfp8-e4m3``), ``nvfp4``. Without ``-gN`` the group is pare's default (128 for integers; MX and
  NVFP4 fix their own). ``KEY=VALUE`` sets another option of the quantize stage
  (``gptq-int4-g64,act_order=true``, ``gptq-int3-g64,damp=0.1``).

Orders (how a pruning spec and a quantization spec combine into one point):

- ``prune-first``: prune, then quantize (the quantizer keeps the pruned zeros at zero);
- ``quant-first``: quantize, then prune, then round the weights the pruning moved (OSSCAR's refit,
  SparseGPT's updates) back onto the grid with RTN, so the result is storable in the scheme;
- ``joint``: SparseGPT's one pass that masks and quantizes each column before spreading its error
  (only for ``sparsegpt`` with a quantization; the pass is GPTQ-style whatever the ``rtn-``/``gptq-`` prefix).

A pair where either side is ``none`` is one point whatever the orders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from pare.config import PruneConfig, stage_class
from pare.errors import ConfigError
from pare.ops.quant.scheme import MX_SCHEMES, SCHEMES

ORDERS = ("prune-first", "quant-first", "joint")
SPARSITY_METHODS = ("sparsegpt", "wanda", "magnitude")
MAIN_OPTION = {"osscar": "mlp_ratio", "slicegpt": "slicing", "ppl-window": "num_layers", "shortgpt": "num_layers",
               "angular": "num_layers", "layers": "layers", "experts": "expert_ratio"}
"""The option a pruning spec's bare argument sets, for methods other than the sparsity ones."""
SCHEME_ALIASES = {"mxfp8": "mxfp8-e4m3", "mxfp6": "mxfp6-e2m3"}
PRUNE_EXAMPLES = "none; sparsegpt:0.5; sparsegpt:2:4; wanda:0.5; osscar:0.25; ppl-window:4; sparsegpt:0.5,percdamp=0.1"
QUANT_EXAMPLES = "none; int8; int4-g128; int4-g64-asym; gptq-int4-g128; gptq-int4-g128,act_order=true; mxfp8; mxfp4"
SPEC_SET = ("scheme", "group_size", "symmetric", "algorithm", "keep_zeros")
"""Quantize-stage options a quantization spec's text (and the order) set, so not given as KEY=VALUE."""
GPTQ_ONLY = ("act_order", "damp", "blocksize", "clip_search")
"""Options of the GPTQ algorithm, left out of the RTN stage that re-rounds a quantize-first point."""


@dataclass(frozen=True)
class PruneSpec:
    """A parsed pruning spec: ``label`` (the text, normalised) and the method config (None: no pruning)."""

    label: str
    config: PruneConfig | None

    @property
    def method(self) -> str | None:
        return None if self.config is None else self.config.method


@dataclass(frozen=True)
class QuantSpec:
    """A parsed quantization spec: scheme, group size (None: the scheme's default), symmetry, algorithm,
    and any other quantize-stage options (``KEY=VALUE``) as sorted pairs."""

    label: str
    scheme: str | None = None
    group_size: int | None = None
    symmetric: bool = True
    algorithm: str = "rtn"
    options: tuple[tuple[str, Any], ...] = ()

    def config(self, algorithm: str | None = None, keep_zeros: bool = True) -> PruneConfig:
        """The quantize stage (``algorithm`` overrides the spec's; an RTN override drops GPTQ's options)."""
        algo = algorithm or self.algorithm
        opts = {k: v for k, v in self.options if algo == "gptq" or k not in GPTQ_ONLY}
        return stage_class("quantize").config_class.from_dict({
            **opts, "scheme": self.scheme, "group_size": self.group_size, "symmetric": self.symmetric,
            "algorithm": algo, "keep_zeros": keep_zeros})

    @property
    def scheme_label(self) -> str:
        """The spec without its algorithm prefix and options (what a joint pass uses)."""
        return self.label.partition(",")[0].removeprefix("gptq-").removeprefix("rtn-")


@dataclass(frozen=True)
class Point:
    """One point of the grid.

    Attributes:
        id: a file-name-safe identifier, unique in the grid (``sparsegpt-0.5__int4-g128__prune-first``).
        prune / quant: the specs' labels (``none`` for none).
        order: ``prune-first``, ``quant-first``, ``joint``, or ``-`` when one side is ``none``.
        stages: the stage configs as dicts (``pare.config_from_dict`` builds them), in order.
    """

    id: str
    prune: str
    quant: str
    order: str
    stages: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "prune": self.prune, "quant": self.quant, "order": self.order,
                "stages": [dict(s) for s in self.stages]}


def split_specs(text: str, what: str) -> list[str]:
    """``"a; b;c"`` -> ``["a", "b", "c"]`` (empty items dropped; at least one item)."""
    items = [s.strip() for s in str(text).split(";") if s.strip()]
    if not items:
        example = PRUNE_EXAMPLES if what == "prune" else QUANT_EXAMPLES
        raise ConfigError(f"--{what} is empty: give specs separated by ';', e.g. \"{example}\"")
    return items


def parse_prune(spec: str) -> PruneSpec:
    """A pruning spec as its config (see the module doc for the grammar)."""
    from pare.methods import METHODS

    text = spec.strip()
    if text.lower() == "none":
        return PruneSpec("none", None)
    name, _, rest = text.partition(":")
    name = name.strip()
    if ":" not in text and "," in name:
        name, _, rest = text.partition(",")
        rest = "," + rest
    if name not in METHODS or name == "quantize":
        known = sorted(m for m in METHODS if m != "quantize")
        raise ConfigError(f"pruning spec {spec!r}: unknown method {name!r}; methods: {', '.join(known)} (or none). "
                          f"Examples: {PRUNE_EXAMPLES}")
    items = [s.strip() for s in rest.split(",")] if rest else []
    opts: dict[str, Any] = {}
    for k, item in enumerate(items):
        if not item:
            continue
        if "=" in item:
            key, value = _key_value(item)
            opts[key] = value
        elif k == 0:
            opts.update(_main_option(name, item, spec))
        else:
            raise ConfigError(f"pruning spec {spec!r}: {item!r} must be KEY=VALUE (only the first argument may be "
                              f"bare), e.g. {name}:0.5,percdamp=0.1")
    try:
        config = METHODS[name].config_class.from_dict(opts)
    except ConfigError as exc:
        raise ConfigError(f"pruning spec {spec!r}: {exc}") from None
    return PruneSpec(_prune_label(name, items), config)


def _main_option(name: str, arg: str, spec: str) -> dict[str, Any]:
    if name in SPARSITY_METHODS:
        if ":" in arg:
            return {"pattern": arg}
        return {"sparsity": _number(arg, spec, f"{name}:0.5 (a sparsity) or {name}:2:4 (N:M)")}
    if name in MAIN_OPTION:
        key = MAIN_OPTION[name]
        return {key: arg if key == "layers" else _number(arg, spec, f"{name}:{key}")}
    raise ConfigError(f"pruning spec {spec!r}: {name} takes no bare argument; write KEY=VALUE options "
                      f"(see `pare methods`)")


def _number(text: str, spec: str, example: str) -> int | float:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"pruning spec {spec!r}: {text!r} is not a number; write e.g. {example}")
    return value


def _prune_label(name: str, items: list[str]) -> str:
    return name + ("" if not items else ":" + ",".join(i for i in items if i))


def parse_quant(spec: str) -> QuantSpec:
    """A quantization spec (see the module doc for the grammar)."""
    base, _, rest = spec.strip().partition(",")
    text = base.strip().lower()
    if text == "none" and not rest.strip():
        return QuantSpec("none")
    options = _quant_options(spec, rest)
    algorithm = "rtn"
    for prefix in ("gptq-", "rtn-"):
        if text.startswith(prefix):
            algorithm, text = prefix[:-1], text[len(prefix):]
    symmetric = True
    if text.endswith("-asym"):
        symmetric, text = False, text[: -len("-asym")]
    group: int | None = None
    head, sep, tail = text.rpartition("-g")
    if sep and tail.isdigit():
        group, text = int(tail), head
    scheme = SCHEME_ALIASES.get(text, text)
    if scheme not in SCHEMES:
        names = ", ".join([*SCHEMES, *SCHEME_ALIASES])
        raise ConfigError(f"quantization spec {spec!r}: unknown scheme {text!r}; schemes: {names}. Write "
                          f"[rtn-|gptq-]SCHEME[-gN][-asym], e.g. {QUANT_EXAMPLES}")
    if group is not None and (scheme in MX_SCHEMES or scheme == "nvfp4"):
        raise ConfigError(f"quantization spec {spec!r}: {scheme} fixes its own block size; drop -g{group}")
    gptq_only = [k for k, _ in options if k in GPTQ_ONLY]
    if gptq_only and algorithm != "gptq":
        raise ConfigError(f"quantization spec {spec!r}: {', '.join(gptq_only)} applies to GPTQ only; write "
                          f"gptq-{base.strip().lower().removeprefix('rtn-')},...")
    label = base.strip().lower() + "".join(f",{k}={str(v).lower()}" for k, v in options)
    out = QuantSpec(label, scheme, group, symmetric, algorithm, options)
    try:
        out.config()
    except ConfigError as exc:
        raise ConfigError(f"quantization spec {spec!r}: {exc}") from None
    return out


def _quant_options(spec: str, rest: str) -> tuple[tuple[str, Any], ...]:
    """A quantization spec's ``KEY=VALUE`` items (after its first comma), sorted by key."""
    opts: dict[str, Any] = {}
    for item in (s.strip() for s in rest.split(",")):
        if not item:
            continue
        key, value = _key_value(item)
        if "=" not in item or not key:
            raise ConfigError(f"quantization spec {spec!r}: {item!r} must be KEY=VALUE, e.g. "
                              "gptq-int4-g64,act_order=true")
        if key in SPEC_SET:
            raise ConfigError(f"quantization spec {spec!r}: {key} is set by the spec's text or the order, not "
                              "as KEY=VALUE; write e.g. gptq-int4-g64-asym")
        opts[key] = value
    return tuple(sorted(opts.items()))


def _key_value(item: str) -> tuple[str, Any]:
    """A spec's ``KEY=VALUE`` item: the option name (dashes as underscores) and its YAML value."""
    key, _, value = item.partition("=")
    return key.strip().replace("-", "_"), yaml.safe_load(value)


def parse_orders(text: str) -> tuple[str, ...]:
    """``"prune-first,quant-first"`` -> the orders, checked."""
    orders = tuple(o.strip() for o in str(text).split(",") if o.strip())
    bad = [o for o in orders if o not in ORDERS]
    if bad or not orders:
        raise ConfigError(f"--order {text!r}: orders are {', '.join(ORDERS)} (comma-separated), e.g. "
                          "prune-first,quant-first,joint")
    return tuple(dict.fromkeys(orders))


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in label.replace(":", "-"))


def points_for(prune: PruneSpec, quant: QuantSpec, orders: tuple[str, ...]) -> list[Point]:
    """The points one (pruning, quantization) pair makes under ``orders``."""
    pid, qid = _safe(prune.label), _safe(quant.label)
    if prune.config is None and quant.scheme is None:
        return [Point("dense", "none", "none", "-", ())]
    if quant.scheme is None:
        assert prune.config is not None
        return [Point(pid, prune.label, "none", "-", (prune.config.to_dict(),))]
    if prune.config is None:
        return [Point(qid, "none", quant.label, "-", (quant.config().to_dict(),))]
    out = []
    stages: tuple[dict[str, Any], ...]
    for order in orders:
        if order == "prune-first":
            stages = (prune.config.to_dict(), quant.config().to_dict())
        elif order == "quant-first":
            stages = (quant.config().to_dict(), prune.config.to_dict(), quant.config("rtn").to_dict())
        else:
            if prune.method != "sparsegpt":
                continue
            joint = {**prune.config.to_dict(), "quantize": quant.scheme, "group_size": quant.group_size,
                     "symmetric": quant.symmetric}
            stages = (stage_class("sparsegpt").config_class.from_dict(joint).to_dict(),)
            qid_joint = _safe(quant.scheme_label)
            out.append(Point(f"{pid}__{qid_joint}__joint", prune.label, quant.scheme_label, "joint", stages))
            continue
        out.append(Point(f"{pid}__{qid}__{order}", prune.label, quant.label, order, stages))
    return out


def build_grid(prune: str | list[str], quant: str | list[str], orders: str | tuple[str, ...]) -> list[Point]:
    """Every point of the grid, each once (a joint point shared by ``int4`` and ``gptq-int4`` is kept once).

    Args:
        prune / quant: ``;``-separated specs (or lists of them).
        orders: comma-separated orders (or a tuple of them).
    """
    prunes = [parse_prune(s) for s in (split_specs(prune, "prune") if isinstance(prune, str) else prune)]
    quants = [parse_quant(s) for s in (split_specs(quant, "quant") if isinstance(quant, str) else quant)]
    order_list = parse_orders(orders) if isinstance(orders, str) else parse_orders(",".join(orders))
    seen: dict[str, Point] = {}
    for p in prunes:
        for q in quants:
            for point in points_for(p, q, order_list):
                seen.setdefault(point.id, point)
    return list(seen.values())
