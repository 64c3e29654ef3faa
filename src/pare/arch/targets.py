"""Prunable matrices ("targets") of a decoder layer, as ``[out, in]`` views.

A target is an ``nn.Linear`` / ``Conv1D`` weight, or one expert's slice of a fused 3-D MoE
parameter (transformers 5 stores Mixtral-style experts as ``gate_up_proj [E, 2I, H]`` and
``down_proj [E, H, I]``, not as linears: walking ``nn.Linear`` alone would skip every expert).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from pare.arch.infer import _is_conv1d, _is_projection
from pare.arch.roles import LayerRoles
from pare.errors import ConfigError

InputKind = Literal["linear", "expert_in", "expert_mid"]


@dataclass(frozen=True)
class Target:
    """One prunable ``[out, in]`` matrix.

    Attributes:
        name: full name, ``model.layers.3.mlp.down_proj`` or ``model.layers.3.mlp.experts.down_proj[5]``.
        module: the owning module (a linear, a Conv1D, or the experts module).
        param: the parameter's attribute name on ``module``.
        conv1d: weight stored ``[in, out]`` (GPT-2).
        expert: index into the first dimension of a 3-D expert parameter.
        input_kind: what feeds it: the module's own input (``linear``), the tokens routed to the
            expert (``expert_in``) or the expert's activated intermediate (``expert_mid``).
    """

    name: str
    module: nn.Module
    param: str
    conv1d: bool = False
    expert: int | None = None
    input_kind: InputKind = "linear"
    gate_up_param: str | None = None

    def weight(self) -> torch.Tensor:
        """A view ``W: [out, in]`` of the live weight; in-place edits change the model."""
        p = getattr(self.module, self.param).data
        if self.expert is not None:
            return p[self.expert]
        return p.t() if self.conv1d else p

    @property
    def shape(self) -> tuple[int, int]:
        w = self.weight()
        return int(w.shape[0]), int(w.shape[1])


def _router_paths(roles: LayerRoles) -> set[str]:
    if roles.experts is None:
        return set()
    out = {roles.experts.router}
    if roles.experts.shared_gate:
        out.add(roles.experts.shared_gate)
    return out


def layer_targets(layer: nn.Module, roles: LayerRoles, prefix: str) -> list[Target]:
    """Every prunable matrix of one decoder layer (routers excluded: they are tiny and decisive)."""
    routers = _router_paths(roles)
    out: list[Target] = []
    for rel, module in layer.named_modules():
        if not rel or rel in routers or not _is_projection(module):
            continue
        out.append(Target(f"{prefix}.{rel}", module, "weight", conv1d=_is_conv1d(module)))
    ex = roles.experts
    if ex is not None:
        experts = layer.get_submodule(ex.path)
        for e in range(ex.num_experts):
            out.append(Target(f"{prefix}.{ex.path}.{ex.gate_up_param}[{e}]", experts, ex.gate_up_param,
                              expert=e, input_kind="expert_in", gate_up_param=ex.gate_up_param))
            out.append(Target(f"{prefix}.{ex.path}.{ex.down_param}[{e}]", experts, ex.down_param,
                              expert=e, input_kind="expert_mid", gate_up_param=ex.gate_up_param))
    return out


def select(targets: list[Target], include: tuple[str, ...], ignore: tuple[str, ...]) -> list[Target]:
    """Keep targets whose name matches an ``include`` regex (all when empty) and no ``ignore`` regex."""
    inc = [re.compile(p) for p in include]
    ign = [re.compile(p) for p in ignore]
    return [
        t for t in targets
        if (not inc or any(p.search(t.name) for p in inc)) and not any(p.search(t.name) for p in ign)
    ]


def check_selection(names: list[str], include: tuple[str, ...], ignore: tuple[str, ...]) -> None:
    """Raise ConfigError when a ``targets`` regex matches none of ``names`` (every prunable matrix's),
    or when ``targets`` and ``ignore`` together leave nothing."""
    for pattern in include:
        if not any(re.search(pattern, n) for n in names):
            examples = ", ".join(names[:4])
            raise ConfigError(
                f"targets regex {pattern!r} matches no prunable module; names look like: {examples}"
            )
    chosen = select_names(names, include, ignore)
    if not chosen:
        raise ConfigError(f"targets={list(include)} with ignore={list(ignore)} leaves nothing to prune")


def select_names(names: list[str], include: tuple[str, ...], ignore: tuple[str, ...]) -> list[str]:
    return [
        n for n in names
        if (not include or any(re.search(p, n) for p in include)) and not any(re.search(p, n) for p in ignore)
    ]
