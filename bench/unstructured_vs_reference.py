"""pare vs llm-compressor: magnitude / Wanda / SparseGPT at 50% unstructured, 2:4 and 70% + OWL.

Both tools prune the same model (fp32, CPU) on the same calibration windows (saved to a ``.pt`` file
the peer reads), each in its own fresh subprocess (so peak RSS is per run), back to back per
setting. Both write the pruned decoder weights; this script evaluates both with pare's perplexity
on the same tokens and counts the zeros itself. One JSON object per setting goes to stdout:

    {"method", "setting", "pare": {ppl, prune_seconds, peak_rss_mb, sparsity},
     "reference": {...} | {"error": why}, "ratios": {ppl_ratio, time_ratio, rss_ratio}, "dense_ppl"}

``prune_seconds`` is the wall time of the pruning call alone (``pare.prune`` / ``oneshot`` / the
mask loop); ``peak_rss_mb`` is the worker process's peak RSS (model load included). The machine may
be shared: timings are noisy, which is why each pair runs back to back, and ``--repeats N`` runs
every worker N times (alternating with its peer) and compares medians (``prune_seconds_runs`` lists
every time).

The peer lives in its own venv (llm-compressor 0.14 pins transformers <= 5.17)::

    python3 -m venv bench/.venv-peers-llmcompressor
    bench/.venv-peers-llmcompressor/bin/pip install torch==2.13.0
    bench/.venv-peers-llmcompressor/bin/pip install llmcompressor==0.14.0.1

(``--create-peer-venv`` runs exactly that). Peer pitfalls handled here (see ../shared/PEERS.md):
``MagnitudePruningModifier`` is a no-op under ``oneshot``, so magnitude uses its
``PruningMaskFactory`` unstructured mask creator (layer-wide comparison; no N:M creator exists;
pare runs magnitude twice: its default whole-matrix comparison, the reference's, and
``granularity="row"``);
``sparsity_profile="owl"`` fails, so OWL ratios are computed by hand with the reference formula and
passed as a per-layer list; ``torch.set_flush_denormal(True)`` is set in both workers (the peer's
Wanda 2:4 is ~14x slower without it).

``--model random-llama-<hidden>x<layers>`` builds a random-weight Llama (Llama-2 tokenizer from
../shared, calibration on C4) for time and memory only: its perplexity means nothing.

Usage: ``python bench/unstructured_vs_reference.py [--model ...] [--methods ...] [--settings ...]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PARE_SHARED_DIR", REPO.parent / "shared"))
PEER_VENV = REPO / "bench" / ".venv-peers-llmcompressor"
SETTINGS = {"unstructured-0.5": (0.5, None, False), "2:4": (0.5, "2:4", False), "owl-0.7": (0.7, None, True)}
METHODS = ("magnitude", "wanda", "sparsegpt")
OWL_M, OWL_LAMBDA = 5.0, 0.08
LAYER_LINEAR = re.compile(r"^model\.layers\.(\d+)\..*\.weight$")


def peak_rss_mb() -> float:
    """This process's peak RSS. ``VmHWM`` belongs to the process image, so unlike ``ru_maxrss`` it
    does not inherit the RSS of the (large) driver process that forked the worker."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def decoder_weights(model) -> dict:
    """Every 2-D weight inside a decoder layer (the matrices both tools prune)."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters()
            if LAYER_LINEAR.match(n) and p.dim() == 2 and "norm" not in n}


# --------------------------------------------------------------------------------------------
# Workers (each runs in a fresh process).


def worker_pare(a: argparse.Namespace) -> dict:
    import torch
    from safetensors.torch import save_file

    import pare

    torch.set_flush_denormal(True)
    torch.set_num_threads(a.threads)
    sparsity, pattern, owl = SETTINGS[a.setting]
    model, _ = pare.load_model(a.model_path, dtype=torch.float32)
    ids = torch.load(a.calib, weights_only=True)
    cls = {"magnitude": pare.MagnitudeConfig, "wanda": pare.WandaConfig, "sparsegpt": pare.SparseGPTConfig}[a.method]
    extra = {"granularity": a.granularity} if a.granularity else {}
    if a.layer_sparsity:  # the reference's OWL ratios, to compare the pruning alone
        cfg = cls(layer_sparsity=tuple(json.loads(a.layer_sparsity)), **extra)
    else:
        cfg = cls(sparsity=sparsity, pattern=pattern or "unstructured", profile="owl" if owl else "uniform",
                  owl_m=OWL_M, owl_lambda=OWL_LAMBDA, **extra)
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    runtime = pare.RuntimeConfig(device="cpu", progress=False, sequential=not a.dense_inputs)
    report = pare.prune(model, cfg, ids, runtime=runtime, batch_size=a.batch_size)
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb()
    save_file(decoder_weights(model), a.out)
    return {"prune_seconds": seconds, "peak_rss_mb": peak, "rss_before_prune_mb": rss0,
            "owl_layer_sparsity": report.scores.get("owl", {}).get("layer_sparsity")}


def _owl_by_hand(model, ids, target: float, by_weight_only: bool) -> list[float]:
    """OWL per-layer sparsities with the reference formula (dense model, |W| * ||X|| over all tokens)."""
    import torch

    layers = model.model.layers
    sq: dict[str, torch.Tensor] = {}
    hooks = []
    if not by_weight_only:
        for name, mod in layers.named_modules():
            if isinstance(mod, torch.nn.Linear):
                def hook(_m, args, name=name):
                    x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                    sq[name] = sq.get(name, 0) + x.square().sum(0)
                hooks.append(mod.register_forward_pre_hook(hook))
        with torch.no_grad():
            for batch in ids.split(8):
                model(input_ids=batch)
        for h in hooks:
            h.remove()
    ratios = []
    for i, layer in enumerate(layers):
        scores = []
        for name, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear):
                s = mod.weight.detach().abs()
                if not by_weight_only:
                    s = s * sq[f"{i}.{name}"].sqrt().unsqueeze(0)
                scores.append(s.flatten())
        flat = torch.cat(scores)
        ratios.append(float((flat > OWL_M * flat.mean()).float().mean()))
    lo, hi = min(ratios), max(ratios)
    scaled = [(r - lo) / (hi - lo) * 2 * OWL_LAMBDA if hi > lo else 0.0 for r in ratios]
    mean = sum(scaled) / len(scaled)
    return [1 - (v - mean + (1 - target)) for v in scaled]


def worker_peer(a: argparse.Namespace) -> dict:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.set_flush_denormal(True)
    torch.set_num_threads(a.threads)
    sparsity, pattern, owl = SETTINGS[a.setting]
    model = AutoModelForCausalLM.from_pretrained(a.model_path, dtype=torch.float32).eval()
    ids = torch.load(a.calib, weights_only=True)
    if a.method == "magnitude" and pattern:
        return {"error": "llm-compressor's PruningMaskFactory has no N:M mask creator (only unstructured, "
                         "channel, filter, block_*) and MagnitudePruningModifier is a no-op under oneshot"}
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from llmcompressor.modifiers.pruning.utils.pytorch.mask_factory import PruningMaskCreatorArgs, PruningMaskFactory

    rss0 = peak_rss_mb()
    t0 = time.perf_counter()  # imports above stay outside the timed region, as for pare
    layer_sparsity = _owl_by_hand(model, ids, sparsity, a.method == "magnitude") if owl else None
    if a.method == "magnitude":
        creator = PruningMaskFactory.create_mask_creator("unstructured")
        with torch.no_grad():
            for i, layer in enumerate(model.model.layers):
                s = layer_sparsity[i] if layer_sparsity else sparsity
                for mod in layer.modules():
                    if isinstance(mod, torch.nn.Linear):
                        w = mod.weight
                        w.mul_(creator(PruningMaskCreatorArgs(parameter=w, sparsity=s, scores=w.abs())))
    else:
        kwargs: dict = {"sparsity": layer_sparsity or sparsity, "mask_structure": pattern or "0:0",
                        "ignore": ["re:.*lm_head"]}
        if layer_sparsity:
            kwargs["targets"] = [r"re:model.layers.\d+$"]
        if a.method == "sparsegpt":
            modifier = SparseGPTModifier(block_size=128, dampening_frac=0.01, **kwargs)
        else:
            modifier = WandaPruningModifier(**kwargs)
        ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
        oneshot(model=model, dataset=ds, recipe=[modifier], num_calibration_samples=ids.shape[0],
                max_seq_length=ids.shape[1], batch_size=a.batch_size, shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb()
    save_file(decoder_weights(model), a.out)
    return {"prune_seconds": seconds, "peak_rss_mb": peak, "rss_before_prune_mb": rss0,
            "owl_layer_sparsity": layer_sparsity}


# --------------------------------------------------------------------------------------------
# Driver.


def build_random_llama(spec: str, out: Path) -> Path:
    """``random-llama-<hidden>x<layers>``: a seeded random Llama saved once under ``out``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    m = re.fullmatch(r"random-llama-(\d+)x(\d+)", spec)
    if not m:
        raise SystemExit(f"--model {spec!r}: expected a path or random-llama-<hidden>x<layers>")
    hidden, layers = int(m.group(1)), int(m.group(2))
    path = out / "model"
    if (path / "config.json").is_file():
        return path
    tok = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "llama2")
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=len(tok),
                      max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def prepare(a: argparse.Namespace) -> tuple[Path, Path, object]:
    """Model path, calibration windows file and evaluation ids."""
    import torch
    from transformers import AutoTokenizer

    from pare.calibration.data import calibration_windows, eval_token_ids

    tag = Path(a.model).name if not a.model.startswith("random-") else a.model
    work = REPO / "bench" / "results" / "unstructured_vs_reference" / tag
    work.mkdir(parents=True, exist_ok=True)
    random_model = a.model.startswith("random-")
    model_path = build_random_llama(a.model, work) if random_model else Path(a.model)
    tok = AutoTokenizer.from_pretrained(model_path)
    source = a.calib or ("c4" if random_model else "tinystories")
    calib = work / f"calib-{source}-{a.nsamples}x{a.seqlen}.pt"
    if not calib.is_file():
        torch.save(calibration_windows(tok, source, a.nsamples, a.seqlen, seed=0), calib)
    ev = eval_token_ids(tok, source, split="validation")
    return model_path, calib, ev


def evaluate(model_path: Path, weights: Path | None, ev, a: argparse.Namespace) -> dict:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from pare.eval.perplexity import perplexity

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    out: dict = {}
    if weights is not None:
        state = load_file(weights)
        missing = set(state) - set(dict(model.named_parameters()))
        if missing:
            raise RuntimeError(f"unknown weights {sorted(missing)[:3]}")
        model.load_state_dict(state, strict=False)
        zeros = sum(int((w == 0).sum()) for w in state.values())
        out["sparsity"] = zeros / sum(w.numel() for w in state.values())
    res = perplexity(model, ev, a.eval_seqlen, batch_size=4, progress=False, max_windows=a.eval_windows)
    out["ppl"] = res.ppl
    return out


def run_worker(python: str, kind: str, method: str, setting: str, model_path: Path, calib: Path, out: Path,
               a: argparse.Namespace, layer_sparsity: list[float] | None = None,
               granularity: str | None = None) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--worker", kind, "--method", method, "--setting", setting,
           "--model-path", str(model_path), "--calib-file", str(calib), "--out", str(out),
           "--batch-size", str(a.batch_size), "--threads", str(a.threads)]
    if layer_sparsity:
        cmd += ["--layer-sparsity", json.dumps(layer_sparsity)]
    if granularity:
        cmd += ["--granularity", granularity]
    if a.dense_inputs and kind == "pare":
        cmd += ["--dense-inputs"]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") if kind == "pare" else ""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.timeout)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("WORKER_JSON "):
            return json.loads(line[len("WORKER_JSON "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"{kind} worker failed (exit {proc.returncode}): {' | '.join(tail)}"}


def ensure_peer(a: argparse.Namespace) -> str | None:
    python = PEER_VENV / "bin" / "python"
    if python.is_file():
        return str(python)
    if a.create_peer_venv:
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(PEER_VENV / "bin" / "pip"), "install", "torch==2.13.0"], check=True)
        subprocess.run([str(PEER_VENV / "bin" / "pip"), "install", "llmcompressor==0.14.0.1"], check=True)
        return str(python)
    print(f"# no peer venv at {PEER_VENV}; create it with --create-peer-venv or:\n#   python3 -m venv {PEER_VENV} && "
          f"{PEER_VENV}/bin/pip install torch==2.13.0 && {PEER_VENV}/bin/pip install llmcompressor==0.14.0.1",
          file=sys.stderr)
    return None


def median_run(runs: list[dict]) -> dict:
    """One worker's repeated runs as one result: the median prune time and peak RSS, every time kept;
    the first error if any run failed (the pruned weights are the same in every run)."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    out = dict(runs[-1])
    if len(runs) > 1:
        for key in ("prune_seconds", "peak_rss_mb"):
            out[key] = statistics.median(r[key] for r in runs)
        out["prune_seconds_runs"] = [r["prune_seconds"] for r in runs]
    return out


def ratio(a: dict, b: dict, key: str) -> float | None:
    if "error" in a or "error" in b or not b.get(key):
        return None
    return a[key] / b[key]


def main(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    model_path, calib, ev = prepare(a)
    peer = ensure_peer(a)
    dense = evaluate(model_path, None, ev, a)["ppl"]
    work = calib.parent
    for setting in a.settings:
        for method in a.methods:
            runs: dict[str, list[dict]] = {"pare": [], "reference": []}
            for _ in range(a.repeats):  # pairs back to back: pare, reference, pare, reference...
                for kind, python in (("pare", sys.executable), ("reference", peer)):
                    out = work / f"{kind}-{method}-{setting.replace(':', '_')}.safetensors"
                    if python is None:
                        runs[kind].append({"error": f"llm-compressor venv missing at {PEER_VENV} (run with "
                                                    "--create-peer-venv)"})
                        continue
                    runs[kind].append(run_worker(python, "pare" if kind == "pare" else "peer", method, setting,
                                                 model_path, calib, out, a))
            res = {}
            for kind, rs in runs.items():
                res[kind] = r = median_run(rs)
                if "error" not in r:
                    r.update(evaluate(model_path, work / f"{kind}-{method}-{setting.replace(':', '_')}.safetensors",
                                      ev, a))
            line = {"method": method, "setting": setting, "model": a.model, "pare": res["pare"],
                    "reference": res["reference"],
                    "ratios": {"ppl_ratio": ratio(res["pare"], res["reference"], "ppl"),
                               "time_ratio": ratio(res["pare"], res["reference"], "prune_seconds"),
                               "rss_ratio": ratio(res["pare"], res["reference"], "peak_rss_mb")},
                    "dense_ppl": dense,
                    "calibration": {"file": calib.name, "nsamples": a.nsamples, "seqlen": a.seqlen},
                    "eval": {"seqlen": a.eval_seqlen, "windows": a.eval_windows}, "threads": a.threads,
                    "pare_calibration": "dense inputs" if a.dense_inputs else "sequential"}
            ref_ratios = res["reference"].get("owl_layer_sparsity")
            if ref_ratios:  # OWL: pare pruning with the reference's per-layer ratios isolates the pruning step
                out = work / f"pare-{method}-{setting.replace(':', '_')}-refratios.safetensors"
                r = median_run([run_worker(sys.executable, "pare", method, setting, model_path, calib, out, a,
                                           ref_ratios) for _ in range(a.repeats)])
                if "error" not in r:
                    r.update(evaluate(model_path, out, ev, a))
                line["pare_with_reference_ratios"] = {k: r.get(k) for k in ("ppl", "sparsity", "prune_seconds", "error")
                                                      if k in r}
            if method == "magnitude" and "error" not in res["reference"]:
                # pare's default compares a whole matrix, as llm-compressor's mask does; rows are the option
                out = work / f"pare-{method}-{setting.replace(':', '_')}-rows.safetensors"
                r = median_run([run_worker(sys.executable, "pare", method, setting, model_path, calib, out, a,
                                           granularity="row") for _ in range(a.repeats)])
                if "error" not in r:
                    r.update(evaluate(model_path, out, ev, a))
                line["pare_granularity_row"] = {k: r.get(k) for k in ("ppl", "sparsity", "prune_seconds",
                                                                       "peak_rss_mb", "error") if k in r}
                line["ratios"]["granularity_row_ppl_ratio"] = ratio(r, res["reference"], "ppl")
                line["ratios"]["granularity_row_time_ratio"] = ratio(r, res["reference"], "prune_seconds")
            if a.model.startswith("random-"):
                line["note"] = "random weights: perplexity is meaningless here; compare time and memory only"
            print(json.dumps(line), flush=True)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(SHARED / "models" / "stories260K"),
                   help="model path or random-llama-<hidden>x<layers>")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--calib", default=None, help="calibration source (default: tinystories, c4 for random models)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward, both tools")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=None, help="cap on evaluation windows")
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of each worker (fresh processes, pairs back to back); the median time is compared "
                        "(use 5+ where a prune takes milliseconds: single runs there vary by 2x)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in both workers (1: on a shared 2-core machine, 2 threads made small ops ~1000x "
                        "slower through OpenMP contention)")
    p.add_argument("--create-peer-venv", action="store_true")
    p.add_argument("--dense-inputs", action="store_true",
                   help="pare calibrates every layer on the dense model's activations (one pass per layer) "
                        "instead of sequentially; the reference stays sequential")
    # worker mode (internal)
    p.add_argument("--worker", choices=("pare", "peer"))
    p.add_argument("--method")
    p.add_argument("--setting")
    p.add_argument("--model-path")
    p.add_argument("--granularity", choices=("row", "layer"), help="magnitude's comparison group (worker)")
    p.add_argument("--calib-file")
    p.add_argument("--out")
    p.add_argument("--layer-sparsity", help="JSON list: explicit per-layer ratios for the pare worker")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse()
    if args.worker != "peer":  # the peer's venv has no pare (and must not import it)
        sys.path.insert(0, str(REPO / "src"))
    if args.worker:
        args.model_path, args.calib = args.model_path, args.calib_file
        result = (worker_pare if args.worker == "pare" else worker_peer)(args)
        print("WORKER_JSON " + json.dumps(result), flush=True)
    else:
        main(args)
