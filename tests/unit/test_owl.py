"""OWL ratios (Yin et al., 2024): exact mean, bounded spread, outlier-driven order."""

from __future__ import annotations

import pytest
import torch

from pare.ops.owl import layer_outlier_ratio, owl_sparsities


def test_outlier_ratio_counts_scores_above_m_times_mean() -> None:
    s = torch.ones(100)
    s[:3] = 50.0  # mean = (97 + 150) / 100 = 2.47; threshold 12.35
    assert layer_outlier_ratio([s], m=5) == pytest.approx(0.03)
    # the mean is over the whole layer, across matrices
    assert layer_outlier_ratio([s[:50], s[50:]], m=5) == pytest.approx(0.03)


@pytest.mark.parametrize("target,lam", [(0.5, 0.08), (0.7, 0.08), (0.3, 0.05), (0.7, 0.2)])
@pytest.mark.parametrize("bounded", [False, True])
def test_weighted_mean_is_target_and_spread_within_lambda(target: float, lam: float, bounded: bool) -> None:
    g = torch.Generator().manual_seed(0)
    ratios = (torch.rand(12, generator=g) * 0.02).tolist()
    weights = (torch.randint(1, 10, (12,), generator=g) * 1000).tolist()
    s = owl_sparsities(ratios, target, lam, weights, bounded=bounded)
    w = torch.tensor(weights, dtype=torch.float64)
    assert float((torch.tensor(s, dtype=torch.float64) * w).sum() / w.sum()) == pytest.approx(target, abs=1e-12)
    if bounded:
        assert all(target - lam - 1e-12 <= v <= target + lam + 1e-12 for v in s)
    else:  # the reference rule: least to most pruned layer spans exactly 2 * lambda
        assert max(s) - min(s) == pytest.approx(2 * lam, abs=1e-12)
    # more outliers -> lower sparsity
    order = sorted(range(12), key=lambda i: ratios[i])
    assert [s[i] for i in order] == sorted(s, reverse=True)


def test_symmetric_case_matches_the_reference_formula() -> None:
    # reference (OWL repo): s_l = S - (minmax(D)*2*lambda - mean(...)) with equal layer sizes
    d = torch.tensor([0.01, 0.02, 0.03, 0.04, 0.05], dtype=torch.float64)
    ref = 0.7 - ((d - d.min()) / (d.max() - d.min()) * 0.16 - ((d - d.min()) / (d.max() - d.min()) * 0.16).mean())
    assert owl_sparsities(d.tolist(), 0.7, 0.08) == pytest.approx(ref.tolist(), abs=1e-12)


def test_skewed_case_matches_the_reference_unless_bounded() -> None:
    # one layer full of outliers: the reference rule puts it 2*lambda*(1 - 1/L) below the target
    d = torch.tensor([0.10, 0.01, 0.01, 0.01, 0.01], dtype=torch.float64)
    scaled = (1 - d - (1 - d).min()) / ((1 - d).max() - (1 - d).min()) * 0.16
    ref = 0.7 + scaled - scaled.mean()
    assert owl_sparsities(d.tolist(), 0.7, 0.08) == pytest.approx(ref.tolist(), abs=1e-12)
    assert ref[0] == pytest.approx(0.7 - 0.128)
    bounded = owl_sparsities(d.tolist(), 0.7, 0.08, bounded=True)
    assert min(bounded) == pytest.approx(0.7 - 0.08) and sum(bounded) / 5 == pytest.approx(0.7)


def test_equal_outliers_give_uniform() -> None:
    assert owl_sparsities([0.01] * 4, 0.5, 0.08) == pytest.approx([0.5] * 4)


def test_clamped_to_max_and_mean_kept() -> None:
    s = owl_sparsities([0.0, 0.01, 0.02, 0.03], 0.95, 0.08, max_sparsity=0.99)
    assert max(s) <= 0.99
    assert sum(s) / 4 == pytest.approx(0.95, abs=1e-12)
