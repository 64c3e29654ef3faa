"""Finiteness checks: NaN or inf in weights or statistics make every score meaningless."""

from __future__ import annotations

import torch

from pare.errors import PareError


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in ``t`` (any shape). A finite sum proves it (NaN and inf propagate) and costs ~1/30 of
    ``isfinite(t).all()`` on CPU; an infinite sum may be an overflow of large finite values, so only then
    is every element checked."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def non_finite_hint(dtype: torch.dtype | None) -> str:
    """What to do about NaN/inf values in a model of ``dtype``: a float16 overflow is the usual cause only
    in a float16 model; otherwise the checkpoint itself holds them."""
    if dtype == torch.float16:
        return ("a float16 model overflows past 65504: load it in bfloat16 or float32 (--dtype), or check that "
                "its dense perplexity is finite")
    return "the checkpoint holds them (damaged or diverged?): check that its dense perplexity is finite"


def check_finite_weight(w: torch.Tensor, name: str) -> None:
    """Raise PareError when the weight ``w`` (any shape) of module ``name`` holds NaN or inf."""
    if not all_finite(w):
        raise PareError(f"{name}: its weights hold NaN or inf, so scores from them mean nothing; "
                        f"{non_finite_hint(w.dtype)}")
