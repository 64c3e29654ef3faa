"""A study on disk: its settings, its shared calibration windows, one JSON file per finished point.

```
studies/X/
  study.json           settings + every point asked for so far
  calibration.pt       the token windows every point calibrates on (built once)
  points/<id>.json     one finished point, written atomically when it finishes
```

A re-run with the same settings skips the points whose file exists, so a study killed half-way
resumes where it stopped; new specs add points. Different settings (model, calibration,
evaluation) are refused: the points would not be comparable.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from pare.config import CalibrationConfig, stage_class
from pare.errors import ConfigError, PareError
from pare.study.grid import Point
from pare.study.point import StudySettings, run_point

log = logging.getLogger(__name__)

STUDY_VERSION = 1
EXECUTORS = ("local", "ray")
OnResult = Callable[[Point, dict[str, Any]], None]


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to a temporary sibling, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, default=str)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def normalised(point: dict[str, Any]) -> dict[str, Any]:
    """A point's dict (as JSON) with each stage read back through its config class: an option pare gained
    after the point ran counts at its default, so the stored result of the same stages is still done."""
    try:
        stages = [stage_class(s["method"]).config_class.from_dict(s).to_dict() for s in point.get("stages", [])]
    except (PareError, KeyError, TypeError):
        stages = point.get("stages", [])  # unreadable: compared as stored (so it runs again)
    return json.loads(json.dumps({**point, "stages": stages}))


def _needs_calibration(points: list[Point]) -> bool:
    from pare.config import config_from_dict, stage_for_config

    for p in points:
        for s in p.stages:
            cfg = config_from_dict(dict(s))
            if stage_for_config(cfg)(cfg).needs() != "nothing":
                return True
    return False


def check_points(model_path: str, points: list[Point]) -> None:
    """Check every point's whole recipe on the model's shapes (a meta copy: no weights read), each
    stage on the shapes the stages before it leave, so a scheme that does not fit (a group size that
    does not divide a width, before or after a structured cut) fails before any work."""
    from pare.config import RuntimeConfig, config_from_dict
    from pare.io.load import meta_model
    from pare.pipeline import Pipeline

    model = meta_model(model_path)
    for p in points:
        if not p.stages:
            continue
        try:
            Pipeline(model, [config_from_dict(dict(s)) for s in p.stages], RuntimeConfig(device="cpu"))
        except ConfigError as exc:
            raise ConfigError(f"study point {p.id}: {exc}") from None


class Study:
    """A study directory and the points it should hold.

    Args:
        out: the study directory (created).
        settings: what every point shares.
        points: the grid (from :func:`pare.study.grid.build_grid`).
    """

    def __init__(self, out: str | Path, settings: StudySettings, points: list[Point]) -> None:
        self.out = Path(out)
        self.settings = settings
        self.points = points
        ids = [p.id for p in points]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"the grid repeats point ids: {sorted({i for i in ids if ids.count(i) > 1})}")

    @property
    def points_dir(self) -> Path:
        return self.out / "points"

    def prepare(self) -> None:
        """Check (or write) ``study.json``: the settings must match a study already there."""
        path = self.out / "study.json"
        grid = [p.to_dict() for p in self.points]
        if path.exists():
            old = json.loads(path.read_text())
            before = old.get("settings") or {}
            now = json.loads(json.dumps(self.settings.to_dict()))
            diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            if diff:
                raise ConfigError(f"{self.out} holds a study run with other settings ({', '.join(diff)}: "
                                  f"{', '.join(f'{before.get(k)!r} there, {now.get(k)!r} now' for k in diff)}); "
                                  "its points would not compare with new ones: use another --out")
            known = {p["id"] for p in grid}
            grid = [p for p in old.get("points", []) if p["id"] not in known] + grid
        write_json_atomic(path, {"version": STUDY_VERSION, "settings": self.settings.to_dict(),
                                 "reference_bytes": self.reference_bytes(), "points": grid})

    def reference_bytes(self) -> int:
        """The dense model's bytes at ``value_bits`` per parameter (tied parameters once)."""
        from pare.io.load import meta_model

        params = sum(p.numel() for p in meta_model(self.settings.model).parameters())
        return -(-params * self.settings.value_bits // 8)

    def done(self, point: Point) -> bool:
        """Whether the point's result is on disk (for the same stages)."""
        path = self.points_dir / f"{point.id}.json"
        if not path.exists():
            return False
        try:
            stored = json.loads(path.read_text())["point"]
        except (ValueError, KeyError, TypeError):
            return False  # unreadable: run it again
        return bool(normalised(stored) == normalised(point.to_dict()))

    def pending(self) -> list[Point]:
        return [p for p in self.points if not self.done(p)]

    def calibration(self) -> torch.Tensor | None:
        """The shared calibration windows: read from ``calibration.pt``, or built once and written there."""
        if not _needs_calibration(self.points):
            return None
        path = self.out / "calibration.pt"
        if path.exists():
            ids = torch.load(path, weights_only=True)
            if isinstance(ids, torch.Tensor):
                return ids
        from transformers import AutoTokenizer

        from pare.api import calibration_ids, check_token_ids
        from pare.io.load import meta_model

        calib = CalibrationConfig.from_dict(self.settings.calibration or {})
        model = meta_model(self.settings.model)
        tok = AutoTokenizer.from_pretrained(self.settings.model)
        ids = calibration_ids(tok, calib, model)
        check_token_ids(model, ids)
        fd, tmp = tempfile.mkstemp(prefix=".calibration.", suffix=".tmp", dir=self.out)
        os.close(fd)
        torch.save(ids, tmp)
        os.replace(tmp, path)
        return ids

    def run(self, executor: str = "local", *, ray_address: str | None = None, cpus: float = 1, gpus: float = 0,
            device: str | None = None, on_result: OnResult | None = None) -> list[dict[str, Any]]:
        """Run every pending point and write each result as it finishes.

        Args:
            executor: ``local`` (one point after another, in this process) or ``ray`` (one Ray task per
                point; a local Ray instance, or the cluster at ``ray_address``).
            cpus / gpus: each Ray task's resource request.
            device: compute device for local points (None: cuda when available).
            on_result: called with each point and its result once the result is on disk.

        Returns:
            The results of the points run now (not the ones found on disk).
        """
        if executor not in EXECUTORS:
            raise ConfigError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
        todo = self.pending()
        check_points(self.settings.model, todo)
        self.out.mkdir(parents=True, exist_ok=True)
        self.prepare()
        ids = self.calibration() if _needs_calibration(todo) else None
        if executor == "ray":
            results = ray_results(self.settings, todo, ids, ray_address, cpus, gpus)
        else:
            results = ((p, _local_point(self.settings, p, ids, device)) for p in todo)
        out = []
        failed: list[str] = []
        for point, result in results:
            if isinstance(result, PareError):  # one point that cannot run does not stop the others
                log.error("study point %s failed: %s", point.id, result)
                failed.append(f"{point.id}: {result}")
                continue
            write_json_atomic(self.points_dir / f"{point.id}.json", result)
            out.append(result)
            if on_result is not None:
                on_result(point, result)
        if failed:
            raise ConfigError(f"{len(failed)} study point(s) failed (the others are saved): " + "; ".join(failed))
        return out


def _local_point(settings: StudySettings, point: Point, ids: torch.Tensor | None,
                 device: str | None) -> dict[str, Any] | PareError:
    try:
        return run_point(settings, point, ids, device)
    except PareError as exc:
        return exc


def ray_results(settings: StudySettings, points: list[Point], ids: torch.Tensor | None, address: str | None,
                cpus: float, gpus: float) -> Iterator[tuple[Point, dict[str, Any] | PareError]]:
    """Each point as a Ray task (``num_cpus=cpus, num_gpus=gpus``), yielded as the tasks finish."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'pare[ray]' (or use --executor local)") from None
    if not points:
        return
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        ids_ref = ray.put(ids)
        device = "cuda" if gpus > 0 else "cpu"
        threads = max(1, int(cpus))
        task = ray.remote(num_cpus=cpus, num_gpus=gpus)(run_point)
        refs = {task.remote(settings, p, ids_ref, device, threads): p for p in points}
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            point = refs.pop(done[0])
            try:
                yield point, ray.get(done[0])
            except ray.exceptions.RayTaskError as exc:
                if not isinstance(exc.cause, PareError):
                    raise
                yield point, exc.cause
    finally:
        if started:
            ray.shutdown()


def read_study(out: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``study.json`` and the finished points' results (in the grid's order).

    Raises:
        ConfigError: ``out`` holds no study.
    """
    path = Path(out) / "study.json"
    if not path.is_file():
        raise ConfigError(f"{str(out)!r} holds no study.json: it was not written by `pare study --out`")
    study = json.loads(path.read_text())
    results = []
    for p in study.get("points", []):
        f = Path(out) / "points" / f"{p['id']}.json"
        if f.is_file():
            results.append(json.loads(f.read_text()))
    return study, results


def is_study(path: str | Path) -> bool:
    return (Path(path) / "study.json").is_file()
