"""`make demo`: prune a real small model with pare's default method and show what the cut costs.

Uses ../shared/models/stories260K (a real pretrained Llama with GQA, evaluated on TinyStories) when it
exists; otherwise downloads HuggingFaceTB/SmolLM2-135M from the Hub (needs internet) and evaluates
on WikiText-2.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import torch

import pare
from pare.cli.commands import model_dir_bytes, print_table
from pare.methods import DEFAULT_METHOD, METHODS

REPO = Path(__file__).resolve().parents[1]
LOCAL_MODEL = REPO.parent / "shared" / "models" / "stories260K"
HUB_MODEL = "HuggingFaceTB/SmolLM2-135M"


def _figures(model, tok, dataset: str, seqlen: int) -> dict:
    return pare.evaluate(model, tok, dataset=dataset, seqlen=seqlen, batch_size=8, speed=True, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(METHODS))
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--out", default=str(REPO / "out" / "demo"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    local = LOCAL_MODEL.is_dir() and not os.environ.get("PARE_DEMO_HUB")
    name = str(LOCAL_MODEL) if local else HUB_MODEL
    dataset, calib_set, seqlen = ("tinystories", "tinystories", 256) if local else ("wikitext2", "c4", 2048)
    print(f"model: {name}\nmethod: {args.method}, sparsity {args.sparsity}; perplexity on {dataset} "
          f"test/validation, windows of {seqlen} tokens; calibration: 128 windows of {calib_set} train\n")
    model, tok = pare.load_model(name, dtype=torch.float32)
    before = _figures(model, tok, dataset, seqlen)
    config_cls = METHODS[args.method].config_class
    config = config_cls(sparsity=args.sparsity)  # type: ignore[call-arg]
    calib = pare.CalibrationConfig(dataset=calib_set, nsamples=128, seqlen=seqlen, seed=0)
    report = pare.prune(model, config, calib, tokenizer=tok, runtime=pare.RuntimeConfig(progress=False))
    after = _figures(model, tok, dataset, seqlen)
    out = pare.save(model, tok, args.out, report, overwrite=True)
    t0 = time.perf_counter()
    reloaded = pare.load(out)
    reload_s = time.perf_counter() - t0
    again = pare.evaluate(reloaded, tok, dataset=dataset, seqlen=seqlen, batch_size=8, speed=False, progress=False)
    print(f"pruned in {report.prune_seconds:.2f}s (peak RSS {report.peak_rss_mb:.0f} MB); "
          f"sparsity counted in the weights: {report.overall_sparsity:.4f} of the pruned linears; "
          f"evaluation text: {before['text_tokens']:,} tokens, {before['n_windows']} windows of {seqlen} scored\n")
    rows = [
        ("perplexity", f"{before['ppl']:.4f}", f"{after['ppl']:.4f}", f"{again['ppl']:.4f}"),
        ("parameters", f"{before['params']:,}", f"{after['params']:,}", f"{again['params']:,}"),
        ("nonzero parameters", f"{before['nonzero_params']:,}", f"{after['nonzero_params']:,}",
         f"{again['nonzero_params']:,}"),
        ("size on disk (bytes)", f"{model_dir_bytes(name) or 0:,}", f"{model_dir_bytes(out):,}", "-"),
        ("prefill tokens/s", f"{before['prefill_tokens_per_s']:,.0f}", f"{after['prefill_tokens_per_s']:,.0f}", "-"),
        ("decode tokens/s", f"{before['decode_tokens_per_s']:,.0f}", f"{after['decode_tokens_per_s']:,.0f}", "-"),
    ]
    print_table(rows, ("", "dense", "pruned", f"reloaded ({reload_s:.2f}s)"))
    print(f"\nsaved to {out}; reload with pare.load('{out}') or AutoModelForCausalLM.from_pretrained")
    for note in report.notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
