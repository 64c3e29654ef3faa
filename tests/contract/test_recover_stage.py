"""The recovery stage on tiny models: sparsity kept, exact resume, distillation, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pare
from pare.errors import ConfigError
from pare.io import read_manifest
from pare.methods.gradual import GradualConfig
from pare.methods.recover import RecoverConfig
from pare.pipeline import Pipeline
from tiny import tiny_batch, tiny_model

RT = pare.RuntimeConfig(device="cpu", progress=False)
pytest.importorskip("peft")


def _quick(**kw) -> RecoverConfig:
    opts = {"data": "calibration", "tokens": 192, "seqlen": 16, "batch_size": 2, "lr": 1e-2, "eval_windows": 1,
            "eval_every": 0}
    return RecoverConfig(**{**opts, **kw})


def _pruned(config: pare.PruneConfig, arch: str = "llama") -> tuple[torch.nn.Module, torch.Tensor, pare.Report]:
    model = tiny_model(arch)
    ids = tiny_batch(16, 16)
    report = pare.prune(model, config, ids, runtime=RT)
    return model, ids, report


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lora_with_zero_steps_changes_nothing() -> None:
    model, ids, _ = _pruned(pare.MagnitudeConfig(sparsity=0.5))
    before, names = _state(model), [n for n, _ in model.named_modules()]
    report = pare.run(model, [_quick(mode="lora", steps=0)], ids, runtime=RT)[0]
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert [n for n, _ in model.named_modules()] == names  # the adapters are gone
    assert report.scores["recovery"]["steps"] == 0
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


@pytest.mark.parametrize("masked", [False, True])
def test_lora_keeps_a_2_4_model_exactly_2_4(masked: bool) -> None:
    model, ids, _ = _pruned(pare.SparseGPTConfig(pattern="2:4"))
    before = _state(model)
    report = pare.run(model, [_quick(mode="lora", lora_masked=masked)], ids, runtime=RT)[0]
    changed = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            zeros = (mod.weight.reshape(-1, 4) == 0).sum(-1)
            assert bool((zeros == 2).all()), name
            changed += int((mod.weight != before[f"{name}.weight"]).sum())
    assert changed > 0  # the merge did change the kept weights
    assert report.scores["recovery"]["zeros_kept"] and report.overall_sparsity == 0.5


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_recovery_keeps_the_zeros_of_an_unstructured_model(mode: str) -> None:
    model, ids, _ = _pruned(pare.WandaConfig(sparsity=0.6))
    zeros = {k: v == 0 for k, v in _state(model).items() if ".layers." in k and v.dim() == 2}
    pare.run(model, [_quick(mode=mode)], ids, runtime=RT)
    state = model.state_dict()
    for k, z in zeros.items():
        assert torch.equal(state[k] == 0, z), k


def test_without_keep_zeros_the_lora_merge_fills_them() -> None:
    model, ids, _ = _pruned(pare.MagnitudeConfig(sparsity=0.5))
    pare.run(model, [_quick(mode="lora", keep_zeros=False)], ids, runtime=RT)
    w = model.model.layers[0].mlp.down_proj.weight
    assert float((w == 0).float().mean()) < 0.1


@pytest.mark.parametrize(("mode", "extra"), [("lora", {"lora_dropout": 0.1}), ("full", {})])
def test_a_resumed_run_equals_an_uninterrupted_one_bitwise(mode: str, extra: dict, tmp_path: Path) -> None:
    model, ids, _ = _pruned(pare.MagnitudeConfig(sparsity=0.5))
    start = _state(model)
    cfg = _quick(mode=mode, steps=6, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=2, **extra)

    whole = tiny_model("llama")
    whole.load_state_dict(start)
    pare.run(whole, [_quick(mode=mode, steps=6, **extra)], ids, runtime=RT)

    killed = tiny_model("llama")
    killed.load_state_dict(start)
    pipe = Pipeline(killed, [cfg], RT)

    def stop(step: int) -> None:
        if step == 5:
            raise KeyboardInterrupt

    pipe.stages[0].on_step = stop  # type: ignore[attr-defined]
    with pytest.raises(KeyboardInterrupt):
        pipe.run(ids, None, 2)
    assert (tmp_path / "ckpt" / "recover-state.pt").is_file()

    resumed = tiny_model("llama")
    resumed.load_state_dict(start)
    rep = pare.run(resumed, [RecoverConfig.from_dict({**cfg.to_dict(), "resume": True})], ids, runtime=RT)[0]
    assert rep.scores["recovery"]["resumed_from_step"] == 4
    want = whole.state_dict()
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_resume_without_a_checkpoint_is_an_error(tmp_path: Path) -> None:
    model, ids, _ = _pruned(pare.MagnitudeConfig(sparsity=0.5))
    with pytest.raises(ConfigError, match="nothing to resume"):
        pare.run(model, [_quick(mode="full", checkpoint_dir=str(tmp_path / "none"), resume=True)], ids, runtime=RT)


@pytest.mark.parametrize("train", ["lora", "full"])
def test_distilling_a_model_into_itself_has_zero_loss(train: str, tmp_path: Path) -> None:
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "teacher")
    before = _state(model)
    ids = tiny_batch(16, 16)
    report = pare.run(model, [_quick(mode="distill", teacher=str(tmp_path / "teacher"), distill_train=train,
                                     steps=3, lr=1e-5)], ids, runtime=RT)[0]
    rec = report.scores["recovery"]
    assert rec["loss_first"] == 0.0  # identical logits: exactly zero
    # the gradient is zero up to rounding (softmax sums to 1 only to float precision), and Adam scales even
    # rounding-sized gradients to lr-sized steps: the later losses stay at rounding level
    assert rec["loss_last"] < 1e-6
    assert all(torch.allclose(v, before[k], atol=1e-4) for k, v in model.state_dict().items())


def test_distillation_with_hidden_states_maps_the_kept_layers(tmp_path: Path) -> None:
    teacher = tiny_model("llama", num_hidden_layers=4)
    teacher.save_pretrained(tmp_path / "teacher")
    model = tiny_model("llama", num_hidden_layers=4)
    ids = tiny_batch(16, 16)
    reports = pare.run(model, [pare.LayersConfig(layers="1"),
                               _quick(mode="distill", teacher=str(tmp_path / "teacher"), hidden_weight=1.0)],
                       ids, runtime=RT)
    rec = reports[1].scores["recovery"]
    assert rec["loss_last"] < rec["loss_first"]
    pare.save(model, None, tmp_path / "out", reports)
    manifest = read_manifest(tmp_path / "out") or {}
    assert [s["method"] for s in manifest["stages"]] == ["layers", "recover"]
    with torch.no_grad():
        assert torch.equal(pare.load(tmp_path / "out")(ids).logits, model(ids).logits)


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path: Path) -> None:
    tiny_model("llama", vocab_size=96).save_pretrained(tmp_path / "teacher")
    model, ids, _ = _pruned(pare.MagnitudeConfig(sparsity=0.5))
    before = _state(model)
    with pytest.raises(ConfigError, match="vocabulary of 96 tokens"):
        pare.run(model, [_quick(mode="distill", teacher=str(tmp_path / "teacher"))], ids, runtime=RT)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_lora_target_that_matches_nothing_is_refused_before_any_work() -> None:
    model, ids, _ = _pruned(pare.MagnitudeConfig(sparsity=0.5))
    with pytest.raises(ConfigError, match="matches no"):
        pare.run(model, [_quick(mode="lora", targets=("nothing_like_this",))], ids, runtime=RT)


@pytest.mark.parametrize(("options", "match"), [
    ({"tokens": 0}, "tokens must be a positive"), ({"mode": "qlora"}, "mode must be one of"),
    ({"mode": "distill"}, "needs the unpruned model"), ({"lora_masked": True, "lora_dropout": 0.1}, "lora_dropout=0"),
    ({"resume": True}, "checkpoint_dir"), ({"data": ""}, "data must name"),
    # an option the chosen training would ignore is refused rather than dropped silently
    ({"mode": "full", "targets": ("mlp",)}, "targets would be ignored"), ({"mode": "full", "lora_r": 4}, "lora_r"),
    ({"mode": "distill", "teacher": "t", "distill_train": "full", "lora_masked": True}, "lora_masked would be"),
    ({"mode": "lora", "temperature": 4.0}, "temperature would be ignored"),
])
def test_bad_options_are_clear_errors(options: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RecoverConfig(**options)


def test_tokens_may_be_given_as_on_the_command_line() -> None:
    assert RecoverConfig.from_dict({"tokens": "2M"}).tokens == 2_000_000
    assert RecoverConfig.from_dict({"tokens": "1.5e5"}).tokens == 150_000
    with pytest.raises(ConfigError, match="number of tokens such as"):
        RecoverConfig.from_dict({"tokens": "2 million"})
    with pytest.raises(ConfigError, match="tokens must be a positive"):
        RecoverConfig.from_dict({"tokens": "0k"})


def test_recover_after_a_2_4_prune_saves_with_the_history(tmp_path: Path) -> None:
    model, ids, prune_report = _pruned(pare.SparseGPTConfig(pattern="2:4"))
    rec = pare.run(model, [_quick(mode="lora")], ids, runtime=RT, history=[prune_report])[0]
    assert rec.pattern == "2:4"
    pare.save(model, None, tmp_path / "o", [prune_report, rec])
    manifest = read_manifest(tmp_path / "o") or {}
    assert [s["method"] for s in manifest["stages"]] == ["sparsegpt", "recover"] and manifest["pattern"] == "2:4"
    assert manifest["scores"]["recovery"]["mode"] == "lora"
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "o")(ids).logits, model(ids).logits)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_gradual_pruning_reaches_the_final_sparsity_with_nested_masks(method: str) -> None:
    model = tiny_model("llama")
    ids = tiny_batch(16, 16)
    cfg = GradualConfig(prune={method: {}}, final_sparsity=0.6, prune_steps=3,
                        recover={"mode": "full", "data": "calibration", "tokens": "64", "seqlen": 16, "lr": 1e-2})
    report = pare.run(model, [cfg], ids, runtime=RT)[0]
    rounds = report.scores["gradual"]["rounds"]
    assert [r["sparsity"] for r in rounds] == pytest.approx(cfg.sparsities()) and rounds[-1]["sparsity"] == 0.6
    assert report.overall_sparsity == pytest.approx(0.6, abs=0.01)
    assert all(r["recovery"]["zeros_kept"] and r["earlier_zeros_kept"] for r in rounds)
    assert all(r["recovery"]["tokens"] == 64 for r in rounds)


@pytest.mark.parametrize(("prune", "match"), [({"sparsegpt": {"pattern": "2:4"}}, "unstructured"),
                                               ({"osscar": {}}, "sparsity method"), ({"nope": {}}, "unknown method")])
def test_gradual_refuses_what_it_cannot_schedule(prune: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        GradualConfig(prune=prune)


@pytest.mark.parametrize("arch", ["gpt2", "phi3", "mixtral"])  # Conv1D, fused projections, MoE
def test_lora_keeps_zeros_and_reloads_on_other_families(arch: str, tmp_path: Path) -> None:
    model, ids, prune_report = _pruned(pare.MagnitudeConfig(sparsity=0.5), arch)
    ids = ids % 100
    zeros = {k: v == 0 for k, v in _state(model).items() if v.dim() >= 2 and v.shape[-1] != 128}
    rec = pare.run(model, [_quick(mode="lora", lora_masked=True)], ids, runtime=RT, history=[prune_report])[0]
    assert rec.scores["recovery"]["zeros_kept"]
    state = model.state_dict()
    assert all(torch.equal(state[k] == 0, z) for k, z in zeros.items())
    pare.save(model, None, tmp_path / "o", [prune_report, rec])
    with torch.no_grad():
        assert torch.equal(pare.load(tmp_path / "o")(ids).logits, model(ids).logits)
