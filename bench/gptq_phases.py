"""Where pare's GPTQ (or joint 2:4 + int4) time goes on a real model: one JSON line of seconds per phase.

Phases: ``capture`` (the first layer's inputs), ``record_forward`` (the layer passes that record the
inputs, Gram time excluded), ``gram`` (``InputStats.add``: ``X^T X``), ``factor`` (Hessian, act order
and the inverse-Hessian factor), ``solve`` (the OBS column loops: ``gptq_quantize`` and SparseGPT's
``sparsegpt_prune_factored``), ``propagate_forward`` (the passes with the changed weights that feed
the next layer), and ``total`` (``pare.prune``). Timers wrap the functions by monkeypatching, so the
figures include nothing the run would not do.

Usage: ``python bench/gptq_phases.py [--setting gptq|joint] [--layers N] [--nsamples 32] [--seqlen 256]``
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

SPENT: dict[str, float] = defaultdict(float)
DEPTH = [0]  # nesting of timed calls: an inner phase is subtracted from the outer one


def timed(name: str, fn: Callable[..., Any], pick: Callable[..., str] | None = None) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        key = pick(*args, **kwargs) if pick else name
        before = dict(SPENT)
        t0 = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            inner = sum(SPENT[k] - before.get(k, 0.0) for k in SPENT)
            SPENT[key] += time.process_time() - t0 - inner
    return wrapper


def install() -> None:
    import pare.calibration.runner as runner
    import pare.calibration.stats as stats
    import pare.methods.quantize as quantize
    import pare.methods.sparsegpt as sparsegpt

    runner.LayerStep.run = timed("", runner.LayerStep.run,  # type: ignore[method-assign]
                                 lambda self, keep_outputs=False, replace_inputs=False:
                                 "propagate_forward" if keep_outputs or replace_inputs else "record_forward")
    runner.LayerwiseRunner.capture = timed("capture", runner.LayerwiseRunner.capture)  # type: ignore[method-assign]
    stats.InputStats.add = timed("gram", stats.InputStats.add)  # type: ignore[method-assign]
    for mod in (quantize, sparsegpt):
        mod.inverse_hessian_factor = timed("factor", mod.inverse_hessian_factor)  # type: ignore[attr-defined]
        mod.act_order_perm = timed("factor", mod.act_order_perm)  # type: ignore[attr-defined]
        mod.gptq_quantize = timed("solve", mod.gptq_quantize)  # type: ignore[attr-defined]
    sparsegpt.sparsegpt_prune_factored = timed("solve", sparsegpt.sparsegpt_prune_factored)
    stats.InputStats.hessian = timed("factor", stats.InputStats.hessian)  # type: ignore[method-assign]


def main(a: argparse.Namespace) -> None:
    import torch
    from transformers import AutoTokenizer

    import pare
    from pare.calibration.data import calibration_windows
    from pare.methods.quantize import QuantizeConfig

    torch.set_flush_denormal(True)
    torch.set_num_threads(a.threads)
    model, _ = pare.load_model(a.model, dtype=torch.float32)
    if a.layers:
        model.model.layers = model.model.layers[: a.layers]
        model.config.num_hidden_layers = a.layers
    ids = calibration_windows(AutoTokenizer.from_pretrained(a.model), "c4", a.nsamples, a.seqlen, seed=0)
    cfg: Any = QuantizeConfig(scheme="int4", group_size=a.group_size, algorithm="gptq", act_order=True,
                              true_sequential=a.true_sequential) \
        if a.setting == "gptq" else pare.SparseGPTConfig(pattern="2:4", quantize="int4", group_size=a.group_size)
    install()
    runtime = pare.RuntimeConfig(device="cpu", progress=False, sequential=not a.dense_inputs)
    t0 = time.process_time()
    pare.prune(model, cfg, ids, runtime=runtime, batch_size=a.batch_size)
    total = time.process_time() - t0
    phases = {k: round(v, 2) for k, v in sorted(SPENT.items())}
    print(json.dumps({"setting": a.setting, "layers": a.layers or "all", "dense_inputs": a.dense_inputs,
                      "true_sequential": a.true_sequential, "batch_size": a.batch_size,
                      "cpu_seconds": phases, "total": round(total, 2),
                      "other": round(total - sum(SPENT.values()), 2)}), flush=True)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(Path.home() / ".cache" / "pare-models" / "smollm2-135m"))
    p.add_argument("--setting", choices=("gptq", "joint"), default="gptq")
    p.add_argument("--layers", type=int, default=0, help="keep only the first N decoder layers (0: all)")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dense-inputs", action="store_true", help="RuntimeConfig(sequential=False)")
    p.add_argument("--true-sequential", action="store_true",
                   help="gptq: QuantizeConfig(true_sequential=True) (with one batch, the layer's one forward is "
                        "counted as propagate_forward)")
    return p.parse_args()


if __name__ == "__main__":
    main(parse())
