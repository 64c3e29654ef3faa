"""Requests as one prefix trie, cut into units and packed into rows, so that a token the requests share runs once.

The inputs of a task's requests are put into one radix trie: the choices of a question share its context;
WinoGrande's two contexts share the sentence up to the blank, and twin sentences (the same sentence with
one word changed after the blank) share more; questions share a fixed lead-in (``"Question:"``, an
activity label, the BOS token). The trie is cut into *units* of about a row's capacity: a unit is a path
of tokens from the root (seen by everything in the unit) and some subtrees below it. A subtree too large
for a unit is cut again below its own root, its path repeated in each part. Units are packed into rows;
inside a row a token sees exactly its ancestors in its own unit and the earlier tokens of its own segment,
so every scored position sees the tokens it would see alone, at the same positions.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Row:
    """One request prepared for a forward: the input ids and the targets scored at its last positions."""

    index: int
    inputs: list[int]
    targets: list[int]


@dataclass
class Node:
    """A trie node: its own ``tokens`` (a segment; only the root's may be empty), its children, the requests
    whose inputs end at its last token, and ``size``, the tokens of it and everything below it."""

    tokens: list[int]
    children: list[Node] = field(default_factory=list)
    ends: list[Row] = field(default_factory=list)
    size: int = 0


def build_trie(rows: Sequence[Row]) -> Node:
    """The radix trie of the requests' inputs (every request has at least one input token)."""
    ordered = sorted(rows, key=lambda r: r.inputs)  # a prefix sorts before what extends it
    root = Node([])
    made: list[Node] = []
    pending: list[tuple[Node, list[Row], int]] = [(root, ordered, 0)]
    while pending:
        node, group, start = pending.pop()
        made.append(node)
        first, last = group[0].inputs, group[-1].inputs  # the common prefix of a sorted group is theirs
        n = 0
        while start + n < min(len(first), len(last)) and first[start + n] == last[start + n]:
            n += 1
        end = start + n
        node.tokens = list(first[start:end])
        node.ends = [r for r in group if len(r.inputs) == end]
        rest = group[len(node.ends):]
        while rest:
            head = rest[0].inputs[end]
            k = 1
            while k < len(rest) and rest[k].inputs[end] == head:
                k += 1
            child = Node([])
            node.children.append(child)
            pending.append((child, rest[:k], end))
            rest = rest[k:]
    for node in reversed(made):  # children were made after their parent
        node.size = len(node.tokens) + sum(c.size for c in node.children)
    return root


@dataclass(frozen=True)
class Unit:
    """A piece of the trie that runs in one row: a ``path`` from the root, the ``subtrees`` below it, and
    the requests that end inside the path (with the number of path tokens that are their inputs)."""

    path: list[int]
    subtrees: list[Node]
    ends: list[tuple[Row, int]]

    @property
    def length(self) -> int:
        return len(self.path) + sum(t.size for t in self.subtrees)


def first_fit_decreasing(items: Sequence[T], capacity: int, size: Callable[[T], int]) -> list[list[T]]:
    """Items into bins of at most ``capacity`` (an item larger than that gets a bin of its own): largest
    first, each bin topped up with the largest items that still fit."""
    pending = sorted(items, key=size)  # ascending: bisect finds the largest that fits
    sizes = [size(x) for x in pending]
    bins: list[list[T]] = []
    while pending:
        current = [pending.pop()]
        room = capacity - sizes.pop()
        while pending and room >= sizes[0]:
            at = bisect.bisect_right(sizes, room) - 1
            current.append(pending.pop(at))
            room -= sizes.pop(at)
        bins.append(current)
    return bins


def split_trie(root: Node, capacity: int) -> list[Unit]:
    """Cut the trie into units of at most ``capacity`` tokens where it can be cut.

    The subtrees below a path are binned into units that repeat the path; a subtree that does not fit
    beside the path is cut below its own root. A path longer than half the capacity is given as many
    subtree tokens as it has (so repeating it costs at most half of each unit); a single request longer
    than that stays whole."""
    units: list[Unit] = []
    pending: list[tuple[list[int], list[Node], list[tuple[Row, int]]]] = [
        (root.tokens, root.children, [(r, len(root.tokens)) for r in root.ends])]
    while pending:
        path, subtrees, ends = pending.pop()
        room = max(capacity - len(path), len(path))
        if not subtrees or sum(t.size for t in subtrees) <= room:
            units.append(Unit(path, subtrees, ends))
            continue
        fitting = [t for t in subtrees if t.size <= room]
        for group in first_fit_decreasing(fitting, room, lambda t: t.size):
            units.append(Unit(path, group, ends))
            ends = []  # the requests that end inside the path are scored in one unit
        for t in subtrees:
            if t.size > room:
                deeper = path + t.tokens
                pending.append((deeper, t.children, ends + [(r, len(deeper)) for r in t.ends]))
                ends = []
    return units


def packed_inputs(row: Sequence[Unit]) -> tuple[list[int], list[int], torch.Tensor, list[tuple[Row, list[int]]]]:
    """Token ids, position ids and the ``[T, T]`` boolean attention pattern of a row of units, and each
    request with the positions in the row where its targets are scored.

    A token sees the earlier tokens of its own segment and every token of its ancestor segments."""
    ids: list[int] = []
    pos: list[int] = []
    segment: list[int] = []  # per token: its segment
    prev: list[int] = []  # per token: the token before it on its path (-1 at a path's start)
    parent: list[int] = []  # per segment: its parent segment (-1 for a unit's path)
    last: list[int] = []  # per segment: the index of its last token (-1 if it has none)
    ends: list[tuple[Row, int]] = []  # requests and the index of their last input token

    def emit(tokens: list[int], parent_segment: int, depth: int) -> int:
        s = len(parent)
        parent.append(parent_segment)
        before = last[parent_segment] if parent_segment >= 0 else -1
        for j, token in enumerate(tokens):
            prev.append(before if j == 0 else len(ids) - 1)
            ids.append(token)
            pos.append(depth + j)
            segment.append(s)
        last.append(len(ids) - 1 if tokens else before)
        return s

    for unit in row:
        start = len(ids)
        root = emit(unit.path, -1, 0)
        ends += [(r, start + n - 1) for r, n in unit.ends]
        stack = [(t, root, len(unit.path)) for t in reversed(unit.subtrees)]
        while stack:
            node, up, depth = stack.pop()
            s = emit(node.tokens, up, depth)
            ends += [(r, last[s]) for r in node.ends]
            stack += [(c, s, depth + len(node.tokens)) for c in reversed(node.children)]
    ancestors = torch.zeros(len(parent), len(parent), dtype=torch.bool)  # [s, a]: a is s or above it
    for s, up in enumerate(parent):  # a parent is numbered before its children
        if up >= 0:
            ancestors[s] = ancestors[up]
        ancestors[s, s] = True
    seg = torch.tensor(segment, dtype=torch.long)
    allowed = ancestors[seg][:, seg] & torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
    scored: list[tuple[Row, list[int]]] = []
    for r, q in ends:
        positions = []
        for _ in r.targets:
            positions.append(q)
            q = prev[q]
        scored.append((r, positions[::-1]))
    return ids, pos, allowed, scored
