"""Sizes: parameter counts, non-zeros, bytes on disk, sparsity of a weight."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters; a tied (shared) tensor counts once, as ``model.parameters()`` yields it."""
    return sum(p.numel() for p in model.parameters())


def nonzero(tensor: torch.Tensor) -> int:
    """Number of non-zero values of a tensor.

    On the CPU NumPy counts fp16/32/64 values (faster than torch); elsewhere the ``!= 0`` mask is
    counted, which is faster than ``count_nonzero`` of a float tensor whose zeros are scattered (a
    pruned weight).
    """
    t = tensor.detach()
    if t.device.type == "cpu" and t.dtype in (torch.float16, torch.float32, torch.float64):
        return int(np.count_nonzero(t.numpy()))
    return int(torch.count_nonzero(t != 0)) if t.is_floating_point() else int(torch.count_nonzero(t))


def count_nonzero(model: nn.Module) -> int:
    """Number of non-zero values in the model's floating-point parameters.

    Integer or boolean parameters (e.g. packed quantized weights) are skipped, since their zeros do
    not mean pruned weights; so are parameters on the meta device, which hold no values.
    """
    return sum(nonzero_by_parameter(model).values())


def nonzero_by_parameter(model: nn.Module) -> dict[int, int]:
    """``id(parameter)`` -> its non-zero values, for the parameters :func:`count_nonzero` counts."""
    counts: dict[int, int] = {}
    skipped = 0
    for p in model.parameters():
        if not p.is_floating_point() or p.is_meta:
            skipped += 1
            continue
        counts[id(p)] = nonzero(p)
    if skipped:
        logger.debug("count_nonzero skipped %d non-floating or meta parameters", skipped)
    return counts


def dir_size_bytes(path: str | os.PathLike[str]) -> int:
    """Total size in bytes of the files under ``path`` (or of ``path`` itself if it is a file).

    Symbolic links are followed, so a Hugging Face cache snapshot counts its blobs.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    root = Path(path)
    if root.is_file():
        return root.stat().st_size
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist")
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def linear_sparsity(weight: torch.Tensor | nn.Module) -> float:
    """Fraction of exact zeros in a weight (or a module's ``.weight``); 0.0 for an empty tensor."""
    tensor = weight.weight if isinstance(weight, nn.Module) else weight
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"linear_sparsity needs a tensor or a module with a weight, got {type(weight)}")
    numel = tensor.numel()
    if numel == 0:
        return 0.0
    return 1.0 - nonzero(tensor) / numel
