"""Perplexity protocol on a tiny random Llama, plus the speed, size and memory helpers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pare.errors import ConfigError, NotEnoughDataError
from pare.eval.memory import peak_rss_mb
from pare.eval.perplexity import PerplexityResult, perplexity
from pare.eval.size import count_nonzero, count_parameters, dir_size_bytes, linear_sparsity, nonzero
from pare.eval.speed import PairedSpeed, SpeedResult, compare_speed, measure_speed


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 100, (1, 300), generator=torch.Generator().manual_seed(1))


def one_window_at_a_time(model: LlamaForCausalLM, ids: torch.Tensor, seqlen: int) -> float:
    """The reference: exp(mean over windows of transformers' own loss)."""
    with torch.no_grad():
        losses = [
            model(ids[:, i : i + seqlen], labels=ids[:, i : i + seqlen]).loss
            for i in range(0, ids.shape[1] - seqlen + 1, seqlen)
        ]
    return math.exp(torch.stack(losses).mean().item())


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batched_equals_one_window_loop(model: LlamaForCausalLM, ids: torch.Tensor, batch_size: int) -> None:
    result = perplexity(model, ids, seqlen=64, batch_size=batch_size, progress=False)
    assert result.ppl == pytest.approx(one_window_at_a_time(model, ids, 64), rel=1e-5)
    assert result.nll == pytest.approx(math.log(result.ppl), rel=1e-12)


def test_counts_and_max_windows(model: LlamaForCausalLM, ids: torch.Tensor) -> None:
    result = perplexity(model, ids, seqlen=64, progress=False, dataset="random")
    assert isinstance(result, PerplexityResult)
    assert (result.n_windows, result.n_tokens, result.seqlen) == (4, 256, 64)  # 300 // 64, tail dropped
    assert result.dataset == "random"
    short = perplexity(model, ids[0], seqlen=64, progress=False, max_windows=2)
    assert (short.n_windows, short.n_tokens) == (2, 128)
    assert short.ppl == pytest.approx(one_window_at_a_time(model, ids[:, :128], 64), rel=1e-5)


def test_restores_training_mode(model: LlamaForCausalLM, ids: torch.Tensor) -> None:
    model.train()
    try:
        perplexity(model, ids, seqlen=32, progress=False, max_windows=1)
        assert model.training
    finally:
        model.eval()


def test_seqlen_beyond_context_names_the_limit(model: LlamaForCausalLM, ids: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match="128"):
        perplexity(model, ids, seqlen=200, progress=False)


def test_too_few_tokens_and_bad_arguments(model: LlamaForCausalLM, ids: torch.Tensor) -> None:
    with pytest.raises(NotEnoughDataError, match="20 tokens"):
        perplexity(model, ids[:, :20], seqlen=64, progress=False)
    with pytest.raises(ConfigError):
        perplexity(model, ids, seqlen=1, progress=False)
    with pytest.raises(ConfigError):
        perplexity(model, ids, seqlen=64, batch_size=0, progress=False)
    with pytest.raises(ConfigError):
        perplexity(model, ids.repeat(2, 1), seqlen=64, progress=False)


def test_measure_speed_runs_greedy_decode_with_the_cache(model: LlamaForCausalLM) -> None:
    result = measure_speed(model, prompt_len=16, new_tokens=4, batch_size=2, repeats=2, warmup=1)
    assert isinstance(result, SpeedResult)
    assert result.prefill_tokens_per_s > 0 and result.decode_tokens_per_s > 0
    assert (result.prompt_len, result.new_tokens, result.batch_size, result.device) == (16, 4, 2, "cpu")
    with pytest.raises(ConfigError, match="context"):
        measure_speed(model, prompt_len=120, new_tokens=16)


def test_compare_speed_times_both_in_alternating_rounds(model: LlamaForCausalLM) -> None:
    calls: list[int] = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))  # both "models" are this one
    try:
        result = compare_speed(model, model, rounds=3, prompt_len=8, new_tokens=2)
    finally:
        hook.remove()
    assert isinstance(result, PairedSpeed)
    assert len(calls) == (2 + 2 * 3) * (1 + 2)  # warm-ups and rounds, each a prefill and 2 decode steps
    assert result.rounds == 3 and (result.prompt_len, result.new_tokens, result.batch_size) == (8, 2, 1)
    for phase in ("prefill", "decode"):
        q1, q3 = getattr(result, f"{phase}_ratio_iqr")
        assert 0 < q1 <= getattr(result, f"{phase}_ratio") <= q3
        assert getattr(result, f"{phase}_tokens_per_s") > 0 and getattr(result, f"reference_{phase}_tokens_per_s") > 0
    with pytest.raises(ConfigError, match="rounds"):
        compare_speed(model, model, rounds=0)


def test_sizes(model: LlamaForCausalLM, tmp_path: Path) -> None:
    n = count_parameters(model)
    assert n == sum(p.numel() for p in model.parameters())
    layer = model.model.layers[0].mlp.down_proj
    assert linear_sparsity(layer) == 0.0
    with torch.no_grad():
        saved = layer.weight.clone()
        layer.weight[:, :32] = 0  # half of the 64 input columns
        try:
            assert linear_sparsity(layer.weight) == pytest.approx(0.5)
            assert count_nonzero(model) == n - layer.weight.numel() // 2
        finally:
            layer.weight.copy_(saved)
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 5)
    assert dir_size_bytes(tmp_path) == 15
    assert dir_size_bytes(tmp_path / "a.bin") == 10
    with pytest.raises(FileNotFoundError):
        dir_size_bytes(tmp_path / "missing")
    assert peak_rss_mb() > 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8])
def test_nonzero_counts_every_dtype_and_view(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(96, 40, generator=g) * 4).to(dtype)
    w[torch.rand(96, 40, generator=g) < 0.3] = 0
    w[0, 0] = -0.0 if dtype.is_floating_point else 0  # negative zero is a zero
    expected = sum(1 for v in w.flatten().tolist() if v != 0)
    assert nonzero(w) == expected
    assert nonzero(w.t()) == expected  # a transposed view (GPT-2's Conv1D weights are read this way)
    assert nonzero(w[::2]) == sum(1 for v in w[::2].flatten().tolist() if v != 0)


def test_perplexity_refuses_ids_beyond_the_vocabulary(model: LlamaForCausalLM) -> None:
    vocab = model.get_input_embeddings().num_embeddings
    with pytest.raises(ConfigError, match="tokenizer does not match"):
        perplexity(model, torch.arange(vocab - 8, vocab + 8), seqlen=8, progress=False)
    with pytest.raises(NotEnoughDataError, match="empty"):
        perplexity(model, torch.zeros(0, dtype=torch.long), seqlen=8, progress=False)
