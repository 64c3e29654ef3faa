"""Study grids: point specs, the points they make, Pareto fronts, the storage account."""

from __future__ import annotations

import json

import pytest
import torch

from pare.errors import ConfigError
from pare.methods.quantize import QuantizeConfig
from pare.ops.quant.bits import matrix_bits
from pare.ops.quant.scheme import QuantScheme
from pare.reporting.plots import PALETTE
from pare.study.grid import build_grid, parse_orders, parse_prune, parse_quant
from pare.study.pareto import best_within, pareto_front
from pare.study.report import distinct_colours, matrix_budget_bytes
from pare.study.run import normalised
from pare.study.storage import cheapest_layout, holds_nm


@pytest.mark.parametrize(("spec", "method", "fields"), [
    ("sparsegpt:0.5", "sparsegpt", {"sparsity": 0.5, "pattern": "unstructured"}),
    ("sparsegpt:2:4", "sparsegpt", {"pattern": "2:4"}),
    ("wanda:0.6", "wanda", {"sparsity": 0.6}),
    ("osscar:0.25", "osscar", {"mlp_ratio": 0.25}),
    ("ppl-window:4", "ppl-window", {"num_layers": 4}),
    ("sparsegpt:0.5,percdamp=0.1", "sparsegpt", {"sparsity": 0.5, "percdamp": 0.1}),
    ("osscar:0.5, attn_ratio=0.25", "osscar", {"mlp_ratio": 0.5, "attn_ratio": 0.25}),
])
def test_prune_specs(spec: str, method: str, fields: dict) -> None:
    parsed = parse_prune(spec)
    assert parsed.method == method
    for key, value in fields.items():
        assert getattr(parsed.config, key) == value


def test_none_is_no_stage() -> None:
    assert parse_prune(" None ").config is None
    assert parse_quant("none").scheme is None


@pytest.mark.parametrize(("spec", "scheme", "group", "symmetric", "algorithm"), [
    ("int8", "int8", None, True, "rtn"),
    ("int4-g128", "int4", 128, True, "rtn"),
    ("gptq-int4-g128", "int4", 128, True, "gptq"),
    ("rtn-int4-g64-asym", "int4", 64, False, "rtn"),
    ("int8-g0", "int8", 0, True, "rtn"),
    ("mxfp4", "mxfp4", None, True, "rtn"),
    ("mxfp6", "mxfp6-e2m3", None, True, "rtn"),
    ("mxfp8", "mxfp8-e4m3", None, True, "rtn"),
    ("MXFP6-E3M2", "mxfp6-e3m2", None, True, "rtn"),
    ("gptq-nvfp4", "nvfp4", None, True, "gptq"),
])
def test_quant_specs(spec: str, scheme: str, group: int | None, symmetric: bool, algorithm: str) -> None:
    q = parse_quant(spec)
    assert (q.scheme, q.group_size, q.symmetric, q.algorithm) == (scheme, group, symmetric, algorithm)
    cfg = q.config()
    assert cfg.scheme == scheme and cfg.algorithm == algorithm and cfg.keep_zeros


@pytest.mark.parametrize(("spec", "words"), [
    ("sparsgpt:0.5", ["unknown method 'sparsgpt'", "sparsegpt", "osscar", "ppl-window"]),
    ("sparsegpt:half", ["'half' is not a number", "sparsegpt:2:4"]),
    ("sparsegpt:1.5", ["sparsegpt:1.5", "sparsity"]),
    ("sparsegpt:0.5,0.1", ["KEY=VALUE"]),
    ("sparsegpt:0.5,bogus=1", ["bogus"]),
    ("quantize:int4", ["unknown method 'quantize'"]),
])
def test_bad_prune_specs_say_what_works(spec: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_prune(spec)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(("spec", "words"), [
    ("int5", ["unknown scheme 'int5'", "int4", "mxfp4", "mxfp6", "gptq-int4-g128"]),
    ("mxfp4-g64", ["fixes its own block size"]),
    ("mxfp4-asym", ["symmetric by definition"]),
    ("awq-int4", ["unknown scheme 'awq-int4'"]),
    ("gptq-int4-g64,act_order", ["KEY=VALUE", "act_order=true"]),
    ("gptq-int4-g64,group_size=32", ["group_size is set by the spec"]),
    ("int4-g64,act_order=true", ["act_order applies to GPTQ only", "gptq-int4-g64,"]),
    ("gptq-int4-g64,bogus=1", ["bogus"]),
])
def test_bad_quant_specs_say_what_works(spec: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_quant(spec)
    for word in words:
        assert word in str(info.value)


def test_bad_orders_and_empty_specs() -> None:
    with pytest.raises(ConfigError, match="prune-first, quant-first, joint"):
        parse_orders("prune-first,later")
    with pytest.raises(ConfigError, match="--prune is empty"):
        build_grid(" ; ", "int8", "prune-first")


def test_grid_points_and_orders() -> None:
    points = build_grid("none; sparsegpt:2:4; osscar:0.25", "none; int4-g32; gptq-int4-g32",
                        "prune-first,quant-first,joint")
    ids = [p.id for p in points]
    assert len(ids) == len(set(ids))
    assert ids[:3] == ["dense", "int4-g32", "gptq-int4-g32"]
    # one joint point for int4-g32 and gptq-int4-g32 (the joint pass is the same); none for osscar
    joint = [p for p in points if p.order == "joint"]
    assert [p.id for p in joint] == ["sparsegpt-2-4__int4-g32__joint"]
    (stage,) = joint[0].stages
    assert stage["method"] == "sparsegpt" and stage["quantize"] == "int4" and stage["group_size"] == 32
    # 1 dense + 2 quant + 2 prune + 2 x 2 x 2 ordered + 1 joint
    assert len(points) == 1 + 2 + 2 + 8 + 1
    pf = next(p for p in points if p.id == "osscar-0.25__gptq-int4-g32__prune-first")
    assert [s["method"] for s in pf.stages] == ["osscar", "quantize"]
    assert pf.stages[1]["algorithm"] == "gptq" and pf.stages[1]["keep_zeros"]
    qf = next(p for p in points if p.id == "osscar-0.25__gptq-int4-g32__quant-first")
    assert [s["method"] for s in qf.stages] == ["quantize", "osscar", "quantize"]
    assert qf.stages[2]["algorithm"] == "rtn"  # the refit's weights rounded back onto the grid


def test_pareto_front_on_hand_data() -> None:
    pts = [
        {"id": "a", "bytes": 100, "ppl": 10.0, "acc": 0.60},
        {"id": "b", "bytes": 50, "ppl": 12.0, "acc": 0.58},
        {"id": "c", "bytes": 60, "ppl": 13.0, "acc": 0.59},  # beaten by b on ppl, not on acc
        {"id": "d", "bytes": 25, "ppl": 30.0, "acc": 0.40},
        {"id": "e", "bytes": 50, "ppl": 12.5, "acc": 0.50},  # same size as b, worse
        {"id": "f", "bytes": 120, "ppl": 10.0, "acc": 0.61},  # larger than a, same ppl
        {"id": "g", "bytes": 30, "ppl": None, "acc": 0.45},  # no ppl: left out of the ppl front
    ]
    assert [p["id"] for p in pareto_front(pts, "bytes", "ppl")] == ["d", "b", "a"]
    assert [p["id"] for p in pareto_front(pts, "bytes", "acc", lower_is_better=False)] == ["d", "g", "b", "c", "a",
                                                                                            "f"]
    assert best_within(pts, 60, "bytes", "ppl")["id"] == "b"
    assert best_within(pts, 60, "bytes", "acc", lower_is_better=False)["id"] == "c"
    assert best_within(pts, 20, "bytes", "ppl") is None


def test_storage_layouts() -> None:
    torch.manual_seed(0)
    W = torch.randn(8, 64)
    assert cheapest_layout(W, None)[0] == "dense"
    two_four = W.clone().reshape(8, 16, 4)
    two_four[:, :, :2] = 0
    two_four = two_four.reshape(8, 64)
    assert holds_nm(two_four, (2, 4)) and not holds_nm(W, (2, 4))
    layout, acct = cheapest_layout(two_four, QuantScheme("int4", 32))
    assert layout == "2:4"
    assert acct.total_bits == matrix_bits((8, 64), QuantScheme("int4", 32), nm=(2, 4)).total_bits
    sparse = W.clone()
    sparse[:, ::2] = 0  # 50% but in no 2:4 layout? every group of 4 has 2 zeros: also 2:4
    assert cheapest_layout(sparse, None)[0] == "2:4"
    few = W.clone()
    few[0, :3] = 0  # a few zeros: the bitmask costs more than it saves
    assert cheapest_layout(few, None)[0] == "dense"
    most = W.clone()
    most[:, :56] = 0
    assert cheapest_layout(most, None)[0] == "bitmask"


def _result(pid: str, bytes_: int, matrix: int, other: int) -> dict:
    return {"point": {"id": pid, "prune": "none", "quant": pid, "order": "-"}, "bytes": bytes_,
            "matrix_bytes": matrix, "other_bytes": other}


def test_matrix_budget_sits_on_the_bytes_axis() -> None:
    results = [_result("int4", 60, 30, 30), _result("dense", 150, 120, 30)]
    assert matrix_budget_bytes(results, 0.25) == 30 + 0.25 * 120
    assert matrix_budget_bytes(results, 0.125) == 45.0
    assert matrix_budget_bytes(results[:1], 0.25) is None  # no dense point: no reference


def test_quantization_specs_get_distinct_colours() -> None:
    pytest.importorskip("matplotlib")
    assert distinct_colours(3) == list(PALETTE[:3])
    for n in (len(PALETTE) + 1, 20):
        colours = distinct_colours(n)
        assert len(colours) == n and len(set(colours)) == n


def test_quant_spec_options() -> None:
    q = parse_quant("GPTQ-int4-g64, act-order=True ,damp=0.1")
    assert q.label == "gptq-int4-g64,act_order=true,damp=0.1"
    assert q.options == (("act_order", True), ("damp", 0.1))
    cfg = q.config()
    assert cfg.algorithm == "gptq" and cfg.act_order and cfg.damp == 0.1 and cfg.group_size == 64
    rtn = q.config("rtn")  # the quantize-first re-rounding: GPTQ's own options left out
    assert rtn.algorithm == "rtn" and not rtn.act_order and rtn.damp == QuantizeConfig().damp
    assert parse_quant("int4-g64").label == "int4-g64" and parse_quant("int4-g64").options == ()
    points = build_grid("none; sparsegpt:2:4", "gptq-int4-g64,act_order=true", "prune-first,quant-first,joint")
    ids = [p.id for p in points]
    assert ids == ["gptq-int4-g64-act_order-true".replace("_", "-"),
                   "sparsegpt-2-4__gptq-int4-g64-act-order-true__prune-first",
                   "sparsegpt-2-4__gptq-int4-g64-act-order-true__quant-first",
                   "sparsegpt-2-4__int4-g64__joint"]  # the joint pass shares the spec's scheme only
    assert points[0].stages[0]["act_order"] is True
    assert points[2].stages[0]["act_order"] is True and points[2].stages[2]["act_order"] is False


def test_a_point_stored_before_an_option_existed_is_still_done() -> None:
    point = build_grid("none", "gptq-int4-g64", "prune-first")[0].to_dict()
    older = json.loads(json.dumps(point))
    del older["stages"][0]["true_sequential"]  # written by a pare without the option
    assert normalised(older) == normalised(point)
    other = json.loads(json.dumps(point))
    other["stages"][0]["damp"] = 0.1
    assert normalised(other) != normalised(point)
