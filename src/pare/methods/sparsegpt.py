"""SparseGPT: one-shot OBS pruning with weight reconstruction, layer by layer.

Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"
(arXiv:2301.00774), Algorithm 1: per matrix, ``H = 2/n X^T X`` of its inputs (fp32), dampened by
``percdamp * mean(diag H)``, inverted through Cholesky; columns pruned in lazy blocks of
``blocksize`` with the mask chosen per block, and the surviving weights updated to reconstruct
``W X``. The math is in :mod:`pare.ops.sparsegpt`.

Matrices that read the same input (q/k/v, gate/up) share one ``X^T X`` accumulator (recorded once,
see :func:`pare.calibration.stats.record_inputs`) and one inverse-Hessian factor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pare.arch.roles import ModelArch
from pare.arch.targets import Target
from pare.calibration.runner import LayerStep
from pare.calibration.stats import STAT_GRAM, InputStats
from pare.config import help_field, register
from pare.errors import ConfigError
from pare.methods.base import PruneContext, SparsityConfig, SparsityPruner
from pare.methods.quantize import (
    QuantAccounting,
    record_quantized,
    report_quantization,
    scheme_of,
    shared_input_groups,
    stackable,
)
from pare.ops.finite import check_finite_weight
from pare.ops.masks import make_mask
from pare.ops.quant.bits import BitsAccount, matrix_bits
from pare.ops.quant.gptq import GPTQResult, PruneSpec, act_order_perm, check_gptq_width, gptq_quantize
from pare.ops.quant.scheme import INT_SCHEMES, SCHEMES, QuantScheme, quantize
from pare.ops.sparsegpt import (
    NM_SELECT,
    InverseHessianFactor,
    inverse_hessian_factor,
    sparsegpt_prune_rows,
    stack_rows_fp32,
)

log = logging.getLogger(__name__)

# Matrices sharing an input are solved as one row-stacked fp32 matrix up to this size; larger ones (a
# big model's gate/up) one at a time: the same weights, without the stack beside the Gram matrices in
# a streamed layer's memory.
STACK_MAX_BYTES = 128 * 2**20

JOINT_MODES = ("interleaved", "prune-then-gptq")
# Default dampening (fraction of the mean Hessian diagonal): the paper's when pruning alone; ten times
# that in the joint prune + quantize pass, where the README's SmolLM2 runs found it better.
PRUNE_PERCDAMP = 0.01
JOINT_PERCDAMP = 0.1


@dataclass(frozen=True)
class SparseGPTConfig(SparsityConfig):
    """SparseGPT options.

    Attributes:
        blocksize: columns per lazy-update block (and per adaptive mask selection).
        percdamp: dampening added to the Hessian diagonal, as a fraction of its mean; unset: 0.01
            (the paper's) when pruning alone, :data:`JOINT_PERCDAMP` with ``quantize`` (both
            solves of the joint pass; see :attr:`damp`).
        mask_group: unstructured only: choose the pruned weights inside each block per ``row``
            (every row keeps exactly ``floor(in * sparsity)`` zeros; pare's default) or over the
            whole ``block`` (the reference code's choice; uneven rows).
        nm_select: N:M only: choose each group's pruned weights by the group's exact OBS loss
            (``obs``: the compensation between the group's columns included) or by the per-column
            scores ``(w / U_qq)^2`` (``score``: the reference code's rule).
        quantize: a quantization scheme (``int4``, ``mxfp4``...; see :mod:`pare.ops.quant.scheme`) to
            prune and quantize in one pass (each column masked and quantized before its error is
            spread; the paper's joint mode), or empty for pruning alone.
        group_size: with ``quantize``: inputs per scale (0: per channel; default 128, MX 32, NVFP4 16).
        symmetric: with an integer ``quantize`` scheme: no zero point.
        nm_quant: with ``quantize`` and an N:M ``pattern`` (``nm_select="obs"``): each group's mask is
            the one whose loss, with the kept weights quantized as the pass quantizes them, is least
            (:func:`pare.ops.quant.gptq.gptq_quantize`), instead of the pruning loss alone.
        clip_search: with an integer ``quantize`` scheme: each group's range is shrunk to the factor
            with the least rounding error (:func:`pare.ops.quant.rtn.int_params_searched`).
        joint: with ``quantize``, how each matrix is pruned and quantized in the one pass:
            ``prune-then-gptq`` (default: SparseGPT prunes the matrix, then GPTQ with act-order
            quantizes the kept weights with the same inputs, the pruned ones staying zero) or
            ``interleaved`` (the SparseGPT paper's joint mode: each column masked and quantized before
            its error is spread; no act-order, since N:M groups follow the input order). The README
            compares them on SmolLM2-135M.
    """

    method: ClassVar[str] = "sparsegpt"

    blocksize: int = help_field(128, "columns per lazy-update block (the mask is chosen per block)")
    percdamp: float | None = help_field(None, "Hessian dampening as a fraction of its mean diagonal (default "
                                        f"{PRUNE_PERCDAMP}; {JOINT_PERCDAMP} with quantize)")
    mask_group: str = help_field("row", "unstructured: pick pruned weights per 'row' of each block, or per 'block'")
    nm_select: str = help_field("obs", "N:M: pick each group by its exact OBS loss ('obs') or per-column "
                                "scores ('score', the reference)")
    quantize: str = help_field("", f"also quantize in the same pass: {', '.join(SCHEMES)} (empty: prune only)")
    group_size: int | None = help_field(None, "with quantize: inputs per scale (0: per channel; default 128)")
    symmetric: bool = help_field(True, "with an integer quantize scheme: symmetric (no zero point)")
    nm_quant: bool = help_field(False, "joint N:M: choose each group's mask with its kept weights' quantization "
                                "error counted")
    clip_search: bool = help_field(False, "with an integer quantize scheme: shrink each group's range to the "
                                   "least rounding error")
    joint: str = help_field("prune-then-gptq", "with quantize: 'prune-then-gptq' (SparseGPT, then act-order GPTQ "
                            "on the kept weights) or 'interleaved' (mask and quantize column by column)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ConfigError(f"blocksize must be a positive integer (128 in the paper), got {self.blocksize!r}")
        nm = self.nm
        if nm is not None and self.blocksize % nm[1]:
            raise ConfigError(f"blocksize {self.blocksize} must be a multiple of M={nm[1]} for pattern "
                              f"{self.pattern}, e.g. {nm[1] * max(1, self.blocksize // nm[1])}")
        if self.mask_group not in ("row", "block"):
            raise ConfigError(f"mask_group must be 'row' (per output row) or 'block' (reference), "
                              f"got {self.mask_group!r}")
        if self.percdamp is not None and (isinstance(self.percdamp, bool)
                                          or not isinstance(self.percdamp, (int, float)) or self.percdamp < 0):
            raise ConfigError(f"percdamp must be a number >= 0 (0.01 in the paper), got {self.percdamp!r}")
        if self.nm_select not in NM_SELECT:
            raise ConfigError(f"nm_select must be one of {', '.join(NM_SELECT)}, got {self.nm_select!r}")
        if self.quantize:
            self.quant_scheme()
        if self.joint not in JOINT_MODES:
            raise ConfigError(f"joint must be one of {', '.join(JOINT_MODES)}, got {self.joint!r}")
        if self.nm_quant and (not self.quantize or nm is None or self.nm_select != "obs"
                              or self.joint != "interleaved"):
            raise ConfigError("nm_quant chooses N:M groups in the interleaved joint pass: it needs quantize (e.g. "
                              "'int4'), an N:M pattern (e.g. '2:4'), nm_select='obs' and joint='interleaved'")
        if self.clip_search and self.quantize not in INT_SCHEMES:
            raise ConfigError(f"clip_search searches integer ranges: it needs an integer quantize scheme "
                              f"({', '.join(INT_SCHEMES)}), got {self.quantize or 'none'!r}")
        if not self.quantize and (self.group_size is not None or not self.symmetric):
            raise ConfigError("group_size and symmetric apply with quantize (e.g. quantize='int4'); set quantize or "
                              "drop them")

    @property
    def damp(self) -> float:
        """The dampening used: ``percdamp``, or when unset the default of the pass (pruning alone or joint)."""
        if self.percdamp is not None:
            return float(self.percdamp)
        return JOINT_PERCDAMP if self.quantize else PRUNE_PERCDAMP

    def quant_scheme(self) -> QuantScheme | None:
        """The joint pass's quantization scheme, or None when pruning alone."""
        return scheme_of(self.quantize, self.group_size, self.symmetric) if self.quantize else None


@register
class SparseGPTPruner(QuantAccounting, SparsityPruner):
    """Prune and reconstruct every target matrix with SparseGPT."""

    config_class = SparseGPTConfig
    config: SparseGPTConfig
    stats: ClassVar[frozenset[str]] = frozenset({STAT_GRAM})

    def __init__(self, config: SparseGPTConfig) -> None:
        super().__init__(config)
        self._factor_of: tuple[InputStats, InverseHessianFactor] | None = None
        self._act_of: tuple[InputStats, InverseHessianFactor, torch.Tensor] | None = None
        self.losses: dict[str, float] = {}
        self.scheme = config.quant_scheme()
        self.bits = BitsAccount()
        self.inexact: list[str] = []

    def check(self, model: nn.Module, arch: ModelArch) -> None:
        super().check(model, arch)
        if self.scheme is not None:
            for i, layer in enumerate(arch.layer_modules(model)):
                for t in self._selected(arch, i, layer):
                    check_gptq_width(self.scheme, t.shape[1], t.name)  # both joint modes run the GPTQ solver

    def _factor(self, stats: InputStats, model_dtype: torch.dtype) -> InverseHessianFactor:
        """The inverse-Hessian factor of ``stats``; targets that share the statistics object (q/k/v,
        gate/up, pruned one after the other) reuse it. Only the last factor is kept."""
        if self._factor_of is not None and self._factor_of[0] is stats:
            return self._factor_of[1]
        self._factor_of = None  # release the previous factor before building the next
        # the last matrix reading these statistics takes their Gram matrix over (the joint pass reads it
        # again for act-order); either way the Hessian is a tensor of its own, the factor's work buffer
        release = stats.last_reader and self.scheme is None
        factor = inverse_hessian_factor(stats.hessian(release), self.config.damp, model_dtype, overwrite=True)
        self._factor_of = (stats, factor)
        return factor

    def _act_factor(self, stats: InputStats) -> tuple[InverseHessianFactor, torch.Tensor]:
        """The act-ordered inverse-Hessian factor of ``stats`` and its permutation (``prune-then-gptq``),
        reused by the matrices sharing the statistics."""
        if self._act_of is None or self._act_of[0] is not stats:
            self._act_of = None
            H = stats.hessian()
            perm = act_order_perm(H)
            self._act_of = (stats, inverse_hessian_factor(H[perm][:, perm], self.config.damp, overwrite=True), perm)
        return self._act_of[1], self._act_of[2]

    def prune_targets(self, index: int, targets: list[Target], stats: dict[str, InputStats]) -> None:
        """Prune one layer's targets; matrices that read one input (q/k/v, gate/up) are solved as one
        row-stacked matrix when their rows are independent (per-row or N:M masks, one sparsity), so
        each OBS column loop runs once per input instead of once per matrix."""
        for group in shared_input_groups(targets, stats):
            sparsities = {self.target_sparsity(index, t) for t in group}
            own = {t.name: stats.pop(t.name) for t in group}
            st = own[group[0].name]
            if len(group) > 1 and len(sparsities) == 1 and self._stackable(group, st):
                st.last_reader = True  # the stacked solve is its only reader
                self._prune_rows(group, st, sparsities.pop())
            else:
                super().prune_targets(index, group, own)
            del own, st

    def _stackable(self, targets: list[Target], stats: InputStats) -> bool:
        cfg = self.config
        rows_independent = cfg.nm is not None or cfg.mask_group == "row"
        has_data = stats.tokens > 0 and stats.gram is not None
        small = sum(t.shape[0] for t in targets) * targets[0].shape[1] * 4 <= STACK_MAX_BYTES
        return rows_independent and has_data and small and stackable(self.scheme, targets)

    def _prune_rows(self, targets: list[Target], stats: InputStats, sparsity: float) -> None:
        """SparseGPT (and the joint quantization) of ``targets`` stacked by rows; they share ``stats``."""
        cfg = self.config
        ws = [t.weight() for t in targets]
        for t, w in zip(targets, ws, strict=True):
            check_finite_weight(w, t.name)
        factor = self._factor(stats, ws[0].dtype)
        w = stack_rows_fp32(ws, factor.U.device)
        if self.scheme is None:
            pruned, row_loss = sparsegpt_prune_rows(w, factor, sparsity, cfg.nm, cfg.blocksize, cfg.mask_group,
                                                    cfg.nm_select, overwrite=True)
            del w  # now the storage of ``pruned``
        else:
            res = self._joint(w, factor, stats, sparsity, self.scheme.for_weight(ws[0].dtype), overwrite=True)
            del w  # prune-then-gptq pruned it in place
            pruned, row_loss = res.weight, res.row_loss
        start = 0
        for t, x in zip(targets, ws, strict=True):
            rows = slice(start, start + x.shape[0])
            start += x.shape[0]
            self.losses[t.name] = float(row_loss[rows].sum())
            if self.scheme is None:
                x.copy_(pruned[rows])  # converts in place: no second copy of the rows
            else:
                record_quantized(x, pruned[rows], t.name, self.inexact)
                self._count_bits(t, x)

    def _joint(self, w: torch.Tensor, factor: InverseHessianFactor, stats: InputStats, sparsity: float,
               scheme: QuantScheme, overwrite: bool = False) -> GPTQResult:
        """Prune and quantize ``w: [out, in]`` (fp32) in the configured joint pass; ``row_loss`` holds both
        the pruning and the quantization losses. With ``overwrite`` (``w`` is a work copy, e.g. the
        row-stacked q/k/v), ``prune-then-gptq`` prunes ``w`` in place instead of into a second copy."""
        cfg = self.config
        if cfg.joint == "prune-then-gptq":
            pruned, prune_loss = sparsegpt_prune_rows(w, factor, sparsity, cfg.nm, cfg.blocksize, cfg.mask_group,
                                                      cfg.nm_select, overwrite=overwrite)
            act, perm = self._act_factor(stats)
            res = gptq_quantize(pruned, act, scheme, blocksize=cfg.blocksize, perm=perm, keep_zero=pruned == 0,
                                clip_search=cfg.clip_search)
            res.row_loss += prune_loss
            res.loss = float(res.row_loss.sum())
            return res
        spec = PruneSpec(sparsity, cfg.nm, cfg.mask_group, cfg.nm_select, cfg.nm_quant)
        return gptq_quantize(w, factor, scheme, blocksize=cfg.blocksize, prune=spec, clip_search=cfg.clip_search)

    def _count_bits(self, target: Target, w: torch.Tensor) -> None:
        nonzero = None if self.config.nm is not None else int(torch.count_nonzero(w))  # what a bitmask format stores
        self.bits = self.bits + matrix_bits(target.shape, self.scheme, nm=self.config.nm, nonzero=nonzero)

    def prune_target(self, target: Target, stats: InputStats | None, sparsity: float) -> None:
        w = target.weight()
        cfg = self.config
        if stats is None or stats.tokens == 0 or stats.gram is None:
            log.warning("%s received no calibration tokens: pruned by magnitude instead", target.name)
            mask = make_mask(w.abs().float(), sparsity, cfg.nm, per_row=True)
            if self.scheme is None:
                w.masked_fill_(mask, 0)
                return
            dq = quantize(w.float().masked_fill(mask, 0), self.scheme.for_weight(w.dtype)).dequant
            record_quantized(w, dq, target.name, self.inexact)
        else:
            check_finite_weight(w, target.name)
            factor = self._factor(stats, w.dtype)
            if self.scheme is None:
                pruned, row_loss = sparsegpt_prune_rows(w, factor, sparsity, cfg.nm, cfg.blocksize, cfg.mask_group,
                                                        cfg.nm_select)
                w.copy_(pruned)  # converts in place: no copy in the weight's dtype beside the fp32 result
                self.losses[target.name] = float(row_loss.sum())
                return
            res = self._joint(w.float(), factor, stats, sparsity, self.scheme.for_weight(w.dtype))
            record_quantized(w, res.weight, target.name, self.inexact)
            self.losses[target.name] = res.loss
        self._count_bits(target, w)

    def run(self, ctx: PruneContext) -> None:
        try:
            super().run(ctx)
        finally:
            self._factor_of = self._act_of = None

    def layer_step(self, ctx: PruneContext, step: LayerStep) -> None:
        try:
            super().layer_step(ctx, step)
        finally:
            self._factor_of = self._act_of = None  # the layer's last factors are not needed by the next layer

    def end_layers(self, ctx: PruneContext) -> None:
        super().end_layers(ctx)
        ctx.report.scores["sparsegpt_loss"] = self.losses
        if self.scheme is not None:
            fmt = f"{self.config.pattern} indices" if self.config.nm is not None else "bitmask"
            report_quantization(ctx, self.scheme, self.bits, self.inexact, {}, sparse=fmt)
