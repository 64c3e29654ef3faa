"""pare export on a real model: the exported checkpoints compute what the saved fake-quantized one does.

SmolLM2-135M (bfloat16) is quantized by pare (RTN, data-free: the export does not depend on how the
grid was found) and saved; then exported to compressed-tensors (pack-quantized) and GGUF, and each
export is loaded by transformers alone (plain ``from_pretrained``; ``from_pretrained(gguf_file=...)``)
and scored with pare's perplexity on the same held-out tokens (WikiText-2 test). One JSON object per
setting:

    {"setting", "saved": {ppl, weight_bytes}, "compressed_tensors": {ppl, rel_diff, file_bytes,
     quantized_tensor_bytes, account_bytes, matches_account}, "gguf": {ppl, rel_diff, file_bytes, ...}}

Groups: SmolLM2's hidden width 576 is not a multiple of 128, so g128 is impossible on q/k/v/o and
gate/up (576 inputs); the settings use group 64 on every decoder linear (576 and 1536 are multiples
of 64) and per channel.

Usage: ``python bench/export_real.py [--windows 8] [--seqlen 512]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

MODEL = Path(os.environ.get("PARE_MODELS_DIR", Path.home() / ".cache" / "pare-models")) / "smollm2-135m"
SETTINGS = {"w4a16-g64": ("int4", 64), "w8a16-channel": ("int8", 0), "w4a16-g64-sparse24": ("int4", 64)}


def ppl(model, ids, a) -> float:
    from pare.eval.perplexity import perplexity

    return perplexity(model, ids, a.seqlen, batch_size=1, progress=False, max_windows=a.windows).ppl


def run(setting: str, ids, work: Path, a: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import pare

    scheme, group = SETTINGS[setting]
    model, tok = pare.load_model(a.model, dtype=torch.bfloat16)
    if setting.endswith("sparse24"):
        from pare.calibration.data import calibration_windows

        calib = calibration_windows(tok, "c4", 8, 256, seed=0)
        cfg: object = pare.SparseGPTConfig(pattern="2:4", quantize=scheme, group_size=group)
    else:
        calib, cfg = None, pare.QuantizeConfig(scheme=scheme, group_size=group)
    report = pare.prune(model, cfg, calib, runtime=pare.RuntimeConfig(device="cpu", progress=False))
    saved = work / setting
    pare.save(model, tok, saved, report)
    del model
    out: dict = {"setting": setting, "scheme": scheme, "group_size": group}
    base = ppl(pare.load(saved), ids, a)
    out["saved"] = {"ppl": base, "weight_bytes": (saved / "model.safetensors").stat().st_size,
                    "account": report.scores["quantization"]["bytes"]}
    t0 = time.perf_counter()
    rec = pare.export(saved, "compressed-tensors", work / f"{setting}-ct")
    seconds = time.perf_counter() - t0
    ct = ppl(AutoModelForCausalLM.from_pretrained(work / f"{setting}-ct"), ids, a)
    out["compressed_tensors"] = {"ppl": ct, "rel_diff": abs(ct - base) / base, "export_seconds": seconds,
                                 **{k: rec[k] for k in ("file_bytes", "quantized_tensor_bytes", "account_bytes",
                                                        "matches_account", "tensor_bytes")}}
    t0 = time.perf_counter()
    rec = pare.export(saved, "gguf", work / f"{setting}.gguf")
    seconds = time.perf_counter() - t0
    gg = AutoModelForCausalLM.from_pretrained(work, gguf_file=f"{setting}.gguf", dtype=torch.bfloat16)
    gppl = ppl(gg, ids, a)
    out["gguf"] = {"ppl": gppl, "rel_diff": abs(gppl - base) / base, "export_seconds": seconds,
                   **{k: rec[k] for k in ("file_bytes", "tensor_types", "tokenizer")}}
    return out


def main(a: argparse.Namespace) -> None:
    import torch

    from pare.calibration.data import eval_token_ids

    torch.set_num_threads(a.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    from transformers import AutoTokenizer

    ids = eval_token_ids(AutoTokenizer.from_pretrained(a.model), "wikitext2")
    work = Path(tempfile.mkdtemp(prefix="pare-export-bench-"))
    try:
        for setting in a.settings:
            line = run(setting, ids, work, a)
            line.update(model=a.model, eval={"text": "wikitext2 test", "windows": a.windows, "seqlen": a.seqlen},
                        threads=a.threads,
                        group_note="g64 on every decoder linear: SmolLM2's 576-wide inputs are not a multiple of 128")
            print(json.dumps(line), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


if __name__ == "__main__":
    main(parse())
