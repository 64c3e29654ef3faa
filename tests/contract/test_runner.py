"""The layer-wise runner reproduces the full model when nothing is pruned, on every family."""

from __future__ import annotations

import pytest
import torch

from pare.arch import describe
from pare.arch.targets import layer_targets
from pare.calibration.runner import LayerwiseRunner, _StandIn, logits_from_hidden
from pare.calibration.stats import InputStats, record_inputs
from tiny import TINY_ARCHS, tiny_batch, tiny_model


def _runner_logits(model, ids, **kwargs) -> torch.Tensor:
    arch = describe(model)
    runner = LayerwiseRunner(model, arch, ids, device="cpu", progress=False, **kwargs)
    for _ in runner.steps():
        pass
    assert runner.final_hidden is not None
    return logits_from_hidden(model, arch, ids, torch.cat(runner.final_hidden))


@pytest.mark.parametrize("model_type", TINY_ARCHS)
def test_runner_reproduces_full_model_logits(model_type: str) -> None:
    model = tiny_model(model_type)
    ids = tiny_batch(5, 24)
    with torch.no_grad():
        ref = model(ids).logits
    got = _runner_logits(model, ids, batch_size=2)
    assert (got - ref).abs().max().item() <= 1e-4
    layers = describe(model).layer_modules(model)
    assert not any(isinstance(layer, _StandIn) for layer in layers)  # stand-ins always removed


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2", "mixtral"])
@pytest.mark.parametrize("options", [{"offload": False}, {"sequential": False}, {"batch_size": 1}])
def test_runner_options_do_not_change_results(model_type: str, options: dict) -> None:
    model = tiny_model(model_type)
    ids = tiny_batch(3, 16)
    with torch.no_grad():
        ref = model(ids).logits
    got = _runner_logits(model, ids, **{"batch_size": 2, **options})
    assert (got - ref).abs().max().item() <= 1e-4


def test_sequential_inputs_see_pruned_layers_and_dense_inputs_do_not() -> None:
    model = tiny_model("llama")
    ids = tiny_batch(2, 16)
    arch = describe(model)
    seen = {}
    for sequential in (True, False):
        m = tiny_model("llama")
        runner = LayerwiseRunner(m, arch, ids, device="cpu", progress=False, sequential=sequential)
        for step in runner.steps():
            seen[(sequential, step.index)] = torch.cat(step.inputs).clone()
            step.layer.mlp.down_proj.weight.data.zero_()  # a drastic "prune"
    assert torch.equal(seen[(True, 0)], seen[(False, 0)])
    assert not torch.allclose(seen[(True, 2)], seen[(False, 2)])


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "mixtral", "qwen2_moe"])
def test_record_inputs_counts_tokens_and_removes_hooks(model_type: str) -> None:
    model = tiny_model(model_type)
    ids = tiny_batch(2, 16)
    arch = describe(model)
    runner = LayerwiseRunner(model, arch, ids, device="cpu", progress=False)
    step = next(iter(runner.steps()))
    targets = layer_targets(step.layer, step.roles, step.prefix)
    stats = {t.name: InputStats(want_gram=True) for t in targets}
    with record_inputs(targets, stats):
        step.run()
    for t in targets:
        s = stats[t.name]
        if t.expert is None:
            assert s.tokens == 32
        assert s.gram is None or s.gram.shape == (t.shape[1], t.shape[1])
    routed = sum(stats[t.name].tokens for t in targets if t.input_kind == "expert_in")
    if arch.layers[0].experts is not None:
        assert routed == 32 * arch.layers[0].experts.top_k  # every token reaches top_k experts
    for module in step.layer.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


@pytest.mark.parametrize("model_type", TINY_ARCHS)
def test_stopping_after_the_last_input_records_the_same_statistics(model_type: str) -> None:
    model = tiny_model(model_type)
    ids = tiny_batch(6, 16)
    arch = describe(model)
    runner = LayerwiseRunner(model, arch, ids, device="cpu", batch_size=2, progress=False)
    for step in runner.steps():
        targets = layer_targets(step.layer, step.roles, step.prefix)
        full = {t.name: InputStats() for t in targets}
        early = {t.name: InputStats() for t in targets}
        completed: list[int] = []
        done = step.layer.register_forward_hook(lambda *_, seen=completed: seen.append(1))
        try:
            with record_inputs(targets, full):
                step.run()
            assert len(completed) == 3
            with record_inputs(targets, early, stop_in=step.layer):
                step.run()
        finally:
            done.remove()
        # only the first forward runs to the end; the statistics are the same
        assert len(completed) == 4, model_type
        for t in targets:
            assert early[t.name].tokens == full[t.name].tokens, t.name
            if full[t.name].sq_sum is not None:
                assert torch.equal(early[t.name].sq_sum, full[t.name].sq_sum), t.name
        for module in step.layer.modules():
            assert not module._forward_hooks and not module._forward_pre_hooks


def test_a_forward_stopped_early_cannot_keep_outputs() -> None:
    model = tiny_model("llama")
    arch = describe(model)
    runner = LayerwiseRunner(model, arch, tiny_batch(4, 8), device="cpu", batch_size=2, progress=False)
    step = next(iter(runner.steps()))
    targets = layer_targets(step.layer, step.roles, step.prefix)
    stats = {t.name: InputStats() for t in targets}
    with record_inputs(targets, stats, stop_in=step.layer), pytest.raises(RuntimeError, match="stopped early"):
        step.run(keep_outputs=True)


def test_final_outputs_can_be_skipped() -> None:
    model = tiny_model("llama")
    arch = describe(model)
    runner = LayerwiseRunner(model, arch, tiny_batch(2, 8), device="cpu", progress=False)
    last = arch.layer_modules(model)[-1]
    calls: list[int] = []
    hook = last.register_forward_hook(lambda *_: calls.append(1))
    try:
        for _ in runner.steps(final_outputs=False):
            pass
    finally:
        hook.remove()
    assert calls == [] and runner.final_hidden is None
    for _ in runner.steps():
        pass
    assert runner.final_hidden is not None and len(runner.final_hidden) == 1


def test_overwriting_inputs_gives_the_same_outputs() -> None:
    model = tiny_model("llama")
    arch = describe(model)
    ids = tiny_batch(4, 8)
    plain = LayerwiseRunner(model, arch, ids, device="cpu", batch_size=2, progress=False)
    for _ in plain.steps():
        pass
    in_place = LayerwiseRunner(model, arch, ids, device="cpu", batch_size=2, progress=False)
    kept = []
    for step in in_place.steps(overwrite_inputs=True):
        kept.append(step.inputs)
    assert in_place.final_hidden is not None and plain.final_hidden is not None
    for a, b in zip(in_place.final_hidden, plain.final_hidden, strict=True):
        assert torch.equal(a, b)
    assert all(k is kept[0] for k in kept)  # one list of activations, overwritten layer by layer


@pytest.mark.parametrize("model_type", TINY_ARCHS)
def test_shared_inputs_record_the_same_statistics_once(model_type: str) -> None:
    model = tiny_model(model_type)
    arch = describe(model)
    runner = LayerwiseRunner(model, arch, tiny_batch(4, 16), device="cpu", batch_size=2, progress=False)
    step = next(iter(runner.steps()))
    targets = layer_targets(step.layer, step.roles, step.prefix)
    alone = {t.name: InputStats(want_gram=True) for t in targets}
    shared = {t.name: InputStats(want_gram=True) for t in targets}
    with record_inputs(targets, alone):
        step.run()
    with record_inputs(targets, shared, stop_in=step.layer, share_inputs=True):
        step.run()
    for t in targets:
        a, s = alone[t.name], shared[t.name]
        assert s.tokens == a.tokens, t.name
        if a.tokens:
            torch.testing.assert_close(s.sq_sum, a.sq_sum)
            torch.testing.assert_close(s.gram, a.gram, rtol=1e-5, atol=1e-4)
    att, mlp = step.roles.attention, step.roles.mlp
    if att is not None and att.q is not None and att.k is not None and att.v is not None:
        by = {t.name[len(step.prefix) + 1:]: shared[t.name] for t in targets}
        assert by[att.q.path] is by[att.k.path] is by[att.v.path]  # one accumulator per distinct input
        assert by[att.o.path] is not by[att.q.path]
        if mlp is not None and mlp.gate is not None and mlp.up is not None:
            assert by[mlp.gate.path] is by[mlp.up.path] and by[mlp.down.path] is not by[mlp.up.path]


class _TwoReaders(torch.nn.Module):
    """``b`` reads ``a``'s input on the first call only: sharing must refuse it later."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.a(x) + self.b(x if self.calls == 1 else x + 0)


def test_shared_inputs_refuse_a_follower_fed_another_tensor() -> None:
    from pare.arch.targets import Target

    block = _TwoReaders()
    targets = [Target("a", block.a, "weight"), Target("b", block.b, "weight")]
    stats = {t.name: InputStats() for t in targets}
    x = torch.randn(3, 4)
    with torch.no_grad(), pytest.raises(RuntimeError, match="different input"), \
            record_inputs(targets, stats, share_inputs=True):
        block(x)
        block(x)
    assert not block.a._forward_pre_hooks and not block.b._forward_pre_hooks


def _tuple_returning_model(kind: str) -> torch.nn.Module:
    """Families outside the table whose decoder layers returned tuples when written (some still do,
    GPT-J stopped in transformers 5.24): the runner learns which from the real layers."""
    from transformers import AutoModelForCausalLM, BloomConfig, FalconConfig, GPTJConfig

    torch.manual_seed(0)
    cfg = {
        "gptj": GPTJConfig(n_embd=64, n_layer=3, n_head=4, rotary_dim=8, n_positions=128, vocab_size=256),
        "bloom": BloomConfig(hidden_size=64, n_layer=3, n_head=4, vocab_size=256),
        "falcon": FalconConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=256,
                               new_decoder_architecture=False, multi_query=True),
    }[kind]
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("kind", ["gptj", "bloom", "falcon"])
def test_runner_and_head_work_whatever_the_layers_return(kind: str) -> None:
    model = _tuple_returning_model(kind)
    ids = tiny_batch(4, 16) % 256
    with torch.no_grad():
        ref = model(ids).logits
    arch = describe(model)
    runner = LayerwiseRunner(model, arch, ids, device="cpu", batch_size=2, progress=False)
    steps = list(runner.steps())
    hidden = torch.cat(runner.final_hidden or [])
    assert hidden.shape == (4, 16, model.config.hidden_size)
    with torch.no_grad():  # fed back the way the real layers return (tuple or tensor), as ppl-window does
        head = logits_from_hidden(model, arch, ids, hidden, as_tuple=steps[0].returns_tuple)
    assert head.shape == ref.shape and (head - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("method", ["wanda", "shortgpt", "sublayer"])
@pytest.mark.parametrize("kind", ["gptj", "bloom", "falcon"])
def test_families_outside_the_table_prune_save_and_reload(kind: str, method: str, tmp_path) -> None:
    import pare
    from pare.methods import METHODS

    model = _tuple_returning_model(kind)
    ids = tiny_batch(4, 16) % 256
    cfg = METHODS[method].config_class()
    report = pare.prune(model, cfg, ids, runtime=pare.RuntimeConfig(progress=False, device="cpu"), batch_size=2)
    pare.save(model, None, tmp_path / "o", report)
    with torch.no_grad():
        assert torch.equal(pare.load(tmp_path / "o")(ids).logits, model(ids).logits)
