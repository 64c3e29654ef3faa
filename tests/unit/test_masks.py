"""Exact invariants of the mask builders (``True`` = prune)."""

from __future__ import annotations

import pytest
import torch

from pare.errors import ConfigError
from pare.ops.masks import layer_mask, make_mask, nm_mask, parse_pattern, row_mask, zero_masked_


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (4, 8), (3, 8)])
def test_nm_mask_has_exactly_n_zeros_per_group(n: int, m: int) -> None:
    scores = torch.randn(24, 64, generator=torch.Generator().manual_seed(1))
    mask = nm_mask(scores, n, m)
    per_group = mask.reshape(24, 64 // m, m).sum(-1)
    assert torch.equal(per_group, torch.full_like(per_group, n))
    # the pruned ones are the lowest of their group
    groups = scores.reshape(24, -1, m)
    gm = mask.reshape(24, -1, m)
    pruned_max = torch.where(gm, groups, torch.full_like(groups, -torch.inf)).amax(-1)
    kept_min = torch.where(gm, torch.full_like(groups, torch.inf), groups).amin(-1)
    assert bool((pruned_max <= kept_min).all())


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.9])
def test_row_mask_is_exact_per_row(sparsity: float) -> None:
    scores = torch.randn(16, 100, generator=torch.Generator().manual_seed(2))
    mask = row_mask(scores, sparsity)
    assert torch.equal(mask.sum(1), torch.full((16,), int(100 * sparsity)))


def test_layer_mask_is_exact_overall_and_prunes_the_lowest() -> None:
    scores = torch.randn(16, 100, generator=torch.Generator().manual_seed(3))
    mask = layer_mask(scores, 0.37)
    assert int(mask.sum()) == int(1600 * 0.37)
    assert float(scores[mask].max()) <= float(scores[~mask].min())


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.93, 1.0])
def test_ties_still_give_exact_counts_and_the_lowest(sparsity: float) -> None:
    # few distinct values: every row has many ties at its threshold
    scores = torch.randint(0, 4, (12, 50), generator=torch.Generator().manual_seed(4)).float()
    mask = row_mask(scores, sparsity)
    assert torch.equal(mask.sum(1), torch.full((12,), int(50 * sparsity)))
    for r in range(12):
        if 0 < int(mask[r].sum()) < 50:
            assert float(scores[r][mask[r]].max()) <= float(scores[r][~mask[r]].min())
    whole = layer_mask(scores, sparsity)
    assert int(whole.sum()) == int(600 * sparsity)
    if 0 < int(whole.sum()) < 600:
        assert float(scores[whole].max()) <= float(scores[~whole].min())


def test_row_mask_matches_topk_selection_without_ties() -> None:
    scores = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    idx = torch.topk(scores, 20, dim=1, largest=False).indices
    expected = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)
    assert torch.equal(row_mask(scores, 20 / 64), expected)


def test_nan_scores_are_an_error_not_a_wrong_count() -> None:
    scores = torch.full((2, 8), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        row_mask(scores, 0.5)


def test_zero_masked_zeroes_exactly_the_mask() -> None:
    w = torch.randn(6, 8)
    mask = torch.rand(6, 8) > 0.5
    before = w.clone()
    zero_masked_(w, mask)
    assert bool((w[mask] == 0).all()) and torch.equal(w[~mask], before[~mask])
    assert not bool(torch.signbit(w[mask]).any())  # +0.0, not -0.0 from multiplying negative weights


def test_make_mask_dispatch_and_inputs_untouched() -> None:
    scores = torch.randn(8, 16)
    before = scores.clone()
    assert torch.equal(make_mask(scores, 0.5, (2, 4)), nm_mask(scores, 2, 4))
    assert torch.equal(make_mask(scores, 0.5, None), row_mask(scores, 0.5))
    assert torch.equal(make_mask(scores, 0.5, None, per_row=False), layer_mask(scores, 0.5))
    assert torch.equal(scores, before)


@pytest.mark.parametrize("bad", ["4:4", "5:4", "0:4", "2-4", "a:b"])
def test_bad_patterns_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_pattern(bad)


def test_nm_needs_divisible_width() -> None:
    with pytest.raises(ConfigError, match="multiple of 4"):
        nm_mask(torch.randn(4, 10), 2, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_kth_smallest_equals_kthvalue(dtype: torch.dtype) -> None:
    from pare.ops.masks import kth_smallest

    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 7, (5, 40), generator=g).to(dtype)  # many ties
    scores[1] = torch.rand(40, generator=g).to(dtype)
    for k in (1, 13, 20, 40):
        got = kth_smallest(scores, k)
        assert got.shape == (5, 1) and got.dtype == dtype
        assert torch.equal(got, scores.kthvalue(k, dim=1, keepdim=True).values)
