"""``pare report`` as a user sees it: the HTML rendered by headless Chromium (Debian's ``chromium``), a
screenshot whose plot regions are not blank, and the table's text in the rendered DOM."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pare.cli import main
from tiny import tiny_model, tiny_text, tiny_tokenizer

pytestmark = pytest.mark.slow
BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
PLOT_BLUE = (0x2E, 0x86, 0xDE)  # the bars' and points' colour in pare.reporting.plots


def _chromium(*args: str) -> subprocess.CompletedProcess:
    assert BROWSER is not None
    return subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--no-first-run", *args], capture_output=True, text=True, timeout=180, check=False)


def _pixels(png: bytes) -> np.ndarray:
    """The screenshot as an ``[height, width, 3]`` uint8 array."""
    from PIL import Image  # matplotlib depends on Pillow: present whenever plots are

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.fixture
def report(tmp_path: Path) -> Path:
    pytest.importorskip("matplotlib")
    dense = tmp_path / "dense"
    tiny_model("llama", num_hidden_layers=4).save_pretrained(dense)
    tiny_tokenizer().save_pretrained(dense)
    text = tmp_path / "text.txt"
    text.write_text(tiny_text())
    common = ["--calib", str(text), "--seqlen", "16", "--nsamples", "4", "--eval", str(text), "--eval-max-windows", "4",
              "--no-progress"]
    assert main(["prune", "--model", str(dense), "--method", "magnitude", "--sparsity", "0.5", "--out",
                 str(tmp_path / "magnitude"), *common]) == 0
    assert main(["prune", "--model", str(dense), "--method", "shortgpt", "--num-layers", "1", "--out",
                 str(tmp_path / "shortgpt"), *common]) == 0
    html = tmp_path / "report.html"
    assert main(["report", str(tmp_path / "magnitude"), str(tmp_path / "shortgpt"), "--html", str(html)]) == 0
    return html


@pytest.mark.skipif(BROWSER is None, reason="no headless browser: apt-get install chromium")
def test_browser_shows_the_table_and_the_plots(report: Path, tmp_path: Path) -> None:
    dom = _chromium("--dump-dom", report.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    for text in ("Runs side by side", "magnitude", "shortgpt", "removed layers", "Compression curve", "Speed"):
        assert text in dom.stdout, text
    shot = tmp_path / "shot.png"
    run = _chromium(f"--screenshot={shot}", "--window-size=1400,2600", report.as_uri())
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    pixels = _pixels(shot.read_bytes()).astype(np.int32)
    # the plots' blue fills large regions (bars, points), far more rows than the header's 3-pixel rule
    blue = (np.abs(pixels - np.array(PLOT_BLUE)) <= 12).all(axis=-1)
    blue_rows = int(blue.any(axis=1).sum())
    assert blue_rows > 150, f"plot colour on only {blue_rows} rows of {pixels.shape[0]}: images not drawn?"
    # and not a blank or broken-image page: anti-aliased plots and text give many distinct colours
    packed = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]
    assert np.unique(packed).size > 500
