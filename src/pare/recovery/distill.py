"""Distillation from the unpruned model: logit KL at a temperature, optionally hidden-state MSE.

Hinton et al. (2015): ``L = T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`` per token, averaged
over tokens; the ``T^2`` keeps gradient sizes comparable across temperatures. The teacher's logits
are computed for each batch as it comes and dropped after the step, never held for the data set.
With ``hidden_weight > 0`` the student's hidden state after each of its layers is pulled towards
the teacher's after the layer it was kept from (Sheared-LLaMA / Minitron style), when the widths
match.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pare.errors import ConfigError

SAME_VOCAB = ("distillation compares the two models' next-token distributions token by token, so the teacher must be "
              "the unpruned model (same tokenizer); pass that with --teacher")


def logit_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(p_t || p_s)`` averaged over tokens; logits ``[B, L, V]``. Zero for equal logits."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = F.kl_div(s.flatten(0, -2), t.flatten(0, -2), log_target=True, reduction="batchmean")
    return kl * temperature**2


def hidden_mse(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], kept: Sequence[int]) -> torch.Tensor:
    """Mean of ``MSE(h_s[i], h_t[kept[i]])`` over the student's layers (``h[i]``: output of layer i)."""
    losses = [F.mse_loss(s.float(), teacher[k].float()) for s, k in zip(student, kept, strict=True)]
    return torch.stack(losses).mean()


def vocab_size(model: nn.Module) -> int:
    """Rows of the output head (what the logits index)."""
    head: Any = model.get_output_embeddings()  # type: ignore[operator]
    return int(head.weight.shape[0])


def check_teacher(student: nn.Module, teacher: nn.Module, where: str) -> None:
    """Raise ConfigError unless the teacher's logits index the same vocabulary as the student's."""
    vs, vt = vocab_size(student), vocab_size(teacher)
    if vs != vt:
        raise ConfigError(f"the teacher {where} has a vocabulary of {vt} tokens, the pruned model {vs}: {SAME_VOCAB}")


def kept_layers(num_teacher: int, edits: Sequence[Any]) -> list[int]:
    """For each layer of the student, the teacher layer it was kept from, replaying ``remove_layers``
    edits in order (indices of each edit are those of the model at its time). An edit is a typed
    :mod:`pare.arch.surgery` edit or its manifest dict."""
    current = list(range(num_teacher))
    for edit in edits:
        op = edit.get("op") if isinstance(edit, dict) else getattr(edit, "op", None)
        if op == "remove_layers":
            kept = edit["kept"] if isinstance(edit, dict) else edit.kept
            current = [current[i] for i in kept]
    return current


def load_teacher(path: str, dtype: torch.dtype | None, device: torch.device) -> nn.Module:
    """The teacher model from a directory or hub id (a pare directory rebuilds its shapes), frozen."""
    from pathlib import Path

    from pare.errors import PareError

    try:
        if Path(path).is_dir():
            from pare.io.load import load

            teacher: nn.Module = load(path, dtype=dtype)
        else:
            from transformers import AutoModelForCausalLM

            teacher = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
    except PareError:
        raise
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the teacher {path!r}: {exc}") from exc
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
