"""Sub-layer pruning: replace attention and/or MLP blocks by their residual identity, ranked by NRI.

Each candidate block (the attention or the MLP / MoE block of a layer) is removed on its own and
judged by its normalised relative impact on held-out calibration perplexity:

    NRI(b) = ((PPL_without_b - PPL_dense) / PPL_dense) / params(b)

the quality lost per parameter saved (cf. the sub-layer pruning literature, e.g. "FinerCut",
Zhang et al., 2024, arXiv 2405.18218, and "What Matters in Transformers? Not All Attention is
Needed", He et al., 2024, arXiv 2406.15786). The ``k`` blocks of lowest NRI are removed. Scoring
starts each candidate from the cached input of its layer (:class:`PrefixCache`), which is the same
computation as a full forward without the block.

Targets: ``num_sublayers=k``; or ``param_ratio`` / ``target_params``, met by removing blocks in
ascending NRI order until at least that many parameters are gone (ratio of all parameters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pare.arch.roles import ModelArch
from pare.arch.surgery.depth import block_paths, remove_sublayer, sublayer_parameters, sublayer_removed
from pare.config import PruneConfig, help_field, register
from pare.errors import ConfigError
from pare.methods.base import PruneContext, StructuralPruner
from pare.methods.layers import holdout_windows, parse_layer_spec
from pare.methods.ppl_window import PrefixCache
from pare.ops.similarity import normalized_relative_impact, perplexity_of

PARTS = ("attention", "mlp")


@dataclass(frozen=True)
class SublayerConfig(PruneConfig):
    """Which blocks may go, and how many (set at most one of the three targets).

    Attributes:
        num_sublayers: number of attention/MLP blocks to remove (default 1).
        param_ratio: fraction of all parameters to remove, in (0, 1).
        target_params: parameter count to reach.
        parts: block kinds considered: ``attention``, ``mlp`` or both.
        layers: candidate layers (``"1-11"``, ``"3,7"``); default every layer.
        holdout: fraction of the calibration windows (the last ones) on which perplexity is scored.
    """

    method: ClassVar[str] = "sublayer"

    num_sublayers: int | None = help_field(None, "number of attention/MLP blocks to remove (default 1)")
    param_ratio: float | None = help_field(None, "fraction of all parameters to remove, in (0, 1)")
    target_params: int | None = help_field(None, "parameter count to reach")
    parts: tuple[str, ...] = help_field(PARTS, "block kinds to consider: attention, mlp")
    layers: str = help_field("", "candidate layers, e.g. '1-11' (default: all layers)")
    holdout: float = help_field(1.0, "fraction of the calibration windows used to score perplexity, in (0, 1]")

    def __post_init__(self) -> None:
        super().__post_init__()
        given = [n for n in ("num_sublayers", "param_ratio", "target_params") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ConfigError(f"give only one of num_sublayers, param_ratio, target_params (got {given})")
        k = self.num_sublayers
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ConfigError(f"num_sublayers must be a positive integer, got {k!r}")
        r = self.param_ratio
        if r is not None and not (isinstance(r, (int, float)) and 0 < r < 1):
            raise ConfigError(f"param_ratio must be in (0, 1), got {r!r}")
        if self.target_params is not None and (not isinstance(self.target_params, int) or self.target_params < 1):
            raise ConfigError(f"target_params must be a positive integer, got {self.target_params!r}")
        parts = (self.parts,) if isinstance(self.parts, str) else self.parts
        bad = [p for p in parts if p not in PARTS]
        if bad or not parts:
            raise ConfigError(f"parts must be a non-empty subset of {list(PARTS)}, got {list(parts)}")
        if self.layers:
            parse_layer_spec(self.layers)
        if not (isinstance(self.holdout, (int, float)) and 0 < self.holdout <= 1):
            raise ConfigError(f"holdout must be in (0, 1], got {self.holdout!r}")

    def candidate_layers(self, num_layers: int) -> list[int]:
        if not self.layers:
            return list(range(num_layers))
        chosen = sorted(set(parse_layer_spec(self.layers)))
        bad = [i for i in chosen if not 0 <= i < num_layers]
        if bad:
            raise ConfigError(f"layers {bad} outside the model (valid: 0..{num_layers - 1})")
        return chosen


def _count(config: SublayerConfig, nri: list[float], params: list[int], total: int) -> int:
    """How many of the NRI-ranked blocks to remove."""
    if config.param_ratio is None and config.target_params is None:
        k = config.num_sublayers or 1
    else:
        need = config.param_ratio * total if config.param_ratio is not None else total - (config.target_params or 0)
        order = sorted(range(len(nri)), key=lambda i: (nri[i], i))
        removed, k = 0, 0
        while k < len(order) and removed < need - 1e-9:
            removed += params[order[k]]
            k += 1
        if removed < need - 1e-9:
            raise ConfigError(
                f"removing every candidate block frees {removed} parameters, less than the {math.ceil(need)} asked"
            )
        k = max(k, 1)
    if k > len(nri):
        raise ConfigError(f"asked to remove {k} blocks but only {len(nri)} are candidates")
    return k


@register
class SublayerPruner(StructuralPruner):
    """NRI ranking of attention/MLP blocks, then replacement by the residual identity."""

    config_class = SublayerConfig
    config: SublayerConfig

    def _score(self, ctx: PruneContext, cache: PrefixCache, layer_idx: int, part: str) -> float:
        with sublayer_removed(ctx.model, ctx.arch, layer_idx, part):
            return perplexity_of(*cache.nll_from(layer_idx))

    def check(self, model: nn.Module, arch: ModelArch) -> None:
        self.config.candidate_layers(arch.num_layers)

    @torch.no_grad()
    def run(self, ctx: PruneContext) -> None:
        parts = (self.config.parts,) if isinstance(self.config.parts, str) else tuple(self.config.parts)
        layers = self.config.candidate_layers(ctx.arch.num_layers)
        cands = [(i, p) for i in layers for p in PARTS if p in parts and block_paths(ctx.arch, i, p)]
        cache = PrefixCache(ctx, holdout_windows(ctx, self.config.holdout))
        base = perplexity_of(*cache.nll_from(ctx.arch.num_layers))
        params = [sublayer_parameters(ctx.arch, ctx.model, i, p) for i, p in cands]
        ppl = [self._score(ctx, cache, i, p) for i, p in cands]
        nri = [normalized_relative_impact(base, a, n) for a, n in zip(ppl, params, strict=True)]
        total = sum(p.numel() for p in ctx.model.parameters())
        k = _count(self.config, nri, params, total)
        order = sorted(range(len(cands)), key=lambda c: (nri[c], c))[:k]
        for part in PARTS:
            present = sum(1 for i in range(ctx.arch.num_layers) if block_paths(ctx.arch, i, part))
            if present and sum(1 for c in order if cands[c][1] == part) >= present:
                raise ConfigError(
                    f"removing {k} blocks would take out every {part} block of the model; keep at least one "
                    f"(ask for fewer blocks, or restrict --parts / --layers)"
                )
        ctx.report.scores["ppl_base"] = base
        ctx.report.scores["sublayers"] = [
            {"layer": i, "part": p, "params": n, "ppl": a, "nri": r}
            for (i, p), n, a, r in zip(cands, params, ppl, nri, strict=True)
        ]
        for c in sorted(order):
            i, p = cands[c]
            ctx.report.edits.append(remove_sublayer(ctx.model, ctx.arch, i, p))
        ctx.report.uniform = False
        chosen = [f"{cands[c][0]}.{cands[c][1]}" for c in sorted(order)]
        ctx.report.scores["removed_sublayers"] = chosen
        ctx.report.scores["reason"] = (
            f"lowest NRI (relative held-out calibration PPL change per parameter) of {len(cands)} blocks: "
            + ", ".join(f"{cands[c][0]}.{cands[c][1]} ({nri[c]:.3e})" for c in sorted(order))
        )
        ctx.report.figures["param_ratio_removed"] = sum(params[c] for c in order) / total
