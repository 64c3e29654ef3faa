"""Check a ``pare.json`` manifest read from disk before anything is built from it.

The recorded structural edits are replayed on a model built from the saved config, and their
fields name modules (``layers_path``, ``path``) and sizes. A file edited by hand or tampered with
must not reach that replay: every edit is checked here for its fields, their types and ranges, and
module paths that are plain dotted names (no ``__class__``, ``..``, ``/``). Against the saved config,
layer indices must lie within the layers the model has at that point of the replay, and head counts
and widths within the config's sizes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from pare.errors import CorruptFileError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")
MLP_WIDTH_FIELDS = ("intermediate_size", "ffn_dim", "n_inner", "moe_intermediate_size",
                    "shared_expert_intermediate_size", "shared_experts_intermediate_size")


def _fail(where: str, problem: str) -> CorruptFileError:
    return CorruptFileError(f"{where}: {problem}. The manifest was edited or damaged: restore the pare.json pare "
                         "wrote, or save the pruned model again")


def _int(edit: dict[str, Any], key: str, where: str, low: int = 0, high: int | None = None) -> int:
    value = edit.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, f"'{key}' must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f"{low} or more"
        raise _fail(where, f"'{key}' is {value}, outside {bound}")
    return value


def _path(edit: dict[str, Any], key: str, where: str) -> str:
    value = edit.get(key)
    parts = value.split(".") if isinstance(value, str) else []
    if not parts or not all(_NAME.fullmatch(p) and not p.startswith("__") for p in parts):
        raise _fail(where, f"'{key}' must be a module path such as model.layers or mlp.down_proj, got {value!r}")
    return str(value)


def _index_list(edit: dict[str, Any], key: str, where: str, n: int) -> list[int]:
    value = edit.get(key)
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise _fail(where, f"'{key}' must be a list of layer indices, got {value!r}")
    if any(i < 0 or i >= n for i in value) or len(set(value)) != len(value) or value != sorted(value):
        raise _fail(where, f"'{key}' must hold distinct increasing indices in 0..{n - 1}, got {value}")
    return value


def _size(config: Any, name: str) -> int | None:
    value = getattr(config, name, None) if config is not None else None
    if isinstance(value, (list, tuple)):  # a per-layer list: its largest
        value = max((v for v in value if isinstance(v, int) and not isinstance(v, bool)), default=None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class _Sizes:
    """The config's sizes that bound the edits (None where the config does not state one)."""

    def __init__(self, config: Any) -> None:
        self.layers, self.heads = _size(config, "num_hidden_layers"), _size(config, "num_attention_heads")
        self.hidden = _size(config, "hidden_size")
        # an MLP is never wider than the widest the config states (GPT-2's n_inner None means 4 x hidden)
        widths = [_size(config, n) for n in MLP_WIDTH_FIELDS] + [4 * self.hidden if self.hidden else None]
        self.mlp = max((w for w in widths if w is not None), default=None)


def _layer(edit: dict[str, Any], where: str, n: int | None) -> None:
    _int(edit, "layer", where, 0, None if n is None else n - 1)


def _mlp_channels(edit: dict[str, Any], where: str, sizes: _Sizes, n: int | None) -> int | None:
    _layer(edit, where, n)
    _int(edit, "width", where, 1, sizes.mlp)
    if edit.get("shared_width") is not None:
        _int(edit, "shared_width", where, 1, sizes.mlp)
    return n


def _heads(edit: dict[str, Any], where: str, sizes: _Sizes, n: int | None) -> int | None:
    _layer(edit, where, n)
    heads = _int(edit, "num_heads", where, 1, sizes.heads)
    kv = _int(edit, "num_kv_heads", where, 1, heads)
    if heads % kv:
        raise _fail(where, f"num_heads {heads} is not a multiple of num_kv_heads {kv}")
    return n


def _hidden(edit: dict[str, Any], where: str, sizes: _Sizes, n: int | None) -> int | None:
    _int(edit, "width", where, 1, sizes.hidden)
    return n


def _remove_layers(edit: dict[str, Any], where: str, sizes: _Sizes, n: int | None) -> int | None:
    _path(edit, "layers_path", where)
    before = _int(edit, "num_layers_before", where, 1)
    kept = _index_list(edit, "kept", where, before)
    removed = _index_list(edit, "removed", where, before)
    if not kept or sorted(kept + removed) != list(range(before)):
        raise _fail(where, f"'kept' and 'removed' must split the {before} layers between them, keeping at least one")
    if edit.get("num_layers_after", len(kept)) != len(kept):
        raise _fail(where, f"'num_layers_after' is {edit.get('num_layers_after')!r}, but 'kept' holds {len(kept)}")
    if n is not None and n not in (before, len(kept)):
        raise _fail(where, f"the saved config has {n} layers, neither the {before} this edit cuts nor the {len(kept)} "
                    "it leaves")
    return len(kept)


def _remove_sublayer(edit: dict[str, Any], where: str, sizes: _Sizes, n: int | None) -> int | None:
    _layer(edit, where, n)
    _path(edit, "layers_path", where)
    part = edit.get("part")
    if part not in ("attention", "mlp"):
        raise _fail(where, f"'part' must be 'attention' or 'mlp', got {part!r}")
    if part == "attention":
        _path(edit, "path", where)
        _int(edit, "num_kv_heads", where, 1, sizes.heads)
        _int(edit, "head_dim", where, 1, sizes.hidden)
    elif "path" in edit:
        _path(edit, "path", where)
    else:
        inputs = edit.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise _fail(where, f"'inputs' must be a list of module paths, got {inputs!r}")
        for item in inputs:
            _path({"inputs": item}, "inputs", where)
        _path(edit, "down", where)
        _int(edit, "out_features", where, 1, sizes.hidden)
    return n


def _experts(edit: dict[str, Any], where: str, sizes: _Sizes, n: int | None) -> int | None:
    _layer(edit, where, n)
    kept = _int(edit, "num_experts", where, 1)
    if edit.get("top_k") is not None:
        _int(edit, "top_k", where, 1, kept)
    return n


def _residual_shortcuts(edit: dict[str, Any], where: str, sizes: _Sizes, n: int | None) -> int | None:
    _index_list(edit, "layers", where, n if n is not None else 1 << 30)
    width = _int(edit, "width", where, 1, sizes.hidden)
    if edit.get("head_width") is not None:
        _int(edit, "head_width", where, width, 1 << 20)
    return n


_CHECKS: dict[str, Callable[[dict[str, Any], str, _Sizes, int | None], int | None]] = {
    "experts": _experts,
    "mlp_channels": _mlp_channels,
    "heads": _heads,
    "hidden": _hidden,
    "remove_layers": _remove_layers,
    "remove_sublayer": _remove_sublayer,
    "residual_shortcuts": _residual_shortcuts,
}


def check_edits(edits: Any, where: str, config: Any = None) -> None:
    """Raise CorruptFileError unless ``edits`` is a list of well-formed structural edits.

    Args:
        edits: the ``edits`` of a manifest, in replay order.
        where: names the file in the messages.
        config: the saved model config; with it, layer indices are checked against the layers the
            model has at each point of the replay and sizes against the config's.
    """
    if edits is None:
        return
    if not isinstance(edits, list):
        raise _fail(where, f"'edits' must be a list, got {type(edits).__name__}")
    sizes = _Sizes(config)
    n = sizes.layers
    for i, edit in enumerate(edits):
        at = f"{where}, edit {i}"
        if not isinstance(edit, dict):
            raise _fail(at, f"an edit must be an object, got {type(edit).__name__}")
        op = edit.get("op")
        if op not in _CHECKS:
            raise CorruptFileError(f"{at}: structural edit {op!r} is not one this version of pare knows "
                                f"({', '.join(sorted(_CHECKS))}); upgrade pare, or restore the pare.json pare wrote")
        if "uniform" in edit and not isinstance(edit["uniform"], bool):
            raise _fail(at, f"'uniform' must be true or false, got {edit['uniform']!r}")
        n = _CHECKS[op](edit, at, sizes, n)


def check_manifest(manifest: dict[str, Any], where: str, config: Any = None) -> None:
    """Raise CorruptFileError unless the manifest's ``uniform`` flag and its edits (checked against ``config``
    when they are replayed, i.e. not uniform; and each prune's own in ``history``) are well formed."""
    uniform = manifest.get("uniform", True)
    if not isinstance(uniform, bool):
        raise _fail(where, f"'uniform' must be true or false, got {uniform!r}")
    # a uniform model is built from its config alone: its edits are a record, not replayed (a chain's
    # earlier edits may then be wider than the final config)
    check_edits(manifest.get("edits"), where, None if uniform else config)
    history = manifest.get("history")
    if history is None:
        return
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise _fail(where, "'history' must be a list of reports")
    for j, entry in enumerate(history):
        check_edits(entry.get("edits"), f"{where}, history {j}")  # each against the model of its time
