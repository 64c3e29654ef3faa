"""Pure tensor math of MoE expert pruning: saliency of whole experts, which to keep, and merging.

Scores (one value per expert of a layer, higher = more important), from routing statistics over the
calibration tokens ``T`` (``count[e]``: tokens routed to ``e``; ``g``: the router's gate value of
``e`` for a token, as the model multiplies the expert's output by it; ``f_e(x)``: the expert's output):

- ``reap``: router-weighted expert activation pruning (Lasby et al., 2025, "REAP the Experts: Why
  Pruning Prevails for One-Shot MoE compression", arXiv 2510.13999):
  ``S_e = 1/|X_e| sum_{x in X_e} g_e(x) ||f_e(x)||_2`` over the tokens ``X_e`` routed to ``e``;
- ``frequency``: ``count[e] / T``, the share of tokens that select ``e`` in their top-k;
- ``gate``: ``sum_t g_e(x_t) / T``, the mean gate value over all tokens (0 where ``e`` is not selected);
- ``reconstruction``: ``1/T sum_t ||g_e(x_t) f_e(x_t)||^2``, the mean squared error of the MoE
  block's output when ``e``'s contribution is dropped and the other experts' weights are left as
  they are.

Merging (HC-SMoE, Chen et al., 2024, arXiv 2410.08589; MC-SMoE, Li et al., 2024, arXiv 2310.01334):
each removed expert joins the kept expert whose mean output on the same probe tokens is most similar
(cosine), and every group's parameters become their frequency-weighted average.
"""

from __future__ import annotations

import torch

IMPORTANCES = ("reap", "frequency", "gate", "reconstruction")


def routed_pairs(top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Flatten a router's top-k choice into (token, expert) pairs.

    Args:
        top_k_index: ``[T, k]`` expert indices per token.
        top_k_weights: ``[T, k]`` gate values the experts' outputs are multiplied by.

    Returns:
        ``token [P]``, ``expert [P]``, ``gate [P]`` (fp32) with ``P = T * k``.
    """
    t, k = top_k_index.shape
    token = torch.arange(t, device=top_k_index.device).repeat_interleave(k)
    return token, top_k_index.reshape(-1).long(), top_k_weights.reshape(-1).float()


def routing_changed(old_index: torch.Tensor, old_weights: torch.Tensor, new_index: torch.Tensor,
                    new_weights: torch.Tensor, kept: torch.Tensor, num_before: int, rtol: float = 1e-5) -> torch.Tensor:
    """Which tokens a router sends elsewhere after experts were removed.

    Args:
        old_index, old_weights: ``[T, k]`` the choice before the cut (experts ``0..E-1``; an index
            ``>= E`` marks a slot the router dropped).
        new_index, new_weights: ``[T, k']`` the choice after it, in the kept experts' numbering.
        kept: ``[E']`` the kept experts' indices before the cut.
        num_before: ``E``.
        rtol: gate values within this relative difference count as unchanged.

    Returns:
        ``[T]`` bool: True where the token's experts (slot by slot) or gate values differ; every token
        when ``k' != k`` (or the weights are not one per slot).
    """
    if old_index.shape != new_index.shape or old_weights.shape != new_weights.shape:
        return torch.ones(new_index.shape[0], dtype=torch.bool, device=new_index.device)
    kept = kept.to(new_index.device)
    inside = new_index < kept.numel()
    mapped = torch.where(inside, kept[new_index.long().clamp(max=kept.numel() - 1)], -1)
    before = torch.where(old_index < num_before, old_index.long(), -1)
    close = torch.isclose(new_weights.float(), old_weights.float(), rtol=rtol, atol=0.0)
    return ~((mapped == before) & close).all(dim=-1)


def expert_sums(expert: torch.Tensor, gate: torch.Tensor, out_norm: torch.Tensor,
                num_experts: int) -> dict[str, torch.Tensor]:
    """Per-expert sums over routed pairs.

    Args:
        expert: ``[P]`` expert of each pair. gate: ``[P]`` its gate value. out_norm: ``[P]``
            ``||f_e(x)||_2`` of the pair.
        num_experts: ``E``.

    Returns:
        ``count``, ``gate`` (sum of g), ``reap`` (sum of ``g ||f||``), ``energy`` (sum of
        ``(g ||f||)^2``), each fp64 ``[E]`` (sums over many tokens).
    """
    def add(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(num_experts, dtype=torch.float64, device=expert.device).index_add_(0, expert, values)

    weighted = gate.double() * out_norm.double()
    return {
        "count": add(torch.ones_like(weighted)),
        "gate": add(gate.double()),
        "reap": add(weighted),
        "energy": add(weighted.pow(2)),
    }


def expert_scores(importance: str, sums: dict[str, torch.Tensor], tokens: int) -> torch.Tensor:
    """One saliency per expert ``[E]`` from :func:`expert_sums` accumulated over ``tokens`` tokens
    (see the module docstring); an expert no token reached scores 0."""
    count = sums["count"]
    if importance == "reap":
        return torch.where(count > 0, sums["reap"] / count.clamp_min(1), torch.zeros_like(count))
    if importance == "frequency":
        return count / max(tokens, 1)
    if importance == "gate":
        return sums["gate"] / max(tokens, 1)
    if importance == "reconstruction":
        return sums["energy"] / max(tokens, 1)
    raise ValueError(f"unknown expert importance {importance!r}; choose one of {list(IMPORTANCES)}")


def keep_experts(scores: torch.Tensor, k: int, groups: int = 1) -> torch.Tensor:
    """Indices of the ``k`` highest scores, ascending; on ties the lower index is kept.

    With ``groups`` > 1 (a router that picks experts inside ``groups`` contiguous groups, DeepSeek's
    ``n_group``) the ``k / groups`` best of every group are kept, so each group keeps as many.
    """
    if groups > 1:
        per = scores.numel() // groups
        return torch.cat([keep_experts(scores[g * per:(g + 1) * per], k // groups) + g * per for g in range(groups)])
    order = torch.argsort(-scores.double(), stable=True)
    return order[:k].sort().values


def global_counts(scores: list[torch.Tensor], keep_total: int, minimum: int) -> list[int]:
    """Experts kept per layer when all layers are ranked together.

    Each layer's scores are divided by their sum (its share of the layer's saliency, so layers whose
    outputs differ in scale compare), then the ``keep_total`` highest shares over all layers are
    kept, with at least ``minimum`` per layer (the router's top-k needs that many).
    """
    counts = [min(minimum, s.numel()) for s in scores]
    shares = [s.double() / s.double().sum().clamp_min(1e-30) for s in scores]
    rest = []
    for layer, share in enumerate(shares):
        ranked = torch.sort(share, descending=True, stable=True).values
        rest += [(float(v), layer) for v in ranked[counts[layer]:]]
    rest.sort(key=lambda p: -p[0])
    for _value, layer in rest[: max(0, keep_total - sum(counts))]:
        counts[layer] += 1
    return counts


def cosine_similarity_matrix(x: torch.Tensor) -> torch.Tensor:
    """``[E, E]`` cosine similarity of the rows of ``x: [E, D]`` (rows of zeros are similar to nothing)."""
    x = x.double()
    norm = x.norm(dim=1, keepdim=True)
    unit = torch.where(norm > 0, x / norm.clamp_min(1e-30), torch.zeros_like(x))
    return unit @ unit.t()


def merge_groups(similarity: torch.Tensor, keep: torch.Tensor) -> dict[int, list[int]]:
    """Assign every removed expert to its most similar kept expert.

    Args:
        similarity: ``[E, E]``.
        keep: indices of the kept experts.

    Returns:
        ``{kept: [kept, removed...]}`` for every kept expert (a group of one when nothing joins it).
    """
    kept = [int(i) for i in keep]
    groups = {k: [k] for k in kept}
    kept_idx = torch.as_tensor(kept, device=similarity.device)
    for e in range(similarity.shape[0]):
        if e in groups:
            continue
        row = similarity[e, kept_idx]
        groups[kept[int(torch.argmax(row))]].append(e)  # argmax: first on ties
    return groups


def merge_params(param: torch.Tensor, groups: dict[int, list[int]], weights: torch.Tensor) -> torch.Tensor:
    """The kept experts' slices of a per-expert parameter after merging.

    Args:
        param: ``[E, ...]`` (a fused weight, or a per-expert bias).
        groups: from :func:`merge_groups`, in the order the kept experts are stored.
        weights: ``[E]`` merge weights (calibration frequency); a group whose weights are all zero
            is averaged uniformly.

    Returns:
        ``[len(groups), ...]`` in ``param``'s dtype: ``sum_j w_j P_j / sum_j w_j`` per group.
    """
    out = []
    for members in groups.values():
        idx = torch.as_tensor(members, device=param.device)
        w = weights.to(param.device).double()[idx]
        w = torch.ones_like(w) if float(w.sum()) <= 0 else w
        stacked = param.index_select(0, idx).double()
        shape = (-1,) + (1,) * (stacked.dim() - 1)
        out.append(((stacked * w.reshape(shape)).sum(0) / w.sum()).to(param.dtype))
    return torch.stack(out)


__all__ = [
    "IMPORTANCES",
    "cosine_similarity_matrix",
    "expert_scores",
    "expert_sums",
    "global_counts",
    "keep_experts",
    "merge_groups",
    "merge_params",
    "routed_pairs",
    "routing_changed",
]
