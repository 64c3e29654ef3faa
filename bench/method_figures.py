"""Every method once on stories260K: perplexity after the prune and what was chosen, as JSON.

Run it before and after a refactor and compare the two outputs (``--compare before.json``): the
figures must match to 1e-6 and the chosen layers/channels exactly. Needs ../shared (PARE_DATA_DIR).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

import pare
from pare.api import calibration_ids, evaluate, load_model, prune
from pare.config import CalibrationConfig, RuntimeConfig

SHARED = Path(os.environ.get("PARE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
MODEL = str(SHARED / "models" / "stories260K")

RUNS: dict[str, tuple[str, dict]] = {
    "magnitude-50": ("magnitude", {"sparsity": 0.5}),
    "magnitude-row-owl70": ("magnitude", {"sparsity": 0.7, "granularity": "row", "profile": "owl"}),
    "wanda-50": ("wanda", {"sparsity": 0.5}),
    "wanda-2:4": ("wanda", {"pattern": "2:4"}),
    "wanda-owl70": ("wanda", {"sparsity": 0.7, "profile": "owl"}),
    "sparsegpt-50": ("sparsegpt", {"sparsity": 0.5}),
    "sparsegpt-2:4": ("sparsegpt", {"pattern": "2:4"}),
    "shortgpt-1": ("shortgpt", {"num_layers": 1}),
    "angular-1": ("angular", {"num_layers": 1}),
    "ppl-window-1": ("ppl-window", {"num_layers": 1}),
    "layers-2": ("layers", {"layers": "2"}),
    "sublayer-2": ("sublayer", {"num_sublayers": 2}),
    "osscar-25": ("osscar", {"mlp_ratio": 0.25}),
    "osscar-heads": ("osscar", {"mlp_ratio": 0.25, "attn_ratio": 0.5}),
    "width-magnitude": ("width", {"pruning_ratio": 0.5}),
    "width-flap": ("width", {"pruning_ratio": 0.5, "importance": "flap", "hidden": False}),
    "width-taylor-global": ("width", {"pruning_ratio": 0.5, "importance": "taylor", "allocation": "global",
                                      "hidden": False}),
}


def _plain(o: object) -> object:
    to_dict = getattr(o, "to_dict", None)
    return to_dict() if callable(to_dict) else str(o)


def config_of(method: str, options: dict):
    registry = getattr(pare, "METHODS", None)
    entry = registry[method]
    cls = getattr(entry, "config_class", entry)
    return cls.from_dict(options)


def one(name: str, method: str, options: dict, calib: CalibrationConfig) -> dict:
    torch.manual_seed(0)
    model, tok = load_model(MODEL, dtype="float32")
    ids = calibration_ids(tok, calib, model)
    report = prune(model, config_of(method, options), ids, runtime=RuntimeConfig(device="cpu", progress=False),
                   batch_size=calib.batch_size)
    res = evaluate(model, tok, dataset="tinystories", seqlen=256, max_windows=16, speed=False, progress=False)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    digest = hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]
    weights = hashlib.sha256(b"".join(v.detach().float().numpy().tobytes() for v in model.state_dict().values()))
    return {"ppl": res["ppl"], "params": res["params"], "nonzero": res["nonzero_params"],
            "shapes": digest, "weights": weights.hexdigest()[:16],
            "edits": json.loads(json.dumps(report.edits, default=_plain)),
            "scores": {k: v for k, v in report.scores.items() if k in ("removed_layers", "removed", "chosen")}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--compare", default=None, help="a JSON file of an earlier run to compare with")
    args = ap.parse_args()
    calib = CalibrationConfig(dataset="tinystories", nsamples=32, seqlen=256, seed=0, batch_size=8)
    out = {}
    for name, (method, options) in RUNS.items():
        if args.only and name not in args.only:
            continue
        out[name] = one(name, method, options, calib)
        print(f"{name}: ppl {out[name]['ppl']:.6f}", file=sys.stderr)
    print(json.dumps(out, indent=1))
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        bad = []
        for name, now in out.items():
            was = before.get(name)
            if was is None:
                continue
            if abs(was["ppl"] - now["ppl"]) > 1e-6 * max(1.0, abs(was["ppl"])):
                bad.append(f"{name}: ppl {was['ppl']} -> {now['ppl']}")
            for key in ("params", "nonzero", "shapes", "weights", "edits", "scores"):
                if was[key] != now[key]:
                    bad.append(f"{name}: {key} differs")
        print("\n".join(bad) or "all figures identical", file=sys.stderr)
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
