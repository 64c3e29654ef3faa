"""SliceGPT on SmolLM2-135M: WikiText-2 perplexity, zero-shot accuracy, parameters and prefill speed at
20/25/30% slicing, shared vs per-layer rotation, against pare's width and depth methods at equal
parameter counts.

Calibration: ``--nsamples`` random windows of ``--seqlen`` tokens from the WikiText-2 train text
(``PARE_DATA_DIR``), the same windows for every method. Evaluation: the first ``--eval-windows``
non-overlapping windows of ``--eval-seqlen`` tokens of the WikiText-2 test split (not the whole split:
on a shared CPU a full pass per model takes too long; the budget is in every row), and the zero-shot
tasks ``--tasks`` on their first ``--limit`` documents each (``zeroshot_mean``: mean accuracy). Width
(hidden + MLP, heads kept, ``--width-importance``) gets the pruning ratio whose parameter count is
nearest the SliceGPT model's (found with magnitude scores: shapes only); depth (``shortgpt`` /
``ppl-window``) gets ``target_params`` equal to it. Prefill: median tokens/s of ``--prompt-len`` random
tokens (2 runs after a warm-up); the machine may be shared with other jobs, so speeds are rough.

Resumable: every finished row is written to ``--cache-dir`` (one JSON file per row, keyed by the row and
every setting that changes it) and read back instead of being recomputed, so several processes can
share the rows (``--rows`` picks which kinds a process computes).

SliceGPT rows use the config's defaults (shared: unit-length tokens in the moments; per-layer: raw
moments) unless ``--unit-tokens`` / ``--no-unit-tokens`` says otherwise; per-layer keeps the head at the
full hidden size (``--no-slice-head``, the reference's ``do_slice_head=False``) unless ``--slice-head``.

    python bench/slicegpt_real.py [--slicing 0.2 0.25 0.3 --rows dense shared per-layer width shortgpt]

Prints one JSON object per row as it finishes (or is read from the cache), then a summary object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import pare  # noqa: E402
from pare.calibration.data import calibration_windows, eval_token_ids  # noqa: E402
from pare.config import RuntimeConfig  # noqa: E402
from pare.eval.perplexity import perplexity  # noqa: E402
from pare.eval.speed import measure_speed  # noqa: E402
from pare.eval.zeroshot import evaluate_tasks  # noqa: E402
from pare.methods import PplWindowConfig, ShortGPTConfig, SliceGPTConfig, WidthConfig  # noqa: E402

MODEL = Path(os.environ.get("PARE_MODELS_DIR", Path.home() / ".cache/pare-models")) / "smollm2-135m"
RUNTIME = RuntimeConfig(progress=False)
ROWS = ("dense", "shared", "per-layer", "width", "shortgpt", "ppl-window")


def load() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def settings(args: argparse.Namespace, name: str = "") -> dict[str, Any]:
    """Everything a row's figures depend on (its cache key); SliceGPT's moment option only for its rows."""
    keys = ["nsamples", "seqlen", "eval_windows", "eval_seqlen", "tasks", "limit", "prompt_len", "round_to",
            "width_importance"] + (["unit_tokens", "slice_head"] if name.startswith("slicegpt") else [])
    return {k: getattr(args, k) for k in keys}


def cache_path(args: argparse.Namespace, name: str) -> Path:
    key = hashlib.sha1(json.dumps([name, settings(args, name)], sort_keys=True).encode()).hexdigest()[:12]
    return Path(args.cache_dir) / f"{name.replace(' ', '_')}-{key}.json"


def cached(args: argparse.Namespace, name: str) -> dict | None:
    path = cache_path(args, name)
    if path.exists():
        row = json.loads(path.read_text())
        print(json.dumps({**row, "from_cache": True}), flush=True)
        return row
    return None


def measure(name: str, model: torch.nn.Module, test: torch.Tensor, args: argparse.Namespace,
            extra: dict | None = None) -> dict:
    t0 = time.perf_counter()
    res = perplexity(model, test, args.eval_seqlen, progress=False, max_windows=args.eval_windows)
    speed = measure_speed(model, prompt_len=args.prompt_len, new_tokens=1, repeats=2)
    row = {"model": name, "ppl": round(res.ppl, 3), "eval_windows": res.n_windows, "eval_tokens": res.n_tokens,
           "params": params(model), "prefill_tokens_per_s": round(speed.prefill_tokens_per_s, 1), **(extra or {})}
    if args.limit:
        zs = evaluate_tasks(model, args.tokenizer, args.tasks, limit=args.limit, batch_size=16, progress=False)
        row["zeroshot_mean"] = round(zs["mean_acc"], 4)
        row["zeroshot"] = {t: round(v["acc"], 4) for t, v in zs["tasks"].items()}
    row["eval_s"] = round(time.perf_counter() - t0, 1)
    row["settings"] = settings(args, name)
    path = cache_path(args, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1))
    tmp.replace(path)
    print(json.dumps(row), flush=True)
    return row


def width_ratio_for(target: int, calib: torch.Tensor) -> float:
    """The width pruning ratio (hidden + MLP, magnitude: shapes only) whose parameter count is nearest
    ``target``, among the ratios that leave a hidden size the config accepts with its heads."""
    m = load()
    hidden, heads = m.config.hidden_size, m.config.num_attention_heads
    ratios = [1 - h / hidden for h in range(hidden - heads, 0, -heads)]  # decreasing hidden sizes

    def count(r: float) -> int:
        m = load()
        pare.prune(m, WidthConfig(pruning_ratio=r, heads=False), calib, runtime=RUNTIME)
        return params(m)

    lo, hi = 0, len(ratios) - 1  # params(ratios[lo]) > target >= params(ratios[hi]) once bracketed
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(ratios[mid]) > target:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda j: abs(count(ratios[j]) - target))
    return round(ratios[best], 6)


def slice_name(args: argparse.Namespace, rotation: str, s: float) -> str:
    """A SliceGPT row's name: its rotation, slicing and the options that differ from the defaults."""
    unit = {None: "", True: " unit", False: " raw"}[args.unit_tokens]
    head = " sliced head" if rotation == "per-layer" and args.slice_head else ""
    return f"slicegpt {rotation} {s}{unit}{head}"


def slicegpt_row(args: argparse.Namespace, s: float, rotation: str, calib: torch.Tensor,
                 test: torch.Tensor) -> dict:
    name = slice_name(args, rotation, s)
    row = cached(args, name)
    if row is not None:
        return row
    m = load()
    t0 = time.perf_counter()
    cfg = SliceGPTConfig(slicing=s, rotation=rotation, round_to=args.round_to, unit_tokens=args.unit_tokens,
                         slice_head=args.slice_head)
    rep = pare.prune(m, cfg, calib, runtime=RUNTIME)
    sc = rep.scores["slicegpt"]
    info: dict[str, Any] = {"slicing": s, "hidden": sc["hidden_after"], "prune_s": round(time.perf_counter() - t0, 1),
                            "head_tied": sc["head_tied"], "head_width": sc["head_width"],
                            "kept_energy_min": round(min(sc["kept_energy"]), 4),
                            "kept_energy_mean": round(sum(sc["kept_energy"]) / len(sc["kept_energy"]), 4)}
    if rotation == "per-layer":
        shortcuts = sum(b.numel() for n, b in m.named_buffers() if "shortcut" in n)
        info.update(shortcut_params=shortcuts, params_with_shortcuts=params(m) + shortcuts)
    return measure(name, m, test, args, info)


def baseline_rows(args: argparse.Namespace, s: float, target: int, calib: torch.Tensor,
                  test: torch.Tensor) -> list[dict]:
    rows = []
    if "width" in args.rows:
        name = f"width {args.width_importance} at params of slicegpt {s}"
        row = cached(args, name)
        if row is None:
            ratio = width_ratio_for(target, calib)
            m = load()
            t0 = time.perf_counter()
            pare.prune(m, WidthConfig(pruning_ratio=ratio, heads=False, importance=args.width_importance), calib,
                       runtime=RUNTIME)
            row = measure(name, m, test, args, {"pruning_ratio": ratio, "target_params": target,
                                                "prune_s": round(time.perf_counter() - t0, 1)})
        rows.append(row)
    for kind, cfg in (("shortgpt", ShortGPTConfig(target_params=target)),
                      ("ppl-window", PplWindowConfig(target_params=target))):
        if kind not in args.rows:
            continue
        name = f"{kind} at params of slicegpt {s}"
        row = cached(args, name)
        if row is None:
            m = load()
            t0 = time.perf_counter()
            pare.prune(m, cfg, calib, runtime=RUNTIME)
            row = measure(name, m, test, args, {"layers_removed": 30 - len(m.model.layers), "target_params": target,
                                                "prune_s": round(time.perf_counter() - t0, 1)})
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slicing", type=float, nargs="+", default=[0.2, 0.25, 0.3])
    ap.add_argument("--rows", nargs="+", default=list(ROWS[:5]), choices=ROWS, help="row kinds this process computes")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--tasks", default="piqa,arc_easy,winogrande")
    ap.add_argument("--limit", type=int, default=30, help="zero-shot documents per task (0: no zero-shot)")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--round-to", type=int, default=1, help="SliceGPT round_to (1: any size the heads allow)")
    ap.add_argument("--unit-tokens", action=argparse.BooleanOptionalAction, default=None,
                    help="SliceGPT unit_tokens (default: the config's, unit for shared, raw for per-layer)")
    ap.add_argument("--slice-head", action=argparse.BooleanOptionalAction, default=False,
                    help="per-layer SliceGPT: slice the head too (default: full head, as the reference code)")
    ap.add_argument("--width-importance", default="activation")
    ap.add_argument("--cache-dir", default=str(REPO / "bench" / "results" / "slicegpt_real"))
    args = ap.parse_args()
    if not MODEL.exists():
        sys.exit(f"{MODEL} not found: run ../shared/models/fetch-real-models first")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(MODEL)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    args.tokenizer = tok
    calib = calibration_windows(tok, "wikitext2", args.nsamples, args.seqlen, seed=0)
    test = eval_token_ids(tok, "wikitext2", split="test")
    rows: list[dict] = []
    if "dense" in args.rows:
        rows.append(cached(args, "dense") or measure("dense", load(), test, args))
    for s in args.slicing:
        for rotation in ("shared", "per-layer"):
            if rotation in args.rows:
                rows.append(slicegpt_row(args, s, rotation, calib, test))
        if {"width", "shortgpt", "ppl-window"} & set(args.rows):
            # equal parameters to the shared variant (the per-layer one has the same weights plus its shortcuts)
            shared = cached(args, slice_name(args, "shared", s))
            if shared is None:
                print(json.dumps({"skipped": f"baselines at {s}: the shared row is not computed yet"}), flush=True)
                continue
            rows += baseline_rows(args, s, shared["params"], calib, test)
    print(json.dumps({"summary": rows, **settings(args), "unit_tokens": args.unit_tokens, "slice_head": args.slice_head,
                      "torch_threads": torch.get_num_threads()}, default=str))


if __name__ == "__main__":
    main()
