"""Expert surgery: remove (or merge) whole experts of a MoE layer, with the router's rows.

transformers 5 stores a layer's routed experts as fused parameters whose first dimension is the
expert (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``, gpt-oss's per-expert biases
``[E, 2I]`` / ``[E, H]``) and the router as a module whose weight rows (and bias, DeepSeek-V3's
``e_score_correction_bias``) are per expert. Removing experts keeps the same slices of every such
tensor, rewrites the module attributes the forwards read (``num_experts``, ``top_k``) and, through
:func:`sync_expert_config`, the config (``num_local_experts`` / ``num_experts``,
``num_experts_per_tok``). Shared experts are separate modules and are never touched. A router that
selects experts within contiguous groups (DeepSeek's ``n_group`` / ``topk_group``) keeps its groups:
the same number of experts is removed from each (:func:`grouped_count_problem` says which counts work).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pare.arch.roles import ExpertsRoles, ModelArch
from pare.arch.surgery.edits import Edit, Experts
from pare.errors import ConfigError, PareError
from pare.ops.experts import merge_params

if TYPE_CHECKING:
    from pare.arch.overrides import ArchOverride

COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts")
TOP_K_ATTRS = ("top_k", "num_experts_per_tok")
CONFIG_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")


def _per_expert(module: nn.Module, num_experts: int) -> list[tuple[str, bool]]:
    """Names of the module's own parameters / buffers whose first dimension is the expert:
    ``(name, is_parameter)``."""
    out = [(n, True) for n, p in module.named_parameters(recurse=False) if p.dim() >= 1 and p.shape[0] == num_experts]
    out += [(n, False) for n, b in module.named_buffers(recurse=False)
            if b is not None and b.dim() >= 1 and b.shape[0] == num_experts]
    return out


def _replace(module: nn.Module, name: str, is_param: bool, value: torch.Tensor) -> None:
    if is_param:
        old = getattr(module, name)
        setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
    else:
        module._buffers[name] = value.contiguous()


def _modules(layer: nn.Module, ex: ExpertsRoles) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(experts, router, the MoE block holding them)."""
    parent = ex.path.rsplit(".", 1)[0] if "." in ex.path else ""
    block = layer.get_submodule(parent) if parent else layer
    return layer.get_submodule(ex.path), layer.get_submodule(ex.router), block


def group_limited(router: nn.Module) -> bool:
    """Whether the router picks experts inside groups (DeepSeek-V3's ``n_group`` > 1, DeepSeek-V2's
    ``group_limited_greedy``): experts can then only be removed evenly from every group."""
    return expert_groups(router) > 1


def expert_groups(router: nn.Module) -> int:
    """How many contiguous groups the router selects experts within (1: no groups). DeepSeek-V2's
    ``greedy`` routing ignores its ``n_group``."""
    if getattr(router, "topk_method", None) == "greedy":
        return 1
    return int(getattr(router, "num_group", getattr(router, "n_group", 1)) or 1)


def grouped_count_problem(router: nn.Module, num_experts: int, keep: int, top_k: int) -> str | None:
    """Why keeping ``keep`` of ``num_experts`` experts breaks a group-limited router, or None.

    Experts ``g*E/G ... (g+1)*E/G`` form group ``g`` (the router reshapes its scores to ``[G, E/G]``), so
    every group must keep the same number of experts, at least two (DeepSeek-V3 scores a group by
    the sum of its two best experts) unless the groups had fewer, and the ``topk_group`` groups a token
    may use must still hold its ``top_k`` experts. ``n_group`` and ``topk_group`` stay as they are.
    """
    groups = expert_groups(router)
    if groups <= 1:
        return None
    per = num_experts // groups
    least = min(2, per)
    topk_group = int(getattr(router, "topk_group", groups) or groups)
    valid = [m * groups for m in range(least, per + 1) if m * topk_group >= top_k]
    if keep % groups == 0 and keep // groups >= least and keep // groups * topk_group >= top_k:
        return None
    return (f"the router selects experts within {groups} groups of {per} (n_group={groups}, topk_group={topk_group}, "
            f"top_k={top_k}): every group must keep the same number of experts, at least {least}, and "
            f"{topk_group} groups must still hold {top_k} experts, so {keep} cannot be kept; counts that work: "
            f"{valid or 'none (lower top_k)'}")


def first_experts(router: nn.Module, num_experts: int, keep: int) -> torch.Tensor:
    """The first ``keep`` experts, or with a group-limited router the first ``keep / G`` of each group
    (the shapes a cut to ``keep`` leaves, for a replay)."""
    groups = expert_groups(router)
    if groups <= 1:
        return torch.arange(keep)
    per = num_experts // groups
    return (torch.arange(groups)[:, None] * per + torch.arange(keep // groups)).flatten()


def _set_counts(modules: Sequence[nn.Module], count: int, top_k: int | None) -> None:
    for m in modules:
        for name in COUNT_ATTRS:
            if isinstance(getattr(m, name, None), int):
                setattr(m, name, count)
        if top_k is not None:
            for name in TOP_K_ATTRS:
                if isinstance(getattr(m, name, None), int):
                    setattr(m, name, top_k)


def current_top_k(layer: nn.Module, ex: ExpertsRoles) -> int:
    """The experts each token selects in this layer (the router's ``top_k``, else the description's)."""
    _, router, block = _modules(layer, ex)
    for m in (router, block):
        for name in TOP_K_ATTRS:
            value = getattr(m, name, None)
            if isinstance(value, int):
                return value
    return ex.top_k


def remove_experts(model: nn.Module, arch: ModelArch, layer_idx: int, keep: torch.Tensor | Sequence[int],
                   top_k: int | None = None) -> Experts:
    """Keep experts ``keep`` (indices, stored in that order) of one MoE layer.

    Every per-expert parameter and buffer of the experts module and of the router is sliced on its
    first dimension; ``top_k`` (optional) sets how many experts each token selects.

    Raises:
        ConfigError: the layer has no routed experts, ``keep`` is empty or has repeats, fewer experts
            would be kept than tokens select (without a ``top_k`` that fits), or the router routes
            within groups.

    Returns:
        The :class:`~pare.arch.surgery.edits.Experts` edit.
    """
    layer = arch.layer_modules(model)[layer_idx]
    ex = arch.layers[layer_idx].experts
    if ex is None:
        raise ConfigError(f"layer {layer_idx} has no routed experts to remove")
    experts, router, block = _modules(layer, ex)
    idx = torch.as_tensor(keep, dtype=torch.long).flatten()
    k = int(idx.numel())
    if k == 0 or len(set(idx.tolist())) != k or int(idx.min()) < 0 or int(idx.max()) >= ex.num_experts:
        raise ConfigError(f"layer {layer_idx}: keep must list distinct experts in [0, {ex.num_experts}), got "
                          f"{idx.tolist()}")
    selects = top_k if top_k is not None else current_top_k(layer, ex)
    if selects > k:
        raise ConfigError(f"layer {layer_idx}: keeping {k} experts leaves fewer than the {selects} each token selects "
                          f"(num_experts_per_tok); keep at least {selects}, or lower it with top_k (--top-k)")
    groups = expert_groups(router)
    if groups > 1:
        why = grouped_count_problem(router, ex.num_experts, k, selects)
        per = ex.num_experts // groups
        counts = torch.bincount(idx // per, minlength=groups)
        if why is None and bool((counts != k // groups).any()):
            why = f"it keeps {counts.tolist()} experts of the {groups} groups, not {k // groups} of each"
        if why is not None:
            raise ConfigError(f"layer {layer_idx}: {why}")
        idx = idx.sort().values  # group by group, so the router's [G, E/G] reshape keeps every group
    for module in (experts, router):
        for name, is_param in _per_expert(module, ex.num_experts):
            value = getattr(module, name)
            _replace(module, name, is_param, value.index_select(0, idx.to(value.device)))
    _set_counts((experts, router, block), k, top_k)
    return Experts(layer_idx, k, top_k)


def merge_experts(model: nn.Module, arch: ModelArch, layer_idx: int, groups: dict[int, list[int]],
                  weights: torch.Tensor, top_k: int | None = None) -> Experts:
    """Merge each group of experts into its first member, then keep only those (see
    :func:`pare.ops.experts.merge_params`). The router keeps the first member's row.

    Args:
        groups: ``{kept: [kept, merged...]}``, every expert of the layer in exactly one group.
        weights: ``[E]`` merge weights (calibration frequency).
    """
    layer = arch.layer_modules(model)[layer_idx]
    ex = arch.layers[layer_idx].experts
    if ex is None:
        raise ConfigError(f"layer {layer_idx} has no routed experts to merge")
    members = sorted(e for g in groups.values() for e in g)
    if members != list(range(ex.num_experts)) or any(g[0] != k for k, g in groups.items()):
        raise PareError(f"layer {layer_idx}: merge groups must cover each of the {ex.num_experts} experts once")
    ordered = dict(sorted(groups.items()))
    experts = layer.get_submodule(ex.path)
    for name, is_param in _per_expert(experts, ex.num_experts):
        value = getattr(experts, name)
        merged = merge_params(value.data, ordered, weights)
        full = value.data.clone()
        full[torch.as_tensor(list(ordered), device=full.device)] = merged
        _replace(experts, name, is_param, full)
    return remove_experts(model, arch, layer_idx, list(ordered), top_k)


def sync_expert_config(model: nn.Module, arch: ModelArch, top_k: int | None) -> bool:
    """Write the experts count (when every MoE layer has the same) and ``num_experts_per_tok`` into the
    config; True when the config alone describes the experts. ``arch`` describes the model after the
    cut. With per-layer counts the config keeps its count and ``pare.load`` replays the edits."""
    cfg: Any = model.config
    counts = {r.experts.num_experts for r in arch.layers if r.experts is not None}
    if top_k is not None:
        for name in ("num_experts_per_tok", "top_k", "moe_topk"):
            if isinstance(getattr(cfg, name, None), int):
                setattr(cfg, name, top_k)
                break
    if len(counts) != 1:
        return False
    names = [arch.fields.num_experts] if arch.fields.num_experts else []
    names += [n for n in CONFIG_COUNT_FIELDS if n not in names and isinstance(getattr(cfg, n, None), int)]
    if not names:
        return False
    setattr(cfg, names[0], counts.pop())
    return True


def _replay_experts(model: nn.Module, edit: Experts, override: ArchOverride | None = None) -> None:
    from pare.arch import describe

    arch = describe(model, override)
    i = edit.layer
    ex = arch.layers[i].experts
    if ex is None:
        raise PareError(f"the recorded edit removes experts of layer {i}, which the rebuilt model has none of")
    k, top_k = edit.num_experts, edit.top_k
    if k > ex.num_experts:
        raise PareError(f"the saved config rebuilds layer {i} with {ex.num_experts} experts, fewer than the {k} "
                        "the recorded edit keeps: the config and the edits do not describe the pruned model")
    if k == ex.num_experts and top_k is None:
        return
    router = arch.layer_modules(model)[i].get_submodule(ex.router)
    remove_experts(model, arch, i, first_experts(router, ex.num_experts, k), None if top_k is None else int(top_k))


REPLAY: dict[type[Edit], Callable[[nn.Module, Any, ArchOverride | None], None]] = {Experts: _replay_experts}

__all__ = [
    "REPLAY", "current_top_k", "expert_groups", "first_experts", "group_limited", "grouped_count_problem",
    "merge_experts", "remove_experts", "sync_expert_config",
]
