"""The ``pare`` command: ``inspect``, ``prune``, ``quantize``, ``run`` (a recipe), ``eval``, ``report``, ``methods``.

``pare quantize ... --method rtn|gptq`` is ``pare prune --method quantize --algorithm rtn|gptq ...``.

Method options are generated from the method config dataclasses (``--sparsity``, ``--pattern``...),
so every config field is a flag and a YAML/JSON config key at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Any

from pare.cli.options import add_config_options, build_config, given_dests, option_label, positive_int
from pare.config import CalibrationConfig, RuntimeConfig, checked_value, read_config_file
from pare.errors import ConfigError, PareError, SaveInterrupted
from pare.stream.config import StreamConfig

log = logging.getLogger("pare")

TOP_KINDS: dict[str, type] = {"model": str, "method": str, "out": str, "overwrite": bool, "no_save": bool,
                              "eval": str, "speed": bool,
                              "eval_seqlen": int, "eval_batch_size": int, "eval_max_windows": int,
                              "eval_tasks": str, "eval_limit": int,
                              "arch_override": str, "dtype": str, "verbose": bool, "json": bool, "report": bool,
                              "component": str, "images": str}
"""The options that are not config fields, with their types when they come from a config file."""
COMMON = set(TOP_KINDS) | {"config"}
ARCH_OVERRIDE_HELP = "YAML/JSON ArchOverride for unknown architectures"
COMPONENT_HELP = "text (the decoder, default) or vision (a vision-language model's vision tower)"
IMAGES_HELP = ("--component vision: a safetensors file whose 'pixel_values' [N, C, H, W] come from the model's image "
               "processor (default: --nsamples random normalised images)")


def prune_methods() -> dict[str, Any]:
    """The registered methods ``pare prune --method`` runs (not the ones with a command or recipe of their own)."""
    from pare.methods import METHODS

    return {name: cls for name, cls in METHODS.items() if not cls.runs_elsewhere}


def _prune_parser(sub: argparse._SubParsersAction, methods: dict[str, Any] | None = None,
                  name: str = "prune") -> argparse.ArgumentParser:
    """The ``prune`` parser with every method's options, or (for a focused ``--help``) only ``methods``'."""
    every = methods is None
    methods = prune_methods() if methods is None else methods
    if name == "quantize":
        p = sub.add_parser(name, allow_abbrev=False,
                           description="Quantize weights and save (the same as pare prune --method quantize).")
        p.add_argument("--method", dest="algorithm", help="rtn or gptq (the same as --algorithm)")
    else:
        only = "" if every else f" Options of {', '.join(methods)} only (`pare prune --help` lists every method's)."
        p = sub.add_parser(name, help="prune a model and save it", description="Prune a model and save it." + only,
                           allow_abbrev=False)
    p.add_argument("--model", help="hub id or local directory")
    if name != "quantize":
        p.add_argument("--method", help=f"one of {', '.join(sorted(prune_methods()))}")
    p.add_argument("--out", "--save_model", dest="out", help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace an existing --out (only a directory that holds a saved model)")
    p.add_argument("--no-save", action="store_true", default=None,
                   help="prune (and evaluate) without saving; needed when no --out is given")
    p.add_argument("--config", help="YAML or JSON file with any of these options")
    p.add_argument("--eval", default=None, help="evaluate perplexity before and after on this set (e.g. wikitext2)")
    p.add_argument("--eval-seqlen", type=positive_int, default=None, help="evaluation window (default: --seqlen)")
    p.add_argument("--eval-batch-size", type=positive_int, default=None, help="windows per forward in evaluation")
    p.add_argument("--eval-max-windows", type=positive_int, default=None, help="score at most this many windows")
    p.add_argument("--eval-tasks", default=None,
                   help="zero-shot tasks scored before and after, as lm-evaluation-harness does (e.g. piqa,arc_easy)")
    p.add_argument("--eval-limit", type=int, default=None, help="score only the first N documents of each task")
    p.add_argument("--speed", action=argparse.BooleanOptionalAction, default=None,
                   help="with --eval, also measure prefill/decode tokens/s (default: yes)")
    p.add_argument("--arch-override", default=None, help=ARCH_OVERRIDE_HELP)
    p.add_argument("--component", default=None, choices=("text", "vision"), help=COMPONENT_HELP)
    p.add_argument("--images", default=None, help=IMAGES_HELP)
    p.add_argument("--dtype", default=None, help="load dtype (auto, float32, bfloat16, float16)")
    p.add_argument("--json", action="store_true", default=None, help="print the report as JSON")
    p.add_argument("--report", action="store_true", default=None,
                   help="also write report.html (plots) and report.md into --out once the model is saved")
    p.add_argument("-v", "--verbose", action="store_true", default=None)
    taken = set(COMMON)
    calib = p.add_argument_group("calibration")
    calib_help = CalibrationConfig.__dataclass_fields__["dataset"].metadata["help"]
    calib.add_argument("--calib", dest="dataset", default=None, help=calib_help)
    taken.add("dataset")
    calib.add_argument("--max_seq_len", dest="seqlen", type=positive_int, default=None, help="alias of --seqlen")
    add_config_options(calib, CalibrationConfig, taken)
    add_config_options(p.add_argument_group("runtime"), RuntimeConfig, taken)
    add_config_options(p.add_argument_group("streaming (models larger than memory)"), StreamConfig, taken)
    title = ("method options (each applies to the methods that define it)" if every
             else f"options of {', '.join(methods)}")
    group = p.add_argument_group(title)
    if name == "quantize":
        taken.add("algorithm")
    for cls in methods.values():
        add_config_options(group, cls.config_class, taken)
    return p


def focused_help(argv: list[str]) -> str | None:
    """The help of ``pare quantize --help`` and ``pare prune --method M --help``: the common options and
    that method's only (``pare prune --help`` without a method lists every method's); None for any other
    command line, or a method pare does not know (argparse then prints the full help or the error)."""
    if argv[:1] not in (["prune"], ["quantize"]) or not {"-h", "--help"} & set(argv):
        return None
    if argv[0] == "quantize":
        method: str | None = "quantize"
    else:
        method = next((a.split("=", 1)[1] for a in argv if a.startswith("--method=")), None)
        if method is None and "--method" in argv[:-1]:
            method = argv[argv.index("--method") + 1]
    methods = prune_methods()
    if method not in methods:
        return None
    top = argparse.ArgumentParser(prog="pare", allow_abbrev=False)
    return _prune_parser(top.add_subparsers(), {method: methods[method]}, name=argv[0]).format_help()


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity, parameters, size on disk and tokens/s of a model",
                       allow_abbrev=False)
    p.add_argument("model", help="directory written by pare prune, any local model, or a hub id")
    p.add_argument("--ppl", default=None,
                   help="data set for perplexity ('none' to skip; default wikitext2, or none with --tasks/--lm-eval)")
    p.add_argument("--seqlen", type=positive_int, default=None,
                   help="evaluation window in tokens (default: 2048, or the model's context if shorter)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="windows per forward in perplexity (default 1), rows per forward in tasks (default 16)")
    p.add_argument("--max-windows", type=positive_int, default=None, help="score at most this many windows")
    p.add_argument("--tasks", default=None,
                   help="zero-shot tasks scored as lm-evaluation-harness does: piqa, arc_easy, arc_challenge, "
                        "hellaswag, winogrande, boolq, openbookqa, lambada_openai, blimp or blimp_<paradigm> "
                        "(comma-separated)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N documents of each task")
    p.add_argument("--lm-eval", dest="lm_eval", default=None,
                   help="run these tasks with lm-evaluation-harness itself on the loaded model (pip install "
                        "'pare[lm-eval]')")
    p.add_argument("--speed", action=argparse.BooleanOptionalAction, default=None,
                   help="measure tokens/s (default: yes, or no with --tasks/--lm-eval)")
    p.add_argument("--device", default=None)
    p.add_argument("--device-map", dest="device_map", default=None,
                   help="place a model larger than one device over the GPUs, then the CPU, with accelerate: auto, "
                        "balanced, balanced_low_0 or sequential (not with --device)")
    p.add_argument("--json", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")


def _run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a recipe: several stages, one calibration set, one save",
                       description="Run a recipe (YAML/JSON): every stage in order on one model with one "
                                   "calibration set, evaluated after each stage, saved once.", allow_abbrev=False)
    p.add_argument("recipe", help="YAML or JSON recipe file (model, calibration, stages, eval, out)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set stages.1.num_layers=6 (repeatable; value read as YAML)")
    p.add_argument("--model", default=None, help="hub id or local directory (overrides the recipe's)")
    p.add_argument("--out", default=None, help="output directory (overrides the recipe's)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace an existing --out (only a directory that holds a saved model)")
    p.add_argument("--no-save", action="store_true", default=None,
                   help="run (and evaluate) without saving; needed when the recipe has no out")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="show progress bars")
    p.add_argument("--json", action="store_true", default=None, help="print the stage reports as JSON")
    p.add_argument("-v", "--verbose", action="store_true", default=None)
    add_config_options(p.add_argument_group("streaming (every stage with a per-layer step)"), StreamConfig, set())


def _report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="an HTML page with plots (and a markdown twin) comparing saved runs",
                       description="Read the pare.json of each output directory and write one self-contained "
                                   "HTML page (tables and plots, opens offline) and/or its markdown twin.",
                       allow_abbrev=False)
    p.add_argument("runs", nargs="+", metavar="OUT_DIR", help="directories written by pare prune --out")
    p.add_argument("--html", default=None, help="HTML file to write (default: report.html unless --md is given)")
    p.add_argument("--md", default=None, help="markdown file to write (its plots go to <name>_plots/ beside it)")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="tables only")
    p.add_argument("-v", "--verbose", action="store_true")


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The ``pare`` parser and its ``prune`` sub-parser."""
    # no abbreviations: options are matched by their full names (config-file values vs typed flags)
    parser = argparse.ArgumentParser(prog="pare", description="Prune causal LMs and prove what each cut costs.",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="the model's roles: layers, heads, MLP width, params by part",
                         allow_abbrev=False)
    ins.add_argument("model")
    ins.add_argument("--arch-override", default=None, help=ARCH_OVERRIDE_HELP)
    ins.add_argument("--component", default=None, choices=("text", "vision"), help=COMPONENT_HELP)
    ins.add_argument("--json", action="store_true")
    ins.add_argument("-v", "--verbose", action="store_true")
    sub.add_parser("methods", help="list the pruning methods and their options")
    sub.add_parser("quantize", add_help=False, prefix_chars="\0",
                   help="quantize weights and save (= prune --method quantize; --method rtn|gptq, --scheme, "
                        "--group-size...)")
    prune_parser = _prune_parser(sub)
    _run_parser(sub)
    _eval_parser(sub)
    _report_parser(sub)
    from pare.cli.export import add_parser as _export_parser
    from pare.cli.recover import add_recover_parser
    from pare.cli.study import add_parser as _study_parser

    _export_parser(sub)
    add_recover_parser(sub)
    _study_parser(sub)
    return parser, prune_parser


def _section(data: dict[str, Any], name: str, example: str) -> dict[str, Any]:
    """The mapping a config file holds under ``name`` (removed from ``data``), or a ConfigError."""
    value = data.pop(name, None)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"config file: '{name}' must be a mapping of option: value, e.g. {name}: {example}; "
                          f"got {value!r}")
    return dict(value)


def _file_sections(data: dict[str, Any]) -> tuple[dict, dict, dict, dict]:
    """Split a config file into (top-level, calibration, runtime, method options)."""
    data = dict(data)
    calib = _section(data, "calibration", "{dataset: c4, nsamples: 128} (or the data set alone: calib: c4)")
    runtime = _section(data, "runtime", "{device: cuda}")
    method_opts = _section(data, "options", "{sparsity: 0.5}")
    from pare.methods import METHODS

    method = data.get("method")
    if method in data and isinstance(data[method], dict):
        method_opts.update(data.pop(method))
    calib_names = set(CalibrationConfig.__dataclass_fields__) | {"calib"}
    runtime_names = set(RuntimeConfig.__dataclass_fields__)
    for key in list(data):
        k = key.replace("-", "_")
        if k in COMMON:
            continue
        value = data.pop(key)
        if k in calib_names:
            calib["dataset" if k == "calib" else k] = value
        elif k in runtime_names:
            runtime[k] = value
        else:
            method_opts[k] = value
    del METHODS
    return data, calib, runtime, method_opts


def quantize_argv(argv: list[str]) -> list[str]:
    """``quantize ARGS`` as ``prune --method quantize ARGS``, its ``--method rtn|gptq`` as ``--algorithm``."""
    out = ["prune", "--method", "quantize"]
    rest = argv[1:]
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--method" and i + 1 < len(rest):
            out += ["--algorithm", rest[i + 1]]
            i += 2
            continue
        out.append("--algorithm=" + arg.split("=", 1)[1] if arg.startswith("--method=") else arg)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    help_text = focused_help(argv)
    if help_text is not None:
        print(help_text, end="")
        return 0
    if argv[:1] == ["quantize"]:
        argv = quantize_argv(argv)
    parser, prune_parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        code = _dispatch(args, prune_parser, argv)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except PareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SaveInterrupted as exc:  # what is on disk depends on how far the save got
        print(f"interrupted: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted before anything was saved: nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader stopped reading (`pare methods | head`): stop quietly, as unix tools killed by SIGPIPE
        # do; stdout goes to /dev/null so the interpreter's last flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _dispatch(args: argparse.Namespace, prune_parser: argparse.ArgumentParser, argv: list[str]) -> int:
    if args.command == "methods":
        return _cmd_methods()
    if args.command == "inspect":
        from pare.cli.commands import inspect_cmd

        return inspect_cmd(args)
    if args.command == "run":
        return _cmd_run(args)
    if args.command == "report":
        from pare.cli.commands import report_cmd

        return report_cmd(args)
    if args.command == "recover":
        from pare.cli.recover import recover_cmd

        return recover_cmd(args)
    if args.command == "study":
        from pare.cli.study import study_cmd

        return study_cmd(args)
    if args.command == "eval":
        from pare.cli.commands import eval_cmd

        return eval_cmd(args)
    if args.command == "export":
        from pare.cli.export import export_cmd

        return export_cmd(args)
    return _cmd_prune(args, given_dests(prune_parser, argv))


def _first_sentence(doc: str) -> str:
    """The first sentence of a docstring's first paragraph, on one line, without rst markup."""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    end = para.find(". ")
    return (para if end < 0 else para[: end + 1]).replace("``", "")


def _cmd_methods() -> int:
    import dataclasses

    from pare.methods import METHODS

    for name, cls in sorted(METHODS.items()):
        doc = _first_sentence(sys.modules[cls.__module__].__doc__ or cls.config_class.__doc__ or "")
        print(f"{name:12s} {doc}")
        for f in dataclasses.fields(cls.config_class):
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            help_text = f.metadata.get("help", "")
            shown = "" if "(default" in help_text else f" (default {default!r})"
            print(f"    {option_label(cls.config_class, f.name):30s} {help_text}{shown}")
    return 0


def _cmd_prune(args: argparse.Namespace, given: set[str]) -> int:
    from pare.cli.commands import run_cmd
    from pare.methods import pruner_for

    file_data = read_config_file(args.config) if args.config else {}
    top, calib_vals, runtime_vals, method_vals = _file_sections(file_data)
    for key, value in top.items():
        key = key.replace("-", "_")
        if key in TOP_KINDS and getattr(args, key, None) is None:
            value = checked_value("config file", key, TOP_KINDS[key], value)
            if key.startswith("eval_") and isinstance(value, int) and value < 1:
                raise ConfigError(f"config file: {key} must be a positive integer, got {value}")
            setattr(args, key, value)
    if not args.model:
        raise ConfigError("no model: pass --model (a hub id or a local directory) or `model:` in --config")
    if not args.method:
        raise ConfigError("no method: pass --method (see `pare methods`) or `method:` in --config")
    pruner = pruner_for(args.method)
    if pruner.runs_elsewhere:
        raise ConfigError(f"method {args.method!r} is not run by `pare prune`: it runs as {pruner.runs_elsewhere}")
    method_fields = {f.name for f in dataclasses.fields(pruner.config_class)}  # not ClassVars (`method`)
    foreign = sorted(
        d for d in given
        if d not in method_fields and d not in COMMON and d not in CalibrationConfig.__dataclass_fields__
        and d not in RuntimeConfig.__dataclass_fields__ and d not in StreamConfig.__dataclass_fields__ and d != "help"
    )
    if foreign:
        raise ConfigError(
            f"option(s) {['--' + f.replace('_', '-') for f in foreign]} do not apply to method {args.method!r}; "
            f"its options are {sorted(option_label(pruner.config_class, f) for f in method_fields)}"
        )
    streamed = StreamConfig.__dataclass_fields__
    stream_vals = {k: method_vals.pop(k) for k in list(method_vals) if k.replace("-", "_") in streamed}
    stream_cfg = build_config(StreamConfig, stream_vals, args, given)
    method_cfg = build_config(pruner.config_class, method_vals, args, given)
    calib_cfg = build_config(CalibrationConfig, calib_vals, args, given)
    if args.seqlen is None and any(k.replace("-", "_") == "seqlen" for k in calib_vals):
        args.seqlen = calib_cfg.seqlen  # None: not chosen, so fit to the model's context once loaded
    runtime_cfg = build_config(RuntimeConfig, runtime_vals, args, given)
    if stream_cfg.stream:
        from pare.cli.stream import stream_cmd

        _check_streamable(args.component)
        return stream_cmd(args, method_cfg, calib_cfg, runtime_cfg, stream_cfg)
    return run_cmd(args, [method_cfg], calib_cfg, runtime_cfg)


def _check_streamable(component: str | None) -> None:
    if component == "vision":
        raise ConfigError("--stream reads decoder layers from disk; --component vision prunes in memory: drop --stream")


def _cmd_run(args: argparse.Namespace) -> int:
    """``pare run recipe.yaml``: the recipe (after ``--set``) as the same run as ``pare prune``."""
    from pare.cli.commands import run_cmd
    from pare.recipe import apply_set, parse_recipe

    data = read_config_file(args.recipe)
    for assignment in args.sets:
        apply_set(data, assignment)
    recipe = parse_recipe(data)
    model = args.model or recipe.model
    if not model:
        raise ConfigError("no model: put `model:` in the recipe or pass --model")
    runtime = recipe.runtime
    if args.progress is not None:
        runtime = RuntimeConfig.from_dict({**runtime.to_dict(), "progress": args.progress})
    top = recipe.top
    ns = argparse.Namespace(
        model=model, out=args.out or top.get("out"), overwrite=args.overwrite or top.get("overwrite", False),
        no_save=args.no_save or top.get("no_save", False),
        dtype=top.get("dtype"), arch_override=top.get("arch_override"), json=args.json or top.get("json", False),
        component=top.get("component"), images=top.get("images"),
        eval=recipe.ppl or None, eval_seqlen=recipe.eval.get("seqlen"), eval_batch_size=recipe.eval.get("batch_size"),
        eval_max_windows=recipe.eval.get("max_windows"), speed=recipe.eval.get("speed", True),
        eval_tasks=recipe.eval.get("tasks"), eval_limit=recipe.eval.get("limit"), report=top.get("report", False),
        seqlen=(data.get("calibration") or {}).get("seqlen") if isinstance(data.get("calibration"), dict) else None,
    )
    stream = StreamConfig.from_dict({k: getattr(args, k) for k in StreamConfig.__dataclass_fields__
                                     if getattr(args, k, None) is not None})
    if stream.stream:
        from pare.cli.stream import stream_cmd

        _check_streamable(ns.component)
        return stream_cmd(ns, recipe.stages, recipe.calibration, runtime, stream)
    return run_cmd(ns, recipe.stages, recipe.calibration, runtime)


if __name__ == "__main__":
    raise SystemExit(main())
