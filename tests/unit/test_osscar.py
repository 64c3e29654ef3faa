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


# ---------------------------------------------------------------- fast (block) elimination vs exact greedy
def _brute_greedy(gram: torch.Tensor, w: torch.Tensor, quota: int, lam: float) -> torch.Tensor:
    """One-at-a-time backward elimination by re-solving f(S) for every candidate (reference)."""
    keep = list(range(w.shape[1]))
    while len(keep) > quota:
        errs = [objective(gram, w, torch.tensor(keep[:i] + keep[i + 1:]), 1, lam) for i in range(len(keep))]
        keep.pop(min(range(len(keep)), key=errs.__getitem__))
    return torch.tensor(keep)


def _magnitude_error(gram: torch.Tensor, w: torch.Tensor, quota: int) -> float:
    lam = damping(gram.double(), 0.01)
    mag = torch.argsort(w.pow(2).sum(0) * gram.diagonal(), descending=True)[:quota].sort().values
    return objective(gram, w, mag, 1, lam)


def test_exact_path_is_the_one_at_a_time_greedy():
    for seed in range(2):
        _x, gram, w = _problem(c=24, out=8, n=200, seed=seed)
        lam = damping(gram.double(), 0.01)
        greedy = _brute_greedy(gram, w, 12, lam)
        sel = select_groups(gram, w, 12, max_swaps=0, exact=True)
        if objective(gram, w, greedy, 1, lam) <= _magnitude_error(gram, w, 12):
            assert sel.keep.tolist() == greedy.tolist()
        # chunk=1 is the same path
        assert torch.equal(select_groups(gram, w, 12, max_swaps=0, chunk=1).keep, sel.keep)


def test_fast_elimination_within_one_percent_of_exact_greedy():
    for c, seed in [(64, 0), (128, 1), (256, 2)]:
        _x, gram, w = _problem(c=c, out=32, n=3 * c, seed=seed)
        for swaps in (0, 8):
            fast = select_groups(gram, w, c // 2, max_swaps=swaps)
            exact = select_groups(gram, w, c // 2, max_swaps=swaps, exact=True)
            assert fast.error <= exact.error * 1.01, (c, swaps, fast.error, exact.error)
            assert fast.error <= _magnitude_error(gram, w, c // 2) + 1e-6


def test_fast_path_error_matches_its_support_and_refit():
    _x, gram, w = _problem(c=96, out=16, n=300, seed=4)
    sel = select_groups(gram, w, 40)
    lam = damping(gram.double(), 0.01)
    assert abs(sel.error - objective(gram, w, sel.keep, 1, lam)) <= 1e-9 * sel.total
    assert torch.allclose(sel.weight, refit(gram, w, sel.keep, 1, lam), rtol=1e-5, atol=1e-5)


def test_kept_count_is_exact_for_every_quota_and_block_setting():
    _x, gram, w = _problem(c=80, out=8, n=240, seed=5)
    for quota in (1, 7, 33, 40, 79):
        for kw in ({}, {"exact": True}, {"chunk": 9}, {"frac": 0.9}, {"frac": 0.01}):
            sel = select_groups(gram, w, quota, max_swaps=3, **kw)
            assert len(sel.keep) == quota and len(torch.unique(sel.keep)) == quota
            assert torch.equal(sel.keep, sel.keep.sort().values) and sel.weight.shape == (8, quota)
    part = torch.arange(20) // 5  # 20 heads of 4 columns in 4 partitions
    sel = select_groups(gram, w, torch.tensor([2, 3, 1, 4]), group=4, partition=part, max_swaps=3)
    assert torch.bincount(part[sel.keep], minlength=4).tolist() == [2, 3, 1, 4]
