"""SliceGPT: rotate the residual stream onto its principal directions, then delete the weakest.

Ashkboos et al., 2024, "SliceGPT: Compress Large Language Models by Deleting Rows and Columns"
(arXiv 2401.15024). Steps (the math is in :mod:`pare.ops.rotation`, the edits in
:mod:`pare.arch.surgery.rotation`):

1. Fuse every norm's scale into the linears that read it (LayerNorm: centre every writer first, so the
   mean subtraction does nothing; its bias goes into the readers' biases). Norms keep their own class
   with unit weight, so the model reloads with ``from_pretrained``.
2. Gather ``sum_t x_t x_t^T`` of the residual stream (layer-wise runner, fp64), and take its
   eigenvectors (eq. 7).
3. Rotate every reader and writer of the stream with ``Q`` and keep the first ``k`` directions
   (eq. 8): a real hidden-size cut of the embeddings, q/k/v inputs, o outputs, MLP inputs and
   outputs, routers and experts, the final norm and the head.

``rotation="shared"`` uses one ``Q`` for every layer (the sum of the layers' moments, each token
scaled to unit length by default): the result is an ordinary model of a smaller ``hidden_size`` that
plain ``AutoModelForCausalLM.from_pretrained`` loads. ``rotation="per-layer"`` is the paper's own
scheme (the reference code's ``rotate_and_slice_sequential``): a basis per residual addition (the
embeddings' from the first layer's input, then one after attention and one after the MLP of every
layer; one per parallel layer), each the PCA basis (raw moments by default, as the paper) of the stream
right after that addition, computed on the already sliced signals. Every block reads the stream in
the basis it was written in and writes in its own; the residual passes ``Q_in^T Q_out`` at each
addition. These shortcuts sit inside transformers' layer ``forward``, where no weight can absorb them:
a wrapper applies them (hooks on the blocks' outputs, attached per call), and ``pare.save`` stores
them with the weights (edit ``residual_shortcuts``) for ``pare.load``. ``slice_head=False`` (the
reference's default) keeps the last addition, the final norm and the head at the full hidden size.

Norms over ``k`` channels divide by ``sqrt(k)`` where the original divided by ``sqrt(H)``: every
reader is multiplied by ``sqrt(H / k)`` (the reference code keeps ``H`` in its own norm class).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from pare.arch.residual import ResidualPlan, Stage, layer_stages, residual_plan, stage_shortcuts
from pare.arch.roles import ModelArch
from pare.arch.surgery.rotation import (
    add_stage_shortcuts,
    check_fusable,
    final_weight_stays,
    fuse_norms,
    head_tensors,
    reader_scale,
    restore_head,
    rotate_stages,
    rotate_stream,
    scale_readers,
    untie_head,
)
from pare.arch.surgery.width import (
    ATTN_WIDTH_IS_HIDDEN,
    attention_follows_hidden,
    config_rejects_heads,
    expert_alignment,
    pin_derived_widths,
    prune_hidden,
    sync_config,
)
from pare.config import PruneConfig, check_ratio, help_field, register
from pare.errors import ConfigError
from pare.methods.base import PruneContext, StructuralPruner
from pare.ops import rotation as rot

log = logging.getLogger(__name__)

ROTATIONS = ("shared", "per-layer")


@dataclass(frozen=True)
class SliceGPTConfig(PruneConfig):
    """SliceGPT options.

    Attributes:
        slicing: fraction of the hidden size deleted, in [0, 1).
        rotation: ``shared`` (one basis; reloads with ``from_pretrained``) or ``per-layer`` (a basis per
            layer with shortcut matrices; reloads with ``pare.load``).
        round_to: the kept hidden size is a multiple of this (rounded down, further down where the
            config's head count needs it).
        damp: added to the moment's diagonal, times its mean, before the eigendecomposition.
        unit_tokens: scale every token of the stream to unit length before gathering moments (None: yes
            for ``shared``, no for ``per-layer``, whose default follows the paper's raw moments).
        slice_head: ``per-layer`` only: slice the last layer's output, the final norm and the head too
            (False: they keep the full hidden size, as the reference code's default ``do_slice_head=False``).
    """

    method: ClassVar[str] = "slicegpt"

    slicing: float = help_field(0.25, "fraction of the hidden size deleted, in [0, 1)")
    rotation: str = help_field("shared", "shared (one rotation, plain from_pretrained) | per-layer (pare.load)")
    round_to: int = help_field(8, "kept hidden size is a multiple of this")
    damp: float = help_field(0.01, "relative diagonal damping of the moment before the eigendecomposition")
    unit_tokens: bool | None = help_field(
        None, "weigh every token equally (unit length) in the moments (default: shared yes, per-layer no)")
    slice_head: bool = help_field(True, "per-layer: slice the last layer's output and the head too")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ratio("slicing", self.slicing)
        if self.rotation not in ROTATIONS:
            raise ConfigError(f"rotation must be one of {list(ROTATIONS)}, got {self.rotation!r}")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise ConfigError(f"round_to must be a positive integer, got {self.round_to!r}")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 <= self.damp < 1:
            raise ConfigError(f"damp must be a number in [0, 1) (0.01 in the reference code), got {self.damp!r}")


@register
class SliceGPTPruner(StructuralPruner):
    """Fuse norms, gather the stream's moments, rotate, slice (see the module docstring)."""

    config_class = SliceGPTConfig
    config: SliceGPTConfig
    needs_calibration: ClassVar[bool] = True

    def check(self, model: nn.Module, arch: ModelArch) -> None:
        plan = residual_plan(model, arch)
        check_fusable(model, plan)
        if self.config.slicing > 0:
            if arch.model_type in ATTN_WIDTH_IS_HIDDEN or attention_follows_hidden(model, arch):
                raise ConfigError(f"{arch.model_type} derives its attention width (head_dim) from the hidden size, so "
                                  "the config cannot describe a sliced hidden size with the same heads; only "
                                  "slicing=0 (a pure rotation) applies to this family")
            self.kept(model, arch, plan)
            last = layer_stages(arch, arch.num_layers - 1)[-1]
            if self.config.rotation == "per-layer" and not self.config.slice_head and any(
                    p.kind == "experts" for p in last.writers):
                raise ConfigError("slice_head=False keeps the last layer's writers at the full hidden size, which "
                                  "fused MoE experts cannot do here; use slice_head=True")

    def kept(self, model: nn.Module, arch: ModelArch, plan: ResidualPlan) -> int:
        """The kept hidden size: ``(1 - slicing) H`` rounded down to ``round_to`` (and to the expert
        alignment of MoE models), then down to one the config's head count accepts."""
        embed: Any = model.get_submodule(arch.embed_path)
        hidden = int(embed.weight.shape[1])
        multiple = self.config.round_to
        if any(r.experts is not None for r in arch.layers):
            align = expert_alignment(embed.weight.dtype)
            multiple = multiple * align // math.gcd(multiple, align)
        minimum = 2 if any(s.kind == "layernorm" for s in plan.sites) else 1
        k = rot.kept_width(hidden, self.config.slicing, multiple, max(multiple, minimum))
        if k == hidden:
            return k
        att = next((r.attention for r in arch.layers if r.attention is not None), None)
        start = k
        while att is not None and config_rejects_heads(model, arch, att.num_heads, att.num_kv_heads, k) is not None:
            k -= multiple
            if k < multiple:
                why = config_rejects_heads(model, arch, att.num_heads, att.num_kv_heads, start)
                raise ConfigError(f"no hidden size at or below {start} (a multiple of {multiple}) that "
                                  f"{type(model.config).__name__} accepts with {att.num_heads} heads ({why})")
        return k

    def run(self, ctx: PruneContext) -> None:
        cfg, model, arch = self.config, ctx.model, ctx.arch
        plan = residual_plan(model, arch)
        embed: Any = model.get_submodule(arch.embed_path)
        hidden = int(embed.weight.shape[1])
        k = self.kept(model, arch, plan)
        per_layer = cfg.rotation == "per-layer"
        wide_head = per_layer and not cfg.slice_head and k < hidden
        stages = {i: layer_stages(arch, i) for i in range(arch.num_layers)}
        was_tied = arch.tied
        keep_final = final_weight_stays(model, plan, was_tied) and not wide_head
        if was_tied and not keep_final:
            untie_head(model, arch.lm_head_path, arch.embed_path)
            why = ("the head keeps the full hidden size (slice_head=False)" if wide_head else
                   "the final norm's weight differs per channel, so it was folded into an untied copy of the head")
            ctx.report.notes.append(f"the head was tied to the embeddings; {why} "
                                    f"(+{embed.weight.shape[0] * (hidden if wide_head else k):,} parameters)")
        fuse_norms(model, plan, keep_final)
        zero_mean = any(s.kind == "layernorm" for s in plan.sites)
        head_width = hidden if wide_head else k
        if per_layer:
            bases, energy = self._stage_bases(ctx, stages, k, head_width, zero_mean)
            rotate_stages(model, plan, stages, bases)
        else:
            bases, energy = self._shared_bases(self._moments(ctx), k, zero_mean)
            rotate_stream(model, plan, bases)
        if k < hidden:
            saved = head_tensors(model, stages[arch.num_layers - 1][-1].writers, plan.sites[-1].norm,
                                 arch.lm_head_path) if wide_head else []
            arch = ctx.describe()
            pin_derived_widths(model, arch)
            ctx.report.edits.append(prune_hidden(model, arch, torch.arange(k)))
            scale_readers(model, plan, reader_scale(hidden, k), keep_final, head=not wide_head)
            restore_head(model, saved)
        ctx.report.uniform = sync_config(model, ctx.describe())
        if per_layer:
            edit = add_stage_shortcuts(arch.layer_modules(model), stages, bases, k, head_width)
            ctx.report.edits.append(edit)
            ctx.report.uniform = False
            ctx.report.notes.append(
                f"rotation=per-layer: each residual addition of {len(edit.layers)} layers passes a shortcut matrix "
                "Q_in^T Q_out (a wrapper around the layer); the saved model loads with pare.load, not plain "
                "from_pretrained")
        ctx.report.scores["slicegpt"] = {
            "hidden_before": hidden, "hidden_after": k, "rotation": cfg.rotation,
            "head_tied": bool(was_tied and keep_final), "head_width": head_width,
            "kept_energy": energy,
        }

    def _unit_tokens(self) -> bool:
        u = self.config.unit_tokens
        return self.config.rotation == "shared" if u is None else u

    def _moments(self, ctx: PruneContext) -> list[torch.Tensor]:
        """``sum_t x_t x_t^T`` (fp64) of the stream entering each layer, and entering the final norm."""
        runner = ctx.runner(sequential=True)
        unit = self._unit_tokens()
        moments: list[torch.Tensor] = []
        for step in runner.steps():
            moments.append(sum(rot.second_moment(x, unit) for x in step.inputs))  # type: ignore[arg-type]
        assert runner.final_hidden is not None
        moments.append(sum(rot.second_moment(x, unit) for x in runner.final_hidden))  # type: ignore[arg-type]
        return moments

    def _basis(self, moment: torch.Tensor, k: int, zero_mean: bool) -> torch.Tensor:
        if zero_mean:
            return rot.complete_basis(rot.mean_free_basis(moment, k, self.config.damp))
        return rot.pca_basis(moment, self.config.damp)[1]

    def _shared_bases(self, moments: list[torch.Tensor], k: int,
                      zero_mean: bool) -> tuple[list[torch.Tensor], list[float]]:
        """One orthogonal ``[H, H]`` for every layer (first ``k`` columns kept), from the sum of the
        trace-normalised moments, with the fraction of each moment's energy the kept directions hold."""
        total = sum(m / m.trace().clamp_min(1e-30) for m in moments)
        assert isinstance(total, torch.Tensor)
        q = self._basis(total, k, zero_mean)
        energy = [_kept_energy(q, m, k) for m in moments]
        return [q] * len(moments), energy

    def _stage_bases(self, ctx: PruneContext, stages: dict[int, list[Stage]], k: int, head_width: int,
                     zero_mean: bool) -> tuple[list[torch.Tensor], list[float]]:
        """SliceGPT's sequential per-stage bases (``rotate_and_slice_sequential`` of the reference code):
        the embeddings' basis from the first layer's input; then, for each residual addition in order,
        the PCA basis of the stream right after it, computed on the already sliced signals (every earlier
        stage's residual and writes projected onto its kept directions, which is what the rotated,
        sliced model computes, in the original coordinates). Returns the bases (``[H, H]``, the first
        ``k`` columns kept; ``head_width`` for the last) and each one's kept energy."""
        runner = ctx.runner(sequential=True)
        unit = self._unit_tokens()
        bases: list[torch.Tensor] = []
        energy: list[float] = []

        def add(moment: torch.Tensor, width: int) -> torch.Tensor | None:
            q = self._basis(moment, width, zero_mean)
            bases.append(q)
            energy.append(_kept_energy(q, moment, width))
            return None if width == q.shape[0] else q[:, :width] @ q[:, :width].T

        last = max(stages)
        for step in runner.steps():
            if not bases:
                p0 = add(sum(rot.second_moment(x, unit) for x in step.inputs), k)  # type: ignore[arg-type]
                if p0 is not None:
                    step.inputs[:] = [x @ p0.to(x.device, x.dtype) for x in step.inputs]
            mine = stages[step.index]
            projs: list[torch.Tensor | None] = [None] * len(mine)
            for s in range(len(mine)):
                width = head_width if step.index == last and s == len(mine) - 1 else k
                seen = self._stage_signals(step, mine, projs, s)
                projs[s] = add(sum(rot.second_moment(x, unit) for x in seen), width)  # type: ignore[arg-type]
                if s == len(mine) - 1:
                    p = projs[s]
                    step.dense_outputs = seen if p is None else [y @ p.to(y.device, y.dtype) for y in seen]
        return bases, energy

    @torch.no_grad()
    def _stage_signals(self, step: Any, stages: list[Stage], projs: list[torch.Tensor | None],
                       s: int) -> list[torch.Tensor]:
        """Per batch, the stream right after stage ``s`` of ``step``'s layer (not yet projected), with the
        earlier stages' residual and writes projected by ``projs``."""
        out = []
        for b in range(len(step.inputs)):
            x = step.inputs[b].to(step.device)
            mats = [None if p is None else p.to(step.device) for p in projs]
            record: list[torch.Tensor] = []
            with stage_shortcuts(step.layer, stages, mats, mats, x, record):
                y = step.forward_batch(b, x)
            out.append((y if s == len(stages) - 1 else record[s]).detach().to(step.inputs[b].device))
        return out


def _kept_energy(q: torch.Tensor, moment: torch.Tensor, k: int) -> float:
    return float((q[:, :k].T @ moment @ q[:, :k]).trace() / moment.trace().clamp_min(1e-30))


__all__ = ["ROTATIONS", "SliceGPTConfig", "SliceGPTPruner"]
