"""A MoE layer's outputs after some of its experts were removed, without running the layer again.

Removing experts changes only the MoE block, and inside it only the tokens whose routing changed
(a removed expert was among their top-k, so they now select another one; or the router's gate values
moved). Everything before the block (attention, norms) is what it was. So, where a layer's output is
its residual plus the block's output, the pruned layer's output for a calibration batch is

    y_new = y_old + (block_new(x) - block_old(x))

with ``x`` the block's recorded input. ``block_new(x)`` is the pruned block's own ``forward`` (router,
shared experts, however the family combines them), with the fused experts module handed only the
tokens whose routing changed; every other token takes the experts module's recorded output, which is
bitwise what it would compute again. Tokens whose routing is unchanged keep ``y_old`` exactly.

:func:`record_blocks` records what this needs during the layer's one full forward;
:func:`replay_block` computes ``block_new``. Whether a layer's output really adds its block's output is
the caller's to check (once per layer class, against a full forward of the pruned layer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pare.calibration.stats import _routing_call, _with_routing
from pare.hooks import removed_after
from pare.ops.experts import routing_changed


@dataclass
class BlockCall:
    """One recorded call of a MoE block.

    Attributes:
        args, kwargs: the block's call (its input hidden states included).
        out: the block's output (its first tensor when it returns a tuple).
        index, weights: the router's choice ``[T, k]`` as the experts module received it.
        experts_out: the experts module's output (its own shape, ``T`` rows of ``H``).
    """

    args: tuple
    kwargs: dict
    out: torch.Tensor
    index: torch.Tensor
    weights: torch.Tensor
    experts_out: torch.Tensor


class NotReplayable(RuntimeError):
    """The MoE block did not call its experts module exactly once per call: its calls cannot be replayed."""


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def record_blocks(block: nn.Module, experts: nn.Module, calls: list[BlockCall]) -> Iterator[None]:
    """Append a :class:`BlockCall` to ``calls`` for every call of ``block`` while the block runs.

    The experts module's routing is read by a pre-hook that runs before any other (a statistics hook
    may hand the module other rows), its output by a forward hook that runs after the others (the
    output the block goes on with). Hooks are always removed.

    Raises:
        NotReplayable: a call of ``block`` did not call ``experts`` exactly once.
    """
    routing: list[tuple[torch.Tensor, torch.Tensor]] = []
    outputs: list[torch.Tensor] = []

    def before_experts(module: nn.Module, args: tuple, kwargs: dict) -> None:
        _hidden, index, weights = _routing_call(module, args, kwargs)
        routing.append((index.detach(), weights.detach()))

    def after_experts(_module: nn.Module, _args: tuple, _kwargs: dict, output: Any) -> None:
        outputs.append(_first(output).detach())

    def after_block(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if len(routing) != 1 or len(outputs) != 1:
            raise NotReplayable(f"the MoE block called its experts {len(routing)} times in one forward")
        (index, weights), experts_out = routing.pop(), outputs.pop()
        calls.append(BlockCall(args, kwargs, _first(output).detach(), index, weights, experts_out))

    with removed_after() as handles:
        handles.append(experts.register_forward_pre_hook(before_experts, with_kwargs=True, prepend=True))
        handles.append(experts.register_forward_hook(after_experts, with_kwargs=True))
        handles.append(block.register_forward_hook(after_block, with_kwargs=True))
        yield


def replay_block(block: nn.Module, experts: nn.Module, call: BlockCall, kept: torch.Tensor,
                 num_before: int) -> tuple[torch.Tensor, int]:
    """The pruned block's output on ``call``'s input, running its experts only on changed tokens.

    Args:
        block, experts: the MoE block and its fused experts module, after the cut.
        call: the block's recorded call before the cut.
        kept: ``[E']`` the experts kept, as indices into the experts before the cut (in stored order).
        num_before: ``E``, the number of experts before the cut.

    Returns:
        The block's new output (first tensor) and how many tokens the experts module ran on.
    """
    ran: list[int] = []

    def before(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden, index, weights = _routing_call(module, args, kwargs)
        changed = routing_changed(call.index, call.weights, index, weights, kept, num_before)
        rows = changed.nonzero().flatten()
        ran.append(int(rows.numel()))
        if rows.numel() == 0:  # the module still runs: give it one row and keep the recorded output
            rows = torch.zeros(1, dtype=torch.long, device=hidden.device)
            changed = torch.zeros_like(changed)
        pending.append((rows, changed))
        return _with_routing(module, args, kwargs, hidden[rows], index[rows], weights[rows])

    def after(_module: nn.Module, _args: tuple, _kwargs: dict, output: Any) -> torch.Tensor:
        rows, changed = pending.pop()
        recorded = call.experts_out
        flat = recorded.reshape(-1, recorded.shape[-1]).clone()
        if bool(changed.any()):
            flat[rows] = _first(output).reshape(-1, flat.shape[-1]).to(flat.dtype)
        return flat.reshape(recorded.shape)

    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    with removed_after() as handles, torch.no_grad():
        handles.append(experts.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(experts.register_forward_hook(after, with_kwargs=True))
        out = _first(block(*call.args, **call.kwargs))
    return out, sum(ran)


__all__ = ["BlockCall", "NotReplayable", "record_blocks", "replay_block"]
