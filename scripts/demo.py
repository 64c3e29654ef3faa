"""`make demo`: two cuts of a real small model side by side, and an HTML report of both.

The structured cut (OSSCAR: a quarter of every MLP's channels removed, the rest refit) really makes the
model smaller and faster; the unstructured one (Wanda, half of every linear's weights set to zero)
keeps the quality better per weight removed but stores its zeros, so size and dense speed do not move.
Both are saved, reloaded from disk and checked against the pruned model in memory.

Uses ../shared/models/stories260K (a real pretrained Llama with GQA, evaluated on TinyStories) when it
exists; otherwise downloads HuggingFaceTB/SmolLM2-135M from the Hub (needs internet) and evaluates
on WikiText-2.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import torch

import pare
from pare.cli.commands import model_dir_bytes, print_table, transformers_bars
from pare.eval.speed import compare_speed

REPO = Path(__file__).resolve().parents[1]
LOCAL_MODEL = REPO.parent / "shared" / "models" / "stories260K"
HUB_MODEL = "HuggingFaceTB/SmolLM2-135M"


SPEED_ROUNDS = 15  # a round of this model is a fraction of a second


def _figures(model, tok, dataset: str, seqlen: int, windows: int) -> dict[str, Any]:
    return pare.evaluate(model, tok, dataset=dataset, seqlen=seqlen, batch_size=8, max_windows=windows,
                         speed=False, progress=False)


def _cut(name: str, config, source: str, calib, dense: dict[str, Any], out: Path, eval_args: tuple,
         dense_model: torch.nn.Module) -> dict:
    """Prune a fresh copy of ``source``, evaluate it, time it against the dense model in alternating
    rounds (one figure taken apart from the other would mostly measure the machine's load), save it,
    reload it and check the reload matches."""
    model, tok = pare.load_model(source, dtype=torch.float32)
    report = pare.prune(model, config, calib, tokenizer=tok, runtime=pare.RuntimeConfig(progress=False))
    after = _figures(model, tok, *eval_args)
    speed = compare_speed(model, dense_model, rounds=SPEED_ROUNDS, prompt_len=128, new_tokens=32)
    dense = {**dense, "prefill_tokens_per_s": speed.reference_prefill_tokens_per_s,
             "decode_tokens_per_s": speed.reference_decode_tokens_per_s}
    after.update({"prefill_tokens_per_s": speed.prefill_tokens_per_s, "decode_tokens_per_s": speed.decode_tokens_per_s,
                  "prefill_ratio": speed.prefill_ratio, "decode_ratio": speed.decode_ratio})
    for key in ("ppl", "params", "prefill_tokens_per_s", "decode_tokens_per_s", "dataset"):
        report.figures[f"{key}_before"], report.figures[f"{key}_after"] = dense.get(key), after.get(key)
    report.figures["size_on_disk_bytes_before"] = model_dir_bytes(source)
    path = pare.save(model, tok, out / name, report, overwrite=True)
    report.figures["size_on_disk_bytes_after"] = model_dir_bytes(path)
    pare.save(model, tok, out / name, report, overwrite=True)  # the manifest now holds the size too
    reloaded = pare.load(path)
    probe = torch.arange(1, 33).unsqueeze(0) % model.config.vocab_size
    with torch.no_grad():
        same = torch.allclose(model(probe).logits, reloaded(probe).logits, atol=1e-5)
    return {"report": report, "after": after, "path": path, "reload_ok": same, "dense": dense,
            "bytes": report.figures["size_on_disk_bytes_after"]}


def _speeds(done: dict[str, dict], phase: str) -> tuple[str, str, str]:
    """Dense tokens/s (its median beside the first cut), then each cut's median ratio to dense timed beside it:
    two absolute figures taken in different rounds would differ by the machine's load as much as by the cut."""
    first = next(iter(done.values()))
    dense = format(first["dense"][f"{phase}_tokens_per_s"], ",.0f")
    return (dense, *(f"{d['after'][f'{phase}_ratio']:.2f}x" for d in done.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "out" / "demo"))
    parser.add_argument("--windows", type=int, default=200, help="evaluation windows scored (of 256 tokens)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    local = LOCAL_MODEL.is_dir() and not os.environ.get("PARE_DEMO_HUB")
    name = str(LOCAL_MODEL) if local else HUB_MODEL
    dataset, calib_set, seqlen = ("tinystories", "tinystories", 256) if local else ("wikitext2", "c4", 2048)
    out = Path(args.out)
    print(f"model: {name}\nperplexity on {dataset} test/validation, the first {args.windows} windows of {seqlen} "
          f"tokens; calibration: 128 windows of {calib_set} train\n")
    model, tok = pare.load_model(name, dtype=torch.float32)
    eval_args = (dataset, seqlen, args.windows)
    dense = _figures(model, tok, *eval_args)
    calib = pare.CalibrationConfig(dataset=calib_set, nsamples=128, seqlen=seqlen, seed=0)
    cuts = {
        "osscar": ("structured: OSSCAR, 25% of MLP channels", pare.OsscarConfig(mlp_ratio=0.25)),
        "wanda": ("unstructured: Wanda, 50% of weights zeroed", pare.WandaConfig(sparsity=0.5)),
    }
    done = {key: _cut(key, cfg, name, calib, dense, out, eval_args, model) for key, (_, cfg) in cuts.items()}
    s, u = done["osscar"], done["wanda"]

    def row(label: str, key: str, spec: str) -> tuple[str, str, str, str]:
        return (label, format(dense[key], spec), format(s["after"][key], spec), format(u["after"][key], spec))

    dense_bytes = model_dir_bytes(name) or 0
    rows = [
        row("perplexity", "ppl", ".3f"),
        ("zero-shot accuracy", "-", "-", "-"),
        row("parameters", "params", ","),
        row("non-zero parameters", "nonzero_params", ","),
        ("size on disk (bytes)", f"{dense_bytes:,}", f"{s['bytes']:,}", f"{u['bytes']:,}"),
        ("prefill tok/s (cuts: x dense) *", *_speeds(done, "prefill")),
        ("decode tok/s (cuts: x dense) *", *_speeds(done, "decode")),
        ("prune seconds", "-", f"{s['report'].prune_seconds:.1f}", f"{u['report'].prune_seconds:.1f}"),
        ("reloaded from disk = in memory", "-", "yes" if s["reload_ok"] else "NO", "yes" if u["reload_ok"] else "NO"),
    ]
    print_table(rows, ("", "dense", cuts["osscar"][0], cuts["wanda"][0]))
    print("\nzero-shot accuracy: not run; stories260K (260K parameters, a 512-token vocabulary, trained only on "
          "children's stories) was never taught the knowledge and reasoning PIQA, ARC, HellaSwag and the other "
          "papers' tasks test. `pare eval DIR --tasks ...` measures them on a real model.")
    step_ms = 1e3 / s["dense"]["decode_tokens_per_s"]
    print(f"* speed: each cut timed against dense in {SPEED_ROUNDS} alternating rounds (median ratio). On this "
          f"{dense['params'] / 1e3:.0f}K-parameter model a decode step takes {step_ms:.1f} ms for "
          f"{2 * dense['params'] / 1e6:.1f} MFLOP of arithmetic: nearly all of it is per-call overhead (Python, "
          "kernel dispatch), the same for every cut, so on a model this small these rows show overhead and the "
          "machine's noise, not what a cut saves; README's SmolLM2-135M table gives speeds where the arithmetic "
          "dominates.")
    print(f"the structured cut is {1 - s['bytes'] / dense_bytes:.0%} smaller on disk; the unstructured one stores "
          f"its zeros (same size, dense speed) until a sparse format or N:M kernels use them")
    from pare.reporting import write_report

    written = write_report([s["path"], u["path"]], html=out / "report.html", md=out / "report.md")
    if written.note:
        print(f"note: {written.note}")
    print(f"\nsaved to {s['path']} and {u['path']}; reload with pare.load(DIR)")
    print(f"report with plots: {written.html}")
    if not (s["reload_ok"] and u["reload_ok"]):
        raise SystemExit("a reloaded model differs from the pruned one")


if __name__ == "__main__":
    with transformers_bars(False):  # the loading bars would interleave with the table
        main()
