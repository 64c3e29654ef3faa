"""Rotation surgery (SliceGPT): fuse norms into linears, rotate the residual stream, add shortcuts.

Works from a :class:`~pare.arch.residual.ResidualPlan` (who writes the stream, which readers read it
through which norm); the math is in :mod:`pare.ops.rotation`. Shapes do not change here: the
rotation uses full ``[H, H]`` orthogonal matrices whose first ``k`` columns are the kept basis, and
:func:`pare.arch.surgery.width.prune_hidden` then keeps the first ``k`` channels of every reader,
writer, embedding and norm.

- :func:`fuse_norms`: every norm's weight (and LayerNorm bias) moves into the readers after it; the
  norm keeps unit weight (zero bias) in its own class, so the model reloads with ``from_pretrained``.
  For LayerNorm the writers are centred first (SliceGPT, section 3.2), so the stream has zero mean and
  the mean subtraction does nothing. A tied head is untied when the final norm's weight is not one
  number for every channel (folding it into the head would change the embedding too).
- :func:`rotate_stream`: the embeddings rotated by ``Q_0``, the readers and writers of layer ``l`` by
  ``Q_(l+1)``; the head and the final norm's bias by the last ``Q``.
- :class:`ResidualShortcut`: the per-layer variant's ``Q_l^T Q_(l+1)`` on a layer's input (the
  residual additions sit inside transformers' layer forward, so the shortcut cannot be folded into any
  weight except at the first layer, whose input is the embeddings: there ``Q_0 = Q_1``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from pare.arch.residual import NormSite, Port, ResidualPlan
from pare.arch.surgery.edits import Edit, ResidualShortcuts
from pare.arch.wrapper import LayerWrapper
from pare.errors import ConfigError
from pare.ops import rotation as rot


def _param(model: nn.Module, port: Port) -> nn.Parameter:
    p = getattr(model.get_submodule(port.module), port.param)
    assert isinstance(p, nn.Parameter), f"{port.module}.{port.param} is not a parameter"
    return p


def reader_weight(model: nn.Module, port: Port) -> torch.Tensor:
    """The ``[..., out, H]`` view of a reader's weight (writing into it edits the model)."""
    w = _param(model, port).data
    return w.t() if port.kind == "conv1d" else w


def writer_weight(model: nn.Module, port: Port) -> torch.Tensor:
    """The ``[..., H, in]`` view of a writer's weight."""
    return reader_weight(model, port)


def port_bias(model: nn.Module, port: Port) -> torch.Tensor | None:
    if port.kind == "experts":
        return None
    b = getattr(model.get_submodule(port.module), "bias", None)
    return b.data if isinstance(b, torch.Tensor) else None


def _norm_params(model: nn.Module, site: NormSite) -> tuple[torch.Tensor, torch.Tensor | None]:
    norm: Any = model.get_submodule(site.norm)
    bias = getattr(norm, "bias", None)
    return norm.weight.data, bias.data if isinstance(bias, torch.Tensor) else None


def check_fusable(model: nn.Module, plan: ResidualPlan) -> None:
    """A LayerNorm bias moves into the readers' biases: every reader of a layer's LayerNorm with a
    non-zero bias must have one (the head keeps the final norm's bias in the norm)."""
    for site in plan.sites:
        weight, bias = _norm_params(model, site)
        if bias is None or not bias.any():
            continue
        if site.layer is None:
            if (weight.abs() < 1e-6).any():
                raise ConfigError(f"the final norm {site.norm!r} has a bias and a weight with zeros: its bias cannot "
                                  "be carried through the head")
            continue
        lacking = [p.module for p in site.readers if port_bias(model, p) is None]
        if lacking:
            raise ConfigError(f"norm {site.norm!r} has a bias but {lacking[0]} has none to take it: its bias "
                              "cannot be fused")


def untie_head(model: nn.Module, head_path: str, embed_path: str) -> None:
    """Give the head its own copy of the embedding matrix and say so in the config."""
    head: Any = model.get_submodule(head_path)
    embed: Any = model.get_submodule(embed_path)
    head.weight = nn.Parameter(embed.weight.data.clone(), requires_grad=embed.weight.requires_grad)
    cfg: Any = model.config
    cfg.tie_word_embeddings = False
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if text is not cfg:
        text.tie_word_embeddings = False


def final_weight_stays(model: nn.Module, plan: ResidualPlan, tied: bool) -> bool:
    """Whether the final norm keeps its weight (a tied head whose final norm scales every channel by
    the same number: that scale commutes with any rotation, so the head can stay tied; with LayerNorm
    the final bias must also sum to zero, since the embedding rows are centred)."""
    site = plan.sites[-1]
    w, b = _norm_params(model, site)
    # a centred tied embedding shifts each token's logit by (its row mean) x sum(final bias): only
    # harmless when that sum is zero
    centred = any(s.kind == "layernorm" for s in plan.sites) and b is not None and bool(b.sum().abs() > 1e-6)
    return tied and bool((w == w[0]).all()) and not centred


def center_writers(model: nn.Module, plan: ResidualPlan) -> None:
    """Centre every write into the stream over its channels (embeddings, writer weights and biases)."""
    for name in plan.embeddings:
        emb: Any = model.get_submodule(name)
        emb.weight.data.copy_(rot.center_output(emb.weight.data, -1))
    for ports in plan.writers.values():
        for port in ports:
            w = writer_weight(model, port)
            w.copy_(rot.center_output(w, -2))
            b = port_bias(model, port)
            if b is not None:
                b.copy_(rot.center_output(b, -1))


def fuse_norms(model: nn.Module, plan: ResidualPlan, keep_final_weight: bool) -> None:
    """Fold every norm's weight (and LayerNorm bias) into its readers; norms end with unit weight and
    zero bias. The final norm's bias stays in the norm (the head has no bias); its weight stays when
    ``keep_final_weight`` (see :func:`final_weight_stays`). Exact: the model computes the same function."""
    if any(s.kind == "layernorm" for s in plan.sites):
        center_writers(model, plan)
    for site in plan.sites:
        w, b = _norm_params(model, site)
        final = site.layer is None
        if final and keep_final_weight:
            continue
        shift = None if final else b
        for port in site.readers:
            view, bias = reader_weight(model, port), port_bias(model, port)
            new_w, new_b = rot.fold_norm_into_reader(view, bias, w, shift)
            view.copy_(new_w)
            if bias is not None and new_b is not None:
                bias.copy_(new_b)
        if final and b is not None:
            # the head now applies the weight: the bias it sees must be b / w (check_fusable: no w = 0)
            b.copy_((b.to(torch.float64) / w.to(torch.float64)).to(b.dtype))
        w.fill_(1.0)
        if b is not None and not final:
            b.zero_()


def rotate_stream(model: nn.Module, plan: ResidualPlan, bases: Sequence[torch.Tensor]) -> None:
    """Rotate the stream with orthogonal ``[H, H]`` matrices: ``bases[0]`` for the embeddings,
    ``bases[l + 1]`` for layer ``l``'s readers and writers, ``bases[-1]`` (the last layer's) for the head
    and the final norm's bias. With one basis for every layer this leaves the function unchanged; where
    ``bases[l]`` and ``bases[l + 1]`` differ, layer ``l``'s input needs :class:`ResidualShortcut`."""
    for name in plan.embeddings:
        emb: Any = model.get_submodule(name)
        emb.weight.data.copy_(rot.rotate_rows(emb.weight.data, bases[0]))
    for i, ports in plan.writers.items():
        for port in ports:
            w = writer_weight(model, port)
            w.copy_(rot.rotate_output(w, bases[i + 1]))
            b = port_bias(model, port)
            if b is not None:
                b.copy_(rot.rotate_rows(b, bases[i + 1]))
    for site in plan.sites:
        q = bases[-1] if site.layer is None else bases[site.layer + 1]
        for port in site.readers:
            view = reader_weight(model, port)
            view.copy_(rot.rotate_input(view, q))
        if site.layer is None:
            _, b = _norm_params(model, site)
            if b is not None:
                b.copy_(rot.rotate_rows(b, q))


def scale_readers(model: nn.Module, plan: ResidualPlan, factor: float, keep_final_weight: bool) -> None:
    """Multiply every reader by ``factor`` (``sqrt(H / k)``: a norm over ``k`` channels divides by
    ``sqrt(k)`` where the original divided by ``sqrt(H)``); a final norm that kept its weight takes
    the factor itself."""
    for site in plan.sites:
        if site.layer is None and keep_final_weight:
            w, _ = _norm_params(model, site)
            w.mul_(factor)
            continue
        for port in site.readers:
            reader_weight(model, port).mul_(factor)


class ResidualShortcut(LayerWrapper):
    """A decoder layer whose hidden-state input first passes ``x <- x @ S`` (``S: [k, k]``, SliceGPT's
    shortcut ``B_l^T B_(l+1)`` from the previous layer's basis into this layer's). The wrapped layer's
    ``forward`` runs unchanged, so the residual path and every reader see the same rotated input."""

    def __init__(self, inner: nn.Module, shortcut: torch.Tensor) -> None:
        super().__init__(inner)
        self.register_buffer("shortcut", shortcut)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        s = self.shortcut
        if args:
            args = (args[0] @ s.to(args[0].dtype), *args[1:])
        else:
            kwargs["hidden_states"] = kwargs["hidden_states"] @ s.to(kwargs["hidden_states"].dtype)
        return self.inner(*args, **kwargs)


def add_shortcuts(layers: nn.ModuleList, bases: Sequence[torch.Tensor], k: int) -> ResidualShortcuts:
    """Wrap layer ``l`` in a :class:`ResidualShortcut` with ``S_l = B_l^T B_(l+1)`` (``B = Q[:, :k]``)
    wherever the two bases differ (``bases`` as in :func:`rotate_stream`).

    Returns:
        The edit: ``pare.load`` wraps the same layers before loading the weights (the shortcuts are
        saved with them).
    """
    wrapped = []
    for i in range(len(layers)):
        if bases[i] is bases[i + 1] or torch.equal(bases[i], bases[i + 1]):
            continue
        b0, b1 = bases[i][:, :k], bases[i + 1][:, :k]
        ref = next(layers[i].parameters())
        layers[i] = ResidualShortcut(layers[i], (b0.T @ b1).to(ref.device, ref.dtype))
        wrapped.append(i)
    return ResidualShortcuts(layers=tuple(wrapped), width=k)


def _replay_shortcuts(model: nn.Module, edit: ResidualShortcuts, override: Any = None) -> None:
    from pare.arch import describe

    arch = describe(model, override)
    layers = arch.layer_modules(model)
    k = edit.width
    for i in edit.layers:
        ref = next(layers[i].parameters())
        layers[i] = ResidualShortcut(layers[i], torch.zeros(k, k, dtype=ref.dtype, device=ref.device))


REPLAY: dict[type[Edit], Callable[[nn.Module, Any, Any], None]] = {ResidualShortcuts: _replay_shortcuts}


def has_shortcuts(model: nn.Module) -> bool:
    return any(isinstance(m, ResidualShortcut) for m in model.modules())


def reader_scale(hidden: int, kept: int) -> float:
    return math.sqrt(hidden / kept)


__all__ = [
    "REPLAY",
    "ResidualShortcut",
    "add_shortcuts",
    "center_writers",
    "check_fusable",
    "final_weight_stays",
    "fuse_norms",
    "has_shortcuts",
    "port_bias",
    "reader_scale",
    "reader_weight",
    "rotate_stream",
    "scale_readers",
    "untie_head",
    "writer_weight",
]
