"""``pare recover DIR --out DIR2 --method lora|full|distill ...``: train a pruned model a little.

The recovery stage (:mod:`pare.methods.recover`) run on a saved model as ``pare prune`` runs a
method: the model loaded (``pare.load`` shapes), the stage checked before any long work, perplexity /
zero-shot figures before and after when asked, and the result saved with the earlier prunes'
reports kept in the manifest. Checkpoints go to ``DIR2.recover-ckpt`` unless ``--checkpoint-dir``
says otherwise; ``--resume`` continues a killed run from there, and a finished run removes them.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from pare.cli.options import add_config_options, build_config, positive_int
from pare.config import CalibrationConfig, RuntimeConfig
from pare.errors import ConfigError


def token_count(text: str) -> int:
    """``2M``, ``500k``, ``0.5M``, ``2e6`` or ``2000000`` as a number of tokens (an argparse type)."""
    from pare.recovery.data import parse_token_count

    try:
        return parse_token_count(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_recover_parser(sub: argparse._SubParsersAction) -> None:
    from pare.methods.recover import MODES, RecoverConfig

    p = sub.add_parser("recover", help="recover a pruned model with LoRA, full fine-tuning or distillation",
                       description="Train a pruned model a little (LoRA merged, full fine-tuning or distillation "
                                   "from the unpruned model), keeping its shapes and zeros, and save it.",
                       allow_abbrev=False)
    p.add_argument("model", help="directory written by pare prune (or any model directory / hub id)")
    p.add_argument("--out", default=None, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing --out")
    p.add_argument("--method", dest="mode", choices=MODES, default=None, help="what to train (default lora)")
    p.add_argument("--tokens", type=token_count, default=None, help="training tokens: 2000000, 2e6, 500K, 2M")
    p.add_argument("--device", default=None, help="compute device (cpu, cuda, cuda:1...)")
    p.add_argument("--dtype", default=None, help="load dtype (auto, float32, bfloat16, float16)")
    p.add_argument("--eval", default=None, help="perplexity before and after on this set (e.g. wikitext2)")
    p.add_argument("--eval-seqlen", type=positive_int, default=None, help="evaluation window")
    p.add_argument("--eval-max-windows", type=positive_int, default=None, help="score at most this many windows")
    p.add_argument("--eval-tasks", default=None, help="zero-shot tasks before and after (e.g. piqa,arc_easy)")
    p.add_argument("--eval-limit", type=int, default=None, help="score only the first N documents of each task")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="show progress bars")
    p.add_argument("--json", action="store_true", default=None, help="print the report as JSON")
    p.add_argument("-v", "--verbose", action="store_true", default=None)
    taken = {"mode", "tokens"}
    add_config_options(p.add_argument_group("recovery options"), RecoverConfig, taken)


def checkpoint_dir_for(out: str) -> Path:
    """Where ``pare recover --out OUT`` keeps its checkpoints by default: beside OUT."""
    path = Path(out)
    return path.with_name(path.name + ".recover-ckpt")


def recover_cmd(args: argparse.Namespace) -> int:
    from pare.cli.commands import run_cmd
    from pare.methods.recover import RecoverConfig

    if not args.out:
        raise ConfigError("pare recover saves the recovered model: pass --out DIR")
    given = {k for k, v in vars(args).items() if v is not None}
    default_ckpt = args.checkpoint_dir is None
    if default_ckpt:
        args.checkpoint_dir = str(checkpoint_dir_for(args.out))
        given.add("checkpoint_dir")
    ckpt = Path(args.checkpoint_dir)
    if not args.resume and ckpt.exists():
        raise ConfigError(f"{ckpt} holds the checkpoint of an earlier run that did not finish: pass --resume to "
                          "continue it, or delete it to start over")
    config = build_config(RecoverConfig, {}, args, given)
    ns = argparse.Namespace(
        model=args.model, out=args.out, overwrite=bool(args.overwrite), no_save=False, dtype=args.dtype,
        arch_override=None, json=bool(args.json), eval=args.eval, eval_seqlen=args.eval_seqlen, eval_batch_size=None,
        eval_max_windows=args.eval_max_windows, speed=False, eval_tasks=args.eval_tasks, eval_limit=args.eval_limit,
        report=False, seqlen=None,
    )
    runtime = RuntimeConfig(device=args.device, progress=True if args.progress is None else args.progress)
    code = run_cmd(ns, [config], CalibrationConfig(), runtime)
    if code == 0 and ckpt.is_dir():  # the model is saved: the checkpoints have served
        shutil.rmtree(ckpt, ignore_errors=True)
    return code
