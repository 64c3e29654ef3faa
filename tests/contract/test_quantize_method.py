"""The quantize method and SparseGPT's joint prune + quantize pass on tiny models."""

from __future__ import annotations

import pytest
import torch

import pare
from pare.api import check
from pare.cli import quantize_argv
from pare.errors import ConfigError
from pare.ops.quant.mx import E2M1, fp_round
from pare.ops.quant.scheme import QuantScheme, quantize
from tiny import tiny_batch, tiny_model

QUIET = pare.RuntimeConfig(progress=False, device="cpu")


def _linears(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "layers." in n and p.dim() == 2}


@pytest.mark.parametrize("scheme,group", [("int8", 0), ("int4", 32), ("mxfp4", None), ("nvfp4", None)])
def test_rtn_replaces_every_decoder_linear_by_its_quantized_values(scheme: str, group: int | None) -> None:
    model = tiny_model("llama")
    before = _linears(model)
    cfg = pare.QuantizeConfig(scheme=scheme, group_size=group)
    report = pare.prune(model, cfg, runtime=QUIET)
    qs = cfg.quant_scheme()
    for name, w in _linears(model).items():
        assert torch.equal(w, quantize(before[name], qs).dequant), name
    q = report.scores["quantization"]
    assert q["scheme"] == scheme and q["params"] == sum(w.numel() for w in before.values())
    assert report.figures["bits_per_param"] == q["bits_per_param"]
    assert report.figures["quantized_bytes"] == q["bytes"]
    assert torch.equal(model.model.embed_tokens.weight, tiny_model("llama").model.embed_tokens.weight)


def test_gptq_runs_layer_by_layer_and_stays_on_the_grid() -> None:
    model = tiny_model("llama")
    report = pare.prune(model, pare.QuantizeConfig(scheme="int4", group_size=32, algorithm="gptq"),
                        tiny_batch(4, 32), runtime=QUIET)
    assert report.calibration is not None and report.scores["quantization"]["gptq_loss"]
    for name, w in _linears(model).items():
        groups = w.reshape(w.shape[0], -1, 32)
        assert int((torch.sort(groups, -1).values.diff(dim=-1) != 0).sum(-1).max()) + 1 <= 16, name


def test_act_order_gptq_differs_and_reloads(tmp_path) -> None:
    ids = tiny_batch(4, 32)
    a, b = tiny_model("llama"), tiny_model("llama")
    pare.prune(a, pare.QuantizeConfig(scheme="int4", group_size=32, algorithm="gptq"), ids, runtime=QUIET)
    report = pare.prune(b, pare.QuantizeConfig(scheme="int4", group_size=32, algorithm="gptq", act_order=True), ids,
                        runtime=QUIET)
    assert any(not torch.equal(x, y) for x, y in zip(_linears(a).values(), _linears(b).values(), strict=True))
    pare.save(b, None, tmp_path / "q", report)
    with torch.no_grad():
        assert torch.equal(pare.load(tmp_path / "q")(ids).logits, b(ids).logits)


def test_bfloat16_model_says_when_values_are_not_exact() -> None:
    model = tiny_model("llama").to(torch.bfloat16)
    report = pare.prune(model, pare.QuantizeConfig(scheme="int4", group_size=32), runtime=QUIET)
    assert report.scores["quantization"]["not_exact_in_dtype"]
    assert any("cannot represent exactly" in n for n in report.notes)
    model = tiny_model("llama").to(torch.bfloat16)  # E2M1 times a power of two: exact in bfloat16
    report = pare.prune(model, pare.QuantizeConfig(scheme="mxfp4"), runtime=QUIET)
    assert report.scores["quantization"]["not_exact_in_dtype"] == []


@pytest.mark.parametrize("joint", ["interleaved", "prune-then-gptq"])
@pytest.mark.parametrize("scheme,group", [("int4", 32), ("mxfp4", None)])
def test_joint_sparsegpt_keeps_two_of_four_and_quantizes_the_rest(scheme: str, group: int | None, joint: str) -> None:
    model = tiny_model("llama")
    cfg = pare.SparseGPTConfig(pattern="2:4", quantize=scheme, group_size=group, joint=joint)
    report = pare.prune(model, cfg, tiny_batch(4, 32), runtime=QUIET)
    for name, w in _linears(model).items():
        assert bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all()), name
        if scheme == "int4":  # at most 16 values (zero among them) in each group of 32
            groups = w.reshape(w.shape[0], -1, 32)
            assert int((torch.sort(groups, -1).values.diff(dim=-1) != 0).sum(-1).max()) + 1 <= 16, name
        if scheme == "mxfp4":
            scale = w.reshape(w.shape[0], -1, 32).abs().amax(-1, keepdim=True)
            assert bool((scale > 0).all())
    q = report.scores["quantization"]
    assert q["sparse_format"] == "2:4 indices" and q["scheme"] == scheme
    qs = QuantScheme(scheme, 32)
    assert q["bits_per_param"] == pytest.approx(0.5 * qs.bits + 0.5 * 2 + (16 / 32 if scheme == "int4" else 8 / 32))


@pytest.mark.parametrize("cfg", [
    pare.SparseGPTConfig(pattern="2:4", quantize="int4", group_size=32),
    pare.SparseGPTConfig(pattern="2:4", quantize="int4", group_size=32, joint="interleaved"),
    pare.SparseGPTConfig(pattern="2:4"),
    pare.SparseGPTConfig(sparsity=0.5, quantize="int4", group_size=32),
    pare.SparseGPTConfig(sparsity=0.5),
], ids=["joint", "interleaved", "2:4", "50%+int4", "50%"])
def test_sparsegpt_stacks_matrices_sharing_an_input_with_the_results_of_one_at_a_time(monkeypatch, cfg) -> None:
    """q/k/v and gate/up are solved as one row-stacked matrix (rows are independent with per-row and
    N:M masks): same weights and per-matrix losses as solving each matrix alone."""
    from pare.methods.sparsegpt import SparseGPTPruner

    stacked = tiny_model("llama")
    r1 = pare.prune(stacked, cfg, tiny_batch(4, 32), runtime=QUIET)
    calls = []
    monkeypatch.setattr(SparseGPTPruner, "_stackable", lambda self, targets, stats: calls.append(1) and False)
    alone = tiny_model("llama")
    r2 = pare.prune(alone, cfg, tiny_batch(4, 32), runtime=QUIET)
    assert calls  # the one-at-a-time path ran
    for (name, a), b in zip(_linears(stacked).items(), _linears(alone).values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    for name, loss in r2.scores["sparsegpt_loss"].items():
        assert r1.scores["sparsegpt_loss"][name] == pytest.approx(loss, rel=1e-4), name
    if cfg.quantize:
        assert r1.scores["quantization"]["bytes"] == r2.scores["quantization"]["bytes"]


def test_joint_pass_defaults_to_its_own_dampening() -> None:
    """Unset ``percdamp``: 0.01 pruning alone, ``JOINT_PERCDAMP`` in the joint pass (both solves); a set
    value wins, and the unset value survives a dict round trip."""
    from pare.methods.sparsegpt import JOINT_PERCDAMP, PRUNE_PERCDAMP, SparseGPTConfig

    assert (PRUNE_PERCDAMP, JOINT_PERCDAMP) == (0.01, 0.1)
    joint = SparseGPTConfig(pattern="2:4", quantize="int4", group_size=32)
    assert SparseGPTConfig(pattern="2:4").damp == 0.01 and joint.damp == 0.1
    assert SparseGPTConfig(pattern="2:4", quantize="int4", group_size=32, percdamp=0.03).damp == 0.03
    assert SparseGPTConfig.from_dict(joint.to_dict()) == joint
    weights = []
    for damp in (None, JOINT_PERCDAMP, PRUNE_PERCDAMP):
        model = tiny_model("llama")
        cfg = SparseGPTConfig(pattern="2:4", quantize="int4", group_size=32, percdamp=damp)
        pare.prune(model, cfg, tiny_batch(4, 32), runtime=QUIET)
        weights.append(_linears(model))
    for name, w in weights[0].items():
        assert torch.equal(w, weights[1][name]), name
    assert any(not torch.equal(w, weights[2][name]) for name, w in weights[0].items())


def test_joint_prune_then_gptq_prunes_the_stacked_buffer_in_place(monkeypatch) -> None:
    """The joint pass prunes the row-stacked fp32 copy of q/k/v (gate/up) in place, so no second fp32
    copy of the stack is made before GPTQ; a matrix solved alone (an fp32 model's own weight) is not
    overwritten, and the weights equal the one-at-a-time results (test above)."""
    import pare.methods.sparsegpt as sgpt

    calls: list[tuple[int, bool]] = []
    prune_rows = sgpt.sparsegpt_prune_rows

    def spy(W, *args, **kwargs):
        pruned, loss = prune_rows(W, *args, **kwargs)
        calls.append((W.shape[0], pruned.data_ptr() == W.data_ptr()))
        return pruned, loss

    monkeypatch.setattr(sgpt, "sparsegpt_prune_rows", spy)
    model = tiny_model("llama")
    layer = model.model.layers[0]
    q, gate, o = layer.self_attn.q_proj, layer.mlp.gate_proj, layer.self_attn.o_proj
    stacked_rows = {q.out_features + 2 * layer.self_attn.k_proj.out_features,
                    gate.out_features + layer.mlp.up_proj.out_features}
    pare.prune(model, pare.SparseGPTConfig(pattern="2:4", quantize="int4", group_size=32), tiny_batch(4, 32),
               runtime=QUIET)
    assert {rows for rows, _ in calls} == stacked_rows | {o.out_features, layer.mlp.down_proj.out_features}
    for rows, in_place in calls:
        assert in_place == (rows in stacked_rows), rows


def test_sparsegpt_solves_a_stack_over_the_size_cap_one_matrix_at_a_time(monkeypatch) -> None:
    """Above ``STACK_MAX_BYTES`` (a big model's gate/up) the matrices are solved one at a time, so no
    stacked fp32 copy sits beside a streamed layer's Gram matrices; the weights are the stacked ones."""
    import pare.methods.sparsegpt as sgpt

    cfg = pare.SparseGPTConfig(sparsity=0.5)
    stacked = tiny_model("llama")
    pare.prune(stacked, cfg, tiny_batch(4, 32), runtime=QUIET)
    monkeypatch.setattr(sgpt, "STACK_MAX_BYTES", 0)
    monkeypatch.setattr(sgpt.SparseGPTPruner, "_prune_rows", lambda *a: pytest.fail("stacked over the cap"))
    alone = tiny_model("llama")
    pare.prune(alone, cfg, tiny_batch(4, 32), runtime=QUIET)
    for (name, a), b in zip(_linears(stacked).items(), _linears(alone).values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_joint_mxfp4_values_are_e2m1_times_a_power_of_two() -> None:
    model = tiny_model("llama")
    pare.prune(model, pare.SparseGPTConfig(sparsity=0.5, quantize="mxfp4"), tiny_batch(4, 32), runtime=QUIET)
    for name, w in _linears(model).items():
        blocks = w.reshape(-1, 32)
        amax = blocks.abs().amax(-1, keepdim=True)
        scale = torch.exp2(torch.floor(torch.log2(amax.clamp(min=1e-30))) - 2)  # at most 6 * scale: 4 <= amax/s < 8
        for s in (scale, scale * 2):  # the block's scale is its current amax's binade or one above it (saturation)
            if torch.equal(fp_round(blocks / s, E2M1), blocks / s):
                break
        else:
            pytest.fail(f"{name}: values off the E2M1 grid")


def test_config_errors_say_what_works() -> None:
    with pytest.raises(ConfigError, match="blocks of 32"):
        pare.QuantizeConfig(scheme="mxfp4", group_size=128)
    with pytest.raises(ConfigError, match="rtn, gptq"):
        pare.QuantizeConfig(algorithm="awq")
    with pytest.raises(ConfigError, match="act_order applies"):
        pare.QuantizeConfig(act_order=True)
    with pytest.raises(ConfigError, match="set quantize"):
        pare.SparseGPTConfig(group_size=64)
    with pytest.raises(ConfigError, match="multiple of 128"):
        pare.prune(tiny_model("llama"), pare.QuantizeConfig(scheme="int4"), runtime=QUIET)


@pytest.mark.parametrize("cfg", [pare.QuantizeConfig(scheme="int4", group_size=8, algorithm="gptq"),
                                 pare.SparseGPTConfig(pattern="2:4", quantize="int4", group_size=8)],
                         ids=["gptq", "joint"])
def test_gptq_group_sizes_its_solver_cannot_take_are_refused_before_any_work(cfg) -> None:
    model = tiny_model("llama")
    before = _linears(model)
    with pytest.raises(ConfigError, match="multiple of 16 and divides"):
        check(model, cfg)
    with pytest.raises(ConfigError, match="multiple of 16"):
        pare.prune(model, cfg, tiny_batch(4, 32), runtime=QUIET)
    assert all(torch.equal(w, before[n]) for n, w in _linears(model).items())
    rtn = pare.QuantizeConfig(scheme="int4", group_size=8)  # RTN takes the same groups
    check(model, rtn)


def test_quantize_command_is_prune_with_the_quantize_method() -> None:
    assert quantize_argv(["quantize", "--model", "m", "--method", "gptq", "--scheme", "int4"]) == [
        "prune", "--method", "quantize", "--model", "m", "--algorithm", "gptq", "--scheme", "int4"]
    assert quantize_argv(["quantize", "--method=rtn"])[-1] == "--algorithm=rtn"


def test_gptq_on_dense_inputs_quantizes_each_layer_from_the_dense_model() -> None:
    ids = tiny_batch(4, 32)
    dense = pare.RuntimeConfig(progress=False, device="cpu", sequential=False)
    cfg = dict(scheme="int4", group_size=32, algorithm="gptq")
    whole, alone = tiny_model("llama"), tiny_model("llama")
    pare.prune(whole, pare.QuantizeConfig(**cfg), ids, runtime=dense)
    pare.prune(alone, pare.QuantizeConfig(**cfg, targets=(r".*layers\.1\..*",)), ids, runtime=dense)
    last = {n: w for n, w in _linears(whole).items() if "layers.1." in n}
    assert last and all(torch.equal(w, _linears(alone)[n]) for n, w in last.items())
    seq = tiny_model("llama")  # sequential (default): layer 1 sees layer 0 quantized, so it differs
    pare.prune(seq, pare.QuantizeConfig(**cfg), ids, runtime=QUIET)
    assert any(not torch.equal(w, _linears(seq)[n]) for n, w in last.items())
