"""Width pruning on the real stories260K Llama (../shared): reload and quality orderings."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import pare
from pare.config import RuntimeConfig

pytestmark = pytest.mark.slow
RT = RuntimeConfig(device="cpu", progress=False)


@pytest.fixture
def stories(stories_path, stories_calibration):
    from pare.calibration.data import eval_token_ids

    tok, windows = stories_calibration
    ids = eval_token_ids(tok, "tinystories", split="validation")[:, :128 * 40]
    return stories_path, windows, ids


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _ppl(model, ids):
    from pare.eval.perplexity import perplexity

    return perplexity(model, ids, 128, batch_size=8, progress=False).ppl


def test_osscar_refit_beats_no_search_and_reloads(stories, tmp_path):
    path, windows, ids = stories
    dense = _ppl(_load(path), ids)
    model = _load(path)
    report = pare.prune(model, pare.OsscarConfig(mlp_ratio=0.25, round_to=128), windows, runtime=RT)
    assert model.config.intermediate_size == 128 and report.uniform
    for e in report.scores["mlp_error"].values():
        assert e["refit"] < e["no_refit"]
    pare.save(model, None, tmp_path / "m", report=report)
    ppl = _ppl(_load(tmp_path / "m"), ids)
    assert dense < ppl < 2 * dense


def test_width_gqa_kv_mode_reloads_and_calibrated_beats_magnitude(stories, tmp_path):
    path, windows, ids = stories
    ppls = {}
    for imp in ("magnitude", "flap"):
        model = _load(path)
        report = pare.prune(model, pare.WidthConfig(pruning_ratio=0.25, importance=imp), windows, runtime=RT)
        assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (6, 3)
        assert model.config.hidden_size == 48 and report.uniform
        pare.save(model, None, tmp_path / imp, report=report)
        ppls[imp] = _ppl(_load(tmp_path / imp), ids)
    assert ppls["flap"] < ppls["magnitude"]
