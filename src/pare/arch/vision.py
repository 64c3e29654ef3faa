"""The vision tower of a vision-language model, described as pare describes a decoder (``component="vision"``).

The tower's encoder layers (SigLIP / CLIP / Idefics3 ``encoder.layers``, Qwen-VL ``visual.blocks``) become
the :class:`~pare.arch.roles.ModelArch`'s layers, with the sizes of ``config.vision_config``, so weight
sparsity, MLP-width, head and depth methods walk them as they walk decoder layers. What surrounds the layers
is recorded in :class:`~pare.arch.roles.VisionRoles`: the inputs the tower takes (for calibration), the
patch embedding and position table the hidden size is tied to, and the config fields that index the
layers from outside (LLaVA's ``vision_feature_layer``, Qwen2.5-VL's ``fullatt_block_indexes``,
Qwen3-VL's ``deepstack_visual_indexes``), which a depth cut remaps (:mod:`pare.arch.surgery.vision`).

Attention heads are cut (the same number in every layer), but not written in the config: these towers
build ``head_dim = hidden_size // num_heads`` from it, so fewer heads of the same ``head_dim`` cannot be
stated there. The config keeps the dense head count, the manifest records the cut, and ``pare.load``
replays it (``from_pretrained`` refuses the shapes; see :func:`pare.arch.surgery.vision.heads_differ`).

Not cut, and refused with the reason before any work:

* the vision hidden size: it is the patch-embedding convolution's output channels, the learned
  position table's width, every layer's norms, the attention width (these towers rebuild
  ``head_dim = hidden_size // num_heads``) and the projector's input (which Idefics3 and Qwen-VL read
  through a pixel shuffle / patch merge that interleaves channels);
* a tower with more than one encoder stack (Mllama: a local and a gated global transformer, read by
  ``intermediate_layers_indices`` into a projector sized by their count).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from torch import nn

from pare.arch.overrides import ArchOverride
from pare.arch.roles import ConfigFields, LayerRoles, ModelArch, VisionRoles
from pare.errors import UnsupportedArchitectureError

TOWER_NAMES = ("vision_tower", "vision_model", "visual", "vision_encoder")
"""Attribute names transformers gives a vision-language model's vision tower."""

VISION_NAMES = {"qkv": "attn.qkv", "o": "attn.proj", "up": "mlp.linear_fc1", "down": "mlp.linear_fc2"}
"""Qwen-VL block projections the decoder's role names do not cover (fused ``qkv`` as ``[q; k; v]``)."""

INDEX_FIELDS = ("vision_feature_layer", "fullatt_block_indexes", "deepstack_visual_indexes",
                "intermediate_layers_indices", "vision_feature_layers")
"""Config fields holding layer indexes of the vision tower (top-level or in ``vision_config``)."""


def vision_tower_path(model: nn.Module) -> str | None:
    """Dotted path of the model's vision tower (the shortest module named as in :data:`TOWER_NAMES`)."""
    found = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in TOWER_NAMES]
    return min(found, key=lambda n: (n.count("."), n)) if found else None


def components(model: nn.Module) -> list[str]:
    """The components of ``model`` pare can describe (``text``, and ``vision`` when it has a tower)."""
    config = getattr(model, "config", None)
    has_tower = vision_tower_path(model) is not None and getattr(config, "vision_config", None) is not None
    return ["text", "vision"] if has_tower else ["text"]


def _first(config: Any, *names: str) -> str | None:
    return next((n for n in names if isinstance(getattr(config, n, None), (int, float))
                 and not isinstance(getattr(config, n), bool)), None)


def _fields(vc: Any) -> ConfigFields:
    hidden = _first(vc, "embed_dim", "hidden_size")  # Qwen2-VL: hidden_size is the merger's output width
    heads = _first(vc, "num_attention_heads", "num_heads", "attention_heads")
    layers = _first(vc, "num_hidden_layers", "depth")
    inter = _first(vc, "intermediate_size", "mlp_ratio")
    if hidden is None or heads is None or layers is None:
        raise UnsupportedArchitectureError(
            f"the vision config {type(vc).__name__} states no hidden size / head count / layer count pare knows "
            "(hidden_size or embed_dim, num_attention_heads or num_heads, num_hidden_layers or depth)")
    return ConfigFields(hidden=hidden, intermediate=inter, heads=heads, kv_heads=None, head_dim=None,
                        layers=layers, max_positions=None)


def _stacks(tower: nn.Module, config: Any, override: ArchOverride) -> list[tuple[str, list[LayerRoles]]]:
    """Every ModuleList of the tower whose layers have attention and an MLP, described."""
    from pare.arch.infer import describe_layer

    out = []
    for name, module in tower.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        roles = [describe_layer(layer, i, config, override) for i, layer in enumerate(module)]
        if all(r.attention is not None and r.mlp is not None for r in roles):
            out.append((name, roles))
    return out


def _layer_override(user: ArchOverride) -> ArchOverride:
    names = {**VISION_NAMES, **user.names}
    return ArchOverride(names=names, qkv_layout=user.qkv_layout or "concat", parallel_residual=False)


def _index_fields(model: nn.Module, config_attr: str) -> tuple[str, ...]:
    top, vc = model.config, getattr(model.config, config_attr)
    out = [n for n in INDEX_FIELDS if getattr(top, n, None) is not None]
    out += [f"{config_attr}.{n}" for n in INDEX_FIELDS if getattr(vc, n, None) is not None]
    return tuple(out)


def _find(tower: nn.Module, tower_path: str, kinds: tuple[type, ...]) -> str | None:
    name = next((n for n, m in tower.named_modules() if isinstance(m, kinds)), None)
    return None if name is None else f"{tower_path}.{name}"


def _vision_roles(model: nn.Module, tower_path: str, vc: Any) -> VisionRoles:
    tower = model.get_submodule(tower_path)
    patch = _find(tower, tower_path, (nn.Conv2d, nn.Conv3d))
    table = _find(tower, tower_path, (nn.Embedding,))
    merge = int(getattr(vc, "spatial_merge_size", 1) or 1)
    patches = patch is not None and isinstance(model.get_submodule(patch), nn.Conv3d)  # Qwen-VL: flat patch rows
    hidden = int(getattr(vc, _fields(vc).hidden))
    not_cut = [f"hidden size {hidden}: the output channels of the patch embedding convolution ({patch})"
               + (f", the width of the position-embedding table ({table})" if table else "")
               + ", every layer's norms, the attention width (head_dim = hidden size / num_heads is rebuilt from "
               "it) and the projector's input, which pare does not cut"]
    return VisionRoles(
        tower=tower_path, config_attr="vision_config", inputs="patches" if patches else "images",
        channels=int(getattr(vc, "num_channels", None) or getattr(vc, "in_channels", None) or 3),
        image_size=int(getattr(vc, "image_size", 0) or 0), patch_size=int(vc.patch_size),
        temporal_patch_size=int(getattr(vc, "temporal_patch_size", 1) or 1), merge_size=merge,
        patch_embed=patch, position_table=table, index_fields=_index_fields(model, "vision_config"),
        not_cut=tuple(not_cut))


def describe_vision(model: nn.Module, override: ArchOverride) -> ModelArch:
    """Describe the vision tower of a vision-language model (see the module docstring).

    Raises:
        UnsupportedArchitectureError: the model has no vision tower (naming the components it has), or a
            tower pare does not describe (several encoder stacks, no attention + MLP layers), with the reason.
    """
    name = type(model).__name__
    tower_path = vision_tower_path(model)
    vc = getattr(model.config, "vision_config", None)
    if tower_path is None or vc is None:
        raise UnsupportedArchitectureError(
            f"component='vision': {name} has no vision tower (no module named {' / '.join(TOWER_NAMES)} with a "
            f"vision_config); the components it has: {components(model)}. Use component='text'")
    fields = _fields(vc)
    heads, hidden = int(getattr(vc, fields.heads)), int(getattr(vc, fields.hidden))
    sizes = SimpleNamespace(num_attention_heads=heads, hidden_size=hidden, head_dim=hidden // heads)
    stacks = _stacks(model.get_submodule(tower_path), sizes, _layer_override(override))
    if len(stacks) != 1:
        found = [f"{tower_path}.{n}" for n, _ in stacks]
        why = (f"it holds {len(stacks)} encoder stacks ({found}), read together by the projector through "
               f"{[f for f in INDEX_FIELDS if getattr(vc, f, None) is not None] or 'their outputs'}"
               if stacks else "no ModuleList of layers with attention (q/k/v or qkv, and an output projection) "
               "and an MLP (fc1/fc2, gate/up/down)")
        raise UnsupportedArchitectureError(f"component='vision': pare does not describe the vision tower of {name} "
                                           f"({tower_path}): {why}. Prune its text decoder (component='text')")
    inner, layers = stacks[0]
    vision = _vision_roles(model, tower_path, vc)
    return ModelArch(
        model_type=str(getattr(model.config, "model_type", name)), base_path=tower_path,
        layers_path=f"{tower_path}.{inner}", embed_path=vision.patch_embed or "", final_norm_path=None,
        lm_head_path="", tied=False, fields=fields, layers=layers, vision=vision)


def vision_summary(model: nn.Module, arch: ModelArch) -> dict[str, Any]:
    """What ``pare inspect`` prints of a vision tower: where its layers are, their cuttable roles, and
    what is not cut (with the reasons) or remapped by a depth cut."""
    assert arch.vision is not None
    r0 = arch.layers[0]
    att, mlp = r0.attention, r0.mlp
    assert att is not None and mlp is not None
    return {
        "tower": arch.vision.tower, "layers_path": arch.layers_path, "layers": arch.num_layers,
        "attention": [p.path for p in (*att.inputs, att.o)], "heads": att.num_heads, "head_dim": att.head_dim,
        "mlp": [p.path for p in (*mlp.inputs, mlp.down)], "mlp_width": arch.mlp_width(model, 0),
        "cuttable": ["weight sparsity of every linear above (wanda, magnitude)",
                     "MLP width (width --no-hidden --no-heads)",
                     "attention heads, the same number per layer (width --no-hidden --no-mlp; reload with pare.load)",
                     "depth: whole layers (shortgpt, angular, layers)"],
        "not_cut": list(arch.vision.not_cut),
        "remapped_by_depth": list(arch.vision.index_fields),
        "calibration": f"{arch.vision.inputs}: pixel_values [N, {arch.vision.channels}, H, W]"
                       + (f" with H = W = {arch.vision.image_size}" if arch.vision.image_size else ""),
    }
