"""What each ``pare`` subcommand does, once its options are parsed into configs."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pare.config import CalibrationConfig, PruneConfig, RuntimeConfig, parse_dtype, usable_device
from pare.errors import ConfigError, SaveInterrupted
from pare.eval.perplexity import model_context_length


def _arch_override(path: str | None):
    if not path:
        return None
    from pare.arch import ArchOverride
    from pare.config import read_config_file

    return ArchOverride.from_dict(read_config_file(path))


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
        parts[_part_of(name, arch)] += p.numel()
    parts["total"] = sum(parts.values())
    return parts


def _part_of(name: str, arch) -> str:
    if name.startswith(arch.embed_path + ".") or any(name.startswith(e + ".") for e in arch.extra_embeddings):
        return "embeddings"
    if arch.lm_head_path and name.startswith(arch.lm_head_path + "."):
        return "lm_head"
    prefix = arch.layers_path + "."
    if not name.startswith(prefix):
        return "norms" if arch.final_norm_path and name.startswith(arch.final_norm_path + ".") else "other"
    idx_str, _, rel = name[len(prefix):].partition(".")
    roles = arch.layers[int(idx_str)]
    if roles.experts is not None and rel.startswith(roles.experts.path.rsplit(".", 1)[0] + "."):
        return "experts"
    if roles.attention is not None and rel.startswith(roles.attention.path + "."):
        return "attention"
    if any(rel.startswith(n + ".") for n in roles.norms):
        return "norms"
    if roles.mlp is not None:
        mlp_paths = [p.path for p in (*roles.mlp.inputs, roles.mlp.down)]
        if any(rel.startswith(p + ".") for p in mlp_paths) or (roles.mlp.path and rel.startswith(roles.mlp.path + ".")):
            return "mlp"
    return "other"


def _meta_model(name_or_path: str):
    """Build the model on the meta device from its config (no weights read), replaying pare edits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pare.errors import ModelNotFoundError
    from pare.io import read_manifest

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"cannot read a model config from {name_or_path!r}: {exc}") from exc
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    manifest = read_manifest(name_or_path) if Path(name_or_path).is_dir() else None
    if manifest and not manifest.get("uniform", True):
        from pare.arch.surgery import replay

        replay(model, manifest.get("edits") or [])
    return model


def inspect_cmd(args: argparse.Namespace) -> int:
    from pare.arch import describe

    model = _meta_model(args.model)
    arch = describe(model)
    parts = params_by_part(model, arch)
    layers = []
    for r in arch.layers:
        a, m, e = r.attention, r.mlp, r.experts
        layers.append({
            "layer": r.index,
            "heads": a.num_heads if a else None,
            "kv_heads": a.num_kv_heads if a else None,
            "head_dim": a.head_dim if a else None,
            "mlp": _mlp_width(model, arch, r.index) if m else None,
            "experts": f"{e.num_experts}x{e.intermediate} top{e.top_k}" if e else None,
            "parallel": r.parallel_residual,
        })
    if args.json:
        print(json.dumps({"model_type": arch.model_type, "layers_path": arch.layers_path,
                          "tied": arch.tied, "params": parts, "layers": layers}, indent=2))
        return 0
    print(f"{args.model}: {arch.model_type}, {arch.num_layers} decoder layers at {arch.layers_path}, "
          f"lm_head {'tied to' if arch.tied else 'separate from'} {arch.embed_path}")
    r0 = arch.layers[0]
    if r0.attention:
        at = r0.attention
        names = ", ".join(p.path for p in (*at.inputs, at.o))
        print(f"attention: {names}" + (f" (fused, {at.qkv_layout})" if at.qkv else ""))
    if r0.mlp:
        print(f"mlp: {', '.join(p.path for p in (*r0.mlp.inputs, r0.mlp.down))}")
    if r0.experts:
        ex = r0.experts
        print(f"experts: {ex.path} ({ex.gate_up_param}, {ex.down_param}), router {ex.router}")
    print(f"norms: {', '.join(r0.norms)}")
    f = arch.fields
    sizes = {"hidden": f.hidden, "intermediate": f.intermediate, "heads": f.heads, "kv_heads": f.kv_heads,
             "head_dim": f.head_dim, "layers": f.layers, "moe_intermediate": f.moe_intermediate,
             "num_experts": f.num_experts, "per-layer lists": ", ".join(f.per_layer_lists) or None}
    print("config fields: " + "; ".join(f"{k}={v}" for k, v in sizes.items() if v))
    print()
    print_table([tuple(_fmt(v) for v in d.values()) for d in layers], tuple(layers[0].keys()))
    print()
    print_table([(k, _fmt(v)) for k, v in parts.items()], ("part", "params"))
    return 0


def _mlp_width(model: nn.Module, arch, index: int) -> int:
    from pare.arch.roles import get_weight

    layer = arch.layer_modules(model)[index]
    down = arch.layers[index].mlp.down
    return int(get_weight(layer.get_submodule(down.path), down).shape[1])


def model_dir_bytes(path: str | Path) -> int | None:
    p = Path(path)
    if not p.is_dir():
        return None
    return sum(f.stat().st_size for f in p.glob("*.safetensors")) + sum(f.stat().st_size for f in p.glob("*.bin"))


def _load_any(name_or_path: str, dtype: str | None = None):
    from transformers import AutoTokenizer

    from pare.api import load_model
    from pare.io import load, read_manifest

    if Path(name_or_path).is_dir() and read_manifest(name_or_path):
        model = load(name_or_path, dtype=parse_dtype(dtype))
        return model, AutoTokenizer.from_pretrained(name_or_path)
    return load_model(name_or_path, dtype=dtype or "auto")


def eval_cmd(args: argparse.Namespace) -> int:
    from pare.api import evaluate
    from pare.calibration.sources import split_label

    if args.device is not None:
        usable_device(args.device)  # before loading anything
    model, tok = _load_any(args.model)
    dataset = None if args.ppl in (None, "", "none") else args.ppl
    seqlen = args.seqlen or min(2048, model_context_length(model) or 2048)
    res = evaluate(model, tok, dataset=dataset, seqlen=seqlen, batch_size=args.batch_size,
                   max_windows=args.max_windows, speed=args.speed, device=args.device)
    res["size_on_disk_bytes"] = model_dir_bytes(args.model)
    res["model"] = args.model
    if args.speed:
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
    return 0


def _evaluate_figures(model, tok, args: argparse.Namespace, seqlen: int, runtime: RuntimeConfig) -> dict[str, Any]:
    from pare.api import evaluate

    return evaluate(model, tok, dataset=args.eval, seqlen=args.eval_seqlen or seqlen,
                    batch_size=args.eval_batch_size or 1, max_windows=args.eval_max_windows,
                    speed=args.speed is not False, device=runtime.device, progress=runtime.progress)


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


def prune_cmd(args: argparse.Namespace, method: PruneConfig, calib: CalibrationConfig,
              runtime: RuntimeConfig, needs_calibration: bool) -> int:
    """Load, (evaluate), prune, (evaluate), save, print the before/after table."""
    with transformers_bars(runtime.progress):
        return _prune_cmd(args, method, calib, runtime, needs_calibration)


def _prune_cmd(args: argparse.Namespace, method: PruneConfig, calib: CalibrationConfig,
               runtime: RuntimeConfig, needs_calibration: bool) -> int:
    from pare.api import calibration_ids, check, check_token_ids, prune
    from pare.io import save
    from pare.io.outdir import check_output

    _check_save_wanted(args)
    if args.out:  # fail before any long work (pare.save checks again)
        check_output(args.out, bool(args.overwrite), args.model)
    usable_device(runtime.device)
    parse_dtype(args.dtype)
    model, tok = _load_any(args.model, args.dtype)
    override = _arch_override(args.arch_override)
    check(model, method, override)  # bad options fail before the calibration text and the dense evaluation
    _check_eval_seqlen(model, args)
    ids = calibration_ids(tok, calib, model) if needs_calibration else None
    if ids is not None:
        check_token_ids(model, ids)  # a tokenizer of another model: refused before the dense evaluation
    before = _evaluate_figures(model, tok, args, calib.seqlen, runtime) if args.eval else {}
    if before:
        model.to("cpu") if runtime.offload else None
    report = prune(model, method, ids, tokenizer=tok, runtime=runtime, arch_override=override,
                   batch_size=calib.batch_size)
    if ids is not None:
        report.calibration = calib.to_dict()
    after = _evaluate_figures(model, tok, args, calib.seqlen, runtime) if args.eval else {}
    for key, value in before.items():
        report.figures[f"{key}_before"] = value
    for key, value in after.items():
        report.figures[f"{key}_after"] = value
    report.figures["size_on_disk_bytes_before"] = model_dir_bytes(args.model)
    if args.out:
        from pare.io import read_manifest
        from pare.report import Report

        note = _dtype_size_note(args.model, model)
        if note:
            report.notes.append(note)
        # a pare output pruned again: its earlier edits stay in the manifest (pare.load replays all)
        earlier = read_manifest(args.model) if Path(args.model).is_dir() else None
        chain = (earlier.get("history") or [earlier]) if earlier else []  # a chain's manifest lists every prune
        reports = [Report.from_dict(r) for r in chain] + [report]
        # save fills figures.size_on_disk_bytes_after (in the manifest and in ``report``) before its rename
        out = save(model, tok, args.out, reports, overwrite=bool(args.overwrite), source=args.model)
    try:
        if args.json:
            print(json.dumps(report.to_dict(), indent=2, default=str))
        else:
            _print_prune_summary(report, args)
    except KeyboardInterrupt:
        if args.out:
            raise SaveInterrupted(out, saved=True) from None
        raise
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


def _print_prune_summary(report, args: argparse.Namespace) -> None:
    f = report.figures
    rows = [
        ("params", _fmt(f.get("params_before")), _fmt(f.get("params_after"))),
        ("size on disk (bytes)", _fmt(f.get("size_on_disk_bytes_before")), _fmt(f.get("size_on_disk_bytes_after"))),
    ]
    if "nonzero_after" in f:
        rows.insert(1, ("params not zeroed", _fmt(f.get("nonzero_before")), _fmt(f.get("nonzero_after"))))
    if args.eval:
        rows.insert(0, (f"ppl ({args.eval})", _fmt(f.get("ppl_before")), _fmt(f.get("ppl_after"))))
        for label, key in (("prefill tokens/s", "prefill_tokens_per_s"), ("decode tokens/s", "decode_tokens_per_s")):
            rows.append((label, _fmt(f.get(f"{key}_before"), 0), _fmt(f.get(f"{key}_after"), 0)))
    print(f"method {report.method}: pruned in {report.prune_seconds:.2f}s, peak RSS {report.peak_rss_mb:.0f} MB")
    if report.modules:
        print(f"sparsity of pruned modules (counted in the weights): {report.overall_sparsity:.4f}"
              + (f", pattern {report.pattern}" if report.pattern else ""))
    for key in ("removed_layers", "removed", "reason"):
        if key in report.scores:
            print(f"{key.replace('_', ' ')}: {report.scores[key]}")
    for row in report.scores.get("experts", []):
        merged = f", merged {row['merged']}" if row.get("merged") else ""
        print(f"layer {row['layer']}: kept experts {row['kept']}{merged}")
    if report.edits:
        shape = "uniform" if report.uniform else "non-uniform: reload with pare.load"
        print(f"structural edits: {len(report.edits)} ({shape})")
    print()
    print_table(rows, ("", "before", "after"))
    for note in report.notes:
        print(f"note: {note}")
    if args.out:
        print(f"saved to {args.out}")
