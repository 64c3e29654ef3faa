"""True-sequential solving of a layer's matrices, in the order its forward calls them.

GPTQ's ``--true-sequential`` (Frantar et al., 2023, arXiv:2210.17323, the reference code's llama
script): the matrices of a layer are solved group by group in the order the layer reads them
(q/k/v, then o, then gate/up, then down), and each group's Hessian comes from the layer's inputs
as computed with the groups before it already solved. Matrices that read one input (q/k/v,
gate/up) form one group and share one Gram matrix.

With one calibration batch this takes a single forward: a forward pre-hook on the first matrix of
a group to be called records the group's input and solves the whole group before any of its
matrices computes, so the rest of the forward runs on the solved weights and its output is the
solved layer's output, the next layer's input (instead of a recording forward and a second one
with the changed weights). With several batches a group's statistics need every batch before it
is solved: one pass per group records its input (stopped once the group has read it), then the
group is solved, then the next pass runs through it.

Groups are given by the caller (from the architecture's roles); a member that does not read the
very tensor its group's first matrix read, or a matrix called twice in one forward, raises
:class:`GroupInputMismatch` so that the caller can put the weights back and record otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from pare.arch.targets import Target
from pare.calibration.stats import InputsRecorded, InputStats
from pare.hooks import removed_after

Solve = Callable[[list[Target], InputStats], None]


class GroupInputMismatch(RuntimeError):
    """A matrix of a group read another tensor than the group's first matrix did, or a matrix was
    called twice in one forward: the layer cannot be solved in call order with these groups."""


@dataclass
class _Group:
    targets: list[Target]
    stats: InputStats
    solved: bool = False
    x: torch.Tensor | None = None  # what the group's first matrix read in the current forward
    version: int | None = None
    seen: set[int] = field(default_factory=set)  # members called in the current forward


def _version(x: torch.Tensor) -> int | None:
    try:
        return x._version
    except RuntimeError:  # inference tensors keep no counter
        return None


class InlineSolver:
    """Solves ``groups`` of one layer in call order (see the module docstring).

    Args:
        groups: the layer's matrices, grouped by the input they read (every matrix in one group).
        new_stats: a fresh accumulator (with a Gram matrix) per group.
        solve: changes a group's weights in place from its statistics.
    """

    def __init__(self, groups: list[list[Target]], new_stats: Callable[[], InputStats], solve: Solve) -> None:
        self.groups = [_Group(g, new_stats()) for g in groups]
        self.solve = solve
        self._recording: _Group | None = None

    @property
    def unsolved(self) -> list[list[Target]]:
        """The groups not solved yet (no forward reached them)."""
        return [g.targets for g in self.groups if not g.solved]

    def one_forward(self, run: Callable[[], object], layer: nn.Module) -> None:
        """Run ``run`` (one forward over all the calibration tokens) solving each group as it is reached."""
        with self._hooks(layer, in_forward=True):
            run()

    def passes(self, run: Callable[[], object], layer: nn.Module) -> None:
        """Several batches: per pass (``run``, every batch), record the first unsolved group the forward
        reaches, stop there, and solve it; until a pass reaches no unsolved group."""
        while any(not g.solved for g in self.groups):
            self._recording = None
            with self._hooks(layer, in_forward=False):
                run()
            group = self._recording
            if group is None:
                return
            self._finish(group)

    def _finish(self, group: _Group) -> None:
        group.solved = True
        stats, group.stats = group.stats, InputStats()
        self.solve(group.targets, stats)

    @contextlib.contextmanager
    def _hooks(self, layer: nn.Module, in_forward: bool) -> Iterator[None]:
        def start(*_: object) -> None:
            for g in self.groups:
                g.x, g.version = None, None
                g.seen.clear()

        with removed_after() as handles:
            handles.append(layer.register_forward_pre_hook(start))
            for group in self.groups:
                for t in group.targets:
                    def hook(module: nn.Module, args: tuple, group: _Group = group) -> None:
                        self._called(group, id(module), args[0], in_forward)

                    handles.append(t.module.register_forward_pre_hook(hook))
            yield

    def _called(self, group: _Group, key: int, x: torch.Tensor, in_forward: bool) -> None:
        if key in group.seen:
            raise GroupInputMismatch("a matrix was called twice in one forward of its layer")
        if not group.seen:  # the group's first matrix in this forward: x is the group's input
            group.x, group.version = x, _version(x)
            if not group.solved:
                if self._recording is not None and self._recording is not group:
                    raise GroupInputMismatch("the layer's batches reached its groups in different orders")
                group.stats.add(x.detach())
                if in_forward:
                    self._finish(group)  # before any matrix of the group computes
                else:
                    self._recording = group
        elif x is not group.x or _version(x) != group.version:
            raise GroupInputMismatch("a matrix of a group read another tensor than the group's first matrix")
        group.seen.add(key)
        if not in_forward and group is self._recording and len(group.seen) == len(group.targets):
            raise InputsRecorded
