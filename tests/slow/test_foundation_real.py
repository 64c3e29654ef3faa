"""The foundation on the real pretrained stories260K Llama (GQA): description, runner, generation,
perplexity, magnitude pruning and reload."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import pare
from pare.arch import describe
from pare.calibration.data import calibration_windows, eval_token_ids
from pare.calibration.runner import LayerwiseRunner, logits_from_hidden
from pare.eval.perplexity import perplexity

pytestmark = pytest.mark.slow


def test_real_model_description_and_greedy_text(stories_path) -> None:
    model, tok = pare.load_model(str(stories_path), dtype=torch.float32)
    arch = describe(model)
    att = arch.layers[0].attention
    assert arch.num_layers == 5 and arch.tied
    assert (att.num_heads, att.num_kv_heads, att.head_dim) == (8, 4, 8)
    assert arch.layers[0].mlp.down is not None
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=32, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert text.startswith(", there was a little girl named Lily. She loved to play outside")


def test_runner_matches_real_model_on_real_text(stories_path, shared_data) -> None:
    model, tok = pare.load_model(str(stories_path), dtype=torch.float32)
    ids = calibration_windows(tok, "tinystories", nsamples=6, seqlen=128, seed=0)
    arch = describe(model)
    runner = LayerwiseRunner(model, arch, ids, device="cpu", batch_size=4, progress=False)
    for _ in runner.steps():
        pass
    with torch.no_grad():
        ref = model(ids).logits
    got = logits_from_hidden(model, arch, ids, torch.cat(runner.final_hidden))
    assert (got - ref).abs().max().item() <= 1e-4


def test_magnitude_prune_save_reload_same_perplexity(stories_path, shared_data, tmp_path) -> None:
    model, tok = pare.load_model(str(stories_path), dtype=torch.float32)
    ids = eval_token_ids(tok, "tinystories", split="test")
    dense = perplexity(model, ids, 256, batch_size=16, progress=False, max_windows=120)
    assert 3.0 < dense.ppl < 8.0  # a real pretrained model on its own domain
    report = pare.prune(model, pare.MagnitudeConfig(sparsity=0.5), runtime=pare.RuntimeConfig(progress=False))
    pruned = perplexity(model, ids, 256, batch_size=16, progress=False, max_windows=120)
    assert pruned.ppl > dense.ppl * 1.05 and report.overall_sparsity == pytest.approx(0.5, abs=1e-3)
    out = pare.save(model, tok, tmp_path / "m", report)
    again = perplexity(AutoModelForCausalLM.from_pretrained(out), ids, 256, batch_size=16, progress=False,
                       max_windows=120)
    assert again.ppl == pytest.approx(pruned.ppl, rel=1e-6)
