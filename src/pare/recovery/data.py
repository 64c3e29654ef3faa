"""Training windows for recovery: a token stream cut into ``seqlen`` windows, the last few held out.

The stream is the documents of a named set's train split (or of a local file) concatenated as
:class:`pare.calibration.data._DocumentTokens` does, or the calibration windows themselves
(``data="calibration"``). Windows never overlap; the held-out windows come from the end of the
stream and never reach the optimizer. The order of the training windows is a seeded permutation
per epoch, so the batch of any step is a function of (seed, step) alone: a resumed run sees the
same batches as an uninterrupted one.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import torch

from pare.errors import ConfigError, NotEnoughDataError

log = logging.getLogger(__name__)

CALIBRATION = "calibration"
"""The ``data`` value that trains on the calibration windows the pipeline already holds."""

_SUFFIX = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000, "b": 1_000_000_000}


def parse_token_count(text: str) -> int:
    """``2M``, ``500k``, ``0.5M``, ``2e6`` or ``2000000`` as a number of tokens.

    Raises:
        ValueError: ``text`` is not a non-negative number with an optional k / M / G (B) suffix.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGbB]?)\s*", text)
    if not match:
        raise ValueError(f"must be a number of tokens such as 2000000, 2e6, 500K or 2M, got {text!r}")
    return round(float(match.group(1)) * _SUFFIX[match.group(2).lower()])


@dataclass
class Windows:
    """Token windows for training.

    Attributes:
        train: ``[N, L]`` training windows.
        heldout: ``[H, L]`` windows never trained on (``H`` may be 0).
        source: where the text came from (for the report).
    """

    train: torch.Tensor
    heldout: torch.Tensor
    source: str

    def batch(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        """The windows of optimizer step ``step``: ``[batch_size, L]``, epochs in seeded orders."""
        n = int(self.train.shape[0])
        rows = []
        for k in range(step * batch_size, (step + 1) * batch_size):
            epoch, pos = divmod(k, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            rows.append(int(order[pos]))
        return self.train[rows]


def stream_tokens(tokenizer: Any, source: str, max_tokens: int) -> list[int]:
    """At most ``max_tokens`` ids of ``source``'s train split, documents concatenated."""
    from pare.calibration.data import _DocumentTokens, load_documents

    if tokenizer is None:
        raise ConfigError(f"recovery on {source!r} needs the model's tokenizer (pass it, or use data='calibration')")
    docs = load_documents(source, "train")
    if not docs:
        raise NotEnoughDataError(f"{source!r} holds no documents to train on")
    return _DocumentTokens(tokenizer, docs).stream(max_tokens=max_tokens)


def cut_windows(ids: torch.Tensor, seqlen: int, heldout: int, source: str) -> Windows:
    """Non-overlapping ``seqlen`` windows of a flat id stream; the last ``heldout`` are held out
    (fewer when the stream is short: at most a tenth of the windows, at least one when any)."""
    flat = ids.reshape(-1).long()
    n = int(flat.numel()) // seqlen
    if n < 1:
        raise NotEnoughDataError(f"{source} holds {flat.numel()} tokens, fewer than one window of seqlen={seqlen}: "
                                 "use a smaller seqlen or more text")
    windows = flat[: n * seqlen].view(n, seqlen)
    held = min(heldout, n // 10) if heldout else 0
    if heldout and held == 0 and n >= 2:
        held = 1
    return Windows(train=windows[: n - held], heldout=windows[n - held:], source=source)


def training_windows(tokenizer: Any, source: str, seqlen: int, tokens: int, heldout: int,
                     calibration: torch.Tensor | None = None) -> Windows:
    """The windows for ``tokens`` training tokens of ``source`` plus ``heldout`` held-out windows.

    Text shorter than the budget gives fewer windows: the loop then runs several epochs over them
    (the report says how many).
    """
    if source == CALIBRATION:
        if calibration is None:
            raise ConfigError("data='calibration' trains on the calibration windows, and none were given: "
                              "name a data set (c4, wikitext2, tinystories, a .txt/.jsonl file) instead")
        return cut_windows(calibration.detach().clone(), seqlen, heldout, "calibration windows")
    ids = stream_tokens(tokenizer, source, tokens + (heldout + 1) * seqlen)
    return cut_windows(torch.tensor(ids, dtype=torch.long), seqlen, heldout, f"{source} (train split)")
