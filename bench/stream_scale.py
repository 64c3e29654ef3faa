"""Streaming at scale (``pare prune --stream``), as JSON.

``small``: on SmolLM2-135M (a model that fits), Wanda 50% run in memory and streamed, alternately, each
in its own process: seconds per layer (end to end: load + prune + save, and the prune alone), the
peak RSS each process measured of itself (``ru_maxrss``) against one layer + activations + 2 GiB,
and whether the two outputs are equal bitwise. Then a streamed run killed with SIGKILL after a random
layer and resumed with ``--resume``: its files against the uninterrupted run's.

With ``--device cuda`` (when a GPU is there) the same comparison is the GPU check: seconds and the
peak GPU memory (``torch.cuda.max_memory_allocated``) of each run.

``big``: a random-weight Llama (hidden 5120, MLP 13824, bf16; one random layer repeated) larger than
half this machine's RAM, written once under ``--dir`` (reused when already there; deleted after
unless ``--keep``): each of ``--methods`` (Wanda, SparseGPT) at 50% with ``--stream`` must finish
with a peak RSS within one layer + activations + 2 GiB, and the output must load with
``from_pretrained(device_map="meta")`` with no missing or unexpected weight.

Run the script itself through /work/notes/heavy-run (one machine slot for the whole bench); every
pare run is a child process with one thread, under nice (level ``PARE_BENCH_NICE``, default 10).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

SMOL = Path("/root/.cache/pare-models/smollm2-135m")
TEXT = Path(os.environ.get("PARE_DATA_DIR", "/work/shared/data")) / "tinystories" / "train-head.txt"
GiB = 2**30


def child(argv: list[str]) -> int:
    """Run ``pare`` in this process and print its own peak RSS and wall time as the last line."""
    import torch

    torch.set_num_threads(1)
    from pare.cli import main

    start = time.perf_counter()
    rc = main(argv)
    cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    print(json.dumps({"rc": rc, "seconds": time.perf_counter() - start, "max_cuda_bytes": cuda,
                      "maxrss_bytes": own_peak_rss()}))
    return rc


def own_peak_rss() -> int:
    """This process's own peak RSS: ``VmHWM`` (reset by exec; ``ru_maxrss`` is not: Linux carries the
    parent's peak at fork into it, here the bench's own memory), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_pare(argv: list[str]) -> dict:
    """``pare argv`` in a child process; its report (``--json``) and its measured cost."""
    cmd = ["nice", "-n", os.environ.get("PARE_BENCH_NICE", "10"), sys.executable, __file__, "child", "--", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"pare {' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    cost = json.loads(lines[-1])
    report = json.loads("\n".join(lines[:-1])) if "--json" in argv else None
    return {**cost, "report": report}


def plan_figures(model: str, nsamples: int, seqlen: int, batch: int, method: str) -> dict:
    """The plan's largest layer and activations (the RSS budget is these + 2 GiB)."""
    import pare
    from pare.arch import describe
    from pare.stream.files import build_skeleton
    from pare.stream.plan import plan_memory

    skel = build_skeleton(model, None)
    arch = describe(skel)
    dtype = next(skel.parameters()).dtype
    plan = plan_memory(skel, arch, nsamples, seqlen, batch, dense=False, gram=method == "sparsegpt",
                       act_dtype=dtype)
    del pare
    return {"layer_bytes": plan.layer, "activation_bytes": plan.activations, "outside_bytes": plan.outside,
            "num_layers": arch.num_layers, "budget_bytes": plan.layer + plan.activations + 2 * GiB}


def same_outputs(a: Path, b: Path) -> dict:
    """Bitwise equality of two saved models' weights (loaded with from_pretrained) and manifests."""
    import torch
    from transformers import AutoModelForCausalLM

    sa = AutoModelForCausalLM.from_pretrained(a).state_dict()
    sb = AutoModelForCausalLM.from_pretrained(b).state_dict()
    differ = [k for k in sa if k not in sb or not torch.equal(sa[k], sb[k])]
    return {"weights_equal": not differ and sorted(sa) == sorted(sb), "differing": differ[:5]}


def manifest(path: Path) -> dict:
    data = json.loads((path / "pare.json").read_text())
    for key in ("prune_seconds", "peak_rss_mb"):
        data.pop(key, None)
    data["runtime"].pop("stream", None)
    data["figures"].pop("size_on_disk_bytes_after", None)
    return data


def files_of(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != "pare.json"}


def small(args: argparse.Namespace) -> dict:
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    common = ["prune", "--model", str(SMOL), "--method", args.method, "--sparsity", "0.5", "--calib", str(TEXT),
              "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--batch-size", str(args.batch),
              "--no-progress", "--json", "--overwrite", *(["--device", args.device] if args.device else [])]
    figs = plan_figures(str(SMOL), args.nsamples, args.seqlen, args.batch, args.method)
    runs: dict[str, list[dict]] = {"in_memory": [], "streamed": []}
    for r in range(args.repeats):
        for kind in ("in_memory", "streamed") if r % 2 == 0 else ("streamed", "in_memory"):
            out = work / kind
            extra = ["--stream"] if kind == "streamed" else []
            res = run_pare([*common, "--out", str(out), *extra])
            runs[kind].append({"seconds": res["seconds"], "prune_seconds": res["report"]["prune_seconds"],
                               "maxrss_bytes": res["maxrss_bytes"], "max_cuda_bytes": res["max_cuda_bytes"]})
    n = figs["num_layers"]

    def med(kind: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[kind])

    timing = {
        "end_to_end_s_per_layer": {k: med(k, "seconds") / n for k in runs},
        "prune_s_per_layer": {k: med(k, "prune_seconds") / n for k in runs},
    }
    timing["end_to_end_ratio_streamed_over_in_memory"] = med("streamed", "seconds") / med("in_memory", "seconds")
    timing["prune_ratio_streamed_over_in_memory"] = med("streamed", "prune_seconds") / med("in_memory",
                                                                                          "prune_seconds")
    peak = max(x["maxrss_bytes"] for x in runs["streamed"])
    out = {"model": str(SMOL), "method": args.method, "nsamples": args.nsamples, "seqlen": args.seqlen,
           "repeats": args.repeats, "runs": runs, **timing, "plan": figs,
           "streamed_peak_rss_bytes": peak, "in_memory_peak_rss_bytes": max(x["maxrss_bytes"]
                                                                             for x in runs["in_memory"]),
           "streamed_peak_within_budget": peak <= figs["budget_bytes"],
           "equal": same_outputs(work / "in_memory", work / "streamed")}
    out["kill_resume"] = kill_and_resume(common, work, n, args.seed)
    return out


def kill_and_resume(common: list[str], work: Path, num_layers: int, seed: int | None) -> dict:
    """SIGKILL a streamed run once its progress record passes a random layer, resume, compare files."""
    rng = random.Random(seed)
    layer = rng.randrange(1, num_layers - 1)
    out = work / "killed"
    progress = work / ".killed.stream" / "progress.json"
    argv = [*common, "--out", str(out), "--stream"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, __file__, "child", "--", *argv]
    nice = ["nice", "-n", os.environ.get("PARE_BENCH_NICE", "10")]
    proc = subprocess.Popen([*nice, *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    killed_after = None
    while proc.poll() is None:
        try:
            done = json.loads(progress.read_text()).get("done", -1)
        except (OSError, ValueError):
            done = -1
        if done >= layer:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            killed_after = done
            break
        time.sleep(0.05)
    if killed_after is None:
        return {"error": f"the run finished before layer {layer}; nothing was killed"}
    resumed = run_pare([*argv, "--resume"])
    whole = work / "streamed"
    return {"killed_after_layer": killed_after, "target_layer": layer,
            "resumed_after_layer": resumed["report"]["runtime"]["stream"]["resumed_after_layer"],
            "files_equal": files_of(out) == files_of(whole), "manifest_equal": manifest(out) == manifest(whole)}


def write_big(root: Path, layers: int, hidden: int, inter: int, seed: int) -> int:
    """A random bf16 Llama written shard by shard (two layers a shard); returns its bytes."""
    import torch
    from transformers import LlamaConfig

    from pare.io.partial import write_safetensors

    torch.set_num_threads(1)
    root.mkdir(parents=True, exist_ok=True)
    vocab = 49152
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, vocab_size=vocab,
                      max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16")
    cfg.save_pretrained(root)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SMOL / name, root / name)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float32) * 0.02).to(torch.bfloat16)

    # one random layer written for every layer: drawing 13 GB of normals would cost minutes of CPU on
    # this shared machine, and the run streams, prunes and writes each layer all the same
    layer = {f"self_attn.{proj}.weight": rand(hidden, hidden) for proj in ("q_proj", "k_proj", "v_proj", "o_proj")}
    layer.update({"mlp.gate_proj.weight": rand(inter, hidden), "mlp.up_proj.weight": rand(inter, hidden),
                  "mlp.down_proj.weight": rand(hidden, inter),
                  "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                  "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)})

    groups: list[dict[str, torch.Tensor]] = []
    outside = {"model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden),
               "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
    n_shards = 1 + (layers + 1) // 2
    weight_map: dict[str, str] = {}
    total = 0

    def flush(k: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        name = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        write_safetensors(root / name, tensors, {"format": "pt"})  # layers share one random draw
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    flush(0, outside)
    del outside, groups
    shard: dict[str, torch.Tensor] = {}
    for i in range(layers):
        shard.update({f"model.layers.{i}.{k}": v for k, v in layer.items()})
        if i % 2 == 1 or i == layers - 1:
            flush(1 + i // 2, shard)
            shard = {}
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return total


def big(args: argparse.Namespace) -> dict:
    import psutil

    root = Path(args.dir)
    src = root / "src"
    ram = psutil.virtual_memory().total
    out: dict = {"ram_bytes": ram, "layers": args.layers, "hidden": 5120, "intermediate": 13824, "dtype": "bfloat16",
                 "nsamples": args.nsamples, "seqlen": args.seqlen}
    start = time.perf_counter()
    if not (src / "model.safetensors.index.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        out["model_bytes"] = write_big(src, args.layers, 5120, 13824, args.seed or 0)
    else:
        out["model_bytes"] = json.loads((src / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    out["write_seconds"] = time.perf_counter() - start
    out["larger_than_half_ram"] = out["model_bytes"] > ram / 2
    for method in [m for m in args.methods.split(",") if m]:
        figs = plan_figures(str(src), args.nsamples, args.seqlen, 1, method)
        dest = root / f"out-{method}"
        res = run_pare(["prune", "--model", str(src), "--method", method, "--sparsity", "0.5", "--calib", str(TEXT),
                        "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--batch-size", "1",
                        "--stream", "--no-progress", "--json", "--overwrite", "--out", str(dest)])
        out[method] = {"seconds": res["seconds"], "prune_seconds": res["report"]["prune_seconds"],
                       "seconds_per_layer": res["seconds"] / args.layers, "peak_rss_bytes": res["maxrss_bytes"],
                       "plan": figs, "within_budget": res["maxrss_bytes"] <= figs["budget_bytes"],
                       "nonzero_kept": res["report"]["figures"]["nonzero_after"]
                       / res["report"]["figures"]["nonzero_before"],
                       "loads": lazy_load(dest)}
        print(json.dumps({method: out[method]}, default=str), file=sys.stderr)  # kept if a later step fails
        shutil.rmtree(dest, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    out["deleted"] = not root.exists()
    return out


def lazy_load(path: Path) -> dict:
    """``from_pretrained(device_map="meta")``: every weight has a place, none is missing."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, device_map="meta", output_loading_info=True)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    key = "model.layers.0.mlp.down_proj.weight"
    with safe_open(str(path / index["weight_map"][key]), "pt") as f:
        w = f.get_tensor(key)
        zero_per_row = (w == 0).float().mean(dim=1)
    return {"missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
            "params": sum(p.numel() for p in model.parameters()),
            "layer0_down_zero_fraction_min_max": [float(zero_per_row.min()), float(zero_per_row.max())]}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        raise SystemExit(child(sys.argv[sys.argv.index("--") + 1:]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=["small", "big"])
    p.add_argument("--dir", default=None, help="work directory (small: /tmp/stream-bench; big: /work/bigmodel)")
    p.add_argument("--method", default="wanda")
    p.add_argument("--device", default=None, help="small: compute device (cuda: the GPU check; peak GPU memory "
                                                   "is reported per run)")
    p.add_argument("--nsamples", type=int, default=None)
    p.add_argument("--seqlen", type=int, default=None)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--layers", type=int, default=20, help="big: decoder layers (20 x 634 MB + 1 GB of embeddings)")
    p.add_argument("--methods", default="wanda", help="big: comma-separated methods to run streamed (e.g. "
                   "wanda,sparsegpt; empty: only write the model, with --keep)")
    p.add_argument("--keep", action="store_true", help="big: keep the random model on disk")
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args()
    if args.part == "small":
        args.dir = args.dir or "/tmp/stream-bench"
        args.nsamples, args.seqlen = args.nsamples or 16, args.seqlen or 256
        res = small(args)
    else:
        args.dir = args.dir or "/work/bigmodel"
        args.nsamples, args.seqlen = args.nsamples or 4, args.seqlen or 128
        res = big(args)
    res["budget_note"] = ("one thread per run (OMP_NUM_THREADS=1, nice) on a 2-core machine shared by 8 developers; "
                          "in-memory and streamed runs alternate, medians reported")
    print(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
