"""One self-contained HTML page (inline CSS, plots as base64 PNG, no scripts, opens offline) and its
markdown twin for a set of saved runs."""

from __future__ import annotations

import base64
import datetime as dt
import html
from pathlib import Path

from pare.reporting.plots import Plot
from pare.reporting.runs import SUMMARY_HEADER, Change, Run, markdown_table, notes_of, summary_rows, task_rows

NO_PLOTS = ("Plots need matplotlib, which is not installed: `pip install 'pare[plots]'` and run `pare report` "
            "again. The tables below are complete.")

CSS = """
:root { --ink:#1f2933; --muted:#616e7c; --line:#e4e7eb; --head:#f5f7fa; --accent:#2e86de; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--ink); background: #fbfcfd; }
main { max-width: 1360px; margin: 0 auto; padding: 28px 32px 48px; }
header { border-bottom: 3px solid var(--accent); padding-bottom: 12px; margin-bottom: 24px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 32px 0 10px; }
h3 { font-size: 15px; margin: 20px 0 6px; }
.sub { color: var(--muted); font-size: 13px; }
.note { background: #fff8e1; border-left: 4px solid #f0b429; padding: 10px 14px; margin: 12px 0; }
.scroll { overflow-x: auto; background: #fff; border: 1px solid var(--line); border-radius: 6px; }
table { border-collapse: collapse; width: 100%; font-size: 12.5px; }
th, td { padding: 7px 9px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: var(--head); font-weight: 600; white-space: nowrap; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
td .main { display: block; font-weight: 600; }
td .detail { display: block; color: var(--muted); font-size: 11.5px; }
td:first-child { font-weight: 600; }
tr:last-child td { border-bottom: none; }
figure { margin: 16px 0 24px; background: #fff; border: 1px solid var(--line); border-radius: 6px;
         padding: 12px 12px 8px; }
figure img { max-width: 100%; height: auto; display: block; margin: 0 auto; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 6px; }
ul.notes { margin: 4px 0 0; padding-left: 20px; color: var(--muted); font-size: 13px; }
code { font-size: 12.5px; background: var(--head); padding: 1px 4px; border-radius: 3px; }
"""

_TEXT_COLUMNS = {"run", "method", "settings"}


def _cell(header: str, value: str) -> str:
    if header in _TEXT_COLUMNS:
        return f"<td>{html.escape(value)}</td>"
    if isinstance(value, Change) and value.detail:
        return (f"<td class=num><span class=main>{html.escape(value.main)}</span>"
                f"<span class=detail>{html.escape(value.detail)}</span></td>")
    return f"<td class=num><span class=main>{html.escape(value)}</span></td>"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(_cell(h, c) for h, c in zip(header, row, strict=True))
        body.append(f"<tr>{cells}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _figure(plot: Plot) -> str:
    data = base64.b64encode(plot.png).decode("ascii")
    return (f'<figure id="{html.escape(plot.slug)}"><img alt="{html.escape(plot.title)}" '
            f'src="data:image/png;base64,{data}"><figcaption><strong>{html.escape(plot.title)}.</strong> '
            f"{html.escape(plot.caption)}</figcaption></figure>")


def _title(runs: list[Run]) -> str:
    return "pare report: " + (runs[0].name if len(runs) == 1 else f"{len(runs)} runs")


def render_html(runs: list[Run], plots: list[Plot] | None) -> str:
    """The page: summary table, per-task accuracies, plots (or a note when there are none), notes.

    Args:
        runs: the runs, in the order to show them.
        plots: rendered plots, or None when matplotlib is missing.
    """
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"<header><h1>{html.escape(_title(runs))}</h1><div class=sub>{len(runs)} run(s), generated {when}. "
             "Each cell shows the figure after the prune, with the dense figure and the change below it."
             "</div></header>"]
    parts.append("<h2>Runs side by side</h2>")
    parts.append(_table(SUMMARY_HEADER, summary_rows(runs)))
    theader, trows = task_rows(runs)
    if trows:
        parts.append("<h2>Zero-shot accuracy per task</h2>")
        parts.append(_table(theader, trows))
    parts.append("<h2>Plots</h2>")
    if plots is None:
        parts.append(f"<p class=note>{html.escape(NO_PLOTS)}</p>")
    elif not plots:
        parts.append("<p class=note>The runs hold no figures or scores to plot.</p>")
    else:
        parts += [_figure(p) for p in plots]
    parts.append("<h2>Runs</h2>")
    for r in runs:
        notes = notes_of(r)
        parts.append(f"<h3>{html.escape(r.name)}</h3><div class=sub><code>{html.escape(str(r.path))}</code> — "
                     f"{html.escape(r.methods)}</div>")
        if notes:
            parts.append("<ul class=notes>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            "<meta name=viewport content='width=device-width, initial-scale=1'>"
            f"<title>{html.escape(_title(runs))}</title><style>{CSS}</style></head>"
            f"<body><main>{''.join(parts)}</main></body></html>\n")


def render_markdown(runs: list[Run], plots: list[Plot] | None, plot_dir: Path | None = None,
                    relative_to: Path | None = None) -> str:
    """The markdown twin; with ``plot_dir`` the plots are written there as PNG files and linked."""
    lines = [f"# {_title(runs)}", "", "Figures read “before → after” the prune.", "", "## Runs side by side", "",
             markdown_table(SUMMARY_HEADER, summary_rows(runs)), ""]
    theader, trows = task_rows(runs)
    if trows:
        lines += ["## Zero-shot accuracy per task", "", markdown_table(theader, trows), ""]
    lines += ["## Plots", ""]
    if plots is None:
        lines += [NO_PLOTS, ""]
    elif plot_dir is not None:
        plot_dir.mkdir(parents=True, exist_ok=True)
        for i, p in enumerate(plots):
            f = plot_dir / f"{i:02d}-{p.slug}.png"
            f.write_bytes(p.png)
            link = f.relative_to(relative_to) if relative_to and f.is_relative_to(relative_to) else f
            lines += [f"![{p.title}]({link.as_posix()})", "", f"*{p.title}.* {p.caption}", ""]
    else:
        lines += ["The plots are in the HTML report.", ""]
    lines += ["## Notes", ""]
    for r in runs:
        lines += [f"- **{r.name}** (`{r.path}`): {r.methods}"]
        lines += [f"  - {n}" for n in notes_of(r)]
    return "\n".join(lines) + "\n"
