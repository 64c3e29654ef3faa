"""Perplexity-guided removal of consecutive layers (AMD Quark's depth-wise pruner).

For every window ``[s, s+n)`` of ``n`` consecutive decoder layers, the perplexity of the model
without that window is measured on a held-out part of the calibration windows; the window whose
removal leaves the lowest perplexity is deleted (Quark ``LayerImportancePruneConfig``).

``search="exact"`` re-runs the whole model without each window (``L - n + 1`` full forwards).
``search="proxy"`` shares the prefix: the layers run once and the hidden state entering every layer
is cached; window ``[s, s+n)`` then starts from the cached input of layer ``s`` and runs only layers
``s+n .. L-1`` before the model's own head (:func:`logits_from_hidden`). Layers before ``s`` see the
same inputs with or without the window, so this is the same computation as ``exact``, not an
approximation: the same scores (to float rounding) and the same choice, for about half the layer
evaluations (``sum_s (L - s - n)`` instead of ``(L - n + 1)(L - n)``).

``search="bound"`` adds branch and bound to ``proxy``: windows are tried in order of increasing
angular distance (free from the cache) and a window's NLL, summed batch by batch, is abandoned once
it exceeds the best complete one, because NLL terms are positive and it can no longer win. The
choice is exactly ``proxy``'s (same sums in the same order); the report gives a lower bound
(``ppl_at_least``) for abandoned windows. It only saves work on windows much worse than the best
(the partial sum must pass the best *total*).

``search="halving"`` (the default) is successive halving on the same cache: every window is scored on the first
``halving_first`` of the scoring windows (default a quarter), and only the best ``halving_keep`` of
them (at least two) are scored on the rest and compete. The prefix is computed lazily, so the
remaining windows only run as deep as the surviving windows need. It is not exact: a window that
looks worse on the first quarter than two others never gets its full score (the report gives its
first-slice perplexity), which matters only when windows are within noise of each other.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from pare.calibration.runner import LayerStep, logits_from_hidden, model_device, on_device
from pare.config import help_field, register
from pare.errors import ConfigError
from pare.eval.perplexity import nll_sum
from pare.methods.base import PruneContext
from pare.methods.layers import CountedDepthPruner, DepthConfig, apply_layer_removal, holdout_windows
from pare.ops.similarity import angular_distance, perplexity_of

log = logging.getLogger(__name__)

SEARCHES = ("halving", "proxy", "bound", "exact")


class PrefixCache:
    """The dense input of every decoder layer (and the model's call arguments) on some windows,
    computed lazily: batch ``b`` runs through the layers only as far as a caller asks.

    :meth:`input_of` ``(i, b)`` is the hidden state entering layer ``i`` for batch ``b``; ``i = L``
    is the last layer's output.
    """

    def __init__(self, ctx: PruneContext, ids: torch.Tensor) -> None:
        self.ctx = ctx
        runner = ctx.runner(ids, sequential=False)
        captured = runner.capture()
        self._inputs: list[list[torch.Tensor]] = [[h] for h in captured.hidden]  # [batch][layer]
        self.calls: list[list[Any]] = captured.calls
        self.batches = runner.batches
        self.device = runner.device
        self.num_layers = ctx.arch.num_layers
        self.as_tuple = False  # how the real layers return (learned from the first one run)

    def _run(self, j: int, b: int, hidden: torch.Tensor) -> torch.Tensor:
        """Layer ``j`` on ``hidden`` with batch ``b``'s call arguments."""
        arch, model = self.ctx.arch, self.ctx.model
        layer = arch.layer_modules(model)[j]
        with on_device(layer, self.device):
            step = LayerStep(j, layer, arch.layers[j], arch.layer_prefix(j), [], self.calls[j], self.device)
            out = step.forward_batch(b, hidden)
        self.as_tuple = step.returns_tuple
        return out.detach()

    @torch.no_grad()
    def input_of(self, i: int, b: int) -> torch.Tensor:
        """The dense hidden state entering layer ``i`` (``L``: the last output) for batch ``b``."""
        cached = self._inputs[b]
        while len(cached) <= i:
            j = len(cached) - 1
            cached.append(self._run(j, b, cached[j].to(self.device)).to(cached[0].device))
        return cached[i]

    @torch.no_grad()
    def batch_nll(self, b: int, start: int, skip: frozenset[int] = frozenset()) -> tuple[float, int]:
        """Summed NLL and token count of batch ``b`` when running layers ``start..L-1`` (minus
        ``skip``) from the cached input of layer ``start``, then the model's own head."""
        hidden = self.input_of(start, b).to(self.device)
        for j in range(start, self.num_layers):
            if j not in skip:
                hidden = self._run(j, b, hidden)
        ids = self.batches[b]
        return nll_sum(logits_from_hidden(self.ctx.model, self.ctx.arch, ids, hidden, self.as_tuple), ids)

    def nll_from(
        self, start: int, skip: frozenset[int] = frozenset(), batches: range | None = None
    ) -> tuple[float, int]:
        """:meth:`batch_nll` summed over ``batches`` (default: every batch)."""
        nll, tokens = 0.0, 0
        for b in batches if batches is not None else range(len(self.batches)):
            n, t = self.batch_nll(b, start, skip)
            nll, tokens = nll + n, tokens + t
        return nll, tokens

    def span_distance(self, start: int, n: int) -> float:
        """Mean angular distance between the dense inputs of layers ``start`` and ``start + n``."""
        total, count = 0.0, 0
        for b in range(len(self.batches)):
            d = angular_distance(self.input_of(start, b), self.input_of(start + n, b))
            total, count = total + float(d.sum()), count + d.numel()
        return total / count


@torch.no_grad()
def model_nll(model: torch.nn.Module, ids: torch.Tensor, batch_size: int) -> tuple[float, int]:
    """Summed NLL and token count of a full forward over ``ids [N, L]`` in batches."""
    device = model_device(model)
    nll, tokens = 0.0, 0
    for batch in ids.split(batch_size):
        n, t = nll_sum(model(input_ids=batch.to(device), use_cache=False).logits, batch)
        nll, tokens = nll + n, tokens + t
    return nll, tokens


def _bound_scores(cache: PrefixCache, n: int, bar) -> list[tuple[float, bool]]:
    """Branch and bound over windows: the exact argmin, full scores only where needed.

    Windows are visited in order of increasing angular distance (free from the cache, usually close
    to the perplexity order). A window's NLL is summed batch by batch; as every term is positive, it
    is abandoned as soon as its partial sum exceeds the best complete one, since it can no longer win.
    Returns per window ``(ppl, exact)``; for abandoned ones ``ppl`` is a lower bound.
    """
    L = cache.num_layers
    starts = sorted(range(L - n + 1), key=lambda s: (cache.span_distance(s, n), s))
    tokens = sum(int(ids[:, 1:].numel()) for ids in cache.batches)
    best = math.inf
    out: dict[int, tuple[float, bool]] = {}
    for s in starts:
        total, complete = 0.0, True
        last = len(cache.batches) - 1
        for b in range(last + 1):
            total += cache.batch_nll(b, s, frozenset(range(s, s + n)))[0]
            if total > best and b < last:
                complete = False
                break
        if complete:
            best = min(best, total)
        out[s] = (perplexity_of(total, tokens), complete)
        bar.update(1)
    return [out[s] for s in range(L - n + 1)]


def _halving_scores(
    cache: PrefixCache, n: int, first: float, keep: float, bar
) -> tuple[float, list[float], list[bool]]:
    """Successive halving on the shared prefix: every window is scored on the first ``first`` of
    the scoring windows; the best ``keep`` of them (at least two) are scored on the rest, and only
    they compete. Returns the dense perplexity and per window the full-set perplexity (survivors)
    or the first-slice perplexity (eliminated, flagged False)."""
    L, total = cache.num_layers, len(cache.batches)
    cut = min(total, max(1, math.ceil(first * total)))
    head, rest = range(cut), range(cut, total)
    starts = list(range(L - n + 1))
    partial = {s: cache.nll_from(s, frozenset(range(s, s + n)), head) for s in starts}
    bar.update(len(starts))
    ranked = sorted(starts, key=lambda s: (partial[s][0], s))
    survivors = set(ranked[: max(2, math.ceil(keep * len(starts)))])
    scores, full = [], []
    for s in starts:
        nll, tokens = partial[s]
        if s in survivors and len(rest):
            more = cache.nll_from(s, frozenset(range(s, s + n)), rest)
            nll, tokens = nll + more[0], tokens + more[1]
        scores.append(perplexity_of(nll, tokens))
        full.append(s in survivors or not len(rest))
    return perplexity_of(*cache.nll_from(L, batches=head)), scores, full


def window_scores(
    ctx: PruneContext, ids: torch.Tensor, n: int, search: str, first: float = 0.25, keep: float = 0.25
) -> tuple[float, list[float], list[bool]]:
    """Baseline perplexity, the perplexity without each window ``[s, s+n)`` (s = 0..L-n), and whether
    each is a full-set score: ``search="bound"`` gives lower bounds for windows that cannot win,
    ``"halving"`` first-slice scores for the windows it eliminated (and the baseline on that slice)."""
    from pare.arch.surgery.depth import layers_removed

    L = ctx.arch.num_layers
    starts = range(L - n + 1)
    bar = tqdm(total=len(starts), desc=f"windows ({search})", disable=not ctx.runtime.progress, leave=False)
    if search == "halving":
        return _halving_scores(PrefixCache(ctx, ids), n, first, keep, bar)
    if search in ("proxy", "bound"):
        cache = PrefixCache(ctx, ids)
        base = perplexity_of(*cache.nll_from(L))
        if search == "bound":
            pairs = _bound_scores(cache, n, bar)
            return base, [p for p, _ in pairs], [e for _, e in pairs]
        scores = []
        for s in starts:
            scores.append(perplexity_of(*cache.nll_from(s, frozenset(range(s, s + n)))))
            bar.update(1)
        return base, scores, [True] * len(scores)
    base = perplexity_of(*model_nll(ctx.model, ids, ctx.batch_size))
    scores = []
    for s in starts:
        with layers_removed(ctx.model, ctx.arch, list(range(s, s + n))):
            scores.append(perplexity_of(*model_nll(ctx.model, ids, ctx.batch_size)))
        bar.update(1)
    return base, scores, [True] * len(scores)


@dataclass(frozen=True)
class PplWindowConfig(DepthConfig):
    """Remove the ``n`` consecutive layers whose removal hurts held-out calibration perplexity least.

    Attributes:
        search: ``halving`` (default: shared lazy prefix, every window scored on the first
            ``halving_first`` of the scoring windows, the best ``halving_keep`` on all of them),
            ``proxy`` (shared prefix, every full score, the same choice as ``exact``), ``bound``
            (proxy plus early abandoning; the same choice, lower bounds for abandoned windows) or
            ``exact`` (full re-runs).
        halving_first: share of the scoring windows every candidate window is scored on.
        halving_keep: share of the candidate windows (at least two) scored on all of them.
    """

    method: ClassVar[str] = "ppl-window"

    search: str = help_field(
        "halving", "'halving' (cached prefix; every window on the first halving_first of the scoring windows, "
        "the best halving_keep on all), 'proxy' (cached prefix; every score, same choice as exact), 'bound' "
        "(proxy + early abandoning of windows that cannot win) or 'exact' (full re-runs)",
    )
    halving_first: float = help_field(0.25, "halving: fraction of the scoring windows every candidate sees")
    halving_keep: float = help_field(0.25, "halving: fraction of the candidates (at least 2) scored on all windows")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.search not in SEARCHES:
            raise ConfigError(f"search must be one of {list(SEARCHES)}, got {self.search!r}")
        for name in ("halving_first", "halving_keep"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ConfigError(f"{name} must be in (0, 1], got {value!r}")


@register
class PplWindowPruner(CountedDepthPruner):
    """Quark-style perplexity search over windows of consecutive layers."""

    config_class = PplWindowConfig
    config: PplWindowConfig

    def run(self, ctx: PruneContext) -> None:
        n = self.config.layer_count(ctx.model, ctx.arch)
        ids = holdout_windows(ctx, self.config.holdout)
        start = time.perf_counter()
        cfg = self.config
        base, ppls, exact = window_scores(ctx, ids, n, cfg.search, cfg.halving_first, cfg.halving_keep)
        seconds = time.perf_counter() - start
        best = min((s for s in range(len(ppls)) if exact[s]), key=lambda s: (ppls[s], s))
        halving = cfg.search == "halving" and not all(exact)
        ctx.report.scores["ppl_base_first_slice" if halving else "ppl_base"] = base
        # a window without a full-set score: halving's first-slice score or bound's lower bound
        key, note = (
            ("ppl_first_slice", f"eliminated on the first {cfg.halving_first:g} of the scoring windows")
            if halving else ("ppl_at_least", "abandoned: cannot beat the chosen window")
        )
        ctx.report.scores["windows"] = [
            {"layers": list(range(s, s + n)), **({"ppl": p} if e else {key: p, "note": note})}
            for s, (p, e) in enumerate(zip(ppls, exact, strict=True))
        ]
        ctx.report.scores["search"] = self.config.search
        ctx.report.scores["search_seconds"] = seconds
        ctx.report.scores["scored_windows"] = int(ids.shape[0])
        apply_layer_removal(
            ctx, list(range(best, best + n)),
            f"window {best}-{best + n - 1} leaves the lowest held-out calibration perplexity "
            + (f"({ppls[best]:.4f}; dense {base:.4f} on the first slice) among the {sum(exact)} of {len(ppls)} "
               f"windows of {n} layers that survived the first slice" if halving else
               f"({ppls[best]:.4f} vs {base:.4f} dense) among {len(ppls)} windows of {n} layers"),
        )
