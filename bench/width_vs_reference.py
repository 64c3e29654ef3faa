"""Structured width pruning: pare vs AMD Quark's OSSCAR and Torch-Pruning's prune_llm.py.

On stories260K (calibrate on TinyStories train windows, evaluate on TinyStories validation):

- OSSCAR MLP channels, pare vs Quark (``quark.torch.pruning``, venv ``bench/.venv-peers-quark``) at
  equal removed parameters: Quark rounds the kept MLP width to a multiple of 128, so on
  intermediate 172 it keeps 128; pare runs with ``round_to=128`` and keeps the same 128.
- Width pruning (hidden + heads + MLP) at equal ratio, pare (magnitude L2 as Torch-Pruning uses,
  then activation / Taylor / FLAP) vs Torch-Pruning 1.6 (``MetaPruner`` +
  ``GroupNormImportance(p=2)`` + the config fix-up of ``examples/LLMs/prune_llm.py``, venv
  ``bench/.venv-peers-torchpruning``). Torch-Pruning's graph build hangs on GQA models (PEERS.md),
  so it prunes an MHA copy whose KV heads were duplicated (same function, more KV parameters).

Every peer runs in a subprocess with its own venv on the same windows and saves its model; every
model (pare's too) is reloaded with ``AutoModelForCausalLM.from_pretrained`` and evaluated by the
same pare perplexity / speed code. Prune seconds are measured around the pruning call; peak RSS is
the pruning process's peak (pare: sampled during ``prune``; peers: ``ru_maxrss`` of their process).

Then prefill throughput of a random-weight Llama (hidden 2048, intermediate 5632, 8 layers) pruned
by osscar / width on CPU, against the ideal speed-up from the removed linear FLOPs.
The machine is shared with other jobs: timings are noisy; runs are back to back.

    python bench/width_vs_reference.py [--nsamples 32 --seqlen 256 --ratios 0.25 0.5]
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

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import pare  # noqa: E402
from pare.calibration.data import calibration_windows, eval_token_ids  # noqa: E402
from pare.config import RuntimeConfig  # noqa: E402
from pare.eval.perplexity import perplexity  # noqa: E402
from pare.eval.speed import measure_speed  # noqa: E402

SHARED = Path(os.environ.get("PARE_SHARED_DIR", REPO.parent / "shared"))
MODEL = SHARED / "models" / "stories260K"
RT = RuntimeConfig(device="cpu", progress=False)
VENVS = {"quark": REPO / "bench" / ".venv-peers-quark", "torchpruning": REPO / "bench" / ".venv-peers-torchpruning"}

QUARK = r'''
import json, resource, sys, time, torch
from transformers import AutoModelForCausalLM
model_path, windows_path, ratio, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
from quark.torch import ModelPruner
from quark.torch.pruning.config import OSSCARConfig, PConfig
model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
windows = torch.load(windows_path, weights_only=True)
calib = [w.unsqueeze(0) for w in windows]
algo = OSSCARConfig(
    damp_percent=0.01, true_sequential=True,
    inside_layer_modules=["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    mlp_pruning_modules=["mlp.down_proj"], mlp_scaling_layers={"mlp.down_proj": ["mlp.up_proj", "mlp.gate_proj"]},
    mlp_pruning_ratio=ratio, mlp_intermediate_size_name="intermediate_size", model_decoder_layers="model.layers")
t = time.perf_counter()
model = ModelPruner(PConfig(algo_config=algo)).pruning_model(model, calib)
secs = time.perf_counter() - t
model.save_pretrained(out)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps({"prune_seconds": secs, "peak_rss_mb": rss}))
'''

TORCH_PRUNING = r'''
import json, resource, sys, time, torch
from transformers import AutoModelForCausalLM
model_path, ratio, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
import torch_pruning as tp
model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
model.config.use_cache = False
cfg = model.config
# MHA copy: duplicate every KV head for its query heads (Torch-Pruning's graph build hangs on GQA)
g = cfg.num_attention_heads // cfg.num_key_value_heads
d = cfg.hidden_size // cfg.num_attention_heads
with torch.no_grad():
    for layer in model.model.layers:
        for name in ("k_proj", "v_proj"):
            lin = getattr(layer.self_attn, name)
            w = lin.weight.data.reshape(cfg.num_key_value_heads, d, -1).repeat_interleave(g, 0)
            w = w.reshape(-1, lin.in_features)
            new = torch.nn.Linear(lin.in_features, w.shape[0], bias=False)
            new.weight.data = w.contiguous()
            setattr(layer.self_attn, name, new)
        layer.self_attn.num_key_value_groups = 1
cfg.num_key_value_heads = cfg.num_attention_heads
inputs = torch.randint(0, cfg.vocab_size, (1, 16))
t = time.perf_counter()
num_heads, out_channel_groups = {}, {}
for name, m in model.named_modules():
    if name.endswith("self_attn"):
        num_heads[m.q_proj] = cfg.num_attention_heads
        num_heads[m.k_proj] = cfg.num_key_value_heads
        num_heads[m.v_proj] = cfg.num_key_value_heads
Importance = getattr(tp.importance, "GroupNormImportance", None) or tp.importance.GroupMagnitudeImportance
Pruner = getattr(tp.pruner, "MetaPruner", None) or tp.pruner.BasePruner
pruner = Pruner(
    model, example_inputs=inputs, importance=Importance(p=2, group_reduction="mean"),
    global_pruning=False, pruning_ratio=ratio, ignored_layers=[model.lm_head], num_heads=num_heads,
    prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio, out_channel_groups=out_channel_groups,
    round_to=4, output_transform=lambda o: o.logits)
for grp in pruner.step(interactive=True):
    grp.prune()
model.config.hidden_size = model.lm_head.in_features
for name, m in model.named_modules():
    if name.endswith("self_attn"):
        heads = m.q_proj.out_features // m.head_dim
        model.config.num_attention_heads = heads
        m.num_key_value_groups = 1
    elif name.endswith("mlp"):
        model.config.intermediate_size = m.gate_proj.out_features
model.config.num_key_value_heads = model.config.num_attention_heads
model.config.head_dim = d
secs = time.perf_counter() - t
model.save_pretrained(out)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps({"prune_seconds": secs, "peak_rss_mb": rss}))
'''


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def run_peer(tool: str, script: str, args: list[str], timeout: int = 1200) -> dict:
    py = VENVS[tool] / "bin" / "python"
    if not py.exists():
        return {"error": f"{tool} venv missing at {VENVS[tool]} "
                         "(python3 -m venv; pip install torch==2.13.0; then the tool)"}
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(script)
    t = time.perf_counter()
    try:
        proc = subprocess.run([str(py), f.name, *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"{tool} did not finish in {timeout} s"}
    wall = time.perf_counter() - t
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return {**json.loads(line[7:]), "process_seconds": wall}
    return {"error": f"{tool} failed (rc {proc.returncode}): {(proc.stderr or proc.stdout)[-600:]}"}


def evaluate(path_or_model, ids: torch.Tensor, seqlen: int, max_windows: int) -> dict:
    model = path_or_model
    if not isinstance(model, torch.nn.Module):
        model = AutoModelForCausalLM.from_pretrained(path_or_model, dtype=torch.float32).eval()
    res = perplexity(model, ids, seqlen, batch_size=8, progress=False, max_windows=max_windows)
    sp = measure_speed(model, prompt_len=128, new_tokens=16, repeats=3)
    cfg = model.config
    return {
        "ppl": round(res.ppl, 4), "params": sum(p.numel() for p in model.parameters()),
        "prefill_tok_s": round(sp.prefill_tokens_per_s, 1), "decode_tok_s": round(sp.decode_tokens_per_s, 1),
        "shape": {"hidden": cfg.hidden_size, "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
                  "intermediate": cfg.intermediate_size},
    }


def pare_run(config, windows: torch.Tensor, out: Path) -> dict:
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    rep = pare.prune(model, config, windows, runtime=RT, batch_size=8)
    pare.save(model, None, out, report=rep, overwrite=True)
    return {"prune_seconds": round(rep.prune_seconds, 3), "peak_rss_mb": round(rep.peak_rss_mb, 1),
            "uniform": rep.uniform}


def stories_bench(args: argparse.Namespace, tmp: Path) -> None:
    tok = AutoTokenizer.from_pretrained(MODEL)
    windows = calibration_windows(tok, "tinystories", args.nsamples, args.seqlen, seed=0, split="train")
    ids = eval_token_ids(tok, "tinystories", split="validation")
    wpath = tmp / "windows.pt"
    torch.save(windows, wpath)
    ev = dict(ids=ids, seqlen=args.seqlen, max_windows=args.max_windows)
    dense = evaluate(str(MODEL), **ev)
    emit({"bench": "stories260K", "method": "dense", **dense,
          "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen}, "eval_tokens": int(ids.numel())})
    # OSSCAR: Quark keeps round(172 * 0.75 / 128) * 128 = 128 channels; pare keeps the same 128.
    q = run_peer("quark", QUARK, [str(MODEL), str(wpath), str(args.mlp_ratio), str(tmp / "quark")])
    row = {"bench": "stories260K", "method": "quark_osscar", "mlp_ratio": args.mlp_ratio, **q}
    if "error" not in q:
        row.update(evaluate(str(tmp / "quark"), **ev))
    emit(row)
    for name, cfg in (("pare_osscar", pare.OsscarConfig(mlp_ratio=args.mlp_ratio, round_to=128)),
                      ("pare_osscar_greedy_only",
                       pare.OsscarConfig(mlp_ratio=args.mlp_ratio, round_to=128, max_swaps=0))):
        res = pare_run(cfg, windows, tmp / name)
        emit({"bench": "stories260K", "method": name, "mlp_ratio": args.mlp_ratio, **res,
              **evaluate(str(tmp / name), **ev)})
    for ratio in args.ratios:
        tp = run_peer("torchpruning", TORCH_PRUNING, [str(MODEL), str(ratio), str(tmp / f"tp{ratio}")])
        row = {"bench": "stories260K", "method": "torchpruning_width_l2", "ratio": ratio,
               "note": "MHA copy (KV heads duplicated) because the graph build hangs on GQA", **tp}
        if "error" not in tp:
            row.update(evaluate(str(tmp / f"tp{ratio}"), **ev))
        emit(row)
        for imp in ("magnitude", "activation", "taylor", "flap"):
            cfg = pare.WidthConfig(pruning_ratio=ratio, importance=imp, norm=2)
            out = tmp / f"pare_{imp}{ratio}"
            try:
                res = pare_run(cfg, windows, out)
            except pare.errors.ConfigError as exc:  # type: ignore[attr-defined]
                emit({"bench": "stories260K", "method": f"pare_width_{imp}", "ratio": ratio, "error": str(exc)})
                continue
            emit({"bench": "stories260K", "method": f"pare_width_{imp}", "ratio": ratio, **res,
                  **evaluate(str(out), **ev)})


def linear_params(model: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def prefill(model: torch.nn.Module, prompt: int, repeats: int) -> float:
    sp = measure_speed(model, prompt_len=prompt, new_tokens=1, repeats=repeats)
    return sp.prefill_tokens_per_s


def big_bench(args: argparse.Namespace, tmp: Path) -> None:
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
                      num_key_value_heads=8, vocab_size=32000, max_position_embeddings=1024)

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        # from_config keeps the config object: pruning rewrites it, so each build gets its own copy
        return AutoModelForCausalLM.from_config(copy.deepcopy(cfg), dtype=torch.float32).eval()

    calib = torch.randint(0, cfg.vocab_size, (4, 128))
    dense = build()
    base_lin = linear_params(dense)
    emit({"bench": "llama_2048x8_random", "method": "dense", "linear_params": base_lin})
    del dense
    runs = [("pare_osscar_mlp0.5", pare.OsscarConfig(mlp_ratio=0.5, round_to=128, max_swaps=0)),
            ("pare_width_magnitude0.5", pare.WidthConfig(pruning_ratio=0.5, importance="magnitude"))]
    for name, pcfg in runs:
        if args.big_methods and not any(m in name for m in args.big_methods):
            continue
        model = build()
        rep = pare.prune(model, pcfg, calib, runtime=RT, batch_size=4)
        lin = linear_params(model)
        # a fresh random model of the pruned shapes: what the hardware gives for these sizes, so the
        # gap to the ideal splits into "pare's output is slower than its shapes" and "smaller GEMMs"
        fresh = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), dtype=torch.float32).eval()
        dense = build()
        removed = 1 - lin / base_lin
        ideal = 1 / (1 - removed)
        for prompt in args.prompts:
            # dense, pruned and fresh measured in turn, several rounds: the machine's speed drifts
            rounds = [(prefill(dense, prompt, args.repeats), prefill(model, prompt, args.repeats),
                       prefill(fresh, prompt, args.repeats) if rep.uniform else None) for _ in range(args.rounds)]
            measured = statistics.median(p / d for d, p, _ in rounds)
            same_shape = statistics.median(f / d for d, _, f in rounds) if rep.uniform else None
            emit({"bench": "llama_2048x8_random", "method": name, "prompt_len": prompt, "linear_params": lin,
                  "removed_linear_flops": round(removed, 4),
                  "prefill_tok_s": round(statistics.median(p for _, p, _ in rounds), 1),
                  "dense_prefill_tok_s": round(statistics.median(d for d, _, _ in rounds), 1),
                  "speedup": round(measured, 3), "speedup_rounds": [round(p / d, 3) for d, p, _ in rounds],
                  "ideal_speedup": round(ideal, 3), "target_speedup": round(0.9 * ideal, 3),
                  "meets_target": measured >= 0.9 * ideal,
                  "same_shape_fresh_speedup": None if same_shape is None else round(same_shape, 3),
                  "pruned_vs_same_shape": None if same_shape is None else round(measured / same_shape, 3),
                  "threads": torch.get_num_threads(), "prune_seconds": round(rep.prune_seconds, 1),
                  "peak_rss_mb": round(rep.peak_rss_mb, 1), "uniform": rep.uniform})
        del fresh, dense
        del model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--max-windows", type=int, default=200)
    ap.add_argument("--mlp-ratio", type=float, default=0.25)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--prompts", type=int, nargs="+", default=[256, 512], help="prefill prompt lengths")
    ap.add_argument("--rounds", type=int, default=5, help="dense/pruned/fresh measurement rounds (median)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-stories", action="store_true")
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--big-methods", nargs="*", default=[], help="only these big-model runs (osscar, width)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: up to 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads or max(1, min(2, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory() as d:
        if not args.skip_stories:
            if not (MODEL / "config.json").is_file():
                emit({"bench": "stories260K", "error": f"model not found at {MODEL}"})
            else:
                stories_bench(args, Path(d))
        if not args.skip_big:
            big_bench(args, Path(d))


if __name__ == "__main__":
    main()
