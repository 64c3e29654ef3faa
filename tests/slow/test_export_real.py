"""pare export on SmolLM2-135M: compressed-tensors and GGUF exports of an int4 g64 model reload with
transformers alone and give the saved fake-quantized model's perplexity; the packed bytes equal pare's
bits account; the GGUF carries SmolLM2's GPT-2 BPE tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pare

pytestmark = pytest.mark.slow

SMOLLM2 = Path.home() / ".cache" / "pare-models" / "smollm2-135m"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    if not (SMOLLM2 / "config.json").is_file():
        pytest.skip(f"SmolLM2-135M not found at {SMOLLM2} (../shared/models/fetch-real-models)")
    pytest.importorskip("compressed_tensors")
    pytest.importorskip("gguf")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok = pare.load_model(str(SMOLLM2), dtype=torch.bfloat16)
        report = pare.prune(model, pare.QuantizeConfig(scheme="int4", group_size=64),
                            runtime=pare.RuntimeConfig(device="cpu", progress=False))
        out = tmp_path_factory.mktemp("export") / "smollm2-w4g64"
        pare.save(model, tok, out, report)
        text = "The quick brown fox jumps over the lazy dog. " * 40
        ids = tok(text, return_tensors="pt")["input_ids"][:, :512]
        yield out, ids, report, tok
    finally:
        torch.set_num_threads(threads)


def _ppl(model, ids) -> float:
    from pare.eval.perplexity import perplexity

    return perplexity(model, ids, 256, progress=False).ppl


def test_compressed_tensors_export_of_smollm2(saved) -> None:
    from transformers import AutoModelForCausalLM

    src, ids, report, _ = saved
    rec = pare.export(src, "compressed-tensors", src.parent / "ct")
    base = _ppl(pare.load(src), ids)
    ppl = _ppl(AutoModelForCausalLM.from_pretrained(src.parent / "ct"), ids)
    assert abs(ppl - base) / base < 1e-3
    assert rec["matrices"] == 30 * 7 and rec["matches_account"]
    assert rec["account_bytes"] == report.scores["quantization"]["bytes"]


def test_gguf_export_of_smollm2_with_its_tokenizer(saved) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, ids, _, tok = saved
    rec = pare.export(src, "gguf", src.parent / "m.gguf")
    assert rec["tensor_types"]["q4_0"] == 30 * 7 and rec["tokenizer"]
    base = _ppl(pare.load(src), ids)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file="m.gguf", dtype=torch.bfloat16)
    assert abs(_ppl(model, ids) - base) / base < 1e-3
    gtok = AutoTokenizer.from_pretrained(src.parent, gguf_file="m.gguf")
    text = "Pruning and quantization, together: 12.5% of the bytes!"
    assert gtok(text)["input_ids"] == tok(text)["input_ids"]
