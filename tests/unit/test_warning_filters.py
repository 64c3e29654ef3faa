"""The suite's warning filters (pyproject.toml) turn transformers' deprecations into errors wherever
they are attributed, and pare's decode loop uses the cache API the installed transformers wants."""

from __future__ import annotations

import warnings

import pytest
import torch

from pare.eval.speed import cache_argument, measure_speed
from tiny import tiny_batch, tiny_model


def test_a_deprecation_attributed_to_the_caller_is_an_error() -> None:
    from transformers.utils.deprecation import deprecate_kwarg

    @deprecate_kwarg("old", "99.0.0", new_name="new")
    def f(new: int = 0) -> int:
        return new

    # stacklevel=2: attributed to this test module, not transformers.*; no filter is set here, so only
    # pyproject's message filters can turn it into an error
    with pytest.raises(FutureWarning, match="`old` is deprecated"):
        f(old=1)


def test_the_past_key_values_deprecation_is_caught() -> None:
    model = tiny_model("llama")
    if cache_argument(model) != "cache":
        pytest.skip("this transformers release still takes past_key_values without deprecating it")
    with torch.no_grad():
        out = model(tiny_batch(1, 4), use_cache=True)
        with pytest.raises(FutureWarning, match="past_key_values"):
            model(tiny_batch(1, 1), past_key_values=out["cache"], use_cache=True)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt", "gpt_neox"])
def test_decode_speed_uses_the_current_cache_api(kind: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        result = measure_speed(tiny_model(kind), prompt_len=8, new_tokens=4, repeats=1, warmup=0)
    assert result.decode_tokens_per_s > 0 and result.new_tokens == 4
