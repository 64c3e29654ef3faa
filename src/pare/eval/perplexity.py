"""Perplexity of a causal LM on a token stream, in the protocol of the pruning papers.

SparseGPT (Frantar & Alistarh, 2023), Wanda (Sun et al., 2023) and SliceGPT evaluate on
non-overlapping windows: the stream of N tokens is cut into ``N // seqlen`` windows of ``seqlen``
tokens (the tail is dropped), each window is scored on its own (no context carried over), and

    nll = mean over windows w and positions t = 1..seqlen-1 of  -log p(x[w, t] | x[w, <t])
    ppl = exp(nll)

which equals ``exp(mean over windows of model(window, labels=window).loss)`` because every window
predicts the same ``seqlen - 1`` positions. pare stacks several windows per forward pass and
computes the cross entropy itself, in float32 chunks, so a large vocabulary never needs a float32
copy of all the logits.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pare.calibration.data import check_ids_in_vocab
from pare.calibration.runner import model_device
from pare.errors import ConfigError, NotEnoughDataError

logger = logging.getLogger(__name__)

# Logit elements cast to float32 at a time (64 MiB): bounds the extra memory of the loss.
_CHUNK_ELEMENTS = 1 << 24
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


@dataclass(frozen=True)
class PerplexityResult:
    """What :func:`perplexity` measured.

    Attributes:
        ppl: ``exp(nll)``.
        nll: mean negative log-likelihood per predicted token (nats).
        n_tokens: tokens in the scored windows (``n_windows * seqlen``); each window predicts
            ``seqlen - 1`` of them.
        n_windows: windows scored.
        seqlen: tokens per window.
        dataset: the data set's name, when the caller gave one.
    """

    ppl: float
    nll: float
    n_tokens: int
    n_windows: int
    seqlen: int
    dataset: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's config allows, or None when the config does not say."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in _CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put the model in eval mode (no dropout) for the block, then restore its training flag."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _as_stream(input_ids: torch.Tensor) -> torch.Tensor:
    if input_ids.dim() == 2 and input_ids.shape[0] == 1:
        input_ids = input_ids[0]
    if input_ids.dim() != 1:
        raise ConfigError(
            f"input_ids must be one token stream of shape [1, N] or [N], got {tuple(input_ids.shape)}"
        )
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ConfigError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    return input_ids.long()


def _check_seqlen(model: nn.Module, seqlen: int, n_tokens: int) -> None:
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise ConfigError(f"seqlen must be an integer >= 2 (a window predicts seqlen-1 tokens), got {seqlen!r}")
    limit = model_context_length(model)
    if limit is not None and seqlen > limit:
        raise ConfigError(
            f"seqlen={seqlen} is longer than the model's context of {limit} tokens "
            f"(config max_position_embeddings/n_positions); use seqlen <= {limit}"
        )
    if n_tokens < 2:
        raise NotEnoughDataError(f"the text holds {n_tokens} tokens: is it empty? Evaluate on a text with real content")
    if n_tokens < seqlen:
        raise NotEnoughDataError(
            f"the text holds {n_tokens} tokens, fewer than one window of seqlen={seqlen}; "
            f"use seqlen <= {n_tokens} or a longer text"
        )


def nll_sum(logits: torch.Tensor, windows: torch.Tensor) -> tuple[float, int]:
    """Sum of -log p(next token) over all predicted positions, and how many there are.

    Cross-entropy in float32 chunks of rows (bounded memory for large vocabularies), the chunk sums
    accumulated in float64 so that splitting the windows into batches does not change the result.

    Args:
        logits: ``[B, L, V]`` in the model's dtype.
        windows: ``[B, L]`` token ids.
    """
    vocab = logits.shape[-1]
    rows = max(1, _CHUNK_ELEMENTS // vocab)
    windows = windows.to(logits.device)
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for b in range(logits.shape[0]):
        # position t predicts token t+1: logits[:-1] against tokens[1:], as transformers' loss
        pred, target = logits[b, :-1], windows[b, 1:]
        for s in range(0, pred.shape[0], rows):
            total += F.cross_entropy(pred[s : s + rows].float(), target[s : s + rows], reduction="sum").double()
    return float(total.item()), int(windows[:, 1:].numel())


def _logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=batch, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


def perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    seqlen: int,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
    max_windows: int | None = None,
    dataset: str | None = None,
) -> PerplexityResult:
    """Perplexity on non-overlapping windows of ``seqlen`` tokens (see the module docstring).

    Args:
        model: a causal LM returning ``.logits`` ``[B, L, V]``; it is not moved.
        input_ids: the token stream, ``[1, N]`` or ``[N]`` (e.g. from
            :func:`pare.calibration.data.eval_token_ids`).
        seqlen: tokens per window (2048 in the papers); at most the model's context.
        batch_size: windows per forward pass. Results do not depend on it; memory grows with it
            (the logits are ``batch_size * seqlen * vocab`` values).
        device: where the windows go; defaults to the device of the model's first parameter.
        progress: show a tqdm bar.
        max_windows: score only the first ``max_windows`` windows (quick checks).
        dataset: a name stored in the result.

    Returns:
        A :class:`PerplexityResult`.

    Raises:
        ConfigError: ``seqlen`` beyond the model's context, or bad arguments.
        NotEnoughDataError: fewer than ``seqlen`` tokens.
    """
    ids = _as_stream(input_ids)
    _check_seqlen(model, seqlen, ids.numel())
    check_ids_in_vocab(model, ids, "evaluation")
    for arg, value in (("batch_size", batch_size), ("max_windows", max_windows)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{arg} must be a positive integer, got {value!r}")
    n_windows = ids.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    target = torch.device(device) if device is not None else model_device(model)
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)
    total = 0.0  # a Python float (double): batch sums arrive in float32, accumulate in float64
    bar = tqdm(total=n_windows, desc="perplexity", unit="window", disable=not progress)
    with eval_mode(model), torch.inference_mode(), bar:
        for start in range(0, n_windows, batch_size):
            batch = windows[start : start + batch_size].to(target)
            total += nll_sum(_logits(model, batch), batch)[0]
            bar.update(batch.shape[0])
    nll = total / (n_windows * (seqlen - 1))
    if not math.isfinite(nll):
        logger.warning("perplexity: the mean NLL is %s (non-finite logits? try float32)", nll)
    ppl = math.exp(nll) if nll < 700 else math.inf
    logger.info("perplexity %.4f over %d windows of %d tokens", ppl, n_windows, seqlen)
    return PerplexityResult(ppl, nll, n_windows * seqlen, n_windows, seqlen, dataset)
