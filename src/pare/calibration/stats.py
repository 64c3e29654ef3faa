"""Activation statistics gathered through forward hooks.

Hooks are registered inside :func:`record_inputs`, a context manager, and are always removed.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pare.arch.targets import Target
from pare.arch.wrapper import LayerWrapper
from pare.errors import UnsupportedArchitectureError
from pare.hooks import removed_after
from pare.ops.gram import add_gram_upper_, mirror_upper_

STAT_NORMS = "norms"
STAT_GRAM = "gram"


@dataclass
class InputStats:
    """Running statistics of a target's inputs ``X: [tokens, in]``.

    Attributes:
        tokens: number of input rows seen.
        sq_sum: ``sum_t X[t, j]^2`` per input column, fp32 ``[in]`` (Wanda: ``||X_j||_2^2``).
        want_gram: also accumulate ``X^T X`` (read through :attr:`gram`).
    """

    tokens: int = 0
    sq_sum: torch.Tensor | None = None
    want_gram: bool = False
    extra: dict = field(default_factory=dict)
    _gram: torch.Tensor | None = field(default=None, repr=False)  # upper block triangle while recording
    _mirrored: bool = field(default=False, repr=False)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if x.shape[0] == 0:
            return
        self.tokens += x.shape[0]
        sq = x.pow(2).sum(0)
        self.sq_sum = sq if self.sq_sum is None else self.sq_sum.add_(sq)
        if self.want_gram:
            if self._gram is None:
                self._gram = x.new_zeros(x.shape[1], x.shape[1])
            add_gram_upper_(self._gram, x)
            self._mirrored = False

    def add_routed(self, x: torch.Tensor, gate: torch.Tensor) -> None:
        """Record the tokens ``x [n, in]`` routed to an expert; ``gate [n]`` (their gate values for
        it) is ignored here, see :class:`RouterWeightedStats`."""
        self.add(x)

    @property
    def gram(self) -> torch.Tensor | None:
        """``X^T X`` in fp32 ``[in, in]`` when asked for (SparseGPT / OBS Hessian up to 2/n), else None."""
        if self._gram is not None and not self._mirrored:
            mirror_upper_(self._gram)
            self._mirrored = True
        return self._gram

    def norms(self) -> torch.Tensor:
        """``||X_j||_2`` per input column."""
        assert self.sq_sum is not None, "no inputs were recorded"
        return self.sq_sum.sqrt()

    def hessian(self) -> torch.Tensor:
        """``H = 2/n X^T X`` (the OBS layer-wise Hessian)."""
        gram = self.gram
        assert gram is not None and self.tokens > 0, "no Gram matrix was recorded"
        return gram * (2.0 / self.tokens)


class RouterWeightedStats(InputStats):
    """Input statistics of an expert whose every token row is scaled by the router's gate value for
    that expert: ``||X_j||`` becomes ``sqrt(sum_t (g_t X[t, j])^2)`` (MoE-Pruner, Xie et al., 2024,
    arXiv 2410.12013, Eq. 4: Wanda's score with router-weighted activations)."""

    def add_routed(self, x: torch.Tensor, gate: torch.Tensor) -> None:
        self.add(x.float() * gate.float().reshape(-1, 1))


def _takes_two(fn: Any) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 and all(p.default is p.empty for p in positional[:2])


def _expert_inputs(experts: nn.Module, args: tuple, kwargs: dict, gate_up: str, num_experts: int):
    """Per expert: the routed tokens ``x_e [n_e, H]``, its activated intermediate ``[n_e, I]`` and the
    router's gate values of those tokens for it ``[n_e]``."""
    hidden, top_k_index, top_k_weights = _routing_call(experts, args, kwargs)
    w = getattr(experts, gate_up).data
    act: Any = getattr(experts, "act_fn", None)
    if act is None:
        raise UnsupportedArchitectureError(
            f"{type(experts).__name__} computes its experts' activation in its own code (no act_fn), so pare cannot "
            "take each expert's intermediate inputs: exclude the experts from this method (ignore='experts') or "
            "use magnitude pruning for them")
    if w.shape[-1] != hidden.shape[-1]:
        raise UnsupportedArchitectureError(
            f"{type(experts).__name__} stores its experts' {gate_up} as {list(w.shape)} with the hidden size "
            f"{hidden.shape[-1]} not last (pare reads fused experts as [experts, out, in]): exclude the experts from "
            "this method (ignore='experts')")
    joint = _takes_two(act)  # a fused gated activation act(gate, up) (Inkling's softcapped SwiGLU)
    for e in range(num_experts):
        hit = top_k_index == e
        tokens = hit.any(dim=-1).nonzero().flatten()
        x = hidden[tokens]
        gate_value = (top_k_weights[tokens].float() * hit[tokens]).sum(-1)
        gate, up = nn.functional.linear(x, w[e]).chunk(2, dim=-1)
        yield e, x, act(gate, up) if joint else act(gate) * up, gate_value


class InputsRecorded(Exception):
    """Raised inside a layer's forward by :func:`record_inputs` with ``stop_in`` once every watched
    module has seen the batch: the rest of the forward would only compute unused outputs.
    :meth:`pare.calibration.runner.LayerStep.run` catches it."""


class _EarlyStop:
    """Per-batch bookkeeping for :func:`record_inputs`'s ``stop_in``.

    The first forward runs to the end while counting the calls of every watched module; only if
    each was called exactly once (true of every decoder layer we know) are later forwards stopped
    at the last watched module, after its input was recorded and before its own product.
    """

    def __init__(self, groups: int) -> None:
        self.groups = groups
        self.calls: dict[int, int] = {}
        self.armed = False

    def start(self, *_: Any) -> None:
        self.calls.clear()

    def finish(self, *_: Any) -> None:
        self.armed = len(self.calls) == self.groups and all(n == 1 for n in self.calls.values())

    def seen(self, key: int) -> None:
        self.calls[key] = self.calls.get(key, 0) + 1
        if self.armed and len(self.calls) == self.groups:
            raise InputsRecorded


def _version(x: torch.Tensor) -> int | None:
    """The tensor's in-place edit counter; None for inference tensors, which do not keep one."""
    try:
        return x._version
    except RuntimeError:
        return None


class SharedInputChanged(RuntimeError):
    """A module recorded as reading its neighbour's input read another tensor later (record again with
    ``share_inputs=False``)."""


class _SameInput:
    """Finds watched modules that read the very tensor the module called just before read (q/k/v
    after one norm, gate/up): their inputs are recorded once, by the first of them (the leader).

    A module's role is fixed at its first call; a later call that breaks it (a follower reached with
    another tensor) raises, since its statistics would be wrong. Only fresh accumulators of the same
    kind are merged.
    """

    def __init__(self, stats_of: dict[int, InputStats]) -> None:
        self.stats_of = stats_of
        self.last: tuple[int, torch.Tensor, int | None] | None = None  # (leader key, tensor, its version)
        self.leader: dict[int, int] = {}  # follower key -> leader key
        self.decided: set[int] = set()
        self.fresh = {k for k, s in stats_of.items() if s.tokens == 0}

    def _compatible(self, a: int, b: int) -> bool:
        sa, sb = self.stats_of[a], self.stats_of[b]
        return type(sa) is type(sb) and sa.want_gram == sb.want_gram and {a, b} <= self.fresh

    def record(self, key: int, x: torch.Tensor) -> bool:
        """Whether module ``key`` must record ``x`` itself (False: its leader already did)."""
        last = self.last
        same = last is not None and x is last[1] and _version(x) == last[2]
        if key not in self.decided:
            self.decided.add(key)
            if same and last is not None and self._compatible(last[0], key):
                self.leader[key] = last[0]
        lead = self.leader.get(key)
        if lead is None:
            self.last = (key, x, _version(x))
            return True
        if not same or last is None or last[0] != lead:
            raise SharedInputChanged("a module that shared its input with the module called before it got a "
                                     "different input in a later forward; record with share_inputs=False")
        return False


@contextlib.contextmanager
def record_inputs(
    targets: list[Target], stats: dict[str, InputStats], stop_in: nn.Module | None = None,
    share_inputs: bool = False,
) -> Iterator[None]:
    """Record each target's inputs into ``stats[target.name]`` while the block runs.

    Args:
        targets: the matrices to watch (linear, Conv1D or expert slices).
        stats: pre-created accumulators keyed by target name.
        stop_in: the layer whose forwards only serve to record inputs (their outputs are thrown
            away): from its second forward on, :class:`InputsRecorded` is raised as soon as every
            watched module has seen its input (see :class:`_EarlyStop`).
        share_inputs: modules that read the same tensor (q/k/v, gate/up) record it once; when the
            block ends, their entries of ``stats`` are one accumulator object (one ``[in, in]`` Gram
            per distinct input instead of one per matrix).
    """
    by_module: dict[int, list[Target]] = {}
    for t in targets:
        by_module.setdefault(id(t.module), []).append(t)
    stop = _EarlyStop(len(by_module)) if stop_in is not None else None
    same = None
    if share_inputs:
        same = _SameInput({k: stats[g[0].name] for k, g in by_module.items() if g[0].expert is None})
    try:
        with removed_after() as handles:
            if stop is not None and stop_in is not None:
                handles.append(stop_in.register_forward_pre_hook(stop.start))
                handles.append(stop_in.register_forward_hook(stop.finish))
            for key, group in by_module.items():
                module = group[0].module
                if group[0].expert is None:
                    acc = stats[group[0].name]

                    def hook(_m, args, acc=acc, key=key):
                        if same is None or same.record(key, args[0]):
                            acc.add(args[0].detach())
                        if stop is not None:
                            stop.seen(key)

                    handles.append(module.register_forward_pre_hook(hook))
                else:
                    wanted = {(t.expert, t.input_kind): stats[t.name] for t in group}
                    n = max(t.expert for t in group if t.expert is not None) + 1

                    param = group[0].gate_up_param or "gate_up_proj"

                    def ex_hook(m, args, kwargs, _out, wanted=wanted, n=n, param=param, key=key):
                        with torch.no_grad():
                            for e, x, mid, gate in _expert_inputs(m, args, kwargs, param, n):
                                if (e, "expert_in") in wanted:
                                    wanted[(e, "expert_in")].add_routed(x, gate)
                                if (e, "expert_mid") in wanted:
                                    wanted[(e, "expert_mid")].add_routed(mid, gate)
                        if same is not None:
                            same.last = None
                        if stop is not None:
                            stop.seen(key)

                    handles.append(module.register_forward_hook(ex_hook, with_kwargs=True))
            yield
            if same is not None:
                for follower, lead in same.leader.items():
                    for t in by_module[follower]:
                        stats[t.name] = same.stats_of[lead]
    finally:
        if same is not None:
            same.last = None


# --------------------------------------------------------------------------- MoE routing statistics
def _routing_call(experts: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`` of an experts module's call.

    transformers 5 calls every fused experts module as ``experts(hidden, index, weights)`` (the names
    differ: ``top_k_index`` / ``router_indices``), so the arguments are read by position.
    """
    bound = inspect.signature(experts.forward).bind(*args, **kwargs)
    values = list(bound.arguments.values())
    if len(values) < 3:
        raise UnsupportedArchitectureError(
            f"{type(experts).__name__} is called without routing indices and weights (tokens are routed before the "
            "call), so pare cannot tell which tokens each expert saw: exclude the experts from this method "
            "(ignore='experts') or use magnitude pruning for them")
    hidden, index, weights = values[0], values[1], values[2]
    return hidden.reshape(-1, hidden.shape[-1]), index.reshape(-1, index.shape[-1]), weights.reshape(
        -1, weights.shape[-1])


def expert_outputs(experts: nn.Module, hidden: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """``f_e(x)`` for each pair: row ``p`` is expert ``expert[p]``'s output on ``hidden[p]`` ``[P, H]``.

    Computed by the experts module's own ``forward`` with every row routed to one expert at gate 1,
    so whatever the family's expert computes (biases, clamped SwiGLU, interleaved layouts) is what is
    measured; calling ``forward`` directly does not fire the module's hooks.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, hidden.shape[-1])
    index = expert.reshape(-1, 1)
    ones = torch.ones(index.shape, dtype=hidden.dtype, device=hidden.device)
    return experts.forward(hidden, index, ones)


@dataclass
class RoutingStats:
    """Per-expert routing statistics of one MoE layer over the calibration tokens.

    Attributes:
        num_experts: ``E``.
        tokens: tokens seen.
        sums: :func:`pare.ops.experts.expert_sums` accumulated (``count``, ``gate``, ``reap``, ``energy``).
        probe_tokens: per batch, how many tokens every expert is also run on for merging (0: none).
        outputs: compute the routed experts' outputs (their norms feed ``reap`` / ``reconstruction``;
            ``frequency`` and ``gate`` need only the routing, and their ``reap`` / ``energy`` sums stay 0).
        out_sum: ``[E, H]`` sum of every expert's output on the probe tokens (merge similarity).
        probed: probe tokens seen.
    """

    num_experts: int
    tokens: int = 0
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    probe_tokens: int = 0
    outputs: bool = True
    out_sum: torch.Tensor | None = None
    probed: int = 0

    def add(self, experts: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
            combine: bool = False) -> torch.Tensor | None:
        """Accumulate one call's routing (``hidden [T, H]``, ``index`` and ``weights [T, k]``). With
        ``combine`` (and :attr:`outputs`) also return the block's output ``sum_k w_k f_(e_k)(x)``
        ``[T, H]`` built from the same per-pair expert outputs, so the experts need not run again."""
        from pare.ops.experts import expert_sums, routed_pairs

        token, expert, gate = routed_pairs(index, weights)
        keep = expert < self.num_experts  # some routers mark dropped slots with index E
        token, expert, gate = token[keep], expert[keep], gate[keep]
        combined = None
        if self.outputs:
            f = expert_outputs(experts, hidden[token], expert)
            norms = f.float().norm(dim=-1)
            if combine:
                w = weights.reshape(-1)[keep].to(f.dtype)
                combined = torch.zeros_like(hidden).index_add_(0, token, (f * w[:, None]).to(hidden.dtype))
        else:
            norms = torch.zeros_like(gate)
        sums = expert_sums(expert, gate, norms, self.num_experts)
        self.sums = sums if not self.sums else {k: v.add_(sums[k]) for k, v in self.sums.items()}
        self.tokens += int(hidden.shape[0])
        if self.probe_tokens:
            self._probe(experts, hidden[: self.probe_tokens])
        return combined

    def _probe(self, experts: nn.Module, x: torch.Tensor) -> None:
        n = x.shape[0]
        every = torch.arange(self.num_experts, device=x.device).repeat_interleave(n)
        out = expert_outputs(experts, x.repeat(self.num_experts, 1), every).float()
        total = out.reshape(self.num_experts, n, -1).sum(1)
        self.out_sum = total if self.out_sum is None else self.out_sum.add_(total)
        self.probed += n

    def mean_outputs(self) -> torch.Tensor:
        """``[E, H]`` mean output of every expert on the probe tokens."""
        assert self.out_sum is not None and self.probed, "no probe tokens were recorded"
        return self.out_sum / self.probed


@contextlib.contextmanager
def record_routing(experts: nn.Module, stats: RoutingStats, stop: bool = False) -> Iterator[None]:
    """Accumulate ``stats`` from every call of a fused experts module while the block runs; the hook
    is always removed.

    Args:
        experts: the fused experts module (called as ``experts(hidden, top_k_index, top_k_weights)``).
        stats: the accumulator.
        stop: the layer's outputs are not wanted (they are recomputed after pruning): raise
            :class:`InputsRecorded` once the statistics are taken, so the experts' own forward (which
            the statistics already repeat) and the rest of the layer are skipped.
    """

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        with torch.no_grad():
            hidden, index, weights = _routing_call(module, args, kwargs)
            stats.add(module, hidden, index, weights)
        if stop:
            raise InputsRecorded

    with removed_after() as handles:
        handles.append(experts.register_forward_pre_hook(hook, with_kwargs=True))
        yield


class _RoutedOnce(LayerWrapper):
    """Stands in a fused experts module while its routing is recorded: each call's per-pair expert
    outputs give both the statistics and the module's output, so the experts run once per batch. On
    the first call the combined output is checked against the module's own ``forward`` on a few tokens;
    a family whose experts combine differently falls back to running its ``forward`` as well."""

    def __init__(self, inner: nn.Module, stats: RoutingStats, check_tokens: int = 8) -> None:
        super().__init__(inner)
        self._stats = stats
        self._check_tokens = check_tokens
        self._own_forward: bool | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inner = self._modules["inner"]
        assert inner is not None
        shape = (args[0] if args else next(iter(kwargs.values()))).shape
        with torch.no_grad():
            hidden, index, weights = _routing_call(inner, args, kwargs)
            out = self._stats.add(inner, hidden, index, weights, combine=self._own_forward is not True)
            if self._own_forward is None and out is not None:
                n = self._check_tokens
                ref = inner.forward(hidden[:n], index[:n], weights[:n])
                self._own_forward = not torch.allclose(out[:n].float(), ref.float(), rtol=1e-3, atol=1e-5)
        if out is None or self._own_forward:
            return inner(*args, **kwargs)
        return out.reshape(shape)


@contextlib.contextmanager
def record_routing_once(layer: nn.Module, path: str, stats: RoutingStats) -> Iterator[None]:
    """As :func:`record_routing` for a layer whose outputs are wanted: the experts module at ``path``
    (inside ``layer``) is replaced by a stand-in that computes statistics and output in one expert
    pass; the module is always put back."""
    parent_name, _, name = path.rpartition(".")
    parent = layer.get_submodule(parent_name) if parent_name else layer
    experts = parent._modules[name]
    assert experts is not None
    parent._modules[name] = _RoutedOnce(experts, stats)
    try:
        yield
    finally:
        parent._modules[name] = experts
