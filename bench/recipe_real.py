"""The README's 3-stage recipe (OSSCAR MLP 25%, one layer by perplexity window, SparseGPT 2:4) on a
real model, SmolLM2-135M by default: perplexity before and after each stage and seconds per stage.

Run ``../shared/models/fetch-real-models`` first. The defaults are modest (16 calibration windows
of 256 tokens, perplexity on 16 windows of 256 tokens) so the run takes minutes on a shared CPU; the
JSON says which sizes were used. Prints one JSON object per line.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import pare
from pare.api import calibration_ids, evaluate, load_model
from pare.config import CalibrationConfig, RuntimeConfig

DEFAULT_MODEL = Path(os.environ.get("PARE_MODELS_DIR", Path.home() / ".cache" / "pare-models")) / "smollm2-135m"


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--calib", default="tinystories")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval", default="tinystories")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--out", default=None, help="save the result here (and check from_pretrained reloads it)")
    args = ap.parse_args()
    if not Path(args.model, "config.json").is_file():
        emit({"skipped": f"no model at {args.model}: run ../shared/models/fetch-real-models"})
        return 0
    torch.manual_seed(0)
    model, tok = load_model(args.model, dtype="float32")
    calib = CalibrationConfig(dataset=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=0, batch_size=8)
    stages = [pare.OsscarConfig(mlp_ratio=0.25, round_to=4), pare.PplWindowConfig(num_layers=1),
              pare.SparseGPTConfig(sparsity=0.5, pattern="2:4")]
    emit({"bench": "recipe_real", "model": args.model, "calibration": calib.to_dict(), "eval": args.eval,
          "eval_windows": args.eval_windows, "eval_seqlen": args.seqlen,
          "note": "modest sizes for a shared CPU: perplexity on few windows, calibration on few samples",
          "stages": [s.to_dict() for s in stages]})

    def ppl() -> float:
        return float(evaluate(model, tok, dataset=args.eval, seqlen=args.seqlen, max_windows=args.eval_windows,
                              speed=False, progress=False)["ppl"])

    t0 = time.perf_counter()
    emit({"stage": "dense", "ppl": ppl(), "params": sum(p.numel() for p in model.parameters())})
    ids = calibration_ids(tok, calib, model)

    def after(m: torch.nn.Module, report: pare.Report) -> None:
        report.figures["ppl_after"] = ppl()
        emit({"stage": report.method, "seconds": round(report.prune_seconds, 2),
              "peak_rss_mb": round(report.peak_rss_mb), "ppl": report.figures["ppl_after"],
              "params": report.figures["params_after"], "nonzero": report.figures.get("nonzero_after"),
              "removed_layers": report.scores.get("removed_layers")})

    reports = pare.run(model, stages, ids, runtime=RuntimeConfig(device="cpu", progress=False),
                       batch_size=calib.batch_size, after_stage=after)
    summary = {"total_seconds": round(time.perf_counter() - t0, 1),
               "stage_seconds": {r.method: round(r.prune_seconds, 2) for r in reports}}
    if args.out:
        from transformers import AutoModelForCausalLM

        pare.save(model, tok, args.out, reports, overwrite=True)
        manifest = json.loads(Path(args.out, "pare.json").read_text())
        plain = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
        probe = ids[:1, :64]
        with torch.no_grad():
            summary["from_pretrained_same_logits"] = bool(torch.equal(plain(probe).logits, model(probe).logits))
        summary["manifest_stages"] = [s["method"] for s in manifest["stages"]]
    emit(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
