"""Width surgery: MLP channels, attention heads, hidden size (structured width pruning).

The only place that changes width shapes. Each function slices the weights (and biases) of every
module a cut touches, updates the module attributes transformers 5 reads in ``forward``
(``num_key_value_groups``, GPT-2 ``num_heads``/``split_size``, OPT ``num_heads``, MoE
``intermediate_dim``/``hidden_dim``, LayerNorm ``normalized_shape``) and returns a typed *edit*
(:mod:`pare.arch.surgery.edits`).
:func:`sync_config` then rewrites the config from the actual shapes and says whether the config
alone describes the model (``uniform``); otherwise ``pare.load`` replays the edits through
:data:`REPLAY` on a model freshly built from the saved config.

Hidden-size pruning and RMSNorm: RMSNorm divides by ``sqrt(mean_j x_j^2)`` over the channels it
sees, so over fewer channels the statistic changes (the mean is over H' channels instead of H).
:func:`prune_hidden` can multiply RMSNorm weights by ``rms_scale``: ``sqrt(H / H')`` is exact when the
removed channels carry no energy (the zero-channel invariant the tests check). On real models the
removed channels do carry energy and that scale over-amplifies (the README has the comparison), so
the default is 1.0 (no rescaling). LayerNorm (GPT-2, OPT, GPT-NeoX) also subtracts the mean, so no
scale makes it exact; it is never rescaled.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pare.arch.infer import text_config
from pare.arch.residual import StreamPort, stream_ports
from pare.arch.roles import AttentionRoles, LayerRoles, MLPRoles, ModelArch, Proj, get_weight
from pare.arch.surgery.edits import Edit, Heads, Hidden, MlpChannels
from pare.errors import ConfigError, PareError

ATTN_WIDTH_IS_HIDDEN = frozenset({"gpt2", "opt", "gpt_neox"})
"""Families whose attention reads ``head_dim = hidden_size // num_heads`` from the config, so a
head cut is only expressible in the config when ``heads * head_dim == hidden_size``."""

if TYPE_CHECKING:
    from pare.arch.overrides import ArchOverride


def attention_follows_hidden(model: nn.Module, arch: ModelArch) -> bool:
    """Whether this family sizes its attention from the hidden size even when the config states
    ``head_dim`` (Bloom's code) or cannot state it (Falcon's read-only property): a skeleton built on
    the meta device from the config with half the hidden size and the same ``head_dim`` tells."""
    from transformers import AutoModelForCausalLM

    first = next((r for r in arch.layers if r.attention is not None), None)
    if first is None:
        return False  # no q/k/v attention (state-space, latent attention): nothing sized by head_dim
    att = first.attention
    assert att is not None
    config: Any = copy.deepcopy(text_config(model))
    hidden = getattr(config, arch.fields.hidden)
    try:
        setattr(config, arch.fields.hidden, max(att.head_dim, hidden // 2))
        config.head_dim = att.head_dim
        with torch.device("meta"):
            built = AutoModelForCausalLM.from_config(config)
    except (AttributeError, ValueError, TypeError):
        return True  # the config cannot even say it
    proj = att.q or att.qkv
    assert proj is not None
    layer = arch.layer_modules(built)[first.index]
    before = get_weight(arch.layer_modules(model)[first.index].get_submodule(proj.path), proj).shape[0]
    return get_weight(layer.get_submodule(proj.path), proj).shape[0] != before


# --------------------------------------------------------------------------- primitive slicing
def _index(keep: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(keep, dtype=torch.long).to(device)


def _set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def slice_out(module: Any, proj_conv1d: bool, idx: torch.Tensor) -> None:
    """Keep output features ``idx`` of a Linear / Conv1D (weight rows, bias entries)."""
    w = module.weight.data
    idx = idx.to(w.device)
    _set_param(module, "weight", w[:, idx] if proj_conv1d else w[idx])
    if getattr(module, "bias", None) is not None:
        _set_param(module, "bias", module.bias.data[idx])
    if proj_conv1d:
        module.nf = len(idx)
    else:
        module.out_features = len(idx)


def slice_in(module: Any, proj_conv1d: bool, idx: torch.Tensor) -> None:
    """Keep input features ``idx`` of a Linear / Conv1D (weight columns)."""
    w = module.weight.data
    idx = idx.to(w.device)
    _set_param(module, "weight", w[idx] if proj_conv1d else w[:, idx])
    if proj_conv1d:
        module.nx = len(idx)
    else:
        module.in_features = len(idx)


def _sub(layer: nn.Module, proj: Proj | None) -> nn.Module | None:
    return None if proj is None else layer.get_submodule(proj.path)


# --------------------------------------------------------------------------- MLP channels
def _inner_norms(parent: nn.Module, width: int) -> list[nn.Module]:
    """Norms inside an MLP block that act on its intermediate channels (BitNet's ``ffn_sub_norm``)."""
    out = []
    for m in parent.children():
        weight = getattr(m, "weight", None)
        if "norm" in type(m).__name__.lower() and isinstance(weight, torch.Tensor) and weight.shape == (width,):
            out.append(m)
    return out


def _slice_channel_scales(block: nn.Module, width: int, keep: torch.Tensor) -> None:
    """Keep the kept channels of the MLP block's own per-channel vectors (Dory's ``suv_gate`` / ``suv_up``,
    which scale the gate and up outputs)."""
    for name, p in list(block.named_parameters(recurse=False)):
        if p.dim() == 1 and p.shape[0] == width:
            setattr(block, name, nn.Parameter(p.data[keep.to(p.device)].clone(), requires_grad=p.requires_grad))


def _check_plain_mlp(layer: Any, mlp: MLPRoles) -> None:
    """Refuse an MLP block holding linears besides its roles (Zamba2's per-layer LoRA adapters on a
    shared MLP): they read or write the intermediate channels in a way pare does not know."""
    if not mlp.path:
        return
    known = {p.path for p in (*mlp.inputs, mlp.down)}
    extra = [f"{mlp.path}.{n}" for n, m in layer.get_submodule(mlp.path).named_modules()
             if n and isinstance(m, nn.Linear) and f"{mlp.path}.{n}" not in known]
    if extra:
        raise ConfigError(f"the MLP block {mlp.path!r} also holds {extra[:3]} (adapters or other linears pare has "
                          "no rule for), so its channels cannot be cut; weight sparsity and depth work")


def _prune_dense_mlp(layer: Any, mlp: MLPRoles, keep: torch.Tensor) -> None:
    _check_plain_mlp(layer, mlp)
    down = layer.get_submodule(mlp.down.path)
    old = down.weight.shape[0] if mlp.down.conv1d else down.weight.shape[1]
    if mlp.path:  # an MLP directly in the layer shares it with the stream's norms
        for norm in _inner_norms(layer.get_submodule(mlp.path), int(old)):
            _slice_norm(norm, keep, 1.0)
        _slice_channel_scales(layer.get_submodule(mlp.path), int(old), keep)
    if mlp.gate_up is not None:
        fused = layer.get_submodule(mlp.gate_up.path)
        width = (fused.weight.shape[1] if mlp.gate_up.conv1d else fused.weight.shape[0]) // 2
        slice_out(fused, mlp.gate_up.conv1d, torch.cat([keep, keep + width]))
    for proj in (mlp.gate, mlp.up):
        if proj is None:
            continue
        module = layer.get_submodule(proj.path)
        rows = module.weight.shape[1] if proj.conv1d else module.weight.shape[0]
        if rows == 2 * old:  # fc1 holding [gate; up] halves, split in forward (Moshi's gating MLP)
            slice_out(module, proj.conv1d, torch.cat([keep, keep + old]))
        elif rows == old:
            slice_out(module, proj.conv1d, keep)
        else:
            raise ConfigError(f"{proj.path} has {rows} output channels for a down projection reading {old}: "
                              "pare does not know how they pair, so the MLP width cannot be cut")
    slice_in(down, mlp.down.conv1d, keep)
    parent = layer.get_submodule(mlp.path) if mlp.path else layer
    if hasattr(parent, "intermediate_size"):
        parent.intermediate_size = len(keep)


EXPERT_ALIGN_BYTES = 16
"""transformers' grouped-mm MoE kernel needs expert matrix strides that are multiples of 16 bytes."""


def check_expert_width(width: int, dtype: torch.dtype, what: str = "expert width") -> None:
    """Raise ConfigError unless ``width`` keeps fused expert strides 16-byte aligned."""
    elem = torch.empty((), dtype=dtype).element_size()
    if (width * elem) % EXPERT_ALIGN_BYTES:
        step = EXPERT_ALIGN_BYTES // math.gcd(EXPERT_ALIGN_BYTES, elem)
        raise ConfigError(
            f"{what} {width} is not a multiple of {step} for {dtype}: transformers' grouped-mm MoE kernel "
            f"needs 16-byte aligned strides; round it to {max(step, width - width % step)} or "
            f"{width - width % step + step}"
        )


def expert_alignment(dtype: torch.dtype) -> int:
    """Channel multiple that keeps fused expert parameters 16-byte aligned (4 in fp32, 8 in bf16)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return EXPERT_ALIGN_BYTES // math.gcd(EXPERT_ALIGN_BYTES, elem)


def _prune_experts(layer: Any, roles: LayerRoles, keep: torch.Tensor) -> None:
    ex = roles.experts
    assert ex is not None
    experts = layer.get_submodule(ex.path)
    gu = getattr(experts, ex.gate_up_param).data  # [E, 2I, H]
    dn = getattr(experts, ex.down_param).data  # [E, H, I]
    n_exp, two_i, hidden = gu.shape
    if dn.shape[1] != hidden or two_i != 2 * dn.shape[2]:
        raise ConfigError(
            f"{ex.path} stores its experts as {ex.gate_up_param} {list(gu.shape)} / {ex.down_param} "
            f"{list(dn.shape)}, not [experts, 2 x width, hidden] / [experts, hidden, width] (gpt-oss keeps them "
            "transposed with gate and up interleaved), so pare cannot cut their width; heads, depth and weight "
            "sparsity of the other linears work"
        )
    width = two_i // 2
    check_expert_width(int(keep.shape[-1]), gu.dtype)
    if keep.dim() == 1:
        keep = keep.unsqueeze(0).expand(dn.shape[0], -1)
    keep = keep.to(gu.device)
    _set_param(experts, ex.down_param, torch.gather(dn, 2, keep.unsqueeze(1).expand(-1, dn.shape[1], -1)))
    if n_exp > keep.shape[0]:  # LongCat's gate_up also holds rows of its zero experts, never read: cut alike
        keep = torch.cat([keep, keep[:1].expand(n_exp - keep.shape[0], -1)])
    rows = torch.cat([keep, keep + width], dim=1)
    _set_param(experts, ex.gate_up_param, torch.gather(gu, 1, rows.unsqueeze(-1).expand(-1, -1, hidden)))
    if hasattr(experts, "intermediate_dim"):
        experts.intermediate_dim = keep.shape[1]


def prune_mlp_channels(
    model: nn.Module, arch: ModelArch, layer_idx: int, keep: torch.Tensor | Sequence[int],
    shared_keep: torch.Tensor | Sequence[int] | None = None,
) -> MlpChannels:
    """Keep MLP intermediate channels ``keep`` of one layer.

    Dense MLP: rows of gate/up (fused ``gate_up`` rows ``[gate; up]``; fc1/``c_fc`` with bias) and
    columns of down (fc2/``c_proj``). MoE: the intermediate of every expert's fused 3-D parameters
    (``keep`` ``[k]`` for all experts or ``[E, k]`` per expert); ``shared_keep`` cuts the shared expert.

    Returns:
        The :class:`~pare.arch.surgery.edits.MlpChannels` edit (``shared_width`` None unless the
        shared expert was cut).
    """
    layer: Any = arch.layer_modules(model)[layer_idx]
    roles = arch.layers[layer_idx]
    device = next(layer.parameters()).device
    idx = _index(keep, device)
    shared_width = None
    if roles.experts is not None:
        _prune_experts(layer, roles, idx)
        if shared_keep is not None and roles.experts.shared is not None:
            s_idx = _index(shared_keep, device)
            _prune_dense_mlp(layer, roles.experts.shared, s_idx)
            shared_width = len(s_idx)
    elif roles.mlp is not None:
        _prune_dense_mlp(layer, roles.mlp, idx)
    else:
        raise ConfigError(f"layer {layer_idx} has no MLP to prune")
    return MlpChannels(layer_idx, int(idx.shape[-1]), shared_width)


# --------------------------------------------------------------------------- attention heads
def valid_head_counts(num_heads: int, num_kv_heads: int, mode: str) -> list[tuple[int, int]]:
    """``(heads, kv_heads)`` pairs reachable by pruning: ``query`` drops query heads evenly in
    every KV group (KV heads kept); ``kv`` drops whole KV groups (with their query heads)."""
    group = num_heads // num_kv_heads
    if num_kv_heads == num_heads:  # MHA: every head is its own group
        return [(h, h) for h in range(1, num_heads + 1)]
    if mode == "kv":
        return [(k * group, k) for k in range(1, num_kv_heads + 1)]
    return [(q * num_kv_heads, num_kv_heads) for q in range(1, group + 1)]


def head_count_for_ratio(num_heads: int, num_kv_heads: int, ratio: float, mode: str = "query") -> tuple[int, int]:
    """The ``(heads, kv_heads)`` that remove exactly ``ratio`` of the query heads.

    Raises:
        ConfigError: listing the nearest valid ratios when ``ratio`` cannot be realised
            (Qwen2-7B, 28 heads / 4 KV heads, ``query`` mode: only k/7).
    """
    options = valid_head_counts(num_heads, num_kv_heads, mode)
    for h, k in options:
        if abs((1 - h / num_heads) - ratio) < 1e-6:
            return h, k
    ratios = sorted({round(1 - h / num_heads, 4) for h, _ in options} | {0.0})
    nearest = sorted(ratios, key=lambda r: abs(r - ratio))[:3]
    other = "kv" if mode == "query" else "query"
    other_r = sorted({round(1 - h / num_heads, 4) for h, _ in valid_head_counts(num_heads, num_kv_heads, other)})
    raise ConfigError(
        f"removing a fraction {ratio} of the attention heads cannot be realised with {num_heads} query heads / "
        f"{num_kv_heads} KV heads "
        f"in '{mode}' mode (heads must stay a multiple of the KV heads); nearest valid ratios: {nearest} "
        f"(all: {ratios}); '{other}' mode allows {other_r}"
    )


def config_rejects_heads(model: nn.Module, arch: ModelArch, heads: int, kv_heads: int,
                         hidden: int | None = None) -> str | None:
    """Why transformers would refuse ``model``'s config holding ``heads`` / ``kv_heads`` attention heads
    (head_dim kept, as :func:`sync_config` writes them; ``hidden``: a new hidden size), or None when it
    accepts them. Llama and Gemma configs, for one, require the hidden size to be a multiple of the
    head count."""
    cfg: Any = arch.config_of(model.config)
    att = next((r.attention for r in arch.layers if r.attention is not None), None)
    if att is None or arch.model_type in ATTN_WIDTH_IS_HIDDEN:
        return None
    data = cfg.to_dict()
    data[arch.fields.heads or "num_attention_heads"] = heads
    if arch.fields.kv_heads or "num_key_value_heads" in data:
        data[arch.fields.kv_heads or "num_key_value_heads"] = kv_heads
    data["head_dim"] = att.head_dim
    if hidden is not None:
        data[arch.fields.hidden or "hidden_size"] = hidden
    try:
        type(cfg).from_dict(data)
    except Exception as exc:  # transformers' own validation: its message says why
        return str(exc).strip().splitlines()[-1].strip()
    return None


def _qkv_rows(att: AttentionRoles, q_heads: torch.Tensor, kv_heads: torch.Tensor) -> tuple[torch.Tensor, ...]:
    d = att.head_dim
    ar = torch.arange(d, device=q_heads.device)
    q_rows = (q_heads[:, None] * d + ar).flatten()
    kv_rows = (kv_heads[:, None] * d + ar).flatten()
    return q_rows, kv_rows


def _update_attention_attrs(attn: Any, heads: int, kv_heads: int, head_dim: int) -> None:
    if hasattr(attn, "num_key_value_groups"):
        attn.num_key_value_groups = heads // kv_heads
    for name, value in (("num_heads", heads), ("num_key_value_heads", kv_heads), ("num_attention_heads", heads)):
        if hasattr(attn, name):
            setattr(attn, name, value)
    if hasattr(attn, "split_size"):  # GPT-2 splits c_attn's output in three by this
        attn.split_size = heads * head_dim
    cfg = getattr(attn, "config", None)
    if cfg is not None and (getattr(cfg, "num_attention_heads", heads) != heads
                            or getattr(cfg, "num_key_value_heads", kv_heads) != kv_heads):
        # Phi-3's forward reads config.num_attention_heads: give this layer its own view of the counts.
        own = copy.copy(cfg)
        own.num_attention_heads = heads
        if hasattr(cfg, "num_key_value_heads"):
            own.num_key_value_heads = kv_heads
        attn.config = own


def prune_heads(
    model: nn.Module, arch: ModelArch, layer_idx: int,
    keep_query_heads: torch.Tensor | Sequence[int] | None = None,
    keep_kv_groups: torch.Tensor | Sequence[int] | None = None,
) -> Heads:
    """Keep query heads ``keep_query_heads`` (or whole KV groups ``keep_kv_groups``) of one layer.

    GQA stays valid: the KV heads kept are those with a kept query head, and every kept KV group
    must keep the same number of query heads. Separate q/k/v, fused concat qkv (Phi-3, GPT-2
    ``c_attn``) and per-head interleaved qkv (GPT-NeoX) are handled; so are per-head output gates and
    sinks, and q/k norms over the whole projection (see :class:`AttentionRoles`).

    Returns:
        The :class:`~pare.arch.surgery.edits.Heads` edit.
    """
    layer: Any = arch.layer_modules(model)[layer_idx]
    att = arch.layers[layer_idx].attention
    if att is None:
        raise ConfigError(f"layer {layer_idx} has no attention to prune")
    device = next(layer.parameters()).device
    if device.type == "meta":  # replay on a meta skeleton: the head indices are real data (slice_* move them)
        device = torch.device("cpu")
    group = att.num_heads // att.num_kv_heads
    if keep_kv_groups is not None:
        groups = _index(keep_kv_groups, device)
        q_heads = (groups[:, None] * group + torch.arange(group, device=device)).flatten()
    elif keep_query_heads is not None:
        q_heads = _index(keep_query_heads, device).sort().values
    else:
        raise ConfigError("prune_heads needs keep_query_heads or keep_kv_groups")
    kv_of = q_heads // group
    kv_heads, counts = torch.unique(kv_of, return_counts=True)
    if len(q_heads) == 0 or (counts != counts[0]).any():
        raise ConfigError(
            f"layer {layer_idx}: every kept KV group must keep the same number of query heads "
            f"(got {counts.tolist()} for groups {kv_heads.tolist()})"
        )
    # order query heads group by group so that head h' uses KV head h' // new_group
    q_heads = q_heads[torch.argsort(kv_of * att.num_heads + q_heads)]
    _slice_attention(layer, att, q_heads, kv_heads)
    heads, kv = len(q_heads), len(kv_heads)
    _update_attention_attrs(layer.get_submodule(att.path) if att.path else layer, heads, kv, att.head_dim)
    return Heads(layer_idx, heads, kv)


def check_fused_layout(att: AttentionRoles) -> None:
    """Refuse to cut heads out of a fused q/k/v projection whose row order pare does not know, or out
    of an attention block holding projections pare has no per-head rule for."""
    if att.unknown:
        raise ConfigError(
            f"the attention block {att.path!r} also holds {list(att.unknown)}, whose per-head layout pare does "
            "not know, so heads cannot be cut without breaking them; weight sparsity, depth and MLP width work"
        )
    if att.qkv is not None and att.qkv_layout == "unknown":
        raise ConfigError(
            f"the fused projection {att.qkv.path!r} stacks q/k/v in an order pare has no rule for on this "
            "architecture, so heads cannot be cut from it safely; weight sparsity and depth methods work. "
            "After reading the model's code, give qkv_layout ('concat': [Q; K; V], or 'per_head': [q_h; k_h; v_h] "
            "per head) in an --arch-override file"
        )


def _slice_attention(layer: Any, att: AttentionRoles, q_heads: torch.Tensor, kv_heads: torch.Tensor) -> None:
    check_fused_layout(att)
    d = att.head_dim
    q_rows, kv_rows = _qkv_rows(att, q_heads, kv_heads)
    if att.qkv is not None:
        fused = layer.get_submodule(att.qkv.path)
        if att.qkv_layout == "per_head":  # GPT-NeoX: [q_h; k_h; v_h] per head (MHA)
            ar = torch.arange(3 * d, device=q_heads.device)
            rows = (q_heads[:, None] * 3 * d + ar).flatten()
        else:
            hq, hk = att.num_heads * d, att.num_kv_heads * d
            rows = torch.cat([q_rows, hq + kv_rows, hq + hk + kv_rows])
        slice_out(fused, att.qkv.conv1d, rows)
    else:
        assert att.q is not None and att.k is not None and att.v is not None
        gated_rows = (q_heads[:, None] * 2 * d + torch.arange(2 * d, device=q_heads.device)).flatten()
        slice_out(layer.get_submodule(att.q.path), att.q.conv1d, gated_rows if att.q_gate else q_rows)
        slice_out(layer.get_submodule(att.k.path), att.k.conv1d, kv_rows)
        slice_out(layer.get_submodule(att.v.path), att.v.conv1d, kv_rows)
    slice_in(layer.get_submodule(att.o.path), att.o.conv1d, q_rows)
    _slice_per_head_state(layer, att, q_heads, q_rows, kv_rows)


def _slice_per_head_state(layer: Any, att: AttentionRoles, q_heads: torch.Tensor, q_rows: torch.Tensor,
                          kv_rows: torch.Tensor) -> None:
    """Output gate rows and sinks follow the kept query heads; a q/k norm over the whole projection
    (OLMo 2) keeps the kept heads' channels (one over head_dim is shared by every head)."""
    if att.gate is not None:
        slice_out(layer.get_submodule(att.gate.path), att.gate.conv1d, q_rows)
    if att.sinks is not None:
        owner, _, name = att.sinks.rpartition(".")
        block = layer.get_submodule(owner) if owner else layer
        _set_param(block, name, getattr(block, name).data[q_heads.to(getattr(block, name).device)])
    for norm_path, rows, heads in ((att.q_norm, q_rows, att.num_heads), (att.k_norm, kv_rows, att.num_kv_heads)):
        norm = layer.get_submodule(norm_path) if norm_path else None
        weight = getattr(norm, "weight", None)
        if weight is not None and heads > 1 and weight.numel() == heads * att.head_dim:
            _slice_norm(norm, rows, 1.0)


# --------------------------------------------------------------------------- hidden size
def _is_rms(module: nn.Module) -> bool:
    return "rmsnorm" in type(module).__name__.lower()


def _slice_norm(norm: Any, idx: torch.Tensor, rms_scale: float) -> None:
    if getattr(norm, "weight", None) is not None:
        w = norm.weight.data[idx.to(norm.weight.device)]
        if _is_rms(norm) and rms_scale != 1.0:
            # Gemma's RMSNorm multiplies by (1 + w); everyone else by w.
            offset = 1.0 if "gemma" in type(norm).__name__.lower() else 0.0
            w = (w + offset) * rms_scale - offset
        _set_param(norm, "weight", w)
    if getattr(norm, "bias", None) is not None:
        _set_param(norm, "bias", norm.bias.data[idx.to(norm.bias.device)])
    if hasattr(norm, "normalized_shape"):
        norm.normalized_shape = (len(idx),)


def _hidden_port(layer: Any, port: StreamPort, idx: torch.Tensor) -> None:
    """Keep hidden channels ``idx`` on the stream side of one reader or writer of the stream."""
    module = layer.get_submodule(port.path)
    if port.sort == "experts":
        value = getattr(module, port.param).data  # gate_up [E, 2I, H] reads, down [E, H, I] writes
        kept = value[:, :, idx.to(value.device)] if port.role == "reader" else value[:, idx.to(value.device), :]
        _set_param(module, port.param, kept)
    elif port.sort == "router":  # a Linear, or a module of its own holding a [E, H] weight
        _set_param(module, "weight", module.weight.data[:, idx.to(module.weight.device)])
        if isinstance(module, nn.Linear):
            module.in_features = len(idx)
    elif port.role == "writer":
        slice_out(module, port.proj is not None and port.proj.conv1d, idx)
    else:
        slice_in(module, port.proj is not None and port.proj.conv1d, idx)


def _hidden_layer(layer: Any, roles: LayerRoles, idx: torch.Tensor, rms_scale: float) -> None:
    for port in stream_ports(roles):
        _hidden_port(layer, port, idx)
    for name in roles.norms:
        _slice_norm(layer.get_submodule(name), idx, rms_scale)


def _described_blocks(roles: LayerRoles) -> list[str]:
    """Paths (inside the layer) of the modules the roles describe: blocks, projections and norms."""
    out = [p.path for p in stream_ports(roles)] + list(roles.norms)
    for block in (roles.attention, roles.mla, roles.mlp, roles.experts):
        if block is not None and block.path:
            out.append(block.path if block is not roles.experts else block.path.rpartition(".")[0] or block.path)
    return out


def hidden_cut_problem(model: nn.Module, arch: ModelArch) -> str | None:
    """Why :func:`prune_hidden` cannot cut this model's hidden size, or None: a matrix of a decoder
    layer sized by the hidden size outside every block the roles describe (a Mamba or recurrent mixer,
    a second attention), a router that keeps its matrix in a module of its own (``gate.wg``), or decoder
    layers outside the list pare describes (HRM's second stack)."""
    layers: Any = arch.layer_modules(model)
    embed: Any = model.get_submodule(arch.embed_path)
    hidden = int(embed.weight.shape[1])
    for roles in arch.layers:
        layer = layers[roles.index]
        blocks = tuple(f"{b}." for b in _described_blocks(roles))
        loose = [f"{name} {list(p.shape)}" for name, p in layer.named_parameters()
                 if not name.startswith(blocks) and hidden in p.shape and p.dim() > 1]
        loose += [f"{port.path} (no weight of its own)" for port in stream_ports(roles) if port.sort != "experts"
                  and not isinstance(getattr(layer.get_submodule(port.path), port.param, None), torch.Tensor)]
        if loose:
            return (f"layer {roles.index}'s {', '.join(loose[:3])} also read or write the hidden stream, and pare "
                    "has no rule to cut them with it")
    cls = type(layers[0])
    own = {id(m) for m in layers}
    others = [n for n, m in model.named_modules() if type(m) is cls and id(m) not in own]
    if others:
        return f"the model holds {len(others)} more {cls.__name__} layers outside {arch.layers_path} ({others[0]}...)"
    return None


def _sync_hidden_attrs(model: nn.Module, old: int, new: int) -> None:
    for module in model.modules():
        for name in ("hidden_size", "hidden_dim", "embed_dim", "embedding_dim"):
            if getattr(module, name, None) == old and not isinstance(getattr(type(module), name, None), property):
                setattr(module, name, new)


def prune_hidden(model: nn.Module, arch: ModelArch, keep: torch.Tensor | Sequence[int],
                 rms_scale: float = 1.0) -> Hidden:
    """Keep hidden (residual-stream) channels ``keep`` everywhere.

    Embeddings (token and learned positions), every norm's weight/bias, every input of
    q/k/v/qkv/gate/up/router/experts/shared expert, every output of o/down, the final norm and
    lm_head (re-tied when tied). RMSNorm weights are multiplied by ``rms_scale`` (default 1.0;
    ``sqrt(H/H')`` is exact for zero-energy channels, see the module docstring); Gemma's
    embedding scale becomes ``sqrt(H')`` to match what transformers computes on reload.

    Returns:
        The :class:`~pare.arch.surgery.edits.Hidden` edit.
    """
    embed: Any = model.get_submodule(arch.embed_path)
    old = int(embed.weight.shape[1])
    idx = _index(keep, embed.weight.device).sort().values
    new = len(idx)
    if getattr(model.get_submodule(arch.base_path) if arch.base_path else model, "project_in", None) is not None:
        raise ConfigError("hidden-size pruning of OPT with word_embed_proj_dim != hidden_size is not supported")
    layers: Any = arch.layer_modules(model)
    for roles in arch.layers:  # before anything is cut
        if roles.experts is not None:
            fused = getattr(layers[roles.index].get_submodule(roles.experts.path), roles.experts.gate_up_param)
            check_expert_width(new, fused.dtype, "hidden size (MoE)")
    scale = rms_scale
    head: Any = model.get_submodule(arch.lm_head_path)
    _set_param(embed, "weight", embed.weight.data[:, idx])
    for name in arch.extra_embeddings:
        pe: Any = model.get_submodule(name)
        _set_param(pe, "weight", pe.weight.data[:, idx.to(pe.weight.device)])
    if hasattr(embed, "embed_scale") and hasattr(embed, "scalar_embed_scale"):
        embed.scalar_embed_scale = new**0.5
        embed.embed_scale.fill_(new**0.5)
    for i, roles in enumerate(arch.layers):
        _hidden_layer(layers[i], roles, idx.to(next(layers[i].parameters()).device), scale)
    if arch.final_norm_path:
        _slice_norm(model.get_submodule(arch.final_norm_path), idx, scale)
    if arch.tied:
        head.weight = embed.weight
    else:
        slice_in(head, False, idx)
    if isinstance(head, nn.Linear):
        head.in_features = new
    _sync_hidden_attrs(model, old, new)
    return Hidden(new)


# --------------------------------------------------------------------------- config
def _field_set(config: Any, name: str | None, value: int) -> None:
    if not name:
        return
    derived = getattr(type(config), name, None)
    if isinstance(derived, property) and derived.fset is None:
        return  # computed from other fields (Falcon's head_dim): nothing to write
    setattr(config, name, value)


def size_fields(arch: ModelArch) -> tuple[str, ...]:
    """The config fields :func:`sync_config` may rewrite (sizes of the hidden stream, MLPs, experts and
    attention), so a caller can put them back when the config cannot state the cut model."""
    f = arch.fields
    names = (f.hidden, f.intermediate, f.moe_intermediate, f.shared_intermediate, f.heads,
             f.kv_heads or "num_key_value_heads", "head_dim", "word_embed_proj_dim")
    return tuple(dict.fromkeys(n for n in names if n))


def _uniform(values: list[int]) -> int | None:
    return values[0] if values and all(v == values[0] for v in values) else None


def sync_config(model: nn.Module, arch: ModelArch) -> bool:
    """Rewrite the config from the model's actual shapes; True when the config alone describes them.

    Updates ``hidden_size``, the intermediate field (``intermediate_size``/``ffn_dim``/``n_inner``),
    ``moe_intermediate_size`` / shared-expert width, ``num_attention_heads``,
    ``num_key_value_heads`` and an explicit ``head_dim`` when every layer agrees. ``arch`` must
    describe the model *after* the surgery (call :func:`pare.arch.describe` again).
    """
    if arch.vision is not None:
        from pare.arch.surgery.vision import sync_vision_config

        return sync_vision_config(model, arch)
    cfg: Any = arch.config_of(model.config)
    f = arch.fields
    uniform = True
    hidden = int(model.get_input_embeddings().weight.shape[1])  # type: ignore[operator]
    _field_set(cfg, f.hidden, hidden)
    if arch.model_type == "opt" and hasattr(cfg, "word_embed_proj_dim"):
        cfg.word_embed_proj_dim = hidden
    layers: Any = arch.layer_modules(model)
    dense = [_mlp_width(layers[r.index], r.mlp) for r in arch.layers if r.mlp is not None]
    moe = [r.experts.intermediate for r in arch.layers if r.experts is not None]
    shared = [_mlp_width(layers[r.index], r.experts.shared) for r in arch.layers
              if r.experts is not None and r.experts.shared is not None]
    shared_ok = _shared_follows_experts(cfg, f.shared_count, moe, shared)
    for values, name in ((dense, f.intermediate), (moe, f.moe_intermediate or f.intermediate),
                         (shared, None if f.shared_count else f.shared_intermediate)):
        if values and f.shared_count and values is not dense and not shared_ok:
            uniform = False  # keep the stated (wider) expert width: pare.load cuts both from it
        elif values and values is shared and f.shared_count:
            pass  # stated by the expert width times the multiplier
        elif values and values is dense and name and _per_layer(cfg, name, arch, dense):
            pass  # a per-layer list (Gemma 3n's intermediate_size) states every layer's width
        elif values:
            width = _uniform(values)
            if width is None or not name:
                uniform = False
            else:
                _field_set(cfg, name, width)
    if any(r.mla is not None for r in arch.layers):
        from pare.arch.surgery.mla import sync_mla_config

        return sync_mla_config(cfg, arch) and uniform
    atts = [r.attention for r in arch.layers if r.attention is not None]
    heads, kv = _uniform([a.num_heads for a in atts]), _uniform([a.num_kv_heads for a in atts])
    head_dim = atts[0].head_dim if atts else None
    if head_dim is not None and arch.model_type not in ATTN_WIDTH_IS_HIDDEN:
        _field_set(cfg, "head_dim", head_dim)  # explicit: hidden // heads may no longer give it
    if heads is None or kv is None or head_dim is None:
        return False
    if arch.model_type in ATTN_WIDTH_IS_HIDDEN:
        if heads * head_dim != hidden:
            return False  # head_dim would be re-derived as hidden // heads: keep the old counts, replay
        _field_set(cfg, f.heads, heads)
    else:
        _field_set(cfg, f.heads, heads)
        if f.kv_heads or hasattr(cfg, "num_key_value_heads"):
            _field_set(cfg, f.kv_heads or "num_key_value_heads", kv)
    return uniform


def _per_layer(cfg: Any, name: str, arch: ModelArch, widths: list[int]) -> bool:
    """Write ``widths`` into a per-layer list field (one entry per layer, every layer a dense MLP);
    False when the field is a single number."""
    current = getattr(cfg, name, None)
    if not isinstance(current, list) or len(current) != arch.num_layers or len(widths) != arch.num_layers:
        return False
    setattr(cfg, name, list(widths))
    return True


def _shared_follows_experts(cfg: Any, count: str | None, moe: list[int], shared: list[int]) -> bool:
    """Whether a shared expert sized ``expert width * cfg.<count>`` (DeepSeek's ``n_shared_experts``) is
    still that after a cut, in every layer (so writing the expert width states both)."""
    if not count:
        return True
    if _uniform(moe) is None:
        return False
    multiple = getattr(cfg, count, None)
    return isinstance(multiple, int) and all(w == moe[0] * multiple for w in shared)


def pin_derived_widths(model: nn.Module, arch: ModelArch) -> None:
    """Write an MLP width the config leaves to a default (GPT-2's ``n_inner=None`` means 4 x hidden) as
    the number it stands for, before any cut: a later hidden-size cut would otherwise change it."""
    cfg: Any = arch.config_of(model.config)
    name = arch.fields.intermediate
    if not name or not hasattr(cfg, name) or getattr(cfg, name) is not None:
        return
    layers: Any = arch.layer_modules(model)
    width = _uniform([_mlp_width(layers[r.index], r.mlp) for r in arch.layers if r.mlp is not None])
    if width is not None:
        _field_set(cfg, name, width)


def _mlp_width(layer: Any, mlp: MLPRoles | None) -> int:
    assert mlp is not None
    down = layer.get_submodule(mlp.down.path)
    return int(down.weight.shape[0] if mlp.down.conv1d else down.weight.shape[1])


# --------------------------------------------------------------------------- replay
def _check_fits(what: str, wanted: int, built: int) -> None:
    """A replayed edit keeps the first ``wanted`` of ``built`` channels: it must not ask for more (on
    the meta device an index past the end would not even fail)."""
    if wanted > built:
        raise PareError(f"the saved config rebuilds {what} as {built}, fewer than the {wanted} the recorded edit "
                        "keeps: the config and the edits do not describe the pruned model")


BIAS_FLAGS = {"mlp": "mlp_bias", "attention": "attention_bias"}
"""The config flag that makes transformers build the biases of each block's projections."""


def enable_bias(model: nn.Module, arch: ModelArch, kind: str) -> bool:
    """Make every projection governed by ``mlp_bias``/``attention_bias`` carry a (zero) bias and set
    the flag, so transformers rebuilds the biases on reload. False when the family has no flag."""
    flag = BIAS_FLAGS[kind]
    cfg: Any = arch.config_of(model.config)
    if not hasattr(cfg, flag):
        return False
    governed = _biased_by_flag(model, arch, flag)
    layers = arch.layer_modules(model)
    for i, roles in enumerate(arch.layers):
        for port in stream_ports(roles):  # the block's projections: its readers and its writer of the stream
            if port.block != kind or port.proj is None:
                continue
            if governed is not None and f"{i}.{port.path}" not in governed:
                continue  # the flag does not give it a bias (DeepSeek's q_proj): FLAP leaves it as it is
            m: Any = layers[i].get_submodule(port.path)
            if getattr(m, "bias", None) is None:
                w = get_weight(m, port.proj)
                m.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    for path in governed or ():  # other linears the flag gives a bias (DeepSeek's shared experts: mlp_bias)
        m = layers.get_submodule(path)
        if isinstance(m, nn.Linear) and m.bias is None:
            m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device))
    setattr(cfg, flag, True)
    return True


def _biased_by_flag(model: nn.Module, arch: ModelArch, flag: str) -> set[str] | None:
    """The linears (``"<layer>.<path>"``) that gain a bias when the config's ``flag`` is set, read from a
    model built on the meta device with it; None when that model cannot be built."""
    full: Any = copy.deepcopy(model.config)
    setattr(arch.config_of(full), flag, True)
    try:
        with torch.device("meta"):
            built = type(model)(full)
    except Exception:  # any failure: fall back to the roles' projections
        return None
    have = dict(arch.layer_modules(model).named_modules())
    out: set[str] = set()
    for name, m in built.get_submodule(arch.layers_path).named_modules():
        mine = have.get(name)
        if isinstance(m, nn.Linear) and m.bias is not None and isinstance(mine, nn.Linear) and mine.bias is None:
            out.add(name)
    return out


def _replay_mlp(model: nn.Module, edit: MlpChannels, override: ArchOverride | None = None) -> None:
    from pare.arch import describe

    arch = describe(model, override)
    i = edit.layer
    roles = arch.layers[i]
    layer: Any = arch.layer_modules(model)[i]
    current = roles.experts.intermediate if roles.experts is not None else _mlp_width(layer, roles.mlp)
    shared = edit.shared_width
    keep = torch.arange(edit.width)
    _check_fits(f"layer {i}'s MLP width", len(keep), current)
    if roles.experts is not None and roles.experts.shared is not None and shared is not None:
        _check_fits(f"layer {i}'s shared-expert width", int(shared), _mlp_width(layer, roles.experts.shared))
    if current == len(keep) and shared is None:
        return
    cut_mlp_to(model, arch, i, edit.width, shared)


def cut_heads_to(model: nn.Module, arch: ModelArch, layer_idx: int, heads: int, kv_heads: int) -> Heads | None:
    """Keep ``heads`` query heads in ``kv_heads`` KV groups of one layer, the first ones of each (the
    shapes a cut to these counts leaves, for a replay before loading weights or a preview); None when
    the layer already has them."""
    att = arch.layers[layer_idx].attention
    assert att is not None
    if att.num_heads == heads and att.num_kv_heads == kv_heads:
        return None
    group = att.num_heads // att.num_kv_heads
    keep = (torch.arange(kv_heads)[:, None] * group + torch.arange(heads // kv_heads)).flatten()
    return prune_heads(model, arch, layer_idx, keep_query_heads=keep)


def cut_mlp_to(model: nn.Module, arch: ModelArch, layer_idx: int, width: int,
               shared_width: int | None = None) -> MlpChannels:
    """Keep the first ``width`` MLP channels of one layer (and ``shared_width`` of its shared expert)."""
    return prune_mlp_channels(model, arch, layer_idx, torch.arange(width),
                              None if shared_width is None else torch.arange(shared_width))


def _replay_heads(model: nn.Module, edit: Heads, override: ArchOverride | None = None) -> None:
    from pare.arch import describe

    arch = describe(model, override)
    i = edit.layer
    att = arch.layers[i].attention
    assert att is not None
    _check_fits(f"layer {i}'s attention heads", edit.num_heads, att.num_heads)
    _check_fits(f"layer {i}'s KV heads", edit.num_kv_heads, att.num_kv_heads)
    cut_heads_to(model, arch, i, edit.num_heads, edit.num_kv_heads)


def _replay_hidden(model: nn.Module, edit: Hidden, override: ArchOverride | None = None) -> None:
    from pare.arch import describe

    arch = describe(model, override)
    width = edit.width
    embed: Any = model.get_submodule(arch.embed_path)
    _check_fits("the hidden size", width, int(embed.weight.shape[1]))
    if int(embed.weight.shape[1]) != width:
        prune_hidden(model, arch, torch.arange(width), rms_scale=1.0)


REPLAY: dict[type[Edit], Callable[[nn.Module, Any, ArchOverride | None], None]] = {
    MlpChannels: _replay_mlp,
    Heads: _replay_heads,
    Hidden: _replay_hidden,
}

__all__ = [
    "ATTN_WIDTH_IS_HIDDEN",
    "BIAS_FLAGS",
    "REPLAY",
    "check_expert_width",
    "cut_heads_to",
    "cut_mlp_to",
    "enable_bias",
    "expert_alignment",
    "head_count_for_ratio",
    "hidden_cut_problem",
    "pin_derived_widths",
    "prune_heads",
    "prune_hidden",
    "prune_mlp_channels",
    "size_fields",
    "slice_in",
    "slice_out",
    "sync_config",
    "valid_head_counts",
]
