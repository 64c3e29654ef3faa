"""MLP-width cuts on families whose config fields do not map one-to-one onto the cut MLPs: the cut
either leaves a config that states it (plain ``from_pretrained``) or a config whose sizes are put
back as they were, so ``pare.load`` rebuilds the model and replays the edits; in both cases save ->
reload gives identical logits. Before this, these families ran the whole prune and were only refused
when saving. Tiny random models from ``bench/tiny_configs.py``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

import pare
from pare.arch import describe
from pare.arch.infer import text_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from coverage import _logits, reload
from tiny_configs import build, tiny_config

RUNTIME = pare.RuntimeConfig(device="cpu", progress=False)

CASES: dict[str, tuple[str, bool, str]] = {
    # model type -> (kind, config states the cut, why)
    "falcon_h1": ("causal", True, "the attention's o_proj, not the Mamba mixer's out_proj, is its output"),
    "hunyuan_v1_moe": ("causal", True, "its shared_mlp is the shared expert, cut with the experts"),
    "longcat_flash": ("causal", True, "gate_up rows of the zero experts are cut with the routed ones"),
    "inkling_text": ("causal", False, "moe_intermediate_size also sizes the 3-D shared experts, left whole"),
    "recurrent_gemma": ("causal", False, "the MLP is built from intermediate_size // 2"),
    "hrm_text": ("causal", False, "intermediate_size also sizes the H stack, which is not cut"),
    "gpt_neox_japanese": ("causal", False, "the width is hidden * intermediate_multiple_size; tied embed_out"),
    "idefics2": ("image-text", False, "text intermediate_size also sizes the connector's MLP"),
}


def _model(model_type: str, kind: str) -> Any:
    return build(AutoModelForCausalLM if kind == "causal" else AutoModelForImageTextToText, tiny_config(model_type))


def _widths(model: Any) -> list[int]:
    """Every layer's MLP (or expert) width."""
    arch = describe(model)
    return [arch.mlp_width(model, r.index) if r.mlp is not None else r.experts.intermediate
            for r in arch.layers if r.mlp is not None or r.experts is not None]


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_mlp_cut_saves_and_reloads_identically(model_type: str, tmp_path: Path) -> None:
    kind, uniform, _why = CASES[model_type]
    model = _model(model_type, kind)
    sizes_before, widths = text_config(model).to_dict(), _widths(model)
    ids = torch.randint(3, 200, (4, 16), generator=torch.Generator().manual_seed(0))
    report = pare.prune(model, pare.OsscarConfig(mlp_ratio=0.25), ids, runtime=RUNTIME, batch_size=2)
    assert report.edits and report.uniform is uniform
    assert all(after < before for after, before in zip(_widths(model), widths, strict=True))
    if not uniform:  # the config still describes the model before the cut: pare.load replays the cut on it
        after = text_config(model).to_dict()
        assert {k: after.get(k) for k in sizes_before if "intermediate" in k} == \
            {k: v for k, v in sizes_before.items() if "intermediate" in k}
    want = _logits(model, ids)
    pare.save(model, None, tmp_path / "out", report)
    assert torch.equal(_logits(pare.load(tmp_path / "out").eval(), ids), want)
    if uniform:
        auto, _ = reload(kind, tmp_path / "out", type(model))
        assert torch.equal(_logits(auto, ids), want)


def test_falcon_h1_attention_output_is_o_proj() -> None:
    """The layer holds a Mamba mixer (``mamba.out_proj`` comes first) beside its attention: ``o`` is the
    projection beside the queries, and the mixer is described as the state-space block."""
    roles = describe(_model("falcon_h1", "causal")).layers[0]
    assert roles.attention is not None and roles.attention.o.path == "self_attn.o_proj"
    assert roles.attention.num_heads == 4 and roles.attention.unknown == ()
    assert roles.mixer is not None and roles.mixer.path == "mamba" and roles.mixer.kind == "state-space"


def test_dbrx_refusal_names_its_expert_layout() -> None:
    from pare.errors import UnsupportedArchitectureError

    with pytest.raises(UnsupportedArchitectureError, match=r"ffn\.experts\.mlp\.w1 \[512, 64\].*cannot rename"):
        describe(_model("dbrx", "causal"))


@pytest.mark.parametrize("model_type", ["falcon_h1", "hunyuan_v1_moe", "hrm_text", "gemma3n_text"])
def test_hidden_cut_the_surgery_cannot_make_is_refused_before_any_work(model_type: str) -> None:
    """A Mamba mixer, a router holding its matrix in ``gate.wg``, a second stack of layers, Gemma 3n's
    AltUp / LAuReL blocks: the hidden size is refused when the pipeline is made (these ran into shape
    errors in the middle of the cut before), naming what would work."""
    from pare.errors import ConfigError
    from pare.pipeline import Pipeline

    model = _model(model_type, "causal")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"hidden=False"):
        Pipeline(model, pare.WidthConfig(pruning_ratio=0.5, heads=False))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
