"""SliceGPT on SmolLM2-135M: WikiText-2 perplexity, parameters and prefill speed at 20/25/30% slicing,
shared vs per-layer rotation, against pare's width and depth methods at equal parameter counts.

Calibration: ``--nsamples`` random windows of ``--seqlen`` tokens from the WikiText-2 train text
(``PARE_DATA_DIR``), the same windows for every method. Evaluation: the first ``--eval-windows``
non-overlapping windows of ``--eval-seqlen`` tokens of the WikiText-2 test split (not the whole split:
on this CPU a full pass per model takes too long; the budget is in the output), and the zero-shot
tasks ``--tasks`` on their first ``--limit`` documents each (``zeroshot_mean``: mean accuracy). Width
(``importance=activation``, hidden + MLP, heads kept) is given the pruning ratio whose parameter
count is closest to the SliceGPT model's; depth (``shortgpt`` / ``ppl-window``) gets
``target_params`` equal to it. Prefill: median tokens/s of ``--prompt-len`` random tokens (2 runs after a warm-up).
The machine is shared with other jobs: speeds are noisy.

    python bench/slicegpt_real.py [--slicing 0.2 0.25 0.3 --eval-windows 8 --nsamples 8 --limit 50 --dense]

Prints one JSON object per model as it finishes, then a summary object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

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


def load() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure(name: str, model: torch.nn.Module, test: torch.Tensor, args: argparse.Namespace,
            extra: dict | None = None) -> dict:
    res = perplexity(model, test, args.eval_seqlen, progress=False, max_windows=args.eval_windows)
    speed = measure_speed(model, prompt_len=args.prompt_len, new_tokens=1, repeats=2)
    row = {"model": name, "ppl": round(res.ppl, 3), "eval_windows": res.n_windows, "eval_tokens": res.n_tokens,
           "params": params(model), "prefill_tokens_per_s": round(speed.prefill_tokens_per_s, 1), **(extra or {})}
    if args.limit:
        zs = evaluate_tasks(model, args.tokenizer, args.tasks, limit=args.limit, batch_size=16, progress=False)
        row["zeroshot_mean"] = round(zs["mean_acc"], 4)
        row["zeroshot"] = {t: round(v["acc"], 4) for t, v in zs["tasks"].items()}
    print(json.dumps(row), flush=True)
    return row


def width_ratio_for(target: int, calib: torch.Tensor) -> float:
    """The width pruning ratio (hidden + MLP, magnitude: shapes only) whose parameter count is nearest ``target``."""
    lo, hi = 0.0, 0.9
    for _ in range(7):
        mid = (lo + hi) / 2
        m = load()
        pare.prune(m, WidthConfig(pruning_ratio=mid, heads=False), calib, runtime=RUNTIME)
        if params(m) > target:
            lo = mid
        else:
            hi = mid
    return round((lo + hi) / 2, 4)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slicing", type=float, nargs="+", default=[0.2, 0.25, 0.3])
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--tasks", default="piqa,arc_easy,winogrande,hellaswag")
    ap.add_argument("--limit", type=int, default=0, help="zero-shot documents per task (0: no zero-shot)")
    ap.add_argument("--dense", action="store_true", help="also measure the dense model")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--skip", nargs="*", default=["ppl-window"], help="per-layer / width / shortgpt / ppl-window")
    args = ap.parse_args()
    if not MODEL.exists():
        sys.exit(f"{MODEL} not found: run ../shared/models/fetch-real-models first")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(MODEL)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    args.tokenizer = tok
    calib = calibration_windows(tok, "wikitext2", args.nsamples, args.seqlen, seed=0)
    test = eval_token_ids(tok, "wikitext2", split="test")
    rows = [measure("dense", load(), test, args)] if args.dense else []
    for s in args.slicing:
        m = load()
        t0 = time.perf_counter()
        rep = pare.prune(m, SliceGPTConfig(slicing=s), calib, runtime=RUNTIME)
        target = params(m)
        info = {"slicing": s, "hidden": rep.scores["slicegpt"]["hidden_after"],
                "prune_s": round(time.perf_counter() - t0, 1), "head_tied": rep.scores["slicegpt"]["head_tied"]}
        rows.append(measure(f"slicegpt shared {s}", m, test, args, info))
        if "per-layer" not in args.skip:
            m = load()
            t0 = time.perf_counter()
            rep = pare.prune(m, SliceGPTConfig(slicing=s, rotation="per-layer"), calib, runtime=RUNTIME)
            shortcuts = sum(b.numel() for n, b in m.named_buffers() if "shortcut" in n)
            rows.append(measure(f"slicegpt per-layer {s}", m, test, args,
                                {**info, "prune_s": round(time.perf_counter() - t0, 1), "shortcut_params": shortcuts,
                                 "params_with_shortcuts": params(m) + shortcuts}))
        if "width" not in args.skip:
            ratio = width_ratio_for(target, calib)
            m = load()
            cfg_w = WidthConfig(pruning_ratio=ratio, heads=False, importance="activation")
            pare.prune(m, cfg_w, calib, runtime=RUNTIME)
            rows.append(measure(f"width activation (hidden+MLP) at equal params to {s}", m, test, args,
                                {"pruning_ratio": ratio}))
        for name, cfg in (("shortgpt", ShortGPTConfig(target_params=target)),
                          ("ppl-window", PplWindowConfig(target_params=target))):
            if name in args.skip:
                continue
            m = load()
            rep = pare.prune(m, cfg, calib, runtime=RUNTIME)
            rows.append(measure(f"{name} at equal params to {s}", m, test, args,
                                {"layers_removed": 30 - len(m.model.layers)}))
    print(json.dumps({"summary": rows, "nsamples": args.nsamples, "seqlen": args.seqlen,
                      "eval_windows": args.eval_windows, "eval_seqlen": args.eval_seqlen, "tasks": args.tasks,
                      "limit": args.limit, "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
