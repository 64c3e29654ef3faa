"""One study point from start to end: load the model, run its stages, evaluate, measure its storage.

:func:`run_point` is a plain function of picklable arguments, so the local executor calls it
directly and the Ray executor ships it as a task unchanged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pare.config import RuntimeConfig, config_from_dict
from pare.study.grid import Point
from pare.study.storage import model_storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudySettings:
    """What every point of a study shares (a re-run must use the same settings to reuse points).

    Attributes:
        model: hub id or local directory.
        dtype: the dtype points are computed in (``float32``: fake-quantized values exact).
        calibration: the :class:`~pare.config.CalibrationConfig` as a dict (windows built once).
        eval: perplexity data set (None: none).
        eval_seqlen / eval_max_windows: perplexity windows (tokens each, how many at most).
        tasks / limit: zero-shot tasks (comma-separated, None: none) and documents per task.
        value_bits: bits per stored value of an unquantized parameter (16: a bf16 checkpoint).
    """

    model: str
    dtype: str = "float32"
    calibration: dict[str, Any] | None = None
    eval: str | None = "wikitext2"
    eval_seqlen: int = 2048
    eval_max_windows: int | None = None
    tasks: str | None = None
    limit: int | None = None
    value_bits: int = 16

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _scheme_of(point: Point):
    """The quantization scheme the point's model ends in (its last quantizing stage's), or None."""
    from pare.methods.quantize import scheme_of

    scheme = None
    for stage in point.stages:
        if stage.get("method") == "quantize":
            scheme = scheme_of(stage["scheme"], stage.get("group_size"), stage.get("symmetric", True))
        elif stage.get("method") == "sparsegpt" and stage.get("quantize"):
            scheme = scheme_of(stage["quantize"], stage.get("group_size"), stage.get("symmetric", True))
    return scheme


def run_point(settings: StudySettings, point: Point, ids: torch.Tensor | None, device: str | None = None,
              threads: int | None = None) -> dict[str, Any]:
    """Run one point and return its result (what ``points/<id>.json`` holds).

    Args:
        settings: the study's settings.
        point: the point (its stages as config dicts).
        ids: the shared calibration windows ``[N, L]`` (None when no stage needs them).
        device: compute device (None: cuda when available, else cpu).
        threads: torch threads in this process (None: leave as is), for a Ray worker's CPU share.
    """
    from pare.api import evaluate, load_model
    from pare.pipeline import Pipeline

    if threads is not None:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    model, tok = load_model(settings.model, dtype=settings.dtype)
    runtime = RuntimeConfig(device=device, progress=False)
    stages = [config_from_dict(dict(s)) for s in point.stages]
    stage_info = []
    if stages:
        pipeline = Pipeline(model, stages, runtime)
        batch = int((settings.calibration or {}).get("batch_size", 8))
        reports = pipeline.run(ids if pipeline.needs_calibration() else None, settings.calibration, batch)
        stage_info = [{"method": r.method, "seconds": r.prune_seconds, "peak_rss_mb": r.peak_rss_mb}
                      for r in reports]
    compress_s = time.perf_counter() - start
    res = evaluate(model, tok, dataset=settings.eval, seqlen=settings.eval_seqlen,
                   max_windows=settings.eval_max_windows, speed=False, device=device, progress=False,
                   tasks=settings.tasks, task_limit=settings.limit)
    storage = model_storage(model, _scheme_of(point), settings.value_bits)
    zs = res.get("zeroshot")
    return {
        "point": point.to_dict(),
        "ppl": res.get("ppl"), "zeroshot_mean": res.get("zeroshot_mean"),
        "zeroshot": None if zs is None else {k: v.get("acc") for k, v in zs["tasks"].items()},
        **storage,
        "stages_run": stage_info, "compress_seconds": compress_s,
        "seconds": time.perf_counter() - start,
    }
