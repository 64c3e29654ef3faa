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
plain ``AutoModelForCausalLM.from_pretrained`` loads. ``rotation="per-layer"`` is the paper's
variant with one basis per decoder layer (the paper has one per attention and one per MLP block):
layer ``l``'s readers and writers work in ``Q_(l+1)``, the PCA basis of the layer's input *and output*
(trace-normalised moments summed), so what the layer writes into the stream is kept (a basis taken
from the layer's input alone slices away every direction the layer adds: on SmolLM2 that collapsed
the model); the PCA is taken as
in the paper's sequential pass, on the signals of the already sliced layers. The layer's input is
carried from the previous basis by the shortcut ``Q_l^T Q_(l+1)``; the first layer's is folded into the
embeddings (``Q_0 = Q_1``). The other shortcuts sit on the residual path inside transformers' layer
``forward``, where no weight can absorb them: a wrapper applies them, and ``pare.save`` stores them
with the weights (edit ``residual_shortcuts``) for ``pare.load``.

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

from pare.arch.residual import ResidualPlan, projected_writes, residual_plan
from pare.arch.roles import ModelArch
from pare.arch.surgery.rotation import (
    add_shortcuts,
    check_fusable,
    final_weight_stays,
    fuse_norms,
    reader_scale,
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
        unit_tokens: scale every token of the stream to unit length before gathering moments.
    """

    method: ClassVar[str] = "slicegpt"

    slicing: float = help_field(0.25, "fraction of the hidden size deleted, in [0, 1)")
    rotation: str = help_field("shared", "shared (one rotation, plain from_pretrained) | per-layer (pare.load)")
    round_to: int = help_field(8, "kept hidden size is a multiple of this")
    damp: float = help_field(0.01, "relative diagonal damping of the moment before the eigendecomposition")
    unit_tokens: bool = help_field(True, "weigh every token equally (scale it to unit length) in the moments")

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
        was_tied = arch.tied
        keep_final = final_weight_stays(model, plan, was_tied)
        if was_tied and not keep_final:
            untie_head(model, arch.lm_head_path, arch.embed_path)
            ctx.report.notes.append(
                "the head was tied to the embeddings; the final norm's weight differs per channel, so it was folded "
                f"into an untied copy of the head (+{embed.weight.shape[0] * k:,} parameters after slicing)")
        fuse_norms(model, plan, keep_final)
        zero_mean = any(s.kind == "layernorm" for s in plan.sites)
        if cfg.rotation == "shared":
            bases, energy = self._shared_bases(self._moments(ctx), k, zero_mean)
        else:
            bases, energy = self._sequential_bases(ctx, k, zero_mean)
        rotate_stream(model, plan, bases)
        if k < hidden:
            arch = ctx.describe()
            pin_derived_widths(model, arch)
            ctx.report.edits.append(prune_hidden(model, arch, torch.arange(k)))
            scale_readers(model, plan, reader_scale(hidden, k), keep_final)
        ctx.report.uniform = sync_config(model, ctx.describe())
        if cfg.rotation == "per-layer":
            edit = add_shortcuts(arch.layer_modules(model), bases, k)
            ctx.report.edits.append(edit)
            ctx.report.uniform = False
            ctx.report.notes.append(
                f"rotation=per-layer: the inputs of {len(edit.layers)} layers pass a shortcut matrix Q_l^T Q_(l+1) "
                "(a wrapper around the layer); the saved model loads with pare.load, not plain from_pretrained")
        ctx.report.scores["slicegpt"] = {
            "hidden_before": hidden, "hidden_after": k, "rotation": cfg.rotation,
            "head_tied": bool(was_tied and keep_final),
            "kept_energy": energy,
        }

    def _moments(self, ctx: PruneContext) -> list[torch.Tensor]:
        """``sum_t x_t x_t^T`` (fp64) of the stream entering each layer, and entering the final norm."""
        runner = ctx.runner(sequential=True)
        unit = self.config.unit_tokens
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

    def _sequential_bases(self, ctx: PruneContext, k: int, zero_mean: bool) -> tuple[list[torch.Tensor], list[float]]:
        """SliceGPT's per-layer bases, computed as the paper does on the signals of the already sliced
        layers: layer ``l`` works in ``bases[l + 1]``, the PCA basis of its input and its output together
        (trace-normalised moments summed), so what it writes into the stream is kept as well as what it
        reads; the PCA is taken on the previous layers' sliced stream and the output this gives.
        Slicing is simulated in the original coordinates (input and writes projected onto the kept
        directions), which is exactly what the rotated, sliced layer computes.
        ``bases[0]`` (the embeddings) is ``bases[1]``: the first layer needs no shortcut."""
        runner = ctx.runner(sequential=True)
        unit = self.config.unit_tokens
        bases: list[torch.Tensor] = []
        energy: list[float] = []
        for step in runner.steps():
            outs = step.run(keep_outputs=True) or []
            m_in = sum(rot.second_moment(x, unit) for x in step.inputs)
            m_out = sum(rot.second_moment(y, unit) for y in outs)
            assert isinstance(m_in, torch.Tensor) and isinstance(m_out, torch.Tensor)
            # the basis serves the layer's reads (its input) and its writes (its output), equally weighted
            moment = m_in / m_in.trace().clamp_min(1e-30) + m_out / m_out.trace().clamp_min(1e-30)
            q = self._basis(moment, k, zero_mean)
            bases.append(q)
            energy.append(_kept_energy(q, moment, k))
            p = q[:, :k]
            proj = (p @ p.T).to(step.device)
            with torch.no_grad(), projected_writes(ctx.model, ctx.arch, step.index, proj):
                step.dense_outputs = [
                    step.forward_batch(b, step.inputs[b].to(step.device) @ proj.to(step.inputs[b].dtype))
                    .detach().to(step.inputs[b].device) for b in range(len(step.inputs))]
        return [bases[0], *bases], energy


def _kept_energy(q: torch.Tensor, moment: torch.Tensor, k: int) -> float:
    return float((q[:, :k].T @ moment @ q[:, :k]).trace() / moment.trace().clamp_min(1e-30))


__all__ = ["ROTATIONS", "SliceGPTConfig", "SliceGPTPruner"]
