"""Coverage report: every causal-LM and image-text-to-text model type of the installed transformers,
as a tiny random model, through ``inspect``, one weight-sparsity, one depth and one width method.

For each model type: build a tiny random model from its default config shrunk
(``bench/tiny_configs.py``), then run

* ``inspect``: ``pare.arch.describe`` and the parameter split by part,
* ``wanda`` (50% unstructured), ``shortgpt`` (one layer), ``osscar`` (25% of MLP channels),

each on a fresh copy, followed by save -> ``pare.load`` with identical logits (and the family's Auto
class when the cut is uniform) and, for depth, greedy generation with the KV cache equal to
generation without it. Each cell is ``ok``, ``refused`` (a pare error naming the reason) or ``FAIL``
(any other exception, with its traceback in the JSON). Every step runs under a time limit and an
exception guard, so one bad family does not stop the report.

Usage::

    /work/notes/heavy-run python bench/coverage.py --out bench/results/coverage [--types llama,mamba]

Writes ``coverage.json`` and ``coverage.md`` under ``--out`` and prints the table and totals.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import logging
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_configs import VOCAB, build, count_meta_params, tiny_config

METHODS = ("inspect", "sparsity", "depth", "width")
MAX_PARAMS = 30_000_000
"""A shrunk model above this is not built (its shrinking rule is missing)."""

ENCODER_FAMILIES = {
    # ``*ForCausalLM`` heads on encoder or encoder-decoder stacks (BERT-style decoders, seq2seq decoders,
    # speech/music decoders): not decoder-only LMs, counted apart from the goal's denominator.
    "bart", "bert", "bert-generation", "big_bird", "bigbird_pegasus", "blenderbot", "blenderbot-small",
    "camembert", "data2vec-text", "electra", "ernie", "marian", "mbart", "megatron-bert", "mvp",
    "pegasus", "plbart", "prophetnet", "rembert", "roberta", "roberta-prelayernorm", "roc_bert",
    "roformer", "trocr", "whisper", "xlm", "xlm-roberta", "xlm-roberta-xl", "xlnet", "xmod", "musicgen",
    "musicgen_melody", "reformer", "cpmant", "moshi", "moss_transcribe_diarize",
}


_DRAFT = ("a speculative-decoding draft model: its forward needs the main Gemma 4 model's input embeddings and "
          "shared KV states, so it does not run on token ids alone")
WHY_NOT_BUILT = {
    # model_type -> why transformers cannot build or run its tiny model here (shown before the exception)
    "gemma3n": "needs timm and torchvision (its vision tower is a timm model), not installed here; "
               "its text decoder gemma3n_text is covered",
    "gemma4_assistant": _DRAFT,
    "gemma4_unified_assistant": _DRAFT,
    "blt": "transformers' own forward fails: BLT builds its KV cache from config.num_hidden_layers, which BltConfig "
           "lacks (its encoder, global and decoder stacks have their own configs)",
}
"""Types whose tiny model is not built for a reason outside pare's reach, said in the table."""


class StepTimeout(Exception):
    """A step ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def _raise(signum: int, frame: Any) -> None:
        raise StepTimeout(f"timed out after {seconds} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def guarded(fn: Callable[[], Any], seconds: int) -> dict[str, Any]:
    """``{"status": "ok"|"refused"|"FAIL", "reason", "traceback", "seconds", "info"}`` for one step."""
    from pare.errors import PareError

    start = time.perf_counter()
    out: dict[str, Any] = {}
    try:
        with time_limit(seconds), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info = fn()
        out = {"status": "ok", "info": info}
    except PareError as exc:
        out = {"status": "refused", "reason": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:
        out = {"status": "FAIL", "reason": f"{type(exc).__name__}: {exc}"[:500],
               "traceback": traceback.format_exc(limit=-8)}
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


def auto_class(kind: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForCausalLM if kind == "causal" else AutoModelForImageTextToText


def reload(kind: str, path: Path, cls: Any) -> tuple[Any, str]:
    """The saved model through the kind's Auto class, or its own class where transformers' Auto mapping
    cannot load the config it wrote (``MllamaForCausalLM``); and which loader it was."""
    try:
        return auto_class(kind).from_pretrained(path).eval(), auto_class(kind).__name__
    except ValueError as exc:
        if "Unrecognized configuration class" not in str(exc):
            raise
        return cls.from_pretrained(path).eval(), f"{cls.__name__} (the Auto class does not map this config)"


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _same_generation(model: Any, ids: torch.Tensor) -> None:
    """Greedy decoding with the KV cache must equal decoding without it (cache layout consistent)."""
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids[:1, :8], use_cache=True, **kw)
        plain = model.generate(ids[:1, :8], use_cache=False, **kw)
    if not torch.equal(cached, plain):
        raise AssertionError(f"generation with the KV cache differs from without: {cached.tolist()} vs "
                             f"{plain.tolist()}")


def _method_config(method: str) -> Any:
    import pare

    if method == "sparsity":
        return pare.WandaConfig(sparsity=0.5)
    if method == "depth":
        return pare.ShortGPTConfig(num_layers=1)
    return pare.OsscarConfig(mlp_ratio=0.25)


def run_method(model: Any, kind: str, method: str, ids: torch.Tensor, workdir: Path) -> dict[str, Any]:
    """Prune a copy with ``method``, save, reload with pare.load (and the Auto class when uniform)."""
    import pare
    from pare.io import read_manifest

    pruned = copy.deepcopy(model)
    runtime = pare.RuntimeConfig(device="cpu", progress=False)
    report = pare.prune(pruned, _method_config(method), ids, runtime=runtime, batch_size=2)
    want = _logits(pruned, ids)
    out = workdir / method
    pare.save(pruned, None, out, report)
    reloaded = pare.load(out).eval()
    if not torch.equal(_logits(reloaded, ids), want):
        raise AssertionError("pare.load logits differ from the pruned model's")
    manifest = read_manifest(out) or {}
    uniform = bool(manifest.get("uniform", True))
    loader = "pare.load"
    if uniform:
        auto, loader = reload(kind, out, type(pruned))
        if not torch.equal(_logits(auto, ids), want):
            raise AssertionError("from_pretrained logits differ from the pruned model's")
    if method == "depth":
        _same_generation(reloaded, ids)
    params = sum(p.numel() for p in pruned.parameters())
    return {"uniform": uniform, "params_after": params, "reloaded_with": loader}


def inspect(model: Any) -> dict[str, Any]:
    from pare.arch import describe
    from pare.cli.commands import params_by_part

    arch = describe(model)
    parts = params_by_part(model, arch)
    return {
        "layers": arch.num_layers, "attention_layers": sum(r.attention is not None for r in arch.layers),
        "mlp_layers": sum(r.mlp is not None for r in arch.layers),
        "expert_layers": sum(r.experts is not None for r in arch.layers),
        "params": parts["total"], "other_params": parts["other"],
    }


def cover(model_type: str, kind: str, limit: int) -> dict[str, Any]:
    """One row of the table."""
    row: dict[str, Any] = {"model_type": model_type, "kind": kind,
                           "category": "encoder" if model_type in ENCODER_FAMILIES else "decoder"}
    holder: dict[str, Any] = {}

    def _build() -> dict[str, Any]:
        config = tiny_config(model_type)
        n = count_meta_params(auto_class(kind), config)
        if n > MAX_PARAMS:
            raise ValueError(f"the shrunk config still has {n:,} parameters (add a rule to tiny_configs.SHRINK)")
        model = build(auto_class(kind), config)
        ids = torch.randint(3, min(VOCAB, model.config.get_text_config().vocab_size), (4, 16),
                            generator=torch.Generator().manual_seed(0))
        want = _logits(model, ids)
        with tempfile.TemporaryDirectory(prefix=f"pare-cov-{model_type}-dense-") as tmp:
            model.save_pretrained(tmp)  # a tiny model transformers itself cannot round-trip is not pare's to test
            again, _ = reload(kind, Path(tmp), type(model))
            if not torch.equal(_logits(again, ids), want):
                raise ValueError("transformers' own save/reload of the dense tiny model changes its logits")
        holder.update(model=model, ids=ids)
        return {"class": type(model).__name__, "params": n}

    row["build"] = guarded(_build, limit)
    if row["build"]["status"] != "ok":
        row["build"]["status"] = "not built"
        if model_type in WHY_NOT_BUILT:
            row["build"]["reason"] = f"{WHY_NOT_BUILT[model_type]} ({row['build'].get('reason', '')})"
        return row
    model, ids = holder["model"], holder["ids"]
    row["inspect"] = guarded(lambda: inspect(model), limit)
    with tempfile.TemporaryDirectory(prefix=f"pare-cov-{model_type}-") as tmp:
        for method in METHODS[1:]:
            row[method] = guarded(lambda m=method: run_method(model, kind, m, ids, Path(tmp)), limit)
    holder.clear()
    gc.collect()
    return row


def model_types(kinds: tuple[str, ...]) -> list[tuple[str, str]]:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    out = []
    if "causal" in kinds:
        out += [(t, "causal") for t in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)]
    if "image-text" in kinds:
        out += [(t, "image-text") for t in sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)]
    return out


def _cell(step: dict[str, Any] | None) -> str:
    if step is None:
        return "-"
    return str(step["status"])


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per kind and category: how many types were built, and per method how many work / refuse / fail."""
    out: dict[str, Any] = {}
    for kind in sorted({r["kind"] for r in rows}):
        for category in ("decoder", "encoder"):
            group = [r for r in rows if r["kind"] == kind and r["category"] == category]
            if not group:
                continue
            built = [r for r in group if r["build"]["status"] == "ok"]
            entry: dict[str, Any] = {"types": len(group), "built": len(built)}
            for method in METHODS:
                counts = {s: sum(_cell(r.get(method)) == s for r in built) for s in ("ok", "refused", "FAIL")}
                counts["ok_of_built_pct"] = round(100.0 * counts["ok"] / len(built), 1) if built else 0.0
                counts["ok_of_all_pct"] = round(100.0 * counts["ok"] / len(group), 1)
                entry[method] = counts
            out[f"{kind}/{category}"] = entry
    return out


def markdown(rows: list[dict[str, Any]], summary: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "# pare coverage report", "",
        f"transformers {meta['transformers']}, torch {meta['torch']}; tiny random models "
        f"(bench/tiny_configs.py); {meta['seconds']:.0f} s. Cells: `ok`, `refused` (a pare error "
        "naming the reason), `FAIL` (anything else; traceback in coverage.json).", "",
        "## Totals", "",
        "| kind / category | types | built | " + " | ".join(f"{m} ok / refused / FAIL" for m in METHODS) + " |",
        "|---|---|---|" + "---|" * len(METHODS),
    ]
    for key, e in summary.items():
        cells = [f"{e[m]['ok']} / {e[m]['refused']} / {e[m]['FAIL']} ({e[m]['ok_of_built_pct']}%)" for m in METHODS]
        lines.append(f"| {key} | {e['types']} | {e['built']} | " + " | ".join(cells) + " |")
    lines += ["", "## Per model type", "",
              "| model type | kind | category | build | " + " | ".join(METHODS) + " | first reason |",
              "|---|---|---|---|" + "---|" * len(METHODS) + "---|"]
    for r in rows:
        steps = [r.get(m) for m in METHODS]
        reason = next((s.get("reason", "") for s in [r["build"], *steps] if s and s["status"] != "ok"), "")
        reason = reason.replace("|", "/").replace("\n", " ")[:240 if r["model_type"] in WHY_NOT_BUILT else 160]
        lines.append(f"| {r['model_type']} | {r['kind']} | {r['category']} | {r['build']['status']} | "
                     + " | ".join(_cell(s) for s in steps) + f" | {reason} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/coverage", help="directory for coverage.json / .md")
    parser.add_argument("--types", default="", help="comma-separated model types (default: all)")
    parser.add_argument("--kinds", default="causal,image-text", help="causal, image-text or both")
    parser.add_argument("--limit", type=int, default=120, help="seconds per step")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import transformers

    wanted = {t for t in args.types.split(",") if t}
    todo = [(t, k) for t, k in model_types(tuple(args.kinds.split(","))) if not wanted or t in wanted]
    start = time.perf_counter()
    rows = []
    for i, (model_type, kind) in enumerate(todo):
        row = cover(model_type, kind, args.limit)
        rows.append(row)
        steps = [_cell(row.get(m)) for m in METHODS]
        print(f"[{i + 1}/{len(todo)}] {kind:10s} {model_type:28s} build={row['build']['status']:9s} "
              + " ".join(f"{m}={s}" for m, s in zip(METHODS, steps, strict=True)), flush=True)
    meta = {"transformers": transformers.__version__, "torch": torch.__version__,
            "seconds": time.perf_counter() - start, "step_limit_s": args.limit, "threads": 1}
    summary = totals(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "coverage.json").write_text(json.dumps({"meta": meta, "totals": summary, "rows": rows}, indent=1,
                                                  default=str))
    (out / "coverage.md").write_text(markdown(rows, summary, meta))
    for key, e in summary.items():
        print(f"{key}: {e['built']}/{e['types']} built; " + "; ".join(
            f"{m} {e[m]['ok']} ok / {e[m]['refused']} refused / {e[m]['FAIL']} FAIL" for m in METHODS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
