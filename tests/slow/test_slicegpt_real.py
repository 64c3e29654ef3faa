"""Per-layer SliceGPT on the real stories260K Llama (../shared) against SliceGPT's own sequential
algorithm (``bench/slicegpt_reference_algorithm.py``) on the same calibration windows."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import pare
from pare.config import RuntimeConfig

pytestmark = pytest.mark.slow
RT = RuntimeConfig(device="cpu", progress=False)
REFERENCE = Path(__file__).resolve().parents[2] / "bench" / "slicegpt_reference_algorithm.py"


def _reference():
    spec = importlib.util.spec_from_file_location("slicegpt_reference_algorithm", REFERENCE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("slicing", [0.25, 0.3])
def test_per_layer_equals_the_reference_algorithm(stories_path, stories_calibration, slicing, tmp_path):
    from pare.calibration.data import eval_token_ids
    from pare.eval.perplexity import perplexity

    tok, windows = stories_calibration
    ids = eval_token_ids(tok, "tinystories", split="validation")[:, :128 * 20]

    def ppl(model):
        return perplexity(model, ids, 128, batch_size=8, progress=False).ppl

    ref = _load(stories_path)
    k = int((1 - slicing) * 64) // 8 * 8
    with torch.no_grad():
        _reference().slice_model(ref, windows, k)
    model = _load(stories_path)
    cfg = pare.SliceGPTConfig(slicing=slicing, rotation="per-layer", slice_head=False)
    report = pare.prune(model, cfg, windows, runtime=RT)
    assert report.scores["slicegpt"]["hidden_after"] == k and report.scores["slicegpt"]["head_width"] == 64
    ours, theirs = ppl(model), ppl(ref)
    assert abs(ours - theirs) <= 1e-4 * theirs
    pare.save(model, None, tmp_path / "m", report=report)
    assert torch.equal(pare.load(tmp_path / "m")(ids[:, :64]).logits, model(ids[:, :64]).logits)
