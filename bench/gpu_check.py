"""The GPU check, as JSON: pare's pruning on a CUDA device, for whoever has one.

For each of ``--methods`` (Wanda and SparseGPT at 50% by default) on SmolLM2-135M (``--model``):
``pare prune --device DEVICE`` in memory and with ``--stream``, each in its own process, with its
seconds, the peak GPU memory it allocated (``torch.cuda.max_memory_allocated`` on its device) and
its own peak RSS; whether the streamed weights equal the in-memory ones; then ``pare eval
--device-map auto`` of the in-memory output (accelerate's placement over the GPUs) against
``pare eval --device DEVICE``. With two GPUs or more, each method also runs with ``--devices
cuda:0,cuda:1`` (the calibration batches split across both), in memory and streamed, with the peak
memory of each GPU, and its weights are compared with the one-device run's (masks equal, largest
weight difference: the statistics are summed in another order). Without CUDA it prints
``{"skipped": ...}`` and exits 0.

    python bench/gpu_check.py [--device cuda] [--model DIR] [--methods wanda,sparsegpt] [--out results.json]

The device is whatever ``--device`` names (``cuda`` is the current CUDA device); nothing assumes a
particular GPU index.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMOL = Path("/root/.cache/pare-models/smollm2-135m")
TEXT = Path(os.environ.get("PARE_DATA_DIR", "/work/shared/data")) / "tinystories" / "train-head.txt"


def child(argv: list[str], device: str) -> int:
    """Run ``pare argv`` here and print seconds, peak GPU memory (per device when ``device`` lists
    several, comma-separated) and peak RSS as the last line."""
    import torch

    from pare.cli import main
    from pare.eval.memory import peak_rss_mb

    devs = [torch.device(d) for d in device.split(",")]
    for dev in devs:
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    rc = main(argv)
    for dev in devs:
        torch.cuda.synchronize(dev)
    peaks = [torch.cuda.max_memory_allocated(dev) for dev in devs]
    print(json.dumps({"rc": rc, "seconds": time.perf_counter() - start,
                      "max_cuda_allocated_bytes": peaks[0] if len(devs) == 1 else peaks,
                      "peak_rss_mb": peak_rss_mb()}))
    return rc


def run(argv: list[str], device: str) -> dict:
    cmd = [sys.executable, __file__, "child", device, "--", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": proc.stderr[-2000:], "argv": argv}
    cost = json.loads(lines[-1])
    body = "\n".join(lines[:-1])
    return {**cost, "report": json.loads(body) if body.startswith("{") else None}


def same_weights(a: Path, b: Path) -> bool:
    import torch
    from transformers import AutoModelForCausalLM

    sa = AutoModelForCausalLM.from_pretrained(a).state_dict()
    sb = AutoModelForCausalLM.from_pretrained(b).state_dict()
    return sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def compare_weights(a: Path, b: Path) -> dict:
    """Whether the zeros of ``a`` and ``b`` are the same, and the largest weight difference."""
    import torch
    from transformers import AutoModelForCausalLM

    sa = AutoModelForCausalLM.from_pretrained(a).state_dict()
    sb = AutoModelForCausalLM.from_pretrained(b).state_dict()
    return {"masks_equal": sorted(sa) == sorted(sb) and all(torch.equal(sa[k] == 0, sb[k] == 0) for k in sa),
            "max_abs_diff": max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)}


def two_gpus(common: list[str], method: str, work: Path, device: str) -> dict:
    """``--devices cuda:0,cuda:1`` in memory and streamed, against the one-device in-memory output."""
    rows: dict = {}
    argv = [a for a in common if a not in ("--device", device)]
    for kind, extra in (("in_memory", []), ("streamed", ["--stream"])):
        out = work / f"{method}-two-{kind}"
        res = run([*argv, "--devices", "cuda:0,cuda:1", "--out", str(out), *extra], "cuda:0,cuda:1")
        report = res.pop("report", None) or {}
        rows[kind] = {**res, "prune_seconds": report.get("prune_seconds")}
        if "error" not in res and (work / f"{method}-in_memory").is_dir():
            rows[kind]["against_one_device"] = compare_weights(work / f"{method}-in_memory", out)
    return rows


def check(args: argparse.Namespace, work: Path) -> dict:
    import torch

    dev = torch.device(args.device)
    out: dict = {"device": str(dev), "gpu": torch.cuda.get_device_name(dev), "gpus": torch.cuda.device_count(),
                 "torch": torch.__version__, "model": str(args.model), "nsamples": args.nsamples,
                 "seqlen": args.seqlen, "methods": {}}
    for method in [m for m in args.methods.split(",") if m]:
        common = ["prune", "--model", str(args.model), "--method", method, "--sparsity", "0.5", "--calib",
                  str(args.calib), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--batch-size",
                  str(args.batch), "--device", args.device, "--no-progress", "--json", "--overwrite"]
        rows = {}
        for kind, extra in (("in_memory", []), ("streamed", ["--stream"])):
            res = run([*common, "--out", str(work / f"{method}-{kind}"), *extra], args.device)
            report = res.pop("report", None) or {}
            rows[kind] = {**res, "prune_seconds": report.get("prune_seconds")}
        if all("error" not in r for r in rows.values()):
            rows["streamed_equals_in_memory"] = same_weights(work / f"{method}-in_memory", work / f"{method}-streamed")
        if torch.cuda.device_count() >= 2:
            rows["two_gpus"] = two_gpus(common, method, work, args.device)
        out["methods"][method] = rows
        print(json.dumps({method: rows}), file=sys.stderr)
    first = next((m for m in out["methods"] if "error" not in out["methods"][m]["in_memory"]), None)
    if first is not None:
        base = ["eval", str(work / f"{first}-in_memory"), "--ppl", str(args.calib), "--seqlen", str(args.seqlen),
                "--max-windows", "8", "--no-speed", "--json"]
        out["eval"] = {"device": run([*base, "--device", args.device], args.device),
                       "device_map_auto": run([*base, "--device-map", "auto"], args.device)}
    return out


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "child":
        raise SystemExit(child(sys.argv[sys.argv.index("--") + 1:], sys.argv[2]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="the CUDA device to prune on (cuda: the current one)")
    p.add_argument("--model", type=Path, default=SMOL)
    p.add_argument("--calib", type=Path, default=TEXT)
    p.add_argument("--methods", default="wanda,sparsegpt")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        res: dict = {"skipped": "CUDA is not available on this machine; run this script where a GPU is"}
    else:
        work = Path(tempfile.mkdtemp(prefix="pare-gpu-check-"))
        try:
            res = check(args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(res, indent=2, default=str)
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
