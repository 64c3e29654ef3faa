"""The architecture description: what each module of a causal LM *is*.

One :class:`ModelArch` per loaded model says where the decoder layers are and, for every layer, which
modules are the attention input/output projections, the MLP input/output projections, the norms,
the MoE experts and router, with head counts read from the actual weight shapes (so a model whose
layers were pruned non-uniformly is still described correctly). Every method works from this
description; none of them looks for module names itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

COMPONENTS = ("text", "vision")
"""The parts of a model pare can describe: the text decoder, or a vision-language model's vision tower."""

QkvLayout = Literal["concat", "per_head", "unknown"]
"""How a fused q/k/v projection stacks its outputs.

``concat``: rows ``[q (H*d); k (K*d); v (K*d)]`` (Phi-3, GPT-2). ``per_head``: rows grouped per head as
``[q_h; k_h; v_h]`` for h in heads (GPT-NeoX / Pythia). ``unknown``: a fused projection of a family
pare has no override for; head pruning refuses it until an ArchOverride says which (weight sparsity,
hidden-size and depth cuts do not depend on it).
"""


@dataclass(frozen=True)
class Proj:
    """A projection inside a decoder layer.

    Attributes:
        path: dotted path relative to the decoder layer (``"self_attn.q_proj"``).
        conv1d: True for GPT-2's ``Conv1D``, whose weight is stored ``[in, out]``.
    """

    path: str
    conv1d: bool = False


@dataclass(frozen=True)
class AttentionRoles:
    """The attention block of one layer.

    Either ``q``/``k``/``v`` or ``qkv`` (fused, with ``qkv_layout``) is set. ``o`` is the output
    projection. Counts are those of this layer.

    Per-head state a head cut must follow: ``gate`` is an output gate projection with one
    ``head_dim`` block per query head (AFMoE's ``gate_proj``: ``out * sigmoid(gate(x))``);
    ``q_gate`` says ``q`` stores ``[q_h; gate_h]`` per head (Qwen3-Next, ``2 * heads * head_dim``
    rows); ``sinks`` names a parameter of the attention block with one entry per query head
    (gpt-oss' attention sinks); ``q_norm``/``k_norm`` act per head_dim, or over the whole
    projection (OLMo 2). ``unknown`` lists other projections in the block, which make head cuts
    refused: pare does not know how they are laid out per head.
    """

    path: str
    o: Proj
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q: Proj | None = None
    k: Proj | None = None
    v: Proj | None = None
    qkv: Proj | None = None
    qkv_layout: QkvLayout = "concat"
    q_norm: str | None = None
    k_norm: str | None = None
    gate: Proj | None = None
    q_gate: bool = False
    sinks: str | None = None
    unknown: tuple[str, ...] = ()

    @property
    def inputs(self) -> tuple[Proj, ...]:
        """Projections that read the block's input (hidden size on their input side)."""
        if self.qkv is not None:
            return (self.qkv,)
        return tuple(p for p in (self.q, self.k, self.v, self.gate) if p is not None)

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for multi-head attention)."""
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class MLPRoles:
    """A dense MLP: ``down(act(gate(x)) * up(x))`` or ``down(act(up(x)))`` (fc1/fc2).

    ``gate_up`` is a fused ``[gate; up]`` projection (Phi-3). ``up`` alone is fc1 / c_fc / dense_h_to_4h.
    """

    path: str
    down: Proj
    up: Proj | None = None
    gate: Proj | None = None
    gate_up: Proj | None = None

    @property
    def inputs(self) -> tuple[Proj, ...]:
        if self.gate_up is not None:
            return (self.gate_up,)
        return tuple(p for p in (self.gate, self.up) if p is not None)

    @property
    def gated(self) -> bool:
        return self.gate is not None or self.gate_up is not None


@dataclass(frozen=True)
class ExpertsRoles:
    """MoE experts stored as fused 3-D parameters (transformers 5).

    ``gate_up`` is ``[E, 2I, H]`` (rows ``[gate; up]``) and ``down`` is ``[E, H, I]``; each expert's
    slice is an ``[out, in]`` matrix. ``router`` is the gate module; ``shared`` an always-on MLP.
    """

    path: str
    gate_up_param: str
    down_param: str
    num_experts: int
    intermediate: int
    router: str
    top_k: int
    shared: MLPRoles | None = None
    shared_gate: str | None = None


@dataclass(frozen=True)
class MLARoles:
    """Multi-head latent attention (DeepSeek-V2/V3 and look-alikes), one layer.

    Queries: ``q`` (``[H*(n+r), hidden]`` when ``q_lora_rank`` is None) or the low-rank pair
    ``q_b(q_a_norm(q_a(x)))`` (``q_a: [q_rank, hidden]``, ``q_b: [H*(n+r), q_rank]``). Keys and values:
    ``kv_a: [kv_rank + r, hidden]`` whose first ``kv_rank`` rows go through ``kv_a_norm`` into
    ``kv_b: [H*(n+v), kv_rank]`` (per head: ``n`` key rows without RoPE, then ``v`` value rows), and
    whose last ``r`` rows are one RoPE key shared by every head. ``o: [hidden, H*v]``.

    A head ``h`` is therefore rows ``h*(n+r) ... (h+1)*(n+r)`` of the query projection, rows
    ``h*(n+v) ... (h+1)*(n+v)`` of ``kv_b`` and columns ``h*v ... (h+1)*v`` of ``o``; removing it leaves
    the latents (``q_a``, ``kv_a``, the shared RoPE key) untouched. The latent ranks are not cut: each
    goes through an RMSNorm whose statistic is the mean over all its channels.

    Attributes:
        n, r, v: ``qk_nope_head_dim``, ``qk_rope_head_dim``, ``v_head_dim``.
    """

    path: str
    o: Proj
    kv_a: Proj
    kv_a_norm: str
    kv_b: Proj
    num_heads: int
    nope_dim: int
    rope_dim: int
    v_dim: int
    kv_rank: int
    q: Proj | None = None
    q_a: Proj | None = None
    q_a_norm: str | None = None
    q_b: Proj | None = None
    q_rank: int | None = None

    @property
    def inputs(self) -> tuple[Proj, ...]:
        """Projections that read the block's input (hidden size on their input side)."""
        first = self.q if self.q is not None else self.q_a
        return tuple(p for p in (first, self.kv_a) if p is not None)

    @property
    def query(self) -> Proj:
        """The projection whose rows are per-head queries (``q`` or ``q_b``)."""
        out = self.q if self.q is not None else self.q_b
        assert out is not None
        return out

    @property
    def norms(self) -> tuple[str, ...]:
        """The latent RMSNorms inside the block (never on the residual stream)."""
        return tuple(n for n in (self.q_a_norm, self.kv_a_norm) if n is not None)


MixerKind = Literal["state-space", "linear-attention", "convolution", "recurrent", "attention", "other"]
"""``attention``: an attention block whose heads pare does not describe (DeepSeek's MLA with low-rank q/kv)."""


@dataclass(frozen=True)
class MixerRoles:
    """A token mixer that is not softmax attention: a state-space block (Mamba, Mamba-2), linear or
    delta-rule attention (Qwen3-Next, Kimi-Linear), a gated short convolution (LFM2) or a recurrence.

    Its linears are prunable matrices like any other (weight sparsity applies), and the whole layer can
    be removed; its internal sizes are not cut: they are tied together inside one kernel (the SSM
    state, the convolution kernel, the in-projection's packed ``[z, x, B, C, dt]`` rows).

    Attributes:
        path: the block, relative to the decoder layer (``"mixer"``, ``"linear_attn"``).
        kind: what it is, from its class name.
        projections: its linears, relative to the decoder layer.
        fixed: sizes that cannot be cut, as ``"name=value"`` (``"ssm_state=16"``, ``"conv_kernel=4"``).
    """

    path: str
    kind: MixerKind
    projections: tuple[str, ...] = ()
    fixed: tuple[str, ...] = ()


@dataclass(frozen=True)
class LayerRoles:
    """The roles inside one decoder layer."""

    index: int
    attention: AttentionRoles | None
    mlp: MLPRoles | None
    experts: ExpertsRoles | None = None
    norms: tuple[str, ...] = ()
    parallel_residual: bool = False
    mixer: MixerRoles | None = None
    mla: MLARoles | None = None


@dataclass(frozen=True)
class ConfigFields:
    """Which config attributes describe each size (rewritten after a structural cut)."""

    hidden: str = "hidden_size"
    intermediate: str | None = "intermediate_size"
    heads: str = "num_attention_heads"
    kv_heads: str | None = "num_key_value_heads"
    head_dim: str | None = "head_dim"
    layers: str = "num_hidden_layers"
    max_positions: str | None = "max_position_embeddings"
    moe_intermediate: str | None = None
    shared_intermediate: str | None = None
    num_experts: str | None = None
    per_layer_lists: tuple[str, ...] = ()
    shared_count: str | None = None
    """A config field the shared expert's width is a multiple of the expert width by (DeepSeek's
    ``n_shared_experts``: shared width = ``moe_intermediate_size * n_shared_experts``)."""


@dataclass(frozen=True)
class VisionRoles:
    """What a vision tower's cut must respect, besides its encoder layers (see :mod:`pare.arch.vision`).

    Attributes:
        tower: dotted path of the vision tower (``model.vision_tower``, ``model.visual``).
        config_attr: the attribute of the model's config holding the tower's config (``vision_config``).
        inputs: ``images`` (the tower takes ``pixel_values [B, C, H, W]``) or ``patches`` (Qwen-VL: the
            images flattened into patch rows ``[B * P, C * T * p * p]`` with ``grid_thw``).
        channels, image_size, patch_size: what a calibration image must be (``image_size`` 0: any
            multiple of ``patch_size * merge_size``).
        temporal_patch_size, merge_size: Qwen-VL's frames per patch and patches merged per side.
        patch_embed: the patch embedding (a convolution whose output channels are the hidden size).
        position_table: a learned position-embedding table (rows: positions, columns: hidden), if any.
        index_fields: config fields that hold encoder-layer indexes something outside the layers reads
            (``vision_feature_layer``, ``deepstack_visual_indexes``, ``fullatt_block_indexes``), each as
            ``"vision_config.NAME"`` or ``"NAME"`` (the top-level config); a depth cut remaps them.
        not_cut: sizes pare does not cut in this tower, each with the reason (``pare inspect`` prints them,
            the width methods refuse with them).
    """

    tower: str
    config_attr: str
    inputs: Literal["images", "patches"]
    channels: int
    image_size: int
    patch_size: int
    temporal_patch_size: int = 1
    merge_size: int = 1
    patch_embed: str | None = None
    position_table: str | None = None
    index_fields: tuple[str, ...] = ()
    not_cut: tuple[str, ...] = ()


@dataclass
class ModelArch:
    """Where everything is in a causal LM. Build it with :func:`pare.arch.describe`."""

    model_type: str
    base_path: str
    layers_path: str
    embed_path: str
    final_norm_path: str | None
    lm_head_path: str
    tied: bool
    fields: ConfigFields
    layers: list[LayerRoles] = field(default_factory=list)
    extra_embeddings: tuple[str, ...] = ()
    vision: VisionRoles | None = None
    """Set when the description covers a vision tower (``component="vision"``) instead of the decoder."""

    @property
    def component(self) -> str:
        """``text`` or ``vision``: which part of the model :attr:`layers` are."""
        return "text" if self.vision is None else "vision"

    def config_of(self, config: Any) -> Any:
        """The part of ``config`` (a model's config, or a copy of it) that holds the described layers'
        sizes: the decoder's config, or the vision tower's (``config.vision_config``)."""
        if self.vision is not None:
            return getattr(config, self.vision.config_attr)
        from pare.arch.infer import decoder_config

        return decoder_config(config)

    def layer_modules(self, model: nn.Module) -> nn.ModuleList:
        mods = model.get_submodule(self.layers_path)
        assert isinstance(mods, nn.ModuleList)
        return mods

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}"

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def part_of(self, name: str) -> str:
        """Which part a parameter name belongs to: ``embeddings``, ``attention``, ``mlp``, ``experts``,
        ``norms``, ``lm_head`` or ``other``."""
        if name.startswith(self.embed_path + ".") or any(name.startswith(e + ".") for e in self.extra_embeddings):
            return "embeddings"
        if self.lm_head_path and name.startswith(self.lm_head_path + "."):
            return "lm_head"
        prefix = self.layers_path + "."
        if not name.startswith(prefix):
            return "norms" if self.final_norm_path and name.startswith(self.final_norm_path + ".") else "other"
        idx_str, _, rel = name[len(prefix):].partition(".")
        roles = self.layers[int(idx_str)]
        if roles.experts is not None and rel.startswith(roles.experts.path.rsplit(".", 1)[0] + "."):
            return "experts"
        if roles.attention is not None and rel.startswith(roles.attention.path + "."):
            return "attention"
        if roles.mla is not None and rel.startswith(roles.mla.path + "."):
            return "attention"
        if any(rel.startswith(n + ".") for n in roles.norms):
            return "norms"
        if roles.mlp is not None:
            mlp_paths = [p.path for p in (*roles.mlp.inputs, roles.mlp.down)]
            if roles.mlp.path:
                mlp_paths.append(roles.mlp.path)
            if any(rel.startswith(p + ".") for p in mlp_paths):
                return "mlp"
        return "other"

    def mixers(self) -> str | None:
        """A sentence naming the non-attention mixers and the sizes pare does not cut (None when the
        model has none): inspect prints it, and width methods refuse with it."""
        found = {(r.mixer.kind, r.mixer.path, r.mixer.fixed) for r in self.layers if r.mixer is not None}
        if not found:
            return None
        layers = [r.index for r in self.layers if r.mixer is not None]
        parts = [f"{kind} block {path!r}" + (f" (not cut: {', '.join(fixed)})" if fixed else "")
                 for kind, path, fixed in sorted(found)]
        return (f"layers {layers} hold {'; '.join(parts)}: their linears take weight sparsity and the layers can be "
                "removed, but their internal sizes (state, convolution kernel, latent ranks) are not cut")

    def latent_attention(self) -> str | None:
        """What a head is under multi-head latent attention and which of its sizes are not cut (None
        when the model has no MLA layer): inspect prints it."""
        mla = next((r.mla for r in self.layers if r.mla is not None), None)
        if mla is None:
            return None
        q = (f"{mla.q.path} rows" if mla.q is not None else
             f"{mla.q_b.path if mla.q_b else '?'} rows (after the q_lora_rank={mla.q_rank} latent)")
        return (f"multi-head latent attention: head h = its {mla.nope_dim}+{mla.rope_dim} {q}, its "
                f"{mla.nope_dim}+{mla.v_dim} {mla.kv_b.path} rows (key without RoPE, value) and its {mla.v_dim} "
                f"{mla.o.path} columns; heads can be cut (num_attention_heads rewritten). Not cut: the RoPE key "
                f"(the last {mla.rope_dim} rows of {mla.kv_a.path}) is one for all heads, and the latent ranks "
                f"kv_lora_rank={mla.kv_rank}" + (f", q_lora_rank={mla.q_rank}" if mla.q_rank else "")
                + f" each pass through an RMSNorm ({', '.join(mla.norms)}) whose statistic spans every latent "
                "channel, so removing channels would change what the kept ones compute")

    def nothing_to_cut(self, mlp: bool, attention: bool) -> str | None:
        """Why a width cut of the MLP (``mlp``) and / or attention heads (``attention``) asks for a part
        this model does not have (so the cut would silently do nothing there), or None."""
        has_mlp = any(r.mlp is not None or r.experts is not None for r in self.layers)
        has_att = any(r.attention is not None or r.mla is not None for r in self.layers)
        missing = [w for w, asked, has in (("MLP channels", mlp, has_mlp), ("attention heads", attention, has_att))
                   if asked and not has]
        if not missing:
            return None
        hint = self.mixers()
        return (f"this {self.model_type} model has no {' or '.join(missing)} pare can cut"
                + (f"; {hint}" if hint else "")
                + ". Cut only what it has, or use weight sparsity (wanda, sparsegpt, magnitude) or depth "
                "(shortgpt, angular)")

    def mlp_width(self, model: nn.Module, index: int) -> int:
        """The MLP intermediate width of layer ``index`` (the down projection's input width)."""
        mlp = self.layers[index].mlp
        if mlp is None:
            raise ValueError(f"layer {index} has no MLP block")
        layer = self.layer_modules(model)[index]
        return int(get_weight(layer.get_submodule(mlp.down.path), mlp.down).shape[1])


def get_weight(module: nn.Module, proj: Proj) -> torch.Tensor:
    """The ``[out, in]`` view of a projection's weight (a view: writing into it edits the model)."""
    w = weight_of(module)
    return w.t() if proj.conv1d else w


def weight_of(module: nn.Module) -> torch.Tensor:
    """A module's ``weight`` data, typed (``nn.Module.__getattr__`` is untyped)."""
    w = module.weight
    assert isinstance(w, torch.Tensor), f"{type(module).__name__} has no weight tensor"
    return w.data


def out_features(module: nn.Module, proj: Proj) -> int:
    return int(get_weight(module, proj).shape[0])


def in_features(module: nn.Module, proj: Proj) -> int:
    return int(get_weight(module, proj).shape[1])
