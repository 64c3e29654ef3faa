"""Hooks that live inside a ``with`` block: the one shape pare registers hooks in."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch.utils.hooks import RemovableHandle


@contextlib.contextmanager
def removed_after() -> Iterator[list[RemovableHandle]]:
    """A list to append hook handles to; every handle in it is removed when the block ends, also
    when it raises (or when registering a later hook fails).

    Example::

        with removed_after() as handles:
            handles.append(module.register_forward_hook(hook))
            yield
    """
    handles: list[RemovableHandle] = []
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


__all__ = ["removed_after"]
