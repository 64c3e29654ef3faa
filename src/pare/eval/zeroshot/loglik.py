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

* **shared context**: requests with the same context tokens (the choices of a question) run the
  context once, keep its key/value cache, and run only their continuations on copies of it
  (``[context[-1]] + continuation[:-1]`` at positions ``len(context) - 1 ...``). Contexts of several
  questions share a forward, right-padded; the padded cache entries are masked out.
* **plain**: each request is one right-padded row (no mask is needed: padding comes after every
  real token and the model is causal), as the harness does. Models with a sliding attention window
  always take this path (their cache keeps only the window's last entries).

Log-probabilities are taken in float32 on the continuation positions only (the harness takes
``log_softmax`` over every position, in the model's dtype).
"""

from __future__ import annotations

import inspect
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pare.errors import ConfigError

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


@dataclass(frozen=True)
class _Row:
    """One request prepared for a forward: the input ids and the targets scored at its last positions."""

    index: int
    inputs: list[int]
    targets: list[int]


def _plain_row(index: int, req: Encoded, max_length: int) -> _Row:
    whole = list(req.context + req.continuation)[-(max_length + 1):]
    targets = list(req.continuation)[-(len(whole) - 1):] if len(whole) > 1 else []
    return _Row(index, whole[:-1], targets)


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


class LoglikelihoodRunner:
    """Scores encoded requests on one model, in batches, with a progress bar.

    Args:
        model: a causal LM (eval mode is the caller's business).
        batch_size: rows per forward (continuations of the shared path, requests of the plain path).
        max_length: the model's context in tokens (see :func:`harness_max_length`).
        share_context: run a context shared by several requests once (the default); False runs every
            request as its own row, as the harness does.
        progress: show a tqdm bar.
    """

    def __init__(self, model: nn.Module, *, batch_size: int = 16, max_length: int = DEFAULT_MAX_LENGTH,
                 share_context: bool = True, progress: bool = True, pad_id: int = 0) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.max_length = max_length
        # a sliding-window cache keeps only the window's last entries, the context padding among them:
        # those models run every request as its own row
        self.share_context = share_context and not _sliding_window(model)
        self.progress = progress
        self.pad_id = pad_id
        self.device = _device(model)
        params = _forward_parameters(model)
        self._keep = "logits_to_keep" in params
        # transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns)
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def run(self, requests: Sequence[Encoded], desc: str = "loglikelihood") -> list[tuple[float, bool]]:
        """``(loglik, greedy)`` for each request, in the order given."""
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        plain: list[int] = []
        for i, req in enumerate(requests):
            if not req.continuation:
                raise ConfigError(f"request {i} has an empty continuation: nothing to score")
            fits = len(req.context) + len(req.continuation) <= self.max_length + 1
            if self.share_context and fits and len(req.context) >= 2:
                groups[req.context].append(i)
            else:
                plain.append(i)
        shared = [members for members in groups.values() if len(members) > 1]
        plain += [members[0] for members in groups.values() if len(members) == 1]
        with torch.no_grad(), tqdm(total=len(requests), desc=desc, disable=not self.progress, leave=False) as bar:
            self._run_shared(requests, shared, out, bar)
            self._run_plain(requests, plain, out, bar)
        return [r for r in out if r is not None]

    # -- plain path -------------------------------------------------------------------------------

    def _run_plain(self, requests: Sequence[Encoded], indices: list[int], out: list, bar: tqdm) -> None:
        rows = [_plain_row(i, requests[i], self.max_length) for i in indices]
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

    # -- shared-context path ----------------------------------------------------------------------

    def _run_shared(self, requests: Sequence[Encoded], groups: list[list[int]], out: list, bar: tqdm) -> None:
        groups = sorted(groups, key=lambda g: (-len(requests[g[0]].context), g[0]))
        batch: list[list[int]] = []
        rows = 0
        for members in groups:
            if batch and rows + len(members) > self.batch_size:
                self._shared_batch(requests, batch, out)
                bar.update(rows)
                batch, rows = [], 0
            batch.append(members)
            rows += len(members)
        if batch:
            self._shared_batch(requests, batch, out)
            bar.update(rows)

    def _shared_batch(self, requests: Sequence[Encoded], groups: list[list[int]], out: list) -> None:
        """One forward over the contexts (all but their last token), then one over every continuation."""
        contexts = [requests[g[0]].context[:-1] for g in groups]
        c_width = max(len(c) for c in contexts)
        ctx_ids = torch.full((len(groups), c_width), self.pad_id, dtype=torch.long)
        for g, c in enumerate(contexts):
            ctx_ids[g, :len(c)] = torch.tensor(c)
        kwargs: dict[str, Any] = {"logits_to_keep": 1} if self._keep else {}
        first = self.model(input_ids=ctx_ids.to(self.device), use_cache=True, **kwargs)
        cache = first.cache if self._cache_arg == "cache" else first.past_key_values
        members = [(g, i) for g, idx in enumerate(groups) for i in idx]
        rows = [[requests[i].context[-1], *requests[i].continuation[:-1]] for _, i in members]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.ones((len(rows), c_width + width), dtype=torch.long)
        positions = torch.empty((len(rows), width), dtype=torch.long)
        for b, ((g, _), row) in enumerate(zip(members, rows, strict=True)):
            ids[b, :len(row)] = torch.tensor(row)
            mask[b, len(contexts[g]):c_width] = 0  # the padding of this row's context in the cache
            positions[b] = torch.arange(len(contexts[g]), len(contexts[g]) + width)
        cache.reorder_cache(torch.tensor([g for g, _ in members], device=self.device))
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                            position_ids=positions.to(self.device), use_cache=True,
                            **{self._cache_arg: cache}).logits
        for b, (_, i) in enumerate(members):
            cont = list(requests[i].continuation)
            out[i] = _score(logits[b, :len(cont)], cont)
