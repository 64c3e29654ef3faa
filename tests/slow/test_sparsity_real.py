"""Wanda, SparseGPT and magnitude on the real stories260K: the orderings the papers report.

Calibration: TinyStories train windows; evaluation: TinyStories validation (seqlen 512, the model's
context). Measured here (64 x 256 calibration tokens, 32 evaluation windows): dense ~4.0; at 50%
SparseGPT < Wanda < magnitude.
"""

from __future__ import annotations

import pytest
import torch

import pare

pytestmark = pytest.mark.slow

QUIET = pare.RuntimeConfig(progress=False, device="cpu")


@pytest.fixture(scope="module")
def setup():
    from conftest import STORIES

    if not (STORIES / "config.json").is_file():
        pytest.skip(f"real checkpoint not found at {STORIES}")
    from pare.calibration.data import calibration_windows, eval_token_ids

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and the machine is shared
    try:
        _, tok = pare.load_model(str(STORIES))
        calib = calibration_windows(tok, "tinystories", 64, 256, seed=0)
        ev = eval_token_ids(tok, "tinystories", split="validation")
        yield str(STORIES), calib, ev
    finally:
        torch.set_num_threads(threads)


def ppl_after(setup, cfg, runtime=QUIET) -> float:
    from pare.eval.perplexity import perplexity

    path, calib, ev = setup
    model, _ = pare.load_model(path)
    report = pare.prune(model, cfg, calib, runtime=runtime)
    assert report.modules
    return perplexity(model, ev, 512, batch_size=8, progress=False, max_windows=32).ppl


def test_ordering_at_50_percent(setup) -> None:
    dense = ppl_after(setup, pare.MagnitudeConfig(sparsity=0.0))
    mag = ppl_after(setup, pare.MagnitudeConfig(sparsity=0.5))
    wanda = ppl_after(setup, pare.WandaConfig(sparsity=0.5))
    sgpt = ppl_after(setup, pare.SparseGPTConfig(sparsity=0.5))
    assert dense < sgpt <= wanda < mag, (dense, sgpt, wanda, mag)


def test_ordering_at_2_4(setup) -> None:
    mag = ppl_after(setup, pare.MagnitudeConfig(pattern="2:4"))
    wanda = ppl_after(setup, pare.WandaConfig(pattern="2:4"))
    sgpt = ppl_after(setup, pare.SparseGPTConfig(pattern="2:4"))
    assert sgpt < wanda < mag, (sgpt, wanda, mag)


def test_owl_helps_at_70_percent(setup) -> None:
    uniform = ppl_after(setup, pare.WandaConfig(sparsity=0.7))
    owl = ppl_after(setup, pare.WandaConfig(sparsity=0.7, profile="owl"))
    assert owl < uniform, (owl, uniform)


def test_reference_block_selection_is_no_better_here(setup) -> None:
    """The reference's whole-block selection vs pare's per-row default (see ops/sparsegpt.py)."""
    row = ppl_after(setup, pare.SparseGPTConfig(sparsity=0.5))
    block = ppl_after(setup, pare.SparseGPTConfig(sparsity=0.5, mask_group="block"))
    assert row <= block, (row, block)
