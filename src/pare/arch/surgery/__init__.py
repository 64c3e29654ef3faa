"""The only place that changes shapes: slice projections, drop heads, channels and layers, and
rewrite the config to match.

Every structural function returns an *edit*, a small JSON-able dict ``{"op": name, ...}`` that the
pruning report records. :func:`replay` applies the recorded edits to a freshly built model so that
``pare.load`` can rebuild non-uniform shapes before loading the weights (any kept-index set will
do there, since the weights are loaded afterwards).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from pare.arch.surgery import depth, experts, width
from pare.errors import PareError

Edit = dict[str, Any]

EDITS: dict[str, Callable[[nn.Module, Edit], None]] = {**width.REPLAY, **depth.REPLAY, **experts.REPLAY}


def replay(model: nn.Module, edits: list[Edit]) -> None:
    """Apply recorded structural edits, in order, to a model built from the saved config."""
    for edit in edits:
        op = edit.get("op")
        if op not in EDITS:
            raise PareError(
                f"this checkpoint needs structural edit {op!r}, which this version of pare does not know; "
                f"known edits: {sorted(EDITS)}. Upgrade pare."
            )
        EDITS[op](model, edit)


__all__ = ["EDITS", "Edit", "replay"]
