"""``pare study``: a grid of pruning x quantization mixtures, each point evaluated and its bytes counted.

    pare study --model M --prune "none; sparsegpt:0.5; sparsegpt:2:4" --quant "none; int4-g128; mxfp4" \\
               --order prune-first,quant-first,joint --eval wikitext2 --tasks piqa,arc_easy --out studies/x
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from pare.cli.options import positive_int
from pare.errors import ConfigError
from pare.study.grid import ORDERS, PRUNE_EXAMPLES, QUANT_EXAMPLES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="a grid of pruning x quantization mixtures: quality against bytes (resumable)",
                       description="Run every mixture of the pruning and quantization specs (in each order), "
                                   "evaluate each point and count its storage; one JSON file per point in "
                                   "--out/points, so a re-run skips finished points.", allow_abbrev=False)
    p.add_argument("--model", required=True, help="hub id or local directory")
    p.add_argument("--prune", default="none", help=f"';'-separated pruning specs, e.g. \"{PRUNE_EXAMPLES}\"")
    p.add_argument("--quant", default="none", help=f"';'-separated quantization specs, e.g. \"{QUANT_EXAMPLES}\"")
    p.add_argument("--order", default="prune-first,quant-first",
                   help=f"comma-separated orders of each pruning x quantization pair: {', '.join(ORDERS)} "
                        "(joint: SparseGPT's one pass, sparsegpt specs only)")
    p.add_argument("--out", required=True, help="study directory (created; a re-run resumes it)")
    p.add_argument("--eval", default="wikitext2", help="perplexity data set ('none' to skip)")
    p.add_argument("--eval-seqlen", type=positive_int, default=None,
                   help="perplexity window (default: 2048 or the model's context)")
    p.add_argument("--eval-max-windows", type=positive_int, default=None, help="score at most this many windows")
    p.add_argument("--tasks", default=None, help="zero-shot tasks, comma-separated (e.g. piqa,arc_easy,winogrande)")
    p.add_argument("--limit", type=positive_int, default=None, help="score only the first N documents of each task")
    p.add_argument("--calib", default="c4", help="calibration data set (shared by every point)")
    p.add_argument("--nsamples", type=positive_int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=positive_int, default=None,
                   help="tokens per calibration window (default: 2048 or the model's context)")
    p.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration window positions")
    p.add_argument("--batch-size", type=positive_int, default=8, help="calibration windows per forward")
    p.add_argument("--dtype", default="float32", help="dtype the points are computed in (default float32)")
    p.add_argument("--value-bits", type=positive_int, default=16,
                   help="bits per stored unquantized value in the byte account (16: bf16)")
    p.add_argument("--executor", default="local", choices=("local", "ray"),
                   help="local: points one after another; ray: one Ray task per point (pip install 'pare[ray]')")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: a local Ray instance)")
    p.add_argument("--cpus-per-point", type=float, default=1.0, help="ray: CPUs each point's task requests")
    p.add_argument("--gpus-per-point", type=float, default=0.0, help="ray: GPUs each point's task requests")
    p.add_argument("--device", default=None, help="local: compute device (default: cuda if available)")
    p.add_argument("--dry-run", action="store_true", help="list the points (and which are done) and stop")
    p.add_argument("--report", action="store_true", help="write report.html and report.md into --out at the end")
    p.add_argument("--json", action="store_true", help="print the finished points as JSON")
    p.add_argument("-v", "--verbose", action="store_true")


def _settings(args: argparse.Namespace):
    from pare.config import CalibrationConfig
    from pare.io.load import meta_model
    from pare.study.point import StudySettings

    context = None
    try:
        from pare.eval.perplexity import model_context_length

        context = model_context_length(meta_model(args.model))
    except (OSError, ValueError):
        context = None
    default = min(2048, context or 2048)
    seqlen = args.seqlen or default
    eval_seqlen = args.eval_seqlen or default
    for flag, value in (("--seqlen", seqlen), ("--eval-seqlen", eval_seqlen)):
        if context is not None and value > context:
            raise ConfigError(f"{flag} {value} is longer than the model's context of {context} tokens")
    calib = CalibrationConfig(dataset=args.calib, nsamples=args.nsamples, seqlen=seqlen, seed=args.calib_seed,
                              batch_size=args.batch_size)
    if args.tasks:
        from pare.eval.zeroshot import resolve_tasks

        resolve_tasks(args.tasks)
    return StudySettings(model=args.model, dtype=args.dtype, calibration=calib.to_dict(),
                         eval=None if args.eval in ("", "none") else args.eval, eval_seqlen=eval_seqlen,
                         eval_max_windows=args.eval_max_windows, tasks=args.tasks or None, limit=args.limit,
                         value_bits=args.value_bits)


def study_cmd(args: argparse.Namespace) -> int:
    from pare.cli.commands import print_table
    from pare.study.grid import build_grid
    from pare.study.run import Study

    points = build_grid(args.prune, args.quant, args.order)  # spec errors before the model is read
    if args.executor == "local" and (args.ray_address or args.gpus_per_point):
        raise ConfigError("--ray-address and --gpus-per-point apply to --executor ray")
    settings = _settings(args)
    study = Study(args.out, settings, points)
    if args.dry_run:
        print_table([(p.id, p.prune, p.quant, p.order, "yes" if study.done(p) else "no") for p in points],
                    ("point", "prune", "quant", "order", "done"))
        return 0
    todo = study.pending()
    print(f"{len(points)} points, {len(points) - len(todo)} already done in {args.out}; running {len(todo)}",
          flush=True)

    def said(point: Any, res: dict[str, Any]) -> None:
        ppl = "-" if res.get("ppl") is None else f"{res['ppl']:.3f}"
        acc = "-" if res.get("zeroshot_mean") is None else f"{res['zeroshot_mean']:.4f}"
        print(f"done {point.id}: ppl {ppl}, zero-shot {acc}, {res['bits_per_param']:.3f} bits/param, "
              f"{res['bytes']:,} bytes, {res['seconds']:.0f}s", flush=True)

    from pare.cli.commands import transformers_bars

    with transformers_bars(False):
        study.run(args.executor, ray_address=args.ray_address, cpus=args.cpus_per_point, gpus=args.gpus_per_point,
                  device=args.device, on_result=said)
    if args.json:
        from pare.study.run import read_study

        print(json.dumps(read_study(args.out)[1], indent=1, default=str))
    if args.report:
        from pare.study.report import write_study_report

        written = write_study_report(args.out)
        print(f"report: {written[0]} and {written[1]}")
    return 0
