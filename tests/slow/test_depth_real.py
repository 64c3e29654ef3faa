"""Depth pruning on the real stories260K Llama (../shared): choices, reload, greedy text."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import pare
from pare.config import RuntimeConfig

pytestmark = pytest.mark.slow
RT = RuntimeConfig(device="cpu", progress=False)


@pytest.fixture
def stories(stories_path, stories_calibration):
    tok, windows = stories_calibration
    return stories_path, tok, windows


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_ppl_window_proxy_and_exact_agree_on_real_model(stories):
    path, _, windows = stories
    a = pare.prune(_load(path), pare.PplWindowConfig(num_layers=2, search="proxy"), windows, runtime=RT)
    b = pare.prune(_load(path), pare.PplWindowConfig(num_layers=2, search="exact"), windows, runtime=RT)
    assert a.scores["removed_layers"] == b.scores["removed_layers"]
    for wa, wb in zip(a.scores["windows"], b.scores["windows"], strict=True):
        assert math.isclose(wa["ppl"], wb["ppl"], rel_tol=1e-5)
    # removing a window always costs calibration perplexity on a trained model
    assert all(w["ppl"] > a.scores["ppl_base"] for w in a.scores["windows"])


@pytest.mark.parametrize("k", [1, 2])
def test_ppl_window_halving_picks_the_proxy_window_on_real_model(stories, k):
    path, _, windows = stories
    proxy = pare.prune(_load(path), pare.PplWindowConfig(num_layers=k, search="proxy"), windows, runtime=RT)
    halving = pare.prune(_load(path), pare.PplWindowConfig(num_layers=k), windows, runtime=RT)  # the default
    assert halving.scores["search"] == "halving"
    assert halving.scores["removed_layers"] == proxy.scores["removed_layers"]
    chosen = next(w for w in halving.scores["windows"] if w["layers"] == halving.scores["removed_layers"])
    best = min(proxy.scores["windows"], key=lambda w: w["ppl"])
    assert math.isclose(chosen["ppl"], best["ppl"], rel_tol=1e-5)  # survivors carry the full-set score


def test_real_model_pruned_reloads_and_generates(stories, tmp_path):
    path, tok, windows = stories
    model = _load(path)
    report = pare.prune(model, pare.ShortGPTConfig(num_layers=1), windows, runtime=RT)
    assert model.config.num_hidden_layers == 4
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    pare.save(model, tok, tmp_path / "m", report)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(again.generate(ids, max_new_tokens=12, do_sample=False), out)
    assert len(tok.decode(out[0, ids.shape[1]:]).split()) >= 3


def test_real_model_sublayer_reloads_with_pare_load(stories, tmp_path):
    path, tok, windows = stories
    model = _load(path)
    report = pare.prune(model, pare.SublayerConfig(num_sublayers=2), windows, runtime=RT)
    assert len(report.scores["sublayers"]) == 10 and not report.uniform
    pare.save(model, tok, tmp_path / "m", report)
    again = pare.load(tmp_path / "m")
    ids = windows[:2]
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
        a = again.generate(ids[:1, :8], max_new_tokens=8, do_sample=False)
        b = model.generate(ids[:1, :8], max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)
