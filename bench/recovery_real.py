"""Recovery after pruning on a real model (SmolLM2-135M by default): perplexity and zero-shot accuracy
before recovery, after LoRA and after distillation from the dense model, for three cuts: width
(OSSCAR, 30% of the MLP channels), depth (ShortGPT, 6 of 30 layers) and SparseGPT 2:4 (also with
mask-aware LoRA). Reports the fraction of the lost quality each recovery wins back.

The defaults fit a shared 2-core CPU: a few ten thousand training tokens per recovery, perplexity on
a few WikiText-2 windows and zero-shot tasks on their first ``--limit`` documents; every size is in
the JSON. ``--device cuda --tokens 2000000 --seqlen 512`` runs a real budget on a GPU. Each row is
cached in ``--cache`` (pruned models saved there too), so a killed run continues where it stopped.
Prints one JSON object per row, then the summary (also written to ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

import pare
from pare.api import calibration_ids, evaluate, load_model
from pare.config import CalibrationConfig, RuntimeConfig
from pare.io import read_manifest
from pare.io.save import manifest_stages
from pare.methods.recover import RecoverConfig
from pare.report import Report

DEFAULT_MODEL = Path(os.environ.get("PARE_MODELS_DIR", Path.home() / ".cache" / "pare-models")) / "smollm2-135m"
HERE = Path(__file__).resolve().parent

# LLM-Pruner (Ma et al., 2023, section 4.1): LoRA r=8 on the 50K-sample Alpaca-cleaned set, 2 epochs.
# The paper gives no token count; an Alpaca sample in its prompt template is roughly 100-300 Llama
# tokens, so the estimate below takes 200: about 50K x 200 x 2 = 20M tokens (10M-30M).
LLM_PRUNER = {"lora_r": 8, "samples": 50_000, "epochs": 2, "tokens_per_sample_est": 200,
              "tokens_est": 50_000 * 200 * 2, "tokens_range_est": [10_000_000, 30_000_000],
              "source": "LLM-Pruner paper section 4.1 (LoRA r=8, Alpaca-cleaned 50K samples, 2 epochs); "
                        "tokens per sample is an estimate, not a published figure"}

CUTS: dict[str, Any] = {  # cheapest cut first: a run stopped early still has whole rows
    "sparsegpt-2:4": pare.SparseGPTConfig(pattern="2:4"),
    "depth-shortgpt-6": pare.ShortGPTConfig(num_layers=6),
    "width-osscar-30": pare.OsscarConfig(mlp_ratio=0.3, round_to=8),
}


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


class Rows:
    """Finished rows, kept in a JSON file so that a rerun skips them."""

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path = path
        data = json.loads(path.read_text()) if path.is_file() else {}
        self.rows: dict[str, Any] = data.get("rows", {}) if data.get("settings") == settings else {}
        self.settings = settings

    def get(self, key: str) -> dict[str, Any] | None:
        return self.rows.get(key)

    def put(self, key: str, row: dict[str, Any]) -> None:
        self.rows[key] = row
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"settings": self.settings, "rows": self.rows}, indent=1))
        os.replace(tmp, self.path)
        emit({"row": key, **row})


def nm_holds(model: torch.nn.Module, n: int = 2, m: int = 4) -> bool:
    """Whether every decoder linear has at least ``n`` zeros in each group of ``m`` inputs (at most
    ``m - n`` non-zeros: the N:M pattern; a checkpoint's own zeros may add a few more)."""
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            zeros = (mod.weight.detach().reshape(-1, m) == 0).sum(1)
            if not bool((zeros >= n).all()):
                return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--data", default="c4", help="recovery training text")
    ap.add_argument("--tokens", type=int, default=16_384, help="training tokens per recovery")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--eval", default="wikitext2")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--eval-seqlen", type=int, default=256)
    ap.add_argument("--tasks", default="piqa,arc_easy,winogrande,hellaswag")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--cuts", default=",".join(CUTS))
    ap.add_argument("--cache", default=str(HERE / ".cache" / "recovery_real"))
    ap.add_argument("--json", default=str(HERE / "results" / "recovery_real.json"))
    args = ap.parse_args()
    if not Path(args.model, "config.json").is_file():
        emit({"skipped": f"no model at {args.model}: run ../shared/models/fetch-real-models"})
        return 0
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("cache", "json")}
    rows = Rows(cache / "rows.json", settings)
    runtime = RuntimeConfig(device=args.device, progress=False)
    _, tok = load_model(args.model, dtype="float32")

    def score(model: torch.nn.Module) -> dict[str, Any]:
        t = time.perf_counter()
        res = evaluate(model, tok, dataset=args.eval, seqlen=args.eval_seqlen, max_windows=args.eval_windows,
                       speed=False, progress=False, tasks=args.tasks, task_limit=args.limit, device=args.device)
        per_task = {k: v.get("acc") for k, v in res["zeroshot"].get("tasks", {}).items()} \
            if isinstance(res["zeroshot"].get("tasks"), dict) else None
        return {"ppl": res["ppl"], "zeroshot_mean": res["zeroshot_mean"], "tasks": per_task,
                "params": res["params"], "nonzero_params": res["nonzero_params"],
                "eval_seconds": round(time.perf_counter() - t, 1)}

    if rows.get("dense") is None:
        dense, _ = load_model(args.model, dtype="float32")
        rows.put("dense", score(dense))
        del dense
    calib = CalibrationConfig(dataset=args.calib, nsamples=args.nsamples, seqlen=args.calib_seqlen, seed=0,
                              batch_size=8)
    for cut in args.cuts.split(","):
        pruned_dir = cache / f"pruned-{cut.replace(':', '')}"
        if rows.get(f"{cut}/pruned") is None or not (pruned_dir / "pare.json").is_file():
            model, _ = load_model(args.model, dtype="float32")
            t = time.perf_counter()
            report = pare.prune(model, CUTS[cut], calibration_ids(tok, calib, model), runtime=runtime)
            seconds = time.perf_counter() - t
            pare.save(model, tok, pruned_dir, report, overwrite=True)
            rows.put(f"{cut}/pruned", {**score(model), "prune_seconds": round(seconds, 1)})
            del model
        variants: dict[str, dict[str, Any]] = {"lora": {"mode": "lora"}}
        if cut.startswith("sparsegpt"):
            variants["lora-masked"] = {"mode": "lora", "lora_masked": True}
        variants["distill"] = {"mode": "distill", "teacher": args.model}
        for name, opts in variants.items():
            key = f"{cut}/{name}"
            if rows.get(key) is not None:
                continue
            model = pare.load(pruned_dir)
            history = [Report.from_dict(d) for d in manifest_stages(read_manifest(pruned_dir))]
            cfg = RecoverConfig(data=args.data, tokens=args.tokens, seqlen=args.seqlen, batch_size=args.batch_size,
                                lr=args.lr, lora_r=args.lora_r, lora_alpha=2.0 * args.lora_r, eval_every=0,
                                eval_windows=8, **opts)
            rep = pare.run(model, [cfg], tokenizer=tok, runtime=runtime, history=history)[0]
            rec = rep.scores["recovery"]
            row = {**score(model), "train_seconds": round(rep.prune_seconds, 1), "tokens": rec["tokens"],
                   "steps": rec["steps"], "epochs": rec["epochs"], "heldout": rec["heldout"],
                   "loss_first": rec["loss_first"], "loss_last": rec["loss_last"], "tokens_per_s": rec["tokens_per_s"]}
            row["zeros_kept"] = rec["zeros_kept"]  # every weight zero before recovery is zero after it
            if cut.startswith("sparsegpt"):
                row["nm_2_4_holds"] = nm_holds(model)
            rows.put(key, row)
            write_summary(rows.rows, args)  # after every row: a run stopped early still leaves its table
            del model
    emit(write_summary(rows.rows, args, complete=True))
    return 0


def write_summary(rows: dict[str, Any], args: argparse.Namespace, complete: bool = False) -> dict[str, Any]:
    summary = {**summarize(rows, args), "complete": complete}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=1))
    return summary


def _recovered(dense: float, pruned: float, after: float) -> float | None:
    lost = pruned - dense
    return None if abs(lost) < 1e-12 else (pruned - after) / lost


def summarize(rows: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    dense = rows["dense"]
    table = []
    for key, row in rows.items():
        if key == "dense" or key.endswith("/pruned"):
            continue
        cut, variant = key.split("/")
        pruned = rows[f"{cut}/pruned"]
        table.append({
            "cut": cut, "recovery": variant,
            "ppl_dense": dense["ppl"], "ppl_pruned": pruned["ppl"], "ppl_after": row["ppl"],
            "ppl_lost_recovered": _recovered(dense["ppl"], pruned["ppl"], row["ppl"]),
            "zs_dense": dense["zeroshot_mean"], "zs_pruned": pruned["zeroshot_mean"], "zs_after": row["zeroshot_mean"],
            "zs_lost_recovered": _recovered(-dense["zeroshot_mean"], -pruned["zeroshot_mean"], -row["zeroshot_mean"]),
            "tokens": row["tokens"], "train_seconds": row["train_seconds"], "nm_2_4_holds": row.get("nm_2_4_holds"),
            "zeros_kept": row.get("zeros_kept"),
        })
    tokens = max((r["tokens"] for r in table), default=0)
    return {
        "bench": "recovery_real", "model": args.model, "device": args.device,
        "budget": {"train_tokens_per_recovery": args.tokens, "seqlen": args.seqlen, "batch_size": args.batch_size,
                   "lr": args.lr, "lora_r": args.lora_r, "lora_alpha": 2.0 * args.lora_r, "data": args.data,
                   "distill": "logit KL, T=2, LoRA-trained, teacher = the dense model",
                   "calibration": f"{args.calib}: {args.nsamples} x {args.calib_seqlen}",
                   "ppl": f"{args.eval} test, {args.eval_windows} windows x {args.eval_seqlen} tokens",
                   "zeroshot": f"{args.tasks}, first {args.limit} documents each (acc)"},
        "llm_pruner_setting": LLM_PRUNER,
        "budget_vs_llm_pruner": tokens / LLM_PRUNER["tokens_est"] if tokens else None,
        "table": table,
        "note": "fractions: (pruned - after) / (pruned - dense), for PPL and for the zero-shot mean; "
                "small windows and document limits make single figures noisy (a zero-shot mean over "
                f"{args.limit} documents per task moves by a few points between nearby models)",
    }


if __name__ == "__main__":
    raise SystemExit(main())
