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
        last_reader: set by the caller while the last target that reads these statistics is pruned
            (a method may then take the Gram matrix over with ``hessian(release=True)``).
    """

    tokens: int = 0
    sq_sum: torch.Tensor | None = None
    want_gram: bool = False
    extra: dict = field(default_factory=dict)
    last_reader: bool = False
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

    def merge_(self, other: InputStats, device: torch.device) -> None:
        """Add ``other``'s sums (the same kind of statistics, recorded over other tokens, e.g. another
        device's share of the batches) to these, kept on ``device``: token count, ``sq_sum`` and the
        Gram matrix's upper block triangle (mirrored again when next read)."""
        if type(other) is not type(self) or other.want_gram != self.want_gram:
            raise ValueError(f"cannot add {type(other).__name__}(want_gram={other.want_gram}) statistics to "
                             f"{type(self).__name__}(want_gram={self.want_gram})")
        if other.extra or self.extra:
            raise ValueError(f"{type(self).__name__} holds extra statistics that are not plain sums; they cannot "
                             "be added across devices")
        if other.tokens == 0:
            return
        self.tokens += other.tokens
        if other.sq_sum is not None:
            sq = other.sq_sum.to(device)
            self.sq_sum = sq if self.sq_sum is None else self.sq_sum.to(device).add_(sq)
        if other._gram is not None:
            gram = other._gram.to(device)
            self._gram = gram if self._gram is None else self._gram.to(device).add_(gram)
            self._mirrored = False

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

    def hessian(self, release: bool = False) -> torch.Tensor:
        """``H = 2/n X^T X`` (the OBS layer-wise Hessian), a new tensor; with ``release`` the Gram matrix
        itself, scaled in place and handed over (no ``[in, in]`` copy; the statistics keep none)."""
        gram = self.gram
        assert gram is not None and self.tokens > 0, "no Gram matrix was recorded"
        if release:
            self._gram = None
            return gram.mul_(2.0 / self.tokens)
        return gram * (2.0 / self.tokens)


class RouterWeightedStats(InputStats):
    """Input statistics of an expert whose every token row is scaled by the router's gate value for
    that expert: ``||X_j||`` becomes ``sqrt(sum_t (g_t X[t, j])^2)`` (MoE-Pruner, Xie et al., 2024,
    arXiv 2410.12013, Eq. 4: Wanda's score with router-weighted activations)."""

    def add_routed(self, x: torch.Tensor, gate: torch.Tensor) -> None:
        self.add(x.float() * gate.float().reshape(-1, 1))


def _takes_two(fn: Any) -> bool:
    if isinstance(fn, nn.Module):
        fn = fn.forward  # a module's own signature is (*args, **kwargs)
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 and all(p.default is p.empty for p in positional[:2])


def expert_inputs_problem(experts: nn.Module, gate_up: str, hidden: int) -> str | None:
    """Why pare cannot record each expert's inputs of a fused experts module (checked before any work),
    or None: the call must carry the routing, the activation must be a module attribute, and the
    fused weight must be stored ``[experts, out, hidden]``."""
    name = type(experts).__name__
    try:
        positional = [p for p in inspect.signature(experts.forward).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        positional = []
    if len(positional) < 3:
        return (f"{name} is called without routing indices and weights (tokens are routed before the call), so pare "
                "cannot tell which tokens each expert saw: exclude the experts from this method (ignore='experts') "
                "or use magnitude pruning for them")
    if getattr(experts, "act_fn", None) is None:
        return (f"{name} computes its experts' activation in its own code (no act_fn), so pare cannot take each "
                "expert's intermediate inputs: exclude the experts from this method (ignore='experts') or use "
                "magnitude pruning for them")
    shape = list(getattr(experts, gate_up).shape)
    if shape[-1] != hidden:
        return (f"{name} stores its experts' {gate_up} as {shape} with the hidden size {hidden} not last (pare reads "
                "fused experts as [experts, out, in]): exclude the experts from this method (ignore='experts')")
    return None


def _expert_inputs(experts: nn.Module, args: tuple, kwargs: dict, gate_up: str, num_experts: int):
    """Per expert: the routed tokens ``x_e [n_e, H]``, its activated intermediate ``[n_e, I]`` and the
    router's gate values of those tokens for it ``[n_e]``."""
    hidden, top_k_index, top_k_weights = _routing_call(experts, args, kwargs)
    w = getattr(experts, gate_up).data
    why = expert_inputs_problem(experts, gate_up, hidden.shape[-1])
    if why is not None:
        raise UnsupportedArchitectureError(why)
    act: Any = experts.act_fn
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


@dataclass(frozen=True)
class RoutedPairs:
    """One call's routing as (token, expert) pairs: ``token``, ``expert`` and ``gate [P]`` (the gate the
    model multiplies the expert's output by), without the slots some routers mark as dropped (index E)."""

    token: torch.Tensor
    expert: torch.Tensor
    gate: torch.Tensor


def routed(index: torch.Tensor, weights: torch.Tensor, num_experts: int) -> RoutedPairs:
    """The :class:`RoutedPairs` of a router's ``top_k_index`` / ``top_k_weights [T, k]``."""
    from pare.ops.experts import routed_pairs

    token, expert, gate = routed_pairs(index, weights)
    keep = expert < num_experts
    return RoutedPairs(token[keep], expert[keep], gate[keep])


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

    def add(self, experts: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> None:
        """Accumulate one call's routing (``hidden [T, H]``, ``index`` and ``weights [T, k]``), running the
        routed experts on their tokens when :attr:`outputs` is set."""
        pairs = routed(index, weights, self.num_experts)
        outputs = expert_outputs(experts, hidden[pairs.token], pairs.expert) if self.outputs else None
        self.add_pairs(experts, hidden, pairs, outputs)

    def add_pairs(self, experts: nn.Module, hidden: torch.Tensor, pairs: RoutedPairs,
                  outputs: torch.Tensor | None) -> None:
        """Accumulate one call from its routed pairs and, when :attr:`outputs` is set, their expert
        outputs ``f_e(x) [P, H]`` (row ``p`` for pair ``p``)."""
        from pare.ops.experts import expert_sums

        norms = outputs.float().norm(dim=-1) if outputs is not None else torch.zeros_like(pairs.gate)
        sums = expert_sums(pairs.expert, pairs.gate, norms, self.num_experts)
        self.sums = sums if not self.sums else {k: v.add_(sums[k]) for k, v in self.sums.items()}
        self.tokens += int(hidden.shape[0])
        if self.probe_tokens:
            self._probe(experts, hidden[: self.probe_tokens])

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


@contextlib.contextmanager
def record_routing_once(experts: nn.Module, stats: RoutingStats, check_tokens: int = 8) -> Iterator[None]:
    """As :func:`record_routing` where the block's output is wanted, with one expert pass per call.

    A forward pre-hook hands the experts module every routed (token, expert) pair as a row of its own,
    routed to that expert alone at gate 1, so the module's own ``forward`` computes each pair's output
    ``f_e(x)`` once; a forward hook takes the statistics from that output and returns the block's output
    ``sum_k g_k f_(e_k)(x)`` built from it. On the first call that sum is checked against the module's
    own ``forward`` on ``check_tokens`` tokens; a family that combines its experts differently falls back
    to running its ``forward`` as well (two passes, as :func:`record_routing`). Both hooks are always
    removed.
    """
    pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, RoutedPairs, torch.Size]] = []
    combines: list[bool] = []  # [] until the first call is checked, then whether the sum is the module's

    def before(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        hidden, index, weights = _routing_call(module, args, kwargs)
        with torch.no_grad():
            if combines == [False]:
                stats.add(module, hidden, index, weights)
                return None
            pairs = routed(index, weights, stats.num_experts)
        pending.append((hidden, index, weights, pairs, args[0].shape if args else next(iter(kwargs.values())).shape))
        ones = torch.ones(pairs.expert.shape[0], 1, dtype=hidden.dtype, device=hidden.device)
        return _with_routing(module, args, kwargs, hidden[pairs.token], pairs.expert.reshape(-1, 1), ones)

    def after(module: nn.Module, _args: tuple, _kwargs: dict, output: Any) -> Any:
        if not pending:
            return None
        hidden, index, weights, pairs, shape = pending.pop()
        with torch.no_grad():
            stats.add_pairs(module, hidden, pairs, output)
            w = pairs.gate.to(output.dtype)
            weighted = (output * w[:, None]).to(hidden.dtype)
            t, k = index.shape
            if pairs.token.numel() == t * k:  # every slot routed: the rows are token-major, k per token
                out = weighted.view(t, k, -1).sum(1)
            else:
                out = torch.zeros_like(hidden).index_add_(0, pairs.token, weighted)
            if not combines:
                n = check_tokens
                ref = module.forward(hidden[:n], index[:n], weights[:n])
                combines.append(bool(torch.allclose(out[:n].float(), ref.float(), rtol=1e-3, atol=1e-5)))
            if combines == [False]:
                out = module.forward(hidden, index, weights)
        return out.reshape(shape)

    with removed_after() as handles:
        handles.append(experts.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(experts.register_forward_hook(after, with_kwargs=True))
        yield


def _with_routing(experts: nn.Module, args: tuple, kwargs: dict, hidden: torch.Tensor, index: torch.Tensor,
                  weights: torch.Tensor) -> tuple[tuple, dict]:
    """The call's ``(args, kwargs)`` with its first three arguments (hidden states, routing indices and
    weights, :func:`_routing_call`) replaced."""
    bound = inspect.signature(experts.forward).bind(*args, **kwargs)
    for name, value in zip(list(bound.arguments)[:3], (hidden, index, weights), strict=True):
        bound.arguments[name] = value
    return tuple(bound.args), dict(bound.kwargs)
