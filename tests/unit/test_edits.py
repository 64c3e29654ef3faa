"""Typed structural edits: one dataclass per kind, the manifest form pare has always written, and
re-indexing across later layer removals."""

from __future__ import annotations

import json

import pytest

from pare.arch.surgery import replay
from pare.arch.surgery.edits import (
    EDIT_TYPES,
    Experts,
    Heads,
    Hidden,
    MlpChannels,
    RemoveLayers,
    RemoveSublayer,
    ResidualShortcuts,
    as_edit,
)
from pare.arch.surgery.reindex import chain_edits
from pare.errors import PareError
from pare.report import Report

# manifest entries as pare wrote them before edits were typed (copied from saved pare.json files)
OLD_FORM = [
    {"op": "mlp_channels", "layer": 0, "width": 96, "shared_width": None},
    {"op": "heads", "layer": 1, "num_heads": 2, "num_kv_heads": 1},
    {"op": "hidden", "width": 48},
    {"op": "remove_layers", "removed": [1], "kept": [0, 2], "num_layers_before": 3, "num_layers_after": 2,
     "layers_path": "model.layers", "config": {"num_hidden_layers": 2, "layer_types": ["full_attention"] * 2}},
    {"op": "remove_layers", "removed": [0], "kept": [1, 2], "num_layers_before": 3, "num_layers_after": 2,
     "layers_path": "transformer.h", "config": {"n_layer": 2}, "uniform": False},
    {"op": "remove_sublayer", "layer": 2, "part": "attention", "params_removed": 4096, "layers_path": "model.layers",
     "path": "self_attn", "num_kv_heads": 2, "head_dim": 16},
    {"op": "remove_sublayer", "layer": 0, "part": "mlp", "params_removed": 100, "layers_path": "model.decoder.layers",
     "inputs": ["fc1"], "down": "fc2", "out_features": 64},
    {"op": "experts", "layer": 0, "num_experts": 7, "top_k": None},
    {"op": "residual_shortcuts", "layers": [0, 1, 2], "width": 48},
]


@pytest.mark.parametrize("entry", OLD_FORM, ids=lambda e: e["op"])
def test_old_manifest_entries_parse_and_write_back_unchanged(entry: dict) -> None:
    edit = as_edit(json.loads(json.dumps(entry)))
    assert type(edit) is EDIT_TYPES[entry["op"]]
    assert edit.to_dict() == entry
    assert as_edit(edit.to_dict()) == edit


def test_every_edit_kind_is_known_by_its_manifest_name() -> None:
    assert set(EDIT_TYPES) == {"mlp_channels", "heads", "hidden", "remove_layers", "remove_sublayer", "experts",
                                "residual_shortcuts"}
    assert {e["op"] for e in OLD_FORM} == set(EDIT_TYPES)


def test_a_report_reads_and_writes_the_manifest_form() -> None:
    report = Report.from_dict({"method": "x", "config": {}, "edits": OLD_FORM})
    assert [type(e) for e in report.edits] == [MlpChannels, Heads, Hidden, RemoveLayers, RemoveLayers,
                                                RemoveSublayer, RemoveSublayer, Experts, ResidualShortcuts]
    assert report.to_dict()["edits"] == OLD_FORM
    assert json.loads(json.dumps(report.to_dict()))["edits"] == OLD_FORM


def test_unknown_or_incomplete_edits_are_refused_before_the_model_is_touched() -> None:
    with pytest.raises(PareError, match=r"'rotate'.*Upgrade pare"):
        as_edit({"op": "rotate", "angle": 1})
    with pytest.raises(PareError, match=r"lacks.*width"):
        as_edit({"op": "hidden"})
    with pytest.raises(PareError, match="Upgrade pare"):
        replay(object(), [Hidden(4), {"op": "rotate"}])  # type: ignore[arg-type]  # nothing replayed


def cut(removed: list[int], n: int) -> RemoveLayers:
    kept = tuple(i for i in range(n) if i not in removed)
    return RemoveLayers(tuple(removed), kept, n, len(kept), "model.layers", {"num_hidden_layers": len(kept)})


def test_edits_are_reindexed_through_a_later_layer_removal() -> None:
    first = [MlpChannels(0, 8), MlpChannels(1, 8), Heads(3, 2, 1), Hidden(16)]
    out = chain_edits([first, [cut([1], 4)]])
    # layer 1 is gone, so its edit is dropped; layer 3 is now layer 2
    assert out == [MlpChannels(0, 8), Heads(2, 2, 1), Hidden(16), cut([1], 4)]


def test_successive_removals_merge_into_one_from_the_original_indices() -> None:
    out = chain_edits([[MlpChannels(4, 8)], [cut([0], 5)], [cut([1], 4)]])
    # original 5 layers: 0 removed, then the new 1 (original 2) removed; original 4 is now 2
    assert out == [MlpChannels(2, 8), RemoveLayers((0, 2), (1, 3, 4), 5, 3, "model.layers", {"num_hidden_layers": 3})]
    assert out[1].describes_config


def test_a_merged_removal_keeps_a_cut_the_config_cannot_express() -> None:
    gpt2_cut = RemoveLayers((0,), (1, 2, 3), 4, 3, "transformer.h", {"n_layer": 3}, uniform=False)
    merged = chain_edits([[gpt2_cut], [cut([0], 3)]])
    assert merged == [RemoveLayers((0, 1), (2, 3), 4, 2, "model.layers", {"num_hidden_layers": 2}, uniform=False)]
    assert merged[0].to_dict()["uniform"] is False


def test_chain_accepts_manifest_dicts_and_typed_edits_alike() -> None:
    typed = chain_edits([[as_edit(e) for e in OLD_FORM[:3]], [cut([0], 3)]])
    assert chain_edits([OLD_FORM[:3], [cut([0], 3).to_dict()]]) == typed
