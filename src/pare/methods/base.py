"""The stage lifecycle every method implements, and the shared machinery of layer-wise sparsity.

A method is a frozen config dataclass plus a stage class (a :class:`Pruner`) registered with
:func:`pare.config.register`. A stage declares what it needs (:meth:`Pruner.needs`: calibration
windows, gradients over them, or nothing) and implements a small lifecycle, driven by
:mod:`pare.pipeline` in this order:

1. ``check(model, arch)``: refuse options that cannot apply, before any work. In a recipe every
   stage is checked before the first one runs: a later stage against a parameter-free copy of the
   model (on the ``meta`` device) to which each earlier stage that changes shapes applied its
   ``preview`` (the cut its options ask for, with placeholder channels or layers);
2. ``start(ctx)``: note what ``finish`` compares against (the model is not changed yet);
3. ``run(ctx)``: the whole-model step; layer-wise methods ask ``ctx.runner()`` for the layer steps
   (the runner decides the passes, dense or sequential inputs, and which layer is on which device)
   and hand each to their per-layer step (``layer_step``, between ``begin_layers`` and
   ``end_layers``), which the streaming runner (:mod:`pare.stream`) also calls with layers read
   from disk; ``stream_refusal`` says why a stage cannot stream;
4. ``finish(ctx)``: complete the report (measured sparsity, notes, whether the shapes are uniform).

The math itself lives in :mod:`pare.ops`.
"""

from __future__ import annotations

import copy
import logging
import re
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from pare.arch.roles import ModelArch
from pare.arch.targets import Target, check_selection, layer_targets, select
from pare.calibration.runner import LayerStep, LayerwiseRunner, on_device
from pare.calibration.stats import STAT_GRAM, InputStats, SharedInputChanged, expert_inputs_problem
from pare.config import PruneConfig, RuntimeConfig, check_ratio, check_regexes, help_field
from pare.errors import ConfigError, UnsupportedArchitectureError
from pare.eval.memory import return_freed_memory
from pare.eval.size import nonzero, nonzero_by_parameter
from pare.ops.masks import parse_pattern
from pare.ops.owl import layer_outlier_ratio, owl_sparsities
from pare.ops.wanda import wanda_scores
from pare.report import Report

if TYPE_CHECKING:
    from pare.arch import ArchOverride

log = logging.getLogger(__name__)

Needs = Literal["windows", "gradients", "nothing"]
"""What a stage needs from the calibration set: token windows (statistics from forward passes),
gradients over them (a backward pass), or nothing (data-free)."""

DENSE_ZEROS_NOTE = (
    "Unstructured/N:M sparsity leaves a dense checkpoint of the same size and dense speed: the zeros "
    "are stored. Gains need a sparse format or kernels (the N:M pattern is recorded for them)."
)


def check_expert_inputs(model: nn.Module, arch: ModelArch, targets: list[Target]) -> None:
    """Before any work: each fused experts module among ``targets`` lets pare record its experts' inputs
    (:func:`~pare.calibration.stats.expert_inputs_problem`), else UnsupportedArchitectureError."""
    hidden = int(getattr(arch.config_of(model.config), arch.fields.hidden))
    seen: set[int] = set()
    for t in targets:
        if t.expert is None or id(t.module) in seen:
            continue
        seen.add(id(t.module))
        why = expert_inputs_problem(t.module, t.gate_up_param or t.param, hidden)
        if why is not None:
            raise UnsupportedArchitectureError(why)


@dataclass
class PruneContext:
    """Everything a stage may use.

    Attributes:
        model: the model, changed in place.
        arch: its description (made with ``arch_override``).
        calibration: token windows ``[N, L]`` or None for data-free stages.
        runtime: device / offload / sequential settings as given.
        report: filled in by the stage (scores, edits, notes).
        batch_size: windows per forward in the runner.
        device: the resolved compute device (checked once per run; the first of ``devices``).
        devices: every compute device; with several the runner splits the calibration batches across
            them (:mod:`pare.calibration.replicas`).
        arch_override: the caller's architecture corrections: a stage that describes the model again
            (after cutting it) passes them on.
        tokenizer: the model's tokenizer when the caller has it (a recovery stage tokenizes its text).
        history: the reports of the stages applied to the model before this one, in order (a
            recovery stage maps the layers a depth cut kept back to the teacher's).
    """

    model: nn.Module
    arch: ModelArch
    calibration: torch.Tensor | None
    runtime: RuntimeConfig
    report: Report
    batch_size: int = 8
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    arch_override: ArchOverride | None = None
    tokenizer: Any = None
    history: list[Report] = field(default_factory=list)
    devices: list[torch.device] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.devices:
            self.devices = [self.device]

    @property
    def dtype(self) -> torch.dtype | None:
        """The model's floating dtype (None for a model without parameters)."""
        first = next(self.model.parameters(), None)
        return None if first is None else first.dtype

    def describe(self) -> ModelArch:
        """The model described again (after a structural edit), with the caller's override."""
        from pare.arch import describe

        return describe(self.model, self.arch_override)

    def runner(self, ids: torch.Tensor | None = None, sequential: bool | None = None) -> LayerwiseRunner:
        """A layer-wise runner over ``ids`` (default: the calibration windows) with the runtime's
        settings; ``sequential`` overrides the runtime's choice (scoring passes want dense inputs)."""
        ids = self.calibration if ids is None else ids
        if ids is None:
            raise ConfigError(f"{self.report.method} needs calibration windows, and none were given")
        return LayerwiseRunner(
            self.model, self.arch, ids, device=self.device,
            batch_size=self.batch_size, offload=self.runtime.offload,
            sequential=self.runtime.sequential if sequential is None else sequential,
            progress=self.runtime.progress, devices=self.devices,
        )


class Pruner(ABC):
    """A stage (pruner, quantizer, recovery step): built once from its config, run on a context.

    Subclasses set ``config_class`` and are registered with ``@pare.config.register``; the config's
    ``method`` is their name everywhere.
    """

    config_class: ClassVar[type[PruneConfig]]
    needs_calibration: ClassVar[bool] = True
    dense_in_step: ClassVar[bool] = False
    """Whether the per-layer step keeps the dense outputs itself when the inputs are dense
    (``sequential=False``); otherwise the in-memory runner computes them before the step."""
    changes_shapes: ClassVar[bool] = False
    """Whether the stage changes shapes (layers, heads, channels): then the stages after it are checked
    against its :meth:`preview`."""
    prunes_vision: ClassVar[bool] = False
    """Whether the stage also prunes a vision tower (``component="vision"``: its per-layer step needs only
    the layers' inputs, no logits, loss or decoder-only structure)."""
    runs_elsewhere: ClassVar[str] = ""
    """Where the stage runs when ``pare prune --method NAME`` does not (its options stay out of that
    command's help, and the command refuses the method with this text); empty: ``pare prune`` runs it."""

    def __init__(self, config: PruneConfig) -> None:
        self.config = config

    @classmethod
    def example_config(cls) -> PruneConfig:
        """A config of this stage that applies to any small model (the contract tests run every
        registered stage with it); the config's defaults unless a field has none that works."""
        return cls.config_class()

    def needs(self) -> Needs:
        """What this run needs from the calibration set (the method's default unless its options say)."""
        return "windows" if self.uses_calibration() else "nothing"

    def uses_calibration(self) -> bool:
        """Whether this run needs calibration windows (the method's default, unless its options say)."""
        return self.needs_calibration

    def check(self, model: nn.Module, arch: ModelArch) -> None:  # noqa: B027 - optional hook
        """Raise ConfigError when the options cannot apply to this model (checked before any work,
        e.g. before a dense evaluation); the default accepts every model."""

    def preview(self, model: nn.Module, arch: ModelArch, override: ArchOverride | None) -> None:
        """Make on ``model``, a parameter-free copy on the ``meta`` device already checked with
        :meth:`check`, the shape changes :meth:`run` will make: how many channels, heads or layers
        go follows from the options, which ones is chosen from data when the stage runs, so any
        will do here. The stages after this one are then checked against the result, before any
        work. ``override`` describes the model again after a cut. Called only when
        ``changes_shapes``; without a preview (this default) the stages after this one are checked
        just before they run.

        Raises:
            NotImplementedError: this stage has no preview.
        """
        raise NotImplementedError(f"{type(self).__name__} has no preview")

    def start(self, ctx: PruneContext) -> None:  # noqa: B027 - optional hook
        """Note what :meth:`finish` compares against, before the model changes."""

    @abstractmethod
    def run(self, ctx: PruneContext) -> None:
        """Change ``ctx.model`` in place and record what was done in ``ctx.report``."""

    def finish(self, ctx: PruneContext) -> None:  # noqa: B027 - optional hook
        """Complete ``ctx.report`` once the run is done (figures ``params_*`` are already in)."""

    def begin_layers(self, ctx: PruneContext) -> None:  # noqa: B027 - optional hook
        """Before the first per-layer step (a layer-wise stage)."""

    def layer_step(self, ctx: PruneContext, step: LayerStep) -> None:
        """The per-layer step of a layer-wise stage: change ``step.layer`` in place. The runner (in
        memory, or streaming from disk) owns the control flow: it brings the layer to the compute
        device, calls this, then computes the layer's outputs for the next one."""
        raise NotImplementedError(f"{self.config.method} has no per-layer step")

    def end_layers(self, ctx: PruneContext) -> None:  # noqa: B027 - optional hook
        """After the last per-layer step: what the report says about all layers."""

    def layer_modules_report(self, arch: ModelArch, index: int, layer: nn.Module) -> dict[str, dict]:
        """What the report's ``modules`` holds for one layer (a streamed run counts each layer while
        it is loaded); stages without per-module figures have none."""
        return {}

    def layer_state(self) -> dict[str, Any]:
        """What this stage accumulated over the layers stepped so far, as JSON (a streamed run
        records it with each layer, so a resumed run reports the same)."""
        return {}

    def restore_layer_state(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Take back what :meth:`layer_state` returned (a resumed streamed run)."""

    def finish_with(  # noqa: B027 - optional hook
        self, ctx: PruneContext, modules: dict[str, dict], nonzero_before: int, nonzero_after: int
    ) -> None:
        """:meth:`finish` from figures counted layer by layer (a streamed run never holds the model)."""

    def stream_refusal(self) -> str | None:
        """None when this run can stream the model from disk layer by layer (``--stream``: the
        stage has a per-layer step and needs nothing outside one layer), else why it cannot."""
        return (f"{self.config.method} works on the whole model at once (it scores or changes more than one "
                "decoder layer at a time), so it cannot stream layer by layer from disk")

    def split_refusal(self) -> str | None:
        """None when this run can split its calibration batches across several devices (its per-layer
        step needs only statistics that are sums over the batches, which the runner gathers per device
        and adds up: input norms, Gram matrices), else why it cannot."""
        return (f"{self.config.method} needs more from its calibration passes than per-input sums the runner can "
                "add up across devices (outputs, gradients or scores over the whole model)")


class StructuralPruner(Pruner):
    """A stage that changes shapes (layers, heads, channels): its report says whether the config
    alone still describes the model (plain ``from_pretrained``) or ``pare.load`` must replay edits."""

    changes_shapes: ClassVar[bool] = True

    def start(self, ctx: PruneContext) -> None:
        from pare.arch.surgery.width import size_fields
        from pare.io.save import config_describes

        # whether the config alone describes the model now (not after an earlier non-uniform prune)
        self._described_before = config_describes(ctx.model)
        cfg = ctx.arch.config_of(ctx.model.config)
        self._sizes_before = {n: copy.deepcopy(getattr(cfg, n)) for n in size_fields(ctx.arch) if hasattr(cfg, n)}

    def finish(self, ctx: PruneContext) -> None:
        report = ctx.report
        if report.edits and self._described_before:
            self._settle_config(ctx)
        if report.figures["params_after"] == report.figures["params_before"]:
            unchanged = (f"{report.method} removed nothing with these options (a ratio of 0, or widths that round "
                         "back to the full size): the model is unchanged")
            log.warning(unchanged)
            report.notes.append(unchanged)

    def _settle_config(self, ctx: PruneContext) -> None:
        """Say whether the config alone rebuilds the cut model (``report.uniform``: plain
        ``from_pretrained``), whatever the stage guessed; when it does not and a size field the stage
        rewrote also sizes something the cut left alone (Idefics2's connector, HRM's second stack,
        RecurrentGemma's MLP built from half the field), put the fields back as they were before the
        stage, so ``pare.load`` rebuilds the model as it was and replays the cut."""
        from pare.io.save import config_describes, edits_rebuild

        report = ctx.report
        report.uniform = config_describes(ctx.model)
        if report.uniform or edits_rebuild(ctx.model, report.edits, ctx.arch_override):
            return
        cfg = ctx.arch.config_of(ctx.model.config)
        for name, value in self._sizes_before.items():
            setattr(cfg, name, value)
        log.debug("%s: the config cannot state the cut; its sizes are kept and pare.load replays the edits",
                  report.method)


@dataclass(frozen=True)
class SparsityConfig(PruneConfig):
    """Options shared by the weight-sparsity methods (magnitude, Wanda, SparseGPT).

    Attributes:
        targets: regexes over module names; a matrix is pruned when one matches (default: every
            linear inside a decoder layer, experts included; routers never).
        ignore: regexes over module names never to prune (embeddings and lm_head are never pruned).
        sparsity: fraction of weights set to zero in each pruned matrix, in [0, 1) (the overall
            target when the profile varies it per layer).
        pattern: ``unstructured`` or ``N:M`` (N zeros in every M consecutive inputs, e.g. 2:4).
        profile: layer-wise sparsity: ``uniform``, or ``owl`` (Yin et al., 2024: layers with more
            outliers of ``|W| * ||X||`` are pruned less; the parameter-weighted mean stays
            ``sparsity``). Magnitude is data-free, so its OWL scores are ``|W|`` alone and it still
            needs no calibration.
        owl_m: OWL's outlier threshold, a multiple of the layer's mean score ``|W| * ||X||``.
        owl_lambda: OWL's spread: the layers' sparsities span ``2 * owl_lambda`` around ``sparsity``.
        owl_bounded: shrink the spread so every layer stays within ``sparsity +- owl_lambda`` (the
            paper's wording) instead of the released code's min-max rule (default).
        layer_sparsity: explicit sparsity per decoder layer (one value per layer).
        module_sparsity: ``{regex: sparsity}`` over module names (config file); the first matching
            regex wins over the per-layer value.
    """

    targets: tuple[str, ...] = help_field((), "regexes of module names to prune (default: all decoder linears)")
    ignore: tuple[str, ...] = help_field((), "regexes of module names never to prune")
    sparsity: float = help_field(0.5, "fraction of weights set to zero, in [0, 1)")
    pattern: str = help_field("unstructured", "'unstructured' or N:M, e.g. 2:4 (2 zeros in every 4)")
    profile: str = help_field("uniform", "layer-wise sparsity: 'uniform' or 'owl' (outlier-weighted, same overall)")
    owl_m: float = help_field(5.0, "OWL: a score is an outlier above this multiple of its layer's mean")
    owl_lambda: float = help_field(0.08, "OWL: per-layer sparsities span 2x this around sparsity")
    owl_bounded: bool = help_field(False, "OWL: keep every layer within sparsity +- owl_lambda")
    layer_sparsity: tuple[float, ...] = help_field((), "explicit sparsity per decoder layer, one value per layer")
    module_sparsity: dict[str, float] = field(
        default_factory=dict, metadata={"help": "config file: {module regex: sparsity}, first match wins"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_regexes("targets", self.targets)
        check_regexes("ignore", self.ignore)
        check_ratio("sparsity", self.sparsity)
        nm = parse_pattern(self.pattern)
        if self.profile not in ("uniform", "owl"):
            raise ConfigError(f"profile must be 'uniform' or 'owl', got {self.profile!r}")
        if isinstance(self.owl_m, bool) or not isinstance(self.owl_m, (int, float)) or self.owl_m <= 0:
            raise ConfigError(f"owl_m must be a positive number (5 in the OWL paper), got {self.owl_m!r}")
        check_ratio("owl_lambda", self.owl_lambda)
        for i, value in enumerate(self.layer_sparsity):
            check_ratio(f"layer_sparsity[{i}]", value)
        if not isinstance(self.module_sparsity, dict):
            raise ConfigError(f"module_sparsity must map regexes to ratios, got {self.module_sparsity!r}")
        check_regexes("module_sparsity", tuple(self.module_sparsity))
        for regex, value in self.module_sparsity.items():
            check_ratio(f"module_sparsity[{regex!r}]", value)
        if self.profile == "owl" and self.layer_sparsity:
            raise ConfigError(
                "profile='owl' computes the per-layer ratios: drop layer_sparsity or use profile='uniform'"
            )
        varies = self.profile != "uniform" or self.layer_sparsity or self.module_sparsity
        if nm is not None and varies:
            raise ConfigError(
                f"the {self.pattern} pattern prunes {nm[0]}/{nm[1]} of every matrix: per-layer ratios (profile, "
                "layer_sparsity, module_sparsity) apply to pattern='unstructured' only"
            )
        self._check_sparsity_is_used(nm)

    def _check_sparsity_is_used(self, nm: tuple[int, int] | None) -> None:
        """Refuse a ``sparsity`` that another option overrides; an N:M pattern records its own."""
        default = SparsityConfig.__dataclass_fields__["sparsity"].default
        if nm is not None:
            if self.sparsity not in (default, nm[0] / nm[1]):
                raise ConfigError(f"pattern {self.pattern} prunes {nm[0]} of every {nm[1]} weights (sparsity "
                                  f"{nm[0] / nm[1]:g}): drop sparsity={self.sparsity} or set it to {nm[0] / nm[1]:g}")
            object.__setattr__(self, "sparsity", nm[0] / nm[1])  # the manifest says what was done
        elif self.layer_sparsity and self.sparsity != default:
            raise ConfigError(f"layer_sparsity gives every layer its ratio, so sparsity={self.sparsity} would be "
                              "ignored: drop sparsity, or drop layer_sparsity to prune every layer at sparsity")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)


class SparsityPruner(Pruner):
    """Layer-wise weight sparsity: per target, gather input statistics, then mask (and update)."""

    config: SparsityConfig
    dense_in_step: ClassVar[bool] = True
    stats: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: PruneConfig) -> None:
        super().__init__(config)
        self.layer_ratios: list[float | None] | None = None  # None: a layer OWL does not govern
        self._reused_stats: dict[int, dict[str, InputStats]] = {}  # layer -> statistics already recorded
        self._found: dict[int, tuple[nn.Module, list[Target]]] = {}  # layer -> (module, its targets)

    def target_sparsity(self, layer_index: int, target: Target) -> float:
        """Sparsity for one matrix: first matching ``module_sparsity`` regex, else the layer's ratio
        (``layer_sparsity`` or OWL), else the uniform ``sparsity``."""
        for regex, value in self.config.module_sparsity.items():
            if re.search(regex, target.name):
                return value
        layer_ratio = None if self.layer_ratios is None else self.layer_ratios[layer_index]
        return self.config.sparsity if layer_ratio is None else layer_ratio

    def prepare(self, ctx: PruneContext) -> None:
        """Called once before the layers are visited (e.g. to compute per-layer ratios)."""

    def start(self, ctx: PruneContext) -> None:
        # every parameter's non-zeros: a model pruned before (a chained run) already holds zeros
        self._nonzero_before = nonzero_by_parameter(ctx.model)

    def finish(self, ctx: PruneContext) -> None:
        """Weights are zeroed, shapes unchanged: the measured sparsity per module and the non-zeros."""
        modules = self.pruned_modules(ctx.model, ctx.arch)
        self.finish_with(ctx, modules, sum(self._nonzero_before.values()),
                         self.nonzero_after(ctx.model, ctx.arch, self._nonzero_before, modules))

    def finish_with(self, ctx: PruneContext, modules: dict[str, dict], nonzero_before: int,
                    nonzero_after: int) -> None:
        """Complete the report from figures counted in the weights (all at once in memory, or layer
        by layer when streaming)."""
        report, cfg = ctx.report, self.config
        report.pattern = None if cfg.nm is None else cfg.pattern
        report.modules = modules
        report.notes.append(DENSE_ZEROS_NOTE)
        report.figures["nonzero_before"] = nonzero_before
        report.figures["nonzero_after"] = nonzero_after

    def new_stats(self, target: Target) -> InputStats:
        """The accumulator for one target's inputs (methods may share work between targets)."""
        return InputStats(want_gram=STAT_GRAM in self.stats)

    def check(self, model: nn.Module, arch: ModelArch) -> None:
        """Module regexes that match, one ratio per layer, input widths that the N:M pattern divides."""
        cfg = self.config
        layers = arch.layer_modules(model)
        check_selection([t.name for i, layer in enumerate(layers) for t in self._found_in(arch, i, layer)],
                        cfg.targets, cfg.ignore)
        per_layer = [self._selected(arch, i, layer) for i, layer in enumerate(layers)]
        names = [t.name for ts in per_layer for t in ts]
        earlier: list[str] = []
        for regex in cfg.module_sparsity:
            matched = [n for n in names if re.search(regex, n)]
            if not matched:
                raise ConfigError(f"module_sparsity regex {regex!r} matches no pruned module; names look like "
                                  f"{', '.join(names[:3])}")
            if all(any(re.search(e, n) for e in earlier) for n in matched):
                raise ConfigError(f"module_sparsity regex {regex!r} never applies: every module it matches is "
                                  f"matched first by {earlier} (the first matching regex wins); put the more specific "
                                  "regex first")
            earlier.append(regex)
        if cfg.layer_sparsity and len(cfg.layer_sparsity) != len(per_layer):
            raise ConfigError(f"layer_sparsity has {len(cfg.layer_sparsity)} values but the model has "
                              f"{len(per_layer)} decoder layers: give one value per layer")
        if self.stats:
            check_expert_inputs(model, arch, [t for ts in per_layer for t in ts])
        nm = cfg.nm
        odd = [t for ts in per_layer for t in ts if nm is not None and t.shape[1] % nm[1]]
        if nm is not None and odd:
            raise ConfigError(f"pattern {cfg.pattern} needs every pruned matrix's input width to be a multiple of "
                              f"{nm[1]}; {odd[0].name} has {odd[0].shape[1]} inputs ({len(odd)} such matrices): use "
                              "an M that divides it, or leave them out with ignore")

    def prepare_profile(self, ctx: PruneContext) -> None:
        """Compute OWL's per-layer ratios (or take the explicit ones)."""
        cfg = self.config
        layers = ctx.arch.layer_modules(ctx.model)
        per_layer = [self._selected(ctx.arch, i, layer) for i, layer in enumerate(layers)]
        if cfg.layer_sparsity:
            self.layer_ratios = list(cfg.layer_sparsity)
        if cfg.profile == "owl":
            ratios = self._outlier_ratios(ctx)
            weights = [sum(t.weight().numel() for t in ts if not self._module_override(t)) for ts in per_layer]
            # layers with nothing under the layer ratio (all ignored, or all set by module_sparsity) take
            # no part: OWL spreads the target over the layers it prunes
            governed = [i for i, n in enumerate(weights) if n]
            spread = owl_sparsities([ratios[i] for i in governed], cfg.sparsity, cfg.owl_lambda,
                                    [weights[i] for i in governed], bounded=cfg.owl_bounded) if governed else []
            layer_ratios: list[float | None] = [None] * len(weights)
            for i, value in zip(governed, spread, strict=True):
                layer_ratios[i] = value
            self.layer_ratios = layer_ratios
            ctx.report.scores["owl"] = {
                "m": cfg.owl_m, "lambda": cfg.owl_lambda, "bounded": cfg.owl_bounded, "outlier_ratios": ratios,
                "layer_sparsity": self.layer_ratios,
                "scores": "|W|*||X||" if self.needs_calibration else "|W| (data-free method)",
            }

    def _module_override(self, target: Target) -> bool:
        return any(re.search(r, target.name) for r in self.config.module_sparsity)

    def _outlier_ratios(self, ctx: PruneContext) -> list[float]:
        """OWL's ``D_l`` per layer, from ``|W| * ||X||`` (dense first pass) or from ``|W|`` when data-free."""
        m = self.config.owl_m
        if not self.needs_calibration:
            layers = ctx.arch.layer_modules(ctx.model)
            return [layer_outlier_ratio((t.weight().abs() for t in self._selected(ctx.arch, i, layer)), m)
                    for i, layer in enumerate(layers)]
        runner = ctx.runner(sequential=True)
        ratios = []
        for step in runner.steps():
            targets = self._selected(ctx.arch, step.index, step.layer)
            # the first layer's inputs are the same when it is pruned: its statistics are kept
            first = step.index == 0
            # the outputs are reused as the next layer's inputs
            stats, step.dense_outputs = step.record(targets, self.new_stats if first else lambda _t: InputStats(),
                                                    keep_outputs=True)
            if first:
                self._reused_stats[0] = stats
            scores = (wanda_scores(t.weight(), _norms(t, stats[t.name])) for t in targets)
            ratios.append(layer_outlier_ratio(scores, m))
        return ratios

    @abstractmethod
    def prune_target(self, target: Target, stats: InputStats | None, sparsity: float) -> None:
        """Zero (and possibly update) ``target.weight()`` in place."""

    def _found_in(self, arch: ModelArch, index: int, layer: nn.Module) -> list[Target]:
        """Every prunable matrix of a layer, found once per run (weights change in place, shapes do not)."""
        hit = self._found.get(index)
        if hit is None or hit[0] is not layer:
            hit = self._found[index] = (layer, layer_targets(layer, arch.layers[index], arch.layer_prefix(index)))
        return hit[1]

    def _selected(self, arch: ModelArch, index: int, layer: nn.Module) -> list[Target]:
        """The layer's matrices this run prunes (``targets`` / ``ignore`` applied)."""
        return select(self._found_in(arch, index, layer), self.config.targets, self.config.ignore)

    def nonzero_after(self, model: nn.Module, arch: ModelArch, before: dict[int, int],
                      modules: dict[str, dict]) -> int:
        """Every parameter's non-zeros after the run, from the counts ``before`` it (``id`` -> count) and
        the pruned matrices' own counts (``modules``): only the pruned parameters changed."""
        after = dict(before)
        slices: dict[int, tuple[torch.Tensor, dict[int, int]]] = {}  # fused experts: param -> {expert: count}
        for i, layer in enumerate(arch.layer_modules(model)):
            for t in self._selected(arch, i, layer):
                param = getattr(t.module, t.param)
                if id(param) not in after:
                    continue
                if t.expert is None:
                    after[id(param)] = modules[t.name]["nonzero"]
                else:
                    slices.setdefault(id(param), (param, {}))[1][t.expert] = modules[t.name]["nonzero"]
        for key, (param, counts) in slices.items():  # some experts left out: count the whole parameter
            after[key] = sum(counts.values()) if len(counts) == param.shape[0] else nonzero(param)
        return sum(after.values())

    def layer_modules_report(self, arch: ModelArch, index: int, layer: nn.Module) -> dict[str, dict]:
        """:meth:`pruned_modules` of one layer (a streamed run counts each layer while it is loaded)."""
        return measure_sparsity(self._selected(arch, index, layer))

    def pruned_modules(self, model: nn.Module, arch: ModelArch) -> dict[str, dict]:
        """Per pruned matrix: shape, numel, nonzero and sparsity, counted in the weights after the run."""
        layers = arch.layer_modules(model)
        return measure_sparsity(t for i, layer in enumerate(layers) for t in self._selected(arch, i, layer))

    def run(self, ctx: PruneContext) -> None:
        self.begin_layers(ctx)
        if not self.needs_calibration:
            self._run_data_free(ctx)
        else:
            for step in ctx.runner(sequential=True).steps(final_outputs=False,
                                                          overwrite_inputs=ctx.runtime.sequential):
                self.layer_step(ctx, step)
        self.end_layers(ctx)

    def split_refusal(self) -> str | None:
        return None

    def stream_refusal(self) -> str | None:
        if self.config.profile == "owl":
            return ("profile='owl' scores every layer in a first pass before pruning any, so it cannot stream "
                    "layer by layer in one pass; give the per-layer ratios with layer_sparsity instead")
        return None

    def begin_layers(self, ctx: PruneContext) -> None:
        """Before the first layer step: per-layer ratios (OWL or explicit) and the method's preparation."""
        self.prepare_profile(ctx)
        self.prepare(ctx)

    def layer_step(self, ctx: PruneContext, step: LayerStep) -> None:
        """The per-layer step: gather the layer's input statistics and prune its targets in place.

        The runner (in memory, or streaming from disk) brings ``step.layer`` to the compute device
        and, once this returns, computes the layer's outputs for the next one. In sequential mode
        the statistics come from the pruned prefix's outputs; with dense inputs one pass records
        them and keeps the dense outputs (``step.dense_outputs``). A data-free method ignores the
        calibration inputs.
        """
        targets = self._selected(ctx.arch, step.index, step.layer)
        if not self.needs_calibration:
            for t in targets:
                self.prune_target(t, None, self.target_sparsity(step.index, t))
            return
        keep = not ctx.runtime.sequential and step.index < ctx.arch.num_layers - 1
        reused = self._reused_stats.pop(step.index, None)
        stats = reused or {}
        if reused is None:
            try:
                stats, outputs = step.record(targets, self.new_stats, replace_inputs=keep)
            except SharedInputChanged:
                if keep:  # the inputs were already replaced: a second pass would see other ones
                    raise
                # Zaya: one input, two readers
                stats, outputs = step.record(targets, self.new_stats, share_inputs=False)
        else:
            outputs = step.run(replace_inputs=True) if keep else None
        if keep:
            step.dense_outputs = outputs  # taken before this layer is pruned, in place of its inputs
        self.prune_targets(step.index, targets, stats)

    def prune_targets(self, index: int, targets: list[Target], stats: dict[str, InputStats]) -> None:
        """Prune one layer's ``targets`` from their statistics (popped from ``stats`` as each is done,
        so a layer's Gram matrices are freed early; the last reader of a shared object is told so).
        One at a time by default; a method whose rows are independent may solve the matrices that
        share an input together."""
        readers = Counter(id(s) for s in stats.values())  # q/k/v and gate/up share one object
        for t in targets:
            st = stats.pop(t.name)
            readers[id(st)] -= 1
            st.last_reader = readers[id(st)] == 0
            self.prune_target(t, st, self.target_sparsity(index, t))
            solved = st.want_gram and st.last_reader
            del st
            if solved:
                return_freed_memory()  # an [in, in] solve leaves heap holes the next matrix need not pay for

    def end_layers(self, ctx: PruneContext) -> None:
        """After the last layer step: the per-layer summary in the report."""
        self._layer_summary(ctx)


    def _layer_summary(self, ctx: PruneContext) -> None:
        """``report.scores["layers"]``: per decoder layer, the asked sparsity (parameter-weighted) and
        the parameter count; the measured sparsity per module is in ``report.modules``."""
        rows = []
        for i, layer in enumerate(ctx.arch.layer_modules(ctx.model)):
            targets = self._selected(ctx.arch, i, layer)
            numel = sum(t.weight().numel() for t in targets)
            if not numel:
                continue
            asked = sum(self.target_sparsity(i, t) * t.weight().numel() for t in targets) / numel
            if self.config.nm is not None:
                asked = self.config.nm[0] / self.config.nm[1]
            rows.append({"layer": i, "target": asked, "numel": numel})
        ctx.report.scores["layers"] = rows

    def _run_data_free(self, ctx: PruneContext) -> None:
        layers = ctx.arch.layer_modules(ctx.model)
        for i in tqdm(range(len(layers)), desc="layers", disable=not ctx.runtime.progress, leave=False):
            with on_device(layers[i], ctx.device) as layer:
                for t in self._selected(ctx.arch, i, layer):
                    self.prune_target(t, None, self.target_sparsity(i, t))


def _norms(target: Target, stats: InputStats) -> torch.Tensor:
    """``||X_j||`` of a target's inputs; zeros (with a warning) when no token reached it (an unused expert)."""
    if stats.sq_sum is None:
        log.warning("%s received no calibration tokens; its activation norms are taken as zero", target.name)
        return torch.zeros(target.shape[1])
    return stats.norms()


def measure_sparsity(targets: Iterable[Target]) -> dict[str, dict]:
    """Per matrix: shape, numel, nonzero and sparsity, counted in the weights."""
    out: dict[str, dict] = {}
    for t in targets:
        w = t.weight()
        nnz = nonzero(w)
        out[t.name] = {
            "shape": [int(w.shape[0]), int(w.shape[1])],
            "numel": int(w.numel()),
            "nonzero": nnz,
            "sparsity": 1.0 - nnz / w.numel(),
        }
    return out
