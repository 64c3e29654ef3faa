"""pare vs llm-compressor's REAP: which experts each removes, and how fast; removal vs merging.

A random-weight Qwen3-MoE (Llama-2 tokenizer from ../shared, fp32, CPU) is pruned by both tools on
the same C4 calibration windows (saved to a ``.pt`` file the peer reads), each in a fresh subprocess,
alternating ``--repeats`` times; medians of the pruning call's wall time and CPU time (the machine
may be shared: CPU time is the steadier figure) are compared. Two protocols:

- ``sequential``: each layer scored on the outputs of the already-pruned layers (pare's default;
  llm-compressor's sequential pipeline, where REAP prunes each layer as its subgraph completes).
  llm-compressor 0.14 (transformers 5.17, CPU) runs the traced decoder layers of this model without
  the causal mask: its layer-0 MoE inputs equal a forward with full (bidirectional) attention, not
  the model's own, so its choices differ from pare's from layer 0 on (see the README's MoE section).
- ``dense``: every layer scored on the dense model's activations (pare ``sequential=False``;
  llm-compressor's ``basic`` pipeline, the whole model's own forward, with REAP pruning at the end).
  Here both tools see the same activations, so they must remove the same experts.

Printed JSON (one object): the experts each tool keeps per layer and where they differ (with the
REAP scores pare gave the experts in question), ``prune_seconds`` of each (medians and every run),
the time ratio, whether the pruned models reload (pare: plain ``from_pretrained``; reference:
``repack_moe`` + ``save_pretrained`` + ``from_pretrained``) and generate with the KV cache, and for
pare's removal vs merging (``--merge``) the C4 perplexity and the mean KL divergence of the pruned
model's next-token distribution from the dense model's on held-out C4 windows. The model is random:
its perplexity means nothing by itself; the KL to the dense model says how much of its function
each variant keeps.

The peer lives in its own venv (llm-compressor 0.14.0.1 pins transformers <= 5.17)::

    python3 -m venv bench/.venv-llmc
    bench/.venv-llmc/bin/pip install torch==2.13.0
    bench/.venv-llmc/bin/pip install llmcompressor==0.14.0.1

Usage: ``python bench/experts_vs_reference.py [--ratio 0.25] [--repeats 3] [--nsamples 32] [--seqlen 256]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PARE_SHARED_DIR", REPO.parent / "shared"))
PEER_VENV = REPO / "bench" / ".venv-llmc"
MODEL_SPEC = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=32, num_experts=32, num_experts_per_tok=4,
                  norm_topk_prob=True, vocab_size=32000, max_position_embeddings=1024, tie_word_embeddings=False)


def _generate_check(model, tok) -> dict:
    import torch

    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
        plain = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    return {"generates": int(cached.shape[1] - ids.shape[1]),
            "cache_matches_no_cache": bool(torch.equal(cached, plain))}


# ----------------------------------------------------------------------------------------- workers
def worker_pare(a: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import pare
    from pare.methods.experts import ExpertsConfig

    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.model_path, dtype=torch.float32).eval()
    ids = torch.load(a.calib, weights_only=True)
    cfg = ExpertsConfig(expert_ratio=a.ratio, importance="reap", merge=a.merge)
    runtime = pare.RuntimeConfig(device="cpu", progress=False, sequential=a.protocol == "sequential")
    t0, c0 = time.perf_counter(), time.process_time()
    report = pare.prune(model, cfg, ids, runtime=runtime, batch_size=a.batch_size)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    tok = AutoTokenizer.from_pretrained(a.model_path)
    pare.save(model, tok, a.out, report)
    reloaded = AutoModelForCausalLM.from_pretrained(a.out).eval()
    probe = ids[:1, :64]
    with torch.no_grad():
        same = bool(torch.allclose(model(probe).logits, reloaded(probe).logits, atol=1e-5))
    rows = report.scores["experts"]
    return {"prune_seconds": seconds, "prune_cpu_seconds": cpu, "kept": {str(r["layer"]): r["kept"] for r in rows},
            "scores": {str(r["layer"]): r["scores"] for r in rows}, "reload_from_pretrained_same_logits": same,
            **_generate_check(reloaded, tok)}


def worker_llmc(a: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import repack_moe
    from llmcompressor.modifiers.pruning.reap import REAPPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.model_path, dtype=torch.float32).eval()
    ids = torch.load(a.calib, weights_only=True)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    report_path = str(Path(a.out) / "retained.json")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    pipeline = "sequential" if a.protocol == "sequential" else "basic"
    t0, c0 = time.perf_counter(), time.process_time()  # model load and imports stay outside, as for pare
    oneshot(model=model, dataset=ds, recipe=[REAPPruningModifier(sparsity=a.ratio, report_path=report_path)],
            num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1], batch_size=a.batch_size,
            shuffle_calibration_samples=False, moe_calibrate_all_experts=a.all_experts, pipeline=pipeline)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    retained = json.loads(Path(report_path).read_text())
    kept = {name.split(".")[2]: sorted(v) for name, v in retained.items()}  # model.layers.<i>.mlp
    out: dict = {"prune_seconds": seconds, "prune_cpu_seconds": cpu, "kept": kept}
    tok = AutoTokenizer.from_pretrained(a.model_path)
    try:
        out.update(_generate_check(model, tok))
        repack_moe(model)
        model.save_pretrained(Path(a.out) / "model")
        reloaded = AutoModelForCausalLM.from_pretrained(Path(a.out) / "model").eval()
        probe = ids[:1, :64]
        with torch.no_grad():
            out["reload_from_pretrained_same_logits"] = bool(
                torch.allclose(model(probe).logits, reloaded(probe).logits, atol=1e-5))
    except Exception as exc:  # report what the peer cannot do rather than stop the comparison
        out["reload_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return out


# ----------------------------------------------------------------------------------------- driver
def build_model(out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen3_moe", **MODEL_SPEC, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "llama2").save_pretrained(out)


def calibration(model_path: Path, nsamples: int, seqlen: int, out: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    from pare.calibration.data import calibration_windows

    tok = AutoTokenizer.from_pretrained(model_path)
    ids = calibration_windows(tok, "c4", nsamples, seqlen, seed=0)
    torch.save(ids, out)


def run_worker(kind: str, a: argparse.Namespace, model_path: Path, calib: Path, out: Path, protocol: str,
               merge: bool = False) -> dict:
    python = str(PEER_VENV / "bin" / "python") if kind == "llmc" else sys.executable
    cmd = [python, str(Path(__file__).resolve()), "--worker", kind, "--protocol", protocol,
           "--model-path", str(model_path), "--calib-file", str(calib), "--out", str(out), "--ratio", str(a.ratio),
           "--batch-size", str(a.batch_size), "--threads", str(a.threads)]
    cmd += ["--merge"] if merge else []
    cmd += ["--all-experts"] if a.all_experts else []
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") if kind == "pare" else "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.timeout)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("WORKER_JSON "):
            return json.loads(line[len("WORKER_JSON "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"error": f"{kind} worker failed (exit {proc.returncode}): {' | '.join(tail)}"}


def quality(dense_path: Path, pruned: dict[str, Path], nwindows: int, seqlen: int) -> dict:
    """C4 perplexity and mean KL(dense || pruned) of the next-token distributions on held-out windows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pare.calibration.data import eval_token_ids
    from pare.eval.perplexity import perplexity

    tok = AutoTokenizer.from_pretrained(dense_path)
    stream = eval_token_ids(tok, "c4", split="test", max_tokens=nwindows * seqlen).reshape(-1)
    windows = stream[: nwindows * seqlen].reshape(nwindows, seqlen)
    dense = AutoModelForCausalLM.from_pretrained(dense_path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = [torch.log_softmax(dense(w[None]).logits.float(), -1) for w in windows]
    out = {"dense": {"ppl": perplexity(dense, stream[None, : nwindows * seqlen], seqlen, progress=False).ppl}}
    for name, path in pruned.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            kl = [torch.nn.functional.kl_div(torch.log_softmax(model(w[None]).logits.float(), -1), r,
                                             log_target=True, reduction="none").sum(-1).mean()
                  for w, r in zip(windows, ref, strict=True)]
        out[name] = {"ppl": perplexity(model, stream[None, : nwindows * seqlen], seqlen, progress=False).ppl,
                     "kl_to_dense": float(torch.stack(kl).mean())}
    return out


def direct_reap(model_path: Path, calib: Path, ratio: float, batch_size: int) -> dict:
    """REAP written out plainly, on the dense model's own forward (the ``dense`` protocol): per expert,
    its output computed from its weights for every token routed to it, gate x L2 norm, mean over
    those tokens; the lowest ``ratio`` of each layer dropped."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    ids = torch.load(calib, weights_only=True)
    num = model.config.num_experts
    sums = [torch.zeros(num, dtype=torch.float64) for _ in model.model.layers]
    counts = [torch.zeros(num, dtype=torch.float64) for _ in model.model.layers]

    def hook(i: int):
        def run(mod, args, _out):
            hidden, index, weights = args
            for e in range(num):
                tok, slot = torch.where(index == e)
                gate, up = torch.nn.functional.linear(hidden[tok], mod.gate_up_proj[e]).chunk(2, dim=-1)
                out = torch.nn.functional.linear(mod.act_fn(gate) * up, mod.down_proj[e])
                sums[i][e] += (weights[tok, slot].double() * out.double().norm(dim=-1)).sum()
                counts[i][e] += len(tok)
        return run

    handles = [layer.mlp.experts.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for batch in ids.split(batch_size):
            model(batch)
    for h in handles:
        h.remove()
    drop = int(num * ratio)
    return {str(i): sorted(torch.topk(s / c.clamp(min=1), num - drop).indices.tolist())
            for i, (s, c) in enumerate(zip(sums, counts, strict=True))}


def compare(pare_run: dict, ref_run: dict) -> dict:
    same, diffs = 0, []
    layers = sorted(pare_run["kept"], key=int)
    for layer in layers:
        p, r = set(pare_run["kept"][layer]), set(ref_run["kept"].get(layer, []))
        if p == r:
            same += 1
            continue
        scores = pare_run["scores"][layer]
        diffs.append({"layer": int(layer), "only_pare": sorted(p - r), "only_reference": sorted(r - p),
                      "pare_scores": {str(e): scores[e] for e in sorted(p ^ r)},
                      "cutoff_gap": sorted(scores, reverse=True)[len(p) - 1] - sorted(scores, reverse=True)[len(p)]})
    return {"layers_identical": same, "layers": len(layers), "differences": diffs}


def protocol_runs(a: argparse.Namespace, model_path: Path, calib: Path, work: Path, protocol: str) -> dict:
    """Both tools ``--repeats`` times, alternating who goes first; medians of wall and CPU time."""
    runs: dict[str, list[dict]] = {"pare": [], "reference": []}
    for rep in range(a.repeats):
        for who in [("pare", "reference"), ("reference", "pare")][rep % 2]:
            kind = "pare" if who == "pare" else "llmc"
            runs[who].append(run_worker(kind, a, model_path, calib, work / f"{protocol}-{who}-{rep}", protocol))
    errors = [r["error"] for rs in runs.values() for r in rs if "error" in r]
    if errors:
        return {"errors": errors}
    med = {w: {k: statistics.median(r[k] for r in rs) for k in ("prune_seconds", "prune_cpu_seconds")}
           for w, rs in runs.items()}
    return {
        "same_experts": compare(runs["pare"][0], runs["reference"][0]),
        "runs_agree": {w: all(r["kept"] == rs[0]["kept"] for r in rs) for w, rs in runs.items()},
        "median": med,
        "runs": {w: [[round(r["prune_seconds"], 2), round(r["prune_cpu_seconds"], 2)] for r in rs]
                 for w, rs in runs.items()},
        "wall_ratio_pare_over_reference": med["pare"]["prune_seconds"] / med["reference"]["prune_seconds"],
        "cpu_ratio_pare_over_reference": med["pare"]["prune_cpu_seconds"] / med["reference"]["prune_cpu_seconds"],
        "checks": {w: {k: v for k, v in rs[0].items() if k not in ("kept", "scores") and "seconds" not in k}
                   for w, rs in runs.items()},
    }


def main(a: argparse.Namespace) -> None:
    if not (PEER_VENV / "bin" / "python").exists():
        print(json.dumps({"error": f"peer venv missing: create {PEER_VENV} (see this script's docstring)"}))
        return
    work = Path(tempfile.mkdtemp(prefix="pare-experts-bench-"))
    model_path, calib = work / "dense", work / "calib.pt"
    build_model(model_path)
    calibration(model_path, a.nsamples, a.seqlen, calib)
    result: dict = {
        "model": {"type": "qwen3_moe (random weights)", **MODEL_SPEC},
        "calibration": {"dataset": "c4", "nsamples": a.nsamples, "seqlen": a.seqlen, "batch_size": a.batch_size},
        "ratio": a.ratio, "moe_calibrate_all_experts": a.all_experts, "threads": a.threads,
    }
    for protocol in a.protocols:
        result[protocol] = protocol_runs(a, model_path, calib, work, protocol)
        if protocol == "dense" and "errors" not in result[protocol]:
            direct = direct_reap(model_path, calib, a.ratio, a.batch_size)
            pare_kept = json.loads((work / "dense-pare-0" / "pare.json").read_text())["scores"]["experts"]
            result[protocol]["pare_same_as_direct_reap"] = all(
                r["kept"] == direct[str(r["layer"])] for r in pare_kept)
        if protocol == "sequential":
            result[protocol]["note"] = (
                "not a like-for-like comparison: llm-compressor 0.14 runs the traced decoder layers of this model "
                "without the causal mask, so from layer 0 on its MoE inputs are those of bidirectional attention, "
                "not the model's own; differing choices here come from that, not from the scores (see 'dense', "
                "where both tools see the model's own activations)")
        print(json.dumps({protocol: result[protocol]}), file=sys.stderr, flush=True)
    if not a.skip_merge:
        merged = run_worker("pare", a, model_path, calib, work / "merge", "sequential", merge=True)
        removed = run_worker("pare", a, model_path, calib, work / "remove", "sequential")
        result["merge"] = {"prune_seconds": merged.get("prune_seconds"), "error": merged.get("error"),
                           "quality": None if "error" in merged or "error" in removed else
                           quality(model_path, {"remove": work / "remove", "merge": work / "merge"},
                                   a.eval_windows, a.seqlen)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", choices=["pare", "llmc"])
    p.add_argument("--model-path")
    p.add_argument("--calib-file", dest="calib")
    p.add_argument("--out")
    p.add_argument("--merge", action="store_true")
    p.add_argument("--protocol", choices=["sequential", "dense"], default="sequential")
    p.add_argument("--protocols", nargs="+", default=["sequential", "dense"], choices=["sequential", "dense"])
    p.add_argument("--skip-merge", action="store_true")
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--all-experts", action="store_true",
                   help="the reference runs every expert on every token (oneshot's default; REAP does not need it)")
    args = p.parse_args()
    if args.worker:
        result = (worker_pare if args.worker == "pare" else worker_llmc)(args)
        print("WORKER_JSON " + json.dumps(result))
    else:
        main(args)
