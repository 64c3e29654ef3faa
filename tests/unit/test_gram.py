"""Gram accumulation on the upper block triangle equals ``X^T X``."""

from __future__ import annotations

import pytest
import torch

from pare.calibration.stats import InputStats
from pare.ops.gram import add_gram_upper_, mirror_upper_


@pytest.mark.parametrize(("n", "strip"), [(10, 3), (12, 4), (7, 16), (40, 13)])
def test_upper_strips_then_mirror_equal_the_full_product(n: int, strip: int) -> None:
    g = torch.Generator().manual_seed(n)
    batches = [torch.randn(t, n, generator=g, dtype=torch.float64) for t in (5, 9, 1)]
    acc = torch.zeros(n, n, dtype=torch.float64)
    for x in batches:
        add_gram_upper_(acc, x, strip)
    full = torch.cat(batches)
    got = mirror_upper_(acc, strip)
    assert got is acc
    torch.testing.assert_close(got, full.t() @ full)
    assert torch.equal(got, got.t())  # exactly symmetric


def test_upper_strips_skip_the_lower_blocks() -> None:
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    acc = torch.zeros(8, 8)
    add_gram_upper_(acc, x, strip=4)
    assert torch.count_nonzero(acc[4:, :4]) == 0  # the half of the work that is not done
    torch.testing.assert_close(acc[:4, 4:], x[:, :4].t() @ x[:, 4:])


def test_input_stats_gram_can_be_read_between_batches() -> None:
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 9, 300, generator=g) for _ in range(3)]  # 300 columns: two strips
    stats = InputStats(want_gram=True)
    seen = []
    for x in xs:
        stats.add(x)
        seen.append(x.reshape(-1, 300))
        so_far = torch.cat(seen)
        assert stats.gram is not None
        torch.testing.assert_close(stats.gram, so_far.t() @ so_far, rtol=1e-5, atol=1e-3)
    assert stats.tokens == 54
    torch.testing.assert_close(stats.sq_sum, so_far.pow(2).sum(0))
