"""The pure math of expert pruning (pare.ops.experts) on small hand-made tensors."""

from __future__ import annotations

import pytest
import torch

from pare.ops import experts as ops


def _sums():
    # 3 tokens, top-2 of 3 experts; expert 2 is never selected
    index = torch.tensor([[0, 1], [1, 0], [0, 1]])
    gate = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.9, 0.1]])
    token, expert, g = ops.routed_pairs(index, gate)
    norms = torch.tensor([2.0, 4.0, 1.0, 3.0, 2.0, 4.0])  # ||f|| of each (token, slot) pair
    return token, expert, g, ops.expert_sums(expert, g, norms, 3)


def test_routed_pairs_flatten_token_major():
    token, expert, gate, _ = _sums()
    assert token.tolist() == [0, 0, 1, 1, 2, 2]
    assert expert.tolist() == [0, 1, 1, 0, 0, 1]
    assert gate.tolist() == pytest.approx([0.75, 0.25, 0.5, 0.5, 0.9, 0.1])


def test_scores_follow_their_definitions():
    *_, sums = _sums()
    # expert 0: pairs (g, ||f||) = (0.75, 2), (0.5, 3), (0.9, 2); expert 1: (0.25, 4), (0.5, 1), (0.1, 4)
    reap = ops.expert_scores("reap", sums, tokens=3)
    assert reap.tolist() == pytest.approx([(1.5 + 1.5 + 1.8) / 3, (1.0 + 0.5 + 0.4) / 3, 0.0])
    assert ops.expert_scores("frequency", sums, 3).tolist() == pytest.approx([1.0, 1.0, 0.0])
    assert ops.expert_scores("gate", sums, 3).tolist() == pytest.approx([2.15 / 3, 0.85 / 3, 0.0])
    recon = ops.expert_scores("reconstruction", sums, 3)
    assert recon.tolist() == pytest.approx([(1.5**2 + 1.5**2 + 1.8**2) / 3, (1.0 + 0.25 + 0.16) / 3, 0.0])
    with pytest.raises(ValueError, match="reap"):
        ops.expert_scores("nope", sums, 3)


def test_keep_experts_is_sorted_and_breaks_ties_by_index():
    scores = torch.tensor([0.5, 2.0, 0.5, 1.0, 0.5])
    assert ops.keep_experts(scores, 3).tolist() == [0, 1, 3]
    assert ops.keep_experts(scores, 5).tolist() == [0, 1, 2, 3, 4]


def test_global_counts_respect_minimum_and_total():
    flat = torch.tensor([1.0, 1.0, 1.0, 1.0])  # every share 0.25
    peaked = torch.tensor([10.0, 0.0, 0.0, 0.0])  # one expert holds all the saliency
    counts = ops.global_counts([flat, peaked], keep_total=5, minimum=1)
    assert counts == [4, 1]
    assert ops.global_counts([flat, peaked], keep_total=4, minimum=2) == [2, 2]
    assert sum(ops.global_counts([flat, peaked, flat], keep_total=7, minimum=2)) == 7


def test_merge_groups_join_the_most_similar_kept_expert():
    out = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, -0.9]])
    sim = ops.cosine_similarity_matrix(out)
    assert torch.allclose(sim.diagonal(), torch.ones(4, dtype=sim.dtype))
    groups = ops.merge_groups(sim, torch.tensor([0, 1]))
    assert groups == {0: [0, 2, 3], 1: [1]}  # expert 3 points away from both: cosine picks 0 (0.11 > -0.99)
    assert ops.merge_groups(sim, torch.tensor([0, 1, 2, 3])) == {0: [0], 1: [1], 2: [2], 3: [3]}


def test_merge_params_is_the_frequency_weighted_mean():
    param = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    merged = ops.merge_params(param, {0: [0, 2], 1: [1, 3]}, torch.tensor([3.0, 1.0, 1.0, 0.0]))
    assert torch.allclose(merged[0], (3 * param[0] + param[2]) / 4)
    assert torch.allclose(merged[1], param[1])  # expert 3 has weight 0
    uniform = ops.merge_params(param, {0: [0, 3]}, torch.zeros(4))  # no frequency: plain mean
    assert torch.allclose(uniform[0], (param[0] + param[3]) / 2)


def test_keep_experts_in_groups_keeps_as_many_of_each_group():
    scores = torch.tensor([9.0, 8.0, 7.0, 6.0, 1.0, 2.0, 3.0, 4.0])  # group 0 outscores group 1 everywhere
    assert ops.keep_experts(scores, 4).tolist() == [0, 1, 2, 3]
    assert ops.keep_experts(scores, 4, groups=2).tolist() == [0, 1, 6, 7]  # the best two of each group


def test_routing_changed_maps_kept_experts_back_and_compares_gates():
    # before: 4 experts, top-2; after: experts [0, 2, 3] kept (new index 1 is old expert 2)
    old_index = torch.tensor([[0, 2], [1, 3], [3, 0], [2, 0]])
    old_gate = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.8, 0.2]])
    new_index = torch.tensor([[0, 1], [2, 0], [2, 0], [1, 0]])
    new_gate = torch.tensor([[0.6, 0.4], [0.6, 0.4], [0.5, 0.5], [0.8 + 1e-3, 0.2]])
    kept = torch.tensor([0, 2, 3])
    changed = ops.routing_changed(old_index, old_gate, new_index, new_gate, kept, num_before=4)
    # token 0: same experts and gates; 1: expert 1 was removed; 2: same; 3: a gate moved by 1e-3
    assert changed.tolist() == [False, True, False, True]
    tiny = new_gate.clone()
    tiny[3, 0] = 0.8 * (1 + 1e-7)  # within rtol: rounding of a renormalised gate
    assert ops.routing_changed(old_index, old_gate, new_index, tiny, kept, 4).tolist() == [False, True, False, False]


def test_routing_changed_dropped_slots_and_other_top_k():
    kept = torch.tensor([0, 1, 3])
    old_index = torch.tensor([[0, 4], [1, 2]])  # 4 = E: a slot the router dropped
    new_index = torch.tensor([[0, 3], [1, 0]])  # 3 = E': dropped after the cut
    gate = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    assert ops.routing_changed(old_index, gate, new_index, gate, kept, 4).tolist() == [False, True]
    one = ops.routing_changed(old_index, gate, new_index[:, :1], gate[:, :1], kept, 4)
    assert one.tolist() == [True, True]  # another top-k: every token runs again
