"""Today's decoder families, hybrids and state-space models as tiny random models: weight sparsity
(Wanda), depth (ShortGPT) and MLP width (OSSCAR) either work (save -> reload with identical logits,
and for depth greedy generation with the KV cache equal to generation without it) or are refused with
a pare error naming the reason; never a traceback. Runs the same checks as ``bench/coverage.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from coverage import cover

OK = {"inspect": "ok", "sparsity": "ok", "depth": "ok", "width": "ok"}
NO_WIDTH = {**OK, "width": "refused"}  # no MLP channels to cut, or a width the config cannot state

EXPECTED: dict[str, dict[str, str]] = {
    # today's decoder families
    "olmo2": OK, "olmoe": OK, "granite": OK, "granitemoe": OK, "phimoe": OK, "cohere2": OK, "smollm3": OK,
    "stablelm": OK, "starcoder2": OK, "glm4": OK, "phi": OK,
    "deepseek_v2": OK, "deepseek_v3": OK,  # MLA heads, dense prefix layers, routed + shared experts
    "gpt_oss": {**OK, "sparsity": "refused", "width": "refused"},  # experts' clamped SwiGLU has no act_fn
    "llama4_text": {**OK, "sparsity": "refused", "width": "refused"},  # tokens routed before the experts
    # hybrids and state-space models
    "mamba": NO_WIDTH, "mamba2": NO_WIDTH, "jamba": OK, "bamba": OK, "qwen3_next": OK, "lfm2": OK,
    "granitemoehybrid": OK,
    "falcon_h1": OK,  # the attention's o_proj, not the Mamba mixer's out_proj (branch h18w)
    # width tracebacks fixed on branch h18: an attention output gate, an MLP sub-norm, per-layer MLP widths
    "afmoe": OK, "bitnet": OK,
    "zamba2": NO_WIDTH,  # LoRA adapters on the shared MLP: its width is refused
    # depth cuts the per-layer embedding tables outside the layers (Gemma 3n / 4); two of each layer kind
    "gemma3n_text": OK, "gemma4_text": OK, "nemotron_h": OK,
    # tiny configs and depth rules added on branch h18 (issue 18's unbuilt and refused types)
    "apertus": OK,  # a config saved once keeps dtype a string; the shortened config is built with a dtype
    "gpt_neox_japanese": OK,  # only the last layer has dense_bias: it is kept; width replayed by pare.load
    "dory": OK,  # input / looped / output segments recounted; the MLP's per-channel scales follow a cut
    "dots3_note_text": OK, "inkling2_text": OK, "zamba": OK,
    "longcat_flash": OK,  # override: num_layers; two cache slots per layer; zero experts' rows cut alike
    "xlstm": NO_WIDTH,  # num_blocks follows num_hidden_layers
    "hrm_text": {**OK, "depth": "refused"},  # two stacks looped: not cut in depth
    # MLP width saved before any refusal at save time (branch h18w): the config states the cut, or keeps its
    # sizes for pare.load to replay the cut (a field that also sizes what the cut leaves alone)
    "hunyuan_v1_moe": OK, "inkling_text": OK, "recurrent_gemma": OK,
    "git": OK,  # override: the BERT-style text stack beside the image encoder
    "ctrl": OK, "modernbert-decoder": OK,  # overrides name their MLPs (a Sequential; a fused GLU Wi)
    "dbrx": {m: "refused" for m in OK},  # experts as 2-D w1 / v1 / w2 matrices: the reason names them
}


FAST = ("mamba", "qwen3_next")
"""In ``make test``; the others (a few seconds each, minutes under load) run with ``make test-matrix``."""


@pytest.mark.parametrize(
    "model_type", [t if t in FAST else pytest.param(t, marks=pytest.mark.matrix) for t in sorted(EXPECTED)])
def test_family_works_or_is_refused_with_a_reason(model_type: str) -> None:
    row = cover(model_type, "causal", limit=300)
    assert row["build"]["status"] == "ok", row["build"].get("reason")
    got = {m: row[m]["status"] for m in EXPECTED[model_type]}
    reasons = {m: row[m].get("reason", "")[:300] for m in got if got[m] != "ok"}
    assert got == EXPECTED[model_type], reasons
    for m, status in got.items():
        if status == "refused":
            assert row[m]["reason"].split(":")[0].endswith("Error")  # a named pare error with its reason


HEAD_STATE: dict[str, tuple[str, int]] = {
    # family -> (a per-head tensor of layer 0 that must follow the cut, its size per kept head)
    "gpt_oss": ("self_attn.sinks", 1),  # attention sinks: one logit per query head
    "afmoe": ("self_attn.gate_proj.weight", 16),  # output gate: head_dim rows per query head
    "olmo2": ("self_attn.q_norm.weight", 16),  # q norm over the whole projection
    "qwen3_next": ("self_attn.q_proj.weight", 32),  # [q_h; gate_h] rows per head (layer 3: attention)
}


@pytest.mark.parametrize("model_type", sorted(HEAD_STATE))
def test_head_cut_keeps_per_head_state_consistent(model_type: str, tmp_path: Path) -> None:
    """Half the query heads cut: sinks, output gates and whole-projection q norms keep the kept heads'
    entries, and the result reloads with identical logits (pare.load and the Auto class)."""
    import torch
    from transformers import AutoModelForCausalLM

    import pare
    from coverage import _logits, reload
    from tiny_configs import build, tiny_config

    model = build(AutoModelForCausalLM, tiny_config(model_type))
    ids = torch.randint(3, 200, (4, 16), generator=torch.Generator().manual_seed(0))
    report = pare.prune(model, pare.OsscarConfig(mlp_ratio=0.0, attn_ratio=0.5), ids,
                        runtime=pare.RuntimeConfig(device="cpu", progress=False), batch_size=2)
    heads = [e for e in report.edits if type(e).__name__ == "Heads"]
    assert heads and all(e.num_heads == 2 for e in heads)
    name, per_head = HEAD_STATE[model_type]
    layer = pare.arch.describe(model).layer_modules(model)[heads[0].layer]
    assert layer.get_parameter(name).shape[0] == 2 * per_head
    want = _logits(model, ids)
    pare.save(model, None, tmp_path / "out", report)
    assert torch.equal(_logits(pare.load(tmp_path / "out").eval(), ids), want)
    auto, _ = reload("causal", tmp_path / "out", type(model))
    assert torch.equal(_logits(auto, ids), want)


@pytest.mark.parametrize("model_type", ["gpt_oss", "llama4_text", "aria_text"])
def test_expert_input_refusals_come_from_the_check(model_type: str) -> None:
    """Experts whose inputs pare cannot record (no act_fn, routed before the call, hidden size not
    last) are refused when the pipeline is made, before any calibration pass."""
    from transformers import AutoModelForCausalLM

    import pare
    from pare.errors import UnsupportedArchitectureError
    from pare.pipeline import Pipeline
    from tiny_configs import build, tiny_config

    model = build(AutoModelForCausalLM, tiny_config(model_type))
    with pytest.raises(UnsupportedArchitectureError, match="experts"):
        Pipeline(model, pare.WandaConfig(sparsity=0.5))
    Pipeline(model, pare.WandaConfig(sparsity=0.5, ignore=("experts",)))  # leaving them out works
