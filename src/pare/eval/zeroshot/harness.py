"""``pare eval --lm-eval``: a thin pass-through to ``lm_eval.simple_evaluate`` with an already-loaded model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from pare.errors import ConfigError


def run_lm_eval(model: nn.Module, tokenizer: Any, tasks: Sequence[str] | str, *, limit: int | None = None,
                batch_size: int = 16, **kwargs: Any) -> dict[str, Any]:
    """Run lm-evaluation-harness tasks on ``model`` (wrapped in its ``HFLM``) and return its ``results`` dict.

    Args:
        tasks: any task names the installed harness knows (a comma-separated string or a sequence).
        limit: the harness's ``limit`` (first N documents per task).
        batch_size: the harness's batch size.
        **kwargs: passed to ``lm_eval.simple_evaluate``.

    Raises:
        ConfigError: lm-eval is not installed, no task given, or a bad limit.
    """
    if tokenizer is None:
        raise ConfigError("--lm-eval needs the model's tokenizer")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive integer (the first N documents of each task), got {limit!r}")
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise ConfigError("--lm-eval needs at least one lm-evaluation-harness task name")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise ConfigError("--lm-eval needs lm-evaluation-harness: pip install 'pare[lm-eval]' "
                          f"(import failed: {exc}); pare's own --tasks needs nothing extra") from exc
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit, **kwargs)
    return {"results": out.get("results", {}) if out else {}, "versions": dict(out.get("versions", {})) if out else {}}
