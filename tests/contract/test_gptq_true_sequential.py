"""GPTQ solved in call order (``true_sequential``): one forward per layer with one batch, the same
result in passes with several batches, and a fallback when the roles' groups are wrong."""

from __future__ import annotations

import pytest
import torch

import pare
import pare.methods.quantize as quantize_method
from pare.errors import ConfigError
from tiny import tiny_batch, tiny_model

QUIET = pare.RuntimeConfig(progress=False, device="cpu")
CFG = dict(scheme="int4", group_size=32, algorithm="gptq", act_order=True)


def _linears(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "layers." in n and p.dim() == 2}


def _quantized(true_sequential: bool | None, batch_size: int, ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
    """The decoder weights after GPTQ, and how many times the decoder layers ran."""
    model = tiny_model("llama")
    calls = [0]
    handles = [layer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
               for layer in model.model.layers]
    try:
        pare.prune(model, pare.QuantizeConfig(**CFG, true_sequential=true_sequential), ids, runtime=QUIET,
                   batch_size=batch_size)
    finally:
        for h in handles:
            h.remove()
    return _linears(model), calls[0]


def test_one_batch_takes_one_forward_per_layer_and_quantizes_later_matrices_on_quantized_inputs() -> None:
    ids = tiny_batch(4, 32)
    layers = tiny_model("llama").config.num_hidden_layers
    inline, calls = _quantized(True, 4, ids)
    two_pass, calls_two = _quantized(False, 4, ids)
    assert calls == layers  # one forward per layer (the runner's propagation forward is not needed)
    assert calls_two == 2 * layers - 1  # recording + propagation, no propagation after the last layer
    # layer 0's q/k/v read the same inputs either way; its o_proj reads attention outputs of quantized q/k/v
    for name in ("q_proj", "k_proj", "v_proj"):
        key = f"model.layers.0.self_attn.{name}.weight"
        assert torch.equal(inline[key], two_pass[key]), key
    assert not torch.equal(inline["model.layers.0.self_attn.o_proj.weight"],
                           two_pass["model.layers.0.self_attn.o_proj.weight"])
    for name, w in inline.items():  # on the int4 grid: at most 16 values per group of 32
        groups = w.reshape(w.shape[0], -1, 32)
        assert int((torch.sort(groups, -1).values.diff(dim=-1) != 0).sum(-1).max()) + 1 <= 16, name


def test_several_batches_solve_in_passes_to_the_one_forward_result() -> None:
    ids = tiny_batch(4, 32)
    inline, _ = _quantized(True, 4, ids)
    passes, calls = _quantized(True, 2, ids)
    layers = tiny_model("llama").config.num_hidden_layers
    assert calls > 2 * 2 * layers  # a pass per group (4 per layer), then the runner's propagation
    # the Gram matrices differ by the summation order of the batches only: a rounding tie may flip
    same = sum(int((inline[n] == w).sum()) for n, w in passes.items())
    assert same >= 0.99 * sum(w.numel() for w in passes.values())
    assert max(float((inline[n] - w).abs().max()) for n, w in passes.items()) < 1.0


def test_wrong_groups_fall_back_to_recording_the_layer_in_one_pass(monkeypatch) -> None:
    ids = tiny_batch(4, 32)
    two_pass, _ = _quantized(False, 4, ids)

    def wrong(layer, roles, targets):  # o_proj does not read q/k/v's input
        attn = [t for t in targets if ".self_attn." in t.name]
        return [attn] + [[t] for t in targets if t not in attn]

    monkeypatch.setattr(quantize_method, "role_groups", wrong)
    for batch_size in (4, 2):
        fallback, _ = _quantized(True, batch_size, ids)
        if batch_size == 4:
            assert all(torch.equal(w, two_pass[n]) for n, w in fallback.items())
        else:  # the two-pass recording over two batches: the same up to the Gram's summation order
            same = sum(int((two_pass[n] == w).sum()) for n, w in fallback.items())
            assert same >= 0.99 * sum(w.numel() for w in fallback.values())


def test_unset_is_on_with_one_batch_and_off_with_several() -> None:
    ids = tiny_batch(4, 32)
    layers = tiny_model("llama").config.num_hidden_layers
    for batch_size in (4, 2):
        auto, calls = _quantized(None, batch_size, ids)
        chosen, calls_chosen = _quantized(batch_size == 4, batch_size, ids)
        assert calls == calls_chosen, batch_size
        assert all(torch.equal(w, chosen[n]) for n, w in auto.items()), batch_size
    assert pare.QuantizeConfig(**CFG).true_sequential is None
    assert _quantized(None, 4, ids)[1] == layers  # one forward per layer: the solve in call order


def test_unset_follows_dense_inputs_without_error() -> None:
    dense = pare.RuntimeConfig(progress=False, device="cpu", sequential=False)
    pare.prune(tiny_model("llama"), pare.QuantizeConfig(**CFG), tiny_batch(4, 32), runtime=dense, batch_size=4)


def test_true_sequential_config_errors() -> None:
    with pytest.raises(ConfigError, match="algorithm='gptq'"):
        pare.QuantizeConfig(scheme="int4", group_size=32, true_sequential=True)
    dense = pare.RuntimeConfig(progress=False, device="cpu", sequential=False)
    with pytest.raises(ConfigError, match="sequential calibration"):
        pare.prune(tiny_model("llama"), pare.QuantizeConfig(**CFG, true_sequential=True), tiny_batch(4, 32),
                   runtime=dense)
