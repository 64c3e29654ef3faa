"""``pare report``'s content from manifests written in code: the side-by-side table, per-task accuracies,
per-layer views, the markdown twin and the self-contained HTML (no model is built here)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import pare.reporting as reporting
from pare.errors import ConfigError
from pare.reporting import read_runs, write_report
from pare.reporting.runs import kept_widths, layer_sparsity, summary_rows, task_rows

TASKS_BEFORE = {"piqa": {"acc": 0.60, "acc_norm": 0.61, "n": 100}, "boolq": {"acc": 0.55, "n": 100}}
TASKS_AFTER = {"piqa": {"acc": 0.58, "acc_norm": 0.60, "n": 100}, "boolq": {"acc": 0.50, "n": 100}}


def _stage(method: str, config: dict, **extra) -> dict:
    figures = {"ppl_before": 10.0, "params_before": 1000, "size_on_disk_bytes_before": 4000,
               "prefill_tokens_per_s_before": 200.0, "decode_tokens_per_s_before": 20.0, "dataset_before": "wikitext2",
               "dataset_after": "wikitext2", **extra.pop("figures", {})}
    return {"method": method, "config": config, "figures": figures, "modules": {}, "edits": [], "scores": {},
            "notes": [], "prune_seconds": 1.5, "peak_rss_mb": 300.0, "version": 1, **extra}


def _save(root: Path, name: str, manifest: dict) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "pare.json").write_text(json.dumps(manifest))
    return path


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    wanda = _stage("wanda", {"sparsity": 0.5, "pattern": "2:4", "profile": "uniform"},
                   figures={"ppl_after": 14.0, "params_after": 1000, "size_on_disk_bytes_after": 4000,
                            "prefill_tokens_per_s_after": 190.0, "decode_tokens_per_s_after": 19.0,
                            "nonzero_before": 1000, "nonzero_after": 600,
                            "zeroshot_before": {"tasks": TASKS_BEFORE, "mean_acc": 0.575},  # as the CLI stores it
                            "zeroshot_after": TASKS_AFTER,  # a plain {task: ...} is read too
                            "zeroshot_mean_before": 0.575, "zeroshot_mean_after": 0.54},
                   modules={"model.layers.0.mlp.down_proj": {"numel": 100, "nonzero": 50, "sparsity": 0.5},
                            "model.layers.0.self_attn.q_proj": {"numel": 100, "nonzero": 30, "sparsity": 0.7},
                            "model.layers.1.mlp.down_proj": {"numel": 200, "nonzero": 100, "sparsity": 0.5}})
    depth = _stage("shortgpt", {"num_layers": 1, "param_ratio": None},
                   figures={"ppl_after": 25.0, "params_after": 750, "size_on_disk_bytes_after": 3000},
                   scores={"block_influence": {"0": 0.3, "1": 0.1, "2": 0.2}, "removed_layers": [1],
                           "reason": "lowest Block Influence"},
                   edits=[{"op": "remove_layers", "removed": [1], "kept": [0, 2], "layers_path": "model.layers",
                           "num_layers_before": 3, "num_layers_after": 2}])
    osscar = _stage("osscar", {"mlp_ratio": 0.25, "attn_ratio": 0.0},
                    figures={"ppl_before": 25.0, "params_before": 750, "ppl_after": 30.0, "params_after": 600},
                    edits=[{"op": "mlp_channels", "layer": 0, "width": 96},
                           {"op": "mlp_channels", "layer": 1, "width": 96}],
                    scores={"mlp_error": {"0": {"refit": 0.1, "no_refit": 0.2, "swaps": 3},
                                          "1": {"refit": 0.15, "no_refit": 0.25, "swaps": 1}}})
    chain = {**osscar, "history": [depth, osscar]}
    return [_save(tmp_path, "wanda", wanda), _save(tmp_path, "depth", depth), _save(tmp_path, "chain", chain)]


def test_summary_rows_show_before_after_and_change(runs: list[Path]) -> None:
    rows = {r[0]: r for r in summary_rows(read_runs(runs))}
    assert rows["wanda"][1] == "wanda"
    assert rows["wanda"][2] == "sparsity=0.5, pattern=2:4"  # defaults (uniform profile) left out
    assert rows["wanda"][3] == "10.00 → 14.00 (wikitext2)"
    assert rows["wanda"][4] == "0.575 → 0.540"
    assert rows["wanda"][6] == "1,000 → 600 (-40%)"
    assert rows["depth"][2] == "num_layers=1, removed layers [1]"
    assert rows["depth"][5] == "1,000 → 750 (-25%)"
    assert rows["depth"][7] == "4,000 → 3,000 (-25%)"
    assert rows["depth"][8] == "200 → -"  # measured before only: never shown as the pruned figure
    # a chain: both methods in order, before from the first stage and after from the last
    assert rows["chain"][1] == "shortgpt → osscar"
    assert rows["chain"][2] == "num_layers=1, removed layers [1] → mlp_ratio=0.25"
    assert rows["chain"][5] == "1,000 → 600 (-40%)"
    assert rows["chain"][3].startswith("10.00 → 30.00")
    assert rows["chain"][10] == "3.0"  # prune seconds add up over the stages


def test_task_rows_only_for_runs_with_zero_shot(runs: list[Path]) -> None:
    header, rows = task_rows(read_runs(runs))
    assert header == ("run", "piqa", "boolq", "mean")
    assert rows == [("wanda", "0.600 → 0.580", "0.550 → 0.500", "0.575 → 0.540")]


def test_per_layer_views(runs: list[Path]) -> None:
    wanda, _, chain = read_runs(runs)
    assert layer_sparsity(wanda.stages[0]) == {0: pytest.approx(0.6), 1: pytest.approx(0.5)}
    assert kept_widths(chain.stages[-1]) == {"mlp": {0: 96, 1: 96}, "heads": {}}


def test_markdown_twin_has_the_tables(runs: list[Path], tmp_path: Path) -> None:
    out = write_report(runs, md=tmp_path / "r.md", plots=False)
    text = (tmp_path / "r.md").read_text()
    assert out.html is None and out.markdown == tmp_path / "r.md"
    assert "| run | method | settings | PPL |" in text
    assert "| wanda | wanda | sparsity=0.5, pattern=2:4 | 10.00 → 14.00 (wikitext2) |" in text
    assert "| run | piqa | boolq | mean |" in text
    assert "shortgpt: lowest Block Influence" in text  # the method's reason is kept


def test_html_is_self_contained_with_one_image_per_plot(runs: list[Path], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = write_report(runs, html=tmp_path / "r.html", md=tmp_path / "r.md")
    page = (tmp_path / "r.html").read_text()
    assert out.plots >= 5  # compression curve, speed, one per run
    assert page.count('src="data:image/png;base64,') == out.plots
    assert "<script" not in page and not re.search(r'(src|href)="(https?:)?//', page)
    assert "<td>wanda</td>" in page and "14.00" in page
    plots = sorted((tmp_path / "r_plots").iterdir())
    assert len(plots) == out.plots and all(p.read_bytes().startswith(b"\x89PNG") for p in plots)
    assert "](r_plots/00-compression-curve.png)" in (tmp_path / "r.md").read_text()


def test_speed_bars_are_ratios_to_the_dense_measured_beside_each_run(tmp_path: Path) -> None:
    from pare.reporting.plots import speed_values

    fig = {"ppl_after": 12.0, "params_after": 1000}
    quiet = _stage("wanda", {"sparsity": 0.5}, figures={**fig, "prefill_tokens_per_s_after": 210.0})
    loaded = _stage("osscar", {"mlp_ratio": 0.25}, figures={**fig, "prefill_tokens_per_s_before": 100.0,
                                                            "prefill_tokens_per_s_after": 130.0})
    runs = read_runs([_save(tmp_path, "quiet", quiet), _save(tmp_path, "loaded", loaded)])
    names, values, line, ratio = speed_values(runs, "prefill_tokens_per_s")
    assert ratio and line == 1.0 and names == ["dense", "quiet", "loaded"]
    assert values == pytest.approx([1.0, 1.05, 1.3])  # 210 / 200 and 130 / 100: each against its own dense
    del loaded["figures"]["prefill_tokens_per_s_before"], quiet["figures"]["prefill_tokens_per_s_before"]
    runs = read_runs([_save(tmp_path, "a", quiet), _save(tmp_path, "b", loaded)])
    assert speed_values(runs, "prefill_tokens_per_s") == (["a", "b"], [210.0, 130.0], None, False)
    assert speed_values(runs, "decode_tokens_per_s") is None


def test_without_matplotlib_tables_and_a_note(runs: list[Path], tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(reporting, "have_matplotlib", lambda: False)
    out = write_report(runs, html=tmp_path / "r.html", md=tmp_path / "r.md")
    page = (tmp_path / "r.html").read_text()
    assert out.plots == 0 and out.note and "pare[plots]" in out.note
    assert "pare[plots]" in page and "<img" not in page and "<td>wanda</td>" in page
    assert "pare[plots]" in (tmp_path / "r.md").read_text()
    assert not (tmp_path / "r_plots").exists()


def test_bad_inputs_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no output directory"):
        read_runs([])
    with pytest.raises(ConfigError, match="is not a directory"):
        read_runs([tmp_path / "missing"])
    (tmp_path / "plain").mkdir()
    with pytest.raises(ConfigError, match=r"has no pare\.json"):
        read_runs([tmp_path / "plain"])
    with pytest.raises(ConfigError, match="nothing to write"):
        write_report([tmp_path / "plain"])
