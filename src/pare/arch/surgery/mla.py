"""Head surgery for multi-head latent attention (MLA: DeepSeek-V2/V3 and the families that copy it).

Under MLA a head ``h`` owns rows ``h*(n+r) ... (h+1)*(n+r)`` of the query projection (``q_proj``, or
``q_b_proj`` after the ``q_lora_rank`` latent), rows ``h*(n+v) ... (h+1)*(n+v)`` of ``kv_b_proj`` (its key
part without RoPE, then its value) and columns ``h*v ... (h+1)*v`` of ``o_proj``; ``n``, ``r``, ``v`` are
``qk_nope_head_dim``, ``qk_rope_head_dim`` and ``v_head_dim``. Everything before those (``q_a_proj``,
``kv_a_proj_with_mqa`` with its RoPE key shared by all heads, the latent RMSNorms) belongs to no head
and is left as it is. transformers' MLA forward sizes its reshapes with ``-1`` heads, so only the
config's ``num_attention_heads`` (and ``num_key_value_heads``, which MLA keeps equal to it: the keys
are expanded per head by ``kv_b_proj``) has to follow.

The latent ranks (``q_lora_rank``, ``kv_lora_rank``) are not cut: each latent goes through an RMSNorm
whose statistic is the mean over all its channels, so removing channels changes what the kept ones
compute (unlike a head, whose removal leaves the other heads' outputs exactly as they were).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pare.arch.roles import MLARoles, ModelArch
from pare.arch.surgery.edits import Edit, Heads
from pare.errors import ConfigError

if TYPE_CHECKING:
    from pare.arch.overrides import ArchOverride


def _rows(heads: torch.Tensor, per_head: int) -> torch.Tensor:
    return (heads[:, None] * per_head + torch.arange(per_head, device=heads.device)).flatten()


def mla_head_rows(mla: MLARoles, heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query rows, ``kv_b`` rows, ``o`` columns) owned by query heads ``heads``."""
    return (_rows(heads, mla.nope_dim + mla.rope_dim), _rows(heads, mla.nope_dim + mla.v_dim),
            _rows(heads, mla.v_dim))


def prune_mla_heads(model: nn.Module, arch: ModelArch, layer_idx: int,
                    keep_heads: torch.Tensor | Sequence[int]) -> Heads:
    """Keep heads ``keep_heads`` (in that order) of one MLA layer.

    Slices the query projection's rows, ``kv_b_proj``'s rows and ``o_proj``'s columns of those heads
    and sets the block's ``num_heads``. Call :func:`pare.arch.surgery.width.sync_config` after cutting
    every layer to write ``num_attention_heads`` / ``num_key_value_heads``.

    Raises:
        ConfigError: the layer has no MLA block, or ``keep_heads`` is empty, repeats a head or names
            one out of range.

    Returns:
        The :class:`~pare.arch.surgery.edits.Heads` edit (KV heads equal to heads: MLA expands its
        keys and values per head).
    """
    from pare.arch.surgery.width import slice_in, slice_out

    layer: Any = arch.layer_modules(model)[layer_idx]
    mla = arch.layers[layer_idx].mla
    if mla is None:
        raise ConfigError(f"layer {layer_idx} has no multi-head latent attention block")
    idx = torch.as_tensor(keep_heads, dtype=torch.long).flatten()
    k = int(idx.numel())
    if k == 0 or len(set(idx.tolist())) != k or int(idx.min()) < 0 or int(idx.max()) >= mla.num_heads:
        raise ConfigError(f"layer {layer_idx}: keep_heads must list distinct heads in [0, {mla.num_heads}), got "
                          f"{idx.tolist()}")
    q_rows, kv_rows, o_cols = mla_head_rows(mla, idx)
    slice_out(layer.get_submodule(mla.query.path), False, q_rows)
    slice_out(layer.get_submodule(mla.kv_b.path), False, kv_rows)
    slice_in(layer.get_submodule(mla.o.path), False, o_cols)
    block = layer.get_submodule(mla.path) if mla.path else layer
    for name in ("num_heads", "num_attention_heads"):
        if isinstance(getattr(block, name, None), int):
            setattr(block, name, k)
    return Heads(layer_idx, k, k)


def mla_head_count(arch: ModelArch, ratio: float) -> int:
    """The heads every MLA layer keeps when ``ratio`` of them is removed (each head stands alone: any
    count from 1 to all works).

    Raises:
        ConfigError: ``ratio`` is not a whole number of heads, naming the ratios that are.
    """
    from pare.arch.surgery.width import head_count_for_ratio

    total = next(r.mla.num_heads for r in arch.layers if r.mla is not None)
    return head_count_for_ratio(total, total, ratio, "query")[0]


def cut_mla_heads_to(model: nn.Module, arch: ModelArch, layer_idx: int, heads: int) -> Heads | None:
    """Keep the first ``heads`` heads of one MLA layer (the shapes a cut leaves, for a replay); None
    when it already has that many."""
    mla = arch.layers[layer_idx].mla
    assert mla is not None
    if mla.num_heads == heads:
        return None
    return prune_mla_heads(model, arch, layer_idx, torch.arange(heads))


def _head_fields(cfg: Any, arch: ModelArch, heads: int) -> dict[str, int]:
    out = {arch.fields.heads: heads}
    kv = arch.fields.kv_heads or "num_key_value_heads"
    if isinstance(getattr(cfg, kv, None), int):
        out[kv] = heads
    return out


def mla_config_rejects(cfg: Any, arch: ModelArch, heads: int, hidden: int | None = None) -> str | None:
    """Why transformers would refuse ``cfg`` stating ``heads`` MLA heads (and hidden size ``hidden``), or
    None. DeepSeek's configs require the hidden size to be a multiple of the head count, though MLA's
    head width never depends on it."""
    data = {**cfg.to_dict(), **_head_fields(cfg, arch, heads)}
    if hidden is not None:
        data[arch.fields.hidden] = hidden
    try:
        type(cfg).from_dict(data)
    except Exception as exc:  # transformers' own validation: its message says why
        return str(exc).strip().splitlines()[-1].strip()
    return None


def sync_mla_config(cfg: Any, arch: ModelArch) -> bool:
    """Write the MLA head count into ``cfg`` (``num_attention_heads`` and an equal
    ``num_key_value_heads``) when every MLA layer has the same and the config accepts it; True when
    the config states the heads. Otherwise the config keeps its counts and ``pare.load`` replays the
    recorded :class:`Heads` edits."""
    counts = {r.mla.num_heads for r in arch.layers if r.mla is not None}
    if len(counts) != 1:
        return False
    heads = counts.pop()
    if getattr(cfg, arch.fields.heads, heads) == heads:
        return True
    if mla_config_rejects(cfg, arch, heads) is not None:
        return False
    for name, value in _head_fields(cfg, arch, heads).items():
        setattr(cfg, name, value)
    return True


def _replay_heads(model: nn.Module, edit: Heads, override: ArchOverride | None = None) -> None:
    """A :class:`Heads` edit of an MLA layer (any other goes to the width surgery's replay)."""
    from pare.arch import describe
    from pare.arch.surgery import width

    arch = describe(model, override)
    mla = arch.layers[edit.layer].mla
    if mla is None:
        width.REPLAY[Heads](model, edit, override)
        return
    if edit.num_heads > mla.num_heads:
        from pare.errors import PareError

        raise PareError(f"the saved config rebuilds layer {edit.layer}'s attention with {mla.num_heads} heads, "
                        f"fewer than the {edit.num_heads} the recorded edit keeps: the config and the edits do "
                        "not describe the pruned model")
    cut_mla_heads_to(model, arch, edit.layer, edit.num_heads)


REPLAY: dict[type[Edit], Callable[[nn.Module, Any, ArchOverride | None], None]] = {Heads: _replay_heads}

__all__ = [
    "REPLAY", "cut_mla_heads_to", "mla_config_rejects", "mla_head_count", "mla_head_rows", "prune_mla_heads",
    "sync_mla_config",
]
