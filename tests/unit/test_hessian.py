"""The inverse-Hessian factor built in place (:mod:`pare.ops.hessian`) against the copying version."""

from __future__ import annotations

import logging

import pytest
import torch

from pare.calibration.stats import InputStats
from pare.ops.hessian import inverse_hessian_factor, inverse_hessian_factor_copies, lower_inverse, lower_inverse_


def _hessian(n: int, seed: int, rows: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows or 2 * n, n, generator=g) * torch.exp(torch.randn(n, generator=g))
    h = x.t() @ x
    return torch.triu(h) + torch.triu(h, 1).t()  # exactly symmetric, as a mirrored Gram matrix is


@pytest.mark.parametrize("n", [5, 256, 257, 513, 1100])
def test_in_place_factor_is_bitwise_the_copying_one(n: int) -> None:
    h = _hessian(n, n)
    h[3], h[:, 3] = 0.0, 0.0  # a dead input
    ref = inverse_hessian_factor_copies(h)
    work = h.clone()
    got = inverse_hessian_factor(work, overwrite=True)
    assert torch.equal(got.U, ref.U) and got.U.stride() == ref.U.stride()
    assert torch.equal(got.dead, ref.dead) and got.damp == ref.damp
    assert got.U.untyped_storage().data_ptr() == work.untyped_storage().data_ptr()  # no [in, in] copy
    kept = h.clone()
    assert torch.equal(inverse_hessian_factor(kept).U, ref.U)
    assert torch.equal(kept, h)  # not overwritten unless asked


def test_only_the_upper_triangle_is_read() -> None:
    h = _hessian(300, 1)
    noisy = h + torch.tril(torch.randn(300, 300, generator=torch.Generator().manual_seed(2)), -1)
    assert torch.equal(inverse_hessian_factor(noisy).U, inverse_hessian_factor_copies(noisy).U)
    assert torch.equal(inverse_hessian_factor(noisy).U, inverse_hessian_factor(h).U)


@pytest.mark.parametrize("n", [40, 600])
def test_retries_put_the_hessian_back_bitwise(n: int, caplog) -> None:
    """Not positive definite: every failed Cholesky restores ``H`` from the kept half, so each retry
    with more dampening sees what the copying version sees."""
    h = _hessian(n, 3, rows=n // 2)
    h -= 1e-3 * h.diagonal().mean() * torch.eye(n)
    ref = inverse_hessian_factor_copies(h, 0.0)
    with caplog.at_level(logging.WARNING, logger="pare.ops.hessian"):
        got = inverse_hessian_factor(h.clone(), 0.0, overwrite=True)
    assert got.damp == ref.damp > 0 and torch.equal(got.U, ref.U)
    assert "not positive definite" in caplog.text


def test_lower_inverse_in_place_equals_lower_inverse() -> None:
    n = 700
    L = torch.linalg.cholesky(_hessian(n, 4) + n * torch.eye(n))
    expected = lower_inverse(L)
    assert torch.equal(lower_inverse_(L.clone()), expected)
    assert torch.allclose(expected @ L, torch.eye(n), atol=1e-4)


def test_released_hessian_is_bitwise_the_copy_and_leaves_no_gram() -> None:
    stats = InputStats(want_gram=True)
    stats.add(torch.randn(64, 300, generator=torch.Generator().manual_seed(5)))
    copy = stats.hessian()
    gram = stats.gram
    taken = stats.hessian(release=True)
    assert torch.equal(taken, copy) and taken is gram
    assert stats.gram is None
