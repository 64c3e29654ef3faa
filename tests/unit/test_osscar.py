"""OSSCAR selection and refit (pare.ops.osscar) against closed forms and simple baselines."""

from __future__ import annotations

import torch

from pare.ops.osscar import damping, error_without_refit, objective, refit, select_groups


def _problem(c: int = 48, out: int = 24, n: int = 400, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g) * torch.rand(c, generator=g).mul(3)
    x[:, : c // 4] += 0.9 * x[:, c // 4 : c // 2]  # correlated channels: magnitude ranking is not optimal
    w = torch.randn(out, c, generator=g)
    return x, x.t() @ x, w


def test_refit_lowers_reconstruction_error_vs_no_refit():
    x, gram, w = _problem()
    sel = select_groups(gram, w, 32, damp=1e-6)
    y = x @ w.t()
    no_refit = ((y - x[:, sel.keep] @ w[:, sel.keep].t()) ** 2).sum()
    with_refit = ((y - x[:, sel.keep] @ sel.weight.t()) ** 2).sum()
    assert with_refit < no_refit
    assert abs(float(no_refit) - sel.error_no_refit) / float(no_refit) < 1e-3


def test_refit_is_least_squares_solution():
    x, gram, w = _problem()
    keep = torch.arange(0, 48, 2)
    b = refit(gram, w, keep, 1, lam=0.0)
    ref = torch.linalg.lstsq(x[:, keep].double(), (x @ w.t()).double()).solution.t()
    assert torch.allclose(b.double(), ref, rtol=1e-3, atol=1e-3)


def test_objective_matches_explicit_ridge_residual():
    x, gram, w = _problem()
    keep, lam = torch.tensor([0, 3, 7, 11, 20, 40]), 5.0
    b = refit(gram, w, keep, 1, lam).double()
    y, xs = (x @ w.t()).double(), x[:, keep].double()
    explicit = ((y - xs @ b.t()) ** 2).sum() + lam * (b**2).sum()
    assert abs(objective(gram, w, keep, 1, lam) - float(explicit)) / float(explicit) < 1e-6


def test_local_search_is_no_worse_than_magnitude_selection():
    for seed in range(3):
        _x, gram, w = _problem(seed=seed)
        sel = select_groups(gram, w, 24)
        lam = damping(gram.double(), 0.01)
        mag = torch.argsort(w.pow(2).sum(0) * gram.diagonal(), descending=True)[:24].sort().values
        assert sel.error <= objective(gram, w, mag, 1, lam) + 1e-6
        assert sel.error_no_refit >= 0 and error_without_refit(gram, w, mag, 1) >= 0


def test_keeping_everything_reconstructs_exactly():
    _, gram, w = _problem()
    sel = select_groups(gram, w, 48, damp=1e-9)
    assert torch.equal(sel.keep, torch.arange(48))
    assert sel.error / sel.total < 1e-6


def test_head_groups_respect_partition_quotas():
    _, gram, w = _problem(c=64)
    part = torch.arange(8) // 2  # 8 heads of 8 columns, 4 KV groups of 2 query heads
    sel = select_groups(gram, w, torch.tensor([1, 1, 1, 1]), group=8, partition=part)
    assert torch.equal(torch.bincount(part[sel.keep], minlength=4), torch.ones(4, dtype=torch.long))
    assert sel.weight.shape == (w.shape[0], 32)


def test_greedy_elimination_finds_the_obvious_support():
    # two channels carry all the output; the others are noise with zero weight
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 10, generator=g)
    w = torch.zeros(5, 10)
    w[:, [2, 7]] = torch.randn(5, 2, generator=g)
    sel = select_groups(x.t() @ x, w, 2, damp=1e-6)
    assert sel.keep.tolist() == [2, 7]
    assert sel.error / sel.total < 1e-4
