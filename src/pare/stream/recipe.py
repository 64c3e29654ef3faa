"""A recipe streamed from disk (``pare run recipe.yaml --stream``): one streamed pass per stage.

Every stage of the recipe must have a per-layer step (sparsity, quantization: stages that change
no shape and need nothing outside one layer); a stage that works on the whole model is refused
before any work, with the memory an in-memory run would need. The stages run one after another,
each a streamed prune (:func:`pare.stream.stream_prune`) of the previous stage's output: stage ``k``
of the in-memory recipe sees the model every earlier stage left and the same calibration windows,
and so does its streamed pass, so the final weights are the in-memory recipe's (bitwise on the
CPU). The intermediate models are written in ``.<out>.recipe/stage-K/`` beside the output (each
published only when complete, so ``--resume`` skips finished stages and resumes the interrupted
one) and removed once the output is in place; that directory keeps the guards of a save
(:mod:`pare.stream.recipe_dir`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pare.arch import ArchOverride
from pare.config import CalibrationConfig, PruneConfig, RuntimeConfig, stage_for_config
from pare.errors import ConfigError
from pare.io import read_manifest
from pare.io.save import manifest_stages
from pare.report import Report
from pare.stream.config import StreamConfig, fmt_bytes
from pare.stream.files import build_skeleton
from pare.stream.recipe_dir import RecipeWork, recipe_settings, recipe_work_dir
from pare.stream.run import plan_stream, stream_prune, whole_model_bytes

log = logging.getLogger(__name__)

__all__ = ["check_streamable", "recipe_work_dir", "stream_recipe"]


def check_streamable(source: str, configs: Sequence[PruneConfig], dtype: torch.dtype | None = None) -> None:
    """Refuse, before any weight is read, a recipe with a stage that cannot stream layer by layer.

    Raises:
        ConfigError: naming the stage, why, and the memory the whole model would need in memory.
    """
    need = None
    for k, cfg in enumerate(configs):
        stage = stage_for_config(cfg)(cfg)
        refusal = stage.stream_refusal()
        if refusal is None and stage.needs() not in ("windows", "nothing"):
            refusal = f"{cfg.method} needs gradients over the whole model"
        if refusal is None and stage.changes_shapes:
            refusal = f"{cfg.method} changes shapes, which the layers after it and the saved config must follow"
        if refusal:
            need = whole_model_bytes(build_skeleton(source, dtype)) if need is None else need
            raise ConfigError(f"--stream: stage {k + 1} ({cfg.method}) cannot stream: {refusal}. Without --stream "
                              f"the recipe loads the whole model: about {fmt_bytes(need)} of weights plus the "
                              "calibration activations and the stages' work; run it on a machine with that much "
                              "memory, or stream only the stages that have a per-layer step. Nothing was read or "
                              "written.")


def stream_recipe(source: str, configs: Sequence[PruneConfig], out: str | Path,
                  calibration: CalibrationConfig | torch.Tensor | None, tokenizer: Any, runtime: RuntimeConfig,
                  stream: StreamConfig, *, dtype: torch.dtype | None = None, batch_size: int | None = None,
                  overwrite: bool = False, arch_override: ArchOverride | None = None,
                  earlier: list[Report] | None = None,
                  figures: dict[str, Any] | None = None) -> tuple[list[Report], Path]:
    """Stream every stage of a recipe in turn; returns the reports of this run's stages and the output.

    Every stage is checked (method, memory for one layer) against the source before any work.

    Args:
        source: the model directory (or hub id) to prune.
        configs: the stages, in order.
        out: the output directory.
        calibration: windows or how to build them (shared by every stage).
        tokenizer: builds the windows; saved beside the model.
        runtime, stream: as :func:`pare.stream.plan_stream`.
        earlier: reports of prunes applied to ``source`` before (its manifest), kept in the output's.
        figures: added to the first stage's report (e.g. ``size_on_disk_bytes_before``).
    """
    if len(configs) > 1:  # one stage: plan_stream says the same
        check_streamable(source, configs, dtype)
    work = RecipeWork(out, recipe_settings(source, configs, calibration, runtime, batch_size, dtype))
    work.check(stream.resume)
    last = len(configs) - 1
    dests = [Path(out) if k == last else work.stage_dir(k) for k in range(len(configs))]
    for k, cfg in enumerate(configs):  # every later stage checked on the source's shapes (none changes them)
        if k and not (stream.resume and _finished(dests[k], cfg)):
            plan_stream(source, cfg, dests[k], calibration, tokenizer, runtime, stream, dtype=dtype,
                        batch_size=batch_size, overwrite=overwrite or k < last, arch_override=arch_override)
    current, reports = source, list(earlier or [])
    ran: list[Report] = []
    with work.locked() if last else contextlib.nullcontext():  # one stage: no intermediate model
        for k, cfg in enumerate(configs):
            if k < last and stream.resume and _finished(dests[k], cfg):
                log.warning("--resume: stage %d (%s) was finished in %s", k + 1, cfg.method, dests[k])
                report = Report.from_dict(manifest_stages(read_manifest(dests[k]))[-1])
            else:
                plan = plan_stream(current, cfg, dests[k], calibration, tokenizer, runtime, stream, dtype=dtype,
                                   batch_size=batch_size, overwrite=overwrite or k < last,
                                   arch_override=arch_override)
                report, _ = stream_prune(plan, runtime, resume=stream.resume, overwrite=overwrite or k < last,
                                         tokenizer=tokenizer, earlier=reports, figures=figures if k == 0 else None)
                del plan
            reports.append(report)
            ran.append(report)
            current = str(dests[k])
        if last:
            work.discard()
    return ran, Path(out)


def _finished(dest: Path, cfg: PruneConfig) -> bool:
    """Whether ``dest`` holds a published output whose last stage is ``cfg``."""
    manifest = read_manifest(dest) if (dest / "pare.json").is_file() else None
    stages = manifest_stages(manifest)
    return bool(stages) and stages[-1].get("config") == cfg.to_dict()
