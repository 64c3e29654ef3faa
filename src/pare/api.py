"""The verbs: ``load_model``, ``prune``, ``evaluate``, ``save``, ``load``."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pare.arch import ArchOverride, describe
from pare.config import CalibrationConfig, PruneConfig, RuntimeConfig, parse_dtype, usable_device
from pare.errors import ConfigError, ModelNotFoundError
from pare.eval.cost import measure_cost
from pare.eval.perplexity import model_context_length
from pare.eval.size import count_nonzero, count_parameters, nonzero_by_parameter
from pare.io import load, save
from pare.io.save import config_describes
from pare.methods import PruneContext, pruner_for
from pare.methods.base import SparsityConfig, SparsityPruner
from pare.methods.quantize import QuantizeConfig
from pare.report import Report

log = logging.getLogger(__name__)

DENSE_ZEROS_NOTE = (
    "Unstructured/N:M sparsity leaves a dense checkpoint of the same size and dense speed: the zeros "
    "are stored. Gains need a sparse format or kernels (the N:M pattern is recorded for them)."
)


def load_model(name_or_path: str, dtype: str | torch.dtype = "auto", device: str | None = None):
    """Load a causal LM and its tokenizer by hub id or local path, with a clear error when missing.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = parse_dtype(dtype) or "auto"
    if device is not None:
        usable_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
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
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"model {name_or_path!r} loaded but its tokenizer did not: {exc}") from exc
    if device is not None:
        model.to(device)  # type: ignore[arg-type]
    return model.eval(), tokenizer


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


def prune(
    model: nn.Module,
    config: PruneConfig,
    calibration: torch.Tensor | CalibrationConfig | None = None,
    *,
    tokenizer: Any = None,
    runtime: RuntimeConfig | None = None,
    arch_override: ArchOverride | None = None,
    batch_size: int | None = None,
) -> Report:
    """Prune ``model`` in place with the method of ``config`` and return the report.

    Args:
        model: a transformers causal LM.
        config: a method config (``MagnitudeConfig(sparsity=0.5)``...).
        calibration: token windows ``[N, L]``, or a :class:`CalibrationConfig` (needs ``tokenizer``);
            ignored by data-free methods.
        tokenizer: used to build calibration windows from a CalibrationConfig.
        runtime: device / offload / sequential options.
        arch_override: corrections for architectures pare cannot infer.
        batch_size: windows per forward (default: the CalibrationConfig's, else 8).
    """
    if not isinstance(config, PruneConfig):
        raise ConfigError(f"config must be a method config such as pare.WandaConfig(sparsity=0.5), got "
                          f"{type(config).__name__}; from a dict: pare.METHODS[d['method']].config_class.from_dict(d)")
    runtime = runtime or RuntimeConfig()
    device = usable_device(runtime.device)  # before any work
    pruner_cls = pruner_for(config.method)
    if not isinstance(config, pruner_cls.config_class):
        raise ConfigError(f"{type(config).__name__} is not the config of method {config.method!r}")
    arch = describe(model, arch_override)
    pruner = pruner_cls(config)
    pruner.check(model, arch)
    calib_info: dict[str, Any] | None = None
    ids: torch.Tensor | None = None
    if pruner.uses_calibration():
        if isinstance(calibration, CalibrationConfig):
            if tokenizer is None:
                raise ConfigError("a CalibrationConfig needs the tokenizer (prune(..., tokenizer=tok))")
            calib_info = calibration.to_dict()
            batch_size = batch_size or calibration.batch_size
            ids = calibration_ids(tokenizer, calibration, model)
            check_token_ids(model, ids)
        elif isinstance(calibration, torch.Tensor):
            ids = calibration
            check_token_ids(model, ids)
            check_seqlen(model, int(ids.shape[1]))
            calib_info = {"nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "dataset": "tensor"}
        else:
            raise ConfigError(
                f"method {config.method!r} needs calibration data: pass token windows or a CalibrationConfig"
            )
    first = next(model.parameters(), None)
    batch_size = batch_size or 8
    run_info: dict[str, Any] = {
        "device": str(device), "dtype": None if first is None else str(first.dtype),
        "sequential": runtime.sequential, "offload": runtime.offload, "batch_size": batch_size,
    }
    report = Report(method=config.method, config=config.to_dict(), calibration=calib_info, runtime=run_info)
    params_before = sum(p.numel() for p in model.parameters())
    # every parameter's non-zeros: a model pruned before (a chained run) already holds zeros
    nonzero_before = nonzero_by_parameter(model) if isinstance(config, SparsityConfig) else None
    # whether the config alone describes the model now (not after an earlier non-uniform prune)
    described_before = not isinstance(config, SparsityConfig) and config_describes(model)
    ctx = PruneContext(model, arch, ids, runtime, report, batch_size)
    with torch.no_grad(), measure_cost() as cost:
        pruner.run(ctx)
    report.prune_seconds = cost.seconds
    report.peak_rss_mb = cost.peak_rss_mb
    if isinstance(config, SparsityConfig):  # weights are zeroed, shapes unchanged: the description holds
        report.pattern = None if config.nm is None else config.pattern
        assert isinstance(pruner, SparsityPruner)
        report.modules = pruner.pruned_modules(model, arch)
        report.notes.append(DENSE_ZEROS_NOTE)
    report.figures.setdefault("params_before", params_before)
    report.figures["params_after"] = sum(p.numel() for p in model.parameters())
    if report.edits and report.uniform and described_before and not config_describes(model):
        report.uniform = False  # a shape the config has no field for (Bloom's MLP width): pare.load replays
    if not isinstance(config, (SparsityConfig, QuantizeConfig)) and report.figures["params_after"] == params_before:
        unchanged = (f"{config.method} removed nothing with these options (a ratio of 0, or widths that round "
                     "back to the full size): the model is unchanged")
        log.warning(unchanged)
        report.notes.append(unchanged)
    if nonzero_before is not None:
        assert isinstance(pruner, SparsityPruner)
        report.figures["nonzero_before"] = sum(nonzero_before.values())
        report.figures["nonzero_after"] = pruner.nonzero_after(model, arch, nonzero_before, report.modules)
    log.info("%s: %.1fs, peak RSS %.0f MB", config.method, cost.seconds, cost.peak_rss_mb)
    return report


def check(model: nn.Module, config: PruneConfig, arch_override: ArchOverride | None = None) -> None:
    """Raise ConfigError when ``config`` cannot apply to ``model`` (GQA head counts, layer indices,
    module regexes, N:M widths...), before any long work such as a dense evaluation."""
    pruner_for(config.method)(config).check(model, describe(model, arch_override))


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
) -> dict[str, Any]:
    """Perplexity (papers' protocol), parameter counts and prefill/decode tokens/s.

    Returns:
        A flat dict: ``ppl``, ``n_tokens``, ``n_windows``, ``seqlen``, ``dataset``, ``params``,
        ``nonzero_params``, ``prefill_tokens_per_s``, ``decode_tokens_per_s``.
    """
    from pare.calibration.data import eval_token_ids
    from pare.eval.perplexity import perplexity
    from pare.eval.speed import measure_speed

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
    if speed:
        sp = measure_speed(model, prompt_len=min(128, model_context_length(model) or 128), new_tokens=32)
        out["prefill_tokens_per_s"] = sp.prefill_tokens_per_s
        out["decode_tokens_per_s"] = sp.decode_tokens_per_s
    return out


__all__ = ["evaluate", "load", "load_model", "prune", "save"]
