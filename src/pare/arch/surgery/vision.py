"""Vision-tower surgery: what a cut of a vision tower's encoder layers must rewrite outside them.

* Depth: config fields that index the tower's layers from outside (:attr:`VisionRoles.index_fields`)
  are remapped to the kept layers, or the cut is refused with the reason:

  - ``vision_feature_layer`` (LLaVA family, top-level config; an int or a list) indexes the tower's
    ``hidden_states`` (0: the embeddings, ``i``: the output of layer ``i - 1``; negative from the end).
    It becomes the index of the same point of the shortened stack: the output after the kept layers
    among those it read before (``p' = #{kept < p}``), in the same sign convention. Layers past the one
    the projector reads (LLaVA's default ``-2`` leaves the last layer unread) stay removable.
  - ``fullatt_block_indexes`` (Qwen2.5-VL: which blocks attend over the whole image instead of
    windows): each kept block keeps its kind; removed ones are dropped from the list.
  - ``deepstack_visual_indexes`` (Qwen3-VL: blocks whose outputs feed the deepstack mergers, one
    merger each, in order): removing such a block would leave a merger without its input, so it is
    refused; the other indexes are remapped.
  - any other index field (``intermediate_layers_indices``...) is refused: pare does not know its
    meaning.

  Indexes past the last layer (a config whose list names more blocks than it builds) are never read
  and are kept as they are. The tower module's own copy of a field (``visual.fullatt_block_indexes``,
  read in ``forward``) is rewritten with the config.
* Width: :func:`sync_vision_config` writes a uniform MLP width into the vision config
  (``intermediate_size``, or Qwen2-VL's integer ``mlp_ratio`` when the width is a multiple of ``embed_dim``).
  A head cut is not written there (:func:`heads_differ`): :func:`~pare.arch.surgery.width.prune_heads` slices
  the q/k/v rows and output columns of the removed heads and sets the attention module's ``num_heads``
  (``head_dim`` and the scale do not change), and ``pare.load`` replays the recorded ``heads`` edits.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from pare.arch.roles import ModelArch

FEATURE_LAYER_FIELDS = ("vision_feature_layer", "vision_feature_layers")
"""Fields indexing the tower's ``hidden_states`` (``n + 1`` entries: the embeddings, then each layer)."""
KIND_FIELDS = ("fullatt_block_indexes",)
"""Fields listing blocks of one kind: removed blocks are dropped, kept ones renumbered."""
READ_FIELDS = ("deepstack_visual_indexes",)
"""Fields listing blocks whose outputs something outside the tower reads, one reader each."""


def _owner(model: nn.Module, field: str) -> tuple[Any, str]:
    """The config object holding ``field`` (``"vision_config.NAME"`` or a top-level ``"NAME"``) and its name."""
    config: Any = model.config
    if "." in field:
        sub, name = field.split(".", 1)
        return getattr(config, sub), name
    return config, field


def remap_feature_layer(value: int, kept: list[int], n: int) -> int:
    """``hidden_states`` index ``value`` of an ``n``-layer stack, in the stack that keeps ``kept``."""
    p = value if value >= 0 else n + 1 + value
    new = sum(1 for i in kept if i < p)
    return new if value >= 0 else new - (len(kept) + 1)


def _remap(name: str, value: Any, kept: list[int], n: int) -> tuple[Any, str | None]:
    """(the new value of index field ``name``, None) or (None, why the cut cannot keep it)."""
    if name in FEATURE_LAYER_FIELDS:
        if isinstance(value, int):
            return remap_feature_layer(value, kept, n), None
        return [remap_feature_layer(int(v), kept, n) for v in value], None
    if name in KIND_FIELDS:
        return [kept.index(i) if i < n else i for i in value if i >= n or i in kept], None
    if name in READ_FIELDS:
        lost = [i for i in value if i < n and i not in kept]
        if lost:
            return None, (f"layer(s) {lost} feed(s) the projector through {name}={list(value)} (one merger per "
                          "listed layer): removing them would leave a merger without its input")
        return [kept.index(i) if i < n else i for i in value], None
    return None, (f"the vision config's {name}={value!r} indexes the tower's layers in a way pare does not "
                  "remap, so no layer can be removed")


def index_changes(model: nn.Module, arch: ModelArch, kept: list[int]) -> tuple[dict[str, Any], str | None]:
    """``{field: new value}`` for every index field after keeping layers ``kept``, or why not."""
    if arch.vision is None:
        return {}, None
    n = arch.num_layers
    out: dict[str, Any] = {}
    for field in arch.vision.index_fields:
        owner, name = _owner(model, field)
        new, why = _remap(name, getattr(owner, name), kept, n)
        if why is not None:
            return {}, why
        out[field] = new
    return out, None


def apply_index_changes(model: nn.Module, arch: ModelArch, changes: dict[str, Any]) -> None:
    """Write ``changes`` into the config and into the tower module's copies of the same fields."""
    assert arch.vision is not None
    tower = model.get_submodule(arch.vision.tower)
    for field, value in changes.items():
        owner, name = _owner(model, field)
        setattr(owner, name, value)
        if "." in field and hasattr(tower, name):
            setattr(tower, name, value)


@contextmanager
def index_fields_kept(model: nn.Module, arch: ModelArch) -> Iterator[None]:
    """Put every index field (config and tower copies) back as it was when the block ends."""
    if arch.vision is None:
        yield
        return
    before = {f: getattr(*_owner(model, f)) for f in arch.vision.index_fields}
    try:
        yield
    finally:
        apply_index_changes(model, arch, before)


def ratio_problem(width: int, hidden: int) -> str | None:
    """Why Qwen2-VL's vision config cannot state an MLP width of ``width`` (its ``mlp_ratio`` is an integer:
    the width is ``embed_dim * mlp_ratio``), or None."""
    if width % hidden == 0:
        return None
    return (f"the vision config states the MLP width as embed_dim x mlp_ratio, an integer, so a width of {width} "
            f"(embed_dim {hidden}) cannot be written; widths that can: multiples of {hidden}")


def heads_differ(model: nn.Module, arch: ModelArch) -> bool:
    """Whether a layer of the tower has fewer attention heads than its config states.

    The config keeps the dense count: these towers build ``head_dim = hidden_size // num_heads`` from it,
    so writing the kept count would rebuild every projection with another ``head_dim`` (``from_pretrained``
    then fails on the shapes). The head cut lives in the manifest's edits, which ``pare.load`` replays.
    """
    stated = int(getattr(arch.config_of(model.config), arch.fields.heads))
    return any(r.attention is not None and r.attention.num_heads != stated for r in arch.layers)


def sync_vision_config(model: nn.Module, arch: ModelArch) -> bool:
    """Write the tower's MLP width into its config when every layer has the same; True when the config
    alone describes the tower (the hidden size is never cut; a head cut never is in the config, see
    :func:`heads_differ`)."""
    return _write_width(model, arch) and not heads_differ(model, arch)


def _write_width(model: nn.Module, arch: ModelArch) -> bool:
    """Write the tower's MLP width into its config when every layer has the same (True), else False."""
    cfg = arch.config_of(model.config)
    widths = {arch.mlp_width(model, r.index) for r in arch.layers if r.mlp is not None}
    name = arch.fields.intermediate
    if len(widths) != 1 or not name:
        return False
    width = widths.pop()
    if name == "mlp_ratio":
        hidden = int(getattr(cfg, arch.fields.hidden))
        if ratio_problem(width, hidden) is not None:
            return False
        setattr(cfg, name, width // hidden)
    else:
        setattr(cfg, name, width)
    return True


def width_outside_problem(model: nn.Module, arch: ModelArch, width: int) -> str | None:
    """Why the vision config cannot take an MLP width of ``width`` for the encoder layers alone: a module
    outside them built from the same field (SigLIP's attention-pooling ``head`` has an MLP of
    ``intermediate_size``) would reload narrower than it is. None when only the layers change (checked on
    a model built from the changed config on the ``meta`` device)."""
    name = arch.fields.intermediate
    embed = int(getattr(arch.config_of(model.config), arch.fields.hidden))
    if not name or (name == "mlp_ratio" and ratio_problem(width, embed) is not None):
        return None
    full: Any = copy.deepcopy(model.config)
    setattr(arch.config_of(full), name, width // embed if name == "mlp_ratio" else width)
    try:
        with torch.device("meta"):
            built = type(model)(full)
    except Exception as exc:  # the config refuses the width: its message says why
        return f"the vision config cannot be built with {name}={width} ({type(exc).__name__}: {exc})"
    prefix = arch.layers_path + "."
    have = {n: tuple(p.shape) for n, p in model.named_parameters() if not n.startswith(prefix)}
    moved = [n for n, p in built.named_parameters() if n in have and tuple(p.shape) != have[n]]
    if not moved:
        return None
    return (f"the vision config's {name} also sizes {moved[:3]} outside the encoder layers, which would reload "
            "narrower than they are")
