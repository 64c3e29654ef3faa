"""The pure parts of recovery: schedules, the distillation loss, windows and masks."""

from __future__ import annotations

import itertools

import pytest
import torch

from pare.errors import ConfigError, NotEnoughDataError
from pare.recovery.data import cut_windows, training_windows
from pare.recovery.distill import hidden_mse, kept_layers, logit_kl
from pare.recovery.masks import apply_masks_, masked_gradients, zero_masks
from pare.recovery.schedule import sparsity_schedule
from pare.recovery.train import lr_factor


def test_cubic_schedule_is_zhu_gupta_and_ends_at_the_final_sparsity() -> None:
    got = sparsity_schedule(0.0, 0.8, 4, "cubic")
    want = [0.8 + (0.0 - 0.8) * (1 - t / 4) ** 3 for t in range(1, 5)]
    assert got == pytest.approx(want) and got[-1] == 0.8
    assert all(a < b for a, b in itertools.pairwise(got))
    assert sparsity_schedule(0.2, 0.6, 2, "linear") == pytest.approx([0.4, 0.6])
    # cubic cuts more in the first step than linear
    assert got[0] > sparsity_schedule(0.0, 0.8, 4, "linear")[0]


def test_logit_kl_is_zero_for_equal_logits_and_positive_otherwise() -> None:
    z = torch.randn(2, 5, 11)
    assert float(logit_kl(z, z.clone(), 2.0)) == 0.0
    assert float(logit_kl(z, z + torch.randn_like(z), 2.0)) > 0


def test_logit_kl_matches_the_definition() -> None:
    s, t, temp = torch.randn(3, 7), torch.randn(3, 7), 1.5
    p = torch.softmax(t / temp, -1)
    want = (p * (torch.log(p) - torch.log_softmax(s / temp, -1))).sum(-1).mean() * temp**2
    assert torch.allclose(logit_kl(s, t, temp), want, atol=1e-6)


def test_kept_layers_follow_the_recorded_depth_cuts() -> None:
    edits = [{"op": "remove_layers", "kept": [0, 2, 3, 4], "removed": [1]},
             {"op": "mlp_channels", "layer": 0},
             {"op": "remove_layers", "kept": [0, 1, 3], "removed": [2]}]
    assert kept_layers(5, edits) == [0, 2, 4]
    h = [torch.ones(1, 2) * i for i in range(5)]
    assert float(hidden_mse([h[0], h[2], h[4]], h, [0, 2, 4])) == 0.0


def test_windows_do_not_overlap_and_hold_out_the_end() -> None:
    ids = torch.arange(200)
    w = cut_windows(ids, 8, 2, "x")
    assert w.train.shape == (23, 8) and w.heldout.shape == (2, 8)
    assert torch.equal(torch.cat([w.train.flatten(), w.heldout.flatten()]), ids)
    assert cut_windows(ids[:100], 8, 2, "x").heldout.shape == (1, 8)  # at most a tenth of the windows


def test_batches_are_a_function_of_seed_and_step_and_cover_each_epoch() -> None:
    w = cut_windows(torch.arange(80), 8, 0, "x")
    seen = torch.cat([w.batch(s, 2, seed=3) for s in range(5)])  # one epoch of 10 windows
    assert sorted(seen[:, 0].tolist()) == list(range(0, 80, 8))
    assert torch.equal(w.batch(7, 2, seed=3), w.batch(7, 2, seed=3))
    assert not torch.equal(torch.cat([w.batch(s, 2, seed=4) for s in range(5)]), seen)


def test_too_little_text_is_a_clear_error() -> None:
    with pytest.raises(NotEnoughDataError, match="fewer than one window"):
        cut_windows(torch.arange(5), 8, 1, "tiny text")
    with pytest.raises(ConfigError, match="calibration windows"):
        training_windows(None, "calibration", 8, 100, 1, None)


def test_masked_gradients_and_masks_keep_zeros() -> None:
    p = torch.nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    masks = zero_masks({"w": p})
    assert set(masks) == {"w"} and zero_masks({"d": torch.nn.Parameter(torch.ones(2))}) == {}
    with masked_gradients({"w": p}, masks):
        (p * torch.arange(1.0, 5.0).view(2, 2)).sum().backward()
    assert p.grad is not None and torch.equal(p.grad, torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
    with torch.no_grad():
        p.add_(1.0)
    apply_masks_({"w": p}, masks)
    assert torch.equal(p.detach(), torch.tensor([[2.0, 0.0], [0.0, 3.0]]))


def test_lr_warms_up_then_decays_to_zero() -> None:
    f = [lr_factor(k, 10, 2) for k in range(11)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == 1.0 and f[10] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in itertools.pairwise(f[1:]))
