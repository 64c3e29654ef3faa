"""Re-index recorded edits across later layer removals (several stages saved as one manifest).

``pare.load`` replays every edit on a model built from the *final* config, whose layers are already
renumbered; an edit made before a layer removal names the layer by its index at that time. This
module maps such edits to the final indices (and drops those of removed layers), and merges
successive removals into one removal from the original indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Edit = dict[str, Any]


def _compose_cuts(earlier: Edit, later: Edit) -> Edit:
    """One ``remove_layers`` edit equal to ``earlier`` followed by ``later``, in the original indices."""
    kept = [earlier["kept"][j] for j in later["kept"]]
    merged = {**later, "kept": kept, "num_layers_before": earlier["num_layers_before"],
              "removed": [i for i in range(earlier["num_layers_before"]) if i not in set(kept)]}
    if not earlier.get("uniform", True):
        merged["uniform"] = False
    return merged


def _through_cut(edits: list[Edit], cut: Edit) -> tuple[list[Edit], Edit]:
    """Re-index ``edits`` (made before layer removal ``cut``) for the layers that remain.

    Edits of a removed layer are dropped (the layer is gone); an earlier ``remove_layers`` edit is
    merged into ``cut`` so that replay sees one removal from the original layer indices.

    Returns:
        The re-indexed edits, and ``cut`` (merged with an earlier removal, if any).
    """
    kept = list(cut["kept"])
    out: list[Edit] = []
    for edit in edits:
        if edit.get("op") == "remove_layers":
            cut = _compose_cuts(edit, cut)
        elif isinstance(edit.get("layer"), int):
            if edit["layer"] in kept:
                out.append({**edit, "layer": kept.index(edit["layer"])})
        else:
            out.append(edit)
    return out, cut


def chain_edits(stages: Sequence[Sequence[Edit]]) -> list[Edit]:
    """Every structural edit of several stages (each stage's edits, stages in the order applied),
    in replay order.

    A single stage's edits are returned unchanged. The edits of an earlier stage are re-indexed
    through each layer removal of the later ones, because ``pare.load`` replays them on a model
    built from the final config, whose layers are already renumbered.
    """
    out: list[Edit] = []
    for edits in stages:
        new = [dict(e) for e in edits]
        for i, edit in enumerate(new):
            if edit.get("op") == "remove_layers" and out:
                out, new[i] = _through_cut(out, edit)
        out.extend(new)
    return out


__all__ = ["chain_edits"]
