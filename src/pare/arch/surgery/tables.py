"""Per-layer tables outside the decoder layers, cut with the layers they serve.

Gemma 3n and Gemma 4 give every decoder layer its own slice of two tensors that live outside the
layer list: ``embed_tokens_per_layer`` (an embedding of width ``num_layers * hidden_size_per_layer_input``)
and ``per_layer_model_projection`` (a linear with that many outputs). The model reshapes them to
``[..., num_layers, per_layer]``, so layer ``i`` reads block ``i``. Removing layers keeps the blocks of
the kept layers, which is exactly what a model built from the shortened config expects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

SIZE_ATTRIBUTES = {nn.Linear: ("out_features", "in_features"), nn.Embedding: ("num_embeddings", "embedding_dim")}
"""Module class -> the attribute that holds each weight dimension's size."""


def table_cuts(have: Mapping[str, tuple[int, ...]], want: Mapping[str, tuple[int, ...]], num_layers: int,
               kept: int) -> tuple[dict[str, tuple[int, int]], str | None]:
    """Which outside parameters are per-layer tables, and how to cut them.

    Args:
        have: parameter name -> shape, of the model now.
        want: parameter name -> shape, of the model the shortened config builds.
        num_layers: the layers now; kept: the layers after the cut.

    Returns:
        (name -> (dim, block size) for each resized parameter that packs one block per layer along one
        dimension; the reason when a resized parameter does not, else None).
    """
    cuts: dict[str, tuple[int, int]] = {}
    for name, shape in have.items():
        new = want.get(name, shape)
        if new == shape:
            continue
        dims = [d for d, (a, b) in enumerate(zip(shape, new, strict=False)) if a != b]
        d = dims[0] if len(dims) == 1 and len(shape) == len(new) else -1
        if d < 0 or shape[d] % num_layers or new[d] != shape[d] // num_layers * kept:
            return {}, (f"the shortened config also resizes {name} ({list(shape)} -> {list(new)}), a tensor outside "
                        "the decoder layers that does not hold one block per layer, so pare does not cut it")
        cuts[name] = (d, shape[d] // num_layers)
    return cuts, None


def block_index(kept: Sequence[int], block: int) -> torch.Tensor:
    """Row indices of the kept layers' blocks: ``[k0*block .. k0*block+block-1, k1*block ...]``."""
    return torch.cat([torch.arange(i * block, (i + 1) * block) for i in kept])


def cut_tables(model: nn.Module, cuts: Mapping[str, tuple[int, int]], kept: Sequence[int]) -> None:
    """Keep the kept layers' blocks of each table in ``cuts`` (from :func:`table_cuts`), in place."""
    for name, (dim, block) in cuts.items():
        owner_path, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_path)
        old = getattr(owner, leaf)
        index = block_index(kept, block).to(old.device)
        with torch.no_grad():
            new = old.detach().index_select(dim, index).clone()
        setattr(owner, leaf, nn.Parameter(new, requires_grad=old.requires_grad))
        sizes = next((v for k, v in SIZE_ATTRIBUTES.items() if isinstance(owner, k)), None)
        if sizes is not None and leaf == "weight" and dim < len(sizes):
            setattr(owner, sizes[dim], new.shape[dim])
