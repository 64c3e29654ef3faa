"""Several compute devices: the calibration batches split across replicas of the current layer.

Without GPUs the runner's internal API takes a repeated CPU device (``["cpu", "cpu"]``), so the
split, the per-replica statistics and their sums run here exactly as on GPUs (only the replicas'
forwards run one after another instead of concurrently). The statistics are summed in another order
than on one device, so weights agree to rounding: masks equal, weights within ``rtol=1e-4,
atol=1e-5`` (fp32 tiny models).

SparseGPT's unstructured mask can flip a weight at a near-tie under any reordering of the sums: on
the tiny GPT-2 (8 windows, batches of 2, sequential) 4 of the 16384 weights of ``h.1.mlp.c_proj``
flip (then more in layer 2), and exactly as many flip on one device when the batch size goes from
2 to 1. The whole-model comparisons therefore run on families without such a tie at these settings.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import pare
import pare.calibration.replicas as replicas_module
from pare.arch import describe
from pare.arch.targets import layer_targets
from pare.calibration.replicas import batch_shares
from pare.calibration.runner import LayerwiseRunner
from pare.calibration.stats import InputStats, RouterWeightedStats
from pare.errors import ConfigError
from pare.hooks import removed_after
from pare.methods.wanda import WandaPruner
from pare.pipeline import Pipeline
from pare.stream import StreamConfig, plan_stream, stream_prune
from tiny import tiny_batch, tiny_model

RUNTIME = pare.RuntimeConfig(device="cpu", progress=False)
RTOL, ATOL = 1e-4, 1e-5
CUDA_PAIR = torch.cuda.is_available() and torch.cuda.device_count() >= 2


@pytest.fixture
def copies(monkeypatch: pytest.MonkeyPatch) -> list[torch.device]:
    """The devices of every replica the runner makes (the split did happen)."""
    made: list[torch.device] = []
    real = replicas_module.replicate

    def counted(layer, device):
        made.append(device)
        return real(layer, device)

    monkeypatch.setattr(replicas_module, "replicate", counted)
    return made


def assert_same_up_to_rounding(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k] == 0, b[k] == 0), f"{k}: the masks differ"
        torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=ATOL, msg=k)


def test_batch_shares_are_contiguous_and_even() -> None:
    assert batch_shares(5, 2) == [range(0, 3), range(3, 5)]
    assert batch_shares(4, 3) == [range(0, 2), range(2, 3), range(3, 4)]
    assert batch_shares(1, 3) == [range(0, 1), range(1, 1), range(1, 1)]


@pytest.mark.parametrize("kind", [InputStats, RouterWeightedStats])
def test_merged_statistics_equal_recording_every_token(kind) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 300, generator=g)  # wider than a Gram strip: the upper block triangle is summed
    whole, parts = kind(want_gram=True), [kind(want_gram=True) for _ in range(3)]
    for b in range(3):
        whole.add(x[b])
        parts[b].add(x[b])
    _ = parts[0].gram  # one side already mirrored: the sum must not count its lower half
    parts[0].merge_(parts[1], torch.device("cpu"))
    parts[0].merge_(parts[2], torch.device("cpu"))
    parts[0].merge_(kind(want_gram=True), torch.device("cpu"))  # a replica that saw no token adds nothing
    assert parts[0].tokens == whole.tokens == 120
    torch.testing.assert_close(parts[0].sq_sum, whole.sq_sum, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(parts[0].gram, whole.gram, rtol=1e-5, atol=1e-3)
    assert torch.equal(parts[0].gram, parts[0].gram.t())
    with pytest.raises(ValueError, match="cannot add"):
        InputStats().merge_(InputStats(want_gram=True), torch.device("cpu"))


def test_every_replica_records_its_share_and_the_sums_reach_the_first(copies) -> None:
    model = tiny_model("llama")
    arch = describe(model)
    ids = tiny_batch(6, 16)
    runner = LayerwiseRunner(model, arch, ids, devices=["cpu", "cpu", "cpu"], batch_size=2, progress=False)
    step = next(iter(runner.steps()))
    seen: dict[int, int] = {}
    targets = layer_targets(step.layer, step.roles, step.prefix)
    assert step.replicas is not None and [len(s) for s in step.replicas.shares] == [1, 1, 1]
    with removed_after() as handles:
        for k, layer in enumerate(step.replicas.layers()):
            handles.append(layer.register_forward_pre_hook(lambda *_a, k=k: seen.__setitem__(k, seen.get(k, 0) + 1)))
        stats, _ = step.record(targets, lambda _t: InputStats(want_gram=True))
    assert seen == {0: 1, 1: 1, 2: 1}  # one batch each
    assert len(copies) == 2  # the first device holds the layer itself
    assert all(s.tokens == 6 * 16 for s in stats.values())
    one = LayerwiseRunner(tiny_model("llama"), arch, ids, device="cpu", batch_size=2, progress=False)
    ref_step = next(iter(one.steps()))
    ref, _ = ref_step.record(
        layer_targets(ref_step.layer, ref_step.roles, ref_step.prefix), lambda _t: InputStats(want_gram=True)
    )
    for name, s in stats.items():
        torch.testing.assert_close(s.gram, ref[name].gram, rtol=1e-5, atol=1e-4)
    assert stats["model.layers.0.self_attn.q_proj"] is stats["model.layers.0.self_attn.k_proj"]  # still shared


@pytest.mark.parametrize("arch", ["llama", "opt", "mixtral"])
@pytest.mark.parametrize(
    "config", [pare.WandaConfig(sparsity=0.5), pare.SparseGPTConfig(sparsity=0.5)], ids=["wanda", "sparsegpt"]
)
def test_split_in_memory_equals_one_device(arch: str, config, copies) -> None:
    ids = tiny_batch(8, 16)  # 4 batches: two per device, summed in another order than on one device
    one, two = tiny_model(arch), tiny_model(arch)
    Pipeline(one, [config], RUNTIME).run(ids, batch_size=2)
    reports = Pipeline(two, [config], RUNTIME, devices=["cpu", "cpu"]).run(ids, batch_size=2)
    assert len(copies) == describe(two).num_layers  # one replica per layer, on the second device
    assert reports[0].runtime["devices"] == ["cpu", "cpu"]
    assert_same_up_to_rounding(one.state_dict(), two.state_dict())


@pytest.mark.parametrize(
    "config",
    [
        pare.QuantizeConfig(algorithm="gptq", group_size=0),
        pare.SparseGPTConfig(pattern="2:4"),
        pare.WandaConfig(profile="owl"),
        pare.MagnitudeConfig(),
        pare.QuantizeConfig(group_size=0),
    ],
    ids=["gptq", "sparsegpt-2:4", "wanda-owl", "magnitude", "rtn"],
)
def test_other_covered_stages_split_too(config) -> None:
    ids = tiny_batch(6, 16)
    one, three = tiny_model("llama"), tiny_model("llama")
    Pipeline(one, [config], RUNTIME).run(ids, batch_size=1)
    Pipeline(three, [config], RUNTIME, devices=["cpu"] * 3).run(ids, batch_size=1)
    assert_same_up_to_rounding(one.state_dict(), three.state_dict())


def test_stages_that_cannot_split_are_refused_before_any_work() -> None:
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"stage 2 \(slicegpt\) cannot split its calibration batches.*--device cpu"):
        Pipeline(
            model, [pare.WandaConfig(), pare.config_from_dict({"method": "slicegpt"})], RUNTIME, devices=["cpu", "cpu"]
        )
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def saved(tmp_path: Path, arch: str) -> Path:
    src = tmp_path / f"src-{arch}"
    tiny_model(arch).save_pretrained(src, max_shard_size="40KB")
    return src


@pytest.mark.parametrize(
    ("arch", "method", "activations"),
    [
        ("llama", "wanda", "device"),
        ("llama", "sparsegpt", "disk"),
        ("qwen2_moe", "sparsegpt", "device"),
        ("qwen2_moe", "wanda", "disk"),
    ],
)
def test_split_streamed_equals_one_device(tmp_path: Path, arch: str, method: str, activations: str, copies) -> None:
    src = saved(tmp_path, arch)
    ids = tiny_batch(8, 16)
    config = pare.config_from_dict({"method": method, "sparsity": 0.5})
    one = AutoModelForCausalLM.from_pretrained(src).eval()
    Pipeline(one, [config], RUNTIME).run(ids, batch_size=2)
    plan = plan_stream(
        str(src),
        config,
        tmp_path / "o",
        ids,
        None,
        RUNTIME,
        StreamConfig(stream=True, activations=activations),
        batch_size=2,
        devices=["cpu", "cpu"],
    )
    report, out = stream_prune(plan, RUNTIME)
    assert report.runtime["devices"] == ["cpu", "cpu"]
    assert len(copies) == describe(one).num_layers  # one replica per layer, on the second device
    assert_same_up_to_rounding(one.state_dict(), AutoModelForCausalLM.from_pretrained(out).state_dict())


def test_streamed_split_is_refused_for_a_stage_that_cannot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # every stage that streams today also splits its batches: a stand-in reason checks the refusal's place
    monkeypatch.setattr(WandaPruner, "split_refusal", lambda self: "a stand-in reason")
    with pytest.raises(ConfigError, match=r"wanda cannot split its calibration batches.*a stand-in reason"):
        plan_stream(
            str(saved(tmp_path, "llama")),
            pare.WandaConfig(),
            tmp_path / "o",
            tiny_batch(4, 16),
            None,
            RUNTIME,
            StreamConfig(stream=True),
            devices=["cpu", "cpu"],
        )
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.stream").exists()


@pytest.mark.skipif(not CUDA_PAIR, reason="needs two CUDA devices")
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_two_gpus_equal_one(method: str) -> None:
    ids = tiny_batch(8, 16)
    config = pare.config_from_dict({"method": method, "sparsity": 0.5})
    one, two = tiny_model("llama"), tiny_model("llama")
    Pipeline(one, [config], pare.RuntimeConfig(device="cuda:0", progress=False)).run(ids, batch_size=2)
    runtime = pare.RuntimeConfig(devices=("cuda:0,cuda:1",), progress=False)
    report = Pipeline(two, [config], runtime).run(ids, batch_size=2)[0]
    assert report.runtime["devices"] == ["cuda:0", "cuda:1"]
    assert_same_up_to_rounding(one.state_dict(), two.state_dict())


def test_a_split_streamed_run_resumes_only_split_alike(tmp_path: Path) -> None:
    src = saved(tmp_path, "llama")
    ids = tiny_batch(8, 16)
    config = pare.SparseGPTConfig(sparsity=0.5)

    def streamed(out: Path, devices: list[str] | None, resume: bool = False, event=None) -> Path:
        plan = plan_stream(
            str(src), config, out, ids, None, RUNTIME, StreamConfig(stream=True), batch_size=2, devices=devices
        )
        return stream_prune(plan, RUNTIME, resume=resume, event=event)[1]

    def stop_after_layer_one(stage: str, layer: int) -> None:
        if (stage, layer) == ("recorded", 1):
            raise KeyboardInterrupt

    whole = streamed(tmp_path / "whole", ["cpu", "cpu"])
    with pytest.raises(KeyboardInterrupt):
        streamed(tmp_path / "o", ["cpu", "cpu"], event=stop_after_layer_one)
    with pytest.raises(ConfigError, match=r"other settings \(\['devices'\]\)"):
        streamed(tmp_path / "o", None, resume=True)  # one device would sum in another order
    out = streamed(tmp_path / "o", ["cpu", "cpu"], resume=True)
    a, b = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (whole, out))
    assert all(torch.equal(a[k], b[k]) for k in a)
