"""Every method family on a real 135M model, in one table (issue 13's real-model table).

Runs dense SmolLM2-135M and each configuration below on it, each in a fresh subprocess (so peak RSS
and time are the configuration's own), and writes one JSON per configuration (resumable: finished
ones are skipped) plus the table as ``table.json`` and ``table.md``:

    WikiText-2 test PPL (windows of 2048 tokens, the papers' protocol: non-overlapping windows of
    the "\\n\\n"-joined test split), the mean zero-shot accuracy over the seven tasks of the pruning
    papers, parameters, bytes on disk (saved in the checkpoint's dtype, bf16), prefill and decode
    tokens/s, prune seconds and peak RSS during the prune.

Speed is a paired measurement: on a shared machine a figure taken minutes apart from another is not
comparable with it, so each worker loads the dense model beside its pruned one and times the two in
alternating rounds (order swapped every round), and reports the median over rounds of pruned / dense
tokens/s (and the absolute medians). The dense row pairs dense with a second copy of itself: its
ratios show how much the measurement wanders.

Every pruned model is saved, reloaded from disk and evaluated as reloaded, so the figures are those
of the artifact a user would ship. This machine is small: ``--ppl-windows`` scores only the first
windows of WikiText-2 and ``--task-limit`` the first items of each task; the table's header states
the budget. A second run with a larger ``--task-limit`` (or tasks once zero-shot exists) adds what
is missing without pruning again.

    python bench/real_model_table.py --ppl-windows 4 --task-limit 50 --speed-rounds 7
    pare report bench/results/real_model_table/*/model --html real.html   # the compression curve
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODEL = Path(os.environ.get("PARE_MODELS_DIR", Path.home() / ".cache" / "pare-models")) / "smollm2-135m"
OUT = REPO / "bench" / "results" / "real_model_table"
TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "openbookqa")


def configurations() -> dict[str, tuple[str, str, Callable[[], Any]]]:
    """name -> (family, what it removes, config factory), most telling first (a short budget runs those)."""
    import pare.methods as m

    return {
        "dense": ("dense", "-", lambda: None),
        "wanda-50%": ("unstructured", "50% of linear weights", lambda: m.WandaConfig(sparsity=0.5)),
        "sparsegpt-50%": ("unstructured", "50% of linear weights", lambda: m.SparseGPTConfig(sparsity=0.5)),
        "wanda-2:4": ("N:M", "2 of every 4 weights", lambda: m.WandaConfig(sparsity=0.5, pattern="2:4")),
        "sparsegpt-2:4": ("N:M", "2 of every 4 weights", lambda: m.SparseGPTConfig(sparsity=0.5, pattern="2:4")),
        "osscar-mlp35%": ("structured MLP", "35% of MLP channels", lambda: m.OsscarConfig(mlp_ratio=0.35)),
        # 576 * (1 - 0.15625) = 486 = 9 * 54: Llama's config needs the hidden size a multiple of the 9 heads
        "width-16%": ("structured width", "15.6% of hidden size and MLP channels",
                      lambda: m.WidthConfig(pruning_ratio=0.15625, importance="activation", heads=False)),
        "shortgpt-3": ("depth", "3 of 30 layers", lambda: m.ShortGPTConfig(num_layers=3)),
        "angular-3": ("depth", "3 of 30 layers", lambda: m.AngularConfig(num_layers=3)),
        "ppl-window-3": ("depth", "3 of 30 layers", lambda: m.PplWindowConfig(num_layers=3)),
        "sublayer-6": ("sub-layer", "6 attention/MLP blocks", lambda: m.SublayerConfig(num_sublayers=6)),
        "osscar-mlp50%": ("structured MLP", "50% of MLP channels", lambda: m.OsscarConfig(mlp_ratio=0.5)),
        "width-22%": ("structured width", "21.9% of hidden size and MLP channels",  # hidden 450 = 9 * 50
                      lambda: m.WidthConfig(pruning_ratio=0.21875, importance="activation", heads=False)),
        "shortgpt-6": ("depth", "6 of 30 layers", lambda: m.ShortGPTConfig(num_layers=6)),
        "ppl-window-6": ("depth", "6 of 30 layers", lambda: m.PplWindowConfig(num_layers=6)),
        "angular-6": ("depth", "6 of 30 layers", lambda: m.AngularConfig(num_layers=6)),
    }


def _load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def _zeroshot(model, tok, args: argparse.Namespace) -> dict[str, Any] | None:
    """Mean accuracy over the seven tasks, or None when pare has no zero-shot evaluation yet."""
    try:
        from pare.eval.zeroshot import evaluate_tasks  # type: ignore[import-not-found]
    except ImportError:
        return None
    return evaluate_tasks(model, tok, list(TASKS), limit=args.task_limit, batch_size=16, progress=False)


def _prune_and_save(name: str, args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """Prune the dense checkpoint with ``name``'s config and save it (bf16, the checkpoint's dtype)."""
    import torch

    import pare

    config = configurations()[name][2]()
    model, tok = pare.load_model(str(args.model), dtype=torch.float32)
    calib = pare.CalibrationConfig(dataset="c4", nsamples=args.calib_samples, seqlen=args.calib_seqlen, seed=0,
                                   batch_size=4)
    report = pare.prune(model, config, calib, tokenizer=tok, runtime=pare.RuntimeConfig(progress=False))
    model.to(torch.bfloat16)
    pare.save(model, tok, model_dir, report, overwrite=True)
    return {"prune_seconds": report.prune_seconds, "peak_rss_mb": report.peak_rss_mb,
            "removed": report.scores.get("removed_layers") or report.scores.get("removed")}


def worker(name: str, args: argparse.Namespace) -> None:
    """Prune (once), then fill in whatever this configuration's JSON still lacks."""
    import torch

    import pare
    from pare.cli.commands import model_dir_bytes
    from pare.io.load import read_manifest
    from pare.io.save import MANIFEST

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    run_dir = args.out / name.replace(":", "-").replace("%", "pct")
    run_dir.mkdir(parents=True, exist_ok=True)
    result_path = run_dir / "result.json"
    result = _load_json(result_path)
    family, removes, _ = configurations()[name]
    result.update({"name": name, "family": family, "removes": removes})
    model_dir = run_dir / "model"
    if name != "dense" and not (model_dir / MANIFEST).is_file():
        result.update(_prune_and_save(name, args, model_dir))
        result.pop("ppl", None)  # a new prune: the old measurements are stale
        result.pop("zeroshot", None)
        result.pop("speed_rounds", None)
        _write_json(result_path, result)
    source = args.model if name == "dense" else model_dir
    if name == "dense":
        model, tok = pare.load_model(str(source), dtype=torch.float32)
    else:
        from transformers import AutoTokenizer

        model, tok = pare.load(source, dtype=torch.float32), AutoTokenizer.from_pretrained(source)
    result["size_on_disk_bytes"] = model_dir_bytes(source)
    if result.get("ppl") is None or result.get("ppl_windows") != args.ppl_windows:
        res = pare.evaluate(model, tok, dataset="wikitext2", seqlen=2048, batch_size=1,
                            max_windows=args.ppl_windows, speed=False, progress=False)
        result.update({k: res[k] for k in ("ppl", "n_tokens", "params", "nonzero_params")})
        result["ppl_windows"] = args.ppl_windows
        _write_json(result_path, result)
    if args.task_limit and (result.get("zeroshot") is None or result.get("task_limit") != args.task_limit):
        zs = _zeroshot(model, tok, args)
        if zs is not None:
            result.update({"zeroshot": zs["tasks"], "zeroshot_mean": zs["mean_acc"], "task_limit": args.task_limit})
            _write_json(result_path, result)
    if args.speed_rounds and result.get("speed_rounds") != args.speed_rounds:
        dense_model = pare.load_model(str(args.model), dtype=torch.float32)[0]
        for key in [k for k in result if k.startswith(("prefill_", "decode_", "dense_"))]:
            del result[key]  # figures of an earlier measurement, some under names no longer written
        result.update(paired_speed(model, dense_model, args.speed_rounds))
        del dense_model
        _write_json(result_path, result)
    manifest = read_manifest(model_dir) if name != "dense" else None
    if manifest is not None:  # the measurements go into the manifest so `pare report` can plot them
        dense = _load_json(args.out / "dense" / "result.json")
        # the dense speed timed beside this model, not the dense row's own (another time, another load)
        dense.update({k: result[f"dense_{k}"] for k in ("prefill_tokens_per_s", "decode_tokens_per_s")
                      if result.get(f"dense_{k}") is not None})
        for entry in [manifest, *manifest.get("history", [])[-1:]]:
            for key, dst in (("ppl", "ppl"), ("params", "params"), ("size_on_disk_bytes", "size_on_disk_bytes"),
                             ("prefill_tokens_per_s", "prefill_tokens_per_s"),
                             ("decode_tokens_per_s", "decode_tokens_per_s"), ("zeroshot", "zeroshot"),
                             ("zeroshot_mean", "zeroshot_mean")):
                if result.get(key) is not None:
                    entry["figures"][f"{dst}_after"] = result[key]
                if dense.get(key) is not None:
                    entry["figures"][f"{dst}_before"] = dense[key]
            entry["figures"]["dataset_before"] = entry["figures"]["dataset_after"] = "wikitext2"
        (model_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str), encoding="utf-8")


def paired_speed(model: Any, dense: Any, rounds: int) -> dict[str, Any]:
    """``model``'s prefill and decode tokens/s beside ``dense``'s, timed in alternating rounds in this process."""
    from pare.eval.speed import compare_speed

    sp = compare_speed(model, dense, rounds=rounds, prompt_len=128, new_tokens=32)
    return {"speed_rounds": rounds,
            "speed": f"paired with dense in one process: median of {rounds} alternating rounds of pruned / dense "
                     f"(prompt {sp.prompt_len} tokens, {sp.new_tokens} decode steps, batch 1, fp32)",
            **{f"{phase}_{k}": getattr(sp, f"{phase}_{k}") for phase in ("prefill", "decode")
               for k in ("ratio", "ratio_iqr", "tokens_per_s")},
            **{f"dense_{phase}_tokens_per_s": getattr(sp, f"reference_{phase}_tokens_per_s")
               for phase in ("prefill", "decode")}}


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(row: dict[str, Any], phase: str) -> str:
    """``1.11 (1.05-1.16)``: the median ratio to dense and the interquartile range of the rounds' ratios."""
    ratio, iqr = row.get(f"{phase}_ratio"), row.get(f"{phase}_ratio_iqr")
    if ratio is None:
        return "-"
    return f"{ratio:.2f}" + (f" ({iqr[0]:.2f}-{iqr[1]:.2f})" if iqr else "")


def write_table(args: argparse.Namespace, names: list[str], started: float) -> None:
    rows = [r for r in (_load_json(args.out / n.replace(":", "-").replace("%", "pct") / "result.json")
                        for n in names) if r.get("ppl") is not None]
    header = {
        "model": "SmolLM2-135M (../shared fetch-real-models: the dequantized Q4_1 checkpoint, bf16)",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores shared with other jobs, "
                   f"{args.threads} torch thread(s)",
        "budget": {"ppl": f"WikiText-2 test, first {args.ppl_windows} windows of 2048 tokens",
                   "zeroshot": f"first {args.task_limit} items of each of {', '.join(TASKS)}"
                   if args.task_limit else "not run",
                   "calibration": f"{args.calib_samples} windows of {args.calib_seqlen} C4 tokens",
                   "speed": next((r["speed"] for r in rows if r.get("speed")), "not measured")},
        "wall_seconds_this_run": round(time.time() - started, 1),
    }
    _write_json(args.out / "table.json", {"header": header, "rows": rows})
    lines = [
        f"SmolLM2-135M, {header['date']}, {header['machine']}. Budget: PPL on {header['budget']['ppl']}; "
        f"zero-shot: {header['budget']['zeroshot']}; calibration: {header['budget']['calibration']}; "
        f"tokens/s: {header['budget']['speed']}.",
        "",
        "| config | family | removes | WikiText-2 PPL | zero-shot mean acc | params | non-zero | bytes on disk "
        "| prefill x dense (IQR) | decode x dense (IQR) | prefill tok/s | decode tok/s | prune s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    dense_params = next((r.get("params") for r in rows if r["name"] == "dense"), None)
    for r in rows:
        removes = r["removes"] + (f" ({', '.join(map(str, r['removed']))})" if isinstance(r.get("removed"), list)
                                  and all(isinstance(i, int) for i in r["removed"]) else "")
        params = _fmt(r.get("params"), ",")
        if dense_params and r.get("params") is not None and r["name"] != "dense":
            params += f" ({r['params'] / dense_params - 1:+.1%})"
        lines.append(
            f"| {r['name']} | {r['family']} | {removes} | {_fmt(r.get('ppl'), '.2f')} | "
            f"{_fmt(r.get('zeroshot_mean'), '.3f')} | {params} | "
            f"{_fmt(r.get('nonzero_params'), ',')} | {_fmt(r.get('size_on_disk_bytes'), ',')} | "
            f"{_ratio(r, 'prefill')} | {_ratio(r, 'decode')} | "
            f"{_fmt(r.get('prefill_tokens_per_s'), ',.0f')} | {_fmt(r.get('decode_tokens_per_s'), ',.1f')} | "
            f"{_fmt(r.get('prune_seconds'), '.0f')} | {_fmt(r.get('peak_rss_mb'), ',.0f')} |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--ppl-windows", type=int, default=4, help="WikiText-2 windows of 2048 tokens scored")
    parser.add_argument("--task-limit", type=int, default=0, help="items per zero-shot task (0: no zero-shot)")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--only", default="", help="comma-separated configuration names, run in this order "
                        "(default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="configurations run at once (each its own process)")
    parser.add_argument("--table-only", action="store_true", help="only rewrite the table from the JSONs")
    parser.add_argument("--speed-rounds", type=int, default=7,
                        help="rounds of the paired dense / pruned speed measurement (0: no speed); a "
                        "configuration measured with another number of rounds is measured again")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args)
        return
    if not (args.model / "config.json").is_file():
        sys.exit(f"{args.model} not found: run ../shared/models/fetch-real-models first")
    names = list(configurations())
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            sys.exit(f"unknown configuration(s) {unknown}; choose from {names}")
        names = ["dense", *[n for n in wanted if n != "dense"]]  # in the order given
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        passthrough = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                       ("model", "out", "ppl_windows", "task_limit", "calib_samples", "calib_seqlen", "threads",
                        "speed_rounds")]
        def run(name: str) -> None:
            t0 = time.time()
            proc = subprocess.run([sys.executable, __file__, "--worker", name, *passthrough], check=False)
            print(json.dumps({"config": name, "rc": proc.returncode, "seconds": round(time.time() - t0, 1)}),
                  flush=True)

        run(names[0])  # dense first: the others record its figures as their "before"
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            list(pool.map(run, names[1:]))
    write_table(args, names, started)


if __name__ == "__main__":
    main()
