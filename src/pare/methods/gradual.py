"""Gradual pruning: prune a little, recover, prune further, as one recipe stage.

Zhu & Gupta (2017) raise the sparsity step by step on a schedule (cubic by default: large cuts
while the network still has redundancy, small ones near the end; see
:mod:`pare.recovery.schedule`) and let training repair each cut before the next. Here each step
runs a registered sparsity method (magnitude, Wanda, SparseGPT...) at the scheduled sparsity, then
the recovery stage (:mod:`pare.methods.recover`) with its options. Weights pruned at one step stay
zero: a zero scores lowest for every sparsity method, and recovery keeps zeros at zero, so each
step's mask holds the previous one.

```yaml
- gradual: {prune: {wanda: {}}, final_sparsity: 0.6, prune_steps: 3, recover: {mode: full, tokens: 100000}}
```
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from pare.arch.roles import ModelArch
from pare.config import PruneConfig, check_ratio, help_field, register, stage_for_config
from pare.errors import ConfigError
from pare.methods.base import PruneContext, Pruner, SparsityConfig, measure_sparsity
from pare.methods.recover import RecoverConfig, RecoverStage
from pare.recovery.data import CALIBRATION
from pare.recovery.masks import apply_masks_, model_targets, target_params, zero_masks, zeros_kept
from pare.recovery.schedule import SCHEDULES, sparsity_schedule
from pare.report import Report


@dataclass(frozen=True)
class GradualConfig(PruneConfig):
    """Gradual pruning options.

    Attributes:
        prune: the sparsity stage each step runs, as in a recipe: ``{wanda: {targets: [mlp]}}`` or
            ``{method: sparsegpt}``; its ``sparsity`` is set by the schedule.
        final_sparsity / initial_sparsity: the schedule's end and start.
        prune_steps: how many prune -> recover rounds.
        schedule: ``cubic`` (Zhu & Gupta) or ``linear``.
        recover: the recovery options of every round (:class:`RecoverConfig` fields; ``tokens`` is
            per round).
    """

    method: ClassVar[str] = "gradual"

    prune: dict[str, Any] = field(default_factory=lambda: {"magnitude": {}}, metadata={
        "help": "config file: the sparsity stage each step runs, e.g. {wanda: {}} (its sparsity is scheduled)"})
    final_sparsity: float = help_field(0.5, "sparsity after the last step, in (0, 1)")
    initial_sparsity: float = help_field(0.0, "sparsity the schedule starts from, in [0, final_sparsity)")
    prune_steps: int = help_field(4, "prune -> recover rounds")
    schedule: str = help_field("cubic", "sparsity schedule: cubic (Zhu & Gupta 2017) or linear")
    recover: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "config file: recovery options of each round, e.g. {mode: full, tokens: 100000}"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ratio("final_sparsity", self.final_sparsity, allow_zero=False)
        check_ratio("initial_sparsity", self.initial_sparsity)
        if self.initial_sparsity >= self.final_sparsity:
            raise ConfigError(f"initial_sparsity ({self.initial_sparsity}) must be below final_sparsity "
                              f"({self.final_sparsity})")
        if self.prune_steps < 1:
            raise ConfigError(f"prune_steps must be a positive integer, got {self.prune_steps}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        self.prune_config(self.final_sparsity)
        self.recover_config()

    def prune_config(self, sparsity: float) -> SparsityConfig:
        """The wrapped sparsity stage's config at ``sparsity``."""
        from pare.recipe import stage_config

        try:
            base = stage_config(self.prune, 0)
        except ConfigError as exc:
            raise ConfigError(f"gradual prune: {exc}") from None
        if not isinstance(base, SparsityConfig):
            raise ConfigError(f"gradual prune wraps a sparsity method (magnitude, wanda, sparsegpt...), not "
                              f"{base.method!r}")
        if base.nm is not None or base.layer_sparsity or base.module_sparsity:
            raise ConfigError("gradual prune schedules one sparsity for every matrix: give the wrapped method "
                              "pattern='unstructured' and no layer_sparsity / module_sparsity")
        return dataclasses.replace(base, sparsity=sparsity)

    def recover_config(self) -> RecoverConfig:
        try:
            return RecoverConfig.from_dict(dict(self.recover))
        except ConfigError as exc:
            raise ConfigError(f"gradual recover: {exc}") from None

    def sparsities(self) -> list[float]:
        return sparsity_schedule(self.initial_sparsity, self.final_sparsity, self.prune_steps, self.schedule)


@register
class GradualStage(Pruner):
    """Repeat (prune at the scheduled sparsity -> recover) until the final sparsity."""

    config_class = GradualConfig
    config: GradualConfig
    runs_elsewhere = ("a recipe stage (`pare run recipe.yaml`: `- gradual: {prune: {wanda: {}}, final_sparsity: 0.6, "
                      "recover: {mode: full, tokens: 100000}}`)")

    @classmethod
    def example_config(cls) -> GradualConfig:
        return GradualConfig(prune_steps=2, recover={"mode": "full", "data": CALIBRATION, "tokens": 32, "seqlen": 8,
                                                     "batch_size": 2, "eval_windows": 1})

    def uses_calibration(self) -> bool:
        inner = stage_for_config(self.config.prune_config(self.config.final_sparsity))
        return bool(inner(self.config.prune_config(self.config.final_sparsity)).uses_calibration()
                    or self.config.recover_config().data == CALIBRATION)

    def check(self, model: nn.Module, arch: ModelArch) -> None:
        cfg = self.config.prune_config(self.config.final_sparsity)
        stage_for_config(cfg)(cfg).check(model, arch)
        RecoverStage(self.config.recover_config()).check(model, arch)

    def run(self, ctx: PruneContext) -> None:
        rounds = []
        history = list(ctx.history)
        pruned: Report | None = None
        recover_cfg = self.config.recover_config()
        params = target_params(ctx.model, model_targets(ctx.model, ctx.arch))
        for k, sparsity in enumerate(self.config.sparsities()):
            prune_cfg = self.config.prune_config(sparsity)
            earlier = zero_masks(params)
            pruned = self._stage(ctx, stage_for_config(prune_cfg)(prune_cfg), history)
            nested = zeros_kept(params, earlier)
            if not nested:  # a prune that moved weights (an OBS update) revived some: the schedule promises nesting
                apply_masks_(params, earlier)
                ctx.report.notes.append(f"round {k + 1}: the prune revived weights of earlier rounds; they were "
                                        "set back to zero")
            history.append(pruned)
            recovered = self._stage(ctx, RecoverStage(recover_cfg), history)
            history.append(recovered)
            rounds.append({"step": k + 1, "sparsity": sparsity, "measured": pruned.overall_sparsity,
                           "earlier_zeros_kept": nested, "prune_seconds": pruned.prune_seconds,
                           "recovery": recovered.scores["recovery"]})
        ctx.report.scores["gradual"] = {"schedule": self.config.schedule, "rounds": rounds}
        last = pruned.modules if pruned is not None else {}
        ctx.report.modules = measure_sparsity(t for t in model_targets(ctx.model, ctx.arch) if t.name in last)

    def _stage(self, ctx: PruneContext, stage: Pruner, history: list[Report]) -> Report:
        """Run one inner stage on the model with its own report (the lifecycle the pipeline drives)."""
        import time

        cfg = stage.config
        report = Report(method=cfg.method, config=cfg.to_dict())
        inner = dataclasses.replace(ctx, report=report, history=list(history))
        stage.check(ctx.model, ctx.arch)
        stage.start(inner)
        began = time.perf_counter()
        stage.run(inner)
        report.prune_seconds = time.perf_counter() - began
        report.figures.setdefault("params_after", sum(p.numel() for p in ctx.model.parameters()))
        stage.finish(inner)
        return report
