"""Infer a :class:`ModelArch` from a loaded model.

Sources, in order: the decoder-layer class from ``_no_split_modules``; the tensor-parallel plan
(``base_model_tp_plan``: ``colwise`` projections read the block input, ``rowwise`` ones write the
block output); conventional projection names; config fields; the weights' shapes. A built-in
:class:`ArchOverride` corrects the few families where that is not enough (GPT-2, GPT-NeoX, OPT...).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from torch import nn

from pare.arch.overrides import BUILTIN_OVERRIDES, ArchOverride
from pare.arch.roles import (
    AttentionRoles,
    ConfigFields,
    ExpertsRoles,
    LayerRoles,
    MixerKind,
    MixerRoles,
    MLARoles,
    MLPRoles,
    ModelArch,
    Proj,
    weight_of,
)
from pare.errors import UnsupportedArchitectureError

log = logging.getLogger(__name__)

ROLE_NAMES: dict[str, tuple[str, ...]] = {
    "q": ("q_proj", "query", "q"),
    "k": ("k_proj", "key", "k"),
    "v": ("v_proj", "value", "v"),
    "qkv": ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "W_pack"),
    "o": ("o_proj", "out_proj", "dense", "wo", "c_proj"),
    "gate_up": ("gate_up_proj",),
    "gate": ("gate_proj", "w1"),
    "up": ("up_proj", "w3", "fc1", "c_fc", "dense_h_to_4h", "fc_in"),
    "down": ("down_proj", "w2", "fc2", "dense_4h_to_h", "fc_out", "c_proj"),
}
ATTN_ROLES = ("q", "k", "v", "qkv", "o")
MLP_ROLES = ("gate_up", "gate", "up", "down")
FINAL_NORM_NAMES = ("norm", "final_layer_norm", "ln_f", "final_layernorm", "final_norm")


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _is_projection(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def text_config(model: nn.Module) -> Any:
    """The config of the text decoder: the model's own, or its ``text_config`` for a vision-language
    model (the same object the language model holds, so edits to it are saved with the model)."""
    return decoder_config(model.config)


def decoder_config(config: Any) -> Any:
    """``config``'s text-decoder part (``config`` itself for a plain causal LM)."""
    get = getattr(config, "get_text_config", None)
    if not callable(get) or getattr(config, "is_encoder_decoder", False):
        return config
    try:
        return get(decoder=True)
    except ValueError:  # several text configs: the model's own fields describe its decoder
        return config


def decoder_prefix(model: nn.Module) -> str:
    """Dotted path of the text decoder (``model.language_model`` in a vision-language model), or ``""``
    when the model does not name one; the decoder layers are searched there first so a vision tower's
    layers are never taken for them."""
    get = getattr(model, "get_decoder", None)
    if not callable(get):
        return ""
    try:
        decoder = get()
    except (AttributeError, NotImplementedError, TypeError):
        return ""
    if not isinstance(decoder, nn.Module) or decoder is model:
        return ""
    return next((n for n, m in model.named_modules() if m is decoder), "")


def find_layers_path(model: nn.Module, override: ArchOverride | None = None) -> str:
    """Dotted path of the ModuleList holding the decoder layers (inside the text decoder when the
    model names one)."""
    if override is not None and override.layers_path:
        try:
            found = model.get_submodule(override.layers_path)
        except AttributeError:
            found = None
        if not isinstance(found, nn.ModuleList):
            lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
            raise UnsupportedArchitectureError(
                f"{type(model).__name__}: the override's layers_path {override.layers_path!r} is not a ModuleList "
                f"of the model{'' if found is None else f' (it is a {type(found).__name__})'}; its module lists: "
                f"{lists[:5]}")
        return override.layers_path
    prefix = decoder_prefix(model)
    if prefix:
        try:
            inner = _find_layers(model.get_submodule(prefix), model)
            return f"{prefix}.{inner}" if inner else prefix
        except UnsupportedArchitectureError:
            pass
    return _find_layers(model, model)


def _find_layers(root: nn.Module, model: nn.Module) -> str:
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    candidates = []
    for name, module in root.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            first = type(module[0]).__name__
            if first in layer_classes:
                return name
            if all(type(m).__name__ == first for m in module) and any(
                _is_projection(m) for m in module[0].modules()
            ):
                candidates.append(name)
    if len(candidates) == 1:
        return candidates[0]
    raise UnsupportedArchitectureError(
        f"{type(model).__name__}: cannot find the decoder layers (no ModuleList of "
        f"{sorted(layer_classes) or 'any _no_split_modules class'}; candidates: {candidates}). "
        "Pass ArchOverride(layers_path='model.layers') to pare.arch.describe, or --arch-override "
        "with `layers_path:` on the CLI."
    )


def _module_name(names: dict[int, str], target: nn.Module | None) -> str | None:
    return None if target is None else names.get(id(target))


def _tp_kind(tp_plan: dict[str, str], rel: str) -> str | None:
    kind = tp_plan.get(f"layers.*.{rel}")
    if kind is None:
        return None
    if kind.startswith("colwise") or kind == "packed_colwise":
        return "in"
    if kind.startswith("rowwise"):
        return "out"
    return None


def _match_roles(modules: dict[str, nn.Module], override: ArchOverride | None) -> dict[str, str]:
    """Map role -> relative path of the projection among a layer's ``modules`` (name -> module)."""
    projections = {n: m for n, m in modules.items() if n and _is_projection(m)}
    roles: dict[str, str] = {}
    forced = dict(override.names) if override else {}
    for role, rel in forced.items():
        if rel in projections:  # a forced module may be gone (a removed sub-layer)
            roles[role] = rel
    for rel in projections:
        leaf = rel.rsplit(".", 1)[-1]
        parent = rel.rsplit(".", 1)[0] if "." in rel else ""
        if "shared_expert" in rel or rel in roles.values():
            continue
        for role, names in ROLE_NAMES.items():
            if role in roles or leaf not in names:
                continue
            in_attn = any(k in parent for k in ("attn", "attention"))
            if role in MLP_ROLES and in_attn:
                continue  # a gate inside attention (AFMoE's output gate) is not the MLP's
            if role in ATTN_ROLES and role != "o" and not in_attn and leaf in ("q", "k", "v"):
                continue
            if role == "o" and leaf == "c_proj" and not in_attn:
                continue  # GPT-2 style: c_proj in the MLP is the down projection
            if role == "down" and leaf == "c_proj" and in_attn:
                continue
            if role == "o" and leaf == "dense" and not in_attn:
                continue
            roles[role] = rel
            break
    if "o" not in forced:
        _output_beside_queries(projections, roles)
    return roles


def _output_beside_queries(projections: dict[str, nn.Module], roles: dict[str, str]) -> None:
    """Take for ``o`` the output projection in the block holding the queries when the first one found
    sits elsewhere (Falcon-H1's layer holds a Mamba mixer, whose ``out_proj`` comes first, beside its
    attention's ``o_proj``)."""
    query = roles.get("q") or roles.get("qkv")
    if query is None or "o" not in roles or _parent(roles["o"]) == _parent(query):
        return
    claimed = set(roles.values())
    found = next((rel for rel in projections if rel not in claimed and _parent(rel) == _parent(query)
                  and rel.rsplit(".", 1)[-1] in ROLE_NAMES["o"]), None)
    if found is not None:
        roles["o"] = found


def _experts(layer: nn.Module, modules: dict[str, nn.Module], config: Any) -> ExpertsRoles | None:
    fused = {n for n, p in layer.named_parameters() if p.dim() == 3}  # fused MoE experts: [E, out, in]
    for rel in dict.fromkeys(n.rpartition(".")[0] for n in fused):  # the modules holding them, in order
        own = f"{rel}." if rel else ""
        gu = next((n for n in ("gate_up_proj", "w13", "gate_up") if own + n in fused), None)
        dn = next((n for n in ("down_proj", "w2") if own + n in fused), None)
        if gu is None or dn is None:
            continue
        module = modules[rel]
        parent = rel.rsplit(".", 1)[0] if "." in rel else ""
        prefix = f"{parent}." if parent else ""
        router = next((f"{prefix}{n}" for n in ("gate", "router") if f"{prefix}{n}" in modules), None)
        if router is None:
            return None
        num_experts, two_i, last = getattr(module, gu).shape
        down_shape = getattr(module, dn).shape
        if last == 2 * down_shape[1] and two_i == down_shape[2]:
            two_i = last  # gpt-oss stores gate_up as [E, H, 2I] and down as [E, I, H]
        num_experts = min(num_experts, down_shape[0])  # LongCat's gate_up also holds unused rows of its zero experts
        shared = None
        name = next((n for n in ("shared_expert", "shared_experts", "shared_mlp")
                     if f"{prefix}{n}.down_proj" in modules), None)
        if name is not None:  # Qwen2-MoE's shared_expert, DeepSeek's shared_experts, HunYuan-MoE's shared_mlp
            shared = MLPRoles(
                path=f"{prefix}{name}",
                gate=Proj(f"{prefix}{name}.gate_proj"),
                up=Proj(f"{prefix}{name}.up_proj"),
                down=Proj(f"{prefix}{name}.down_proj"),
            )
        shared_gate = f"{prefix}shared_expert_gate" if f"{prefix}shared_expert_gate" in modules else None
        return ExpertsRoles(
            path=rel,
            gate_up_param=gu,
            down_param=dn,
            num_experts=int(num_experts),
            intermediate=int(two_i) // 2,
            router=router,
            top_k=int(getattr(config, "num_experts_per_tok", 0) or getattr(config, "top_k", 0) or 0),
            shared=shared,
            shared_gate=shared_gate,
        )
    return None


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def _parent(rel: str) -> str:
    return rel.rsplit(".", 1)[0] if "." in rel else ""


def config_head_counts(config: Any) -> tuple[int, int, int]:
    """(heads, kv_heads, head_dim) as the (text) config states them."""
    config = decoder_config(config)
    if getattr(config, "num_attention_heads", None) is None:
        raise UnsupportedArchitectureError(
            f"the {getattr(config, 'model_type', '?')} config states no num_attention_heads for the decoder pare "
            "found (an encoder-decoder text model, as Florence-2's BART, names its decoder's heads otherwise); "
            "pare reads a decoder's head count from that field, so it does not prune this model")
    heads = int(config.num_attention_heads)
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    return heads, int(kv), int(head_dim)


def _attention(
    modules: dict[str, nn.Module], roles: dict[str, str], config: Any, layout: str
) -> AttentionRoles | None:
    if "o" not in roles or not ({"q", "k", "v"} <= roles.keys() or "qkv" in roles):
        return None

    def proj(role: str) -> Proj:
        return Proj(roles[role], conv1d=_is_conv1d(modules[roles[role]]))

    _, _, head_dim = config_head_counts(config)
    o = proj("o")
    o_mod = modules[o.path]
    o_in = weight_of(o_mod).shape[0] if o.conv1d else weight_of(o_mod).shape[1]
    layer_heads = int(o_in) // head_dim
    path = _parent(o.path)
    q_norm = f"{path}.q_norm" if f"{path}.q_norm" in modules else None
    k_norm = f"{path}.k_norm" if f"{path}.k_norm" in modules else None
    extra = _per_head_state(modules, roles, path, layer_heads, head_dim)
    if "qkv" in roles:
        qkv = proj("qkv")
        qkv_mod = modules[qkv.path]
        total = (weight_of(qkv_mod).shape[1] if qkv.conv1d else weight_of(qkv_mod).shape[0]) // head_dim
        layer_kv = (int(total) - layer_heads) // 2
        return AttentionRoles(
            path=path, o=o, num_heads=layer_heads, num_kv_heads=layer_kv, head_dim=head_dim,
            qkv=qkv, qkv_layout=layout,  # type: ignore[arg-type]
            q_norm=q_norm, k_norm=k_norm, **extra,
        )
    k = proj("k")
    k_mod = modules[k.path]
    layer_kv = int(weight_of(k_mod).shape[1] if k.conv1d else weight_of(k_mod).shape[0]) // head_dim
    return AttentionRoles(
        path=path, o=o, num_heads=layer_heads, num_kv_heads=layer_kv, head_dim=head_dim,
        q=proj("q"), k=k, v=proj("v"), q_norm=q_norm, k_norm=k_norm, **extra,
        q_gate=_rows(modules[roles["q"]]) == 2 * layer_heads * head_dim,
    )


def _rows(module: nn.Module) -> int:
    w = weight_of(module)
    return int(w.shape[1] if _is_conv1d(module) else w.shape[0])


SINK_NAMES = ("sinks", "s_aux", "attention_sinks", "sink")
"""Parameters of an attention block holding one logit per query head (gpt-oss' attention sinks)."""


def _per_head_state(modules: dict[str, nn.Module], roles: dict[str, str], path: str, heads: int,
                    head_dim: int) -> dict[str, Any]:
    """The output gate, sinks and unknown projections of the attention block at ``path`` (see
    :class:`AttentionRoles`)."""
    prefix = f"{path}." if path else ""
    claimed = {roles[r] for r in ATTN_ROLES if r in roles}
    gate, unknown = None, []
    for rel, module in modules.items():
        if not rel.startswith(prefix) or rel in claimed or not _is_projection(module):
            continue
        leaf = rel.rsplit(".", 1)[-1]
        if gate is None and "gate" in leaf and _rows(module) == heads * head_dim:
            gate = Proj(rel, conv1d=_is_conv1d(module))
        else:
            unknown.append(rel)
    block = modules.get(path) if path else None
    sinks = None
    if block is not None:
        sinks = next((n for n, p in block.named_parameters(recurse=False)
                      if n in SINK_NAMES and p.dim() == 1 and p.numel() == heads), None)
        sinks = f"{path}.{sinks}" if sinks else None
    return {"gate": gate, "sinks": sinks, "unknown": tuple(unknown)}


def _mlp(modules: dict[str, nn.Module], roles: dict[str, str]) -> MLPRoles | None:
    if "down" not in roles:
        return None

    def proj(role: str) -> Proj | None:
        if role not in roles:
            return None
        return Proj(roles[role], conv1d=_is_conv1d(modules[roles[role]]))

    down = proj("down")
    assert down is not None
    gate_up, gate, up = proj("gate_up"), proj("gate"), proj("up")
    if gate_up is None and up is None:
        return None
    return MLPRoles(path=_parent(down.path), down=down, up=up, gate=gate, gate_up=gate_up)


MLA_NAMES = {"kv_a": "kv_a_proj_with_mqa", "kv_a_norm": "kv_a_layernorm", "kv_b": "kv_b_proj",
             "q": "q_proj", "q_a": "q_a_proj", "q_a_norm": "q_a_layernorm", "q_b": "q_b_proj", "o": "o_proj"}
"""Leaf names of a multi-head latent attention block (DeepSeek-V2's, kept by every family that copies it)."""


def _mla(modules: dict[str, nn.Module], config: Any) -> MLARoles | None:
    """Multi-head latent attention: a block holding ``kv_a_proj_with_mqa`` and ``kv_b_proj`` (with
    ``o_proj`` and ``q_proj`` or ``q_a_proj``/``q_b_proj``), sized by the config's
    ``qk_nope_head_dim`` / ``qk_rope_head_dim`` / ``v_head_dim``; the head count is read from ``o_proj``."""
    kv_b = next((n for n, m in modules.items() if n.rsplit(".", 1)[-1] == MLA_NAMES["kv_b"] and _is_projection(m)),
                None)
    dims = [getattr(config, k, None) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")]
    if kv_b is None or not all(isinstance(d, int) and d > 0 for d in dims):
        return None
    path = _parent(kv_b)
    own = {role: f"{path}.{leaf}" if path else leaf for role, leaf in MLA_NAMES.items()}
    found = {role: rel for role, rel in own.items() if rel in modules}
    if not {"kv_a", "kv_a_norm", "o"} <= found.keys() or not ("q" in found or {"q_a", "q_b"} <= found.keys()):
        return None
    nope, rope, v = (int(d) for d in dims)  # type: ignore[arg-type]
    heads = int(weight_of(modules[found["o"]]).shape[1]) // v
    q_rank = int(weight_of(modules[found["q_a"]]).shape[0]) if "q_a" in found else None
    return MLARoles(
        path=path, o=Proj(found["o"]), kv_a=Proj(found["kv_a"]), kv_a_norm=found["kv_a_norm"], kv_b=Proj(kv_b),
        num_heads=heads, nope_dim=nope, rope_dim=rope, v_dim=v,
        kv_rank=int(weight_of(modules[found["kv_a"]]).shape[0]) - rope,
        q=Proj(found["q"]) if "q" in found and "q_a" not in found else None,
        q_a=Proj(found["q_a"]) if "q_a" in found else None, q_a_norm=found.get("q_a_norm"),
        q_b=Proj(found["q_b"]) if "q_b" in found else None, q_rank=q_rank,
    )


def _norms(modules: dict[str, nn.Module], attention: AttentionRoles | None,
           mla: MLARoles | None = None) -> tuple[str, ...]:
    skip: set[str | None] = {attention.q_norm, attention.k_norm} if attention else set()
    skip.update(mla.norms if mla else ())
    out = []
    for rel, module in modules.items():
        is_norm = "norm" in type(module).__name__.lower() and hasattr(module, "weight")
        if rel and rel not in skip and is_norm and "shared" not in rel:
            out.append(rel)
    return tuple(out)


MIXER_SIZES = (
    "state_size", "ssm_state_size", "mamba_d_state", "d_state", "conv_kernel", "mamba_d_conv", "d_conv",
    "linear_conv_kernel_dim", "conv_L_cache", "time_step_rank", "mamba_dt_rank", "mamba_n_heads",
    "mamba_n_groups", "n_groups", "mamba_expand", "expand", "linear_num_key_heads", "linear_num_value_heads",
    "linear_key_head_dim", "linear_value_head_dim", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim",
    "qk_nope_head_dim", "v_head_dim", "lru_width",
)
"""Config fields that size a non-attention mixer (or a latent attention): named by inspect, never cut."""

_MIXER_KINDS: tuple[tuple[tuple[str, ...], MixerKind], ...] = (
    (("mamba", "ssm", "mixer"), "state-space"),
    (("delta", "linear", "lightning", "retention"), "linear-attention"),
    (("recurr", "rglru", "lstm", "rwkv", "lru"), "recurrent"),
    (("conv",), "convolution"),
    (("attention", "attn", "mla"), "attention"),
)


def _mixer_kind(module: nn.Module, path: str) -> MixerKind:
    if _is_projection(module) or isinstance(module, nn.Conv1d):
        return "other"  # a bare linear beside the known blocks says nothing of what it is
    text = f"{type(module).__name__} {path}".lower()
    return next((kind for keys, kind in _MIXER_KINDS if any(k in text for k in keys)), "other")


def _mixer(layer: nn.Module, config: Any, used: set[str]) -> MixerRoles | None:
    """The first child block of ``layer`` holding linears or convolutions that no attention / MLP /
    experts / norm role claims (a Mamba mixer, a linear-attention block, a latent attention...)."""
    found: list[MixerRoles] = []
    for name, child in layer.named_children():
        if name in used:
            continue
        inner = dict(child.named_modules())
        projections = tuple(f"{name}.{n}" if n else name for n, m in inner.items() if _is_projection(m))
        convs = [m for m in inner.values() if isinstance(m, nn.Conv1d)]
        if not projections and not convs:
            continue
        fixed = [f"conv_kernel={int(c.kernel_size[0])}" for c in convs[:1]]
        fixed += [f"{k}={getattr(config, k)}" for k in MIXER_SIZES
                  if isinstance(getattr(config, k, None), int) and not isinstance(getattr(config, k), bool)]
        found.append(MixerRoles(path=name, kind=_mixer_kind(child, name), projections=projections,
                                fixed=tuple(dict.fromkeys(fixed))))
    return next((m for m in found if m.kind != "other"), found[0] if found else None)


def _claimed(attention: AttentionRoles | None, mlp: MLPRoles | None, experts: ExpertsRoles | None,
             norms: tuple[str, ...], mla: MLARoles | None = None) -> set[str]:
    used = {n for n in norms if "." not in n}  # a norm inside a block (Mamba-2's gated norm) claims nothing
    if attention is not None:
        used.add(attention.path)
    if mla is not None:
        used.add(mla.path)
    if mlp is not None:
        used.update(p.path for p in (*mlp.inputs, mlp.down))
        if mlp.path:
            used.add(mlp.path)
    if experts is not None:
        used.add(_parent(experts.path) or experts.path)
    return {u.split(".", 1)[0] for u in used if u}


def describe_layer(layer: nn.Module, index: int, config: Any, override: ArchOverride | None) -> LayerRoles:
    """The roles of one decoder layer, with head counts read from its weights."""
    modules = dict(layer.named_modules())
    roles = _match_roles(modules, override)
    layout = (override.qkv_layout if override and override.qkv_layout else None) or "unknown"
    attention = _attention(modules, roles, config, layout)
    mla = _mla(modules, config) if attention is None else None
    experts = _experts(layer, modules, config)
    mlp = None if experts is not None else _mlp(modules, roles)
    parallel = bool(getattr(config, "use_parallel_residual", False) or getattr(config, "parallel_attn", False))
    if override and override.parallel_residual is not None:
        parallel = override.parallel_residual
    norms = _norms(modules, attention, mla)
    mixer = _mixer(layer, config, _claimed(attention, mlp, experts, norms, mla))
    return LayerRoles(
        index=index, attention=attention, mlp=mlp, experts=experts,
        norms=norms, parallel_residual=parallel, mixer=mixer, mla=mla,
    )


def _config_fields(config: Any, override: ArchOverride | None, layers: list[LayerRoles]) -> ConfigFields:
    num_layers = len(layers)
    fields = override.fields if override and override.fields else ConfigFields()
    if fields.kv_heads and getattr(config, fields.kv_heads, None) is None:
        fields = dataclasses.replace(fields, kv_heads=None)
    if fields.head_dim and getattr(config, fields.head_dim, None) is None:
        fields = dataclasses.replace(fields, head_dim=None)
    if fields.intermediate and not hasattr(config, fields.intermediate):
        fields = dataclasses.replace(fields, intermediate=None)  # GPT-NeoX-Japanese: hidden * a multiple
    lists = tuple(
        k for k, v in sorted(vars(config).items())
        if isinstance(v, (list, tuple)) and len(v) == num_layers and k not in ("architectures",)
    )
    return _moe_fields(config, dataclasses.replace(fields, per_layer_lists=lists), layers)


COUNT_FIELDS = ("n_routed_experts", "num_local_experts", "num_experts")


def _moe_fields(config: Any, fields: ConfigFields, layers: list[LayerRoles]) -> ConfigFields:
    """The MoE size fields a config states that no override named: the expert width
    (``moe_intermediate_size``), the routed-expert count and, for DeepSeek-style shared experts sized
    ``moe_intermediate_size * n_shared_experts``, that multiplier."""
    experts = [r.experts for r in layers if r.experts is not None]
    if not experts:
        return fields

    def stated(name: str) -> bool:
        value = getattr(config, name, None)
        return isinstance(value, int) and not isinstance(value, bool)

    changes: dict[str, Any] = {}
    if fields.moe_intermediate is None and stated("moe_intermediate_size"):
        changes["moe_intermediate"] = "moe_intermediate_size"
    if fields.num_experts is None:
        name = next((n for n in COUNT_FIELDS if stated(n)), None)
        if name is not None:
            changes["num_experts"] = name
    if (fields.shared_intermediate is None and fields.shared_count is None and stated("n_shared_experts")
            and not stated("shared_experts_intermediate_size")  # Dots3: its own base width, times the count
            and any(e.shared is not None for e in experts)):
        changes["shared_count"] = "n_shared_experts"
    return dataclasses.replace(fields, **changes) if changes else fields


def _inner_output_embeddings(model: nn.Module) -> nn.Module | None:
    """The output embeddings of a causal LM held whole inside ``model`` (Nemotron-H Omni keeps its
    ``language_model`` with its own ``lm_head`` and does not say so), or None."""
    for child in model.children():
        get = getattr(child, "get_output_embeddings", None)
        head = get() if callable(get) and child is not model else None
        if isinstance(head, nn.Module):
            return head
    return None


def _unread_experts(layer: nn.Module) -> str | None:
    """The raw matrices of an experts block no role reads (DBRX's ``w1`` / ``v1`` / ``w2``, each
    ``[experts * width, hidden]``), as ``path [shape]`` text; None when the layer has none."""
    found = [f"{name} {list(p.shape)}" for name, p in layer.named_parameters()
             if "expert" in name and p.dim() == 2 and not _is_projection(layer.get_submodule(_parent(name)))]
    return ", ".join(found) if found else None


def describe(model: nn.Module, override: ArchOverride | None = None) -> ModelArch:
    """Describe a loaded causal LM.

    Args:
        model: a transformers ``*ForCausalLM`` (any device, any dtype).
        override: corrections for architectures inference gets wrong; defaults to the built-in
            override of the model's ``model_type`` if any. With ``component="vision"`` the vision tower
            of a vision-language model is described instead of its decoder (:mod:`pare.arch.vision`).

    Raises:
        UnsupportedArchitectureError: naming what could not be inferred and how to override it.
    """
    if override is not None and override.component == "vision":
        from pare.arch.vision import describe_vision

        return describe_vision(model, override)
    config = text_config(model)
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if override is None:
        override = BUILTIN_OVERRIDES.get(model_type)
    layers_path = find_layers_path(model, override)
    layer_list = model.get_submodule(layers_path)
    assert isinstance(layer_list, nn.ModuleList)
    layers = [describe_layer(layer, i, config, override) for i, layer in enumerate(layer_list)]
    missing = []
    # an unknown block describes nothing
    known = [(r.mixer is not None and r.mixer.kind != "other") or r.mla is not None for r in layers]
    if all(r.attention is None and not k for r, k in zip(layers, known, strict=True)):
        missing.append("attention projections (q/k/v or fused qkv, and the output projection), or a "
                       "state-space / linear-attention mixer")
    if all(r.mlp is None and r.experts is None and not k for r, k in zip(layers, known, strict=True)):
        missing.append("MLP projections (gate/up or fc1, and down or fc2) or MoE experts")
    get_in: Any = model.get_input_embeddings
    get_out: Any = model.get_output_embeddings
    embed = get_in()
    head = get_out() or _inner_output_embeddings(model)
    named = dict(model.named_modules())
    names = {id(m): n for n, m in named.items()}
    embed_path = _module_name(names, embed)
    lm_head_path = _module_name(names, head)
    if embed_path is None:
        missing.append("input embeddings")
    if lm_head_path is None:
        missing.append("lm_head (output embeddings)")
    unread = _unread_experts(layer_list[0]) if any("MLP" in m for m in missing) else None
    if unread is not None:
        raise UnsupportedArchitectureError(
            f"pare cannot describe {type(model).__name__} (model_type={model_type!r}): its experts are stored as "
            f"{unread}, not the fused 3-D parameters pare reads ([experts, 2 x width, hidden] gate_up and "
            "[experts, hidden, width] down, Mixtral's layout in transformers 5), and an override cannot rename "
            "them, so weight sparsity, depth and width are refused for this family")
    if missing:
        found = sorted(n for n, m in layer_list[0].named_modules() if n and _is_projection(m))
        raise UnsupportedArchitectureError(
            f"pare cannot describe {type(model).__name__} (model_type={model_type!r}): could not infer "
            f"{'; '.join(missing)}. Projections found in layer 0: {found}. Supported families are "
            "llama, mistral, qwen2, qwen3, gemma2/3, phi3, gpt_neox, gpt2, opt, mixtral, qwen2_moe, "
            "qwen3_moe and look-alikes. Add an override naming the modules, e.g. "
            "ArchOverride(names={'q': 'attn.wq', 'k': 'attn.wk', 'v': 'attn.wv', 'o': 'attn.wo', "
            "'up': 'ffn.w1', 'down': 'ffn.w2'}) passed to pare.arch.describe(model, override=...), "
            "or the same mapping under `names:` in a YAML file given to --arch-override."
        )
    base_prefix = getattr(model, "base_model_prefix", "")
    base_path = base_prefix if base_prefix and _has(model, base_prefix) else ""
    final_norm = None
    parent = _parent(layers_path)
    for name in FINAL_NORM_NAMES:
        candidate = f"{parent}.{name}" if parent else name
        if _has(model, candidate):
            final_norm = candidate
            break
    tied = head is not None and embed is not None and head.weight is embed.weight
    extra = tuple(
        n for n, m in named.items()
        if isinstance(m, nn.Embedding) and n != embed_path and not n.startswith(layers_path)
    )
    arch = ModelArch(
        model_type=model_type,
        base_path=base_path,
        layers_path=layers_path,
        embed_path=embed_path or "",
        final_norm_path=final_norm,
        lm_head_path=lm_head_path or "",
        tied=tied,
        fields=_config_fields(config, override, layers),
        layers=layers,
        extra_embeddings=extra,
    )
    log.debug("described %s: %d layers at %s", model_type, len(layers), layers_path)
    return arch
