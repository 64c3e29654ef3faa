"""Compare pare's batched perplexity with a plain one-window-at-a-time transformers loop.

Both score the same non-overlapping windows of the same text; the reference is
``exp(mean over windows of model(window, labels=window).loss)``. Prints one JSON object.

    python bench/eval_speed.py                       # stories260K on TinyStories validation
    python bench/eval_speed.py --model gpt2 --dataset wikitext2 --split test --seqlen 1024
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
try:
    import pare  # noqa: F401 - installed (pip install -e .)
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(REPO / "src"))

from pare.calibration.data import eval_token_ids  # noqa: E402
from pare.eval.memory import peak_rss_mb  # noqa: E402
from pare.eval.perplexity import perplexity  # noqa: E402

DEFAULT_MODEL = "stories260K"
T = TypeVar("T")


def resolve_model(model: str) -> str:
    """A path as given; the bare default name found in ../shared/models beside the cwd or the repo."""
    if model != DEFAULT_MODEL or Path(model).exists():
        return model
    for base in (Path.cwd().parent, REPO.parent):
        candidate = base / "shared" / "models" / model
        if candidate.is_dir():
            return str(candidate)
    return model


def reference_loop(model: torch.nn.Module, ids: torch.Tensor, seqlen: int, n_windows: int) -> float:
    """The plain transformers loop, one window per forward pass."""
    device = next(model.parameters()).device
    losses = []
    with torch.inference_mode():
        for i in range(n_windows):
            window = ids[:, i * seqlen : (i + 1) * seqlen].to(device)
            losses.append(model(window, labels=window).loss.float())
    return math.exp(torch.stack(losses).mean().item())


def timed(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    """``fn(*args, **kwargs)`` and its wall time in seconds (CUDA synchronised)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a model path or hub id")
    parser.add_argument("--dataset", default="tinystories", help="a named set or a data file")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed runs; the best is kept")
    args = parser.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = resolve_model(args.model)
    model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = eval_token_ids(tokenizer, args.dataset, args.split)
    n_windows = ids.shape[1] // args.seqlen
    if args.max_windows is not None:
        n_windows = min(n_windows, args.max_windows)

    # warm both paths up once (allocator, kernel choice) so neither pays first-call costs
    reference_loop(model, ids, args.seqlen, 1)
    perplexity(model, ids, args.seqlen, batch_size=args.batch_size, progress=False, max_windows=1)

    # interleave the two and keep each one's best time: on a shared machine the slow runs measure
    # the neighbours, not the code
    ref_times, pare_times = [], []
    for _ in range(args.repeats):
        ref_ppl, seconds = timed(reference_loop, model, ids, args.seqlen, n_windows)
        ref_times.append(seconds)
        result, seconds = timed(
            perplexity, model, ids, args.seqlen, batch_size=args.batch_size, progress=False,
            max_windows=n_windows, dataset=args.dataset,
        )
        pare_times.append(seconds)
    ref_s, pare_s = min(ref_times), min(pare_times)
    report = {
        "model": str(path),
        "dataset": f"{args.dataset} ({args.split})",
        "device": device,
        "seqlen": args.seqlen,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "n_tokens": int(ids.shape[1]),
        "n_windows": n_windows,
        "pare": {"ppl": result.ppl, "seconds": round(pare_s, 4), "tokens_per_s": round(result.n_tokens / pare_s, 1)},
        "reference": {"ppl": ref_ppl, "seconds": round(ref_s, 4), "tokens_per_s": round(result.n_tokens / ref_s, 1)},
        "ppl_abs_diff": abs(result.ppl - ref_ppl),
        "speed_ratio": round(ref_s / pare_s, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
