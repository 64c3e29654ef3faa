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
- :func:`rotate_stages` and :class:`StageShortcuts`: the per-layer variant (SliceGPT's own scheme), a
  basis per residual addition; the residual passes ``Q_in^T Q_out`` at each addition (they sit inside
  transformers' layer forward, so no weight can absorb them: a wrapper applies them with hooks on the
  blocks' outputs). :func:`head_tensors` / :func:`restore_head` keep the last stage, the final norm and
  the head at the full hidden size when the head is not sliced.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from pare.arch.residual import NormSite, Port, ResidualPlan, Stage, layer_stages, stage_shortcuts
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


def scale_readers(model: nn.Module, plan: ResidualPlan, factor: float, keep_final_weight: bool,
                  head: bool = True) -> None:
    """Multiply every reader by ``factor`` (``sqrt(H / k)``: a norm over ``k`` channels divides by
    ``sqrt(k)`` where the original divided by ``sqrt(H)``); a final norm that kept its weight takes
    the factor itself; ``head=False``: the final norm and head keep the full width, so no factor."""
    for site in plan.sites:
        if site.layer is None and not head:
            continue
        if site.layer is None and keep_final_weight:
            w, _ = _norm_params(model, site)
            w.mul_(factor)
            continue
        for port in site.readers:
            reader_weight(model, port).mul_(factor)


def rotate_stages(model: nn.Module, plan: ResidualPlan, stages: dict[int, list[Stage]],
                  bases: Sequence[torch.Tensor]) -> None:
    """SliceGPT's per-stage rotation with orthogonal ``[H, H]`` matrices: ``bases[0]`` for the embeddings,
    then one per stage (:func:`~pare.arch.residual.layer_stages`) in model order: a stage's readers read
    in the basis before it, its writers write in its own; the head (and the final norm's bias) read in
    the last. The residual paths need :class:`StageShortcuts` unless consecutive bases are equal."""
    for name in plan.embeddings:
        emb: Any = model.get_submodule(name)
        emb.weight.data.copy_(rot.rotate_rows(emb.weight.data, bases[0]))
    j = 0
    for i in sorted(stages):
        for stage in stages[i]:
            q_in, q_out = bases[j], bases[j + 1]
            for site in plan.sites:
                if site.layer == i and site.norm_blocks & set(stage.blocks):
                    for port in site.readers:
                        view = reader_weight(model, port)
                        view.copy_(rot.rotate_input(view, q_in))
            for port in stage.writers:
                w = writer_weight(model, port)
                w.copy_(rot.rotate_output(w, q_out))
                b = port_bias(model, port)
                if b is not None:
                    b.copy_(rot.rotate_rows(b, q_out))
            j += 1
    final = plan.sites[-1]
    for port in final.readers:
        view = reader_weight(model, port)
        view.copy_(rot.rotate_input(view, bases[-1]))
    _, b = _norm_params(model, final)
    if b is not None:
        b.copy_(rot.rotate_rows(b, bases[-1]))


class StageShortcuts(LayerWrapper):
    """A decoder layer whose residual additions pass SliceGPT's shortcuts: at stage ``s`` (attention,
    MLP) the stream ``r`` becomes ``r S_s + (the stage's outputs)`` with ``S_s = B_in^T B_out``
    (buffer ``shortcut_s``, ``[k, k]``; ``[k, H]`` for a last stage that widens into an unsliced head).
    The wrapped layer's ``forward`` runs unchanged; hooks on the stage's output modules, attached for
    the call only, turn its ``r + y`` into ``r S_s + y`` (:func:`~pare.arch.residual.stage_shortcuts`)."""

    def __init__(self, inner: nn.Module, stages: Sequence[Stage], shortcuts: Sequence[torch.Tensor]) -> None:
        super().__init__(inner)
        self.stages = list(stages)
        for s, m in enumerate(shortcuts):
            self.register_buffer(f"shortcut_{s}", m)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else kwargs["hidden_states"]
        mats: list[torch.Tensor | None] = [getattr(self, f"shortcut_{s}") for s in range(len(self.stages))]
        with stage_shortcuts(self.inner, self.stages, mats, [None] * len(mats), x) as wide:
            out = self.inner(*args, **kwargs)
        if not wide:
            return out
        last = mats[-1]
        assert last is not None
        y = out[0] if isinstance(out, (tuple, list)) else out
        y = y @ last.to(y.dtype) + wide[0]
        return type(out)([y, *out[1:]]) if isinstance(out, (tuple, list)) else y


def add_stage_shortcuts(layers: nn.ModuleList, stages: dict[int, list[Stage]], bases: Sequence[torch.Tensor],
                        k: int, head_width: int) -> ResidualShortcuts:
    """Wrap every layer in :class:`StageShortcuts` with ``S = B_in^T B_out`` per stage (``B = Q[:, :k]``;
    the last stage of the last layer keeps ``head_width`` columns), ``bases`` as in :func:`rotate_stages`.

    Returns:
        The edit: ``pare.load`` wraps the same layers before loading the weights (the shortcuts are
        saved with them).
    """
    j, last = 0, max(stages)
    for i in sorted(stages):
        mats = []
        for s in range(len(stages[i])):
            width = head_width if i == last and s == len(stages[i]) - 1 else k
            mats.append(bases[j][:, :k].T @ bases[j + 1][:, :width])
            j += 1
        ref = next(layers[i].parameters())
        layers[i] = StageShortcuts(layers[i], stages[i], [m.to(ref.device, ref.dtype) for m in mats])
    return ResidualShortcuts(layers=tuple(sorted(stages)), width=k, head_width=None if head_width == k else head_width)


def _widen(module: Any, name: str, dim: int, width: int, value: torch.Tensor | None = None) -> None:
    """Give ``module.name`` size ``width`` along ``dim`` (``value`` when given, else uninitialised)."""
    old = getattr(module, name)
    shape = list(old.shape)
    shape[dim] = width
    data = value if value is not None else torch.empty(shape, dtype=old.dtype, device=old.device)
    setattr(module, name, nn.Parameter(data.to(old.device, old.dtype).contiguous(), requires_grad=old.requires_grad))
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif hasattr(module, "nf") and hasattr(module, "nx"):  # GPT-2 Conv1D, stored [in, out]
        module.nx, module.nf = module.weight.shape
    if hasattr(module, "normalized_shape"):
        module.normalized_shape = (width,)


def head_tensors(model: nn.Module, writers: Sequence[Port], final_norm: str,
                 head: str) -> list[tuple[str, str, int, torch.Tensor]]:
    """``(module, parameter, dim, tensor)`` of every parameter that keeps the full hidden size when the head
    is not sliced: the last stage's writers (output side), the final norm, the head (input side)."""
    out = []
    for port in writers:
        if port.kind == "experts":
            raise ConfigError("an unsliced head needs a last layer without fused experts (slice_head=True works)")
        mod: Any = model.get_submodule(port.module)
        out.append((port.module, "weight", 1 if port.kind == "conv1d" else 0, mod.weight.data.clone()))
        if getattr(mod, "bias", None) is not None:
            out.append((port.module, "bias", 0, mod.bias.data.clone()))
    norm: Any = model.get_submodule(final_norm)
    for name in ("weight", "bias"):
        if isinstance(getattr(norm, name, None), torch.Tensor):
            out.append((final_norm, name, 0, getattr(norm, name).data.clone()))
    lm_head: Any = model.get_submodule(head)
    out.append((head, "weight", 1, lm_head.weight.data.clone()))
    return out


def restore_head(model: nn.Module, saved: Sequence[tuple[str, str, int, torch.Tensor]]) -> None:
    """Put back the full-width tensors :func:`head_tensors` took (after the hidden size was cut)."""
    for module, name, dim, value in saved:
        _widen(model.get_submodule(module), name, dim, int(value.shape[dim]), value)


def _replay_shortcuts(model: nn.Module, edit: ResidualShortcuts, override: Any = None) -> None:
    from pare.arch import describe

    arch = describe(model, override)
    layers = arch.layer_modules(model)
    k, last = edit.width, arch.num_layers - 1
    stages = {i: layer_stages(arch, i) for i in edit.layers}
    wide = edit.head_width or k
    if wide != k:
        shapes = [(p.module, n, d) for p in layer_stages(arch, last)[-1].writers
                  for n, d in (("weight", 1 if p.kind == "conv1d" else 0), ("bias", 0))]
        shapes += [(arch.final_norm_path or "", "weight", 0), (arch.final_norm_path or "", "bias", 0),
                   (arch.lm_head_path, "weight", 1)]
        for module, name, dim in shapes:
            mod = model.get_submodule(module)
            if isinstance(getattr(mod, name, None), torch.Tensor):
                _widen(mod, name, dim, wide)
    for i in edit.layers:
        ref = next(layers[i].parameters())
        mats = [torch.zeros(k, wide if i == last and s == len(stages[i]) - 1 else k, dtype=ref.dtype, device=ref.device)
                for s in range(len(stages[i]))]
        layers[i] = StageShortcuts(layers[i], stages[i], mats)


REPLAY: dict[type[Edit], Callable[[nn.Module, Any, Any], None]] = {ResidualShortcuts: _replay_shortcuts}


def has_shortcuts(model: nn.Module) -> bool:
    return any(isinstance(m, StageShortcuts) for m in model.modules())


def reader_scale(hidden: int, kept: int) -> float:
    return math.sqrt(hidden / kept)


__all__ = [
    "REPLAY",
    "StageShortcuts",
    "add_stage_shortcuts",
    "center_writers",
    "check_fusable",
    "final_weight_stays",
    "fuse_norms",
    "has_shortcuts",
    "head_tensors",
    "port_bias",
    "reader_scale",
    "reader_weight",
    "restore_head",
    "rotate_stages",
    "rotate_stream",
    "scale_readers",
    "untie_head",
    "writer_weight",
]
