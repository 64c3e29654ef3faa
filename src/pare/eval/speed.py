"""Prefill and decode throughput of a causal LM on random prompts.

Prefill is one forward pass over the prompt (building the KV cache); decode is greedy generation
one token per forward pass, feeding back the KV cache each step returns (a ``Cache`` object, which
the next call takes as is). Recent transformers 5 releases name it ``cache`` (argument and output
field) and deprecate the older ``past_key_values``; the name is taken from the model's ``forward``
signature, so neither name draws a deprecation warning on the release it belongs to. The loop is written out rather
than calling ``generate`` so that no generation config (sampling, stop tokens, min/max lengths)
changes how many steps run.
"""

from __future__ import annotations

import inspect
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from pare.errors import ConfigError
from pare.eval.perplexity import eval_mode, model_context_length, model_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeedResult:
    """Median throughput over the timed repeats.

    Attributes:
        prefill_tokens_per_s: ``batch_size * prompt_len`` / prefill seconds.
        decode_tokens_per_s: ``batch_size * new_tokens`` / decode seconds.
        prompt_len: prompt tokens per sequence.
        new_tokens: decode steps (tokens generated per sequence).
        batch_size: sequences per forward pass.
        device: where the inputs ran, e.g. ``"cpu"`` or ``"cuda:1"``.
        repeats: timed repeats (after the warm-up ones).
    """

    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prompt_len: int
    new_tokens: int
    batch_size: int
    device: str
    repeats: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _vocab_size(model: nn.Module) -> int:
    sizes = []
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int):
        sizes.append(vocab)
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if isinstance(embeddings, nn.Embedding):
        sizes.append(embeddings.num_embeddings)
    if not sizes:
        raise ConfigError("cannot tell the model's vocabulary size (no config.vocab_size, no input embedding)")
    return min(sizes)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_argument(model: nn.Module) -> str:
    """The name under which ``model``'s forward takes the KV cache: ``cache`` where the release has it
    (``past_key_values`` is deprecated there), else ``past_key_values``."""
    try:
        params = inspect.signature(model.forward).parameters  # follows the deprecation wrappers' __wrapped__
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(out: Any) -> Any:
    """The KV cache a forward returned, read by the field name the release fills (no deprecated alias)."""
    for name in ("cache", "past_key_values"):
        if name in out:  # a ModelOutput holds only the fields that are set
            return out[name]
    raise ConfigError(f"the model returned no KV cache with use_cache=True (got fields {list(out.keys())})")


def _run_once(model: nn.Module, prompt: torch.Tensor, new_tokens: int, cache_arg: str) -> tuple[float, float]:
    """Seconds for the prefill and for ``new_tokens`` greedy decode steps."""
    device = prompt.device
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    _sync(device)
    t1 = time.perf_counter()
    past = _returned_cache(out)
    token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
    for _ in range(new_tokens):
        out = model(input_ids=token, use_cache=True, **{cache_arg: past})
        past = _returned_cache(out)
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
    _sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def measure_speed(
    model: nn.Module,
    prompt_len: int = 128,
    new_tokens: int = 32,
    batch_size: int = 1,
    repeats: int = 3,
    warmup: int = 1,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> SpeedResult:
    """Median prefill and decode tokens per second over ``repeats`` runs after ``warmup`` runs.

    Args:
        model: a causal LM that accepts ``use_cache`` and a KV cache (``cache`` or ``past_key_values``); it
            is not moved.
        prompt_len: tokens per prompt (random ids below the vocabulary size).
        new_tokens: greedy decode steps after the prefill.
        batch_size: prompts per forward pass.
        repeats: timed runs; the median is reported.
        warmup: untimed runs first (kernel selection, allocator warm-up).
        device: where the prompts go; defaults to the device of the model's first parameter.
        seed: seeds a local generator for the prompt ids.

    Raises:
        ConfigError: a non-positive size, or ``prompt_len + new_tokens`` beyond the model's context.
    """
    for arg, value, low in (
        ("prompt_len", prompt_len, 1), ("new_tokens", new_tokens, 1), ("batch_size", batch_size, 1),
        ("repeats", repeats, 1), ("warmup", warmup, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{arg} must be an integer >= {low}, got {value!r}")
    limit = model_context_length(model)
    if limit is not None and prompt_len + new_tokens > limit:
        raise ConfigError(
            f"prompt_len + new_tokens = {prompt_len + new_tokens} exceeds the model's context of {limit}"
        )
    target = torch.device(device) if device is not None else model_device(model)
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, _vocab_size(model), (batch_size, prompt_len), generator=generator)
    prompt = prompt.to(target)
    prefill: list[float] = []
    decode: list[float] = []
    cache_arg = cache_argument(model)
    with eval_mode(model), torch.inference_mode():
        for i in range(warmup + repeats):
            t_prefill, t_decode = _run_once(model, prompt, new_tokens, cache_arg)
            if i >= warmup:
                prefill.append(t_prefill)
                decode.append(t_decode)
    result = SpeedResult(
        prefill_tokens_per_s=batch_size * prompt_len / max(statistics.median(prefill), 1e-9),
        decode_tokens_per_s=batch_size * new_tokens / max(statistics.median(decode), 1e-9),
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        batch_size=batch_size,
        device=str(target),
        repeats=repeats,
    )
    logger.info("speed: prefill %.1f tok/s, decode %.1f tok/s on %s",
                result.prefill_tokens_per_s, result.decode_tokens_per_s, result.device)
    return result


@dataclass(frozen=True)
class PairedSpeed:
    """Throughput of a model relative to a reference, both timed in the same rounds of one process.

    On a machine shared with other work, two speeds measured minutes apart differ by more than most
    cuts change them; timing the two models alternately and taking the median of the per-round ratios
    cancels the load both saw.

    Attributes:
        prefill_ratio / decode_ratio: median over rounds of model / reference tokens per second.
        prefill_ratio_iqr / decode_ratio_iqr: the ratios' interquartile range ``(q1, q3)``.
        prefill_tokens_per_s / decode_tokens_per_s: the model's median tokens per second.
        reference_prefill_tokens_per_s / reference_decode_tokens_per_s: the reference's medians.
        rounds: timed rounds (each times both models once).
        prompt_len / new_tokens / batch_size: as in :func:`measure_speed`.
    """

    prefill_ratio: float
    decode_ratio: float
    prefill_ratio_iqr: tuple[float, float]
    decode_ratio_iqr: tuple[float, float]
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    reference_prefill_tokens_per_s: float
    reference_decode_tokens_per_s: float
    rounds: int
    prompt_len: int
    new_tokens: int
    batch_size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def compare_speed(
    model: nn.Module,
    reference: nn.Module,
    rounds: int = 7,
    prompt_len: int = 128,
    new_tokens: int = 32,
    batch_size: int = 1,
) -> PairedSpeed:
    """Prefill and decode throughput of ``model`` as a ratio to ``reference`` (e.g. the dense model).

    One untimed warm-up each, then ``rounds`` rounds that each time both models once on the same
    prompt (:func:`measure_speed` with ``repeats=1``); which one goes first swaps every round, so
    neither always runs on caches the other warmed.

    Raises:
        ConfigError: ``rounds`` below 1, or what :func:`measure_speed` refuses.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds must be an integer >= 1, got {rounds!r}")

    def once(m: nn.Module) -> SpeedResult:
        return measure_speed(m, prompt_len=prompt_len, new_tokens=new_tokens, batch_size=batch_size, repeats=1,
                             warmup=0)

    for m in (reference, model):
        once(m)
    got: dict[str, list[SpeedResult]] = {"model": [], "reference": []}
    for i in range(rounds):
        pair = [("reference", reference), ("model", model)]
        for key, m in pair if i % 2 == 0 else pair[::-1]:
            got[key].append(once(m))
    pairs = list(zip(got["model"], got["reference"], strict=True))
    prefill = [m.prefill_tokens_per_s / r.prefill_tokens_per_s for m, r in pairs]
    decode = [m.decode_tokens_per_s / r.decode_tokens_per_s for m, r in pairs]
    return PairedSpeed(
        prefill_ratio=statistics.median(prefill),
        decode_ratio=statistics.median(decode),
        prefill_ratio_iqr=_quartiles(prefill),
        decode_ratio_iqr=_quartiles(decode),
        prefill_tokens_per_s=statistics.median(s.prefill_tokens_per_s for s in got["model"]),
        decode_tokens_per_s=statistics.median(s.decode_tokens_per_s for s in got["model"]),
        reference_prefill_tokens_per_s=statistics.median(s.prefill_tokens_per_s for s in got["reference"]),
        reference_decode_tokens_per_s=statistics.median(s.decode_tokens_per_s for s in got["reference"]),
        rounds=rounds,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        batch_size=batch_size,
    )
