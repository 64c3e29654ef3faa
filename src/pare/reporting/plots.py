"""Plots of saved runs, drawn with matplotlib (the optional extra ``pare[plots]``) as PNG bytes.

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas directly, never through
``pyplot``: no global figure state, no display backend, safe in a server or a test.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pare.reporting.runs import Run, hidden_width, kept_widths, layer_sparsity

ACCENT = "#c0392b"
"""Removed / chosen items."""
MUTED = "#7f8c8d"
DENSE = "#2c3e50"
PALETTE = ("#2e86de", "#e67e22", "#27ae60", "#8e44ad", "#16a085", "#d35400", "#2c3e50", "#c0392b",
           "#7f8c8d", "#f1c40f")


@dataclass
class Plot:
    """One rendered figure: a title, a one-line caption and the PNG bytes."""

    title: str
    caption: str
    png: bytes
    slug: str


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(ncols: int, width: float = 5.0, height: float = 3.4) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=110, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, color="#e5e5e5", linewidth=0.7)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    return fig, list(axes)


def _human(value: float, _pos: Any = None) -> str:
    """Axis labels without offsets or powers: 0.26M, 950k, 12."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def _plain_axis(axis: Any) -> None:
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(_human))
    axis.set_minor_formatter(FuncFormatter(lambda v, p: ""))


def _log_y(ax: Any) -> None:
    """A log y axis labelled with plain numbers (a few minor labels when the range is short)."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(_human))
    low, high = ax.get_ylim()
    if high / max(low, 1e-12) < 30:
        ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 3.0, 5.0)))
        ax.yaxis.set_minor_formatter(FuncFormatter(_human))
    else:
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, p: ""))


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# --------------------------------------------------------------------------- across runs
def _point(run: Run, xkey: str, ykey: str, when: str) -> tuple[float, float] | None:
    get = run.before if when == "before" else run.after
    x, y = get(xkey), get(ykey)
    return (float(x), float(y)) if isinstance(x, (int, float)) and isinstance(y, (int, float)) else None


def _curve_panel(ax: Any, runs: list[Run], xkey: str, ykey: str, xlabel: str, ylabel: str) -> bool:
    """One compression-curve panel; False when no run has both figures."""
    drawn = False
    dense = next((p for p in (_point(r, xkey, ykey, "before") for r in runs) if p), None)
    if dense:
        ax.scatter([dense[0]], [dense[1]], marker="*", s=160, color=DENSE, zorder=3, label="dense")
        ax.annotate("dense", dense, textcoords="offset points", xytext=(6, 4), fontsize=8, color=DENSE)
    for i, r in enumerate(runs):
        p = _point(r, xkey, ykey, "after")
        if p is None:
            continue
        drawn = True
        ax.scatter([p[0]], [p[1]], s=40, color=PALETTE[i % len(PALETTE)], zorder=3)
        ax.annotate(r.name, p, textcoords="offset points", xytext=(5, 3), fontsize=7.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ykey == "ppl" and drawn:
        _log_y(ax)
    _plain_axis(ax.xaxis)
    ax.margins(x=0.12, y=0.1)
    return drawn


def compression_curve(runs: list[Run]) -> Plot | None:
    """PPL and mean zero-shot accuracy against parameters and bytes on disk, one point per run."""
    panels = [("params", "ppl", "parameters", "perplexity (log)"),
              ("size_on_disk_bytes", "ppl", "bytes on disk", "perplexity (log)"),
              ("params", "zeroshot_mean", "parameters", "mean zero-shot accuracy")]
    usable = [p for p in panels if any(_point(r, p[0], p[1], "after") for r in runs)]
    if not usable:
        return None
    fig, axes = _figure(len(usable), 4.6, 3.6)
    for ax, (x, y, xl, yl) in zip(axes, usable, strict=True):
        _curve_panel(ax, runs, x, y, xl, yl)
    return Plot("Compression curve", "Quality against size: each point is a run after pruning; the star is the "
                "dense model. Lower-left is better for perplexity, upper-left for accuracy.", _png(fig),
                "compression-curve")


def speed_values(runs: list[Run], key: str) -> tuple[list[str], list[float], float | None, bool] | None:
    """Bars of ``key`` (``prefill_tokens_per_s`` or ``decode_tokens_per_s``): names, values, the dense line
    and whether the values are ratios. When every run that has the figure also has its own "before" (the
    dense model measured beside it), each bar is after / before and the line is 1: runs measured at
    different times, under different loads, then compare. Otherwise tokens/s, with the first dense figure
    as the line. None when no run has the figure."""
    measured = [r for r in runs if isinstance(r.after(key), (int, float))]
    if not measured:
        return None
    if all(isinstance(r.before(key), (int, float)) and r.before(key) > 0 for r in measured):
        return ["dense"] + [r.name for r in runs], [1.0] + [
            r.after(key) / r.before(key) if isinstance(r.after(key), (int, float)) else 0.0 for r in runs], 1.0, True
    dense = next((r.before(key) for r in runs if isinstance(r.before(key), (int, float))), None)
    names = (["dense"] if dense is not None else []) + [r.name for r in runs]
    values = ([dense] if dense is not None else []) + [r.after(key) or 0.0 for r in runs]
    return names, values, dense, False


def speed_plot(runs: list[Run]) -> Plot | None:
    """Prefill and decode speed of each run as bars: a ratio to the dense model measured beside it where
    every run has one (:func:`speed_values`), else tokens/s."""
    kinds = [("prefill_tokens_per_s", "prefill"), ("decode_tokens_per_s", "decode")]
    have = [(k, label, v) for k, label in kinds if (v := speed_values(runs, k)) is not None]
    if not have:
        return None
    fig, axes = _figure(len(have), 4.8, max(2.6, 0.32 * (len(runs) + 1) + 1.2))
    ratios = all(v[3] for _, _, v in have)
    for ax, (_, label, (names, values, dense, ratio)) in zip(axes, have, strict=True):
        has_dense = names[0] == "dense"
        colors = ([DENSE] if has_dense else []) + [PALETTE[i % len(PALETTE)] for i in range(len(runs))]
        ax.barh(range(len(names)), values, color=colors)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"{label} \u00d7 dense" if ratio else f"{label} tokens/s")
        _plain_axis(ax.xaxis)
        if dense:
            ax.axvline(dense, color=DENSE, linewidth=0.8, linestyle="--")
    caption = ("Prefill and decode tokens per second of each run as a ratio to the dense model's, measured "
               "beside it (the dashed line is dense, 1): runs timed at different moments compare."
               if ratios else
               "Prefill and decode tokens per second on the measuring machine (the dashed line is the dense "
               "model; runs timed at different moments are only as comparable as the machine's load was steady).")
    return Plot("Speed", caption, _png(fig), "speed")


# --------------------------------------------------------------------------- per run
def _bars(ax: Any, values: dict[int, float], ylabel: str, title: str, highlight: set[int] | None = None) -> None:
    layers = sorted(values)
    colors = [ACCENT if highlight and i in highlight else "#2e86de" for i in layers]
    ax.bar(layers, [values[i] for i in layers], color=colors, width=0.8)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)


def _sparsity_panel(ax: Any, stage: dict[str, Any]) -> bool:
    per_layer = layer_sparsity(stage)
    if not per_layer or ax is None:
        return bool(per_layer)
    _bars(ax, per_layer, "sparsity", f"{stage.get('method')}: sparsity per layer")
    ax.set_ylim(0, 1)
    return True


def _width_panel(ax: Any, stage: dict[str, Any]) -> bool:
    widths = kept_widths(stage)
    if not (widths["mlp"] or widths["heads"]) or ax is None:
        return bool(widths["mlp"] or widths["heads"])
    kind = "mlp" if widths["mlp"] else "heads"
    hidden = hidden_width(stage)
    title = f"{stage.get('method')}: kept {'MLP width' if kind == 'mlp' else 'query heads'} per layer"
    _bars(ax, {k: float(v) for k, v in widths[kind].items()}, "MLP channels" if kind == "mlp" else "heads", title)
    if hidden:
        ax.set_title(f"{title} (hidden {hidden})", fontsize=10)
    return True


def _depth_scores(stage: dict[str, Any]) -> tuple[dict[int, float], str, set[int]] | None:
    """Per-layer or per-span scores of a depth method: (values by layer/start, label, chosen)."""
    scores = stage.get("scores") or {}
    removed = set(scores.get("removed_layers") or [])
    if "block_influence" in scores:
        return {int(k): float(v) for k, v in scores["block_influence"].items()}, "block influence", removed
    if "angular_distance" in scores:
        values = {int(s["layers"][0]): float(s["distance"]) for s in scores["angular_distance"]}
        return values, "angular distance of span (by first layer)", {min(removed)} if removed else set()
    if "windows" in scores:
        values = {}
        for w in scores["windows"]:
            p = w.get("ppl", w.get("ppl_first_slice", w.get("ppl_at_least")))
            if p is not None:
                values[int(w["layers"][0])] = float(p)
        return values, "held-out PPL without span (by first layer)", {min(removed)} if removed else set()
    return None


def _depth_panel(ax: Any, stage: dict[str, Any]) -> bool:
    found = _depth_scores(stage)
    if not found or ax is None:
        return bool(found)
    values, label, chosen = found
    _bars(ax, values, label, f"{stage.get('method')}: {label.split(' (')[0]}", highlight=chosen)
    if "PPL" in label:
        _log_y(ax)
    return True


def _sublayer_panel(ax: Any, stage: dict[str, Any]) -> bool:
    scores = stage.get("scores") or {}
    rows = scores.get("sublayers")
    if not rows or ax is None:
        return bool(rows)
    removed = set(scores.get("removed_sublayers") or [])
    for offset, part, color in ((-0.2, "attention", "#2e86de"), (0.2, "mlp", "#e67e22")):
        pts = [r for r in rows if r["part"] == part]
        ax.bar([r["layer"] + offset for r in pts], [r["ppl"] for r in pts], width=0.4, label=part,
               color=[ACCENT if f"{r['layer']}.{part}" in removed else color for r in pts])
    _log_y(ax)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("held-out PPL without block")
    ax.set_title(f"{stage.get('method')}: blocks (red: removed)", fontsize=10)
    ax.legend(fontsize=8)
    return True


def _osscar_panel(ax: Any, stage: dict[str, Any]) -> bool:
    errors = (stage.get("scores") or {}).get("mlp_error") or (stage.get("scores") or {}).get("attn_error")
    if not errors or ax is None:
        return bool(errors)
    layers = sorted(int(k) for k in errors)
    ax.plot(layers, [errors[str(i)]["no_refit"] for i in layers], marker="o", ms=3, label="no refit",
            color=MUTED)
    ax.plot(layers, [errors[str(i)]["refit"] for i in layers], marker="o", ms=3, label="refit", color="#2e86de")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("relative output error")
    ax.set_title(f"{stage.get('method')}: reconstruction error per layer", fontsize=10)
    ax.legend(fontsize=8)
    return True


PANELS: tuple[Callable[[Any, dict[str, Any]], bool], ...] = (  # each: (axis or None, stage) -> has data
    _sparsity_panel, _width_panel, _osscar_panel, _depth_panel, _sublayer_panel)


def run_plot(run: Run) -> Plot | None:
    """The per-layer panels that apply to each stage of ``run`` (sparsity, widths, scores)."""
    jobs = [(stage, panel) for stage in run.stages for panel in PANELS if panel(None, stage)]
    if not jobs:
        return None
    fig, axes = _figure(len(jobs), 4.4, 3.0)
    for ax, (stage, panel) in zip(axes, jobs, strict=True):
        panel(ax, stage)
    depth = any(panel in (_depth_panel, _sublayer_panel) for _, panel in jobs)
    caption = run.methods + (": red marks what was removed (for spans, the first layer of the span)." if depth
                             else ".")
    return Plot(f"{run.name}: per layer", caption, _png(fig), f"run-{run.name}")


def all_plots(runs: list[Run]) -> list[Plot]:
    """Every plot that the runs' figures and scores support, across runs first."""
    plots = [compression_curve(runs), speed_plot(runs), *(run_plot(r) for r in runs)]
    return [p for p in plots if p is not None]
