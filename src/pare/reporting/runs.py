"""Saved runs read back from their ``pare.json`` manifests, and the tables that compare them.

A run is one output directory of ``pare prune`` (or ``pare.save``). A chained run (pruned more than
once) lists every prune in ``history``: its stages are those reports, its "before" figures are the
first stage's and its "after" figures the last stage's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pare.arch.surgery.edits import Edit, Heads, Hidden, MlpChannels, as_edit
from pare.errors import ConfigError, PareError

SETTING_KEYS = ("sparsity", "pattern", "profile", "mlp_ratio", "attn_ratio", "pruning_ratio", "importance",
                "num_layers", "num_sublayers", "param_ratio", "target_params", "layers")
"""Config fields worth showing as a run's settings (the rest are in the manifest)."""

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class Run:
    """One saved output directory and what its manifest says.

    Attributes:
        name: the directory's name (how the run is labelled in tables and plots).
        path: the directory.
        stages: one report dict per prune, in the order applied.
        manifest: the whole ``pare.json``.
    """

    name: str
    path: Path
    stages: list[dict[str, Any]]
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def methods(self) -> str:
        return " → ".join(str(s.get("method", "?")) for s in self.stages)

    def before(self, key: str) -> Any:
        """A figure measured before the first prune (``ppl``, ``params``...)."""
        return self.stages[0].get("figures", {}).get(f"{key}_before")

    def after(self, key: str) -> Any:
        """A figure measured after the last prune, or the manifest's own when the stage lacks it."""
        value = self.stages[-1].get("figures", {}).get(f"{key}_after")
        return self.manifest.get("figures", {}).get(f"{key}_after") if value is None else value

    @property
    def settings(self) -> str:
        parts = []
        for stage in self.stages:
            cfg = stage.get("config") or {}
            shown = [f"{k}={_short(cfg[k])}" for k in SETTING_KEYS if cfg.get(k) not in (None, "", (), [], 0)
                     and not (k == "profile" and cfg[k] == "uniform")
                     and not (k == "pattern" and cfg[k] == "unstructured")]
            removed = (stage.get("scores") or {}).get("removed_layers")
            if removed:
                shown.append(f"removed layers {_short(removed)}")
            parts.append(", ".join(shown) or "defaults")
        return " → ".join(parts)

    @property
    def prune_seconds(self) -> float:
        return float(sum(s.get("prune_seconds") or 0.0 for s in self.stages))

    @property
    def peak_rss_mb(self) -> float:
        return float(max((s.get("peak_rss_mb") or 0.0 for s in self.stages), default=0.0))


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def read_runs(paths: list[str | Path]) -> list[Run]:
    """The runs saved in ``paths``, in the order given.

    Raises:
        ConfigError: a path is not a directory, or holds no ``pare.json`` (not a pare output).
    """
    from pare.io.load import read_manifest

    if not paths:
        raise ConfigError("no output directory given: pass one or more directories written by `pare prune --out`")
    runs = []
    for p in paths:
        path = Path(p)
        if not path.is_dir():
            raise ConfigError(f"{str(p)!r} is not a directory: pass directories written by `pare prune --out`")
        manifest = read_manifest(path)
        if manifest is None:
            raise ConfigError(f"{str(p)!r} has no pare.json: it was not written by `pare prune --out` or "
                              "`pare.save(model, tok, out, report)`")
        stages = [s for s in manifest.get("history") or [manifest] if isinstance(s, dict)]
        name = path.name if path.name not in ("", ".") else str(path.resolve().name)
        if name == "model" and path.parent.name:  # bench layouts keep each run in <config>/model
            name = path.parent.name
        runs.append(Run(name=name, path=path, stages=stages, manifest=manifest))
    return runs


# --------------------------------------------------------------------------- per-layer views
def layer_of(module_name: str) -> int | None:
    """The decoder-layer index in a module name (``model.layers.3.mlp.down_proj`` -> 3)."""
    m = _LAYER.search(module_name)
    return int(m.group(1)) if m else None


def layer_sparsity(stage: dict[str, Any]) -> dict[int, float]:
    """Measured sparsity per decoder layer (zeros / weights over its pruned modules) from ``modules``."""
    zeros: dict[int, int] = {}
    total: dict[int, int] = {}
    for name, info in (stage.get("modules") or {}).items():
        layer = layer_of(name)
        numel = info.get("numel")
        if layer is None or not numel:
            continue
        total[layer] = total.get(layer, 0) + int(numel)
        zeros[layer] = zeros.get(layer, 0) + int(numel) - int(info.get("nonzero", numel))
    return {i: zeros[i] / total[i] for i in sorted(total)}


def stage_edits(stage: dict[str, Any]) -> list[Edit]:
    """A stage's recorded edits, typed (entries this version of pare cannot read are left out of the
    report's views)."""
    out = []
    for entry in stage.get("edits") or []:
        try:
            out.append(as_edit(entry))
        except (PareError, TypeError):
            continue
    return out


def kept_widths(stage: dict[str, Any]) -> dict[str, dict[int, int]]:
    """Per decoder layer, the MLP width and query heads its edits left (``{"mlp": {...}, "heads": {...}}``)."""
    out: dict[str, dict[int, int]] = {"mlp": {}, "heads": {}}
    for edit in stage_edits(stage):
        if isinstance(edit, MlpChannels):
            out["mlp"][int(edit.layer)] = int(edit.width)
        elif isinstance(edit, Heads):
            out["heads"][int(edit.layer)] = int(edit.num_heads)
    widths = (stage.get("scores") or {}).get("widths") or {}
    for kind in ("mlp", "heads"):
        for layer, value in (widths.get(kind) or {}).items():
            out[kind].setdefault(int(layer), int(value))
    return out


def hidden_width(stage: dict[str, Any]) -> int | None:
    for edit in stage_edits(stage):
        if isinstance(edit, Hidden):
            return int(edit.width)
    return None


# --------------------------------------------------------------------------- tables
def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: ``-`` for missing, thousands separators, ``digits`` decimals for floats."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


class Change(str):
    """A table cell "before → after (change)" that also keeps its parts, so HTML can lay them out.

    Attributes:
        main: the figure after the prune (or the only one known).
        detail: "from <before>", the relative change and any suffix; empty when there is none.
    """

    main: str
    detail: str

    def __new__(cls, before: Any, after: Any, digits: int = 2, pct: bool = False, suffix: str = "") -> Change:
        if after is None and before is None:
            main, detail, text = "-", "", "-"
        elif after is None:  # measured before only: the cell must not pass the dense figure off as the pruned one
            main, detail, text = "-", f"from {fmt(before, digits)}", f"{fmt(before, digits)} → -"
        elif before is None:
            main = fmt(after, digits)
            detail, text = suffix, main + (f" ({suffix})" if suffix else "")
        else:
            main = fmt(after, digits)
            rel = (f"{(after - before) / before:+.0%}" if pct and isinstance(before, (int, float)) and before
                   else "")
            detail = ", ".join(x for x in (f"from {fmt(before, digits)}", rel, suffix) if x)
            extra = ", ".join(x for x in (rel, suffix) if x)
            text = f"{fmt(before, digits)} → {main}" + (f" ({extra})" if extra else "")
        obj = super().__new__(cls, text)
        obj.main, obj.detail = main, detail
        return obj


def _change(before: Any, after: Any, digits: int = 2, pct: bool = False, suffix: str = "") -> Change:
    return Change(before, after, digits, pct, suffix)


SUMMARY_HEADER = ("run", "method", "settings", "PPL", "zero-shot mean acc", "params", "non-zero params",
                  "bytes on disk", "prefill tok/s", "decode tok/s", "prune s", "peak RSS MB")


def summary_rows(runs: list[Run]) -> list[tuple[str, ...]]:
    """One row per run: before → after for each figure (change in % where it is a size or a speed)."""
    rows: list[tuple[str, ...]] = []
    for r in runs:
        ppl_set = r.after("dataset")
        rows.append((
            r.name, r.methods, r.settings,
            _change(r.before("ppl"), r.after("ppl"), suffix=str(ppl_set) if ppl_set else ""),
            _change(r.before("zeroshot_mean"), r.after("zeroshot_mean"), 3),
            _change(r.before("params"), r.after("params"), pct=True),
            _change(r.stages[0].get("figures", {}).get("nonzero_before"),
                    r.stages[-1].get("figures", {}).get("nonzero_after"), pct=True),
            _change(r.before("size_on_disk_bytes"), r.after("size_on_disk_bytes"), pct=True),
            _change(r.before("prefill_tokens_per_s"), r.after("prefill_tokens_per_s"), 0, pct=True),
            _change(r.before("decode_tokens_per_s"), r.after("decode_tokens_per_s"), 1, pct=True),
            fmt(r.prune_seconds, 1), fmt(r.peak_rss_mb, 0),
        ))
    return rows


def tasks_of(run: Run, when: str) -> dict[str, dict[str, Any]]:
    """Per-task results before the first prune or after the last: ``{task: {"acc", "acc_norm", "n"...}}``.

    ``pare prune --eval-tasks`` stores what ``evaluate_tasks`` returns (``{"tasks": {...}, "mean_acc"}``);
    a plain ``{task: {...}}`` is read too.
    """
    stage = run.stages[0] if when == "before" else run.stages[-1]
    value = stage.get("figures", {}).get(f"zeroshot_{when}") or {}
    tasks = value.get("tasks", value) if isinstance(value, dict) else {}
    return {k: v for k, v in tasks.items() if isinstance(v, dict)}


def task_names(runs: list[Run]) -> list[str]:
    names: list[str] = []
    for r in runs:
        for when in ("before", "after"):
            names += [t for t in tasks_of(r, when) if t not in names]
    return names


def task_rows(runs: list[Run]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """Per-task accuracy (acc, before → after) of every run that has zero-shot figures."""
    names = task_names(runs)
    header = ("run", *names, "mean")
    rows: list[tuple[str, ...]] = []
    for r in runs:
        before, after = tasks_of(r, "before"), tasks_of(r, "after")
        if not after:
            continue
        cells = [_change((before.get(t) or {}).get("acc"), (after.get(t) or {}).get("acc"), 3) for t in names]
        rows.append((r.name, *cells, _change(r.before("zeroshot_mean"), r.after("zeroshot_mean"), 3)))
    return header, rows


def markdown_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    def cell(value: str) -> str:
        return value.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def notes_of(run: Run) -> list[str]:
    """The run's notes and the reasons its methods gave for what they removed, without repeats."""
    seen: list[str] = []
    for stage in run.stages:
        reason = (stage.get("scores") or {}).get("reason")
        for text in [*(stage.get("notes") or []), *([f"{stage.get('method')}: {reason}"] if reason else [])]:
            if text not in seen:
                seen.append(str(text))
    return seen
