"""The report of a study: quality against bytes (Pareto fronts), the budgets, the order ablation, the table.

Written as one self-contained HTML page and a markdown twin (plots as PNG files beside it), with the
figures and page style of :mod:`pare.reporting`.
"""

from __future__ import annotations

import datetime as dt
import html
from pathlib import Path
from typing import Any

from pare.reporting import _atomic_write
from pare.reporting.plots import PALETTE, Plot, _figure, _log_y, _png, have_matplotlib
from pare.reporting.render import CSS, NO_PLOTS
from pare.reporting.render import _figure as _html_figure
from pare.reporting.render import _table as _html_table
from pare.reporting.runs import markdown_table
from pare.study.grid import ORDERS
from pare.study.pareto import best_within, pareto_front
from pare.study.run import read_study

BUDGETS = (0.5, 0.25, 0.125)
"""Fractions of the unquantized model's bytes the budget table answers for."""
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def reference_bytes(study: dict[str, Any], results: list[dict[str, Any]]) -> int | None:
    """The unquantized dense model's bytes: the study's record, else the dense point's."""
    ref = study.get("reference_bytes")
    if isinstance(ref, int):
        return ref
    dense = [r for r in results if r["point"]["id"] == "dense"]
    return dense[0]["bytes"] if dense else None


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _label(r: dict[str, Any]) -> str:
    p = r["point"]
    if p["order"] == "-":
        return "dense" if p["id"] == "dense" else (p["prune"] if p["quant"] == "none" else p["quant"])
    return f"{p['prune']} + {p['quant']} ({p['order']})"


def table_rows(results: list[dict[str, Any]], ref: int | None) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """Every point: its mixture, size and quality, and whether it is on a Pareto front."""
    ppl_front = {id(r) for r in pareto_front(results, "bytes", "ppl", True)}
    acc_front = {id(r) for r in pareto_front(results, "bytes", "zeroshot_mean", False)}
    tasks = sorted({t for r in results for t in (r.get("zeroshot") or {})})
    mref = matrix_reference_bytes(results)
    header = ("point", "prune", "quant", "order", "params", "bits/param", "MB", "% of 16-bit", "matrices %", "PPL",
              "zero-shot mean", *tasks, "front (PPL / acc)")
    rows = []
    for r in sorted(results, key=lambda r: r["bytes"]):
        p = r["point"]
        front = "/".join(("PPL" if id(r) in ppl_front else "", "acc" if id(r) in acc_front else "")).strip("/")
        rows.append((p["id"], p["prune"], p["quant"], p["order"], _f(r["params"]), _f(r["bits_per_param"], 3),
                     _f(r["bytes"] / 1e6, 1), "-" if not ref else f"{100 * r['bytes'] / ref:.1f}%",
                     "-" if not mref or r.get("matrix_bytes") is None else f"{100 * r['matrix_bytes'] / mref:.1f}%",
                     _f(r.get("ppl")), _f(r.get("zeroshot_mean"), 3),
                     *(_f((r.get("zeroshot") or {}).get(t), 3) for t in tasks), front or "-"))
    return header, rows


def matrix_reference_bytes(results: list[dict[str, Any]]) -> int | None:
    """The dense point's decoder-matrix bytes (None without a dense point)."""
    dense = [r for r in results if r["point"]["id"] == "dense"]
    return dense[0].get("matrix_bytes") if dense else None


def matrix_budget_bytes(results: list[dict[str, Any]], frac: float) -> float | None:
    """The whole-checkpoint bytes of a model whose decoder matrices take ``frac`` of the dense point's
    and whose other values (embeddings, norms) are the dense point's: where a decoder-matrix budget
    falls on a bytes axis (None without a dense point)."""
    dense = [r for r in results if r["point"]["id"] == "dense"]
    if not dense or not isinstance(dense[0].get("matrix_bytes"), int) or not isinstance(
            dense[0].get("other_bytes"), int):
        return None
    return dense[0]["other_bytes"] + frac * dense[0]["matrix_bytes"]


def budget_rows(results: list[dict[str, Any]], ref: int | None, key: str = "bytes") -> list[tuple[str, ...]]:
    """For each budget (a fraction of ``ref``, measured on ``key``: ``bytes`` for the whole checkpoint,
    ``matrix_bytes`` for the decoder matrices alone), the best point by perplexity and by zero-shot mean
    among those that fit, and the smallest point."""
    if not ref:
        return []
    usable = [r for r in results if isinstance(r.get(key), (int, float))]
    if not usable:
        return []
    rows: list[tuple[str, ...]] = []
    smallest = min(usable, key=lambda r: r[key])
    for frac in BUDGETS:
        cap = ref * frac
        by_ppl = best_within(usable, cap, key, "ppl", True)
        by_acc = best_within(usable, cap, key, "zeroshot_mean", False)
        rows.append((f"{frac:.1%} ({cap / 1e6:.1f} MB)",
                     "nothing fits" if by_ppl is None else
                     f"{_label(by_ppl)}: PPL {_f(by_ppl['ppl'])} ({100 * by_ppl[key] / ref:.1f}%)",
                     "nothing fits" if by_acc is None else
                     f"{_label(by_acc)}: {_f(by_acc['zeroshot_mean'], 3)} ({100 * by_acc[key] / ref:.1f}%)",
                     f"{_label(smallest)} ({100 * smallest[key] / ref:.1f}%)"))
    return rows


BUDGET_HEADER = ("budget (of the 16-bit bytes)", "best PPL within it", "best zero-shot mean within it",
                 "smallest point")
BUDGET_TITLES = ("Budgets: the whole checkpoint", "Budgets: the decoder matrices alone")
BUDGET_NOTES = ("Every stored value counts: embeddings, norms and any unquantized parameter at 16 bits.",
                "Only the decoder layers' matrices, the part pruning and quantization change (their bytes against "
                "the dense model's matrices at 16 bits); the embeddings and norms stay as they are.")


def _budget_tables(results: list[dict[str, Any]], ref: int | None) -> list[tuple[str, str, list[tuple[str, ...]]]]:
    tables = []
    for title, note, key, base in zip(BUDGET_TITLES, BUDGET_NOTES, ("bytes", "matrix_bytes"),
                                      (ref, matrix_reference_bytes(results)), strict=True):
        rows = budget_rows(results, base, key)
        if rows:
            tables.append((title, note, rows))
    return tables


def order_rows(results: list[dict[str, Any]]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """Each pruning x quantization pair run in more than one order: PPL and zero-shot mean per order."""
    pairs: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in results:
        p = r["point"]
        if p["order"] in ORDERS:
            quant = p["quant"].removeprefix("gptq-").removeprefix("rtn-") if p["order"] == "joint" else p["quant"]
            pairs.setdefault((p["prune"], quant), {})[p["order"]] = r
    # a joint point belongs to every quantization spec of its scheme (rtn- and gptq- share it)
    for (prune, quant), by in pairs.items():
        if "joint" not in by:
            scheme = quant.removeprefix("gptq-").removeprefix("rtn-")
            joint = pairs.get((prune, scheme), {}).get("joint")
            if joint is not None:
                by["joint"] = joint
    orders = [o for o in ORDERS if any(o in by for by in pairs.values())]
    header = ("prune", "quant", *(f"PPL {o}" for o in orders), *(f"acc {o}" for o in orders), "MB")
    rows = []
    for (prune, quant), by in pairs.items():
        if len([o for o in ORDERS if o in by and o != "joint"]) < 1 or len(by) < 2:
            continue
        any_r = next(iter(by.values()))
        rows.append((prune, quant, *(_f(by[o].get("ppl")) if o in by else "-" for o in orders),
                     *(_f(by[o].get("zeroshot_mean"), 3) if o in by else "-" for o in orders),
                     _f(any_r["bytes"] / 1e6, 1)))
    return header, rows


# --------------------------------------------------------------------------- plots
def distinct_colours(n: int) -> list[str]:
    """``n`` colours, all different while ``n`` is at most 20: the report palette, else matplotlib's
    ``tab20`` (a palette that repeats would draw two quantization specs alike)."""
    if n <= len(PALETTE):
        return list(PALETTE[:n])
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps["tab20"]
    return [to_hex(cmap(i % cmap.N)) for i in range(n)]


def _quality_plot(results: list[dict[str, Any]], ref: int | None, key: str, lower: bool, ylabel: str,
                  slug: str) -> Plot | None:
    usable = [r for r in results if isinstance(r.get(key), (int, float))]
    if not usable:
        return None
    fig, (ax,) = _figure(1, 7.5, 4.6)
    quants = sorted({r["point"]["quant"] for r in usable})
    prunes = sorted({r["point"]["prune"] for r in usable})
    colours = distinct_colours(len(quants))
    for r in usable:
        p = r["point"]
        colour = colours[quants.index(p["quant"])]
        marker = MARKERS[prunes.index(p["prune"]) % len(MARKERS)]
        hollow = p["order"] == "quant-first"
        ax.scatter(r["bytes"] / 1e6, r[key], s=34, marker=marker, edgecolors=colour,
                   facecolors="none" if hollow else colour, linewidths=1.2, zorder=3)
    front = pareto_front(usable, "bytes", key, lower)
    xs = [r["bytes"] / 1e6 for r in front]
    ax.step(xs, [r[key] for r in front], where="post", color="#34495e", linewidth=1.2, zorder=2,
            label="Pareto front")
    for r in front:
        ax.annotate(_label(r), (r["bytes"] / 1e6, r[key]), fontsize=6.5, xytext=(3, 3), textcoords="offset points")
    for frac in BUDGETS[1:]:
        for at, style, text in ((ref * frac if ref else None, "--", f"{frac:.1%}"),
                                (matrix_budget_bytes(results, frac), ":", f"{frac:.1%} of matrices")):
            if at is None:
                continue
            ax.axvline(at / 1e6, color="#c0392b", linestyle=style, linewidth=0.8)
            ax.annotate(text, (at / 1e6, 1), xycoords=("data", "axes fraction"), fontsize=7, rotation=90,
                        color="#c0392b", xytext=(-9, -3), textcoords="offset points", va="top")
    for q in quants:
        ax.scatter([], [], color=colours[quants.index(q)], marker="o", label=f"quant {q}")
    for pr in prunes:
        ax.scatter([], [], color="#555", marker=MARKERS[prunes.index(pr) % len(MARKERS)], label=f"prune {pr}")
    ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_xlabel("bytes (MB)")
    ax.set_ylabel(ylabel)
    if lower:
        _log_y(ax)
    caption = ("Every point of the study; filled markers: prune first, joint or a single stage; hollow: "
               "quantize first. The line is the Pareto front (no point is both smaller and better); dashed "
               "lines: 25% and 12.5% of the 16-bit bytes; dotted: the decoder matrices at 25% and 12.5% of "
               "theirs, the other values as the dense model's.")
    return Plot(f"{ylabel} against bytes", caption, _png(fig), slug)


def study_plots(results: list[dict[str, Any]], ref: int | None) -> list[Plot]:
    plots = [_quality_plot(results, ref, "ppl", True, "perplexity", "pareto-ppl"),
             _quality_plot(results, ref, "zeroshot_mean", False, "zero-shot mean accuracy", "pareto-acc")]
    return [p for p in plots if p is not None]


# --------------------------------------------------------------------------- pages
def _settings_text(study: dict[str, Any], ref: int | None) -> list[str]:
    s = study.get("settings", {})
    cal = s.get("calibration") or {}
    lines = [f"model: {s.get('model')} (computed in {s.get('dtype')})",
             f"calibration: {cal.get('nsamples')} x {cal.get('seqlen')} tokens of {cal.get('dataset')} "
             f"(seed {cal.get('seed')}), shared by every point",
             f"perplexity: {s.get('eval') or 'none'}, windows of {s.get('eval_seqlen')} tokens"
             + (f", at most {s.get('eval_max_windows')}" if s.get("eval_max_windows") else ""),
             f"zero-shot: {s.get('tasks') or 'none'}"
             + (f", first {s.get('limit')} documents of each" if s.get("limit") else ", every document"),
             f"bytes: decoder matrices in the point's scheme and cheapest sparse layout; every other value at "
             f"{s.get('value_bits')} bits" + (f"; 16-bit dense model: {ref / 1e6:.1f} MB" if ref else "")]
    return lines


def render_study_html(study: dict[str, Any], results: list[dict[str, Any]], plots: list[Plot] | None) -> str:
    ref = reference_bytes(study, results)
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"pare study: {Path(str(study.get('settings', {}).get('model'))).name}"
    parts = [f"<header><h1>{html.escape(title)}</h1><div class=sub>{len(results)} point(s), generated {when}"
             "</div></header><ul class=notes>"
             + "".join(f"<li>{html.escape(t)}</li>" for t in _settings_text(study, ref)) + "</ul>"]
    for title, note, rows in _budget_tables(results, ref):
        parts += [f"<h2>{html.escape(title)}</h2><p class=sub>{html.escape(note)}</p>",
                  _html_table(BUDGET_HEADER, rows)]
    parts.append("<h2>Quality against bytes</h2>")
    if plots is None:
        parts.append(f"<p class=note>{html.escape(NO_PLOTS)}</p>")
    else:
        parts += [_html_figure(p) for p in plots]
    oh, orows = order_rows(results)
    if orows:
        parts += ["<h2>Order ablation</h2>", _html_table(oh, orows)]
    th, trows = table_rows(results, ref)
    parts += ["<h2>Every point</h2>", _html_table(th, trows)]
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>"
            f"<body><main>{''.join(parts)}</main></body></html>\n")


def render_study_markdown(study: dict[str, Any], results: list[dict[str, Any]], plots: list[Plot] | None,
                          plot_dir: Path | None, relative_to: Path) -> str:
    ref = reference_bytes(study, results)
    lines = [f"# pare study: {Path(str(study.get('settings', {}).get('model'))).name}", ""]
    lines += [f"- {t}" for t in _settings_text(study, ref)] + [""]
    for title, note, rows in _budget_tables(results, ref):
        lines += [f"## {title}", "", note, "", markdown_table(BUDGET_HEADER, rows), ""]
    lines += ["## Quality against bytes", ""]
    if plots is None:
        lines += [NO_PLOTS, ""]
    elif plot_dir is not None:
        plot_dir.mkdir(parents=True, exist_ok=True)
        for p in plots:
            f = plot_dir / f"{p.slug}.png"
            f.write_bytes(p.png)
            lines += [f"![{p.title}]({f.relative_to(relative_to).as_posix()})", "", f"*{p.title}.* {p.caption}", ""]
    oh, orows = order_rows(results)
    if orows:
        lines += ["## Order ablation", "", markdown_table(oh, orows), ""]
    th, trows = table_rows(results, ref)
    lines += ["## Every point", "", markdown_table(th, trows), ""]
    return "\n".join(lines) + "\n"


def write_study_report(out: str | Path, html_path: str | Path | None = None, md_path: str | Path | None = None,
                       plots: bool = True) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` (plots in ``report_plots/``) for the study in ``out``.

    Returns:
        The HTML and markdown paths.
    """
    study, results = read_study(out)
    ref = reference_bytes(study, results)
    drawn = (study_plots(results, ref) if have_matplotlib() else None) if plots else []
    h = Path(html_path) if html_path else Path(out) / "report.html"
    m = Path(md_path) if md_path else Path(out) / "report.md"
    _atomic_write(h, render_study_html(study, results, drawn))
    plot_dir = m.parent / f"{m.stem}_plots" if drawn else None
    _atomic_write(m, render_study_markdown(study, results, drawn, plot_dir, m.parent))
    return h, m
