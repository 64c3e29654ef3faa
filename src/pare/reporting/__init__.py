"""Reports of saved runs for people: an HTML page with plots and a markdown twin (``pare report``).

    from pare.reporting import write_report
    write_report(["out/wanda", "out/osscar"], html="report.html", md="report.md")
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pare.reporting.plots import Plot, all_plots, have_matplotlib
from pare.reporting.render import NO_PLOTS, render_html, render_markdown
from pare.reporting.runs import Run, read_runs

log = logging.getLogger(__name__)


@dataclass
class Written:
    """What :func:`write_report` wrote, and whether it has plots."""

    html: Path | None
    markdown: Path | None
    plots: int
    note: str | None


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to a temporary sibling, then rename: a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(paths: list[str | Path], html: str | Path | None = None, md: str | Path | None = None,
                 plots: bool = True) -> Written:
    """Read the runs saved in ``paths`` and write the HTML page and/or the markdown twin.

    Args:
        paths: output directories of ``pare prune`` (each with a ``pare.json``).
        html: the HTML file to write (self-contained: plots embedded, no external files).
        md: the markdown file to write; its plots go to ``<md stem>_plots/`` beside it.
        plots: draw plots (needs matplotlib); False writes the tables only.

    Raises:
        ConfigError: a path is not a pare output, or neither ``html`` nor ``md`` is given.
    """
    from pare.errors import ConfigError

    if html is None and md is None:
        raise ConfigError("nothing to write: pass --html FILE and/or --md FILE")
    runs = read_runs(list(paths))
    drawn: list[Plot] | None = None
    note = None
    if plots and have_matplotlib():
        drawn = all_plots(runs)
    elif plots:
        note = NO_PLOTS
        log.warning(NO_PLOTS)
    html_path = md_path = None
    if html is not None:
        html_path = Path(html)
        _atomic_write(html_path, render_html(runs, drawn))
    if md is not None:
        md_path = Path(md)
        plot_dir = md_path.parent / f"{md_path.stem}_plots" if drawn else None
        _atomic_write(md_path, render_markdown(runs, drawn, plot_dir, md_path.parent))
    return Written(html_path, md_path, len(drawn or []), note)


__all__ = ["Plot", "Run", "Written", "read_runs", "write_report"]
