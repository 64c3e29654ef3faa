"""OSSCAR channel selection speed and objective: the code before the speed-up vs the current one.

Per intermediate size ``n`` a Llama-like MLP layer is simulated (hidden 2048): correlated hidden
states ``X`` (T tokens), down-projection inputs ``H = silu(X Wg^T) * (X Wu^T)``, Gram ``G = H^T H``
and a random ``W_down``; half of the channels are removed. Variants, run back to back on the same
inputs (the machine is shared, so timings are noisy):

- ``old``: ``select_groups`` of ``src/pare/ops/osscar.py`` at commit ``--ref`` (``git show``; default
  a73a8c1, before the speed-up: 64 fixed elimination blocks, three fp64 solves),
- ``fast``: the current default (adaptive elimination blocks),
- ``exact``: the current one-at-a-time greedy (``exact=True``), only for ``n <= --exact-max``,
- with ``--elim-only``: ``fast0`` / ``exact0``, the same without swap search (``max_swaps=0``), to
  compare the elimination alone (``vs_exact0``).

One JSON line per (n, variant): seconds, ``f(S)`` (``error``), relative error ``f / tr(W G W^T)``,
and ``vs_exact`` / ``vs_old`` (relative difference of ``f``).

    PYTHONPATH=src python bench/osscar_speed.py [--sizes 1376 2816 5632] [--tokens 4096]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import types
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from pare.ops.osscar import select_groups  # noqa: E402


def old_module(ref: str) -> types.ModuleType:
    """``pare.ops.osscar`` at commit ``ref`` as a separate module (for the old timings)."""
    src = subprocess.run(["git", "show", f"{ref}:src/pare/ops/osscar.py"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    mod = types.ModuleType("osscar_old")
    sys.modules["osscar_old"] = mod  # dataclasses look their module up
    exec(compile(src, "osscar_old.py", "exec"), mod.__dict__)
    return mod


def layer(n: int, hidden: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Gram of the down-projection inputs [n, n], W_down [hidden, n]) of a random gated MLP."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    x = x @ (torch.randn(hidden, hidden, generator=g) / hidden**0.5 + 0.5 * torch.eye(hidden))
    wg = torch.randn(n, hidden, generator=g) / hidden**0.5
    wu = torch.randn(n, hidden, generator=g) / hidden**0.5
    h = torch.nn.functional.silu(x @ wg.t()) * (x @ wu.t())
    return h.t() @ h, torch.randn(hidden, n, generator=g) / n**0.5


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1376, 2816, 5632])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--exact-max", type=int, default=2816)
    ap.add_argument("--elim-only", action="store_true", help="add fast0/exact0 (no swap search)")
    ap.add_argument("--ref", default="a73a8c1", help="commit of the old code")
    ap.add_argument("--old-max", type=int, default=11008, help="run the old code only up to this n")
    args = ap.parse_args()
    old = old_module(args.ref)
    small = layer(256, 128, 512, seed=0)
    select_groups(*small, 128), old.select_groups(*small, 128)  # warm-up (thread pools, kernels)
    for n in args.sizes:
        gram, w = layer(n, args.hidden, args.tokens, seed=n)
        quota = n - int(args.ratio * n)
        runs = {"fast": partial(select_groups, gram, w, quota)}
        if n <= args.old_max:
            runs["old"] = partial(old.select_groups, gram, w, quota)
        if n <= args.exact_max:
            runs["exact"] = partial(select_groups, gram, w, quota, exact=True)
        if args.elim_only:
            runs["fast0"] = partial(select_groups, gram, w, quota, max_swaps=0)
            if n <= args.exact_max:
                runs["exact0"] = partial(select_groups, gram, w, quota, max_swaps=0, exact=True)
        res = {}
        for name, fn in runs.items():
            sel, sec = timed(fn)
            res[name] = (sel, sec)
        for name, (sel, sec) in res.items():
            line = {"n": n, "kept": len(sel.keep), "variant": name, "seconds": round(sec, 2),
                    "error": sel.error, "rel_error": sel.error / sel.total, "swaps": sel.swaps,
                    "tokens": args.tokens, "threads": torch.get_num_threads()}
            refs = ("exact0",) if name.endswith("0") else ("exact", "old")
            for ref in refs:
                if ref in res and ref != name:
                    line[f"vs_{ref}"] = (sel.error - res[ref][0].error) / res[ref][0].error
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
