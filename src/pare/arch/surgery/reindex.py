"""Re-index recorded edits across later layer removals (several stages saved as one manifest).

``pare.load`` replays every edit on a model built from the *final* config, whose layers are already
renumbered; an edit made before a layer removal names the layer by its index at that time. This
module maps such edits to the final indices (and drops those of removed layers), and merges
successive removals into one removal from the original indices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from pare.arch.surgery.edits import Edit, LayerEdit, RemoveLayers, as_edit


def _compose_cuts(earlier: RemoveLayers, later: RemoveLayers) -> RemoveLayers:
    """One removal equal to ``earlier`` followed by ``later``, in the original indices."""
    kept = tuple(earlier.kept[j] for j in later.kept)
    gone = set(kept)
    return replace(later, kept=kept, num_layers_before=earlier.num_layers_before,
                   removed=tuple(i for i in range(earlier.num_layers_before) if i not in gone),
                   uniform=False if not earlier.describes_config else later.uniform)


def _through_cut(edits: list[Edit], cut: RemoveLayers) -> tuple[list[Edit], RemoveLayers]:
    """Re-index ``edits`` (made before layer removal ``cut``) for the layers that remain.

    Edits of a removed layer are dropped (the layer is gone); an earlier removal is merged into
    ``cut`` so that replay sees one removal from the original layer indices.

    Returns:
        The re-indexed edits, and ``cut`` (merged with an earlier removal, if any).
    """
    kept = list(cut.kept)
    out: list[Edit] = []
    for edit in edits:
        if isinstance(edit, RemoveLayers):
            cut = _compose_cuts(edit, cut)
        elif isinstance(edit, LayerEdit):
            if edit.layer in kept:
                out.append(replace(edit, layer=kept.index(edit.layer)))
        else:
            out.append(edit)
    return out, cut


def chain_edits(stages: Sequence[Sequence[Edit | Mapping[str, Any]]]) -> list[Edit]:
    """Every structural edit of several stages (each stage's edits, stages in the order applied),
    in replay order.

    A single stage's edits are returned unchanged. The edits of an earlier stage are re-indexed
    through each layer removal of the later ones, because ``pare.load`` replays them on a model
    built from the final config, whose layers are already renumbered.
    """
    out: list[Edit] = []
    for edits in stages:
        new = [as_edit(e) for e in edits]
        for i, edit in enumerate(new):
            if isinstance(edit, RemoveLayers) and out:
                out, new[i] = _through_cut(out, edit)
        out.extend(new)
    return out


__all__ = ["chain_edits"]
