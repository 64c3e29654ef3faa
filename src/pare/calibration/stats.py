"""Activation statistics gathered through forward hooks.

Hooks are registered inside :func:`record_inputs`, a context manager, and are always removed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pare.arch.targets import Target

STAT_NORMS = "norms"
STAT_GRAM = "gram"


@dataclass
class InputStats:
    """Running statistics of a target's inputs ``X: [tokens, in]``.

    Attributes:
        tokens: number of input rows seen.
        sq_sum: ``sum_t X[t, j]^2`` per input column, fp32 ``[in]`` (Wanda: ``||X_j||_2^2``).
        gram: ``X^T X`` in fp32 ``[in, in]`` when asked (SparseGPT / OBS Hessian up to 2/n).
    """

    tokens: int = 0
    sq_sum: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    want_gram: bool = False
    extra: dict = field(default_factory=dict)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if x.shape[0] == 0:
            return
        self.tokens += x.shape[0]
        sq = x.pow(2).sum(0)
        self.sq_sum = sq if self.sq_sum is None else self.sq_sum + sq
        if self.want_gram:
            g = x.t() @ x
            self.gram = g if self.gram is None else self.gram + g

    def norms(self) -> torch.Tensor:
        """``||X_j||_2`` per input column."""
        assert self.sq_sum is not None, "no inputs were recorded"
        return self.sq_sum.sqrt()

    def hessian(self) -> torch.Tensor:
        """``H = 2/n X^T X`` (the OBS layer-wise Hessian)."""
        assert self.gram is not None and self.tokens > 0, "no Gram matrix was recorded"
        return self.gram * (2.0 / self.tokens)


def _expert_inputs(experts: nn.Module, args: tuple, kwargs: dict, gate_up: str, num_experts: int):
    """Per expert: the routed tokens ``x_e [n_e, H]`` and its activated intermediate ``[n_e, I]``."""
    hidden = args[0] if args else kwargs["hidden_states"]
    top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    w = getattr(experts, gate_up).data
    act: Any = experts.act_fn
    for e in range(num_experts):
        tokens = (top_k_index == e).any(dim=-1).nonzero().flatten()
        x = hidden[tokens]
        gate, up = nn.functional.linear(x, w[e]).chunk(2, dim=-1)
        yield e, x, act(gate) * up


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


@contextlib.contextmanager
def record_inputs(
    targets: list[Target], stats: dict[str, InputStats], stop_in: nn.Module | None = None
) -> Iterator[None]:
    """Record each target's inputs into ``stats[target.name]`` while the block runs.

    Args:
        targets: the matrices to watch (linear, Conv1D or expert slices).
        stats: pre-created accumulators keyed by target name.
        stop_in: the layer whose forwards only serve to record inputs (their outputs are thrown
            away): from its second forward on, :class:`InputsRecorded` is raised as soon as every
            watched module has seen its input (see :class:`_EarlyStop`).
    """
    handles = []
    by_module: dict[int, list[Target]] = {}
    for t in targets:
        by_module.setdefault(id(t.module), []).append(t)
    stop = _EarlyStop(len(by_module)) if stop_in is not None else None
    try:
        if stop is not None and stop_in is not None:
            handles.append(stop_in.register_forward_pre_hook(stop.start))
            handles.append(stop_in.register_forward_hook(stop.finish))
        for key, group in by_module.items():
            module = group[0].module
            if group[0].expert is None:
                acc = stats[group[0].name]

                def hook(_m, args, acc=acc, key=key):
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
                        for e, x, mid in _expert_inputs(m, args, kwargs, param, n):
                            if (e, "expert_in") in wanted:
                                wanted[(e, "expert_in")].add(x)
                            if (e, "expert_mid") in wanted:
                                wanted[(e, "expert_mid")].add(mid)
                    if stop is not None:
                        stop.seen(key)

                handles.append(module.register_forward_hook(ex_hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
