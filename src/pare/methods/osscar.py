"""OSSCAR structured pruning of MLP channels (and attention heads) with least-squares refit.

Meng et al., "OSSCAR: One-Shot Structured Pruning in Vision and Language Models with Combinatorial
Optimization", ICML 2024 (arXiv 2403.12983). Per decoder layer, on calibration activations ``H``
entering the down projection (the MLP's intermediate channels) choose the kept channels ``S``
minimising ``||W H - B H_S||^2`` by combinatorial local search, refit ``B`` by ridge least squares
(:mod:`pare.ops.osscar`), then cut the channels from gate/up/down for real, so the model is
smaller and reloads with ``from_pretrained``. With ``attn_ratio`` the same is done for attention
heads as groups of ``head_dim`` input columns of ``o_proj`` (GQA kept valid; under latent attention,
MLA, groups of ``v_head_dim`` columns, each head cut with its query and ``kv_b`` rows).

Like AMD Quark's OSSCAR the kept width can be rounded (``round_to``, ``power_of_two``): widths that
are multiples of 64/128 or powers of two run faster on GPUs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pare.arch import ArchOverride, describe
from pare.arch.roles import AttentionRoles, ModelArch, in_features, weight_of
from pare.arch.surgery.mla import cut_mla_heads_to, mla_head_count, prune_mla_heads
from pare.arch.surgery.width import (
    check_fused_layout,
    config_rejects_heads,
    cut_heads_to,
    cut_mlp_to,
    expert_alignment,
    head_count_for_ratio,
    prune_heads,
    prune_mlp_channels,
    sync_config,
    valid_head_counts,
)
from pare.arch.targets import Target, layer_targets
from pare.calibration.runner import LayerStep
from pare.calibration.stats import InputStats, record_inputs
from pare.config import PruneConfig, check_ratio, help_field, register
from pare.errors import ConfigError
from pare.methods.base import PruneContext, StructuralPruner
from pare.ops.importance import round_width
from pare.ops.osscar import select_groups

log = logging.getLogger(__name__)

HEAD_MODES = ("auto", "query", "kv")


@dataclass(frozen=True)
class OsscarConfig(PruneConfig):
    """OSSCAR options.

    Attributes:
        mlp_ratio: fraction of MLP intermediate channels removed, in [0, 1).
        attn_ratio: fraction of query heads removed (0: attention untouched).
        round_to: kept MLP width is a multiple of this (1: no rounding; Quark uses 128).
        power_of_two: kept MLP width is the nearest power of two instead.
        head_mode: ``query`` (drop query heads evenly in every KV group), ``kv`` (drop whole KV
            groups), ``auto`` (query when it realises the ratio, else kv).
        damp: ridge damping of the refit, ``lam = damp * mean(diag(G))``.
        max_swaps: local-search swap iterations per matrix (0: greedy elimination only).
        exact: one-at-a-time greedy elimination (slow for thousands of channels); the default
            removes adaptive blocks, each chosen by the exact greedy inside a pool of candidates.
    """

    method: ClassVar[str] = "osscar"

    mlp_ratio: float = help_field(0.25, "fraction of MLP intermediate channels removed, in [0, 1)")
    attn_ratio: float = help_field(0.0, "fraction of attention query heads removed (0: keep all)")
    round_to: int = help_field(1, "kept MLP width is a multiple of this (e.g. 64 or 128)")
    power_of_two: bool = help_field(False, "round the kept MLP width to the nearest power of two")
    head_mode: str = help_field("auto", "heads: 'query' (evenly per KV group), 'kv' (whole groups) or 'auto'")
    damp: float = help_field(0.01, "ridge damping of the least-squares refit (fraction of mean diag of G)")
    max_swaps: int = help_field(32, "local-search swap iterations per matrix (0: greedy elimination only)")
    exact: bool = help_field(False, "one-at-a-time greedy elimination (slow; default: adaptive blocks)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ratio("mlp_ratio", self.mlp_ratio)
        check_ratio("attn_ratio", self.attn_ratio)
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise ConfigError(f"round_to must be a positive integer (1 = no rounding), got {self.round_to!r}")
        if self.head_mode not in HEAD_MODES:
            raise ConfigError(f"head_mode must be one of {list(HEAD_MODES)}, got {self.head_mode!r}")
        if not (isinstance(self.damp, (int, float)) and self.damp > 0):
            raise ConfigError(f"damp must be a positive number (e.g. 0.01), got {self.damp!r}")
        if self.max_swaps < 0:
            raise ConfigError(f"max_swaps must be >= 0, got {self.max_swaps}")


def resolve_heads(att: AttentionRoles, ratio: float, mode: str) -> tuple[int, int, str]:
    """``(heads, kv_heads, mode)`` realising ``ratio``; ``auto`` tries query mode, then kv."""
    check_fused_layout(att)
    if mode != "auto":
        h, k = head_count_for_ratio(att.num_heads, att.num_kv_heads, ratio, mode)
        return h, k, mode
    try:
        h, k = head_count_for_ratio(att.num_heads, att.num_kv_heads, ratio, "query")
        return h, k, "query"
    except ConfigError:
        h, k = head_count_for_ratio(att.num_heads, att.num_kv_heads, ratio, "kv")
        return h, k, "kv"


def check_savable_heads(model: nn.Module, arch: ModelArch, ratio: float, mode: str, flag: str,
                        hidden: int | None = None) -> None:
    """Raise ConfigError, naming the ratios that work, when removing ``ratio`` of the heads leaves a head
    count the model's config class refuses (the run would only fail when saving); ``hidden``: the hidden
    size after the run when it changes too."""
    att = next((r.attention for r in arch.layers if r.attention is not None), None)
    if att is None or ratio <= 0:
        return
    heads, kv, used = resolve_heads(att, ratio, mode)
    why = config_rejects_heads(model, arch, heads, kv, hidden)
    if why is None:
        return
    working = []
    for h, k in valid_head_counts(att.num_heads, att.num_kv_heads, used)[:-1]:
        if config_rejects_heads(model, arch, h, k, hidden) is None:
            working.append(round(1 - h / att.num_heads, 4))
    raise ConfigError(f"{flag} {ratio} leaves {heads} attention heads, which {type(model.config).__name__} cannot "
                      f"hold ({why}); ratios that work: {sorted(working) or 'none in ' + used + ' mode'}")


def check_savable_hidden(model: nn.Module, arch: ModelArch, hidden: int, heads: int, kv_heads: int) -> None:
    """Raise ConfigError, naming the nearest hidden sizes that work, when a hidden size of ``hidden`` with
    ``heads`` / ``kv_heads`` attention heads is one the model's config class refuses (Llama's needs a
    multiple of the head count): the run would only fail when saving."""
    why = config_rejects_heads(model, arch, heads, kv_heads, hidden)
    if why is None:
        return
    total = int(model.get_input_embeddings().weight.shape[1])  # type: ignore[operator]
    below = next((w for w in range(hidden - 1, 0, -1) if config_rejects_heads(model, arch, heads, kv_heads, w)
                  is None), None)
    above = next((w for w in range(hidden + 1, total) if config_rejects_heads(model, arch, heads, kv_heads, w)
                  is None), None)
    works = [f"{w} (a ratio of {1 - w / total:.4f})" for w in (below, above) if w is not None]
    raise ConfigError(f"the hidden size would become {hidden} of {total}, which {type(model.config).__name__} cannot "
                      f"hold with {heads} attention heads ({why}); nearest hidden sizes that work: "
                      f"{', '.join(works) or 'none'}; or keep the hidden size (hidden=False, --no-hidden)")


def head_groups(att: AttentionRoles, heads: int, kv: int, mode: str) -> tuple[int, torch.Tensor, torch.Tensor]:
    """OSSCAR grouping of o_proj columns: (columns per group, partition per group, quota per partition)."""
    g = att.num_heads // att.num_kv_heads
    if mode == "kv" and g > 1:
        return g * att.head_dim, torch.zeros(att.num_kv_heads, dtype=torch.long), torch.tensor([kv])
    if g == 1:
        return att.head_dim, torch.zeros(att.num_heads, dtype=torch.long), torch.tensor([heads])
    part = torch.arange(att.num_heads) // g
    return att.head_dim, part, torch.full((att.num_kv_heads,), heads // kv, dtype=torch.long)


@register
class OsscarPruner(StructuralPruner):
    """Layer-wise OSSCAR: gather the Gram of o_proj / down_proj inputs, select, refit, cut."""

    config_class = OsscarConfig
    config: OsscarConfig
    needs_calibration: ClassVar[bool] = True

    def check(self, model: nn.Module, arch: ModelArch) -> None:
        why = arch.nothing_to_cut(self.config.mlp_ratio > 0, self.config.attn_ratio > 0)
        if why:
            raise ConfigError(why)
        first = next((r.attention for r in arch.layers if r.attention is not None), None)
        if self.config.attn_ratio > 0 and first is not None:
            check_savable_heads(model, arch, self.config.attn_ratio, self.config.head_mode, "attn_ratio")
        if self.config.attn_ratio > 0 and first is None and any(r.mla for r in arch.layers):
            mla_head_count(arch, self.config.attn_ratio)  # a whole number of latent-attention heads

    def preview(self, model: nn.Module, arch: ModelArch, override: ArchOverride | None) -> None:
        """The run's head counts and MLP widths (its first channels and heads: the run selects them)."""
        cfg = self.config
        first = next((r.attention for r in arch.layers if r.attention is not None), None)
        if cfg.attn_ratio > 0 and first is not None:
            heads, kv, _ = resolve_heads(first, cfg.attn_ratio, cfg.head_mode)
            for r in arch.layers:
                if r.attention is not None:
                    cut_heads_to(model, arch, r.index, heads, kv)
        if cfg.attn_ratio > 0 and first is None and any(r.mla for r in arch.layers):
            keep = mla_head_count(arch, cfg.attn_ratio)
            for r in arch.layers:
                if r.mla is not None:
                    cut_mla_heads_to(model, arch, r.index, keep)
        layers = arch.layer_modules(model)
        for r in arch.layers if cfg.mlp_ratio > 0 else ():
            if r.mlp is not None:
                total = arch.mlp_width(model, r.index)
                width = self._mlp_width(total, False, weight_of(layers[r.index].get_submodule(r.mlp.down.path)).dtype)
                if width < total:
                    cut_mlp_to(model, arch, r.index, width)
            elif r.experts is not None:
                ex = r.experts
                fused = getattr(layers[r.index].get_submodule(ex.path), ex.down_param)
                shared = None
                if ex.shared is not None:
                    down = layers[r.index].get_submodule(ex.shared.down.path)
                    shared = self._mlp_width(in_features(down, ex.shared.down), False, fused.dtype)
                cut_mlp_to(model, arch, r.index, min(ex.intermediate, self._mlp_width(ex.intermediate, True,
                                                                                       fused.dtype)), shared)
        sync_config(model, describe(model, override))

    def run(self, ctx: PruneContext) -> None:
        cfg = self.config
        heads_plan = None
        first = next((r.attention for r in ctx.arch.layers if r.attention is not None), None)
        if cfg.attn_ratio > 0 and first is not None:
            heads_plan = resolve_heads(first, cfg.attn_ratio, cfg.head_mode)
        latent = any(r.mla for r in ctx.arch.layers) and cfg.attn_ratio > 0 and first is None
        mla_keep = mla_head_count(ctx.arch, cfg.attn_ratio) if latent else 0
        for step in ctx.runner().steps():
            targets = {t.name: t for t in layer_targets(step.layer, step.roles, step.prefix)}
            if heads_plan is not None and step.roles.attention is not None:
                self._prune_attention(ctx, step, targets, heads_plan)
            if mla_keep and step.roles.mla is not None:
                self._prune_latent_attention(ctx, step, targets, mla_keep)
            if cfg.mlp_ratio > 0 and (step.roles.mlp is not None or step.roles.experts is not None):
                self._prune_mlp(ctx, step, targets)  # a layer whose MLP block was removed is left as it is
        ctx.report.uniform = sync_config(ctx.model, ctx.describe())
        if ctx.report.edits:
            ctx.report.notes.append(
                "Structured cut: weights are removed, so the checkpoint is smaller and dense kernels are faster."
            )

    # ------------------------------------------------------------------ attention
    def _prune_attention(self, ctx: PruneContext, step: LayerStep, targets: dict[str, Target],
                         plan: tuple[int, int, str]) -> None:
        att = step.roles.attention
        assert att is not None
        heads, kv, mode = plan
        o = targets[f"{step.prefix}.{att.o.path}"]
        stats = {o.name: InputStats(want_gram=True)}
        with record_inputs([o], stats):
            step.run()
        w = o.weight()
        size, part, quota = head_groups(att, heads, kv, mode)
        gram = stats[o.name].gram
        assert gram is not None
        sel = select_groups(gram.to(w.device), w, quota.to(w.device), group=size,
                            partition=part.to(w.device), damp=self.config.damp, max_swaps=self.config.max_swaps,
                            exact=self.config.exact)
        cols = (sel.keep[:, None] * size + torch.arange(size, device=w.device)).flatten()
        w[:, cols] = sel.weight.to(w.dtype)
        if mode == "kv" and att.num_heads != att.num_kv_heads:
            edit = prune_heads(ctx.model, ctx.arch, step.index, keep_kv_groups=sel.keep)
        else:
            edit = prune_heads(ctx.model, ctx.arch, step.index, keep_query_heads=sel.keep)
        ctx.report.edits.append(edit)
        ctx.report.scores.setdefault("attn_error", {})[str(step.index)] = _errors(sel)

    def _prune_latent_attention(self, ctx: PruneContext, step: LayerStep, targets: dict[str, Target],
                                keep: int) -> None:
        """Latent attention (MLA): heads are groups of ``v_head_dim`` input columns of ``o_proj``; the
        kept ones are refit, then each head's query, ``kv_b`` rows and ``o`` columns are cut."""
        mla = step.roles.mla
        assert mla is not None
        o = targets[f"{step.prefix}.{mla.o.path}"]
        stats = {o.name: InputStats(want_gram=True)}
        with record_inputs([o], stats):
            step.run()
        w, gram = o.weight(), stats[o.name].gram
        assert gram is not None
        sel = select_groups(gram.to(w.device), w, keep, group=mla.v_dim, damp=self.config.damp,
                            max_swaps=self.config.max_swaps, exact=self.config.exact)
        cols = (sel.keep[:, None] * mla.v_dim + torch.arange(mla.v_dim, device=w.device)).flatten()
        w[:, cols] = sel.weight.to(w.dtype)
        ctx.report.edits.append(prune_mla_heads(ctx.model, ctx.arch, step.index, sel.keep))
        ctx.report.scores.setdefault("attn_error", {})[str(step.index)] = _errors(sel)

    # ------------------------------------------------------------------ MLP
    def _mlp_width(self, total: int, moe: bool, dtype: torch.dtype) -> int:
        cfg = self.config
        multiple = cfg.round_to
        if moe:
            align = expert_alignment(dtype)
            multiple = multiple * align // _gcd(multiple, align)
        width = round_width((1 - cfg.mlp_ratio) * total, total, multiple, cfg.power_of_two)
        return width

    def _prune_mlp(self, ctx: PruneContext, step: LayerStep, targets: dict[str, Target]) -> None:
        roles = step.roles
        if roles.experts is not None:
            self._prune_experts(ctx, step, targets)
            return
        assert roles.mlp is not None
        down = targets[f"{step.prefix}.{roles.mlp.down.path}"]
        stats = {down.name: InputStats(want_gram=True)}
        with record_inputs([down], stats):
            step.run()
        w = down.weight()
        width = self._mlp_width(w.shape[1], False, w.dtype)
        if width >= w.shape[1]:
            return
        gram = stats[down.name].gram
        assert gram is not None
        sel = select_groups(gram.to(w.device), w, width, damp=self.config.damp,
                            max_swaps=self.config.max_swaps, exact=self.config.exact)
        w[:, sel.keep] = sel.weight.to(w.dtype)
        ctx.report.edits.append(prune_mlp_channels(ctx.model, ctx.arch, step.index, sel.keep))
        ctx.report.scores.setdefault("mlp_error", {})[str(step.index)] = _errors(sel)

    def _prune_experts(self, ctx: PruneContext, step: LayerStep, targets: dict[str, Target]) -> None:
        ex = step.roles.experts
        assert ex is not None
        downs = [targets[f"{step.prefix}.{ex.path}.{ex.down_param}[{e}]"] for e in range(ex.num_experts)]
        shared = targets.get(f"{step.prefix}.{ex.shared.down.path}") if ex.shared is not None else None
        watch = downs + ([shared] if shared is not None else [])
        stats = {t.name: InputStats(want_gram=True) for t in watch}
        with record_inputs(watch, stats):
            step.run()
        width = self._mlp_width(ex.intermediate, True, downs[0].weight().dtype)
        keeps = []
        for t in downs:
            keeps.append(self._select_into(t, stats[t.name], width))
        shared_keep = None
        if shared is not None:
            s_width = self._mlp_width(shared.weight().shape[1], False, shared.weight().dtype)
            shared_keep = self._select_into(shared, stats[shared.name], s_width)
        if width >= ex.intermediate and shared_keep is None:
            return
        keep = torch.stack(keeps) if width < ex.intermediate else torch.arange(ex.intermediate)
        ctx.report.edits.append(prune_mlp_channels(ctx.model, ctx.arch, step.index, keep, shared_keep))

    def _select_into(self, target: Target, stats: InputStats, width: int) -> torch.Tensor:
        """Select + refit one expert's (or the shared expert's) down projection; magnitude when no tokens."""
        w = target.weight()
        if width >= w.shape[1]:
            return torch.arange(w.shape[1], device=w.device)
        if stats.gram is None or stats.tokens == 0:  # expert never routed: keep the largest columns
            return torch.argsort(w.float().pow(2).sum(0), descending=True)[:width].sort().values
        sel = select_groups(stats.gram.to(w.device), w, width, damp=self.config.damp,
                            max_swaps=self.config.max_swaps, exact=self.config.exact)
        w[:, sel.keep] = sel.weight.to(w.dtype)
        return sel.keep


def _gcd(a: int, b: int) -> int:
    return math.gcd(a, b)


def _errors(sel) -> dict[str, float]:
    total = max(sel.total, 1e-12)
    return {"refit": sel.error / total, "no_refit": sel.error_no_refit / total, "swaps": sel.swaps}


__all__ = ["OsscarConfig", "OsscarPruner", "head_groups", "resolve_heads"]
