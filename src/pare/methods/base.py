"""What every method implements, and the shared machinery of layer-wise sparsity methods.

A method is a frozen config dataclass plus a :class:`Pruner`. The pruner declares whether it needs
calibration data and which input statistics (``norms``, ``gram``) it wants; the math itself lives
in :mod:`pare.ops`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from pare.arch.roles import ModelArch
from pare.arch.targets import Target, layer_targets, select
from pare.calibration.runner import LayerwiseRunner, resolve_device
from pare.calibration.stats import STAT_GRAM, InputStats, record_inputs
from pare.config import PruneConfig, RuntimeConfig, check_ratio, help_field
from pare.ops.masks import parse_pattern
from pare.report import Report

log = logging.getLogger(__name__)


@dataclass
class PruneContext:
    """Everything a pruner may use.

    Attributes:
        model: the model, pruned in place.
        arch: its description.
        calibration: token windows ``[N, L]`` or None for data-free methods.
        runtime: device / offload / sequential settings.
        report: filled in by the pruner (scores, edits, notes); module sparsity is measured after.
        batch_size: windows per forward in the runner.
    """

    model: nn.Module
    arch: ModelArch
    calibration: torch.Tensor | None
    runtime: RuntimeConfig
    report: Report
    batch_size: int = 8

    def runner(self) -> LayerwiseRunner:
        assert self.calibration is not None
        return LayerwiseRunner(
            self.model, self.arch, self.calibration, device=self.runtime.device,
            batch_size=self.batch_size, offload=self.runtime.offload,
            sequential=self.runtime.sequential, progress=self.runtime.progress,
        )


class Pruner(ABC):
    """A pruning method: built from its config, run on a :class:`PruneContext`."""

    config_class: ClassVar[type[PruneConfig]]
    needs_calibration: ClassVar[bool] = True

    def __init__(self, config: PruneConfig) -> None:
        self.config = config

    @abstractmethod
    def run(self, ctx: PruneContext) -> None:
        """Prune ``ctx.model`` in place and record what was done in ``ctx.report``."""


@dataclass(frozen=True)
class SparsityConfig(PruneConfig):
    """Options shared by the weight-sparsity methods (magnitude, Wanda, SparseGPT).

    Attributes:
        sparsity: fraction of weights set to zero in each pruned matrix, in [0, 1).
        pattern: ``unstructured`` or ``N:M`` (N zeros in every M consecutive inputs, e.g. 2:4).
    """

    sparsity: float = help_field(0.5, "fraction of weights set to zero, in [0, 1)")
    pattern: str = help_field("unstructured", "'unstructured' or N:M, e.g. 2:4 (2 zeros in every 4)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ratio("sparsity", self.sparsity)
        parse_pattern(self.pattern)

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)


class SparsityPruner(Pruner):
    """Layer-wise weight sparsity: per target, gather input statistics, then mask (and update)."""

    config: SparsityConfig
    stats: ClassVar[frozenset[str]] = frozenset()

    def target_sparsity(self, layer_index: int, target: Target) -> float:
        """Sparsity for one matrix (uniform here; OWL / per-module ratios override this)."""
        return self.config.sparsity

    def prepare(self, ctx: PruneContext) -> None:
        """Called once before the layers are visited (e.g. to compute per-layer ratios)."""

    @abstractmethod
    def prune_target(self, target: Target, stats: InputStats | None, sparsity: float) -> None:
        """Zero (and possibly update) ``target.weight()`` in place."""

    def _targets(self, ctx: PruneContext, index: int, layer: nn.Module) -> list[Target]:
        prefix = ctx.arch.layer_prefix(index)
        found = layer_targets(layer, ctx.arch.layers[index], prefix)
        return select(found, self.config.targets, self.config.ignore)

    def run(self, ctx: PruneContext) -> None:
        self.prepare(ctx)
        if not self.needs_calibration:
            self._run_data_free(ctx)
            return
        for step in ctx.runner().steps():
            targets = self._targets(ctx, step.index, step.layer)
            stats = {t.name: InputStats(want_gram=STAT_GRAM in self.stats) for t in targets}
            with record_inputs(targets, stats):
                step.run()
            for t in targets:
                self.prune_target(t, stats[t.name], self.target_sparsity(step.index, t))
                del stats[t.name]

    def _run_data_free(self, ctx: PruneContext) -> None:
        device = resolve_device(ctx.runtime.device)
        layers = ctx.arch.layer_modules(ctx.model)
        for i in tqdm(range(len(layers)), desc="layers", disable=not ctx.runtime.progress, leave=False):
            layer = layers[i]
            home = next(layer.parameters()).device
            layer.to(device)
            for t in self._targets(ctx, i, layer):
                self.prune_target(t, None, self.target_sparsity(i, t))
            layer.to(home)


def measure_sparsity(model: nn.Module, arch: ModelArch, names: set[str] | None = None) -> dict[str, dict]:
    """Per prunable matrix: shape, numel, nonzero and sparsity, counted in the weights."""
    out: dict[str, dict] = {}
    layers = arch.layer_modules(model)
    for i, roles in enumerate(arch.layers):
        for t in layer_targets(layers[i], roles, arch.layer_prefix(i)):
            if names is not None and t.name not in names:
                continue
            w = t.weight()
            nnz = int(torch.count_nonzero(w))
            out[t.name] = {
                "shape": [int(w.shape[0]), int(w.shape[1])],
                "numel": int(w.numel()),
                "nonzero": nnz,
                "sparsity": 1.0 - nnz / w.numel(),
            }
    return out
