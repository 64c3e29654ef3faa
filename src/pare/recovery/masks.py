"""Keep a pruned model's zeros through training: masks of the zero weights, masked gradients.

A mask is taken once, before training, from the weights themselves (``W != 0``), so it holds for
any pruning that zeroed weights (unstructured, N:M, or a structured cut that left some zeros) and
costs nothing for a dense matrix (no zeros: no mask). Full fine-tuning multiplies each gradient by
its mask and, after each optimizer step, the weights too (weight decay or numerical noise must not
revive a pruned weight). A LoRA update is masked when it is merged (:mod:`pare.recovery.lora`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from pare.arch.roles import ModelArch
from pare.arch.targets import Target, layer_targets
from pare.hooks import removed_after


def model_targets(model: nn.Module, arch: ModelArch) -> list[Target]:
    """Every prunable matrix of every decoder layer (the arch description's projections and experts)."""
    return [t for i, layer in enumerate(arch.layer_modules(model))
            for t in layer_targets(layer, arch.layers[i], arch.layer_prefix(i))]


def zero_masks(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """``{name: W != 0}`` for every parameter holding at least one exact zero (bool, same shape)."""
    out = {}
    for name, p in params.items():
        keep = p.detach() != 0
        if not bool(keep.all()):
            out[name] = keep
    return out


def target_params(model: nn.Module, targets: list[Target]) -> dict[str, nn.Parameter]:
    """The parameters that hold the targets, by their name in ``model`` (a fused expert parameter once)."""
    wanted = {id(getattr(t.module, t.param)) for t in targets}
    return {n: p for n, p in model.named_parameters() if id(p) in wanted}


@contextmanager
def masked_gradients(params: dict[str, nn.Parameter], masks: dict[str, torch.Tensor]) -> Iterator[None]:
    """Zero the gradient of every masked weight while the block runs (hooks removed after)."""
    with removed_after() as handles:
        for name, mask in masks.items():
            p = params[name]
            m = mask.to(p.device)
            handles.append(p.register_hook(lambda g, m=m: g * m))
        yield


@torch.no_grad()
def apply_masks_(params: dict[str, nn.Parameter], masks: dict[str, torch.Tensor]) -> None:
    """Set every masked weight back to zero, in place."""
    for name, mask in masks.items():
        p = params[name]
        p.mul_(mask.to(p.device, p.dtype))


def zeros_kept(params: dict[str, nn.Parameter], masks: dict[str, torch.Tensor]) -> bool:
    """Whether every weight a mask marks as pruned is still exactly zero."""
    return all(bool((params[n].detach()[~m.to(params[n].device)] == 0).all()) for n, m in masks.items())
