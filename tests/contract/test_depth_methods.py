"""Depth methods x tiny architectures: choices, reports, reload, generation, and errors."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import pare
from pare.arch import describe
from pare.config import RuntimeConfig
from pare.errors import ConfigError
from pare.methods import AngularConfig, LayersConfig, PplWindowConfig, ShortGPTConfig, SublayerConfig
from pare.methods.base import PruneContext
from pare.methods.ppl_window import window_scores
from pare.ops.similarity import angular_distance, token_cosine
from pare.report import Report
from tiny import TINY_ARCHS, tiny_batch, tiny_model

RT = RuntimeConfig(device="cpu", progress=False)
CALIB = tiny_batch(4, 16, seed=1)
LAYER_CONFIGS = [
    ShortGPTConfig(num_layers=1),
    AngularConfig(num_layers=2),
    PplWindowConfig(num_layers=1),
    LayersConfig(layers="1"),
]


def prune(model, config):
    return pare.prune(model, config, CALIB, runtime=RT, batch_size=2)


def greedy_matches_generate(model):
    ids = tiny_batch(1, 8, seed=5)
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        mask = torch.ones_like(ids)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        ref = ids
        for _ in range(4):
            nxt = model(input_ids=ref, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ref = torch.cat([ref, nxt], 1)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("arch_name", TINY_ARCHS)
def test_layer_methods_run_on_every_architecture(arch_name):
    for config in LAYER_CONFIGS:
        model = tiny_model(arch_name, num_hidden_layers=4)
        report = prune(model, config)
        k = 2 if isinstance(config, AngularConfig) else 1
        assert model.config.num_hidden_layers == 4 - k == len(describe(model).layers)
        assert len(report.scores["removed_layers"]) == k and report.scores["reason"]
        assert report.uniform and report.edits[0].op == "remove_layers"
        assert report.figures["params_after"] < report.figures["params_before"]


@pytest.mark.parametrize("arch_name", ["llama", "gemma3_text", "gpt_neox", "gpt2", "qwen2_moe"])
def test_pruned_model_generates_and_reloads(arch_name, tmp_path):
    model = tiny_model(arch_name, num_hidden_layers=4)
    report = prune(model, ShortGPTConfig(num_layers=1))
    greedy_matches_generate(model)
    pare.save(model, None, tmp_path / "m", report)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = tiny_batch(2, 10)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("arch_name", TINY_ARCHS)
def test_ppl_window_proxy_equals_exact(arch_name):
    model = tiny_model(arch_name, num_hidden_layers=4)
    ctx = PruneContext(model, describe(model), CALIB, RT, Report("ppl-window", {}), batch_size=2)
    base_p, proxy, _ = window_scores(ctx, CALIB, 2, "proxy")
    base_e, exact, _ = window_scores(ctx, CALIB, 2, "exact")
    base_b, bound, complete = window_scores(ctx, CALIB, 2, "bound")
    assert len(proxy) == 3 and base_b == base_p
    for p, b, c in zip(proxy, bound, complete, strict=True):
        assert (b == p) if c else (b <= p)  # abandoned windows carry a lower bound
    assert min((s for s in range(3) if complete[s]), key=bound.__getitem__) == min(range(3), key=proxy.__getitem__)
    assert math.isclose(base_p, base_e, rel_tol=1e-5)
    for p, e in zip(proxy, exact, strict=True):
        assert math.isclose(p, e, rel_tol=1e-5)
    assert min(range(3), key=proxy.__getitem__) == min(range(3), key=exact.__getitem__)


@pytest.mark.parametrize("arch_name", ["llama", "gpt2", "mixtral"])
def test_ppl_window_halving_scores_survivors_on_everything(arch_name):
    model = tiny_model(arch_name, num_hidden_layers=6)
    ids = tiny_batch(8, 16, seed=3)
    ctx = PruneContext(model, describe(model), ids, RT, Report("ppl-window", {}), batch_size=2)
    _, proxy, _ = window_scores(ctx, ids, 2, "proxy")
    # first slice = 1 of 4 batches; keep 2 of 5 windows
    base_h, halving, full = window_scores(ctx, ids, 2, "halving", first=0.25, keep=0.25)
    assert sum(full) == 2
    first = [window_scores(ctx, ids[:2], 2, "proxy")[1][s] for s in range(5)]
    survivors = sorted(range(5), key=lambda s: (first[s], s))[:2]
    assert [s for s in range(5) if full[s]] == sorted(survivors)
    for s in range(5):  # survivors carry the full-set score, the others their first-slice score
        assert math.isclose(halving[s], proxy[s] if full[s] else first[s], rel_tol=1e-5)
    assert math.isclose(base_h, window_scores(ctx, ids[:2], 2, "proxy")[0], rel_tol=1e-5)
    # keep everything: the same scores and choice as proxy
    _, all_kept, full = window_scores(ctx, ids, 2, "halving", first=0.25, keep=1.0)
    assert all(full) and all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(all_kept, proxy, strict=True))


def test_ppl_window_halving_report_and_bad_options():
    model = tiny_model("llama", num_hidden_layers=6)
    ids = tiny_batch(8, 16, seed=3)
    report = pare.prune(model, PplWindowConfig(num_layers=1, search="halving"), ids, runtime=RT, batch_size=2)
    windows = report.scores["windows"]
    kept = [w for w in windows if "ppl" in w]
    assert len(windows) == 6 and len(kept) == 2
    assert all("ppl_first_slice" in w and "eliminated" in w["note"] for w in windows if "ppl" not in w)
    assert report.scores["removed_layers"] == min(kept, key=lambda w: w["ppl"])["layers"]
    assert "ppl_base_first_slice" in report.scores and "survived the first slice" in report.scores["reason"]
    for bad in ({"halving_first": 0}, {"halving_keep": 1.5}, {"search": "fast"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            PplWindowConfig(num_layers=1, **bad)


def test_ppl_window_choice_and_scores_match_between_searches():
    reports = []
    for search in ("proxy", "exact", "bound"):
        model = tiny_model("llama", num_hidden_layers=5)
        reports.append(prune(model, PplWindowConfig(num_layers=2, search=search)))
    a, b, c = reports
    assert c.scores["removed_layers"] == a.scores["removed_layers"]
    for wa, wc in zip(a.scores["windows"], c.scores["windows"], strict=True):
        assert wc.get("ppl", wa["ppl"]) == wa["ppl"] and wc.get("ppl_at_least", 0) <= wa["ppl"]
    assert a.scores["removed_layers"] == b.scores["removed_layers"]
    for wa, wb in zip(a.scores["windows"], b.scores["windows"], strict=True):
        assert wa["layers"] == wb["layers"] and math.isclose(wa["ppl"], wb["ppl"], rel_tol=1e-5)
    best = min(a.scores["windows"], key=lambda w: w["ppl"])
    assert a.scores["removed_layers"] == best["layers"]


def _hidden_states(model):
    with torch.no_grad():
        return model(input_ids=CALIB, output_hidden_states=True).hidden_states  # [L+1], last after the final norm


def test_shortgpt_block_influence_matches_hidden_states():
    model = tiny_model("llama", num_hidden_layers=4)
    hs = _hidden_states(model)
    report = prune(model, ShortGPTConfig(num_layers=1))
    bi = report.scores["block_influence"]
    for i in range(3):  # the last entry of hidden_states is normed; compare layers 0..2
        assert math.isclose(bi[str(i)], float(1 - token_cosine(hs[i], hs[i + 1]).mean()), rel_tol=1e-6, abs_tol=1e-9)
    assert report.scores["removed_layers"] == [min(range(4), key=lambda i: bi[str(i)])]


def test_angular_distances_match_hidden_states():
    model = tiny_model("qwen2", num_hidden_layers=4)
    hs = _hidden_states(model)
    report = prune(model, AngularConfig(num_layers=2))
    spans = report.scores["angular_distance"]
    assert [s["layers"] for s in spans] == [[0, 1], [1, 2], [2, 3]]
    for s in range(2):
        assert math.isclose(spans[s]["distance"], float(angular_distance(hs[s], hs[s + 2]).mean()), rel_tol=1e-6)
    assert report.scores["removed_layers"] == min(spans, key=lambda s: s["distance"])["layers"]


# Sub-layer surgery itself is checked on every architecture in test_depth_surgery.py.
@pytest.mark.parametrize("arch_name", ["llama", "gemma2", "phi3", "gpt_neox", "gpt2", "opt", "qwen2_moe"])
def test_sublayer_method_removes_lowest_nri_and_generates(arch_name):
    model = tiny_model(arch_name, num_hidden_layers=3)
    report = prune(model, SublayerConfig(num_sublayers=2))
    rows = report.scores["sublayers"]
    assert len(rows) == 6 and all(r["params"] > 0 for r in rows)
    lowest = sorted(rows, key=lambda r: r["nri"])[:2]
    assert sorted(report.scores["removed_sublayers"]) == sorted(f"{r['layer']}.{r['part']}" for r in lowest)
    assert not report.uniform and [e.op for e in report.edits] == ["remove_sublayer"] * 2
    assert report.figures["params_before"] - report.figures["params_after"] == sum(r["params"] for r in lowest)
    greedy_matches_generate(model)


def test_sublayer_score_equals_full_forward_without_block():
    model = tiny_model("gemma2", num_hidden_layers=3)
    report = prune(tiny_model("gemma2", num_hidden_layers=3), SublayerConfig(num_sublayers=1, parts=("mlp",)))
    row = next(r for r in report.scores["sublayers"] if r["layer"] == 2)
    from pare.arch.surgery.depth import remove_sublayer
    from pare.eval.perplexity import nll_sum
    from pare.ops.similarity import perplexity_of

    remove_sublayer(model, describe(model), 2, "mlp")
    with torch.no_grad():
        ppl = perplexity_of(*nll_sum(model(input_ids=CALIB).logits, CALIB))
    assert math.isclose(row["ppl"], ppl, rel_tol=1e-5)


def test_targets_convert_to_layer_counts():
    model = tiny_model("llama", num_hidden_layers=6)
    arch = describe(model)
    total = sum(p.numel() for p in model.parameters())
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert ShortGPTConfig().layer_count(model, arch) == 1
    assert ShortGPTConfig(param_ratio=per_layer / total).layer_count(model, arch) == 1
    assert ShortGPTConfig(param_ratio=1.01 * per_layer / total).layer_count(model, arch) == 2
    assert ShortGPTConfig(target_params=total - 2 * per_layer).layer_count(model, arch) == 2
    assert ShortGPTConfig(target_params=total - 2 * per_layer - 1).layer_count(model, arch) == 3


@pytest.mark.parametrize(
    "make",
    [
        lambda: ShortGPTConfig(num_layers=-1),
        lambda: ShortGPTConfig(num_layers=0),
        lambda: PplWindowConfig(num_layers=1, param_ratio=0.2),
        lambda: PplWindowConfig(search="fast"),
        lambda: LayersConfig(layers="3-1"),
        lambda: LayersConfig(layers="a"),
        lambda: SublayerConfig(parts=("ffn",)),
    ],
)
def test_bad_configs_raise_config_error(make):
    with pytest.raises(ConfigError):
        make()


@pytest.mark.parametrize(
    "config",
    [
        ShortGPTConfig(num_layers=3),
        AngularConfig(num_layers=5),
        PplWindowConfig(param_ratio=0.99),
        LayersConfig(layers="0-2"),
        LayersConfig(layers="3"),
        LayersConfig(layers="-1"),
        LayersConfig(),
        SublayerConfig(layers="3"),
        SublayerConfig(num_sublayers=5),
    ],
    ids=lambda c: c.method,
)
def test_impossible_requests_raise_config_error(config):
    model = tiny_model("llama")
    with pytest.raises(ConfigError):
        prune(model, config)
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
