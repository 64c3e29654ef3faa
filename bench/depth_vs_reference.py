"""Depth pruning: pare (ppl-window proxy/exact, ShortGPT, angular) vs AMD Quark's depth-wise pruner.

On stories260K: calibrate on TinyStories train windows, evaluate on TinyStories validation. For 1
and 2 deleted layers: the chosen layers, validation PPL after, search wall seconds and peak RSS.
Quark (``LayerImportancePruneConfig``) runs in its own venv (bench/.venv-peers-quark, created under
a lock if missing) in a subprocess on the same calibration windows; its search time is measured
inside the subprocess, after its ~25 s import/JIT, which is reported separately. Both searches see
the same windows; the pruned models are evaluated by the same pare perplexity code.
Then prefill/decode tokens/s of a random-weight Llama (hidden 1024, 16 layers) before and after
removing 4 layers. Prints one JSON object per line. The machine is shared: timings are noisy; pare
and Quark run back to back, each search timed ``--search-repeats`` times (median; all values shown).

    python bench/depth_vs_reference.py [--nsamples 32 --seqlen 256]

``ppl-window`` is run four ways: ``halving``, ``proxy``, ``bound`` and ``exact`` (``proxy``, ``bound`` and
``exact`` must pick the same window; ``halving`` scores every window on a quarter of the data first).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import pare  # noqa: E402
from pare.arch import describe  # noqa: E402
from pare.arch.surgery.depth import remove_layers  # noqa: E402
from pare.calibration.data import calibration_windows, eval_token_ids  # noqa: E402
from pare.config import RuntimeConfig  # noqa: E402
from pare.eval.perplexity import perplexity  # noqa: E402
from pare.eval.speed import measure_speed  # noqa: E402

SHARED = REPO.parent / "shared"
DEFAULT_SEARCH = pare.PplWindowConfig.__dataclass_fields__["search"].default
MODEL = SHARED / "models" / "stories260K"
PEER_VENV = REPO / "bench" / ".venv-peers-quark"

QUARK_SCRIPT = r"""
import copy, json, resource, statistics, sys, time
t0 = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM
from quark.torch import ModelPruner
from quark.torch.pruning.config import LayerImportancePruneConfig, PConfig
import_s = time.perf_counter() - t0
model_path, windows_path = sys.argv[1], sys.argv[2]
k, threads, repeats = (int(a) for a in sys.argv[3:6])
torch.set_num_threads(threads)
dense = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
ids = torch.load(windows_path, weights_only=True)
calib = [ids[i:i + 1] for i in range(ids.shape[0])]
first = [p.detach().clone() for p in (l.self_attn.q_proj.weight for l in dense.model.layers)]
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
times, cpu = [], []
for _ in range(repeats):
    model = copy.deepcopy(dense)
    cfg = LayerImportancePruneConfig(delete_layer_num=k, layer_num_field="num_hidden_layers",
                                     model_decoder_layers="model.layers", layer_norm_field="model.norm",
                                     save_gpu_memory=False)
    t1, c1 = time.perf_counter(), time.process_time()
    model = ModelPruner(PConfig(algo_config=cfg)).pruning_model(model, calib)
    times.append(time.perf_counter() - t1)
    cpu.append(time.process_time() - c1)
kept = [next(i for i, w in enumerate(first) if torch.equal(w, l.self_attn.q_proj.weight)) for l in model.model.layers]
removed = [i for i in range(len(first)) if i not in kept]
print("QUARK_JSON " + json.dumps({"removed": removed, "search_seconds": statistics.median(times),
      "search_seconds_all": times, "search_cpu_seconds": statistics.median(cpu), "import_seconds": import_s,
      "peak_rss_mb_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_mb_before_search": rss0,
      "num_hidden_layers_after": model.config.num_hidden_layers}))
"""


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def peer_python() -> Path | None:
    """The Quark venv's python; created under a lock (another bench may be creating it) if missing."""
    py = PEER_VENV / "bin" / "python"
    check = [str(py), "-c", "import quark.torch.pruning, torch; assert torch.__version__.startswith('2.13.0')"]
    lock = str(PEER_VENV) + ".lock"
    cmd = (
        f"flock {lock} sh -c '{' '.join(check)} 2>/dev/null || (python3 -m venv {PEER_VENV} && "
        f"{PEER_VENV}/bin/pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu && "
        f"{PEER_VENV}/bin/pip install -q amd-quark)'"
    )
    if subprocess.run(check, capture_output=True).returncode != 0:
        subprocess.run(cmd, shell=True, check=False)
    return py if subprocess.run(check, capture_output=True).returncode == 0 else None


def run_quark(py: Path, windows_path: str, k: int, threads: int, repeats: int) -> dict:
    proc = subprocess.run(
        [str(py), "-c", QUARK_SCRIPT, str(MODEL), windows_path, str(k), str(threads), str(repeats)],
        capture_output=True, text=True, timeout=1800,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("QUARK_JSON ")), None)
    if line is None:
        return {"error": (proc.stderr or proc.stdout)[-1500:]}
    return json.loads(line[len("QUARK_JSON "):])


EVAL_WINDOWS = 40  # the first 40 x 512 validation tokens: the shared 2-core CPU makes the full set ~4 min per model


def eval_ppl(model, ids, seqlen: int) -> float:
    return perplexity(model, ids, seqlen, batch_size=8, progress=False, max_windows=EVAL_WINDOWS).ppl


def pruned_ppl(base, removed: list[int], ids, seqlen: int) -> float:
    model = copy.deepcopy(base)
    remove_layers(model, describe(model), removed)
    return eval_ppl(model, ids, seqlen)


def run_pare(base, config, windows, ids, seqlen, repeats: int = 1) -> dict:
    rt = RuntimeConfig(device="cpu", progress=False)
    times, cpu, peaks, rss_before = [], [], [], psutil.Process().memory_info().rss / 2**20
    for _ in range(repeats):
        model = copy.deepcopy(base)
        c0 = time.process_time()
        report = pare.prune(model, config, windows, runtime=rt, batch_size=8)
        cpu.append(time.process_time() - c0)
        times.append(report.scores.get("search_seconds", report.prune_seconds))
        peaks.append(report.peak_rss_mb)
    return {
        "removed": report.scores["removed_layers"],
        "search_seconds": statistics.median(times),
        "search_seconds_all": times,
        "search_cpu_seconds": statistics.median(cpu),
        "peak_rss_mb_process": max(peaks),
        "rss_mb_before_search": rss_before,
        "ppl_after": eval_ppl(model, ids, seqlen),
        "scores": {k: v for k, v in report.scores.items() if k in ("windows", "block_influence", "angular_distance")},
    }


def speed(args) -> None:
    """Dense vs 4-layers-removed tokens/s, measured alternately (ABAB...) so drift hits both alike."""
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                      num_key_value_heads=8, vocab_size=32000, max_position_embeddings=1024)
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    pruned = copy.deepcopy(dense)
    report = pare.prune(pruned, pare.LayersConfig(layers="6-9"), runtime=RuntimeConfig(device="cpu", progress=False))
    p_dense = sum(p.numel() for p in dense.parameters())
    p_pruned = sum(p.numel() for p in pruned.parameters())
    runs: dict[str, list] = {"dense": [], "pruned": []}
    for r in range(args.repeats):
        for name, model in (("dense", dense), ("pruned", pruned)):
            runs[name].append(measure_speed(model, prompt_len=128, new_tokens=16, repeats=1, warmup=int(r == 0)))

    def med(name: str, field: str) -> float:
        return statistics.median(getattr(x, field) for x in runs[name])

    out = {name: {"prefill_tok_s": med(name, "prefill_tokens_per_s"), "decode_tok_s": med(name, "decode_tokens_per_s")}
           for name in runs}
    emit({
        "bench": "depth_speed",
        "model": "random Llama hidden 1024, 16 layers, MLP 2816, GQA 16/8, vocab 32000, fp32, CPU",
        "removed_layers": report.scores["removed_layers"], "layer_ratio_removed": 4 / 16,
        "param_ratio_removed": 1 - p_pruned / p_dense, **out,
        "prefill_speedup": out["pruned"]["prefill_tok_s"] / out["dense"]["prefill_tok_s"],
        "decode_speedup": out["pruned"]["decode_tok_s"] / out["dense"]["decode_tok_s"],
        "ideal_speedup_layers_only": 16 / 12, "ideal_speedup_params": p_dense / p_pruned,
        "repeats_alternating": args.repeats, "prompt_len": 128, "new_tokens": 16,
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5, help="alternating dense/pruned speed measurements")
    ap.add_argument("--search-repeats", type=int, default=3, help="timed searches per tool (median reported)")
    ap.add_argument("--skip-quark", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    tok = AutoTokenizer.from_pretrained(MODEL)
    base = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    windows = calibration_windows(tok, "tinystories", args.nsamples, args.seqlen, seed=0, split="train")
    ids = eval_token_ids(tok, "tinystories", split="validation")
    dense_ppl = eval_ppl(base, ids, args.eval_seqlen)
    emit({"bench": "depth_setup", "model": "stories260K", "layers": base.config.num_hidden_layers,
          "calibration": f"TinyStories train, {args.nsamples} x {args.seqlen} tokens (seed 0)",
          "eval": f"TinyStories validation, first {EVAL_WINDOWS} windows of {args.eval_seqlen} tokens",
          "dense_ppl": dense_ppl, "torch_threads": threads})
    py = None if args.skip_quark else peer_python()
    pare.prune(copy.deepcopy(base), pare.PplWindowConfig(num_layers=1), windows,  # warm-up, untimed
               runtime=RuntimeConfig(device="cpu", progress=False))
    with tempfile.TemporaryDirectory() as tmp:
        wpath = os.path.join(tmp, "windows.pt")
        torch.save(windows, wpath)
        for k in args.layers:
            row: dict = {"bench": "depth_vs_quark", "delete_layers": k}
            for name, cfg in (
                ("pare_ppl_window_halving", pare.PplWindowConfig(num_layers=k, search="halving")),
                ("pare_ppl_window_bound", pare.PplWindowConfig(num_layers=k, search="bound")),
                ("pare_ppl_window_proxy", pare.PplWindowConfig(num_layers=k, search="proxy")),
                ("pare_ppl_window_exact", pare.PplWindowConfig(num_layers=k, search="exact")),
                ("pare_shortgpt", pare.ShortGPTConfig(num_layers=k)),
                ("pare_angular", pare.AngularConfig(num_layers=k)),
            ):
                reps = args.search_repeats if name.startswith("pare_ppl_window") else 1
                row[name] = run_pare(base, cfg, windows, ids, args.eval_seqlen, reps)
            if py is None:
                row["quark"] = {"error": "Quark venv unavailable (skipped or install failed)"}
            else:
                q = run_quark(py, wpath, k, threads, args.search_repeats)
                if "removed" in q:
                    q["ppl_after"] = pruned_ppl(base, q["removed"], ids, args.eval_seqlen)
                row["quark"] = q
                if "search_seconds" in q:
                    row["targets"] = {}
                    for search in ("halving", "proxy", "bound", "exact"):
                        p = row[f"pare_ppl_window_{search}"]
                        row["targets"][search + (" (default)" if search == DEFAULT_SEARCH else "")] = {
                            "same_window_as_quark": p["removed"] == q["removed"],
                            "ppl_le_quark": p["ppl_after"] <= q["ppl_after"] + 1e-9,
                            "time_ratio_vs_quark": p["search_seconds"] / q["search_seconds"],
                            "time_le_0.25x": p["search_seconds"] <= 0.25 * q["search_seconds"],
                            "cpu_time_ratio_vs_quark": p["search_cpu_seconds"] / q["search_cpu_seconds"],
                        }
            emit(row)
    if not args.skip_speed:
        speed(args)


if __name__ == "__main__":
    main()
