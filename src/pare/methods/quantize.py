"""Weight quantization as a method: round-to-nearest, or GPTQ through the layer-wise runner.

Fake quantization: every selected matrix is replaced by its dequantized values in the model's dtype,
so the model keeps loading with ``from_pretrained`` and runs as before; the report records the
scheme and what storing the codes would cost (:mod:`pare.ops.quant.bits`). RTN needs no data; GPTQ
(Frantar et al., 2023) gathers ``H = 2/n X^T X`` of every matrix's inputs layer by layer exactly as
SparseGPT does (matrices reading one input share it) and runs :func:`pare.ops.quant.gptq.gptq_quantize`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from pare.arch.roles import LayerRoles, ModelArch
from pare.arch.targets import Target, check_selection, layer_targets, select
from pare.calibration.inline import GroupInputMismatch, InlineSolver
from pare.calibration.runner import LayerStep
from pare.calibration.stats import InputStats
from pare.config import PruneConfig, check_regexes, help_field, register
from pare.errors import ConfigError
from pare.methods.base import PruneContext, Pruner
from pare.ops.hessian import InverseHessianFactor, inverse_hessian_factor
from pare.ops.quant.act import ACTIVATION_KINDS, TokenQuantHook
from pare.ops.quant.bits import BitsAccount, matrix_bits
from pare.ops.quant.gptq import act_order_perm, check_gptq_width, gptq_quantize
from pare.ops.quant.scheme import INT_SCHEMES, SCHEMES, QuantScheme, fixed_group, quantize

log = logging.getLogger(__name__)

QUANT_METHODS = ("rtn", "gptq")


def _check_number(name: str, value: Any, lo: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < lo:
        raise ConfigError(f"{name} must be a number >= {lo:g}, got {value!r}")


@dataclass(frozen=True)
class QuantizeConfig(PruneConfig):
    """Quantization options.

    Attributes:
        scheme: int8 / int4 / int3 / int2, mxfp8-e4m3 / mxfp8-e5m2 / mxfp6-e3m2 / mxfp6-e2m3 /
            mxfp4 / mxint8 (OCP MX, blocks of 32), or nvfp4 (blocks of 16).
        group_size: integer schemes: inputs sharing a scale (0 = per output channel); MX and NVFP4
            define their own block (leave it at the default).
        symmetric: integer schemes: no zero point.
        method: ``rtn`` (round to nearest, no data) or ``gptq`` (OBS updates on calibration data).
        act_order: GPTQ: process inputs by decreasing Hessian diagonal.
        damp: GPTQ: Hessian dampening as a fraction of its mean diagonal.
        blocksize: GPTQ: lazy-update block width.
        targets: regexes of module names to quantize (default: every linear inside a decoder layer).
        ignore: regexes of module names never to quantize.
        act_quant: also simulate dynamic per-token quantization of the quantized linears' inputs
            (``int8`` or ``fp8`` E4M3: W8A8 with an 8-bit weight scheme), as forward pre-hooks on those
            linears (:class:`pare.ops.quant.act.TokenQuantHook`); ``pare.load`` puts them back from the
            manifest. Empty: weights only, activations stay in the model's dtype.
        clip_search: GPTQ with an integer scheme: each group's range is shrunk to the factor with the least
            rounding error (:func:`pare.ops.quant.rtn.int_params_searched`).
        keep_zeros: weights that are exactly zero (an earlier pruning stage's) stay zero: GPTQ spreads
            its errors onto the other weights only, RTN leaves them at zero even with a zero point.
        true_sequential: GPTQ with sequential calibration: a layer's matrices are solved in the order
            its forward reads them (q/k/v, o, gate/up, down), each from inputs computed with the
            earlier ones already quantized (:mod:`pare.calibration.inline`); with one calibration
            batch (``batch_size >= nsamples``) that is one forward per layer instead of two. None (the
            default): on exactly then (one batch, sequential calibration), where it needs fewer forwards
            than the two-pass solve; off with several batches, where it would need a pass per group.
    """

    method: ClassVar[str] = "quantize"

    scheme: str = help_field("int4", f"quantization scheme: {', '.join(SCHEMES)}")
    group_size: int | None = help_field(None, "inputs per scale (0: per channel); default 128, MX 32, NVFP4 16")
    symmetric: bool = help_field(True, "integer schemes: symmetric (no zero point)")
    algorithm: str = help_field("rtn", "'rtn' (round to nearest, no data) or 'gptq' (calibration data)")
    act_order: bool = help_field(False, "GPTQ: process inputs by decreasing Hessian diagonal")
    damp: float = help_field(0.01, "GPTQ: Hessian dampening as a fraction of its mean diagonal")
    blocksize: int = help_field(128, "GPTQ: columns per lazy-update block")
    targets: tuple[str, ...] = help_field((), "regexes of module names to quantize (default: all decoder linears)")
    ignore: tuple[str, ...] = help_field((), "regexes of module names never to quantize")
    act_quant: str = help_field("", "simulate dynamic per-token activation quantization of the quantized "
                                  "linears' inputs: int8 or fp8 (W8A8); empty: weights only")
    keep_zeros: bool = help_field(False, "weights already zero (pruned) stay zero, so a pruned model stays sparse")
    clip_search: bool = help_field(False, "GPTQ, integer schemes: shrink each group's range to the least rounding "
                                   "error")
    true_sequential: bool | None = help_field(None, "GPTQ: solve a layer's matrices in call order, each on inputs "
                                              "from the already-quantized ones (one forward per layer with one "
                                              "batch); default: on when one batch holds every window")

    def __post_init__(self) -> None:
        super().__post_init__()  # every field's type
        self.quant_scheme()  # validates scheme, group size and symmetry
        if self.algorithm not in QUANT_METHODS:
            raise ConfigError(f"algorithm must be one of {', '.join(QUANT_METHODS)}, got {self.algorithm!r}")
        _check_number("damp", self.damp, 0)
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ConfigError(f"blocksize must be a positive integer (128 in the paper), got {self.blocksize!r}")
        if self.act_order and self.algorithm != "gptq":
            raise ConfigError("act_order applies to algorithm='gptq' only")
        if self.clip_search and (self.algorithm != "gptq" or self.scheme not in INT_SCHEMES):
            raise ConfigError(f"clip_search applies to algorithm='gptq' with an integer scheme "
                              f"({', '.join(INT_SCHEMES)}); got algorithm={self.algorithm!r}, scheme={self.scheme!r}")
        if self.true_sequential and self.algorithm != "gptq":
            raise ConfigError("true_sequential applies to algorithm='gptq' only (RTN reads no inputs)")
        check_regexes("targets", self.targets)
        check_regexes("ignore", self.ignore)
        if self.act_quant not in ("", *ACTIVATION_KINDS):
            raise ConfigError(f"act_quant must be one of {', '.join(ACTIVATION_KINDS)} (dynamic per-token "
                              f"activations), or empty for weight-only quantization; got {self.act_quant!r}")

    def quant_scheme(self) -> QuantScheme:
        """The :class:`QuantScheme` these options describe."""
        return scheme_of(self.scheme, self.group_size, self.symmetric)


def scheme_of(name: str, group_size: int | None, symmetric: bool) -> QuantScheme:
    """A scheme with its default group (integers: 128; MX: 32; NVFP4: 16) when ``group_size`` is None."""
    if group_size is None:
        fixed = fixed_group(name)
        group_size = 128 if fixed is None else fixed
    return QuantScheme(name, group_size, symmetric)


def representable_in(dq: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether every fp32 value of ``dq`` survives a cast to ``dtype`` unchanged."""
    return dtype == torch.float32 or dtype == torch.float64 or bool(torch.equal(dq.to(dtype).to(dq.dtype), dq))


class QuantAccounting:
    """What a quantizing pruner accumulates over its layers (per-module losses, the bits account, the
    modules whose values the model's dtype cannot hold), saved and restored per layer so a resumed
    streaming run reports the same as an uninterrupted one."""

    losses: dict[str, float]
    bits: BitsAccount
    inexact: list[str]

    def layer_state(self) -> dict[str, Any]:
        return {"losses": dict(self.losses), "bits": asdict(self.bits), "inexact": list(self.inexact)}

    def restore_layer_state(self, state: dict[str, Any]) -> None:
        self.losses = dict(state["losses"])
        self.bits = BitsAccount(**state["bits"])
        self.inexact = list(state["inexact"])


@register
class QuantizePruner(QuantAccounting, Pruner):
    """Fake-quantize every selected matrix (RTN, or GPTQ layer by layer)."""

    config_class = QuantizeConfig
    config: QuantizeConfig
    dense_in_step: ClassVar[bool] = True

    @classmethod
    def example_config(cls) -> QuantizeConfig:
        return QuantizeConfig(group_size=0)  # per channel: any input width

    def __init__(self, config: QuantizeConfig) -> None:
        super().__init__(config)
        self.scheme = config.quant_scheme()
        self.bits = BitsAccount()
        self.inexact: list[str] = []
        self._factor_of: tuple[InputStats, InverseHessianFactor, torch.Tensor | None] | None = None
        self.losses: dict[str, float] = {}

    def uses_calibration(self) -> bool:
        return self.config.algorithm == "gptq"

    def _selected(self, arch: ModelArch, index: int, layer: nn.Module) -> list[Target]:
        found = layer_targets(layer, arch.layers[index], arch.layer_prefix(index))
        return select(found, self.config.targets, self.config.ignore)

    def check(self, model: nn.Module, arch: ModelArch) -> None:
        layers = arch.layer_modules(model)
        names = [t.name for i, layer in enumerate(layers)
                 for t in layer_targets(layer, arch.layers[i], arch.layer_prefix(i))]
        check_selection(names, self.config.targets, self.config.ignore)
        for i, layer in enumerate(layers):
            for t in self._selected(arch, i, layer):
                if self.config.algorithm == "gptq":
                    check_gptq_width(self.scheme, t.shape[1], t.name)
                else:
                    self.scheme.check_width(t.shape[1], t.name)
                if self.config.act_quant and t.expert is not None:
                    raise ConfigError(f"act_quant={self.config.act_quant!r} simulates the inputs of linear "
                                      f"modules; {t.name} is a slice of a fused expert parameter. Leave the experts "
                                      "out with ignore, or quantize weights only")

    def _factor(self, stats: InputStats) -> tuple[InverseHessianFactor, torch.Tensor | None]:
        """The (act-ordered) inverse-Hessian factor of ``stats``, reused by matrices sharing it."""
        if self._factor_of is not None and self._factor_of[0] is stats:
            return self._factor_of[1], self._factor_of[2]
        self._factor_of = None
        H = stats.hessian()
        perm = act_order_perm(H) if self.config.act_order else None
        if perm is not None:
            H = H[perm][:, perm]
        factor = inverse_hessian_factor(H, self.config.damp, overwrite=True)  # H is a tensor of its own
        self._factor_of = (stats, factor, perm)
        return factor, perm

    def quantize_target(self, target: Target, stats: InputStats | None) -> None:
        self.quantize_group([target], stats)

    def quantize_group(self, targets: list[Target], stats: InputStats | None) -> None:
        """Quantize ``targets``, matrices that read one input (``stats``): with GPTQ, as one row-stacked
        matrix (rows are independent and share the factor), so the column loop runs once for q/k/v
        and once for gate/up."""
        if self.config.algorithm != "gptq" or stats is None or stats.tokens == 0 or stats.gram is None:
            for t in targets:
                self._round(t)
            return
        for group in ([targets] if stackable(self.scheme, targets) else [[t] for t in targets]):
            self._gptq_rows(group, stats)

    def _gptq_rows(self, targets: list[Target], stats: InputStats) -> None:
        """GPTQ on ``targets`` stacked by rows (one matrix when ``targets`` has one element)."""
        factor, perm = self._factor(stats)
        ws = [t.weight() for t in targets]
        w = torch.cat([x.float() for x in ws])
        zeros = (w == 0) if self.config.keep_zeros else None
        res = gptq_quantize(w, factor, self.scheme.for_weight(ws[0].dtype), blocksize=self.config.blocksize,
                            perm=perm, keep_zero=zeros, clip_search=self.config.clip_search)
        start = 0
        for t, x in zip(targets, ws, strict=True):
            rows = slice(start, start + x.shape[0])
            start += x.shape[0]
            self.losses[t.name] = float(res.row_loss[rows].sum())
            record_quantized(x, res.weight[rows], t.name, self.inexact)
            self.bits = self.bits + matrix_bits(t.shape, self.scheme)

    def _round(self, target: Target) -> None:
        """Round ``target`` to nearest (RTN): no data, or GPTQ without calibration tokens."""
        if self.config.algorithm == "gptq":
            log.warning("%s received no calibration tokens: rounded to nearest instead", target.name)
        w = target.weight()
        dq = quantize(w, self.scheme.for_weight(w.dtype)).dequant
        if self.config.keep_zeros:
            dq = dq.masked_fill((w == 0).to(dq.device), 0.0)
        record_quantized(w, dq, target.name, self.inexact)
        self.bits = self.bits + matrix_bits(target.shape, self.scheme)

    def run(self, ctx: PruneContext) -> None:
        if self.config.true_sequential and not ctx.runtime.sequential:
            raise ConfigError("true_sequential solves each layer on the outputs of its already-quantized "
                              "matrices, so it needs sequential calibration (RuntimeConfig(sequential=True)); "
                              "drop one of the two")
        try:
            if self.uses_calibration():
                # sequential: each layer sees the quantized layers' outputs (a recording pass, then the
                # runner's pass with the quantized weights); dense inputs: the recording pass also keeps
                # the dense outputs for the next layer (one forward per layer, see layer_step)
                for step in ctx.runner(sequential=True).steps(final_outputs=False,
                                                              overwrite_inputs=ctx.runtime.sequential):
                    self.layer_step(ctx, step)
            else:
                self._run_data_free(ctx)
        finally:
            self._factor_of = None
        self.end_layers(ctx)

    def stream_refusal(self) -> str | None:
        return None

    def split_refusal(self) -> str | None:
        return None

    def layer_step(self, ctx: PruneContext, step: LayerStep) -> None:
        """Quantize one layer: GPTQ from the statistics of its inputs, or RTN (no data)."""
        targets = self._selected(ctx.arch, step.index, step.layer)
        try:
            if not self.uses_calibration():
                for t in targets:
                    self.quantize_target(t, None)
                return
            if self._wants_true_sequential(ctx, step) and self._true_sequential(step, targets):
                return
            keep = not ctx.runtime.sequential and step.index < ctx.arch.num_layers - 1
            stats, outputs = step.record(targets, lambda _t: InputStats(want_gram=True), replace_inputs=keep)
            if keep:
                step.dense_outputs = outputs  # taken before this layer is quantized, in place of its inputs
            for group in shared_input_groups(targets, stats):
                self.quantize_group(group, stats[group[0].name])
                for t in group:
                    del stats[t.name]
        finally:
            self._factor_of = None

    def _wants_true_sequential(self, ctx: PruneContext, step: LayerStep) -> bool:
        """The option as given; unset: on when one batch holds every window (one forward per layer instead
        of the two-pass solve's two), with sequential calibration (each layer on the quantized ones' outputs)."""
        if self.config.true_sequential is not None:
            return self.config.true_sequential
        return ctx.runtime.sequential and len(step.inputs) == 1

    def _true_sequential(self, step: LayerStep, targets: list[Target]) -> bool:
        """Solve ``targets`` in call order (:class:`InlineSolver`); False, with the weights put back,
        when the layer's matrices do not read their inputs as its roles say (record it otherwise).
        With one batch the forward that solved the layer gave its outputs (``step.dense_outputs``)."""
        if not step.inputs or step.replicas is not None or any(t.expert is not None for t in targets):
            return False  # nothing recorded, batches split across devices (layer copies), or fused experts
        saved = [t.weight().clone() for t in targets]
        accounting = self.layer_state()
        solver = InlineSolver(role_groups(step.layer, step.roles, targets), lambda: InputStats(want_gram=True),
                              self.quantize_group)
        try:
            if len(step.inputs) == 1:
                solver.one_forward(lambda: step.run(replace_inputs=True), step.layer)
                step.dense_outputs = step.inputs  # the quantized layer's outputs (the runner passes them on)
            else:
                solver.passes(step.run, step.layer)
        except GroupInputMismatch as why:
            log.debug("layer %d: %s; recording its inputs in one pass instead", step.index, why)
            for t, w in zip(targets, saved, strict=True):
                t.weight().copy_(w)
            self.restore_layer_state(accounting)
            step.dense_outputs = None
            return False
        for group in solver.unsolved:  # never called on the calibration data
            self.quantize_group(group, None)
        return True

    def end_layers(self, ctx: PruneContext) -> None:
        report_quantization(ctx, self.scheme, self.bits, self.inexact, self.losses)
        if self.config.act_quant:
            count = install_activation_quant(ctx.model, ctx.arch, self.config)
            ctx.report.scores["quantization"]["activations"] = self.config.act_quant
            ctx.report.notes.append(f"{count} linears fake-quantize their inputs per token ({self.config.act_quant}, "
                                    "dynamic) through forward pre-hooks: pare.load restores them; a plain "
                                    "from_pretrained runs the weights with unquantized activations")

    def _run_data_free(self, ctx: PruneContext) -> None:
        device = ctx.device
        for i, layer in enumerate(ctx.arch.layer_modules(ctx.model)):
            home = next(layer.parameters()).device
            if home != device:
                layer.to(device)
            for t in self._selected(ctx.arch, i, layer):
                self.quantize_target(t, None)
            if home != device:
                layer.to(home)


def role_groups(layer: nn.Module, roles: LayerRoles, targets: list[Target]) -> list[list[Target]]:
    """``targets`` grouped by the input the architecture's roles say they read: the attention's input
    projections (q/k/v) in one group, the MLP's (gate/up) in another, every other matrix alone."""
    block_of: dict[int, int] = {}
    for b, block in enumerate((roles.attention, roles.mlp)):
        for proj in block.inputs if block is not None else ():
            block_of[id(layer.get_submodule(proj.path))] = b
    groups: dict[object, list[Target]] = {}
    for t in targets:
        groups.setdefault(block_of.get(id(t.module), t.name), []).append(t)
    return list(groups.values())


def shared_input_groups(targets: list[Target], stats: dict[str, InputStats]) -> list[list[Target]]:
    """``targets`` grouped by their statistics object (matrices reading one input share it), in order."""
    groups: dict[int, list[Target]] = {}
    for t in targets:
        groups.setdefault(id(stats[t.name]), []).append(t)
    return list(groups.values())


def stackable(scheme: QuantScheme | None, targets: list[Target]) -> bool:
    """Whether ``targets`` can be solved as one row-stacked matrix: one dtype and device, and no scheme
    (pruning only) or one without a per-tensor parameter (NVFP4's tensor scale is taken over the whole
    matrix)."""
    ws = [t.weight() for t in targets]
    return (scheme is None or scheme.name != "nvfp4") and len({(w.dtype, w.device, w.shape[1]) for w in ws}) == 1


def record_quantized(w: torch.Tensor, dq: torch.Tensor, name: str, inexact: list[str]) -> None:
    """Write ``dq`` (fp32) into the live weight ``w``; note ``name`` when ``w``'s dtype rounds it."""
    if not representable_in(dq, w.dtype):
        inexact.append(name)
    w.copy_(dq.to(device=w.device, dtype=w.dtype))


def report_quantization(ctx: PruneContext, scheme: QuantScheme, bits: BitsAccount, inexact: list[str],
                        losses: dict[str, float], sparse: str | None = None) -> None:
    """The report's ``quantization`` scores and ``bits_per_param`` / ``quantized_bytes`` figures."""
    ctx.report.scores["quantization"] = {
        "scheme": scheme.name, "group_size": scheme.group_size, "symmetric": scheme.symmetric,
        "element_bits": scheme.bits, "sparse_format": sparse, **bits.to_dict(),
        "not_exact_in_dtype": inexact, "gptq_loss": losses,
    }
    ctx.report.figures["bits_per_param"] = bits.bits_per_param
    ctx.report.figures["quantized_bytes"] = bits.bytes
    if inexact:
        first = next(ctx.model.parameters())
        msg = (f"{len(inexact)} quantized matrices hold values that {first.dtype} cannot represent exactly "
               f"(e.g. {inexact[0]}): the saved weights are the dequantized values rounded to {first.dtype}; "
               "load the model in float32 (--dtype float32) for exact fake quantization"
               + ("; integer scales are kept in that dtype, so these rounded values are exactly what a "
                  "pare export (compressed-tensors, GGUF) dequantizes to" if scheme.name in INT_SCHEMES else ""))
        log.warning(msg)
        ctx.report.notes.append(msg)


def install_activation_quant(model: nn.Module, arch: ModelArch, config: QuantizeConfig) -> int:
    """Hook per-token activation fake quantization (``config.act_quant``) onto every linear ``config``
    selects; returns how many. The hooks are the simulated model's behaviour: they stay on the model."""
    hook = TokenQuantHook(config.act_quant)
    count = 0
    for i, layer in enumerate(arch.layer_modules(model)):
        found = layer_targets(layer, arch.layers[i], arch.layer_prefix(i))
        for t in select(found, config.targets, config.ignore):
            if t.expert is None:
                t.module.register_forward_pre_hook(hook)
                count += 1
    return count


def restore_activation_quant(model: nn.Module, manifest: dict[str, Any]) -> int:
    """Put back the activation simulation the manifest's quantize stages recorded; returns the hooked linears."""
    from pare.arch import describe
    from pare.io.save import manifest_override, manifest_stages

    count = 0
    for stage in manifest_stages(manifest):
        cfg = stage.get("config") or {}
        if stage.get("method") != QuantizeConfig.method or not cfg.get("act_quant"):
            continue
        config = QuantizeConfig.from_dict(cfg)
        count += install_activation_quant(model, describe(model, manifest_override(manifest)), config)
    return count
