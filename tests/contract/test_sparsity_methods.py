"""Magnitude, Wanda and SparseGPT through the whole path, on every tiny architecture.

prune (4 calibration windows of 32 tokens) -> the report's per-module sparsity equals the zeros
counted in the parameters -> save -> ``AutoModelForCausalLM.from_pretrained`` gives identical logits.
"""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM

import pare
from pare.errors import ConfigError, NotEnoughDataError
from tiny import TINY_ARCHS, tiny_batch, tiny_model

QUIET = pare.RuntimeConfig(progress=False, device="cpu")
CONFIGS = {"magnitude": pare.MagnitudeConfig, "wanda": pare.WandaConfig, "sparsegpt": pare.SparseGPTConfig}
SETTINGS = {"unstructured-0.5": dict(sparsity=0.5), "2:4": dict(pattern="2:4")}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one thread avoids OpenMP contention on a shared machine (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def calib() -> torch.Tensor:
    return tiny_batch(4, 32, seed=1)


def weight_of(model: torch.nn.Module, name: str) -> torch.Tensor:
    """A module's ``[out, in]`` weight found independently of pare's target code."""
    m = re.fullmatch(r"(.+)\[(\d+)\]", name)
    if m:  # one expert of a fused 3-D parameter
        return model.get_parameter(m.group(1))[int(m.group(2))]
    module = model.get_submodule(name)
    w = module.weight
    return w.t() if type(module).__name__ == "Conv1D" else w


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("model_type", TINY_ARCHS)
def test_prune_report_save_reload(model_type: str, method: str, setting: str, tmp_path) -> None:
    model = tiny_model(model_type)
    report = pare.prune(model, CONFIGS[method](**SETTINGS[setting]), calib(), runtime=QUIET)
    assert report.modules
    for name, info in report.modules.items():
        w = weight_of(model, name)
        zeros = int((w == 0).sum())
        assert info["nonzero"] == w.numel() - zeros, name
        assert info["sparsity"] == pytest.approx(zeros / w.numel(), abs=1e-12), name
        if setting == "2:4":
            per_group = (w == 0).reshape(w.shape[0], -1, 4).sum(-1)
            assert bool((per_group == 2).all()), name
        elif method == "magnitude":  # the whole matrix is one comparison group by default
            assert int((w == 0).sum()) == w.numel() // 2, name
        else:  # Wanda per row; SparseGPT per row of each block, floor-allocated: same total
            assert bool(((w == 0).sum(1) == w.shape[1] // 2).all()), name
    assert report.pattern == (None if setting != "2:4" else "2:4")
    assert [r["layer"] for r in report.scores["layers"]] == list(range(3))
    fresh = tiny_model(model_type)  # the same seeded weights, unpruned (zero biases, padding rows...)
    assert report.figures["nonzero_before"] == sum(int((p != 0).sum()) for p in fresh.parameters())
    assert report.figures["nonzero_after"] == sum(int((p != 0).sum()) for p in model.parameters())
    out = pare.save(model, None, tmp_path / "out", report)
    ids = tiny_batch(2, 16, seed=2)
    with torch.no_grad():
        ref = model(ids).logits
        reloaded = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    assert torch.isfinite(ref).all()
    assert torch.equal(ref, reloaded)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_owl_profile_keeps_overall_sparsity(method: str) -> None:
    model = tiny_model("llama")
    cfg = CONFIGS[method](sparsity=0.7, profile="owl", owl_lambda=0.08)
    report = pare.prune(model, cfg, calib(), runtime=QUIET)
    owl = report.scores["owl"]
    ratios = owl["layer_sparsity"]
    assert len(ratios) == 3 and max(ratios) - min(ratios) == pytest.approx(0.16, abs=1e-9)
    rows = report.scores["layers"]
    weighted = sum(r["target"] * r["numel"] for r in rows) / sum(r["numel"] for r in rows)
    assert weighted == pytest.approx(0.7, abs=1e-9)
    # exact counts: floor(in * s) zeros in every row (magnitude: floor(numel * s) in the matrix)
    for name, info in report.modules.items():
        out_f, in_f = info["shape"]
        s = ratios[int(name.split(".")[2])]
        expected = int(out_f * in_f * s) if method == "magnitude" else out_f * int(in_f * s)
        assert info["numel"] - info["nonzero"] == expected, name
    assert report.overall_sparsity == pytest.approx(0.7, abs=1 / 64)
    for row in rows:  # per-layer measured sparsity, from the per-module report
        mods = [m for n, m in report.modules.items() if n.startswith(f"model.layers.{row['layer']}.")]
        zeros = sum(m["numel"] - m["nonzero"] for m in mods)
        assert sum(m["numel"] for m in mods) == row["numel"]
        assert zeros / row["numel"] == pytest.approx(row["target"], abs=1 / 32)


@pytest.mark.parametrize("leave_out", [dict(ignore=(r"layers\.2\.",)), dict(module_sparsity={r"layers\.0\.": 0.3})])
@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_owl_spreads_over_the_layers_it_prunes(method: str, leave_out: dict) -> None:
    """A layer with nothing under the layer ratio (ignored, or set by module_sparsity) takes no part
    in OWL's min-max scaling: the others still span 2 * lambda around the target."""
    model = tiny_model("llama")
    report = pare.prune(model, CONFIGS[method](sparsity=0.7, profile="owl", **leave_out), calib(), runtime=QUIET)
    ratios = report.scores["owl"]["layer_sparsity"]
    outside = 2 if "ignore" in leave_out else 0
    assert ratios[outside] is None
    governed = [r for r in ratios if r is not None]
    assert len(governed) == 2 and max(governed) - min(governed) == pytest.approx(0.16, abs=1e-9)
    rows = [r for r in report.scores["layers"] if r["layer"] != outside]
    assert sum(r["target"] * r["numel"] for r in rows) / sum(r["numel"] for r in rows) == pytest.approx(0.7, abs=1e-9)
    if outside == 0:
        assert report.modules["model.layers.0.mlp.up_proj"]["sparsity"] == pytest.approx(0.3, abs=1 / 64)
    else:
        assert not any(n.startswith("model.layers.2.") for n in report.modules)


@pytest.mark.parametrize("sequential", [True, False])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("model_type", ["llama", "mixtral"])
def test_owl_equals_the_same_ratios_given_explicitly(method: str, model_type: str, sequential: bool) -> None:
    # OWL keeps the first layer's statistics from its scoring pass: the pruning must not change
    runtime = pare.RuntimeConfig(progress=False, device="cpu", sequential=sequential)
    owl_model = tiny_model(model_type)
    report = pare.prune(owl_model, CONFIGS[method](sparsity=0.7, profile="owl"), calib(), runtime=runtime)
    ratios = tuple(report.scores["owl"]["layer_sparsity"])
    explicit = tiny_model(model_type)
    pare.prune(explicit, CONFIGS[method](layer_sparsity=ratios), calib(), runtime=runtime)
    for (name, a), (_, b) in zip(owl_model.named_parameters(), explicit.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_chained_runs_count_every_zero() -> None:
    model = tiny_model("llama")
    first = pare.prune(model, pare.MagnitudeConfig(sparsity=0.5, targets=(r"self_attn",)), runtime=QUIET)
    second = pare.prune(model, pare.MagnitudeConfig(sparsity=0.6, targets=(r"mlp",)), runtime=QUIET)
    assert second.figures["nonzero_before"] == first.figures["nonzero_after"] < first.figures["nonzero_before"]
    assert second.figures["nonzero_after"] == sum(int((p != 0).sum()) for p in model.parameters())
    assert second.figures["nonzero_after"] < second.figures["nonzero_before"]


def test_non_zeros_after_when_some_experts_are_left_out() -> None:
    model = tiny_model("mixtral")
    cfg = pare.WandaConfig(sparsity=0.5, ignore=(r"experts\.down_proj\[1\]",))
    report = pare.prune(model, cfg, calib(), runtime=QUIET)
    assert not any(n.endswith("down_proj[1]") for n in report.modules)
    assert report.figures["nonzero_after"] == sum(int((p != 0).sum()) for p in model.parameters())


def test_explicit_layer_and_module_ratios() -> None:
    model = tiny_model("llama")
    cfg = pare.WandaConfig(sparsity=0.5, layer_sparsity=(0.25, 0.5, 0.75), module_sparsity={r"\.1\.mlp\.down": 0.0})
    report = pare.prune(model, cfg, calib(), runtime=QUIET)
    assert report.modules["model.layers.0.self_attn.q_proj"]["sparsity"] == 0.25
    assert report.modules["model.layers.2.mlp.up_proj"]["sparsity"] == 0.75
    assert report.modules["model.layers.1.mlp.down_proj"]["sparsity"] == 0.0
    assert report.modules["model.layers.1.mlp.up_proj"]["sparsity"] == 0.5


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_dense_inputs_option_changes_later_layers_only(method: str) -> None:
    results = {}
    for sequential in (True, False):
        model = tiny_model("llama")
        rt = pare.RuntimeConfig(progress=False, device="cpu", sequential=sequential)
        pare.prune(model, CONFIGS[method](sparsity=0.5), calib(), runtime=rt)
        results[sequential] = model
    a, b = (results[s].model.layers for s in (True, False))
    assert torch.equal(a[0].self_attn.q_proj.weight, b[0].self_attn.q_proj.weight)  # same inputs
    assert not torch.equal(a[2].mlp.down_proj.weight, b[2].mlp.down_proj.weight)  # pruned vs dense inputs


@pytest.mark.parametrize("cls", list(CONFIGS.values()))
@pytest.mark.parametrize("bad", [1.0, 1.2, -0.1])
def test_bad_sparsity(cls, bad) -> None:
    with pytest.raises(ConfigError, match="sparsity"):
        cls(sparsity=bad)


@pytest.mark.parametrize("pattern", ["4:4", "5:4", "0:4"])
def test_bad_nm(pattern: str) -> None:
    with pytest.raises(ConfigError, match="N < M"):
        pare.SparseGPTConfig(pattern=pattern)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(profile="owlish"), "profile"),
        (dict(profile="owl", layer_sparsity=(0.5, 0.5, 0.5)), "layer_sparsity"),
        (dict(pattern="2:4", profile="owl"), "apply to pattern='unstructured' only"),
        (dict(layer_sparsity=(0.5, 1.0, 0.5)), r"layer_sparsity\[1\]"),
        (dict(module_sparsity={"mlp": 1.5}), "module_sparsity"),
        (dict(module_sparsity={"(": 0.5}), "regular expression"),
        (dict(owl_m=0), "owl_m"),
        (dict(blocksize=0), "blocksize"),
        (dict(pattern="2:4", blocksize=30), "multiple of M=4"),
        (dict(percdamp=-1), "percdamp"),
        (dict(pattern="2:4", sparsity=0.7), r"prunes 2 of every 4 weights \(sparsity 0.5\): drop sparsity=0.7"),
        (dict(layer_sparsity=(0.1, 0.2, 0.3), sparsity=0.9), "sparsity=0.9 would be ignored"),
    ],
)
def test_bad_options(kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        pare.SparseGPTConfig(**kwargs)


def test_an_nm_pattern_records_its_own_sparsity() -> None:
    assert pare.WandaConfig(pattern="1:4").sparsity == 0.25
    assert pare.WandaConfig(pattern="2:4", sparsity=0.5).to_dict()["sparsity"] == 0.5
    assert pare.MagnitudeConfig.from_dict(pare.MagnitudeConfig(pattern="4:8").to_dict()).sparsity == 0.5


@pytest.mark.parametrize("method", ["osscar", "width", "shortgpt", "layers", "ppl-window", "sublayer", "angular"])
def test_structured_methods_do_not_take_module_regexes(method: str) -> None:
    from pare.methods import METHODS

    with pytest.raises(ConfigError, match="no option"):
        METHODS[method].config_class.from_dict({"targets": ["mlp"]})


@pytest.mark.parametrize(
    "cfg,match",
    [
        (pare.WandaConfig(targets=("nonexistent_proj",)), "matches no prunable module"),
        (pare.WandaConfig(module_sparsity={"nonexistent_proj": 0.5}), "matches no pruned module"),
        (pare.SparseGPTConfig(layer_sparsity=(0.5, 0.5)), "one value per layer"),
    ],
)
def test_errors_that_need_the_model(cfg, match) -> None:
    with pytest.raises(ConfigError, match=match):
        pare.prune(tiny_model("llama"), cfg, calib(), runtime=QUIET)


def test_calibration_needed_and_not_longer_than_the_context() -> None:
    with pytest.raises(ConfigError, match="needs calibration data"):
        pare.prune(tiny_model("llama"), pare.WandaConfig(), runtime=QUIET)
    with pytest.raises(ConfigError, match="longer than the model's context"):
        pare.prune(tiny_model("llama"), pare.WandaConfig(), tiny_batch(1, 300), runtime=QUIET)


@pytest.mark.parametrize(("ids", "match"), [
    (tiny_batch(2, 16).flatten(), "2-D integer tensor"),
    (tiny_batch(2, 16).float(), "2-D integer tensor"),
    (torch.zeros(0, 16, dtype=torch.long), "2-D integer tensor"),
    (tiny_batch(2, 16) + 1000, "embedding has 128 rows"),
    (tiny_batch(2, 16) - 1000, "run from -"),
])
def test_calibration_ids_that_cannot_feed_the_model(ids: torch.Tensor, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        pare.prune(tiny_model("llama"), pare.WandaConfig(), ids, runtime=QUIET)


def test_a_config_that_is_not_a_method_config() -> None:
    with pytest.raises(ConfigError, match="from_dict"):
        pare.prune(tiny_model("llama"), {"method": "wanda", "sparsity": 0.5}, calib(), runtime=QUIET)  # type: ignore[arg-type]


@pytest.mark.parametrize(("method", "match"), [("wanda", "activations hold NaN or inf"),
                                               ("sparsegpt", "Hessian holds NaN or inf")])
def test_overflowing_activations_are_a_clear_error(method: str, match: str) -> None:
    from pare.errors import PareError

    model = tiny_model("llama").to(torch.float16)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(3e4)  # its product with gate passes float16's 65504
    with pytest.raises(PareError, match=match) as info:
        pare.prune(model, CONFIGS[method](), calib(), runtime=QUIET)
    assert "--dtype" in str(info.value)


def test_a_module_ratio_that_never_wins_is_refused() -> None:
    shadowed = pare.WandaConfig(module_sparsity={r"mlp": 0.7, r"down_proj": 0.3})
    with pytest.raises(ConfigError, match="'down_proj' never applies"):
        pare.prune(tiny_model("llama"), shadowed, calib(), runtime=QUIET)
    ordered = pare.WandaConfig(module_sparsity={r"down_proj": 0.3, r"mlp": 0.7})
    report = pare.prune(tiny_model("llama"), ordered, calib(), runtime=QUIET)
    assert report.modules["model.layers.0.mlp.down_proj"]["sparsity"] == pytest.approx(0.3, abs=1 / 64)
    assert report.modules["model.layers.0.mlp.up_proj"]["sparsity"] == pytest.approx(0.7, abs=1 / 64)


@pytest.mark.parametrize(("content", "match"), [("Once upon a time there was a tiny text.\n", "token"),
                                                ("", "empty")])
def test_calibration_shorter_than_asked(tmp_path, shared_data, content: str, match: str) -> None:
    from transformers import AutoTokenizer

    tok_dir = shared_data.parent / "tokenizers" / "gpt2"
    if not tok_dir.is_dir():
        pytest.skip("gpt2 tokenizer not in ../shared")
    text = tmp_path / "short.txt"
    text.write_text(content)
    with pytest.raises(NotEnoughDataError, match=match):
        pare.prune(tiny_model("llama"), pare.WandaConfig(), pare.CalibrationConfig(str(text), nsamples=4, seqlen=32),
                   tokenizer=AutoTokenizer.from_pretrained(tok_dir), runtime=QUIET)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_dense_inputs_mode_prunes_with_the_dense_models_statistics(model_type: str) -> None:
    from pare.ops.wanda import wanda_mask

    model = tiny_model(model_type)
    dense = tiny_model(model_type)
    ids = calib()
    runtime = pare.RuntimeConfig(progress=False, device="cpu", sequential=False)
    report = pare.prune(model, pare.WandaConfig(sparsity=0.5), ids, runtime=runtime)
    sq: dict[str, torch.Tensor] = {}

    def hook(_m, args, name):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        sq[name] = sq.get(name, 0) + x.pow(2).sum(0)

    handles = [m.register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n))
               for n, m in dense.named_modules() if n in {k.rsplit("[", 1)[0] for k in report.modules}]
    with torch.no_grad():
        dense(ids)
    for h in handles:
        h.remove()
    assert len(sq) == len(report.modules)
    for name in report.modules:
        expected = wanda_mask(weight_of(dense, name), sq[name].sqrt(), 0.5)
        assert torch.equal(weight_of(model, name) == 0, expected), name
