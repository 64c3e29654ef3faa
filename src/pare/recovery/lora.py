"""LoRA through ``peft``, merged so that the result is an ordinary model with the pruning kept.

LoRA (Hu et al., 2021) trains ``W + s * B @ A`` with ``A: [r, in]``, ``B: [out, r]``, ``s = alpha / r``
and ``B`` starting at zero. Merging adds ``s * B @ A`` to ``W``: dense, so it fills every pruned
zero. Here the merged update is masked, ``W + (s * B @ A) * M`` with ``M = (W != 0)`` taken before
training, so an N:M matrix stays exactly N:M and an unstructured one keeps its zeros.

The mask-aware variant (``masked=True``) trains what is merged: a forward hook on each adapted
layer subtracts the part of the update that falls on pruned weights, so the training forward is
``x (W + (s B A) * M)^T`` and merging changes nothing the training saw. It needs no dropout on
the adapter input (the hook sees the layer input, not the dropped-out one).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pare.errors import ConfigError
from pare.hooks import removed_after

ADAPTER = "default"


def require_peft() -> Any:
    """The ``peft`` module, or a ConfigError saying how to install it."""
    try:
        import peft
    except ImportError:
        raise ConfigError("LoRA recovery needs peft: pip install 'pare[recover]' (or pip install peft), or use "
                          "mode='full'") from None
    return peft


def wrap(model: nn.Module, names: list[str], r: int, alpha: float, dropout: float, conv1d: bool) -> nn.Module:
    """``model`` with LoRA adapters on the modules ``names`` (full names), its own weights frozen.

    Returns the ``peft`` LoRA tuner around ``model`` (changed in place); :func:`merge` gives the
    plain model back.
    """
    peft = require_peft()
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(names),
                             fan_in_fan_out=conv1d, bias="none")
    # the tuner itself, not get_peft_model's PeftModel: the wrapper reads transformers' deprecated
    # is_gradient_checkpointing and adds nothing recovery needs
    from peft.tuners.lora import LoraModel

    wrapped: nn.Module = LoraModel(model, config, ADAPTER)
    return wrapped


def lora_layers(wrapped: nn.Module) -> dict[str, nn.Module]:
    """The adapted layers of a ``peft`` model, by their name in the base model."""
    from peft.tuners.lora import LoraLayer

    base: nn.Module = wrapped.model  # type: ignore[assignment]
    return {name: m for name, m in base.named_modules() if isinstance(m, nn.Module) and isinstance(m, LoraLayer)}


def delta(layer: nn.Module) -> torch.Tensor:
    """``s * B @ A`` in the base weight's layout (differentiable)."""
    out: torch.Tensor = layer.get_delta_weight(ADAPTER)  # type: ignore[operator]
    return out


@contextmanager
def mask_aware(layers: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> Iterator[None]:
    """While the block runs, each adapted layer's output omits the update on its pruned weights
    (hooks removed after). ``masks`` is keyed by the base weight's name (``<layer>.weight``)."""
    with removed_after() as handles:
        for name, layer in layers.items():
            mask = masks.get(f"{name}.weight")
            if mask is None:
                continue
            fan_in_fan_out = bool(getattr(layer, "fan_in_fan_out", False))

            def hook(module: nn.Module, args: tuple, output: torch.Tensor, keep: torch.Tensor = mask,
                     t: bool = fan_in_fan_out) -> torch.Tensor:
                off = delta(module) * (~keep.to(output.device))
                x = args[0].to(off.dtype)
                return output - (x @ off if t else F.linear(x, off)).to(output.dtype)

            handles.append(layer.register_forward_hook(hook))
        yield


@torch.no_grad()
def merge(wrapped: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Add each adapter's update to its base weight (masked where a mask is given) and return the
    plain model without any adapter modules."""
    for name, layer in lora_layers(wrapped).items():
        base = layer.get_base_layer()  # type: ignore[operator]
        update = delta(layer).to(base.weight.dtype)
        mask = masks.get(f"{name}.weight")
        if mask is not None:
            update = update * mask.to(update.device, update.dtype)
        base.weight.add_(update)
    plain: nn.Module = wrapped.unload()  # type: ignore[operator]
    return plain


def trainable(wrapped: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter parameters, by name."""
    return {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
