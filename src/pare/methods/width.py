"""Structured width pruning: hidden size, attention heads and MLP channels together.

The semantics of Torch-Pruning's ``prune_llm.py`` (``--pruning_ratio 0.5`` halves the hidden size,
the query heads and the MLP width, keeping the KV heads of GQA models), with a choice of importance:

- ``magnitude``: group L1 (``norm=1``) or squared L2 (``norm=2``) of every weight a channel owns;
- ``activation``: Wanda-style ``|W_ij| ||X_j||`` summed over the channel's input column
  (Sun et al., 2023, arXiv 2306.11695);
- ``taylor``: first-order ``|w dL/dw|`` summed over the channel's group (LLM-Pruner, Ma et al., 2023,
  arXiv 2305.11627, eq. 4), on the calibration language-modelling loss;
- ``flap``: fluctuation ``Var(X_j) ||W[:, j]||^2`` with bias compensation
  ``b += W[:, P] mean(X_P)`` (FLAP, An et al., 2024, arXiv 2312.11983, eqs. 5-6).

``allocation="global"`` ranks MLP channels of all layers together after standardising each
layer's scores (FLAP's adaptive structure search); the result has per-layer widths, recorded as
edits that ``pare.load`` replays. Heads stay uniform across layers so GQA stays valid.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from pare.arch import ArchOverride, describe
from pare.arch.infer import text_config
from pare.arch.residual import StreamPort, stream_ports
from pare.arch.roles import LayerRoles, MLPRoles, ModelArch, Proj, get_weight, in_features
from pare.arch.surgery.mla import cut_mla_heads_to, mla_config_rejects, mla_head_count, prune_mla_heads
from pare.arch.surgery.width import (
    ATTN_WIDTH_IS_HIDDEN,
    BIAS_FLAGS,
    attention_follows_hidden,
    cut_heads_to,
    cut_mlp_to,
    enable_bias,
    expert_alignment,
    hidden_cut_problem,
    pin_derived_widths,
    prune_heads,
    prune_hidden,
    prune_mlp_channels,
    sync_config,
)
from pare.arch.targets import layer_targets
from pare.calibration.runner import on_device
from pare.calibration.stats import InputStats, record_inputs
from pare.config import PruneConfig, check_ratio, help_field, register
from pare.errors import ConfigError
from pare.methods.base import Needs, PruneContext, StructuralPruner
from pare.methods.osscar import HEAD_MODES, check_savable_heads, check_savable_hidden, resolve_heads
from pare.ops import importance as imp
from pare.ops.finite import check_finite_weight

log = logging.getLogger(__name__)

IMPORTANCES = ("magnitude", "activation", "taylor", "flap")
ALLOCATIONS = ("uniform", "global")


@dataclass(frozen=True)
class WidthConfig(PruneConfig):
    """Width pruning options. The seed script's flags work on the CLI: ``--pruning_ratio`` (this
    field), ``--max_seq_len`` (the calibration ``--seqlen``) and ``--save_model`` (``--out``).

    Attributes:
        pruning_ratio: fraction of the width removed (hidden, heads, MLP), in [0, 1).
        importance: ``magnitude``, ``activation``, ``taylor`` or ``flap``.
        allocation: ``uniform`` (same width in every layer; reloads with ``from_pretrained``) or
            ``global`` (MLP widths per layer from standardised scores).
        hidden / heads / mlp: which widths to cut.
        head_mode: ``query``, ``kv`` or ``auto`` (see the osscar method).
        norm: p of the magnitude group norm (1 or 2).
        round_to: kept MLP width is a multiple of this.
        bias_compensation: FLAP's bias compensation (only with ``importance=flap``).
    """

    method: ClassVar[str] = "width"

    pruning_ratio: float = help_field(0.5, "fraction of hidden size, heads and MLP width removed")
    importance: str = help_field("magnitude", "magnitude | activation | taylor | flap")
    allocation: str = help_field("uniform", "uniform (same width per layer) | global (MLP widths per layer)")
    hidden: bool = help_field(True, "prune the hidden size (embeddings, norms, every projection)")
    heads: bool = help_field(True, "prune attention heads")
    mlp: bool = help_field(True, "prune MLP channels")
    head_mode: str = help_field("auto", "heads: 'query' (evenly per KV group), 'kv' (whole groups) or 'auto'")
    norm: int = help_field(1, "p of the magnitude group norm: 1 (L1) or 2 (squared L2)")
    round_to: int = help_field(1, "kept MLP width is a multiple of this")
    bias_compensation: bool = help_field(True, "FLAP bias compensation (importance=flap)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ratio("pruning_ratio", self.pruning_ratio)
        for name, value, allowed in (("importance", self.importance, IMPORTANCES),
                                     ("allocation", self.allocation, ALLOCATIONS),
                                     ("head_mode", self.head_mode, HEAD_MODES)):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")
        if self.norm not in (1, 2):
            raise ConfigError(f"norm must be 1 or 2, got {self.norm!r}")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise ConfigError(f"round_to must be a positive integer, got {self.round_to!r}")


class MomentStats(InputStats):
    """InputStats plus the per-channel sum (for means and variances)."""

    def add(self, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).float()
        s = x2.sum(0)
        self.extra["sum"] = s if "sum" not in self.extra else self.extra["sum"] + s
        super().add(x2)

    def mean(self) -> torch.Tensor:
        return self.extra["sum"] / max(self.tokens, 1)

    def var(self) -> torch.Tensor:
        assert self.sq_sum is not None
        return (self.sq_sum / max(self.tokens, 1) - self.mean().pow(2)).clamp_min(0)


# ---------------------------------------------------------------------------- score tables
RC = tuple[torch.Tensor, torch.Tensor]
"""Per matrix: (row scores [out], column scores [in]) in the [out, in] view."""


def _row_col_sums(t: torch.Tensor) -> list[torch.Tensor]:
    """A score tensor's row and column sums (a vector is its own; 3-D experts ``[E, A, B]``: [E, A], [E, B])."""
    if t.dim() == 1:
        return [t]
    if t.dim() == 2:
        return [t.sum(1), t.sum(0)]
    return [t.sum(2), t.sum(1)]


def taylor_tables(model: nn.Module, ids: torch.Tensor, batch_size: int, device: torch.device) -> dict[str, list]:
    """Row/column sums of ``|w dL/dw|`` for every parameter, where ``L`` is the mean loss over every
    calibration window (LLM-Pruner's first-order term). Each batch's loss is weighted by its share of
    the windows and the gradients accumulate over the batches, so the scores do not depend on
    ``batch_size`` (memory: one gradient per parameter, as in one full backward)."""
    params = {n: p for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in params.items()}
    acc: dict[str, list[torch.Tensor]] = {}
    try:
        with on_device(model, device):
            for p in params.values():
                p.requires_grad_(True)
                p.grad = None
            # a caller's inference_mode or no_grad would leave nothing to differentiate
            with torch.inference_mode(False), torch.enable_grad():
                for batch in ids.split(batch_size):
                    b = batch.to(device).clone()  # an ordinary tensor even if made under inference_mode
                    loss = model(input_ids=b, labels=b, use_cache=False).loss
                    (loss * (b.shape[0] / ids.shape[0])).backward()
            for n, p in params.items():
                if p.grad is not None:
                    acc[n] = _row_col_sums(imp.taylor(p.data, p.grad))
                    p.grad = None  # freed as soon as it is reduced
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
            p.grad = None
    return acc


class Scorer:
    """Row/column importance of each matrix for one importance type (see the module docstring)."""

    def __init__(self, model: nn.Module, arch: ModelArch, importance: str, norm: int) -> None:
        self.model, self.arch, self.importance, self.norm = model, arch, importance, norm
        self.stats: dict[str, MomentStats] = {}
        self.taylor: dict[str, list[torch.Tensor]] = {}

    def _from_w(self, w: torch.Tensor, name: str, tkey: str, conv1d: bool = False, expert: int | None = None) -> RC:
        zeros_out = torch.zeros(w.shape[0], device=w.device)
        if self.importance == "magnitude":
            check_finite_weight(w, name)
            return imp.magnitude_out(w, self.norm), imp.magnitude_in(w, self.norm)
        if self.importance == "taylor":
            if tkey not in self.taylor:
                return zeros_out, torch.zeros(w.shape[1], device=w.device)
            r, c = self.taylor[tkey]
            if expert is not None:
                r, c = r[expert], c[expert]
            return (c, r) if conv1d else (r, c)
        st = self.stats.get(name)
        if st is None or st.tokens == 0:
            return zeros_out, torch.zeros(w.shape[1], device=w.device)
        if self.importance == "activation":
            return zeros_out, imp.activation_in(w, st.norms())
        return zeros_out, imp.fluctuation(w, st.var())

    def proj(self, index: int, proj: Proj) -> RC:
        layer = self.arch.layer_modules(self.model)[index]
        name = f"{self.arch.layer_prefix(index)}.{proj.path}"
        return self._from_w(get_weight(layer.get_submodule(proj.path), proj), name, f"{name}.weight", proj.conv1d)

    def expert(self, index: int, param: str, e: int) -> RC:
        ex = self.arch.layers[index].experts
        assert ex is not None
        mod = self.arch.layer_modules(self.model)[index].get_submodule(ex.path)
        base = f"{self.arch.layer_prefix(index)}.{ex.path}.{param}"
        return self._from_w(getattr(mod, param).data[e], f"{base}[{e}]", base, expert=e)

    def vector(self, key: str) -> torch.Tensor | None:
        """Element scores of a 1-D parameter (norm weights), Taylor only."""
        if self.importance == "taylor" and key in self.taylor and len(self.taylor[key]) == 1:
            return self.taylor[key][0]
        return None

    # ------------------------------------------------------------- channel scores
    def mlp_channels(self, index: int, mlp: MLPRoles) -> torch.Tensor:
        score = self.proj(index, mlp.down)[1].clone()
        for p in mlp.inputs:
            rows = self.proj(index, p)[0]
            score += rows.reshape(2, -1).sum(0) if p is mlp.gate_up else rows
        return score

    def expert_channels(self, index: int) -> torch.Tensor:
        """``[E, I]`` channel scores of every expert."""
        ex = self.arch.layers[index].experts
        assert ex is not None
        out = []
        for e in range(ex.num_experts):
            s = self.expert(index, ex.down_param, e)[1].clone()
            s += self.expert(index, ex.gate_up_param, e)[0].reshape(2, -1).sum(0)
            out.append(s)
        return torch.stack(out)

    def heads(self, index: int) -> torch.Tensor:
        """Per query head; in ``kv`` mode sum heads per group (plus k/v rows) yourself."""
        att = self.arch.layers[index].attention
        assert att is not None
        d = att.head_dim
        score = imp.group_sum(self.proj(index, att.o)[1], d)
        if att.qkv is not None:
            rows = self.proj(index, att.qkv)[0]
            q = rows.reshape(att.num_heads, 3 * d).sum(1) if att.qkv_layout == "per_head" else rows[: att.num_heads * d]
            return score + (q if att.qkv_layout == "per_head" else imp.group_sum(q, d))
        assert att.q is not None
        return score + imp.group_sum(self.proj(index, att.q)[0], d)

    def mla_heads(self, index: int) -> torch.Tensor:
        """Per latent-attention head: its query rows, ``kv_b`` rows and ``o`` columns."""
        mla = self.arch.layers[index].mla
        assert mla is not None
        return (imp.group_sum(self.proj(index, mla.o)[1], mla.v_dim)
                + imp.group_sum(self.proj(index, mla.query)[0], mla.nope_dim + mla.rope_dim)
                + imp.group_sum(self.proj(index, mla.kv_b)[0], mla.nope_dim + mla.v_dim))

    def kv_groups(self, index: int) -> torch.Tensor:
        att = self.arch.layers[index].attention
        assert att is not None
        score = self.heads(index).reshape(att.num_kv_heads, -1).sum(1)
        for p in (att.k, att.v):
            if p is not None:
                score = score + imp.group_sum(self.proj(index, p)[0], att.head_dim)
        return score

    def hidden(self) -> torch.Tensor:
        arch, model = self.arch, self.model
        embed: Any = model.get_submodule(arch.embed_path)
        total = torch.zeros(embed.weight.shape[1], device=embed.weight.device)
        if self.importance == "magnitude":
            check_finite_weight(embed.weight.data, arch.embed_path)
            total += imp.magnitude_in(embed.weight.data, self.norm)
        elif self.importance == "taylor" and f"{arch.embed_path}.weight" in self.taylor:
            total += self.taylor[f"{arch.embed_path}.weight"][1]
        for i, roles in enumerate(arch.layers):
            total += self._hidden_layer(i, roles).to(total.device)
        return total

    def _port_scores(self, i: int, ports: list[StreamPort]) -> list[torch.Tensor]:
        """Stream-side scores of projections: every reader's columns, then every writer's rows."""
        readers = [self.proj(i, p.proj)[1] for p in ports if p.role == "reader" and p.proj is not None]
        return readers + [self.proj(i, p.proj)[0] for p in ports if p.role == "writer" and p.proj is not None]

    def _hidden_layer(self, i: int, roles: LayerRoles) -> torch.Tensor:
        """Sum of the stream-side scores of the layer's readers and writers of the stream
        (:func:`~pare.arch.residual.stream_ports`): readers' columns, writers' rows. The router and
        the shared-expert gate are cut with the hidden size but not scored: one row per expert (or one
        row) next to the experts' full matrices."""
        ports = list(stream_ports(roles))
        parts = self._port_scores(i, [p for p in ports if p.block in ("attention", "mlp")])
        ex = roles.experts
        if ex is not None:
            for e in range(ex.num_experts):
                parts += [self.expert(i, ex.gate_up_param, e)[1], self.expert(i, ex.down_param, e)[0]]
        parts += self._port_scores(i, [p for p in ports if p.block == "shared"])
        prefix = self.arch.layer_prefix(i)
        for norm in roles.norms:
            v = self.vector(f"{prefix}.{norm}.weight")
            if v is not None:
                parts.append(v)
        dev = parts[0].device
        return torch.stack([p.to(dev).float() for p in parts]).sum(0)


@dataclass
class Plan:
    """What to keep: per layer heads (query heads or KV groups), MLP channels, shared-expert
    channels; hidden channels once."""

    head_mode: str = "query"
    heads: dict[int, torch.Tensor] = field(default_factory=dict)
    mlp: dict[int, torch.Tensor] = field(default_factory=dict)
    shared: dict[int, torch.Tensor] = field(default_factory=dict)
    hidden: torch.Tensor | None = None

    def summary(self) -> dict[str, object]:
        return {
            "head_mode": self.head_mode,
            "heads": {str(i): int(k.numel()) for i, k in self.heads.items()},
            "mlp": {str(i): int(k.shape[-1]) for i, k in self.mlp.items()},
            "hidden": None if self.hidden is None else int(self.hidden.numel()),
        }


# ---------------------------------------------------------------------------- planning
def _mlp_multiple(cfg: WidthConfig, moe: bool, dtype: torch.dtype) -> int:
    if not moe:
        return cfg.round_to
    align = expert_alignment(dtype)
    return cfg.round_to * align // math.gcd(cfg.round_to, align)


def _plan_heads(scorer: Scorer, arch: ModelArch, cfg: WidthConfig, plan: Plan) -> int | None:
    """Kept heads per layer; returns the kept attention width (heads * head_dim) or None."""
    first = next((r.attention for r in arch.layers if r.attention is not None), None)
    if cfg.heads and first is None and cfg.pruning_ratio > 0 and any(r.mla for r in arch.layers):
        keep = mla_head_count(arch, cfg.pruning_ratio)  # latent attention: every head stands alone
        plan.heads.update({r.index: imp.keep_top(scorer.mla_heads(r.index), keep) for r in arch.layers if r.mla})
        return None
    if not cfg.heads or first is None or cfg.pruning_ratio == 0:
        return None
    heads, kv, mode = resolve_heads(first, cfg.pruning_ratio, cfg.head_mode)
    plan.head_mode = mode
    for i, roles in enumerate(arch.layers):
        att = roles.attention
        if att is None:
            continue
        if mode == "kv" and att.num_heads != att.num_kv_heads:
            plan.heads[i] = imp.keep_top(scorer.kv_groups(i), kv)
            continue
        per = scorer.heads(i)
        if att.num_heads == att.num_kv_heads:
            plan.heads[i] = imp.keep_top(per, heads)
            continue
        g, q = att.num_heads // att.num_kv_heads, heads // kv
        grouped = per.reshape(att.num_kv_heads, g)
        plan.heads[i] = torch.cat([imp.keep_top(grouped[k], q) + k * g for k in range(att.num_kv_heads)])
    return heads * first.head_dim


def _mlp_counts(scores: dict[int, torch.Tensor], cfg: WidthConfig, multiple: int) -> dict[int, int]:
    """Kept MLP width per layer: uniform, or from a global ranking of standardised scores."""
    if not scores:
        return {}
    if cfg.allocation == "uniform":
        return {i: imp.round_width((1 - cfg.pruning_ratio) * s.numel(), s.numel(), multiple, minimum=multiple)
                for i, s in scores.items()}
    z = {i: imp.standardize(s) for i, s in scores.items()}
    flat = torch.cat([v.cpu() for v in z.values()])
    n_keep = max(1, round((1 - cfg.pruning_ratio) * flat.numel()))
    threshold = torch.sort(flat, descending=True).values[n_keep - 1]
    return {i: imp.round_width(int((v >= threshold).sum()), v.numel(), multiple, minimum=multiple)
            for i, v in z.items()}


def plan(model: nn.Module, arch: ModelArch, scorer: Scorer, cfg: WidthConfig) -> Plan:
    """Choose what every width keeps (see :class:`Plan`)."""
    out = Plan()
    attn_width = _plan_heads(scorer, arch, cfg, out)
    if cfg.mlp and cfg.pruning_ratio > 0:
        dense = {i: scorer.mlp_channels(i, r.mlp) for i, r in enumerate(arch.layers) if r.mlp is not None}
        for i, n in _mlp_counts(dense, cfg, cfg.round_to).items():
            out.mlp[i] = imp.keep_top(dense[i], n)
        for i, roles in enumerate(arch.layers):
            ex = roles.experts
            if ex is None:
                continue
            dtype = getattr(arch.layer_modules(model)[i].get_submodule(ex.path), ex.down_param).dtype
            width = imp.round_width((1 - cfg.pruning_ratio) * ex.intermediate, ex.intermediate,
                                    _mlp_multiple(cfg, True, dtype), minimum=_mlp_multiple(cfg, True, dtype))
            out.mlp[i] = torch.stack([imp.keep_top(s, width) for s in scorer.expert_channels(i)])
            if ex.shared is not None:
                s = scorer.mlp_channels(i, ex.shared)
                n = imp.round_width((1 - cfg.pruning_ratio) * s.numel(), s.numel(), cfg.round_to)
                out.shared[i] = imp.keep_top(s, n)
    if cfg.hidden and cfg.pruning_ratio > 0:
        if arch.model_type in ATTN_WIDTH_IS_HIDDEN:
            if attn_width is None:
                raise ConfigError(f"{arch.model_type}: the attention width is the hidden size; prune heads and "
                                  "hidden together (heads=True) or set hidden=False")
            width = attn_width
        else:
            width = kept_hidden(model, arch, cfg)
        out.hidden = imp.keep_top(scorer.hidden(), width)
    return out


def kept_hidden(model: nn.Module, arch: ModelArch, cfg: WidthConfig) -> int:
    """The hidden size a hidden cut keeps (where the attention width does not follow the hidden size)."""
    embed: Any = model.get_submodule(arch.embed_path)
    total = int(embed.weight.shape[1])
    moe = any(r.experts is not None for r in arch.layers)
    multiple = _mlp_multiple(cfg, moe, embed.weight.dtype) if moe else 1
    return imp.round_width((1 - cfg.pruning_ratio) * total, total, multiple)


def preview_mlp(model: nn.Module, arch: ModelArch, cfg: WidthConfig) -> None:
    """Cut every MLP (and expert) to the uniform width of ``cfg``, keeping the first channels (a preview)."""
    keep = 1 - cfg.pruning_ratio
    layers = arch.layer_modules(model)
    for r in arch.layers:
        if r.mlp is not None:
            n = arch.mlp_width(model, r.index)
            cut_mlp_to(model, arch, r.index, imp.round_width(keep * n, n, cfg.round_to, minimum=cfg.round_to))
        elif r.experts is not None:
            ex, shared = r.experts, None
            fused = getattr(layers[r.index].get_submodule(ex.path), ex.down_param)
            multiple = _mlp_multiple(cfg, True, fused.dtype)
            if ex.shared is not None:
                n = in_features(layers[r.index].get_submodule(ex.shared.down.path), ex.shared.down)
                shared = imp.round_width(keep * n, n, cfg.round_to)
            width = imp.round_width(keep * ex.intermediate, ex.intermediate, multiple, minimum=multiple)
            cut_mlp_to(model, arch, r.index, width, shared)


# ---------------------------------------------------------------------------- applying
def _compensate(ctx: PruneContext, scorer: Scorer, i: int, proj: Proj, keep: torch.Tensor, group: int,
                kind: str, can: dict[str, bool]) -> None:
    """FLAP: add ``W[:, pruned] @ mean(X_pruned)`` to the output bias of ``proj``."""
    layer = ctx.arch.layer_modules(ctx.model)[i]
    m: Any = layer.get_submodule(proj.path)
    st = scorer.stats.get(f"{ctx.arch.layer_prefix(i)}.{proj.path}")
    if st is None or st.tokens == 0:
        return
    if getattr(m, "bias", None) is None and not can.setdefault(kind, enable_bias(ctx.model, ctx.arch, kind)):
        note = f"FLAP bias compensation skipped for {kind}: {ctx.arch.model_type} has no {BIAS_FLAGS[kind]} config flag"
        if note not in ctx.report.notes:
            ctx.report.notes.append(note)
        return
    w = get_weight(m, proj)
    cols = (keep[:, None] * group + torch.arange(group, device=keep.device)).flatten()
    mask = torch.ones(w.shape[1], dtype=torch.bool)
    mask[cols.cpu()] = False
    pruned = torch.nonzero(mask).flatten()
    m.bias.data += imp.bias_compensation(w, st.mean(), pruned).to(m.bias.dtype)


def apply(ctx: PruneContext, p: Plan, scorer: Scorer, cfg: WidthConfig) -> None:
    """FLAP compensation (before cutting), then heads and MLP per layer, then the hidden size."""
    arch = ctx.arch
    can: dict[str, bool] = {}
    flap = cfg.importance == "flap" and cfg.bias_compensation
    for i, roles in enumerate(arch.layers):
        if i in p.heads and roles.attention is not None:
            att = roles.attention
            kv_mode = p.head_mode == "kv" and att.num_heads != att.num_kv_heads
            heads = p.heads[i]
            if kv_mode:
                g = att.num_heads // att.num_kv_heads
                heads = (heads[:, None] * g + torch.arange(g, device=heads.device)).flatten()
            if flap:
                _compensate(ctx, scorer, i, att.o, heads, att.head_dim, "attention", can)
            ctx.report.edits.append(prune_heads(ctx.model, arch, i, keep_query_heads=heads))
        if i in p.heads and roles.mla is not None:
            if flap:
                _compensate(ctx, scorer, i, roles.mla.o, p.heads[i], roles.mla.v_dim, "attention", can)
            ctx.report.edits.append(prune_mla_heads(ctx.model, arch, i, p.heads[i]))
        if i in p.mlp:
            if flap and roles.mlp is not None:
                _compensate(ctx, scorer, i, roles.mlp.down, p.mlp[i], 1, "mlp", can)
            ctx.report.edits.append(prune_mlp_channels(ctx.model, arch, i, p.mlp[i], p.shared.get(i)))
    if flap and any(r.experts is not None for r in arch.layers):
        ctx.report.notes.append("FLAP bias compensation is not applied to MoE experts (they have no biases)")
    if p.hidden is not None:
        ctx.report.edits.append(prune_hidden(ctx.model, arch, p.hidden))
        ctx.report.notes.append(
            "hidden-size pruning: norm weights are kept as they are; RMSNorm's mean of squares now runs over "
            "the kept channels only (rescaling by sqrt(H/H') over-amplifies when removed channels carry energy)"
        )


def _check_mla(model: nn.Module, arch: ModelArch, cfg: WidthConfig) -> None:
    """Latent attention: the head cut must be a whole number of heads, and a hidden cut one the config
    accepts with the heads left (DeepSeek's configs want the hidden size a multiple of the heads)."""
    heads = next(r.mla.num_heads for r in arch.layers if r.mla is not None)
    if cfg.heads:
        heads = mla_head_count(arch, cfg.pruning_ratio)
    if cfg.hidden:
        hidden = kept_hidden(model, arch, cfg)
        why = mla_config_rejects(text_config(model), arch, heads, hidden)
        if why is not None:
            raise ConfigError(f"pruning_ratio {cfg.pruning_ratio} leaves a hidden size of {hidden} with {heads} "
                              f"attention heads, which {type(model.config).__name__} refuses ({why}); choose "
                              "another ratio or set hidden=False")


def _check_vision(model: nn.Module, arch: ModelArch, cfg: WidthConfig) -> None:
    """A vision tower's width cut: its MLP channels and attention heads, scored without the language-modelling
    loss, one MLP width and one head count for every layer. The MLP width is written in the vision config (the
    model reloads with its Auto class); a head count cannot be (see :mod:`pare.arch.vision`), so a head cut
    reloads with ``pare.load``."""
    assert arch.vision is not None
    if cfg.hidden and cfg.pruning_ratio > 0:
        raise ConfigError(f"component='vision': the vision tower's {arch.vision.not_cut[0]}; set hidden=False "
                          "(--no-hidden) and cut its MLP width or attention heads")
    if cfg.importance == "taylor":
        raise ConfigError("component='vision': importance=taylor needs the language-modelling loss of text "
                          "windows, which the vision tower's calibration images do not give; use magnitude, "
                          "activation or flap")
    if cfg.allocation != "uniform":
        raise ConfigError("component='vision': allocation=global gives each layer its own MLP width, which the "
                          "vision config cannot state (the model would not reload with its Auto class); use "
                          "allocation=uniform")
    if cfg.mlp and cfg.pruning_ratio > 0:
        _check_vision_mlp(model, arch, cfg)


def _check_vision_mlp(model: nn.Module, arch: ModelArch, cfg: WidthConfig) -> None:
    """The vision MLP width a uniform cut keeps is one the vision config can state, for the layers alone."""
    from pare.arch.surgery.vision import ratio_problem, width_outside_problem

    n = arch.mlp_width(model, 0)
    width = imp.round_width((1 - cfg.pruning_ratio) * n, n, cfg.round_to, minimum=cfg.round_to)
    embed = int(getattr(arch.config_of(model.config), arch.fields.hidden))
    why = ratio_problem(width, embed) if arch.fields.intermediate == "mlp_ratio" else None
    if why is not None:
        works = [round(1 - k * embed / n, 4) for k in range(1, n // embed)]
        raise ConfigError(f"component='vision': pruning_ratio {cfg.pruning_ratio} keeps {width} of {n} MLP "
                          f"channels, but {why}; ratios that work: {works or 'none'}")
    why = width_outside_problem(model, arch, width)
    if why is not None:
        raise ConfigError(f"component='vision': the MLP width cannot be cut: {why}. Weight sparsity and depth work")


# ---------------------------------------------------------------------------- the pruner
@register
class WidthPruner(StructuralPruner):
    """Score every width channel, choose what to keep, then cut heads, MLP channels and hidden."""

    config_class = WidthConfig
    prunes_vision: ClassVar[bool] = True
    config: WidthConfig
    needs_calibration: ClassVar[bool] = True

    def uses_calibration(self) -> bool:
        return self.config.importance != "magnitude"

    def needs(self) -> Needs:
        return "gradients" if self.config.importance == "taylor" else super().needs()

    def check(self, model: nn.Module, arch: ModelArch) -> None:
        cfg = self.config
        if arch.vision is not None:
            _check_vision(model, arch, cfg)
        why = arch.nothing_to_cut(cfg.mlp, cfg.heads) if not cfg.hidden else None
        if why:
            raise ConfigError(why)
        first = next((r.attention for r in arch.layers if r.attention is not None), None)
        if first is None and cfg.pruning_ratio > 0 and any(r.mla for r in arch.layers):
            _check_mla(model, arch, cfg)
        if cfg.heads and first is not None and cfg.pruning_ratio > 0 and arch.vision is not None:
            resolve_heads(first, cfg.pruning_ratio, cfg.head_mode)  # the config never holds the count: realisable?
        elif cfg.heads and first is not None and cfg.pruning_ratio > 0:
            hidden = kept_hidden(model, arch, cfg) if cfg.hidden else None
            check_savable_heads(model, arch, cfg.pruning_ratio, cfg.head_mode, "pruning_ratio", hidden)
        why = hidden_cut_problem(model, arch) if cfg.hidden and cfg.pruning_ratio > 0 else None
        if why is not None:
            raise ConfigError(f"the hidden size of this {arch.model_type} model cannot be cut: {why}; use "
                              "hidden=False (--no-hidden) to cut heads and MLP channels only")
        if (cfg.hidden and cfg.pruning_ratio > 0 and first is not None
                and arch.model_type not in ATTN_WIDTH_IS_HIDDEN and attention_follows_hidden(model, arch)):
            raise ConfigError(f"{arch.model_type} derives head_dim from the hidden size, so the hidden size cannot "
                              "be cut on its own: use hidden=False (--no-hidden), or the osscar method")
        if cfg.hidden and cfg.pruning_ratio > 0 and first is not None and arch.model_type not in ATTN_WIDTH_IS_HIDDEN:
            heads, kv = (first.num_heads, first.num_kv_heads) if not cfg.heads else \
                resolve_heads(first, cfg.pruning_ratio, cfg.head_mode)[:2]
            check_savable_hidden(model, arch, kept_hidden(model, arch, cfg), heads, kv)

    def preview(self, model: nn.Module, arch: ModelArch, override: ArchOverride | None) -> None:
        """The run's head counts, MLP widths (uniform ones, also for ``allocation=global``, whose
        per-layer widths come from data) and hidden size, keeping the first channels and heads."""
        cfg = self.config
        if cfg.pruning_ratio == 0:
            return
        pin_derived_widths(model, arch)
        first = next((r.attention for r in arch.layers if r.attention is not None), None)
        attn_width = None
        if cfg.heads and first is not None:
            heads, kv, _ = resolve_heads(first, cfg.pruning_ratio, cfg.head_mode)
            for r in arch.layers:
                if r.attention is not None:
                    cut_heads_to(model, arch, r.index, heads, kv)
            attn_width = heads * first.head_dim
        if cfg.heads and first is None and any(r.mla for r in arch.layers):
            keep = mla_head_count(arch, cfg.pruning_ratio)
            for r in arch.layers:
                if r.mla is not None:
                    cut_mla_heads_to(model, arch, r.index, keep)
        if cfg.mlp:
            preview_mlp(model, arch, cfg)
        if cfg.hidden:
            width = attn_width if arch.model_type in ATTN_WIDTH_IS_HIDDEN else kept_hidden(model, arch, cfg)
            if width is None:
                raise ConfigError(f"{arch.model_type}: the attention width is the hidden size; prune heads and "
                                  "hidden together (heads=True) or set hidden=False")
            prune_hidden(model, arch, torch.arange(width))
        sync_config(model, describe(model, override))

    def run(self, ctx: PruneContext) -> None:
        cfg = self.config
        ids = ctx.calibration
        if cfg.importance == "magnitude":
            ctx.report.notes.append("importance=magnitude uses no calibration data")
        scorer = Scorer(ctx.model, ctx.arch, cfg.importance, cfg.norm)
        if cfg.importance in ("activation", "flap"):
            assert ids is not None
            scorer.stats = self._collect_stats(ctx, ids)
        elif cfg.importance == "taylor":
            assert ids is not None
            scorer.taylor = taylor_tables(ctx.model, ids, ctx.batch_size, ctx.device)
        p = plan(ctx.model, ctx.arch, scorer, cfg)
        pin_derived_widths(ctx.model, ctx.arch)
        apply(ctx, p, scorer, cfg)
        ctx.report.uniform = sync_config(ctx.model, ctx.describe())
        ctx.report.scores["widths"] = p.summary()

    def _collect_stats(self, ctx: PruneContext, ids: torch.Tensor) -> dict[str, MomentStats]:
        """Input moments of every projection (and expert), layer by layer, on the dense model."""
        runner = ctx.runner(ids, sequential=True)
        out: dict[str, Any] = {}
        for step in runner.steps():
            targets = layer_targets(step.layer, step.roles, step.prefix)
            stats: dict[str, InputStats] = {t.name: MomentStats() for t in targets}
            with record_inputs(targets, stats):
                step.run()
            out.update(stats)
        return out


__all__ = ["IMPORTANCES", "MomentStats", "Plan", "Scorer", "WidthConfig", "WidthPruner", "plan", "taylor_tables"]
