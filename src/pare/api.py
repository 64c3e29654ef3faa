"""The verbs: ``load_model``, ``prune``, ``run`` (several stages), ``evaluate``, ``save``, ``load``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pare.arch import ArchOverride
from pare.config import CalibrationConfig, PruneConfig, RuntimeConfig, parse_dtype, usable_device
from pare.errors import ConfigError, ModelNotFoundError, PareError
from pare.eval.perplexity import model_context_length
from pare.eval.size import count_nonzero, count_parameters
from pare.io import load, save
from pare.io.load import causal_lm_config, weight_files
from pare.pipeline import AfterStage, Pipeline
from pare.report import Report

log = logging.getLogger(__name__)



# the files a tokenizer is read from (any one suffices, depending on the tokenizer's kind)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_model(name_or_path: str, dtype: str | torch.dtype = "auto", device: str | None = None,
               device_map: str | None = None):
    """Load a causal LM and its tokenizer by hub id or local path, with a clear error when missing.

    ``device_map`` (``auto``...) places the layers over the GPUs, then the CPU, with accelerate.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode.
    """
    from transformers import AutoTokenizer

    from pare.io.load import auto_class, check_device_map

    dtype = parse_dtype(dtype) or "auto"
    check_device_map(device_map)
    if device is not None:
        usable_device(device)
    try:
        config = causal_lm_config(name_or_path)  # T5 and other non-causal models: said so, not "cannot load"
        if Path(name_or_path).is_dir():
            weight_files(name_or_path)  # tampered index or truncated weights: refused before transformers reads
        model = auto_class(config).from_pretrained(
            name_or_path, dtype=dtype, **({"device_map": device_map} if device_map is not None else {}))
    except PareError:
        raise
    except (OSError, ValueError) as exc:
        local = Path(name_or_path).exists()
        hint = (
            "the directory has no loadable config/weights"
            if local
            else "it is neither a local directory nor a model id the Hugging Face Hub could serve (offline?)"
        )
        raise ModelNotFoundError(
            f"cannot load model {name_or_path!r}: {hint}. ({exc.__class__.__name__}: {exc})"
        ) from exc
    local_dir = Path(name_or_path)
    if local_dir.is_dir() and not any((local_dir / f).is_file() for f in TOKENIZER_FILES):
        raise ModelNotFoundError(
            f"model {name_or_path!r} loaded but has no tokenizer: none of {', '.join(TOKENIZER_FILES)} is in the "
            "directory. Copy the tokenizer of the model it came from into it (AutoTokenizer.from_pretrained(BASE)"
            f".save_pretrained({name_or_path!r}))")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"model {name_or_path!r} loaded but its tokenizer did not: {exc}") from exc
    if device is not None:
        model.to(device)  # type: ignore[arg-type]
    return model.eval(), tokenizer


def _check_task_limit(limit: Any) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"task_limit must be a positive integer (the first N documents of each task), got {limit!r}")


def check_seqlen(model: nn.Module, seqlen: int) -> None:
    """Raise ConfigError when ``seqlen`` exceeds the model's context."""
    limit = model_context_length(model)
    if limit is not None and seqlen > limit:
        raise ConfigError(
            f"seqlen {seqlen} is longer than the model's context of {limit} tokens; use --seqlen {limit} or less"
        )


def check_token_ids(model: nn.Module, ids: Any) -> None:
    """Raise ConfigError unless ``ids`` is a non-empty 2-D integer tensor ``[nsamples, seqlen]`` whose
    ids all index the model's input embedding (a tokenizer of another model gives larger ids)."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.numel() == 0 or ids.dtype.is_floating_point \
            or ids.is_complex() or ids.dtype == torch.bool:
        got = f"a {ids.dim()}-D {ids.dtype} tensor of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) \
            else type(ids).__name__
        raise ConfigError(f"calibration must be token ids as a 2-D integer tensor [nsamples, seqlen], got {got}: "
                          "e.g. ids.view(nsamples, seqlen).long(), or pass a CalibrationConfig with the tokenizer")
    from pare.calibration.data import check_ids_in_vocab

    check_ids_in_vocab(model, ids, "calibration")


def calibration_ids(tokenizer: Any, calib: CalibrationConfig, model: nn.Module | None = None) -> torch.Tensor:
    """Token windows ``[nsamples, seqlen]`` for a calibration config."""
    from pare.calibration.data import calibration_windows

    if model is not None:
        check_seqlen(model, calib.seqlen)
    return calibration_windows(tokenizer, calib.dataset, calib.nsamples, calib.seqlen, seed=calib.seed,
                               allow_repeats=calib.allow_repeats)


def calibration_for(
    model: nn.Module, calibration: torch.Tensor | CalibrationConfig | None, tokenizer: Any, batch_size: int | None,
) -> tuple[torch.Tensor | None, dict[str, Any] | None, int]:
    """Token windows, what the report records about them, and the windows per forward."""
    if isinstance(calibration, CalibrationConfig):
        if tokenizer is None:
            raise ConfigError("a CalibrationConfig needs the tokenizer (prune(..., tokenizer=tok))")
        ids = calibration_ids(tokenizer, calibration, model)
        check_token_ids(model, ids)
        return ids, calibration.to_dict(), batch_size or calibration.batch_size
    if isinstance(calibration, torch.Tensor):
        check_token_ids(model, calibration)
        check_seqlen(model, int(calibration.shape[1]))
        info = {"nsamples": int(calibration.shape[0]), "seqlen": int(calibration.shape[1]), "dataset": "tensor"}
        return calibration, info, batch_size or 8
    if calibration is not None:
        raise ConfigError(f"calibration must be token windows [nsamples, seqlen] or a CalibrationConfig, got "
                          f"{type(calibration).__name__}")
    return None, None, batch_size or 8


def run(
    model: nn.Module,
    stages: PruneConfig | Sequence[PruneConfig],
    calibration: torch.Tensor | CalibrationConfig | None = None,
    *,
    tokenizer: Any = None,
    runtime: RuntimeConfig | None = None,
    arch_override: ArchOverride | None = None,
    batch_size: int | None = None,
    after_stage: AfterStage | None = None,
    history: Sequence[Report] = (),
    component: str | None = None,
) -> list[Report]:
    """Apply ``stages`` (a recipe) to ``model`` in place, in order, with one calibration set.

    Args:
        model: a transformers causal LM.
        stages: method configs in the order to apply them
            (``[OsscarConfig(mlp_ratio=0.25), PplWindowConfig(num_layers=1), SparseGPTConfig(pattern="2:4")]``).
        calibration: token windows ``[N, L]``, or a :class:`CalibrationConfig` (needs ``tokenizer``);
            built once and shared by every stage that needs it.
        tokenizer: used to build calibration windows from a CalibrationConfig.
        runtime: device / offload / sequential options.
        arch_override: corrections for architectures pare cannot infer (kept in the reports, so
            ``pare.load`` replays the edits with it).
        batch_size: windows per forward (default: the CalibrationConfig's, else 8).
        after_stage: called after each stage with the model and its report (figures after it).
        history: the reports of the prunes applied to ``model`` before (a saved model's manifest
            stages); stages that look back (recovery) see them.
        component: ``text`` (the decoder; default) or ``vision`` (a vision-language model's vision tower,
            :mod:`pare.arch.vision`); then ``calibration`` is images ``pixel_values [N, C, H, W]`` from the
            model's image processor, or None for random normalised pixels
            (:mod:`pare.calibration.images`).

    Returns:
        One report per stage; ``pare.save(model, tok, out, reports)`` writes them all as the manifest.
    """
    from pare.arch.overrides import with_component

    pipeline = Pipeline(model, stages, runtime, with_component(arch_override, component), tokenizer=tokenizer,
                        history=history)
    if pipeline.arch.vision is not None:
        return pipeline.run(*_vision_calibration(pipeline, calibration), batch_size or 8, after_stage)
    ids, calib_info, batch = calibration_for(model, calibration, tokenizer, batch_size) \
        if pipeline.needs_calibration() else (None, None, batch_size or 8)
    if pipeline.needs_calibration() and ids is None:
        method = next(s.config.method for s in pipeline.stages if s.needs() != "nothing")
        raise ConfigError(f"method {method!r} needs calibration data: pass token windows or a CalibrationConfig")
    return pipeline.run(ids, calib_info, batch, after_stage)


def _vision_calibration(pipeline: Pipeline, calibration: Any) -> tuple[torch.Tensor | None, dict[str, Any] | None]:
    """The images a vision-tower run calibrates on (None when no stage needs them) and their record."""
    from pare.calibration.images import vision_calibration

    if not pipeline.needs_calibration():
        return None, None
    if isinstance(calibration, CalibrationConfig):
        raise ConfigError("component='vision' calibrates on images: pass pixel_values [N, C, H, W] from the "
                          "model's image processor, or None for random normalised pixels (a CalibrationConfig "
                          "builds text windows)")
    return vision_calibration(pipeline.arch, calibration)


def prune(
    model: nn.Module,
    config: PruneConfig,
    calibration: torch.Tensor | CalibrationConfig | None = None,
    *,
    tokenizer: Any = None,
    runtime: RuntimeConfig | None = None,
    arch_override: ArchOverride | None = None,
    batch_size: int | None = None,
    component: str | None = None,
) -> Report:
    """Prune ``model`` in place with the method of ``config`` and return the report (a one-stage
    :func:`run`).

    Args:
        model: a transformers causal LM.
        config: a method config (``MagnitudeConfig(sparsity=0.5)``...).
        calibration: token windows ``[N, L]``, or a :class:`CalibrationConfig` (needs ``tokenizer``);
            ignored by data-free methods.
        tokenizer: used to build calibration windows from a CalibrationConfig.
        runtime: device / offload / sequential options.
        arch_override: corrections for architectures pare cannot infer.
        batch_size: windows per forward (default: the CalibrationConfig's, else 8).
        component: ``text`` (default) or ``vision``: which part of a vision-language model to prune (see
            :func:`run`).
    """
    if not isinstance(config, PruneConfig):
        raise ConfigError(f"config must be a method config such as pare.WandaConfig(sparsity=0.5), got "
                          f"{type(config).__name__}; from a dict: pare.config_from_dict(d)")
    return run(model, [config], calibration, tokenizer=tokenizer, runtime=runtime, arch_override=arch_override,
               batch_size=batch_size, component=component)[0]


def check(model: nn.Module, config: PruneConfig, arch_override: ArchOverride | None = None,
          component: str | None = None) -> None:
    """Raise ConfigError when ``config`` cannot apply to ``model`` (GQA head counts, layer indices,
    module regexes, N:M widths...), before any long work such as a dense evaluation; ``component`` as
    in :func:`run`."""
    from pare.arch.overrides import with_component

    Pipeline(model, [config], arch_override=with_component(arch_override, component))


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    dataset: str | None = "wikitext2",
    seqlen: int = 2048,
    batch_size: int = 1,
    max_windows: int | None = None,
    speed: bool = True,
    device: str | torch.device | None = None,
    progress: bool = True,
    tasks: str | Sequence[str] | None = None,
    task_limit: int | None = None,
    task_batch_size: int = 16,
) -> dict[str, Any]:
    """Perplexity (papers' protocol), zero-shot task accuracy, parameter counts and prefill/decode tokens/s.

    Args:
        tasks: zero-shot tasks scored as lm-evaluation-harness does (``"piqa,arc_easy"`` or a list; see
            ``pare.eval.zeroshot.TASKS``); None skips them.
        task_limit: score only the first N documents of each task.
        task_batch_size: rows per forward in the task scoring.

    Returns:
        A flat dict: ``ppl``, ``n_tokens``, ``n_windows``, ``seqlen``, ``dataset``, ``params``,
        ``nonzero_params``, ``prefill_tokens_per_s``, ``decode_tokens_per_s``; with tasks also
        ``zeroshot`` (the dict :func:`pare.eval.zeroshot.evaluate_tasks` returns) and ``zeroshot_mean``.
    """
    from pare.calibration.data import eval_token_ids
    from pare.eval.perplexity import perplexity
    from pare.eval.speed import measure_speed

    if tasks is not None:  # bad names, limits or a missing tokenizer fail before any long work
        from pare.eval.zeroshot import resolve_tasks

        resolve_tasks(tasks if isinstance(tasks, str) else list(tasks))
        _check_task_limit(task_limit)
        if tokenizer is None:
            raise ConfigError("zero-shot tasks need the model's tokenizer: pass the tokenizer load_model returned")
    if device is not None:
        model.to(usable_device(device))
    out: dict[str, Any] = {"params": count_parameters(model), "nonzero_params": count_nonzero(model)}
    if dataset:
        check_seqlen(model, seqlen)
        ids = eval_token_ids(tokenizer, dataset, split="test")
        res = perplexity(model, ids, seqlen, batch_size=batch_size, progress=progress, max_windows=max_windows)
        out.update({k: v for k, v in asdict(res).items()})
        out["dataset"] = dataset
        out["text_tokens"] = int(ids.shape[-1])  # length of the whole tokenized text
    if tasks is not None:
        from pare.eval.zeroshot import evaluate_tasks

        zs = evaluate_tasks(model, tokenizer, tasks if isinstance(tasks, str) else list(tasks), limit=task_limit,
                            batch_size=task_batch_size, progress=progress)
        out["zeroshot"] = zs
        out["zeroshot_mean"] = zs["mean_acc"]
    if speed:
        sp = measure_speed(model, prompt_len=min(128, model_context_length(model) or 128), new_tokens=32)
        out["prefill_tokens_per_s"] = sp.prefill_tokens_per_s
        out["decode_tokens_per_s"] = sp.decode_tokens_per_s
    return out


__all__ = ["evaluate", "load", "load_model", "prune", "run", "save"]
