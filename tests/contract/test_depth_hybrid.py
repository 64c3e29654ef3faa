"""Depth removal on hybrid models keeps ``layer_types`` and the cache layout consistent: it never
removes the last layer of a kind, never leaves a layer where the shortened config builds another
kind, and the result generates with the KV cache exactly as without it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pare.arch import describe
from pare.arch.surgery.depth import choose_layers, removal_problem, remove_layers
from pare.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from tiny_configs import build, tiny_config


def _model(model_type: str):
    return build(AutoModelForCausalLM, tiny_config(model_type))


def test_last_layer_of_a_kind_is_kept_and_generation_matches_the_cache() -> None:
    model = _model("qwen3_next")  # layer_types: three linear-attention layers, one full-attention layer
    arch = describe(model)
    kinds = list(model.config.layer_types)
    full = kinds.index("full_attention")
    assert kinds.count("full_attention") == 1
    with pytest.raises(ConfigError, match="full_attention"):
        remove_layers(model, arch, [full])
    chosen, skipped = choose_layers(model, arch, [full, 0, 1], 1)
    assert chosen == [0] and "full_attention" in skipped[0]
    remove_layers(model, arch, chosen)
    assert list(model.config.layer_types) == [k for i, k in enumerate(kinds) if i != 0]
    ids = torch.randint(3, 200, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
        plain = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, plain)


def test_a_pattern_set_by_a_period_only_loses_whole_periods() -> None:
    model = _model("jamba")  # attn_layer_period=2, offset=1: mamba, attention, mamba, attention
    arch = describe(model)
    why = removal_problem(model, arch, [0])
    assert why is not None and "pattern" in why
    assert removal_problem(model, arch, [0, 1]) is None
    with pytest.raises(ConfigError, match="pattern"):
        remove_layers(model, arch, [0])


def _same_after_reload(model, tmp_path: Path) -> None:
    """The shortened model's logits equal those of a model built from its saved config and weights,
    and greedy generation with the KV cache equals generation without it."""
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
        cached = model.generate(ids[:1], max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
        plain = model.generate(ids[:1], max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, plain)


def test_per_layer_tables_outside_the_layers_keep_the_kept_blocks(tmp_path: Path) -> None:
    """Gemma 4's per-layer embedding and projection hold one block per layer: a cut keeps the kept
    layers' blocks, in order, and the result is what its shortened config rebuilds."""
    model = _model("gemma4_text")
    base = model.model
    per = model.config.hidden_size_per_layer_input
    table = base.embed_tokens_per_layer.weight.detach().clone()
    proj = base.per_layer_model_projection.weight.detach().clone()
    remove_layers(model, describe(model), [1])
    keep = torch.cat([torch.arange(i * per, (i + 1) * per) for i in (0, 2, 3)])
    assert torch.equal(base.embed_tokens_per_layer.weight, table[:, keep])
    assert torch.equal(base.per_layer_model_projection.weight, proj[keep])
    assert base.per_layer_model_projection.out_features == 3 * per
    _same_after_reload(model, tmp_path)


def test_a_resize_that_is_not_one_block_per_layer_is_refused() -> None:
    from pare.arch.surgery.tables import table_cuts

    cuts, why = table_cuts({"t": (10, 8)}, {"t": (10, 6)}, num_layers=4, kept=3)
    assert cuts == {"t": (1, 2)} and why is None
    _, why = table_cuts({"t": (10, 8)}, {"t": (10, 5)}, num_layers=4, kept=3)
    assert why is not None and "one block per layer" in why
    _, why = table_cuts({"t": (10, 8)}, {"t": (9, 6)}, num_layers=4, kept=3)
    assert why is not None


def test_segment_counts_follow_the_cut(tmp_path: Path) -> None:
    """Dory splits its layers into input, looped and output stacks: each counts its kept layers."""
    model = _model("dory")  # 1 input, 2 recurrent (looped), 1 output layer
    remove_layers(model, describe(model), [2])
    cfg = model.config
    assert (cfg.n_input_layers, cfg.n_recurrent_layers, cfg.n_output_layers, cfg.num_hidden_layers) == (1, 1, 1, 3)
    _same_after_reload(model, tmp_path)


def test_two_cache_slots_per_layer_are_renumbered_as_the_config_builds(tmp_path: Path) -> None:
    """LongCat-Flash: each layer holds two attention blocks (cache slots 2i and 2i + 1); the layer
    count is ``num_layers`` (the builtin override), ``num_hidden_layers`` is derived from it."""
    model = _model("longcat_flash")
    remove_layers(model, describe(model), [1])
    assert model.config.num_layers == 3 and model.config.num_hidden_layers == 6
    slots = [[a.layer_idx for a in layer.self_attn] for layer in model.model.layers]
    assert slots == [[0, 1], [2, 3], [4, 5]]
    _same_after_reload(model, tmp_path)


def test_second_layer_count_and_per_layer_parameters() -> None:
    """xLSTM builds ``num_blocks`` blocks (kept equal to ``num_hidden_layers``); GPT-NeoX-Japanese gives
    only its last layer a ``dense_bias``, so its last layer cannot go (the next one would need one)."""
    model = _model("xlstm")
    remove_layers(model, describe(model), [0])
    assert model.config.num_blocks == model.config.num_hidden_layers == 3
    model = _model("gpt_neox_japanese")
    arch = describe(model)
    assert removal_problem(model, arch, [3]) is not None
    assert removal_problem(model, arch, [1]) is None


def test_a_config_saved_once_keeps_a_dtype_apertus_can_build(tmp_path: Path) -> None:
    """save_pretrained leaves ``config.dtype`` a string; Apertus' xIELU activation needs a torch dtype
    when the shortened config is built."""
    model = _model("apertus")
    model.save_pretrained(tmp_path)
    assert isinstance(model.config.dtype, str)
    assert removal_problem(model, describe(model), [1]) is None
