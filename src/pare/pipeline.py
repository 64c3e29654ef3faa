"""Run a list of stages on one model with one calibration set: the control flow of ``pare.run``.

A :class:`Pipeline` builds every stage once from its config, describes the model once (with the
caller's :class:`~pare.arch.ArchOverride`) and checks the whole recipe before any work, so a caller
(the CLI) can refuse bad options before loading calibration text or evaluating the dense model:
the first stage on the model, each later one on a parameter-free copy (``meta`` device) to which the
earlier stages applied their :meth:`~pare.methods.base.Pruner.preview`, i.e. on the shapes they will
leave. Each later stage is checked again on the real model just before it runs (a preview picks
placeholder channels and layers; which ones go is chosen from data); the model is described again
only after a stage changed shapes. The stages never see each other: each
gets a :class:`~pare.methods.base.PruneContext` and fills its own :class:`~pare.report.Report`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from pare.arch import ArchOverride, describe
from pare.arch.roles import ModelArch
from pare.arch.surgery.shadow import meta_copy
from pare.config import PruneConfig, RuntimeConfig, stage_for_config, usable_devices
from pare.errors import ConfigError
from pare.eval.cost import measure_cost
from pare.methods.base import PruneContext, Pruner
from pare.report import Report

log = logging.getLogger(__name__)

AfterStage = Callable[[nn.Module, Report], None]
"""Called after each stage with the model and the stage's report (e.g. to add figures after it)."""


def stage_configs(configs: PruneConfig | Sequence[PruneConfig]) -> list[PruneConfig]:
    """``configs`` as a non-empty list of registered method configs, or a ConfigError."""
    items = [configs] if isinstance(configs, PruneConfig) else list(configs) if isinstance(configs, (list, tuple)) \
        else None
    if not items:
        raise ConfigError(f"stages must be a method config or a non-empty list of them (e.g. "
                          f"[pare.OsscarConfig(), pare.SparseGPTConfig(pattern='2:4')]), got {configs!r}; "
                          "from a dict: pare.config_from_dict(d)")
    for cfg in items:
        stage_for_config(cfg)
    return items


def check_split(stages: Sequence[Pruner], devices: Sequence[torch.device]) -> None:
    """Refuse, before any work, several devices for a stage that cannot split its batches across them."""
    if len(devices) < 2:
        return
    for k, stage in enumerate(stages):
        refusal = stage.split_refusal()
        if refusal:
            where = f"stage {k + 1} ({stage.config.method})" if len(stages) > 1 else stage.config.method
            raise ConfigError(f"devices={[str(d) for d in devices]}: {where} cannot split its calibration batches "
                              f"across several devices: {refusal}. Prune with one device (--device "
                              f"{devices[0]}); wanda, sparsegpt, magnitude and quantize split their batches")


def check_component(stages: Sequence[Pruner], arch: ModelArch) -> None:
    """Refuse, before any work, a stage that does not prune the described component (a vision tower)."""
    if arch.vision is None:
        return
    from pare.config import STAGES

    refused = [s.config.method for s in stages if not s.prunes_vision]
    if refused:
        able = [name for name, cls in STAGES.items() if getattr(cls, "prunes_vision", False)]
        raise ConfigError(f"component='vision': {', '.join(refused)} do(es) not prune a vision tower (it needs "
                          f"text logits, a language-modelling loss or decoder-only structure); the methods that "
                          f"do: {', '.join(able)}")


class Pipeline:
    """Stages built once, the model described once, the whole recipe checked: ready to run.

    Args:
        model: the model, changed in place by :meth:`run`.
        configs: one method config or a list of them, applied in order.
        runtime: device / offload / sequential options (the device is resolved and checked here).
        arch_override: corrections for architectures pare cannot infer; used by every description.
        devices: the compute devices as given, in place of the runtime's (internal: a device may repeat,
            so the tests split batches across ``["cpu", "cpu"]``).
    """

    def __init__(self, model: nn.Module, configs: PruneConfig | Sequence[PruneConfig],
                 runtime: RuntimeConfig | None = None, arch_override: ArchOverride | None = None,
                 *, tokenizer: Any = None, history: Sequence[Report] = (),
                 devices: Sequence[str | torch.device] | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.history = list(history)  # reports of the prunes applied before this run (a saved model's)
        self.runtime = runtime or RuntimeConfig()
        # before any work
        self.devices = usable_devices(list(devices)) if devices else self.runtime.compute_devices()
        self.device = self.devices[0]
        self.arch_override = arch_override
        self.stages: list[Pruner] = [stage_for_config(cfg)(cfg) for cfg in stage_configs(configs)]
        check_split(self.stages, self.devices)
        self._arch: ModelArch | None = describe(model, arch_override)
        self.check_all(self._arch)

    def check_all(self, arch: ModelArch) -> None:
        """Check every stage before any work, each on the shapes the stages before it will leave.

        Raises:
            ConfigError: a stage's options cannot apply; for a later stage the message names the
                stages before it.
        """
        shadow: nn.Module | None = None  # the meta-device copy the earlier stages' previews cut
        check_component(self.stages, arch)
        for k, stage in enumerate(self.stages):
            if shadow is None:
                stage.check(self.model, arch)
            else:
                self._check_later(k, stage, shadow, arch)
            if k == len(self.stages) - 1 or not stage.changes_shapes:
                continue
            shadow = meta_copy(self.model) if shadow is None else shadow
            if shadow is None:
                return  # no copy: the later stages are checked just before they run
            try:
                stage.preview(shadow, arch, self.arch_override)
                arch = describe(shadow, self.arch_override)
            except ConfigError:
                raise
            except Exception:
                log.debug("no preview of stage %d (%s): the later stages are checked before they run", k + 1,
                          stage.config.method, exc_info=True)
                return

    def _check_later(self, k: int, stage: Pruner, shadow: nn.Module, arch: ModelArch) -> None:
        """Check stage ``k`` on the previewed shapes; a check that needs real weights (a forward pass)
        is left to the check just before the stage runs."""
        try:
            stage.check(shadow, arch)
        except ConfigError as exc:
            before = " -> ".join(s.config.method for s in self.stages[:k])
            raise ConfigError(f"stage {k + 1} ({stage.config.method}), on the shapes {before} will leave: {exc}") \
                from exc
        except Exception:
            log.debug("stage %d (%s) is checked when it runs", k + 1, stage.config.method, exc_info=True)

    @property
    def arch(self) -> ModelArch:
        """The model's description as the next stage will see it."""
        return self._arch if self._arch is not None else describe(self.model, self.arch_override)

    def needs_calibration(self) -> bool:
        """Whether any stage needs the calibration windows (all stages share one set)."""
        return any(stage.needs() != "nothing" for stage in self.stages)

    def run(self, ids: torch.Tensor | None, calibration: dict[str, Any] | None = None, batch_size: int = 8,
            after_stage: AfterStage | None = None) -> list[Report]:
        """Run every stage in order; one report per stage.

        Args:
            ids: calibration windows ``[N, L]`` (None when no stage needs them).
            calibration: how ``ids`` were made, recorded in the reports of the stages that use them.
            batch_size: windows per forward in the layer-wise runner.
            after_stage: called after each stage with the model and that stage's report.
        """
        reports: list[Report] = []
        for k, stage in enumerate(self.stages):
            if stage.needs() != "nothing" and ids is None:
                raise ConfigError(f"method {stage.config.method!r} needs calibration data: pass token windows "
                                  "or a CalibrationConfig")
            arch = self._arch if self._arch is not None else describe(self.model, self.arch_override)
            if k:
                stage.check(self.model, arch)
            report = self._run_stage(stage, arch, ids, calibration, batch_size, [*self.history, *reports])
            if report.edits:
                self._arch = None  # shapes changed: the next stage describes the model again
            else:
                self._arch = arch
            if after_stage is not None:
                after_stage(self.model, report)
            reports.append(report)
        return reports

    def _devices_info(self) -> dict[str, Any]:
        """The report's ``devices`` entry, only when the batches were split across several."""
        return {"devices": [str(d) for d in self.devices]} if len(self.devices) > 1 else {}

    def _run_stage(self, stage: Pruner, arch: ModelArch, ids: torch.Tensor | None,
                   calibration: dict[str, Any] | None, batch_size: int, history: list[Report]) -> Report:
        model, cfg = self.model, stage.config
        uses = stage.needs() != "nothing"
        first = next(model.parameters(), None)
        run_info: dict[str, Any] = {
            "device": str(self.device), **self._devices_info(),
            "dtype": None if first is None else str(first.dtype),
            "sequential": self.runtime.sequential, "offload": self.runtime.offload, "batch_size": batch_size,
        }
        override = None if self.arch_override is None else self.arch_override.to_dict()
        report = Report(method=cfg.method, config=cfg.to_dict(), calibration=calibration if uses else None,
                        runtime=run_info, arch_override=override)
        ctx = PruneContext(model, arch, ids if uses else None, self.runtime, report, batch_size,
                           device=self.device, arch_override=self.arch_override, tokenizer=self.tokenizer,
                           history=history, devices=list(self.devices))
        params_before = sum(p.numel() for p in model.parameters())
        stage.start(ctx)
        with torch.no_grad(), measure_cost() as cost:
            stage.run(ctx)
        report.prune_seconds = cost.seconds
        report.peak_rss_mb = cost.peak_rss_mb
        report.figures.setdefault("params_before", params_before)
        report.figures["params_after"] = sum(p.numel() for p in model.parameters())
        stage.finish(ctx)
        log.info("%s: %.1fs, peak RSS %.0f MB", cfg.method, cost.seconds, cost.peak_rss_mb)
        return report
