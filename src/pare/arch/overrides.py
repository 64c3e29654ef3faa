"""Short per-family corrections where inference from the model alone is wrong or ambiguous.

An override never copies a forward: it only names modules, layouts and config fields. To add an
architecture that inference cannot handle, pass an :class:`ArchOverride` to
:func:`pare.arch.describe` (or ``--arch-override file.yaml`` on the CLI).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from pare.arch.roles import COMPONENTS, ConfigFields, QkvLayout
from pare.errors import ConfigError


@dataclass(frozen=True)
class ArchOverride:
    """Corrections to the inferred description (every field optional).

    Attributes:
        layers_path: dotted path of the decoder ``ModuleList`` (``"model.decoder.layers"``).
        names: role -> module name inside a layer (leaf name or dotted relative path), for roles
            ``q k v qkv o gate up gate_up down``.
        qkv_layout: layout of a fused q/k/v projection.
        fields: config field names for each size.
        parallel_residual: attention and MLP read the same input (GPT-NeoX, GPT-J).
        component: which part of a vision-language model the description covers: ``text`` (the
            decoder, the default) or ``vision`` (the vision tower's encoder layers; see
            :mod:`pare.arch.vision`). It travels with the override into the manifest, so
            ``pare.load`` replays a vision cut on the vision tower.
    """

    layers_path: str | None = None
    names: dict[str, str] = field(default_factory=dict)
    qkv_layout: QkvLayout | None = None
    fields: ConfigFields | None = None
    parallel_residual: bool | None = None
    component: str | None = None

    def __post_init__(self) -> None:
        if self.component is not None and self.component not in COMPONENTS:
            raise ConfigError(f"component must be one of {list(COMPONENTS)}, got {self.component!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict that :meth:`from_dict` reads back (recorded in the manifest)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["names"] = dict(self.names)
        out["fields"] = None if self.fields is None else asdict(self.fields)
        return {k: v for k, v in out.items() if v is not None and v != {}}

    @classmethod
    def from_dict(cls, data: dict) -> ArchOverride:
        data = dict(data)
        if "fields" in data and isinstance(data["fields"], dict):
            values = dict(data["fields"])
            if isinstance(values.get("per_layer_lists"), list):
                values["per_layer_lists"] = tuple(values["per_layer_lists"])
            data["fields"] = ConfigFields(**values)
        return cls(**data)


def with_component(override: ArchOverride | None, component: str | None) -> ArchOverride | None:
    """``override`` describing ``component`` (``text`` or ``vision``); ``override`` itself when None."""
    if component is None:
        return override
    if component not in COMPONENTS:
        raise ConfigError(f"component must be one of {list(COMPONENTS)}, got {component!r}")
    return ArchOverride(component=component) if override is None else replace(override, component=component)


_NO_GQA = ConfigFields(kv_heads=None, head_dim=None)

BUILTIN_OVERRIDES: dict[str, ArchOverride] = {
    # GPT-2: Conv1D weights, fused concat c_attn, c_proj is both attention-out and MLP-down.
    "gpt2": ArchOverride(
        names={"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
        qkv_layout="concat",
        fields=ConfigFields(intermediate="n_inner", kv_heads=None, head_dim=None),
    ),
    # GPT-NeoX / Pythia: query_key_value interleaves [q_h; k_h; v_h] per head.
    "gpt_neox": ArchOverride(qkv_layout="per_head", fields=_NO_GQA),
    # OPT: fc1/fc2 sit directly in the layer; ffn_dim is the MLP width.
    "opt": ArchOverride(fields=ConfigFields(intermediate="ffn_dim", kv_heads=None, head_dim=None)),
    "phi3": ArchOverride(qkv_layout="concat"),
    "mixtral": ArchOverride(fields=ConfigFields(num_experts="num_local_experts")),
    "qwen2_moe": ArchOverride(
        fields=ConfigFields(
            moe_intermediate="moe_intermediate_size",
            shared_intermediate="shared_expert_intermediate_size",
            num_experts="num_experts",
        )
    ),
    # LongCat-Flash: each layer holds two attention/MLP pairs; num_hidden_layers is derived as 2 * num_layers.
    "longcat_flash": ArchOverride(fields=ConfigFields(layers="num_layers")),
    # CTRL: the MLP is an nn.Sequential (Linear, ReLU, Linear) sized by dff.
    "ctrl": ArchOverride(
        names={"q": "multi_head_attention.Wq", "k": "multi_head_attention.Wk", "v": "multi_head_attention.Wv",
               "o": "multi_head_attention.dense", "up": "ffn.0", "down": "ffn.2"},
        fields=ConfigFields(intermediate="dff"),
    ),
    # ModernBERT decoder: Wi holds the [input; gate] halves of its GLU, Wo writes the stream.
    "modernbert-decoder": ArchOverride(names={"o": "attn.Wo", "gate_up": "mlp.Wi", "down": "mlp.Wo"}),
    # GIT: a BERT-style stack (post-norm layers, no _no_split_modules) beside its image encoder's layers.
    "git": ArchOverride(
        layers_path="git.encoder.layer",
        names={"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
               "o": "attention.output.dense", "up": "intermediate.dense", "down": "output.dense"},
    ),
    "qwen3_moe": ArchOverride(
        fields=ConfigFields(moe_intermediate="moe_intermediate_size", num_experts="num_experts")
    ),
}
