"""Recovery after pruning on a real model (SmolLM2-135M by default): perplexity and zero-shot accuracy
before recovery, after LoRA and after distillation from the dense model, for three cuts: width
(OSSCAR, 40% of the MLP channels: 30% of the decoder layers' parameters), depth (ShortGPT, 6 of 30
layers) and SparseGPT 2:4 (also with mask-aware LoRA). Reports the fraction of the lost quality each recovery wins back.

The defaults fit a shared 2-core CPU: a few ten thousand training tokens per recovery, perplexity on
a few WikiText-2 windows and zero-shot tasks on their first ``--limit`` documents; every size is in
the JSON. ``--device cuda --tokens 2000000 --seqlen 512`` runs a real budget on a GPU. Each row is
cached in ``--cache`` (pruned models saved there too), so a killed run continues where it stopped.
Prints one JSON object per row, then the summary (also written to ``--json``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
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
    "width-osscar-30": pare.OsscarConfig(mlp_ratio=0.4, round_to=8),  # 40% of MLP channels: 30% of decoder params
}


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


class Rows:
    """Finished rows, one JSON file each under ``DIR/rows/``, so that a rerun skips them and two processes
    running different ``--cuts`` into the same cache never overwrite each other's rows."""

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.dir = path
        self.dir.mkdir(parents=True, exist_ok=True)
        self.settings = settings

    def _file(self, key: str) -> Path:
        return self.dir / (key.replace("/", "__").replace(":", "") + ".json")

    def get(self, key: str) -> dict[str, Any] | None:
        f = self._file(key)
        data = json.loads(f.read_text()) if f.is_file() else {}
        return data.get("row") if data.get("settings") == self.settings and data.get("key") == key else None

    @property
    def rows(self) -> dict[str, Any]:
        found = {}
        for f in sorted(self.dir.glob("*.json")):
            data = json.loads(f.read_text())
            if data.get("settings") == self.settings:
                found[data["key"]] = data["row"]
        return found

    def put(self, key: str, row: dict[str, Any]) -> None:
        f = self._file(key)
        tmp = f.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "settings": self.settings, "row": row}, indent=1))
        os.replace(tmp, f)
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


RECOVERIES = ("lora", "lora-masked", "distill")

TRAIN_OPTIONS = ("data", "tokens", "seqlen", "batch_size", "lr", "lora_r")
"""Options that change only the recovery rows: the dense and pruned rows (and pruned models) are reused."""


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--device", default="cpu", help="cpu or cuda (skips with a message when CUDA is missing)")
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--data", default="c4", help="recovery training text")
    ap.add_argument("--tokens", type=int, default=32_768, help="training tokens per recovery")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=0, help="held-out loss every this many training steps, "
                    "logged as it is measured (0: before and after only)")
    ap.add_argument("--eval", default="wikitext2")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--eval-seqlen", type=int, default=256)
    ap.add_argument("--tasks", default="piqa,arc_easy,winogrande,hellaswag")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--cuts", default=",".join(CUTS), help=f"comma-separated, of {', '.join(CUTS)}; two "
                    "processes may share a --cache with different --cuts")
    ap.add_argument("--recoveries", default=",".join(RECOVERIES), help=f"comma-separated, of {', '.join(RECOVERIES)} "
                    "(lora-masked: SparseGPT 2:4 only); a budget point may run LoRA alone")
    ap.add_argument("--summary-only", action="store_true", help="only rewrite --json from the cached rows")
    ap.add_argument("--cache", default=str(HERE / ".cache" / "recovery_real"))
    ap.add_argument("--json", default=str(HERE / "results" / "recovery_real.json"))
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not Path(args.model, "config.json").is_file():
        emit({"skipped": f"no model at {args.model}: run ../shared/models/fetch-real-models"})
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        emit({"skipped": f"--device {args.device}, but CUDA is not available here"})
        return 0
    unknown = sorted(set(args.cuts.split(",")) - set(CUTS))
    if unknown:
        raise SystemExit(f"unknown cuts {unknown}: choose from {', '.join(CUTS)}")
    unknown = sorted(set(args.recoveries.split(",")) - set(RECOVERIES))
    if unknown:
        raise SystemExit(f"unknown recoveries {unknown}: choose from {', '.join(RECOVERIES)}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cache = Path(args.cache)
    skip = {"cache", "json", "cuts", "recoveries", "summary_only", "eval_every"}  # eval_every: logging only
    base = {k: v for k, v in vars(args).items() if k not in skip | set(TRAIN_OPTIONS)}
    pruned_rows = Rows(cache / "rows", base)
    rows = Rows(cache / "rows", {**base, **{k: getattr(args, k) for k in TRAIN_OPTIONS}})
    if args.summary_only:
        emit(write_summary({**pruned_rows.rows, **rows.rows}, args, complete=True))
        return 0
    _, tok = load_model(args.model, dtype="float32")
    if pruned_rows.get("dense") is None:
        with _lock(cache / "dense.lock") as mine:  # two processes: one scores the dense model
            if mine and pruned_rows.get("dense") is None:
                dense, _ = load_model(args.model, dtype="float32")
                pruned_rows.put("dense", score(dense, tok, args))
                del dense
    for cut in args.cuts.split(","):
        pruned_dir = prune_cut(cut, tok, args, pruned_rows, cache)
        for name, opts in variants(cut, args).items():
            if rows.get(f"{cut}/{name}") is None:
                rows.put(f"{cut}/{name}", recover(pruned_dir, cut, opts, tok, args))
                write_summary({**pruned_rows.rows, **rows.rows}, args)  # a run stopped early leaves its table
    emit(write_summary({**pruned_rows.rows, **rows.rows}, args, complete=True))
    return 0


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[bool]:
    """Yields whether this process holds ``path``'s lock (False: another process holds it; go on)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def score(model: torch.nn.Module, tok: Any, args: argparse.Namespace) -> dict[str, Any]:
    t = time.perf_counter()
    res = evaluate(model, tok, dataset=args.eval, seqlen=args.eval_seqlen, max_windows=args.eval_windows,
                   speed=False, progress=False, tasks=args.tasks, task_limit=args.limit, device=args.device)
    per_task = {k: v.get("acc") for k, v in res["zeroshot"].get("tasks", {}).items()} \
        if isinstance(res["zeroshot"].get("tasks"), dict) else None
    return {"ppl": res["ppl"], "zeroshot_mean": res["zeroshot_mean"], "tasks": per_task,
            "params": res["params"], "nonzero_params": res["nonzero_params"],
            "eval_seconds": round(time.perf_counter() - t, 1)}


def prune_cut(cut: str, tok: Any, args: argparse.Namespace, rows: Rows, cache: Path) -> Path:
    """The pruned model's directory, pruned, saved and scored unless cached."""
    pruned_dir = cache / f"pruned-{cut.replace(':', '')}"
    if rows.get(f"{cut}/pruned") is None or not (pruned_dir / "pare.json").is_file():
        model, _ = load_model(args.model, dtype="float32")
        calib = CalibrationConfig(dataset=args.calib, nsamples=args.nsamples, seqlen=args.calib_seqlen, seed=0,
                                  batch_size=8)
        t = time.perf_counter()
        report = pare.prune(model, CUTS[cut], calibration_ids(tok, calib, model),
                            runtime=RuntimeConfig(device=args.device, progress=False))
        seconds = time.perf_counter() - t
        pare.save(model, tok, pruned_dir, report, overwrite=True)
        rows.put(f"{cut}/pruned", {**score(model, tok, args), "prune_seconds": round(seconds, 1)})
    return pruned_dir


def variants(cut: str, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {"lora": {"mode": "lora"}}
    if cut.startswith("sparsegpt"):
        out["lora-masked"] = {"mode": "lora", "lora_masked": True}
    out["distill"] = {"mode": "distill", "teacher": args.model}
    wanted = args.recoveries.split(",")
    return {name: opts for name, opts in out.items() if name in wanted}


def recover(pruned_dir: Path, cut: str, opts: dict[str, Any], tok: Any, args: argparse.Namespace) -> dict[str, Any]:
    model = pare.load(pruned_dir)
    history = [Report.from_dict(d) for d in manifest_stages(read_manifest(pruned_dir))]
    cfg = RecoverConfig(data=args.data, tokens=args.tokens, seqlen=args.seqlen, batch_size=args.batch_size,
                        lr=args.lr, lora_r=args.lora_r, lora_alpha=2.0 * args.lora_r, eval_every=args.eval_every,
                        eval_windows=8, **opts)
    rep = pare.run(model, [cfg], tokenizer=tok, runtime=RuntimeConfig(device=args.device, progress=False),
                   history=history)[0]
    rec = rep.scores["recovery"]
    row = {**score(model, tok, args), "train_seconds": round(rep.prune_seconds, 1), "tokens": rec["tokens"],
           "steps": rec["steps"], "epochs": rec["epochs"], "heldout": rec["heldout"],
           "loss_first": rec["loss_first"], "loss_last": rec["loss_last"], "tokens_per_s": rec["tokens_per_s"],
           "zeros_kept": rec["zeros_kept"]}  # every weight zero before recovery is zero after it
    if cut.startswith("sparsegpt"):
        row["nm_2_4_holds"] = nm_holds(model)
    return row


def write_summary(rows: dict[str, Any], args: argparse.Namespace, complete: bool = False) -> dict[str, Any]:
    summary = {**summarize(rows, args), "complete": complete}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=1))
    return summary


def _recovered(dense: float, pruned: float, after: float) -> float | None:
    lost = pruned - dense
    return None if abs(lost) < 1e-12 else (pruned - after) / lost


def summarize(rows: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    dense = rows.get("dense")
    table = []
    for key, row in rows.items():
        if key == "dense" or (key.endswith("/pruned") and dense is None):
            continue
        cut, variant = key.split("/")
        pruned = rows.get(f"{cut}/pruned")
        if pruned is None or dense is None:
            continue
        table.append({
            "cut": cut, "recovery": "none" if variant == "pruned" else variant,
            "params": row["params"], "nonzero_params": row["nonzero_params"],
            "params_removed": 1 - row["nonzero_params"] / dense["nonzero_params"],
            "ppl_dense": dense["ppl"], "ppl_pruned": pruned["ppl"], "ppl_after": row["ppl"],
            "ppl_lost_recovered": _recovered(dense["ppl"], pruned["ppl"], row["ppl"]),
            "zs_dense": dense["zeroshot_mean"], "zs_pruned": pruned["zeroshot_mean"], "zs_after": row["zeroshot_mean"],
            "zs_lost_recovered": _recovered(-dense["zeroshot_mean"], -pruned["zeroshot_mean"], -row["zeroshot_mean"]),
            "heldout_first_last": [row["heldout"][0][1], row["heldout"][-1][1]] if row.get("heldout") else None,
            "tokens": row.get("tokens", 0), "train_seconds": row.get("train_seconds"),
            "nm_2_4_holds": row.get("nm_2_4_holds"), "zeros_kept": row.get("zeros_kept"),
        })
    order = ["none", "lora", "lora-masked", "distill"]
    table.sort(key=lambda r: (list(CUTS).index(r["cut"]), order.index(r["recovery"])))
    tokens = max((r["tokens"] for r in table), default=0)
    return {
        "bench": "recovery_real", "model": args.model, "device": args.device, "dense": dense,
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
