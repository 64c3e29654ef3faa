"""Exact invariants of the depth-pruning scores in pare.ops.similarity."""

from __future__ import annotations

import math

import pytest
import torch

from pare.eval.perplexity import nll_sum
from pare.ops.similarity import (
    angular_distance,
    best_span,
    block_influence,
    lowest,
    normalized_relative_impact,
    perplexity_of,
    token_cosine,
)


def test_identity_layer_has_zero_influence_and_distance():
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    assert block_influence(x, x) == pytest.approx(0.0, abs=1e-12)
    assert block_influence(x, 3.0 * x) == pytest.approx(0.0, abs=1e-12)  # scale does not matter
    assert float(angular_distance(x, x).max()) == pytest.approx(0.0, abs=1e-6)


def test_opposite_and_orthogonal_states():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert block_influence(x, -x) == pytest.approx(2.0)
    y = torch.tensor([[0.0, 1.0], [-3.0, 0.0]])
    assert block_influence(x, y) == pytest.approx(1.0)
    assert torch.allclose(angular_distance(x, y), torch.full((2,), 0.5, dtype=torch.float64))
    assert torch.allclose(angular_distance(x, -x), torch.ones(2, dtype=torch.float64))


def test_token_cosine_is_per_token_and_checks_shapes():
    x = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])
    y = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]])
    assert torch.allclose(token_cosine(x, y), torch.tensor([[1.0, 1 / math.sqrt(2)]], dtype=torch.float64))
    with pytest.raises(ValueError):
        token_cosine(x, y[..., :1])


def test_nri_and_relative_change():
    assert normalized_relative_impact(10.0, 11.0, 100) == pytest.approx(0.001)
    assert normalized_relative_impact(10.0, 9.0, 10) == pytest.approx(-0.01)
    with pytest.raises(ValueError):
        normalized_relative_impact(10.0, 11.0, 0)


def test_nll_sum_matches_mean_cross_entropy_and_uniform_logits():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 7, 11, generator=g)
    ids = torch.randint(0, 11, (3, 7), generator=g)
    nll, n = nll_sum(logits, ids)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    assert n == 18 and nll / n == pytest.approx(float(ref), rel=1e-6)
    # batches sum to the whole
    parts = [nll_sum(logits[i : i + 1], ids[i : i + 1])[0] for i in range(3)]
    assert sum(parts) == pytest.approx(nll, rel=1e-12)
    nll, n = nll_sum(torch.zeros(1, 4, 16), torch.zeros(1, 4, dtype=torch.long))
    assert perplexity_of(nll, n) == pytest.approx(16.0)


def test_selection_helpers_break_ties_by_index():
    assert best_span([0.3, 0.1, 0.1]) == 1
    assert lowest([0.5, 0.1, 0.1, 0.0], 2) == [1, 3]
    assert lowest([0.5, 0.1, 0.1, 0.0], 3) == [1, 2, 3]
    with pytest.raises(ValueError):
        lowest([1.0], 2)
    with pytest.raises(ValueError):
        best_span([])
