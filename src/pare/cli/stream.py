"""``pare prune ... --stream`` and ``pare run recipe.yaml --stream``: prune a model larger than memory,
layer by layer from disk (a recipe: one streamed pass per stage)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
from collections.abc import Sequence
from pathlib import Path

from pare.config import CalibrationConfig, PruneConfig, RuntimeConfig, parse_dtype
from pare.errors import ConfigError, ModelNotFoundError
from pare.report import Report
from pare.stream.config import StreamConfig


def stream_cmd(args: argparse.Namespace, configs: PruneConfig | Sequence[PruneConfig], calib: CalibrationConfig,
               runtime: RuntimeConfig, stream: StreamConfig) -> int:
    """Check everything, stream the prune (or every stage of a recipe) into ``--out``, print the summary."""
    from pare.cli.commands import (
        _arch_override,
        _print_run_summary,
        _write_run_report,
        default_seqlen,
        model_dir_bytes,
        transformers_bars,
    )
    from pare.io import read_manifest
    from pare.io.load import causal_lm_config
    from pare.io.save import manifest_stages
    from pare.stream.recipe import stream_recipe

    if not args.out:
        raise ConfigError("--stream writes each pruned layer into --out as it goes: pass --out DIR (--no-save "
                          "cannot stream)")
    if args.eval or args.eval_tasks:
        raise ConfigError("--eval/--eval-tasks need the whole model in memory, which --stream avoids: evaluate the "
                          f"output afterwards with `pare eval {args.out}` (or add --max-windows to keep it short)")
    dtype = parse_dtype(args.dtype)
    source = str(args.model)
    manifest = read_manifest(source) if Path(source).is_dir() else None
    if manifest and not manifest.get("uniform", True):
        raise ConfigError(f"{source!r} was pruned with shapes its config cannot describe (pare.load replays its "
                          "edits): it cannot be streamed from its config; prune it without --stream")
    if getattr(args, "seqlen", None) is None:  # as pare prune: 2048, or the model's context when shorter
        try:
            skeleton = types.SimpleNamespace(config=causal_lm_config(source))
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"cannot read a model config from {source!r}: {exc}") from exc
        calib = dataclasses.replace(calib, seqlen=min(calib.seqlen, default_seqlen(skeleton)))  # type: ignore[arg-type]
    stages = [configs] if isinstance(configs, PruneConfig) else list(configs)
    with transformers_bars(runtime.progress):
        tokenizer = _tokenizer(source) if any(_needs_text(c) for c in stages) else None
        earlier = [Report.from_dict(r) for r in manifest_stages(manifest)]
        reports, out = stream_recipe(source, stages, args.out, calib, tokenizer or _tokenizer(source, required=False),
                                     runtime, stream, dtype=dtype, batch_size=calib.batch_size,
                                     overwrite=bool(args.overwrite), arch_override=_arch_override(args.arch_override),
                                     earlier=earlier, figures={"size_on_disk_bytes_before": model_dir_bytes(source)})
    said = _write_run_report(out) if args.report else []
    if args.json:
        shown = reports[0].to_dict() if len(reports) == 1 else {"stages": [r.to_dict() for r in reports]}
        print(json.dumps(shown, indent=2, default=str))
    else:
        _print_run_summary(reports, args)
    for line in said:
        print(line)
    return 0


def _needs_text(config: PruneConfig) -> bool:
    from pare.config import stage_for_config

    return stage_for_config(config)(config).needs() != "nothing"


def _tokenizer(source: str, required: bool = True):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        if not required:
            return None
        raise ConfigError(f"{source!r} has no tokenizer to build calibration windows from: {exc}") from exc
