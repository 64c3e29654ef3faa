"""The report of one stage of a run; ``save()`` writes the reports as the ``pare.json`` manifest."""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field
from typing import Any

from pare.arch.surgery.edits import Edit, as_edit, edit_dicts

REPORT_VERSION = 1


def library_versions() -> dict[str, str]:
    import safetensors
    import torch
    import transformers

    from pare import __version__

    return {
        "pare": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


@dataclass
class Report:
    """What a pruning run changed, and what it cost.

    Attributes:
        method: method name (``magnitude``, ``wanda``...).
        config: the method config as a dict (versioned).
        calibration: the calibration settings used, or None for data-free methods.
        runtime: how the run went: device, model dtype, sequential or dense-input calibration
            (which changes the result), offload, windows per forward.
        modules: per pruned module: ``shape`` [out, in], measured ``sparsity`` and ``nonzero``.
        pattern: ``"2:4"``-style pattern, or None.
        edits: structural edits (:mod:`pare.arch.surgery.edits`) in the order applied (replayed by
            ``pare.load`` to rebuild shapes); written to the manifest as ``{"op": ...}`` objects.
        uniform: True when the config alone describes the shapes (plain ``from_pretrained`` works).
        scores: method-specific scores (per layer, span, head...).
        figures: before/after measurements (``ppl_before``, ``params_after``...). Sparsity methods add
            ``nonzero_before`` / ``nonzero_after``: the non-zero values of every parameter.
        prune_seconds / peak_rss_mb: cost of the pruning step.
        notes: human-readable remarks (e.g. "zeros do not make a dense checkpoint smaller").
        arch_override: the :class:`~pare.arch.ArchOverride` the run described the model with (as a
            dict), or None; ``pare.load`` replays the edits with it.
    """

    method: str
    config: dict[str, Any]
    calibration: dict[str, Any] | None = None
    runtime: dict[str, Any] = field(default_factory=dict)
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    pattern: str | None = None
    edits: list[Edit] = field(default_factory=list)
    uniform: bool = True
    scores: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    prune_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    notes: list[str] = field(default_factory=list)
    arch_override: dict[str, Any] | None = None
    versions: dict[str, str] = field(default_factory=library_versions)
    version: int = REPORT_VERSION

    @property
    def overall_sparsity(self) -> float:
        """Zeros / weights over every pruned module, as counted in the weights."""
        total = sum(m["numel"] for m in self.modules.values())
        zeros = sum(m["numel"] - m["nonzero"] for m in self.modules.values())
        return zeros / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["edits"] = edit_dicts(self.edits)
        d["overall_sparsity"] = self.overall_sparsity
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """The report a manifest entry holds (its edits parsed into typed edits)."""
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        values["edits"] = [as_edit(e) for e in values.get("edits") or []]
        return cls(**values)
