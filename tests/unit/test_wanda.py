"""Wanda's score and comparison group (Sun et al., 2023)."""

from __future__ import annotations

import pytest
import torch

from pare.ops.masks import row_mask
from pare.ops.wanda import wanda_mask, wanda_scores


def _w(seed: int = 0, shape: tuple[int, int] = (32, 64)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_equal_norms_equal_per_row_magnitude(nm) -> None:
    w = _w()
    mask = wanda_mask(w, torch.full((64,), 3.7), 0.5, nm)
    expected = row_mask(w.abs(), 0.5) if nm is None else wanda_mask(w, torch.ones(64), 0.5, nm)
    assert torch.equal(mask, expected)
    if nm is not None:  # N:M with equal norms = N:M magnitude
        from pare.ops.masks import nm_mask

        assert torch.equal(mask, nm_mask(w.abs(), *nm))


def test_score_is_weight_times_input_norm() -> None:
    w, norms = _w(1), torch.rand(64, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(wanda_scores(w, norms), w.abs() * norms[None, :])


def test_comparison_group_is_the_output_row() -> None:
    # row 0 is 100x larger than row 1: a layer-wide comparison would prune row 1 entirely.
    w = _w(2, (2, 8))
    w[0] *= 100
    mask = wanda_mask(w, torch.ones(8), 0.5)
    assert mask.sum(1).tolist() == [4, 4]


def test_activation_norm_changes_the_choice() -> None:
    w = torch.ones(1, 4)
    mask = wanda_mask(w, torch.tensor([1.0, 10.0, 0.1, 5.0]), 0.5)
    assert mask.tolist() == [[True, False, True, False]]


def test_low_precision_weights_are_scored_in_fp32() -> None:
    w = _w(3).to(torch.bfloat16)
    assert wanda_scores(w, torch.ones(64)).dtype == torch.float32


@pytest.mark.parametrize("nm", [None, (2, 4)])
@pytest.mark.parametrize("transposed", [False, True])
def test_in_place_prune_zeroes_exactly_the_mask(nm, transposed: bool) -> None:
    from pare.ops.wanda import wanda_prune_

    base = _w(4)
    w = base.t().contiguous().t() if transposed else base.clone()  # a non-contiguous [out, in] view
    norms = torch.rand(64, generator=torch.Generator().manual_seed(6))
    mask = wanda_mask(base, norms, 0.5, nm)
    wanda_prune_(w, norms, 0.5, nm)
    assert torch.equal(w, base.masked_fill(mask, 0))
