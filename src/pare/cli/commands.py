"""What each ``pare`` subcommand does, once its options are parsed into configs."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pare.config import CalibrationConfig, PruneConfig, RuntimeConfig, parse_dtype, usable_device
from pare.errors import ConfigError, PareError, SaveInterrupted
from pare.eval.perplexity import model_context_length
from pare.report import Report


def _arch_override(path: str | None, component: str | None = None):
    from pare.arch.overrides import with_component

    if not path:
        return with_component(None, component)
    from pare.arch import ArchOverride
    from pare.config import read_config_file

    return with_component(ArchOverride.from_dict(read_config_file(path)), component)


def _images(path: str | None) -> Any:
    """The ``pixel_values`` tensor of a safetensors file (``--images``), or None."""
    if not path:
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"--images {path!r}: cannot read it as a safetensors file ({exc})") from exc
    if "pixel_values" not in tensors:
        raise ConfigError(f"--images {path!r} holds {sorted(tensors)}, not 'pixel_values' [N, C, H, W]")
    return tensors["pixel_values"].float()


def print_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> None:
    """A plain aligned text table on stdout."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)))
    print(line)
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def params_by_part(model: nn.Module, arch) -> dict[str, int]:
    """Parameter counts split into embeddings, attention, mlp, experts, norms, lm_head, other."""
    parts = dict.fromkeys(("embeddings", "attention", "mlp", "experts", "norms", "lm_head", "other"), 0)
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        parts[arch.part_of(name)] += p.numel()
    parts["total"] = sum(parts.values())
    return parts


def inspect_cmd(args: argparse.Namespace) -> int:
    from pare.arch import describe
    from pare.io.load import meta_model

    model = meta_model(args.model)
    arch = describe(model, _arch_override(args.arch_override, args.component))
    parts = params_by_part(model, arch)
    vision = _vision_section(model, arch, _arch_override(args.arch_override))
    layers = []
    for r in arch.layers:
        a, m, e, la = r.attention, r.mlp, r.experts, r.mla
        layers.append({
            "layer": r.index,
            "heads": a.num_heads if a else (la.num_heads if la else None),
            "kv_heads": a.num_kv_heads if a else None,
            "head_dim": a.head_dim if a else (f"{la.nope_dim}+{la.rope_dim}/{la.v_dim}" if la else None),
            "mlp": arch.mlp_width(model, r.index) if m else None,
            "experts": f"{e.num_experts}x{e.intermediate} top{e.top_k}" if e else None,
            "mixer": f"{r.mixer.kind} ({r.mixer.path})" if r.mixer else None,
            "parallel": r.parallel_residual,
        })
    if args.json:
        print(json.dumps({"model_type": arch.model_type, "component": arch.component,
                          "layers_path": arch.layers_path, "tied": arch.tied, "params": parts, "layers": layers,
                          "not_cut": arch.mixers(), "latent_attention": arch.latent_attention(),
                          "vision": vision}, indent=2))
        return 0
    if arch.vision is not None:
        print(f"{args.model}: {arch.model_type} vision tower, {arch.num_layers} encoder layers at {arch.layers_path}, "
              f"patch embedding {arch.embed_path}")
    else:
        print(f"{args.model}: {arch.model_type}, {arch.num_layers} decoder layers at {arch.layers_path}, "
              f"lm_head {'tied to' if arch.tied else 'separate from'} {arch.embed_path}")
    r0 = arch.layers[0]
    if r0.attention:
        at = r0.attention
        names = ", ".join(p.path for p in (*at.inputs, at.o))
        print(f"attention: {names}" + (f" (fused, {at.qkv_layout})" if at.qkv else ""))
    if r0.mla:
        la = r0.mla
        names = ", ".join(p.path for p in (la.q, la.q_a, la.q_b, la.kv_a, la.kv_b, la.o) if p is not None)
        print(f"attention (latent): {names}")
        print(f"  {arch.latent_attention()}")
    if r0.mlp:
        print(f"mlp: {', '.join(p.path for p in (*r0.mlp.inputs, r0.mlp.down))}")
    ex = next((r.experts for r in arch.layers if r.experts is not None), None)  # DeepSeek: layer 0 is dense
    if ex is not None:
        shared = f", shared {ex.shared.path}" if ex.shared is not None else ""
        print(f"experts: {ex.path} ({ex.gate_up_param}, {ex.down_param}), router {ex.router}{shared}")
    print(f"norms: {', '.join(r0.norms)}")
    if arch.mixers():
        print(f"not attention: {arch.mixers()}")
    f = arch.fields
    sizes = {"hidden": f.hidden, "intermediate": f.intermediate, "heads": f.heads, "kv_heads": f.kv_heads,
             "head_dim": f.head_dim, "layers": f.layers, "moe_intermediate": f.moe_intermediate,
             "num_experts": f.num_experts, "per-layer lists": ", ".join(f.per_layer_lists) or None}
    print("config fields: " + "; ".join(f"{k}={v}" for k, v in sizes.items() if v))
    _print_vision(vision)
    print()
    print_table([tuple(_fmt(v) for v in d.values()) for d in layers], tuple(layers[0].keys()))
    print()
    print_table([(k, _fmt(v)) for k, v in parts.items()], ("part", "params"))
    return 0


def _vision_section(model: nn.Module, arch: Any, override: Any) -> dict[str, Any] | str | None:
    """The vision tower's cuttable roles (:func:`pare.arch.vision.vision_summary`), why pare does not prune
    it, or None for a model without one."""
    from pare.arch import describe
    from pare.arch.overrides import with_component
    from pare.arch.vision import components, vision_summary
    from pare.errors import UnsupportedArchitectureError

    if arch.vision is None and "vision" not in components(model):
        return None
    try:
        varch = arch if arch.vision is not None else describe(model, with_component(override, "vision"))
    except UnsupportedArchitectureError as exc:
        return f"not pruned: {exc}"
    return vision_summary(model, varch)


def _print_vision(vision: dict[str, Any] | str | None) -> None:
    if vision is None:
        return
    if isinstance(vision, str):
        print(f"vision tower: {vision}")
        return
    print(f"vision tower (--component vision): {vision['layers']} layers at {vision['layers_path']}; "
          f"attention {', '.join(vision['attention'])} ({vision['heads']} heads of {vision['head_dim']}); "
          f"mlp {', '.join(vision['mlp'])} (width {vision['mlp_width']})")
    print(f"  cut: {'; '.join(vision['cuttable'])}")
    for why in vision["not_cut"]:
        print(f"  not cut: {why}")
    if vision["remapped_by_depth"]:
        print(f"  remapped by a depth cut: {', '.join(vision['remapped_by_depth'])}")
    print(f"  calibration: {vision['calibration']}")


def model_dir_bytes(path: str | Path) -> int | None:
    p = Path(path)
    if not p.is_dir():
        return None
    return sum(f.stat().st_size for f in p.glob("*.safetensors")) + sum(f.stat().st_size for f in p.glob("*.bin"))


def _load_any(name_or_path: str, dtype: str | None = None, device_map: str | None = None):
    from transformers import AutoTokenizer

    from pare.api import load_model
    from pare.io import load, read_manifest

    if Path(name_or_path).is_dir() and read_manifest(name_or_path):
        model = load(name_or_path, dtype=parse_dtype(dtype), device_map=device_map)
        return model, AutoTokenizer.from_pretrained(name_or_path)
    return load_model(name_or_path, dtype=dtype or "auto", device_map=device_map)


def _positive(flag: str, value: int | None, what: str) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{flag} must be a positive integer ({what}), got {value}")


def _check_task_flags(tasks: str | None, limit: int | None, limit_flag: str, batch: int | None,
                      batch_flag: str) -> None:
    """Task names, --limit and --batch-size checked before anything is loaded."""
    _positive(limit_flag, limit, "the first N documents of each task")
    _positive(batch_flag, batch, "rows per forward")
    if tasks is not None:
        from pare.eval.zeroshot import resolve_tasks

        resolve_tasks(tasks)


def eval_cmd(args: argparse.Namespace) -> int:
    from pare.api import evaluate
    from pare.calibration.sources import split_label
    from pare.io.load import check_device_map

    device_map = getattr(args, "device_map", None)
    check_device_map(device_map)
    if device_map is not None and args.device is not None:
        raise ConfigError("give --device (the whole model on one device) or --device-map (accelerate places the "
                          "layers over the GPUs, then the CPU), not both")
    if args.device is not None:
        usable_device(args.device)  # before loading anything
    _check_task_flags(args.tasks, args.limit, "--limit", args.batch_size, "--batch-size")
    if args.limit is not None and not (args.tasks or args.lm_eval):
        raise ConfigError("--limit applies to --tasks or --lm-eval; for perplexity use --max-windows")
    if args.lm_eval is not None and not args.lm_eval.strip():
        raise ConfigError("--lm-eval needs task names, e.g. --lm-eval piqa,arc_easy")
    task_mode = bool(args.tasks or args.lm_eval)
    ppl = args.ppl if args.ppl is not None else ("none" if task_mode else "wikitext2")
    speed = args.speed if args.speed is not None else not task_mode
    model, tok = _load_any(args.model, device_map=device_map)
    dataset = None if ppl in ("", "none") else ppl
    seqlen = default_seqlen(model) if args.seqlen is None else args.seqlen
    res = evaluate(model, tok, dataset=dataset, seqlen=seqlen,
                   batch_size=1 if args.batch_size is None else args.batch_size, max_windows=args.max_windows,
                   speed=speed, device=args.device, tasks=args.tasks,
                   task_limit=args.limit, task_batch_size=16 if args.batch_size is None else args.batch_size)
    res["size_on_disk_bytes"] = model_dir_bytes(args.model)
    res["model"] = args.model
    if device_map is not None:
        # accelerate's placement; transformers records none when everything fits on the one device there is
        placed = getattr(model, "hf_device_map", None) or {"": next(model.parameters()).device}
        res["device_map"] = {k: str(v) for k, v in placed.items()}
    if args.lm_eval:
        from pare.eval.zeroshot import run_lm_eval

        res["lm_eval"] = run_lm_eval(model, tok, args.lm_eval, limit=args.limit, batch_size=args.batch_size or 16)
    if speed:
        from pare.eval.semi_structured import is_two_four, measure_two_four_speedup

        if any(is_two_four(m.weight) for m in model.modules() if isinstance(m, nn.Linear)):
            nm = measure_two_four_speedup(model)
            res["two_four_linear_speedup"] = nm.speedup
            res["two_four_skipped"] = nm.skipped
    if args.json:
        print(json.dumps(res, indent=2, default=str))
        return 0
    if dataset:
        print(f"{dataset} {split_label(dataset, 'test')}: {res['text_tokens']:,} tokens after tokenization; "
              f"scored {res['n_windows']:,} windows of {res['seqlen']:,} tokens ({res['n_tokens']:,} tokens)")
    rows = [(k, _fmt(res.get(k))) for k in ("ppl", "params", "nonzero_params", "size_on_disk_bytes",
                                             "prefill_tokens_per_s", "decode_tokens_per_s",
                                             "two_four_linear_speedup", "two_four_skipped") if k in res]
    print_table(rows, ("metric", "value"))
    if "zeroshot" in res:
        print()
        print_task_table(res["zeroshot"])
    if "lm_eval" in res:
        print()
        print_lm_eval_table(res["lm_eval"]["results"])
    return 0


def default_seqlen(model: nn.Module) -> int:
    """The window when none is given: 2048 tokens, or the model's context when it is shorter."""
    return min(2048, model_context_length(model) or 2048)


def print_task_table(zs: dict[str, Any]) -> None:
    """Per-task acc, acc_norm (with stderr), documents and LAMBADA's perplexity, then the mean acc."""
    rows = []
    for name, r in zs["tasks"].items():
        acc = f"{r['acc']:.4f} ± {r['acc_stderr']:.4f}"
        norm = f"{r['acc_norm']:.4f} ± {r['acc_norm_stderr']:.4f}" if "acc_norm" in r else "-"
        rows.append((name, acc, norm, _fmt(r.get("ppl")), _fmt(r["n"])))
    print_table(rows, ("task", "acc", "acc_norm", "ppl", "docs"))
    print(f"mean acc: {zs['mean_acc']:.4f}")
    for name, r in zs["tasks"].items():
        if r.get("note"):
            print(f"note ({name}): {r['note']}")


def print_lm_eval_table(results: dict[str, Any]) -> None:
    """lm-evaluation-harness's results: one row per task and metric."""
    rows = []
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, flt = key.partition(",")
            if metric.endswith("_stderr") or metric == "alias" or not isinstance(value, (int, float)):
                continue
            err = metrics.get(f"{metric}_stderr,{flt}" if flt else f"{metric}_stderr")
            shown = _fmt(float(value), 4) + (f" ± {err:.4f}" if isinstance(err, float) else "")
            rows.append((task, metric, flt or "-", shown))
    print_table(rows, ("lm-eval task", "metric", "filter", "value"))


def _evaluate_figures(model, tok, args: argparse.Namespace, seqlen: int, runtime: RuntimeConfig) -> dict[str, Any]:
    """Perplexity on ``args.eval`` (a data set, or a list: the first one's figures are ``ppl``...,
    the others' ``ppl_<set>``), and tokens/s unless ``--no-speed``."""
    from pare.api import evaluate

    datasets = [] if not args.eval else [args.eval] if isinstance(args.eval, str) else list(args.eval)
    speed = args.speed if args.speed is not None else bool(args.eval)  # tasks alone: no speed run unless asked
    out: dict[str, Any] = {}
    for k, dataset in enumerate(datasets or [None]):
        first = k == 0
        res = evaluate(model, tok, dataset=dataset, seqlen=seqlen if args.eval_seqlen is None else args.eval_seqlen,
                       batch_size=1 if args.eval_batch_size is None else args.eval_batch_size,
                       max_windows=args.eval_max_windows, speed=first and speed, device=runtime.device,
                       progress=runtime.progress, tasks=args.eval_tasks if first else None, task_limit=args.eval_limit,
                       task_batch_size=16 if args.eval_batch_size is None else args.eval_batch_size)
        out.update(res if first else {f"ppl_{dataset}": res["ppl"]})
    return out


@contextlib.contextmanager
def transformers_bars(shown: bool) -> Iterator[None]:
    """Hide transformers' own progress bars (loading, writing shards) while the block runs when
    ``shown`` is False (``--no-progress``), and put back the setting found."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not shown:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not shown:
            hf_logging.enable_progress_bar()


def run_cmd(args: argparse.Namespace, stages: Sequence[PruneConfig], calib: CalibrationConfig,
            runtime: RuntimeConfig) -> int:
    """Load, (evaluate), run every stage (evaluating after each), save, print the before/after table."""
    with transformers_bars(runtime.progress):
        return _run_cmd(args, stages, calib, runtime)


def _run_cmd(args: argparse.Namespace, stages: Sequence[PruneConfig], calib: CalibrationConfig,
             runtime: RuntimeConfig) -> int:
    from pare.api import calibration_ids, check_token_ids
    from pare.io.outdir import check_output
    from pare.pipeline import Pipeline

    _check_save_wanted(args)
    if args.report and not args.out:
        raise ConfigError("--report writes report.html into the saved model's directory: pass --out DIR too")
    _check_task_flags(args.eval_tasks, args.eval_limit, "--eval-limit", args.eval_batch_size, "--eval-batch-size")
    if args.eval_limit is not None and not args.eval_tasks:
        raise ConfigError("--eval-limit applies to --eval-tasks; for perplexity use --eval-max-windows")
    if args.out:  # fail before any long work (pare.save checks again)
        check_output(args.out, bool(args.overwrite), args.model)
    runtime.compute_device()
    parse_dtype(args.dtype)
    model, tok = _load_any(args.model, args.dtype)
    # every stage built once, the model described once; the first stage's options are checked before the
    # calibration text and the dense evaluation (later stages: on the model the earlier ones leave)
    pipeline = Pipeline(model, stages, runtime, _arch_override(args.arch_override, getattr(args, "component", None)),
                        tokenizer=tok, history=_earlier_reports(args.model))
    if getattr(args, "seqlen", None) is None:  # no --seqlen: as pare eval, 2048 or the model's context when shorter
        calib = dataclasses.replace(calib, seqlen=min(calib.seqlen, default_seqlen(model)))
    _check_eval_seqlen(model, args)
    calib_info: dict[str, Any] | None = None
    if pipeline.arch.vision is not None:
        from pare.calibration.images import vision_calibration

        ids, calib_info = vision_calibration(pipeline.arch, _images(getattr(args, "images", None)), calib.nsamples,
                                             calib.seed) if pipeline.needs_calibration() else (None, None)
    else:
        if getattr(args, "images", None):
            raise ConfigError("--images calibrates a vision tower: add --component vision")
        ids = calibration_ids(tok, calib, model) if pipeline.needs_calibration() else None
        calib_info = None if ids is None else calib.to_dict()
    if ids is not None and pipeline.arch.vision is None:
        check_token_ids(model, ids)  # a tokenizer of another model: refused before the dense evaluation
    evaluating = bool(args.eval or args.eval_tasks)
    before = _evaluate_figures(model, tok, args, calib.seqlen, runtime) if evaluating else {}
    if before and runtime.offload:
        model.to("cpu")

    def after_stage(model: nn.Module, report: Report) -> None:
        after = _evaluate_figures(model, tok, args, calib.seqlen, runtime) if evaluating else {}
        for key, value in after.items():
            report.figures[f"{key}_after"] = value
        if after and runtime.offload:
            model.to("cpu")

    reports = pipeline.run(ids, calib_info, calib.batch_size, after_stage)
    for key, value in before.items():
        reports[0].figures[f"{key}_before"] = value
    reports[0].figures["size_on_disk_bytes_before"] = model_dir_bytes(args.model)
    out = _save_run(args, model, tok, reports) if args.out else None
    # after the save: the model's files are complete, and the report only adds files beside them
    said = _write_run_report(out) if out is not None and args.report else []
    try:
        if args.json:
            shown = reports[0].to_dict() if len(reports) == 1 else {"stages": [r.to_dict() for r in reports]}
            print(json.dumps(shown, indent=2, default=str))
            for line in said:
                print(line, file=sys.stderr)
        else:
            _print_run_summary(reports, args)
            for line in said:
                print(line)
    except KeyboardInterrupt:
        if out is not None:
            raise SaveInterrupted(out, saved=True) from None
        raise
    return 0


def _earlier_reports(model: str) -> list[Report]:
    """The reports of the prunes a saved pare model went through (none for another model)."""
    from pare.io import read_manifest
    from pare.io.save import manifest_stages

    return [Report.from_dict(r) for r in manifest_stages(read_manifest(model) if Path(model).is_dir() else None)]


def _save_run(args: argparse.Namespace, model: nn.Module, tok: Any, reports: list[Report]) -> Path:
    """Save with every report (a pare output run again keeps its earlier stages: pare.load replays all)."""
    from pare.io import read_manifest, save
    from pare.io.save import manifest_stages

    note = _dtype_size_note(args.model, model)
    if note:
        reports[-1].notes.append(note)
    earlier = manifest_stages(read_manifest(args.model) if Path(args.model).is_dir() else None)
    # save fills figures.size_on_disk_bytes_after (in the manifest and in the last report) before its rename
    return save(model, tok, args.out, [Report.from_dict(r) for r in earlier] + reports,
                overwrite=bool(args.overwrite), source=args.model)


def _write_run_report(out: Path) -> list[str]:
    """report.html and report.md beside the saved model; returns the lines to tell the user. A failure
    here is a warning: the saved model is complete and stays as it is."""
    from pare.reporting import write_report

    try:
        written = write_report([out], html=out / "report.html", md=out / "report.md")
    except (OSError, ValueError, PareError) as exc:
        return [f"warning: the model is saved, but its report could not be written: {exc}"]
    return ([f"note: {written.note}"] if written.note else []) + [f"report: {written.html} and {written.markdown}"]


def report_cmd(args: argparse.Namespace) -> int:
    """``pare report OUT_DIR... --html FILE [--md FILE]``."""
    from pare.reporting import write_report
    from pare.study.run import is_study

    if len(args.runs) == 1 and is_study(args.runs[0]):  # a study directory: its own report
        from pare.study.report import write_study_report

        for page in write_study_report(args.runs[0], args.html, args.md, plots=args.plots):
            print(f"wrote {page}")
        return 0
    html = args.html if args.html or args.md else "report.html"
    written = write_report(args.runs, html=html, md=args.md, plots=args.plots)
    if written.note:
        print(f"note: {written.note}")
    for path in (written.html, written.markdown):
        if path is not None:
            print(f"wrote {path}" + (f" ({written.plots} plots)" if written.plots else ""))
    return 0


def _check_save_wanted(args: argparse.Namespace) -> None:
    """A prune can run for hours: without ``--out`` its result would be lost, so ask for ``--no-save``."""
    if args.no_save and args.out:
        raise ConfigError(f"--no-save and --out {args.out!r} contradict each other; pass one of them")
    if not args.out and not args.no_save:
        given = " (an empty path)" if args.out is not None else ""
        raise ConfigError(f"no --out{given}: pass --out DIR to save the pruned model, or --no-save to prune "
                          "(and evaluate) without saving the result")


def _check_eval_seqlen(model: nn.Module, args: argparse.Namespace) -> None:
    """The evaluation window fits the model's context (named by the flag that sets it)."""
    limit = model_context_length(model)
    if args.eval and args.eval_seqlen and limit is not None and args.eval_seqlen > limit:
        raise ConfigError(f"--eval-seqlen {args.eval_seqlen} is longer than the model's context of {limit} "
                          f"tokens; use --eval-seqlen {limit} or less")


def _checkpoint_dtype(path: str | Path) -> str | None:
    """The one floating dtype of a directory's safetensors weights (e.g. ``float32``), else None."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    if not files:
        return None
    found = set()
    for file in files:
        with safe_open(file, "pt") as f:
            names = f.keys()  # a safe_open handle is not iterable
            found |= {f.get_slice(k).get_dtype() for k in names}
    floats = {d for d in found if d.startswith(("F", "BF"))}
    torch_names = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    return torch_names.get(floats.pop()) if len(floats) == 1 else None


def _model_dtype(model: nn.Module) -> str | None:
    """The one floating dtype of ``model``'s parameters (what its checkpoint is saved in), else None."""
    found = {p.dtype for p in model.parameters() if p.dtype.is_floating_point}
    return str(found.pop()).removeprefix("torch.") if len(found) == 1 else None


def _dtype_size_note(source: str, model: nn.Module) -> str | None:
    """A note when the output's dtype differs from the input checkpoint's: the size change is not the pruning."""
    before, after = _checkpoint_dtype(source), _model_dtype(model)
    if before is None or after is None or before == after:
        return None
    ratio = getattr(torch, after).itemsize / getattr(torch, before).itemsize
    return (f"the output is saved in {after}, the input was {before}: the dtype alone makes the size on disk "
            f"{ratio:g}x (pass --dtype {before} to compare like with like)")


def _task_rows(figures: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Before/after rows of the zero-shot mean and each task's acc (and acc_norm where reported)."""
    before, after = figures.get("zeroshot_before"), figures.get("zeroshot_after")
    if not before or not after:
        return []
    rows = [("zero-shot mean acc", _fmt(before["mean_acc"], 4), _fmt(after["mean_acc"], 4))]
    for name, b in before["tasks"].items():
        a = after["tasks"].get(name, {})
        rows.append((f"  {name} acc", _fmt(b.get("acc"), 4), _fmt(a.get("acc"), 4)))
        if "acc_norm" in b:
            rows.append((f"  {name} acc_norm", _fmt(b.get("acc_norm"), 4), _fmt(a.get("acc_norm"), 4)))
    return rows


def _print_run_summary(reports: list[Report], args: argparse.Namespace) -> None:
    first, last = reports[0], reports[-1]
    f0, f1 = first.figures, last.figures
    rows = [
        ("params", _fmt(f0.get("params_before")), _fmt(f1.get("params_after"))),
        ("size on disk (bytes)", _fmt(f0.get("size_on_disk_bytes_before")), _fmt(f1.get("size_on_disk_bytes_after"))),
    ]
    if "nonzero_after" in f1 and len(reports) == 1:
        rows.insert(1, ("params not zeroed", _fmt(f1.get("nonzero_before")), _fmt(f1.get("nonzero_after"))))
    elif "nonzero_after" in f1:
        rows.insert(1, ("params not zeroed", "-", _fmt(f1.get("nonzero_after"))))
    label = args.eval if isinstance(args.eval, str) else (args.eval[0] if args.eval else "")
    rows[:0] = _task_rows({"zeroshot_before": f0.get("zeroshot_before"), "zeroshot_after": f1.get("zeroshot_after")})
    if args.eval:
        rows.insert(0, (f"ppl ({label})", _fmt(f0.get("ppl_before")), _fmt(f1.get("ppl_after"))))
    if "prefill_tokens_per_s_before" in f0:
        for label_s, key in (("prefill tokens/s", "prefill_tokens_per_s"), ("decode tokens/s", "decode_tokens_per_s")):
            rows.append((label_s, _fmt(f0.get(f"{key}_before"), 0), _fmt(f1.get(f"{key}_after"), 0)))
    if len(reports) > 1:
        stage_rows = [(i, r.method, f"{r.prune_seconds:.2f}", f"{r.peak_rss_mb:.0f}",
                       _fmt(r.figures.get("params_after")), _fmt(r.figures.get("ppl_after")))
                      for i, r in enumerate(reports)]
        print_table(stage_rows, ("stage", "method", "seconds", "peak RSS MB", "params after", f"ppl after ({label})"
                                 if args.eval else "ppl after"))
        print()
    for report in reports:
        _print_stage(report)
    print()
    print_table(rows, ("", "before", "after"))
    for report in reports:
        for note in report.notes:
            print(f"note: {note}" if len(reports) == 1 else f"note ({report.method}): {note}")
    if args.out:
        print(f"saved to {args.out}")


def _print_stage(report: Report) -> None:
    print(f"method {report.method}: pruned in {report.prune_seconds:.2f}s, peak RSS {report.peak_rss_mb:.0f} MB")
    if report.modules:
        print(f"sparsity of pruned modules (counted in the weights): {report.overall_sparsity:.4f}"
              + (f", pattern {report.pattern}" if report.pattern else ""))
    quant = report.scores.get("quantization")
    if quant:
        print(f"quantized: {quant['scheme']} (groups of {quant['group_size'] or 'a row'}), "
              f"{quant['bits_per_param']:.3f} bits/param, {quant['bytes']:,} bytes for the quantized matrices"
              + (f" ({quant['sparse_format']})" if quant.get("sparse_format") else ""))
    for key in ("removed_layers", "removed", "reason"):
        if key in report.scores:
            print(f"{key.replace('_', ' ')}: {report.scores[key]}")
    for row in report.scores.get("experts", []):
        merged = f", merged {row['merged']}" if row.get("merged") else ""
        print(f"layer {row['layer']}: kept experts {row['kept']}{merged}")
    if report.edits:
        shape = "uniform" if report.uniform else "non-uniform: reload with pare.load"
        print(f"structural edits: {len(report.edits)} ({shape})")
