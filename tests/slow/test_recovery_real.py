"""Recovery on the real stories260K after SparseGPT 2:4: the held-out loss falls and 2:4 stays exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pare
from pare.methods.recover import RecoverConfig

pytestmark = pytest.mark.slow
pytest.importorskip("peft")
QUIET = pare.RuntimeConfig(progress=False, device="cpu")


@pytest.mark.parametrize("mode", ["lora", "distill"])
def test_recovery_lowers_the_heldout_loss_and_keeps_2_4(stories_calibration, stories_path: Path, mode: str) -> None:
    tok, ids = stories_calibration
    model, _ = pare.load_model(str(stories_path), dtype="float32")
    prune = pare.prune(model, pare.SparseGPTConfig(pattern="2:4"), ids, runtime=QUIET)
    teacher = {"teacher": str(stories_path)} if mode == "distill" else {}
    cfg = RecoverConfig(mode=mode, data="tinystories", tokens=2048, seqlen=128, batch_size=2, lr=1e-3,
                        eval_windows=8, eval_every=0, **teacher)
    rec = pare.run(model, [cfg], tokenizer=tok, runtime=QUIET, history=[prune])[0]
    heldout = rec.scores["recovery"]["heldout"]
    assert heldout[-1][1] < heldout[0][1]
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            assert bool(((module.weight.reshape(-1, 4) == 0).sum(-1) == 2).all()), name
