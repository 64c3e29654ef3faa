"""Explicit layer removal (``--method layers --layers 11-13`` or ``3,7,9``), and what every depth
method shares: the layer-count target and the removal step.

How a target becomes a number of layers (:meth:`DepthConfig.layer_count`):

* ``num_layers=k``: remove ``k`` layers.
* ``param_ratio=r``: remove the smallest number of layers ``k`` with
  ``k * P_layer >= r * P_total``, i.e. ``k = ceil(r * P_total / P_layer)``, where ``P_total`` counts
  every parameter of the model (embeddings included) and ``P_layer`` is the mean parameter count of a
  decoder layer. At least the asked fraction is removed; the report gives the fraction achieved.
* ``target_params=T``: the smallest ``k`` with ``P_total - k * P_layer <= T``.

With none of them set, one layer is removed. Asking for all layers (or more) is a ConfigError.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from pare.arch.overrides import ArchOverride
from pare.arch.roles import ModelArch
from pare.arch.surgery.depth import check_layer_indices, remove_layers
from pare.arch.surgery.edits import RemoveLayers
from pare.config import PruneConfig, help_field, register
from pare.errors import ConfigError
from pare.methods.base import PruneContext, StructuralPruner


def parse_layer_spec(spec: str) -> list[int]:
    """``"11-13"`` -> [11, 12, 13]; ``"3,7,9"`` -> [3, 7, 9]; ranges and lists combine (``"1-2,5"``)."""
    out: list[int] = []
    for part in str(spec).replace(" ", "").split(","):
        if not part:
            continue
        span = re.fullmatch(r"(\d+)-(\d+)", part)
        if span:
            a, b = int(span.group(1)), int(span.group(2))
            if b < a:
                raise ConfigError(f"layer range {part!r} runs backwards; write it as {b}-{a}")
            out.extend(range(a, b + 1))
        elif re.fullmatch(r"-?\d+", part):
            out.append(int(part))
        else:
            raise ConfigError(f"cannot read layer spec {spec!r}: use ranges and lists such as '11-13' or '3,7,9'")
    if not out:
        raise ConfigError(f"layer spec {spec!r} names no layers; use e.g. '11-13' or '3,7,9'")
    return out


def layer_params(model: nn.Module, arch: ModelArch) -> list[int]:
    """Parameter count of each decoder layer."""
    return [sum(p.numel() for p in layer.parameters()) for layer in arch.layer_modules(model)]


@dataclass(frozen=True)
class DepthConfig(PruneConfig):
    """How many layers to remove (set at most one; see the module docstring for the rule).

    Attributes:
        num_layers: number of decoder layers to remove.
        param_ratio: fraction of the model's parameters to remove, in (0, 1).
        target_params: parameter count to get down to.
        holdout: fraction of the calibration windows (the last ones) on which perplexity-guided
            methods score candidates; they come from the calibration split, never the evaluation one.
    """

    num_layers: int | None = help_field(None, "number of decoder layers to remove (default 1)")
    param_ratio: float | None = help_field(None, "fraction of all parameters to remove, in (0, 1)")
    target_params: int | None = help_field(None, "parameter count to reach")
    holdout: float = help_field(1.0, "fraction of the calibration windows used to score perplexity, in (0, 1]")

    def __post_init__(self) -> None:
        super().__post_init__()
        given = [n for n in ("num_layers", "param_ratio", "target_params") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ConfigError(f"give only one of num_layers, param_ratio, target_params (got {given})")
        k, r = self.num_layers, self.param_ratio
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ConfigError(f"num_layers must be a positive integer (layers to remove), got {k!r}")
        if r is not None and not (isinstance(r, (int, float)) and 0 < r < 1):
            raise ConfigError(f"param_ratio must be in (0, 1) (0.25 removes a quarter of the parameters), got {r!r}")
        if self.target_params is not None and (not isinstance(self.target_params, int) or self.target_params < 1):
            raise ConfigError(f"target_params must be a positive integer, got {self.target_params!r}")
        if not (isinstance(self.holdout, (int, float)) and 0 < self.holdout <= 1):
            raise ConfigError(f"holdout must be in (0, 1], got {self.holdout!r}")

    def layer_count(self, model: nn.Module, arch: ModelArch) -> int:
        """The number of layers to remove (ConfigError when it would remove all of them)."""
        n = arch.num_layers
        total = sum(p.numel() for p in model.parameters())
        per_layer = sum(layer_params(model, arch)) / n
        if self.param_ratio is not None:
            k = math.ceil(self.param_ratio * total / per_layer - 1e-9)
            asked = f"param_ratio={self.param_ratio}"
        elif self.target_params is not None:
            k = max(0, math.ceil((total - self.target_params) / per_layer - 1e-9))
            asked = f"target_params={self.target_params}"
        else:
            k = 1 if self.num_layers is None else self.num_layers
            asked = f"num_layers={k}"
        if k < 1:
            raise ConfigError(f"{asked} needs no layer removed: the model has {total} parameters already")
        if k >= n:
            raise ConfigError(
                f"{asked} would remove {k} of the model's {n} layers; at least one must remain "
                f"(each layer holds ~{per_layer:.0f} of {total} parameters; remove at most {n - 1})"
            )
        return k


class CountedDepthPruner(StructuralPruner):
    """A depth stage that removes ``config.layer_count`` layers chosen from data."""

    config: DepthConfig

    def check(self, model: nn.Module, arch: ModelArch) -> None:
        self.config.layer_count(model, arch)

    def preview(self, model: nn.Module, arch: ModelArch, override: ArchOverride | None) -> None:
        """Remove as many layers as the run will: the last ones before the final layer here (the run
        chooses them from data; in a model of identical layers any choice leaves the same shapes)."""
        k, n = self.config.layer_count(model, arch), arch.num_layers
        remove_layers(model, arch, range(n - 1 - k, n - 1))


def holdout_windows(ctx: PruneContext, fraction: float):
    """The last ``ceil(fraction * N)`` calibration windows (perplexity scoring split)."""
    ids = ctx.calibration
    if ids is None:
        raise ConfigError("this method needs calibration windows")
    k = max(1, math.ceil(fraction * ids.shape[0]))
    return ids[ids.shape[0] - k:]


def apply_layer_removal(ctx: PruneContext, removed: list[int], why: str) -> RemoveLayers:
    """Remove ``removed`` layers, record the edit, the reason and the achieved fraction in the report."""
    before = sum(p.numel() for p in ctx.model.parameters())
    edit = remove_layers(ctx.model, ctx.arch, removed)
    after = sum(p.numel() for p in ctx.model.parameters())
    ctx.report.edits.append(edit)
    if not edit.describes_config:
        ctx.report.uniform = False
    ctx.report.scores["removed_layers"] = list(edit.removed)
    ctx.report.scores["reason"] = why
    ctx.report.figures["layers_before"] = edit.num_layers_before
    ctx.report.figures["layers_after"] = edit.num_layers_after
    ctx.report.figures["param_ratio_removed"] = (before - after) / before
    return edit


@dataclass(frozen=True)
class LayersConfig(PruneConfig):
    """Remove the decoder layers named explicitly.

    Attributes:
        layers: ranges and lists of layer indices, e.g. ``"11-13"`` or ``"3,7,9"``.
    """

    method: ClassVar[str] = "layers"

    layers: str = help_field("", "layer indices to remove: '11-13', '3,7,9' or both ('1-2,5')")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers:
            parse_layer_spec(self.layers)


@register
class LayersPruner(StructuralPruner):
    """Delete the given layers (no scoring)."""

    config_class = LayersConfig
    prunes_vision: ClassVar[bool] = True
    config: LayersConfig
    needs_calibration: ClassVar[bool] = False

    @classmethod
    def example_config(cls) -> LayersConfig:
        return LayersConfig(layers="1")

    def check(self, model: nn.Module, arch: ModelArch) -> None:
        self._chosen(arch.num_layers)

    def _chosen(self, num_layers: int) -> list[int]:
        if not self.config.layers:
            raise ConfigError("method 'layers' needs the layers to remove, e.g. --layers 11-13 or --layers 3,7,9")
        return check_layer_indices(parse_layer_spec(self.config.layers), num_layers)

    def preview(self, model: nn.Module, arch: ModelArch, override: ArchOverride | None) -> None:
        remove_layers(model, arch, self._chosen(arch.num_layers))

    def run(self, ctx: PruneContext) -> None:
        chosen = self._chosen(ctx.arch.num_layers)
        apply_layer_removal(ctx, chosen, f"named explicitly: --layers {self.config.layers}")
