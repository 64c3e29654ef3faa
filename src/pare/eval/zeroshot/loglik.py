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

* **packed** (the default): the requests of one question usually share their first tokens (the
  context of its choices; WinoGrande's sentence up to the blank). Each question becomes a small tree,
  its common prefix once and then every request's remaining tokens, and several trees are packed into
  one row without padding. Position ids restart at the prefix's end for each request, and a custom
  attention mask lets a token see its own prefix and the earlier tokens of its own request only, so
  every scored position sees exactly the tokens it would see alone. Logits are computed only at the
  scored positions.
* **plain**: each request is one right-padded row (no mask is needed: padding comes after every
  real token and the model is causal), as the harness does. Models with a sliding attention window,
  or an attention implementation that takes no custom mask, take this path.

Log-probabilities are taken in float32 on the continuation positions only (the harness takes
``log_softmax`` over every position, in the model's dtype).
"""

from __future__ import annotations

import bisect
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


_PACKABLE_ATTENTION = ("sdpa", "eager")  # implementations that apply a custom 4-D additive mask as given
ROW_TOKENS = 128  # a packed row's length (a longer question gets a row of its own): attention costs its square
FORWARD_TOKENS_PER_BATCH = 32  # a packed forward holds about this many tokens per unit of batch_size


@dataclass(frozen=True)
class _Tree:
    """The requests of one question: their common ``prefix`` and each request's remaining ``rows``
    (a row's ``inputs`` continue the prefix; its ``targets`` are scored at the last positions of
    ``prefix + inputs``)."""

    prefix: list[int]
    rows: list[_Row]

    @property
    def length(self) -> int:
        return len(self.prefix) + sum(len(r.inputs) for r in self.rows)


def build_tree(rows: Sequence[_Row]) -> _Tree:
    """Split requests into their longest common prefix of inputs and what each request adds after it.

    Scored positions may lie inside the prefix (choices that start with the same words): the logits
    there are the same for every request that shares it, so they are computed once."""
    ref = rows[0].inputs
    shortest = min(len(r.inputs) for r in rows)
    n = 0
    while n < shortest and all(r.inputs[n] == ref[n] for r in rows):
        n += 1
    return _Tree(list(ref[:n]), [_Row(r.index, r.inputs[n:], r.targets) for r in rows])


def pack_trees(trees: Sequence[_Tree], capacity: int) -> list[list[_Tree]]:
    """Trees into rows of at most ``capacity`` tokens (a longer tree gets a row of its own): largest
    first, each row topped up with the largest trees that still fit (first-fit decreasing)."""
    pending = sorted(trees, key=lambda t: t.length)  # ascending: bisect finds the largest that fits
    lengths = [t.length for t in pending]
    packed: list[list[_Tree]] = []
    while pending:
        row = [pending.pop()]
        lengths.pop()
        room = capacity - row[0].length
        while pending and room >= lengths[0]:
            at = bisect.bisect_right(lengths, room) - 1
            row.append(pending.pop(at))
            room -= lengths.pop(at)
        packed.append(row)
    return packed


def packed_inputs(row: Sequence[_Tree]) -> tuple[list[int], list[int], torch.Tensor, list[list[int]]]:
    """Token ids, position ids and the ``[T, T]`` boolean attention pattern of a packed row, and the
    positions in it where every request is scored (in the order of its trees' rows).

    A prefix token sees the earlier tokens of its prefix; a request's token sees its whole prefix and
    the earlier tokens of its own request."""
    ids: list[int] = []
    pos: list[int] = []
    tree_start: list[int] = []  # per token: where its tree's prefix starts / ends, where its own part starts
    prefix_end: list[int] = []
    own_start: list[int] = []
    scored: list[list[int]] = []
    for tree in row:
        start, n = len(ids), len(tree.prefix)
        ids += tree.prefix
        pos += range(n)
        tree_start += [start] * n
        prefix_end += [start + n] * n
        own_start += [start] * n
        for r in tree.rows:
            begin = len(ids)
            ids += r.inputs
            pos += range(n, n + len(r.inputs))
            tree_start += [start] * len(r.inputs)
            prefix_end += [start + n] * len(r.inputs)
            own_start += [begin] * len(r.inputs)
            # the request's input index j sits at start + j inside the prefix, at begin + j - n after it
            first = n + len(r.inputs) - len(r.targets)
            scored.append([start + j if j < n else begin + j - n for j in range(first, n + len(r.inputs))])
    q = torch.arange(len(ids))[:, None]
    k = torch.arange(len(ids))[None, :]
    ts, pe, own = (torch.tensor(v)[:, None] for v in (tree_start, prefix_end, own_start))
    allowed = (k <= q) & (((k >= ts) & (k < pe)) | (k >= own))
    return ids, pos, allowed, scored


class LoglikelihoodRunner:
    """Scores encoded requests on one model, in batches, with a progress bar.

    Args:
        model: a causal LM (eval mode is the caller's business).
        batch_size: rows per forward on the plain path; on the packed path a forward holds about
            ``32 * batch_size`` tokens, in rows of up to 128 (or the longest question, when longer).
        max_length: the model's context in tokens (see :func:`harness_max_length`).
        share_context: run the tokens the requests of a question share once, packing questions into
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

    def run(self, requests: Sequence[Encoded], desc: str = "loglikelihood",
            groups: Sequence[Sequence[int]] | None = None) -> list[tuple[float, bool]]:
        """``(loglik, greedy)`` for each request, in the order given.

        Args:
            requests: the encoded requests.
            desc: the progress bar's label.
            groups: indices of requests likely to share their first tokens (the requests of one
                question); by default, the requests with the same context tokens.
        """
        for i, req in enumerate(requests):
            if not req.continuation:
                raise ConfigError(f"request {i} has an empty continuation: nothing to score")
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        with torch.no_grad(), tqdm(total=len(requests), desc=desc, disable=not self.progress, leave=False) as bar:
            if self.share_context:
                self._run_packed(requests, _groups(requests, groups), out, bar)
            else:
                self._run_plain(requests, list(range(len(requests))), out, bar)
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

    # -- packed path ------------------------------------------------------------------------------

    def _run_packed(self, requests: Sequence[Encoded], groups: list[list[int]], out: list, bar: tqdm) -> None:
        trees = [build_tree([_plain_row(i, requests[i], self.max_length) for i in g]) for g in groups]
        rows = pack_trees(trees, self.row_tokens)
        rows.sort(key=lambda r: -sum(t.length for t in r))
        per_forward = max(1, self.forward_tokens // self.row_tokens)
        for start in range(0, len(rows), per_forward):
            self._packed_forward(rows[start:start + per_forward], out)
            bar.update(sum(len(t.rows) for r in rows[start:start + per_forward] for t in r))

    def _packed_forward(self, rows: list[list[_Tree]], out: list) -> None:
        """One forward over packed rows (right-padded to the longest; a pad token sees only itself)."""
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
            for s in scored:
                keep[b, s] = True
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
        for b, (row, (_, _, _, scored)) in enumerate(zip(rows, packed, strict=True)):
            for r, positions in zip((r for tree in row for r in tree.rows), scored, strict=True):
                out[r.index] = _score(logits[flat_index[b, positions].to(logits.device)], r.targets)


def _groups(requests: Sequence[Encoded], groups: Sequence[Sequence[int]] | None) -> list[list[int]]:
    """The groups given (checked to cover every request once), or the requests by context tokens."""
    if groups is None:
        by_context: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            by_context[req.context].append(i)
        return list(by_context.values())
    flat = sorted(i for g in groups for i in g)
    if flat != list(range(len(requests))) or any(not g for g in groups):
        raise ConfigError(f"groups must cover each of the {len(requests)} requests exactly once")
    return [list(g) for g in groups]


def _packable(model: nn.Module, params: set[str]) -> bool:
    """Whether the model takes position ids and applies a custom 4-D mask as given, with no sliding window
    (its own window mask would be replaced by ours)."""
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    return ("position_ids" in params and "attention_mask" in params and implementation in _PACKABLE_ATTENTION
            and not _sliding_window(model))
