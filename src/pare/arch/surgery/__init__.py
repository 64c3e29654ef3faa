"""The only place that changes shapes: slice projections, drop heads, channels and layers, and
rewrite the config to match.

Every structural function returns an *edit*, a small typed record (:mod:`pare.arch.surgery.edits`)
that the pruning report keeps and the manifest stores as ``{"op": name, ...}``. :func:`replay`
applies recorded edits to a freshly built model so that ``pare.load`` can rebuild non-uniform shapes
before loading the weights (any kept-index set will do there, since the weights are loaded
afterwards).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from pare.arch.surgery import depth, experts, mla, rotation, width
from pare.arch.surgery.edits import EDIT_TYPES, Edit, as_edit

if TYPE_CHECKING:
    from pare.arch.overrides import ArchOverride

REPLAY: dict[type[Edit], Callable[[nn.Module, Any, ArchOverride | None], None]] = {
    **width.REPLAY, **depth.REPLAY, **experts.REPLAY, **rotation.REPLAY,
    **mla.REPLAY,  # heads of an MLA layer; other layers' heads go on to width's replay
}
"""How each kind of edit is replayed on a model built from the saved config."""

EDITS: dict[str, Callable[[nn.Module, Any, ArchOverride | None], None]] = {
    op: REPLAY[t] for op, t in EDIT_TYPES.items()
}
"""The replay of each edit by its manifest name."""


def replay(model: nn.Module, edits: Sequence[Edit | Mapping[str, Any]], override: ArchOverride | None = None) -> None:
    """Apply recorded structural edits, in order, to a model built from the saved config, describing
    it with ``override`` (the one the prune used, recorded in the manifest). Manifest entries (dicts)
    are parsed first, so manifests written by any earlier pare replay the same way."""
    parsed = [as_edit(e) for e in edits]  # every entry understood before the model is touched
    for edit in parsed:
        REPLAY[type(edit)](model, edit, override)


__all__ = ["EDITS", "REPLAY", "Edit", "as_edit", "replay"]
