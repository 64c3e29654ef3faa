"""The only place that changes shapes: slice projections, drop heads, channels and layers, and
rewrite the config to match.

Every structural function returns an *edit*, a small JSON-able dict ``{"op": name, ...}`` that the
pruning report records. :func:`replay` applies the recorded edits to a freshly built model so that
``pare.load`` can rebuild non-uniform shapes before loading the weights (any kept-index set will
do there, since the weights are loaded afterwards).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from pare.arch.surgery import depth, experts, rotation, width
from pare.errors import PareError

if TYPE_CHECKING:
    from pare.arch.overrides import ArchOverride

Edit = dict[str, Any]

EDITS: dict[str, Callable[[nn.Module, Edit, ArchOverride | None], None]] = {
    **width.REPLAY, **depth.REPLAY, **experts.REPLAY, **rotation.REPLAY,
}


def replay(model: nn.Module, edits: list[Edit], override: ArchOverride | None = None) -> None:
    """Apply recorded structural edits, in order, to a model built from the saved config, describing
    it with ``override`` (the one the prune used, recorded in the manifest)."""
    for edit in edits:
        op = edit.get("op")
        if op not in EDITS:
            raise PareError(
                f"this checkpoint needs structural edit {op!r}, which this version of pare does not know; "
                f"known edits: {sorted(EDITS)}. Upgrade pare."
            )
        EDITS[op](model, edit, override)


__all__ = ["EDITS", "Edit", "replay"]
