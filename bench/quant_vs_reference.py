"""pare vs llm-compressor on a real model: SparseGPT 2:4 / 50%, GPTQ W4A16, and 2:4 + int4.

Both tools work on the same model loaded in float32 on the CPU, with the same calibration windows
(C4 train, saved to a ``.pt`` file the peer reads), each in its own fresh subprocess. Both write
the decoder weights they produced; this script evaluates both with pare's perplexity on the same
held-out tokens (Wikipedia articles from ../shared, a text neither tool calibrated on), counts the
zeros and, for quantized settings, checks that every group holds at most 16 distinct values.
One JSON object per setting goes to stdout:

    {"setting", "pare": {ppl, prune_seconds, sparsity, ...}, "reference": {...} | {"error": why},
     "ratios": {ppl_ratio, time_ratio}, "dense_ppl", "calibration", "eval"}

Settings (pare's configuration / the reference's recipe):

- ``sparsegpt-2:4``: ``SparseGPTConfig(pattern="2:4")`` (and ``nm_select="score"``, the reference's
  per-column rule, as ``pare_score``) / ``SparseGPTModifier(sparsity=0.5, mask_structure="2:4")``.
- ``sparsegpt-0.5``: unstructured 50% (pare's per-row selection, and ``mask_group="block"``, the
  reference's own rule, as ``pare_block``).
- ``gptq-w4a16``: ``QuantizeConfig(scheme="int4", group_size=G, algorithm="gptq", act_order=True)`` /
  ``GPTQModifier`` with the W4A16 scheme at group G (symmetric int4 along the input; its default
  ``actorder="static"`` is what pare's ``act_order`` does). ``--group-size`` G defaults to 64:
  SmolLM2's inputs (576) are not a multiple of 128, which both tools refuse.
- ``sparse24-int4``: pare's joint pass ``SparseGPTConfig(pattern="2:4", quantize="int4",
  group_size=G)`` (its defaults ``joint="prune-then-gptq"`` and, since 2026-12-02, dampening 0.1) / the reference's
  ``[SparseGPTModifier(2:4), GPTQModifier(W4A16 at G)]`` recipe.

pare's variants run in the same invocation (``--variants`` picks some): for ``gptq-w4a16``,
``pare_two_pass`` (``true_sequential=False``, pare's default: a recording forward per layer, then
one with the quantized weights; the same as ``pare`` unless ``--pare-extra`` sets
``true_sequential``, which solves each layer's matrices in call order, one forward per layer when
``--batch-size`` covers every window), ``pare_clip`` (``clip_search``: each
group's range shrunk to the least rounding error) and
``pare_dense_inputs`` (``RuntimeConfig(sequential=False)``: each layer calibrated on the dense
model's activations, one forward per layer instead of two); for
``sparse24-int4``, ``pare_interleaved`` (``joint="interleaved"``: the paper's one pass, each column
masked and quantized before its error is spread), ``pare_two_stage`` (pare's own recipe: SparseGPT
2:4, then GPTQ with ``keep_zeros`` on the pruned model's activations), ``pare_damp0.1``
(``percdamp=0.1``, now the joint pass's default: the same weights as ``pare``; the joint variants
that set no dampening take that default), ``pare_nm_quant`` (interleaved, each group of 4 chosen with
its kept weights' quantization error counted), ``pare_clip`` (``clip_search``), and the interleaved and two-stage
passes with dampening 0.1, ``pare_damp0.03`` / ``pare_damp0.3``, ``pare_score`` (``nm_select="score"``,
the reference's 2:4 rule) and ``pare_dense_inputs``; the reference's run also writes its output with
the 2:4 mask of its SparseGPT stage re-applied after its GPTQ stage (``reference.mask24``: what a 2:4
storage would keep of it). ``--reference-mse`` adds ``reference_mse``, the reference with its
``memoryless_mse`` range observer; ``--pare-extra JSON`` adds config fields to pare's headline run
(recorded in the output as ``pare_extra``); ``--reference-damp D`` adds the reference recipe with
dampening D in both modifiers.

``prune_seconds`` is the wall time of ``pare.prune`` / ``oneshot`` alone, ``cpu_seconds`` its process CPU
time (steadier than wall time on a shared machine). The peer venv::

    python3 -m venv bench/.venv-llmc && bench/.venv-llmc/bin/pip install torch==2.13.0 \
        && bench/.venv-llmc/bin/pip install llmcompressor==0.14.0.1

``--repeats R`` runs every variant R times in rounds (pare, reference, pare's variants, then again), so
a pair is measured back to back under the same machine load; each variant's figures are then the
medians of its runs (``runs`` holds them), and each ratio is the median of the rounds' ratios
(``per_round``). ``variant_ratios`` gives pare's other variants against the reference the same way.

Usage: ``python bench/quant_vs_reference.py [--settings ...] [--nsamples 32] [--seqlen 256] [--repeats 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PARE_SHARED_DIR", REPO.parent / "shared"))
MODEL = Path(os.environ.get("PARE_MODELS_DIR", Path.home() / ".cache" / "pare-models")) / "smollm2-135m"
PEER_VENV = REPO / "bench" / ".venv-llmc"
SETTINGS = ("sparsegpt-2:4", "sparsegpt-0.5", "gptq-w4a16", "sparse24-int4")
LAYER_LINEAR = re.compile(r"^model\.layers\.(\d+)\..*\.weight$")


def decoder_weights(model) -> dict:
    """Every 2-D weight inside a decoder layer (the matrices both tools change)."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters()
            if LAYER_LINEAR.match(n) and p.dim() == 2 and "norm" not in n}


def worker_pare(a: argparse.Namespace) -> dict:
    import torch
    from safetensors.torch import save_file

    import pare

    torch.set_flush_denormal(True)
    torch.set_num_threads(a.threads)
    model, _ = pare.load_model(a.model_path, dtype=torch.float32)
    ids = torch.load(a.calib, weights_only=True)
    extra = json.loads(a.extra) if a.extra else {}
    two_stage = bool(extra.pop("two_stage", False))
    sequential = bool(extra.pop("sequential", True))
    cfg: object
    if a.setting == "sparsegpt-2:4":
        cfg = pare.SparseGPTConfig(pattern="2:4", **extra)
    elif a.setting == "sparsegpt-0.5":
        cfg = pare.SparseGPTConfig(sparsity=0.5, **extra)
    elif a.setting == "gptq-w4a16":
        from pare.methods.quantize import QuantizeConfig

        cfg = QuantizeConfig(scheme="int4", group_size=a.group_size, algorithm="gptq", act_order=True, **extra)
    elif two_stage:  # pare's own prune-then-quantize recipe: GPTQ keeps the pruned zeros (an exact 2:4 model)
        from pare.methods.quantize import QuantizeConfig

        damp = extra.pop("damp", 0.01)
        cfg = [pare.SparseGPTConfig(pattern="2:4", percdamp=damp),
               QuantizeConfig(scheme="int4", group_size=a.group_size, algorithm="gptq", act_order=True,
                              keep_zeros=True, damp=damp, **extra)]
    else:
        cfg = pare.SparseGPTConfig(pattern="2:4", quantize="int4", group_size=a.group_size, **extra)
    t0, c0 = time.perf_counter(), time.process_time()
    runtime = pare.RuntimeConfig(device="cpu", progress=False, sequential=sequential)
    report = pare.run(model, cfg, ids, runtime=runtime, batch_size=a.batch_size)[-1] if isinstance(cfg, list) \
        else pare.prune(model, cfg, ids, runtime=runtime, batch_size=a.batch_size)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    save_file(decoder_weights(model), a.out)
    out: dict = {"prune_seconds": seconds, "cpu_seconds": cpu}
    if "quantization" in report.scores:
        q = report.scores["quantization"]
        out["bits"] = {"bits_per_param": q.get("bits_per_param"), "quantized_bytes": q.get("bytes")}
    return out


def worker_peer(a: argparse.Namespace) -> dict:
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.set_flush_denormal(True)
    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.model_path, dtype=torch.float32).eval()
    ids = torch.load(a.calib, weights_only=True)
    ignore = ["re:.*lm_head"]
    extra = json.loads(a.extra) if a.extra else {}
    damp = extra.get("damp", 0.01)
    sparse = {"sparsity": 0.5, "block_size": 128, "dampening_frac": damp, "ignore": ignore}
    w4a16 = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True,  # W4A16 at this group (0: one scale per output channel)
        **({"strategy": "group", "group_size": a.group_size} if a.group_size else {"strategy": "channel"}),
        **({"observer": extra["observer"]} if "observer" in extra else {})))
    gptq = {"config_groups": {"group_0": w4a16}, "ignore": ["lm_head"], "block_size": 128, "dampening_frac": damp}
    recipe: list = {
        "sparsegpt-2:4": [SparseGPTModifier(mask_structure="2:4", **sparse)],
        "sparsegpt-0.5": [SparseGPTModifier(mask_structure="0:0", **sparse)],
        "gptq-w4a16": [GPTQModifier(**gptq)],
        "sparse24-int4": [SparseGPTModifier(mask_structure="2:4", **sparse), GPTQModifier(**gptq)],
    }[a.setting]
    masks: dict[torch.nn.Module, torch.Tensor] = {}
    if a.setting == "sparse24-int4":  # the same SparseGPT stage, recording each matrix's 2:4 mask
        recipe[0] = _mask_recording(SparseGPTModifier, masks)(mask_structure="2:4", **sparse)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    t0, c0 = time.perf_counter(), time.process_time()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], batch_size=a.batch_size, shuffle_calibration_samples=False)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    save_file(decoder_weights(model), a.out)
    if masks:  # the GPTQ stage refilled pruned weights: what a 2:4 storage of its output would keep
        with torch.no_grad():
            for module in model.modules():
                if module in masks:
                    module.weight.masked_fill_(masks[module], 0.0)
        save_file(decoder_weights(model), masked_path(a.out))
    return {"prune_seconds": seconds, "cpu_seconds": cpu, "masks_recorded": len(masks)}


def masked_path(out: str | Path) -> Path:
    """Where the peer worker writes its output with the SparseGPT stage's mask re-applied."""
    return Path(str(out).removesuffix(".safetensors") + "-mask24.safetensors")


def _mask_recording(base: type, masks: dict) -> type:
    """``base`` (llm-compressor's SparseGPTModifier) that records each matrix's zeros right after its
    SparseGPT step, before the GPTQ stage of the same layer refills some of them."""

    class MaskRecording(base):  # type: ignore[misc, valid-type]
        def compress_modules(self) -> None:
            modules = list(self._num_samples)
            super().compress_modules()
            for m in modules:
                masks[m] = (m.weight == 0).detach().clone()

    return MaskRecording


def prepare(a: argparse.Namespace) -> tuple[Path, object]:
    """The calibration windows file and the held-out evaluation ids."""
    import torch
    from transformers import AutoTokenizer

    from pare.calibration.data import calibration_windows

    work = REPO / "bench" / "results" / "quant_vs_reference" / Path(a.model).name
    work.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(a.model)
    calib = work / f"calib-c4-{a.nsamples}x{a.seqlen}.pt"
    if not calib.is_file():
        torch.save(calibration_windows(tok, "c4", a.nsamples, a.seqlen, seed=0), calib)
    evfile = work / f"eval-wikipedia-{a.eval_tokens}.pt"
    if not evfile.is_file():
        text = (SHARED / "data" / "wikipedia" / "articles.utf8").read_text(encoding="utf-8")
        text = re.sub(r"</?doc[^>]*>\n?", "", text)
        ids = tok(text[: a.eval_tokens * 8])["input_ids"][: a.eval_tokens]
        torch.save(torch.tensor([ids], dtype=torch.long), evfile)
    return calib, torch.load(evfile, weights_only=True)


def evaluate(weights: Path | None, ev, a: argparse.Namespace) -> dict:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from pare.eval.perplexity import perplexity

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    out: dict = {}
    if weights is not None:
        state = load_file(weights)
        model.load_state_dict(state, strict=False)
        zeros = sum(int((w == 0).sum()) for w in state.values())
        out["sparsity"] = zeros / sum(w.numel() for w in state.values())
        groups = [w.reshape(w.shape[0], -1, a.group_size or w.shape[1]) for w in state.values()]  # 0: per row
        out["groups_of_4_with_2_zeros"] = (sum(int(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).sum())
                                                for w in state.values())
                                            / sum(w.numel() // 4 for w in state.values()))
        out["max_distinct_per_group"] = max(int(torch.sort(g, dim=-1).values.diff(dim=-1).ne(0).sum(-1).max()) + 1
                                            for g in groups)
    out["ppl"] = perplexity(model, ev, a.eval_seqlen, batch_size=4, progress=False).ppl
    return out


def run_worker(python: str, kind: str, setting: str, out: Path, calib: Path, a: argparse.Namespace,
               extra: dict | None = None) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--worker", kind, "--setting", setting, "--model-path", a.model,
           "--calib-file", str(calib), "--out", str(out), "--batch-size", str(a.batch_size),
           "--threads", str(a.threads), "--group-size", str(a.group_size)]
    if extra:
        cmd += ["--extra", json.dumps(extra)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") if kind == "pare" else ""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.timeout)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("WORKER_JSON "):
            return json.loads(line[len("WORKER_JSON "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"{kind} worker failed (exit {proc.returncode}): {' | '.join(tail)}"}


def ratio(a: dict, b: dict, key: str) -> float | None:
    if "error" in a or "error" in b or not b.get(key):
        return None
    return a[key] / b[key]


def run_variant(kind: str, python: str, extra: dict | None, setting: str, out: Path, calib: Path, ev,
                a: argparse.Namespace, first: dict | None) -> dict:
    """One run of one variant, evaluated; a repeat whose weights equal the first run's reuses its scores."""
    import hashlib

    peer = PEER_VENV / "bin" / "python"
    if kind.startswith("reference") and not peer.is_file():
        return {"error": f"no llm-compressor venv at {PEER_VENV}"}
    if kind == "reference" and a.reuse_reference and out.is_file():
        res: dict = {"reused": True}
    else:
        if kind == "reference":
            masked_path(out).unlink(missing_ok=True)
        res = run_worker(python, "peer" if kind.startswith("reference") else "pare", setting, out, calib, a, extra)
    if "error" in res:
        return res
    if kind == "reference" and masked_path(out).is_file():  # sparse24-int4: its 2:4 mask re-applied
        res["mask24"] = evaluate(masked_path(out), ev, a)
    res["weights_sha256"] = hashlib.sha256(out.read_bytes()).hexdigest()
    if first is not None and first.get("weights_sha256") == res["weights_sha256"] and "ppl" in first:
        res.update({k: first[k] for k in ("sparsity", "max_distinct_per_group", "ppl")})
        res["scores_from_round_1"] = True  # the same weights: the same figures
    else:
        res.update(evaluate(out, ev, a))
    return res


SUMMED = ("prune_seconds", "cpu_seconds", "ppl")


def summarise(rounds: list[dict]) -> dict:
    """Each variant's result: the run itself for one round; else the medians of its runs, and the runs."""
    if len(rounds) == 1:
        return rounds[0]
    out: dict = {}
    for kind in rounds[0]:
        runs = [r[kind] for r in rounds]
        good = [run for run in runs if "error" not in run]
        if not good:
            out[kind] = runs[0]
            continue
        out[kind] = {**{k: v for k, v in good[0].items() if k not in SUMMED},
                     **{k: statistics.median(run[k] for run in good) for k in SUMMED},
                     "statistic": "median", "runs": runs}
    return out


def round_ratios(rounds: list[dict], kind: str) -> dict:
    """``kind`` against the reference: the median over rounds of each round's ratio (a pair run back to back)."""
    ref_key = "reference"
    per_round = [{name: ratio(r[kind], r.get(ref_key, {"error": "skipped"}), key)
                  for name, key in (("ppl_ratio", "ppl"), ("time_ratio", "prune_seconds"),
                                    ("cpu_time_ratio", "cpu_seconds"))} for r in rounds]
    out: dict = {name: (None if any(pr[name] is None for pr in per_round)
                        else statistics.median(pr[name] for pr in per_round)) for name in per_round[0]}
    if len(rounds) > 1:
        out["per_round"] = per_round
    return out


def main(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    calib, ev = prepare(a)
    work = calib.parent
    peer = PEER_VENV / "bin" / "python"
    dense = None if a.skip_dense else evaluate(None, ev, a)["ppl"]
    for setting in a.settings:
        tag = f"{setting.replace(':', '_')}-{a.nsamples}x{a.seqlen}"
        if setting in ("gptq-w4a16", "sparse24-int4"):
            tag += f"-g{a.group_size}"
        variants = [("pare", sys.executable, json.loads(a.pare_extra) if a.pare_extra else None)]
        if setting == "sparsegpt-0.5":
            variants.append(("pare_block", sys.executable, {"mask_group": "block"}))
        if setting == "sparsegpt-2:4":
            variants.append(("pare_score", sys.executable, {"nm_select": "score"}))
        if setting == "gptq-w4a16":
            variants += [("pare_two_pass", sys.executable, {"true_sequential": False}),
                         ("pare_clip", sys.executable, {"clip_search": True}),
                         ("pare_dense_inputs", sys.executable, {"sequential": False})]
        if setting == "sparse24-int4":
            variants += [("pare_interleaved", sys.executable, {"joint": "interleaved"}),
                         ("pare_two_stage", sys.executable, {"two_stage": True}),
                         ("pare_damp0.1", sys.executable, {"percdamp": 0.1}),
                         ("pare_nm_quant", sys.executable, {"joint": "interleaved", "nm_quant": True}),
                         ("pare_clip", sys.executable, {"clip_search": True}),
                         ("pare_interleaved_damp0.1", sys.executable, {"joint": "interleaved", "percdamp": 0.1}),
                         ("pare_two_stage_damp0.1", sys.executable, {"two_stage": True, "damp": 0.1}),
                         ("pare_damp0.03", sys.executable, {"percdamp": 0.03}),
                         ("pare_damp0.3", sys.executable, {"percdamp": 0.3}),
                         ("pare_score", sys.executable, {"nm_select": "score"}),
                         ("pare_dense_inputs", sys.executable, {"sequential": False})]
        variants = [v for v in variants if v[0] in ("pare", "reference") or not a.variants or v[0] in a.variants]
        if a.skip_pare:
            variants = [v for v in variants if v[0] != "pare"]
        if not a.skip_reference:
            variants.append(("reference", str(peer), None))
            if a.reference_mse and setting in ("gptq-w4a16", "sparse24-int4"):
                variants.append(("reference_mse", str(peer), {"observer": "memoryless_mse"}))
            if a.reference_damp and setting == "sparse24-int4":
                variants.append((f"reference_damp{a.reference_damp:g}", str(peer), {"damp": a.reference_damp}))
        late = ("pare_nm_quant", "pare_clip", "pare_interleaved_damp0.1", "pare_two_stage_damp0.1")
        # the headline pair first, then pare's main variants and the reference's, then the rest (stable)
        variants.sort(key=lambda v: (v[0] != "pare", v[0] != "reference", v[0] in late))
        rounds: list[dict] = []
        for r in range(a.repeats):  # every variant once per round: pare, reference, ..., then again
            rounds.append({})
            for kind, python, extra in variants:
                first = rounds[0].get(kind) if r else None
                rounds[r][kind] = run_variant(kind, python, extra, setting, work / f"{kind}-{tag}.safetensors",
                                              calib, ev, a, first)
                print("PARTIAL " + json.dumps({"setting": setting, "variant": kind, "round": r + 1,
                                               **rounds[r][kind]}), file=sys.stderr, flush=True)
        res = summarise(rounds)
        ratios = {kind: round_ratios(rounds, kind) for kind in res if not kind.startswith("reference")}
        line = {"setting": setting, "model": a.model, **res, "ratios": ratios.pop("pare", None),
                "variant_ratios": ratios, "repeats": a.repeats,
                "dense_ppl": dense, "calibration": {"source": "c4 train", "nsamples": a.nsamples, "seqlen": a.seqlen},
                "eval": {"text": "wikipedia/articles.utf8", "tokens": int(ev.numel()), "seqlen": a.eval_seqlen},
                "threads": a.threads, "group_size": a.group_size, "batch_size": a.batch_size,
                "pare_extra": json.loads(a.pare_extra) if a.pare_extra else None,
                "group_note": ("int4 groups of this size on every decoder linear for both tools (SmolLM2's 576-wide "
                               "inputs are not a multiple of 128, so g128 is impossible on q/k/v/o/gate/up)")
                if setting in ("gptq-w4a16", "sparse24-int4") else None}
        print(json.dumps(line), flush=True)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=32768, help="held-out tokens scored")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--group-size", type=int, default=64,
                   help="int4 group (SmolLM2's 576-wide inputs are not a multiple of 128: both tools refuse 128)")
    p.add_argument("--timeout", type=int, default=7200)
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds of every variant (pare, reference, pare's variants, then again): figures are "
                        "medians over the rounds, ratios the median of each round's ratio")
    p.add_argument("--skip-reference", action="store_true", help="run pare only")
    p.add_argument("--skip-dense", action="store_true", help="leave out the dense model's PPL (dense_ppl: null)")
    p.add_argument("--skip-pare", action="store_true",
                   help="leave out pare's headline run (its variants and the reference still run)")
    p.add_argument("--pare-extra", default="",
                   help='JSON of config fields for pare\'s headline run, e.g. \'{"true_sequential": true}\'')
    p.add_argument("--reference-damp", type=float, default=0.0,
                   help="sparse24-int4: also run the reference recipe with this dampening in both modifiers")
    p.add_argument("--reference-mse", action="store_true",
                   help="also run the reference with its MSE range observer (memoryless_mse) for the int4 settings")
    p.add_argument("--variants", nargs="*", default=None,
                   help="pare's extra variants to run besides its default (default: all of the setting's)")
    p.add_argument("--reuse-reference", action="store_true",
                   help="evaluate the reference's weights from an earlier run instead of running it again")
    p.add_argument("--worker", choices=("pare", "peer"), help=argparse.SUPPRESS)
    p.add_argument("--setting", help=argparse.SUPPRESS)
    p.add_argument("--model-path", help=argparse.SUPPRESS)
    p.add_argument("--calib-file", dest="calib", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--extra", help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse()
    if args.worker:
        result = (worker_pare if args.worker == "pare" else worker_peer)(args)
        print("WORKER_JSON " + json.dumps(result), flush=True)
    else:
        main(args)
