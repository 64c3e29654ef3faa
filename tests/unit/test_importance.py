"""Channel importance scores (pare.ops.importance): exact invariants on small seeded tensors."""

from __future__ import annotations

import pytest
import torch

from pare.ops import importance as imp


def test_group_magnitudes_are_row_and_column_norms():
    w = torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.0, -4.0]])
    assert torch.equal(imp.magnitude_out(w, 1), torch.tensor([3.0, 7.0]))
    assert torch.equal(imp.magnitude_in(w, 1), torch.tensor([4.0, 2.0, 4.0]))
    assert torch.equal(imp.magnitude_in(w, 2), torch.tensor([10.0, 4.0, 16.0]))


def test_activation_with_equal_norms_is_magnitude_times_norm():
    w = torch.randn(5, 7)
    assert torch.allclose(imp.activation_in(w, torch.full((7,), 3.0)), 3.0 * imp.magnitude_in(w, 1))
    # a dead input channel (zero activations) scores zero whatever its weights
    norms = torch.ones(7)
    norms[2] = 0
    assert imp.activation_in(w, norms)[2] == 0


def test_taylor_is_abs_weight_times_gradient():
    w, g = torch.tensor([[2.0, -1.0]]), torch.tensor([[-0.5, 3.0]])
    assert torch.equal(imp.taylor(w, g), torch.tensor([[1.0, 3.0]]))


def test_fluctuation_of_a_constant_channel_is_zero():
    w = torch.randn(4, 3)
    var = torch.tensor([0.0, 2.0, 1.0])
    s = imp.fluctuation(w, var)
    assert s[0] == 0
    assert torch.allclose(s[1], 2.0 * w[:, 1].pow(2).sum())


def test_bias_compensation_is_exact_for_constant_pruned_channels():
    torch.manual_seed(0)
    x = torch.randn(50, 6)
    x[:, [1, 4]] = torch.tensor([0.7, -1.3])  # channels to prune are constant over tokens
    w = torch.randn(3, 6)
    pruned, kept = torch.tensor([1, 4]), torch.tensor([0, 2, 3, 5])
    b = imp.bias_compensation(w, x.mean(0), pruned)
    assert torch.allclose(x[:, kept] @ w[:, kept].t() + b, x @ w.t(), atol=1e-5)


def test_group_sum_keep_top_and_standardize():
    assert torch.equal(imp.group_sum(torch.arange(6.0), 2), torch.tensor([1.0, 5.0, 9.0]))
    assert torch.equal(imp.keep_top(torch.tensor([0.1, 5.0, 3.0, 5.0]), 2), torch.tensor([1, 3]))
    z = imp.standardize(torch.tensor([1.0, 2.0, 3.0]))
    assert abs(float(z.mean())) < 1e-6 and abs(float(z.std()) - 1) < 1e-5


@pytest.mark.parametrize(
    ("width", "total", "multiple", "p2", "expected"),
    [(129.0, 172, 128, False, 128), (40.0, 172, 128, False, 128), (300.0, 1000, 1, True, 256),
     (72.4, 96, 1, False, 72), (10.0, 96, 8, False, 8), (500.0, 172, 128, False, 172)],
)
def test_round_width(width, total, multiple, p2, expected):
    assert imp.round_width(width, total, multiple, p2) == expected
