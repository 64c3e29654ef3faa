"""Batched log-likelihood of continuations given contexts, as lm-evaluation-harness 0.4.x computes it.

A request is a ``(context, continuation)`` string pair. Tokenization follows the harness's
``HFLM._encode_pair`` (0.4.13): whitespace at the end of the context moves onto the continuation, then
``encode(context + continuation)`` is split at ``len(encode(context))``, both encoded with the
tokenizer's own special-token default; an empty context is the model's prefix token (BOS, else EOS)
and the continuation is encoded without special tokens. The score of a request is

    loglik = sum over continuation tokens t of  log p(t | everything before t)
    greedy = every continuation token is the argmax of its distribution

over the input ``(context + continuation)[-(max_length + 1):][:-1]`` (the harness keeps the last
``max_length + 1`` tokens when a request is longer than the model's context).

Two paths compute the same numbers:

* **packed** (the default): requests share their first tokens (the context of a question's choices;
  WinoGrande's sentence up to the blank, and twin sentences more; a fixed lead-in). All requests go
  into one prefix trie (:mod:`pare.eval.zeroshot.pack`), cut into units and packed into rows without
  padding, so a shared token runs once per row. Position ids follow each token's depth in the trie,
  and a custom attention mask lets a token see its ancestors only, so every scored position sees
  exactly the tokens it would see alone. Logits are computed only at the scored positions.
* **plain**: each request is one right-padded row (no mask is needed: padding comes after every
  real token and the model is causal), as the harness does. Models with a sliding attention window,
  or an attention implementation that takes no custom mask, take this path.

Log-probabilities are taken in float32 on the continuation positions only (the harness takes
``log_softmax`` over every position, in the model's dtype).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pare.errors import ConfigError
from pare.eval.zeroshot.pack import Row, Unit, build_trie, first_fit_decreasing, packed_inputs, split_trie

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048  # the harness's fallback when neither the model nor the tokenizer says
_HARNESS_CONTEXT_FIELDS = ("n_positions", "max_position_embeddings", "n_ctx")


@dataclass(frozen=True)
class Encoded:
    """One request as token ids: ``context`` (never empty) and ``continuation``."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


def tok_encode(tokenizer: Any, text: str, add_special_tokens: bool | None = None) -> list[int]:
    """Token ids of ``text`` as the harness's ``HFLM.tok_encode`` gives them (``add_bos_token`` unset): the
    tokenizer's own special-token default, except that a text already starting with the prefix token's
    string gets no second one."""
    kwargs: dict[str, Any] = {}
    if add_special_tokens is not None:
        kwargs["add_special_tokens"] = add_special_tokens
    else:
        prefix = _prefix_string(tokenizer)
        if prefix and text.startswith(prefix):
            kwargs["add_special_tokens"] = False
    return list(tokenizer.encode(text, **kwargs))


def _prefix_string(tokenizer: Any) -> str | None:
    try:
        return tokenizer.decode(prefix_token_id(tokenizer))
    except ConfigError:
        return None


def prefix_token_id(tokenizer: Any) -> int:
    """The token an empty context stands for: BOS when the tokenizer has one, else EOS (the harness's rule)."""
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ConfigError("the tokenizer has neither a BOS nor an EOS token: an empty context (BLiMP) cannot be scored")


def encode_pair(tokenizer: Any, context: str, continuation: str) -> Encoded:
    """Token ids of a request, split as the harness splits them (see the module docstring)."""
    if context == "":
        cont = tok_encode(tokenizer, continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        if cont and cont[0] == prefix:  # the text starts with the prefix token itself
            return Encoded((prefix,), tuple(cont[1:]))
        return Encoded((prefix,), tuple(cont))
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok_encode(tokenizer, context + continuation)
    ctx = tok_encode(tokenizer, context)
    return Encoded(tuple(ctx), tuple(whole[len(ctx):]))


def harness_max_length(model: nn.Module, tokenizer: Any = None) -> int:
    """The context the harness gives a model: ``n_positions``, ``max_position_embeddings`` or ``n_ctx`` of
    its config, else the tokenizer's ``model_max_length`` (unless it is the "no limit" sentinel), else 2048."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in _HARNESS_CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000_000:
        return tok_max
    return DEFAULT_MAX_LENGTH


def _plain_row(index: int, req: Encoded, max_length: int) -> Row:
    whole = list(req.context + req.continuation)[-(max_length + 1):]
    targets = list(req.continuation)[-(len(whole) - 1):] if len(whole) > 1 else []
    return Row(index, whole[:-1], targets)


def _device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return torch.device("cpu") if first is None else first.device


def _forward_parameters(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _sliding_window(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return bool(getattr(config, "sliding_window", None)) or "sliding_attention" in (
        getattr(config, "layer_types", None) or ())


def _score(logits: torch.Tensor, targets: list[int]) -> tuple[float, bool]:
    """Summed log-probability of ``targets`` under ``logits: [len(targets), V]`` and whether all are greedy."""
    logp = F.log_softmax(logits.float(), dim=-1)
    tgt = torch.tensor(targets, dtype=torch.long, device=logits.device)
    picked = logp.gather(-1, tgt[:, None]).squeeze(-1)
    return float(picked.sum()), bool((logp.argmax(dim=-1) == tgt).all())


_PACKABLE_ATTENTION = ("sdpa", "eager")  # implementations that apply a custom 4-D additive mask as given
ROW_TOKENS = 128  # a packed row's length (a longer unit gets a row of its own): attention costs its square
FORWARD_TOKENS_PER_BATCH = 32  # a packed forward holds about this many tokens per unit of batch_size


class LoglikelihoodRunner:
    """Scores encoded requests on one model, in batches, with a progress bar.

    Args:
        model: a causal LM (eval mode is the caller's business).
        batch_size: rows per forward on the plain path; on the packed path a forward holds about
            ``32 * batch_size`` tokens, in rows of up to 128 (or one longer unit of the trie).
        max_length: the model's context in tokens (see :func:`harness_max_length`).
        share_context: run the tokens requests share once, packing a prefix trie of all requests into
            rows (the default); False runs every request as its own row, as the harness does.
        progress: show a tqdm bar.
        pad_id: the token that fills the plain path's padding (never scored).
    """

    def __init__(self, model: nn.Module, *, batch_size: int = 16, max_length: int = DEFAULT_MAX_LENGTH,
                 share_context: bool = True, progress: bool = True, pad_id: int = 0) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.max_length = max_length
        params = _forward_parameters(model)
        self._keep = "logits_to_keep" in params
        self.share_context = share_context and _packable(model, params)
        self.progress = progress
        self.pad_id = pad_id
        self.device = _device(model)
        self.row_tokens = ROW_TOKENS
        self.forward_tokens = FORWARD_TOKENS_PER_BATCH * batch_size

    def run(self, requests: Sequence[Encoded], desc: str = "loglikelihood") -> list[tuple[float, bool]]:
        """``(loglik, greedy)`` for each request, in the order given (``desc`` labels the progress bar)."""
        for i, req in enumerate(requests):
            if not req.continuation:
                raise ConfigError(f"request {i} has an empty continuation: nothing to score")
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        rows = [_plain_row(i, req, self.max_length) for i, req in enumerate(requests)]
        with torch.no_grad(), tqdm(total=len(requests), desc=desc, disable=not self.progress, leave=False) as bar:
            if rows and self.share_context:
                self._run_packed(rows, out, bar)
            elif rows:
                self._run_plain(rows, out, bar)
        return [r for r in out if r is not None]

    # -- plain path -------------------------------------------------------------------------------

    def _run_plain(self, rows: list[Row], out: list, bar: tqdm) -> None:
        rows.sort(key=lambda r: (-len(r.inputs), r.index))  # longest first, as the harness orders them
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start:start + self.batch_size]
            width = max(len(r.inputs) for r in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            for b, r in enumerate(batch):
                ids[b, :len(r.inputs)] = torch.tensor(r.inputs)
            first = min(len(r.inputs) - len(r.targets) for r in batch)  # earliest scored position
            kwargs: dict[str, Any] = {}
            if self._keep:
                kwargs["logits_to_keep"] = torch.arange(first, width, device=self.device)
            else:
                first = 0
            logits = self.model(input_ids=ids.to(self.device), use_cache=False, **kwargs).logits
            for b, r in enumerate(batch):
                end = len(r.inputs) - first
                out[r.index] = _score(logits[b, end - len(r.targets):end], r.targets)
            bar.update(len(batch))

    # -- packed path ------------------------------------------------------------------------------

    def _run_packed(self, rows: list[Row], out: list, bar: tqdm) -> None:
        units = split_trie(build_trie(rows), self.row_tokens)
        packed = first_fit_decreasing(units, self.row_tokens, lambda u: u.length)
        lengths = [sum(u.length for u in row) for row in packed]
        order = sorted(range(len(packed)), key=lambda i: -lengths[i])  # a forward's rows are of similar width
        at = 0
        while at < len(order):  # as many rows as fit the forward's tokens at the width of its first (widest)
            n = max(1, min(len(order) - at, self.forward_tokens // lengths[order[at]]))
            bar.update(self._packed_forward([packed[i] for i in order[at:at + n]], out))
            at += n

    def _packed_forward(self, rows: list[list[Unit]], out: list) -> int:
        """One forward over packed rows (right-padded to the longest; a pad token sees only itself);
        returns the number of requests scored."""
        packed = [packed_inputs(r) for r in rows]
        width = max(len(p[0]) for p in packed)
        dtype = next(self.model.parameters()).dtype
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        allowed = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1)
        keep = torch.zeros((len(rows), width), dtype=torch.bool)
        for b, (row_ids, row_pos, row_allowed, scored) in enumerate(packed):
            n = len(row_ids)
            ids[b, :n] = torch.tensor(row_ids)
            pos[b, :n] = torch.tensor(row_pos)
            allowed[b, :n, :n] = row_allowed
            for _, positions in scored:
                keep[b, positions] = True
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        kwargs: dict[str, Any] = {"logits_to_keep": keep.to(self.device)} if self._keep else {}
        logits = self.model(input_ids=ids.to(self.device), position_ids=pos.to(self.device),
                            attention_mask=mask[:, None].to(self.device), use_cache=False, **kwargs).logits
        if logits.ndim == 2:  # a boolean logits_to_keep comes back flattened: [kept positions, V]
            flat_index = torch.full((len(rows), width), -1, dtype=torch.long)
            flat_index[keep] = torch.arange(int(keep.sum()))
        else:  # every position came back
            logits = logits.reshape(-1, logits.shape[-1])
            flat_index = torch.arange(len(rows) * width).reshape(len(rows), width)
        done = 0
        for b, (_, _, _, scored) in enumerate(packed):
            for r, positions in scored:
                out[r.index] = _score(logits[flat_index[b, positions].to(logits.device)], r.targets)
                done += 1
        return done


def _packable(model: nn.Module, params: set[str]) -> bool:
    """Whether the model takes position ids and applies a custom 4-D mask as given, with no sliding window
    (its own window mask would be replaced by ours)."""
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    return ("position_ids" in params and "attention_mask" in params and implementation in _PACKABLE_ATTENTION
            and not _sliding_window(model))
