"""The coverage report (``bench/coverage.py``) on a few model types: it writes the JSON and markdown
tables, every cell is ok / refused (with a reason) / FAIL (with a traceback), and the families the
contract suite covers all work. The full report over every model type runs from the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TYPES = ("llama", "mamba", "qwen3_next", "gpt_oss", "bert", "llava")


def test_coverage_report_on_a_few_types(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "coverage.py"), "--out", str(tmp_path), "--types", ",".join(TYPES)],
        env=env, capture_output=True, text=True, timeout=1200, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "coverage.json").read_text())
    rows = {(r["model_type"], r["kind"]): r for r in data["rows"]}
    assert {t for t, _ in rows} == set(TYPES)
    methods = ("inspect", "sparsity", "depth", "width")
    for row in rows.values():
        if row["build"]["status"] != "ok":
            continue
        for m in methods:
            cell = row[m]
            assert cell["status"] in ("ok", "refused", "FAIL")
            if cell["status"] == "refused":
                assert cell["reason"]
            if cell["status"] == "FAIL":
                assert "Traceback" in cell["traceback"]
    for key in (("llama", "causal"), ("qwen3_next", "causal"), ("llava", "image-text")):
        assert all(rows[key][m]["status"] == "ok" for m in methods), {m: rows[key][m] for m in methods}
    assert rows[("mamba", "causal")]["width"]["status"] == "refused"
    assert rows[("bert", "causal")]["category"] == "encoder"
    table = (tmp_path / "coverage.md").read_text()
    assert "## Totals" in table and "| llama | causal | decoder | ok | ok | ok | ok | ok |" in table
    assert data["totals"]["causal/decoder"]["built"] >= 4
