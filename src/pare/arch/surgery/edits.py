"""Structural edits: what a shape-changing surgery did, as small typed records.

Every structural function of :mod:`pare.arch.surgery` returns one of these. A stage's report lists
them in the order applied; ``pare.save`` writes them into ``pare.json`` through :meth:`Edit.to_dict`
(a JSON object ``{"op": name, ...}``) and ``pare.load`` reads them back through :func:`as_edit`
before replaying them on a model built from the saved config. The JSON form is the one pare has
always written, so manifests saved before these types existed load unchanged.

The edits record *how many* channels, heads, experts or layers remain, not which ones: the weights
are loaded after the replay, so any kept-index set of the right size rebuilds the shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pare.errors import PareError


@dataclass(frozen=True)
class Edit:
    """Base of every structural edit. ``op`` names the kind in the manifest."""

    op: ClassVar[str] = ""
    optional: ClassVar[frozenset[str]] = frozenset()
    """Fields written only when they are not None (older manifests lack them)."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form written into ``pare.json`` (``{"op": ..., field: value}``)."""
        out: dict[str, Any] = {"op": self.op}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in self.optional and value is None:
                continue
            out[f.name] = _plain(value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Edit:
        """The edit a manifest entry describes (see :func:`as_edit`)."""
        return as_edit(data)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class LayerEdit(Edit):
    """An edit of one decoder layer, named by its index at the time of the edit."""

    layer: int


@dataclass(frozen=True)
class MlpChannels(LayerEdit):
    """Layer ``layer`` keeps ``width`` MLP intermediate channels (of every expert in a MoE layer) and,
    when not None, ``shared_width`` channels of its shared expert."""

    op: ClassVar[str] = "mlp_channels"
    width: int
    shared_width: int | None = None


@dataclass(frozen=True)
class Heads(LayerEdit):
    """Layer ``layer`` keeps ``num_heads`` query heads and ``num_kv_heads`` KV heads."""

    op: ClassVar[str] = "heads"
    num_heads: int
    num_kv_heads: int


@dataclass(frozen=True)
class Hidden(Edit):
    """The hidden size (residual stream) becomes ``width`` everywhere."""

    op: ClassVar[str] = "hidden"
    width: int


@dataclass(frozen=True)
class RemoveLayers(Edit):
    """Decoder layers ``removed`` are deleted; ``kept`` (indices before the cut) remain, in order.

    Attributes:
        config: the config fields rewritten (``num_hidden_layers``, per-layer lists...).
        uniform: False only when the config cannot express the result (GPT-2 with
            ``scale_attn_by_inverse_layer_idx``); written only then.
    """

    op: ClassVar[str] = "remove_layers"
    optional: ClassVar[frozenset[str]] = frozenset({"uniform"})
    removed: tuple[int, ...]
    kept: tuple[int, ...]
    num_layers_before: int
    num_layers_after: int
    layers_path: str
    config: dict[str, Any] = field(default_factory=dict)
    uniform: bool | None = None

    @property
    def describes_config(self) -> bool:
        """Whether the config alone expresses this cut."""
        return self.uniform is not False


@dataclass(frozen=True)
class RemoveSublayer(LayerEdit):
    """Layer ``layer``'s ``part`` block (``attention`` or ``mlp``) is replaced by its residual identity.

    Attention: ``path`` plus ``num_kv_heads`` / ``head_dim`` for the KV-cache placeholder. MLP with a
    module of its own: ``path``. MLP projections directly on the layer (OPT's ``fc1``/``fc2``):
    ``inputs``, ``down`` and ``out_features``.
    """

    op: ClassVar[str] = "remove_sublayer"
    optional: ClassVar[frozenset[str]] = frozenset(
        {"path", "num_kv_heads", "head_dim", "inputs", "down", "out_features"})
    part: str
    params_removed: int
    layers_path: str
    path: str | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    inputs: tuple[str, ...] | None = None
    down: str | None = None
    out_features: int | None = None


@dataclass(frozen=True)
class Experts(LayerEdit):
    """Layer ``layer`` keeps ``num_experts`` routed experts; ``top_k`` (when not None) experts per token."""

    op: ClassVar[str] = "experts"
    num_experts: int
    top_k: int | None = None


@dataclass(frozen=True)
class ResidualShortcuts(Edit):
    """Decoder layers ``layers`` are wrapped so that each residual addition (each stage: attention, MLP;
    one for a parallel layer) passes a shortcut matrix ``Q_in^T Q_out`` (SliceGPT's per-layer rotation);
    the matrices are saved with the weights. Every stage writes ``width`` channels except the last
    stage of the last layer, which writes ``head_width`` (the hidden size before slicing when the head
    is not sliced: that stage's writers, the final norm and the head keep it)."""

    op: ClassVar[str] = "residual_shortcuts"
    optional: ClassVar[frozenset[str]] = frozenset({"head_width"})
    layers: tuple[int, ...]
    width: int
    head_width: int | None = None  # None: width (the head is sliced as everything else)


EDIT_TYPES: dict[str, type[Edit]] = {
    t.op: t for t in (MlpChannels, Heads, Hidden, RemoveLayers, RemoveSublayer, Experts, ResidualShortcuts)
}
"""Every edit kind by its manifest name."""


def as_edit(data: Edit | Mapping[str, Any]) -> Edit:
    """``data`` as a typed edit: an :class:`Edit` as it is, a manifest entry (``{"op": ..., ...}``)
    parsed (lists become tuples; keys an edit does not have are ignored).

    Raises:
        PareError: an ``op`` this version of pare does not know, or a required field missing.
    """
    if isinstance(data, Edit):
        return data
    if not isinstance(data, Mapping):
        raise PareError(f"a structural edit must be an object with an 'op', got {type(data).__name__}")
    op = data.get("op")
    kind = EDIT_TYPES.get(op) if isinstance(op, str) else None
    if kind is None:
        raise PareError(f"this checkpoint needs structural edit {op!r}, which this version of pare does not know; "
                        f"known edits: {sorted(EDIT_TYPES)}. Upgrade pare.")
    names = {f.name: f for f in dataclasses.fields(kind)}
    missing = [n for n, f in names.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise PareError(f"structural edit {op!r} lacks {missing}: the manifest was edited or damaged")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
    return kind(**values)


def edit_dicts(edits: list[Edit] | tuple[Edit, ...]) -> list[dict[str, Any]]:
    """The manifest form of ``edits`` (entries that are already dicts are parsed first)."""
    return [as_edit(e).to_dict() for e in edits]


__all__ = [
    "EDIT_TYPES",
    "Edit",
    "Experts",
    "Heads",
    "Hidden",
    "LayerEdit",
    "MlpChannels",
    "RemoveLayers",
    "RemoveSublayer",
    "ResidualShortcuts",
    "as_edit",
    "edit_dicts",
]
