"""The one hook-lifetime helper: handles are removed when the block ends, also when it raises, and no
other module removes hook handles by hand."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import pare
from pare.hooks import removed_after
from pare.recovery.masks import masked_gradients


def _calls(module: nn.Module) -> list[int]:
    seen: list[int] = []
    module.register_forward_hook(lambda *_: seen.append(1))  # a hook the helper does not own stays
    return seen


def test_handles_removed_at_block_end() -> None:
    lin = nn.Linear(2, 2)
    owned: list[int] = []
    with removed_after() as handles:
        handles.append(lin.register_forward_hook(lambda *_: owned.append(1)))
        handles.append(lin.register_forward_pre_hook(lambda *_: owned.append(2)))
        lin(torch.zeros(1, 2))
        assert owned == [2, 1]
    lin(torch.zeros(1, 2))
    assert owned == [2, 1]
    assert not lin._forward_hooks and not lin._forward_pre_hooks


def test_handles_removed_when_block_raises() -> None:
    lin = nn.Linear(2, 2)
    other = _calls(lin)
    with pytest.raises(RuntimeError, match="boom"), removed_after() as handles:
        handles.append(lin.register_forward_hook(lambda *_: None))
        raise RuntimeError("boom")
    assert len(lin._forward_hooks) == 1  # only the hook registered outside the block
    lin(torch.zeros(1, 2))
    assert other == [1]


def test_context_manager_using_it_cleans_up_on_error() -> None:
    p = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError), masked_gradients({"p": p}, {"p": torch.tensor([True, False, True])}):
        assert p._backward_hooks
        raise ValueError
    (p * 2).sum().backward()
    assert p.grad is not None and p.grad.tolist() == [2.0, 2.0, 2.0]  # no mask left on the gradient


def test_no_other_module_removes_hook_handles_by_hand() -> None:
    """Hooks are registered inside :func:`pare.hooks.removed_after`; a bare ``handle.remove()``
    elsewhere is the repeated try/finally shape coming back."""
    root = Path(pare.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path == root / "hooks.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "remove"
                    and not node.args and not node.keywords):
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert offenders == []
