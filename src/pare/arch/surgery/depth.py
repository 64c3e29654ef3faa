"""Depth surgery: remove decoder layers and attention/MLP sub-layers.

Whole-layer removal (:func:`remove_layers`) deletes layers from the decoder ``ModuleList`` and
rewrites everything transformers reads by layer index, so the result reloads with plain
``from_pretrained`` and generates with the KV cache:

* every submodule's ``layer_idx`` (the KV-cache slot: a stale one writes into another layer's cache),
* ``num_hidden_layers`` (``n_layer`` for GPT-2, through the config's attribute map),
* per-layer config lists (``layer_types``: sliding/full attention, which also decides the mask and
  the cache layer kind, and Gemma-3's rotary table),
* a vision tower's layer indexes read from outside it (``vision_feature_layer``, Qwen-VL's
  ``fullatt_block_indexes`` / ``deepstack_visual_indexes``: :mod:`pare.arch.surgery.vision`),
* index lists: Qwen-MoE's ``mlp_only_layers`` / ``decoder_sparse_step``, rewritten as
  ``decoder_sparse_step=1`` plus an explicit list of dense layers so no MoE layer turns dense;
  DeepSeek's ``first_k_dense_replace`` (a dense prefix) counts the dense layers kept.

Sub-layer removal (:func:`remove_sublayer`) swaps an attention or MLP block for a parameter-free
module whose output is zero, so the decoder layer adds nothing to the residual stream (Gemma's
post-norms of zero are zero). The attention stand-in still writes a placeholder into its KV-cache
slot so that cache lengths (read from layer 0) and masks stay right during generation.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pare.arch.roles import ModelArch
from pare.arch.surgery.edits import Edit, RemoveLayers, RemoveSublayer
from pare.arch.surgery.tables import cut_tables, table_cuts
from pare.arch.surgery.vision import apply_index_changes, index_changes, index_fields_kept
from pare.errors import ConfigError

INDEX_LISTS = ("mlp_only_layers",)
"""Config lists that hold layer *indices* (remapped, removed ones dropped)."""
LAYER_COUNT_ALIASES = ("num_blocks",)
"""Second layer-count fields kept equal to the first when they were (xLSTM builds ``num_blocks`` blocks)."""
SEGMENTS = (("n_input_layers", "n_recurrent_layers", "n_output_layers"),)
"""Config fields that split the layers, in order, into consecutive segments (Dory: an input stack, a
stack looped over, an output stack); each counts its kept layers after a cut."""

if TYPE_CHECKING:
    from pare.arch.overrides import ArchOverride


def _with_layers(arch: ModelArch, kept: list[int]) -> ModelArch:
    """``arch`` with only the ``kept`` layers (re-indexed), for code that walks the layers after a cut."""
    return dataclasses.replace(arch, layers=[dataclasses.replace(arch.layers[old], index=new)
                                             for new, old in enumerate(kept)])


def check_layer_indices(indices: Sequence[int], num_layers: int) -> list[int]:
    """Sorted unique layer indices, or ConfigError saying what would work."""
    out = sorted({int(i) for i in indices})
    if not out:
        raise ConfigError("no layers to remove: give at least one layer index")
    bad = [i for i in out if i < 0 or i >= num_layers]
    if bad:
        raise ConfigError(
            f"layer index(es) {bad} outside the model: it has {num_layers} layers (valid: 0..{num_layers - 1})"
        )
    if len(out) >= num_layers:
        raise ConfigError(
            f"cannot remove all {num_layers} layers; at least one must remain (remove at most {num_layers - 1})"
        )
    return out


def _config(model: nn.Module, arch: ModelArch) -> Any:
    """The config holding the described layers' fields (a vision-language model's ``text_config``, or its
    ``vision_config`` when the vision tower is described)."""
    return arch.config_of(model.config)


def _renumber(layers: nn.ModuleList) -> None:
    for new, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                setattr(module, "layer_idx", new)  # noqa: B010 - any module type


def _moe_layout(config: Any, arch: ModelArch, kept: list[int]) -> dict[str, Any]:
    """Qwen-MoE style configs decide sparse vs dense per index: make the kept layers keep theirs."""
    if not (hasattr(config, "decoder_sparse_step") and hasattr(config, "mlp_only_layers")):
        return {}
    if not getattr(config, "num_experts", 0):
        return {}
    dense = [new for new, old in enumerate(kept) if arch.layers[old].experts is None]
    return {"decoder_sparse_step": 1, "mlp_only_layers": dense}


def _dense_prefix(config: Any, arch: ModelArch, kept: list[int]) -> dict[str, Any]:
    """DeepSeek-style configs build dense MLPs in the first ``first_k_dense_replace`` layers and MoE
    after: count the dense layers kept (they stay a prefix, since the order is kept)."""
    value = getattr(config, "first_k_dense_replace", None)
    if not isinstance(value, int) or isinstance(value, bool) or not any(r.experts is not None for r in arch.layers):
        return {}
    return {"first_k_dense_replace": sum(1 for i in kept if i < value)}


def _segments(config: Any, kept: list[int], n: int) -> dict[str, int]:
    for names in SEGMENTS:
        values = [getattr(config, name, None) for name in names]
        sizes = [v for v in values if isinstance(v, int)]
        if len(sizes) != len(names) or sum(sizes) != n:
            continue
        out, start = {}, 0
        for name, size in zip(names, sizes, strict=True):
            out[name] = sum(1 for i in kept if start <= i < start + size)
            start += size
        return out
    return {}


def _config_changes(config: Any, arch: ModelArch, kept: list[int], n: int) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    for name in arch.fields.per_layer_lists:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)) and len(value) == n:
            changes[name] = type(value)(value[i] for i in kept)
    for name in INDEX_LISTS:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)) and name not in changes:
            changes[name] = [kept.index(i) for i in value if i in kept]
    changes.update(_moe_layout(config, arch, kept))
    changes.update(_dense_prefix(config, arch, kept))
    changes.update(_segments(config, kept, n))
    changes[arch.fields.layers] = len(kept)
    for name in LAYER_COUNT_ALIASES:
        if name != arch.fields.layers and getattr(config, name, None) == n:
            changes[name] = len(kept)
    return changes


def _kinds(config: Any, n: int) -> list[str] | None:
    """Each layer's kind (``layer_types``: full / sliding / linear attention, mamba...), if the config says."""
    for name in ("layer_types", "layers_block_type"):
        try:
            value = getattr(config, name, None)
        except (AttributeError, IndexError, TypeError, ValueError):
            continue
        if isinstance(value, (list, tuple)) and len(value) == n:
            return [str(v) for v in value]
    return None


def _shapes(layer: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(p.shape)) for n, p in layer.named_parameters()]


def _signature(layer: nn.Module) -> list[tuple[str, str]]:
    """Module and parameter names, module classes (not shapes: a width cut earlier in a chain is replayed
    from the manifest). Parameters count: GPT-NeoX-Japanese gives only the last layer's attention a
    ``dense_bias``, so the layer moved there by a cut would reload with a random one."""
    return [(n, type(m).__name__) for n, m in layer.named_modules()] + [(n, "") for n, _ in layer.named_parameters()]


def removal_problem(model: nn.Module, arch: ModelArch, removed: Sequence[int]) -> str | None:
    """Why removing layers ``removed`` would leave a model that cannot be saved or run as one, or None.

    Two checks, both generic: every kind of layer the config names (``layer_types``: full, sliding or
    linear attention, mamba...) keeps at least one layer (transformers' hybrid caches read lengths from
    one of each kind), and the shortened config rebuilds exactly the kept layers (a pattern given by a
    period, as Jamba's ``attn_layer_period``, cannot express every subset).
    """
    n = arch.num_layers
    drop = set(removed)
    kept = [i for i in range(n) if i not in drop]
    config = _config(model, arch)
    _, why = index_changes(model, arch, kept)
    if why is not None:
        return why
    kinds = _kinds(config, n)
    if kinds is not None:
        for kind in dict.fromkeys(kinds):
            if all(kinds[i] != kind for i in kept):
                where = [i for i in range(n) if kinds[i] == kind]
                return (f"it removes every {kind!r} layer ({where}); the model's cache and masks need at least one "
                        "of each layer kind in layer_types")
    return _rebuild_problem(model, arch, kept, _config_changes(config, arch, kept, n))


def _built_layers(model: nn.Module, arch: ModelArch, changes: dict[str, Any] | None = None) -> nn.ModuleList:
    """The decoder layers the model's config (with ``changes``) builds, on the meta device."""
    layers = _built(model, arch, changes).get_submodule(arch.layers_path)
    assert isinstance(layers, nn.ModuleList)
    return layers


def _built(model: nn.Module, arch: ModelArch, changes: dict[str, Any] | None = None) -> nn.Module:
    """The model the config (with ``changes``) builds, on the meta device."""
    full: Any = copy.deepcopy(model.config)  # type: ignore[union-attr]
    target = arch.config_of(full)
    for cfg in {id(full): full, id(target): target}.values():  # save_pretrained leaves dtype a string,
        if isinstance(getattr(cfg, "dtype", None), str):  # which Apertus' xIELU cannot build with
            cfg.dtype = getattr(torch, cfg.dtype)
    for name, value in (changes or {}).items():
        setattr(target, name, value)
    with torch.device("meta"):
        return type(model)(full)


def _sync_build_attributes(model: nn.Module, arch: ModelArch) -> list[str]:
    """Give the kept layers' modules the number-valued attributes a model built from the shortened
    config has (Beam's ``attn_residual_add_idx = 2 * (layer_idx + 1)``, set at build time from the
    layer index; LongCat's two attention blocks per layer, cache slots ``2i`` and ``2i + 1``), so the
    pruned model computes what its reload computes. Returns what was changed."""
    try:
        built = _built_layers(model, arch)
    except Exception:
        return []
    changed = []
    for i, (have, want) in enumerate(zip(arch.layer_modules(model), built, strict=False)):
        if _shapes(have) != _shapes(want):
            continue  # widths cut per layer: the manifest rebuilds this layer, not the config
        wanted = dict(want.named_modules())
        for name, module in have.named_modules():
            other = wanted.get(name)
            if other is None or type(other) is not type(module):
                continue
            for key, value in vars(module).items():
                if key.startswith("_") or type(value) not in (int, float):
                    continue
                new = vars(other).get(key)
                if type(new) is type(value) and new != value:
                    setattr(module, key, new)
                    changed.append(f"{i}.{name}.{key}" if name else f"{i}.{key}")
    return changed


def _outside_shapes(model: nn.Module, layers_path: str) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters() if not n.startswith(layers_path + ".")}


def _rebuild_problem(model: nn.Module, arch: ModelArch, kept: list[int], changes: dict[str, Any]) -> str | None:
    try:
        built = _built(model, arch, changes)
    except Exception as exc:  # any failure means the config cannot express the cut
        return f"the shortened config cannot be built ({type(exc).__name__}: {exc})"
    _, why = table_cuts(_outside_shapes(model, arch.layers_path), _outside_shapes(built, arch.layers_path),
                        arch.num_layers, len(kept))
    if why is not None:
        return why
    layers: Any = built.get_submodule(arch.layers_path)
    have = arch.layer_modules(model)
    if len(layers) != len(kept):
        return f"the shortened config builds {len(layers)} layers, not {len(kept)}"
    for new, old in enumerate(kept):
        if any(type(m).__module__ == __name__ for m in have[old].modules()):
            continue  # a sub-layer pare already removed (a stand-in): the manifest replays it
        if _signature(layers[new]) != _signature(have[old]):
            return (f"after the cut, layer {old} would sit at index {new}, where the config's layer pattern "
                    "builds a different kind of layer (a pattern set by a period cannot express this subset)")
    return None


def choose_layers(model: nn.Module, arch: ModelArch, order: Sequence[int], k: int) -> tuple[list[int], list[str]]:
    """The first ``k`` layers of ``order`` (best first) whose removal together is valid
    (:func:`removal_problem`), skipping those that are not; and the reasons for each skipped one.

    Raises:
        ConfigError: fewer than ``k`` layers can be removed.
    """
    chosen: list[int] = []
    skipped: list[str] = []
    for i in order:
        if len(chosen) == k:
            break
        why = removal_problem(model, arch, [*chosen, i])
        if why is None:
            chosen.append(i)
        else:
            skipped.append(f"layer {i}: {why}")
    if len(chosen) < k:
        raise ConfigError(f"only {len(chosen)} of the {k} layers asked can be removed from this "
                          f"{arch.model_type} model: " + "; ".join(skipped[:3]))
    return sorted(chosen), skipped


def first_valid_span(model: nn.Module, arch: ModelArch, starts: Sequence[int], n: int) -> tuple[int, list[str]]:
    """The first start (best first) whose span of ``n`` layers can be removed, and why earlier ones cannot.

    Raises:
        ConfigError: no span can be removed.
    """
    skipped: list[str] = []
    for start in starts:
        why = removal_problem(model, arch, list(range(start, start + n)))
        if why is None:
            return start, skipped
        skipped.append(f"layers {start}-{start + n - 1}: {why}")
    raise ConfigError(f"no span of {n} layers can be removed from this {arch.model_type} model: "
                      + "; ".join(skipped[:3]))


def remove_layers(model: nn.Module, arch: ModelArch, indices: Sequence[int], check: bool = True) -> RemoveLayers:
    """Delete decoder layers ``indices`` and fix every index and config field that refers to them.

    Args:
        model: a transformers causal LM, edited in place.
        arch: its description (``pare.arch.describe(model)``); re-describe after this call.
        indices: layer indices of the current model to delete (any order, not necessarily consecutive).

    Returns:
        The :class:`~pare.arch.surgery.edits.RemoveLayers` edit; its ``uniform`` is False only when the
        config cannot express the result (GPT-2 with ``scale_attn_by_inverse_layer_idx``).

    Raises:
        ConfigError: empty, out-of-range indices, all layers, or (``check``) a removal the shortened
            config cannot express or that leaves a layer kind with no layer (:func:`removal_problem`).
    """
    layers = arch.layer_modules(model)
    n = len(layers)
    removed = check_layer_indices(indices, n)
    if check:
        why = removal_problem(model, arch, removed)
        if why is not None:
            raise ConfigError(f"cannot remove layers {removed} from this {arch.model_type} model: {why}")
    kept = [i for i in range(n) if i not in set(removed)]
    config = _config(model, arch)
    changes = _config_changes(config, arch, kept, n)
    if check:  # per-layer tables outside the layers (Gemma 3n / 4): keep the kept layers' blocks
        cuts, _ = table_cuts(_outside_shapes(model, arch.layers_path),
                             _outside_shapes(_built(model, arch, changes), arch.layers_path), n, len(kept))
        cut_tables(model, cuts, kept)
    new_layers = [layers[i] for i in kept]
    layers._modules.clear()
    for i, layer in enumerate(new_layers):
        layers.add_module(str(i), layer)
    _renumber(layers)
    for name, value in changes.items():
        setattr(config, name, value)
    indexes, _ = index_changes(model, arch, kept)  # refused above by removal_problem when check is set
    if indexes:
        apply_index_changes(model, arch, indexes)
    keeps_old_scale = bool(getattr(config, "scale_attn_by_inverse_layer_idx", False))
    if check and not keeps_old_scale:  # GPT-2 keeps its old per-layer scale (a non-uniform edit)
        _sync_build_attributes(model, _with_layers(arch, kept))
    # GPT-2 scales attention by 1/(layer_idx+1) at build time: the config cannot keep the old scale
    scaled = bool(getattr(config, "scale_attn_by_inverse_layer_idx", False))
    return RemoveLayers(
        removed=tuple(removed), kept=tuple(kept), num_layers_before=n, num_layers_after=len(kept),
        layers_path=arch.layers_path,
        config={k: list(v) if isinstance(v, tuple) else v for k, v in {**changes, **indexes}.items()},
        uniform=False if scaled else None,
    )


def _replay_remove_layers(model: nn.Module, edit: RemoveLayers, override: ArchOverride | None = None) -> None:
    """On a model built from the saved (already shortened) config the layers are gone; restore the
    per-layer attention scale of GPT-2 models built with ``scale_attn_by_inverse_layer_idx``."""
    layers = model.get_submodule(edit.layers_path)
    assert isinstance(layers, nn.ModuleList)
    if len(layers) == edit.num_layers_before:  # a config saved before the cut: cut now
        from pare.arch import describe

        remove_layers(model, describe(model, override), edit.removed)
    from pare.arch.infer import text_config

    if getattr(text_config(model), "scale_attn_by_inverse_layer_idx", False):
        for new, old in enumerate(edit.kept):
            for module in layers[new].modules():
                if hasattr(module, "scale_attn_by_inverse_layer_idx") and hasattr(module, "scaling"):
                    base = float(getattr(module, "head_dim")) ** -0.5 if getattr(module, "scale_attn_weights") else 1.0  # noqa: B009
                    setattr(module, "scaling", base / float(old + 1))  # noqa: B010


@contextlib.contextmanager
def layers_removed(model: nn.Module, arch: ModelArch, indices: Sequence[int]) -> Iterator[RemoveLayers]:
    """Temporarily remove layers (e.g. to score a candidate window); everything is restored on exit."""
    layers = arch.layer_modules(model)
    originals = list(layers)
    config = _config(model, arch)
    slots = [
        (m, m.layer_idx) for layer in originals for m in layer.modules()
        if isinstance(getattr(m, "layer_idx", None), int)
    ]
    names = (*arch.fields.per_layer_lists, *INDEX_LISTS, "decoder_sparse_step", "first_k_dense_replace",
             arch.fields.layers, *LAYER_COUNT_ALIASES, *(name for names in SEGMENTS for name in names))
    before = {k: copy.deepcopy(getattr(config, k)) for k in names if hasattr(config, k)}
    try:
        with index_fields_kept(model, arch):
            yield remove_layers(model, arch, indices, check=False)
    finally:
        layers._modules.clear()
        for i, layer in enumerate(originals):
            layers.add_module(str(i), layer)
        for module, slot in slots:
            module.layer_idx = slot
        for k, v in before.items():
            setattr(config, k, v)


class ZeroAttention(nn.Module):
    """An attention block removed to its residual identity: output zeros, attention weights None.

    It keeps the ``layer_idx`` of the block it replaces and, when the model passes a KV cache, writes
    a placeholder of the right sequence length into that slot (``[B, 1, T, 1]`` for dynamic caches,
    the full ``[B, kv_heads, T, head_dim]`` for pre-allocated ones) so that cache lengths and masks,
    which transformers reads from layer 0 or the first sliding layer, stay right.
    """

    def __init__(self, layer_idx: int | None, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim

    def _placeholder(self, cache: Any, x: torch.Tensor) -> None:
        from transformers.cache_utils import DynamicLayer, EncoderDecoderCache

        if isinstance(cache, EncoderDecoderCache):
            cache = cache.self_attention_cache
        if self.layer_idx is None or not hasattr(cache, "update"):
            return
        slots = getattr(cache, "layers", None)
        slot = slots[self.layer_idx] if slots is not None and self.layer_idx < len(slots) else None
        small = slot is None or isinstance(slot, DynamicLayer)
        heads, dim = (1, 1) if small else (self.num_kv_heads, self.head_dim)
        kv = x.new_zeros(x.shape[0], heads, x.shape[1], dim)
        cache.update(kv, kv.clone(), self.layer_idx)

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        from transformers.cache_utils import Cache

        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        for value in (*args[1:], *kwargs.values()):
            if isinstance(value, Cache):
                self._placeholder(value, x)
                break
        return torch.zeros_like(x), None


class ZeroMLP(nn.Module):
    """An MLP block removed to its residual identity: returns zeros of the input's shape."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(x)


class EmptyProjection(nn.Module):
    """Stands in for an MLP input projection of a layer without an MLP module (OPT's ``fc1``):
    a zero-width output, so the activation costs nothing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :0]


class ZeroProjection(nn.Module):
    """Stands in for an MLP output projection without an MLP module (OPT's ``fc2``): zeros ``[..., out]``."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    setattr(owner, leaf, module)


def sublayer_parameters(arch: ModelArch, model: nn.Module, layer_idx: int, part: str) -> int:
    """Parameters in the attention or MLP/MoE block of a layer (what :func:`remove_sublayer` frees)."""
    layer = arch.layer_modules(model)[layer_idx]
    roles = arch.layers[layer_idx]
    if part == "attention":
        if roles.attention is None:
            return 0
        return sum(p.numel() for p in layer.get_submodule(roles.attention.path).parameters())
    if roles.experts is not None:
        block = roles.experts.path.rpartition(".")[0]
    elif roles.mlp is not None:
        block = roles.mlp.path
    else:
        return 0
    if block == "" and roles.mlp is not None:
        projs = (*roles.mlp.inputs, roles.mlp.down)
        return sum(p.numel() for proj in projs for p in layer.get_submodule(proj.path).parameters())
    return sum(p.numel() for p in layer.get_submodule(block).parameters())


def block_paths(arch: ModelArch, layer_idx: int, part: str) -> list[str]:
    """The module paths (inside the layer) that :func:`remove_sublayer` replaces."""
    roles = arch.layers[layer_idx]
    if part == "attention":
        return [roles.attention.path] if roles.attention is not None else []
    if roles.experts is not None:
        return [roles.experts.path.rpartition(".")[0]]
    if roles.mlp is None:
        return []
    if roles.mlp.path:
        return [roles.mlp.path]
    return [p.path for p in (*roles.mlp.inputs, roles.mlp.down)]


@contextlib.contextmanager
def sublayer_removed(model: nn.Module, arch: ModelArch, layer_idx: int, part: str) -> Iterator[None]:
    """Layer ``layer_idx``'s ``part`` block stands in for the identity while the body runs, then the
    original modules are put back (for scoring a removal without making it)."""
    layer = arch.layer_modules(model)[layer_idx]
    originals = {p: layer.get_submodule(p) for p in block_paths(arch, layer_idx, part)}
    remove_sublayer(model, arch, layer_idx, part)
    try:
        yield
    finally:
        for path, module in originals.items():
            set_submodule(layer, path, module)


def remove_sublayer(model: nn.Module, arch: ModelArch, layer_idx: int, part: str = "attention") -> RemoveSublayer:
    """Replace the attention or MLP block of one layer by its residual identity (a zero output).

    Args:
        model: the causal LM, edited in place.
        arch: its description.
        layer_idx: the layer.
        part: ``"attention"`` or ``"mlp"`` (for MoE layers: the whole expert block, router and shared
            expert included).

    Returns:
        The :class:`~pare.arch.surgery.edits.RemoveSublayer` edit. The config cannot express a missing
        block, so the pruning report must set ``uniform = False``; ``pare.load`` replays the edit.

    Raises:
        ConfigError: unknown part, index outside the model, or a block that is already removed.
    """
    layers = arch.layer_modules(model)
    n = len(layers)
    if part not in ("attention", "mlp"):
        raise ConfigError(f"part must be 'attention' or 'mlp', got {part!r}")
    if not isinstance(layer_idx, int) or not 0 <= layer_idx < n:
        raise ConfigError(f"layer index {layer_idx!r} outside the model: valid indices are 0..{n - 1}")
    roles = arch.layers[layer_idx]
    layer = layers[layer_idx]
    freed = sublayer_parameters(arch, model, layer_idx, part)
    base = RemoveSublayer(layer_idx, part, freed, arch.layers_path)
    if part == "attention":
        att = roles.attention
        if att is None and roles.mla is not None:
            raise ConfigError(f"layer {layer_idx}'s attention is multi-head latent attention, whose KV cache holds "
                              "the shared latents: pare does not remove it as a sub-layer. Remove whole layers "
                              "(shortgpt, layers) or cut its heads (width, osscar --attn-ratio)")
        if att is None:
            raise ConfigError(f"layer {layer_idx} has no attention block left to remove")
        old = layer.get_submodule(att.path)
        layer_slot = getattr(old, "layer_idx", layer_idx)
        set_submodule(layer, att.path, ZeroAttention(layer_slot, att.num_kv_heads, att.head_dim))
        return replace(base, path=att.path, num_kv_heads=att.num_kv_heads, head_dim=att.head_dim)
    if roles.experts is not None:
        path = roles.experts.path.rpartition(".")[0]
    elif roles.mlp is not None:
        path = roles.mlp.path
    else:
        raise ConfigError(f"layer {layer_idx} has no MLP block left to remove")
    if path:
        set_submodule(layer, path, ZeroMLP())
        return replace(base, path=path)
    assert roles.mlp is not None
    from pare.arch.roles import out_features

    out = out_features(layer.get_submodule(roles.mlp.down.path), roles.mlp.down)
    for proj in roles.mlp.inputs:
        set_submodule(layer, proj.path, EmptyProjection())
    set_submodule(layer, roles.mlp.down.path, ZeroProjection(out))
    return replace(base, inputs=tuple(p.path for p in roles.mlp.inputs), down=roles.mlp.down.path, out_features=out)


def _replay_remove_sublayer(model: nn.Module, edit: RemoveSublayer, override: ArchOverride | None = None) -> None:
    # No describe() here: a layer whose block is already a stand-in has no roles to infer.
    layers = model.get_submodule(edit.layers_path)
    assert isinstance(layers, nn.ModuleList)
    layer = layers[edit.layer]
    if edit.part == "attention":
        assert edit.path is not None and edit.num_kv_heads is not None and edit.head_dim is not None
        old = layer.get_submodule(edit.path)
        slot = getattr(old, "layer_idx", edit.layer)
        set_submodule(layer, edit.path, ZeroAttention(slot, edit.num_kv_heads, edit.head_dim))
    elif edit.path is not None:
        set_submodule(layer, edit.path, ZeroMLP())
    else:
        assert edit.inputs is not None and edit.down is not None and edit.out_features is not None
        for p in edit.inputs:
            set_submodule(layer, p, EmptyProjection())
        set_submodule(layer, edit.down, ZeroProjection(edit.out_features))


REPLAY: dict[type[Edit], Callable[[nn.Module, Any, ArchOverride | None], None]] = {
    RemoveLayers: _replay_remove_layers,
    RemoveSublayer: _replay_remove_sublayer,
}
