"""``pare study``: a grid on a tiny saved Llama, resumed after a kill, run as Ray tasks, reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pare.cli import main
from pare.errors import ConfigError
from pare.study import Study, StudySettings, build_grid, read_study
from pare.study.report import write_study_report

PRUNE = "none; sparsegpt:2:4; osscar:0.25,round_to=32"
QUANT = "none; int4-g32; gptq-mxfp4"
ORDERS = "prune-first,quant-first,joint"
STABLE = ("ppl", "bytes", "bits_per_param", "params", "nonzero_params", "layouts", "point")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _settings(model_dir: Path, text_file: Path) -> StudySettings:
    return StudySettings(model=str(model_dir), calibration={"dataset": str(text_file), "nsamples": 4, "seqlen": 32,
                                                            "batch_size": 4},
                         eval=str(text_file), eval_seqlen=64, eval_max_windows=2)


def _stable(results: list[dict]) -> dict[str, dict]:
    return {r["point"]["id"]: {k: r[k] for k in STABLE} for r in results}


class Killed(Exception):
    pass


def test_resumed_study_equals_an_uninterrupted_one(model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    points = build_grid(PRUNE, QUANT, ORDERS)
    settings = _settings(model_dir, text_file)
    whole = Study(tmp_path / "whole", settings, points)
    whole.run()
    _, full = read_study(tmp_path / "whole")
    assert len(full) == len(points)

    finished: list[str] = []

    def kill_after_three(point, result) -> None:
        finished.append(point.id)
        if len(finished) == 3:
            raise Killed  # as a kill between two points: three results are on disk, the rest not

    part = Study(tmp_path / "part", settings, points)
    with pytest.raises(Killed):
        part.run(on_result=kill_after_three)
    # a kill while a point's file was being written leaves only a temporary file, never a half JSON
    (tmp_path / "part" / "points" / ".sparsegpt-2-4.json.abc.tmp").write_text("{\"half")
    assert len(part.pending()) == len(points) - 3
    rerun: list[str] = []
    Study(tmp_path / "part", settings, points).run(on_result=lambda p, r: rerun.append(p.id))
    assert sorted(rerun) == sorted(p.id for p in points if p.id not in finished)
    _, resumed = read_study(tmp_path / "part")
    assert _stable(resumed) == _stable(full)
    # a third run has nothing left to do
    assert Study(tmp_path / "part", settings, points).run() == []


def test_points_measure_what_they_claim(model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    points = build_grid("none; sparsegpt:2:4", "none; int4-g32; gptq-int4-g32", "prune-first,quant-first,joint")
    Study(tmp_path / "s", _settings(model_dir, text_file), points).run()
    study, results = read_study(tmp_path / "s")
    by = {r["point"]["id"]: r for r in results}
    dense = by["dense"]
    assert dense["bytes"] == study["reference_bytes"]
    assert dense["bits_per_param"] == 16
    # every 2:4 point stays 2:4 whatever the order (GPTQ after pruning keeps the zeros)
    for pid in ("sparsegpt-2-4", "sparsegpt-2-4__int4-g32__prune-first", "sparsegpt-2-4__int4-g32__quant-first",
                "sparsegpt-2-4__gptq-int4-g32__prune-first", "sparsegpt-2-4__int4-g32__joint"):
        # 2:4, or a bitmask when rounding zeroed a few more weights (then cheaper than the 2:4 indices)
        assert set(by[pid]["layouts"]) <= {"2:4", "bitmask"}, pid
        assert by[pid]["bits_per_param"] <= by["sparsegpt-2-4"]["bits_per_param"], pid
    q = by["sparsegpt-2-4__gptq-int4-g32__prune-first"]
    assert q["bytes"] < by["int4-g32"]["bytes"] < by["sparsegpt-2-4"]["bytes"] < dense["bytes"]
    assert all(isinstance(r["ppl"], float) for r in results)


def test_other_settings_are_refused(model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    points = build_grid("none", "int4-g32", "prune-first")
    Study(tmp_path / "s", _settings(model_dir, text_file), points).run()
    other = StudySettings(**{**_settings(model_dir, text_file).to_dict(), "eval_max_windows": 3})
    with pytest.raises(ConfigError, match="eval_max_windows"):
        Study(tmp_path / "s", other, points).run()


def test_a_point_that_cannot_run_fails_before_any_work(model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    points = build_grid("none", "int4-g128", "prune-first")  # the tiny model's widths are 64 and 96
    with pytest.raises(ConfigError, match=r"study point int4-g128: .*multiple of 128"):
        Study(tmp_path / "s", _settings(model_dir, text_file), points).run()
    assert not (tmp_path / "s").exists()


def test_cli_study_resume_and_report(model_dir: Path, text_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "study"
    argv = ["study", "--model", str(model_dir), "--prune", "none; sparsegpt:0.5", "--quant", "none; int4-g32",
            "--order", "prune-first,joint", "--eval", str(text_file), "--eval-seqlen", "64", "--eval-max-windows",
            "2", "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32", "--out", str(out)]
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "5 points, 0 already done" in said and "done sparsegpt-0.5__int4-g32__joint" in said
    assert main([*argv, "--report"]) == 0
    said = capsys.readouterr().out
    assert "5 points, 5 already done" in said and "running 0" in said
    md = (out / "report.md").read_text()
    for title in ("## Budgets: the whole checkpoint", "## Budgets: the decoder matrices alone", "## Order ablation",
                  "sparsegpt-0.5__int4-g32__joint"):
        assert title in md
    assert (out / "report_plots" / "pareto-ppl.png").stat().st_size > 1000
    assert "data:image/png;base64" in (out / "report.html").read_text()
    # pare report on a study directory writes the study's report
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").is_file()


@pytest.mark.parametrize(("argv", "message"), [
    (["--prune", "sparsegpt:lots"], "'lots' is not a number"),
    (["--quant", "int5"], "unknown scheme 'int5'"),
    (["--order", "sideways"], "orders are prune-first, quant-first, joint"),
    (["--ray-address", "auto"], "apply to --executor ray"),
])
def test_cli_bad_specs(argv: list[str], message: str, model_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["study", "--model", str(model_dir), "--out", str(tmp_path / "s"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_ray_executor_equals_local(model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'pare[ray]'")
    points = build_grid("none; sparsegpt:2:4", "none; int4-g32", "prune-first,joint")
    settings = _settings(model_dir, text_file)
    Study(tmp_path / "local", settings, points).run()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        Study(tmp_path / "ray", settings, points).run("ray", cpus=1)
    finally:
        ray.shutdown()
    assert _stable(read_study(tmp_path / "ray")[1]) == _stable(read_study(tmp_path / "local")[1])
    assert json.loads((tmp_path / "ray" / "study.json").read_text())["settings"] == settings.to_dict()


def test_study_report_without_points_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no study\.json"):
        write_study_report(tmp_path)


def test_a_failing_point_does_not_stop_the_others(model_dir: Path, text_file: Path, tmp_path: Path,
                                                 monkeypatch) -> None:
    import pare.methods.quantize

    def refuse(*args, **kwargs):  # a pare error raised while the GPTQ pass runs, after every check passed
        raise ConfigError("the solver met something no check foresaw")

    monkeypatch.setattr(pare.methods.quantize, "gptq_quantize", refuse)
    points = build_grid("none", "gptq-int4-g16; int4-g8", "prune-first")
    with pytest.raises(ConfigError, match=r"1 study point\(s\) failed .*gptq-int4-g16: .*no check foresaw"):
        Study(tmp_path / "s", _settings(model_dir, text_file), points).run()
    assert [r["point"]["id"] for r in read_study(tmp_path / "s")[1]] == ["int4-g8"]


def test_a_gptq_group_its_solver_cannot_take_is_refused_before_any_work(model_dir: Path, text_file: Path,
                                                                      tmp_path: Path) -> None:
    points = build_grid("none", "int4-g8; gptq-int4-g8", "prune-first")
    with pytest.raises(ConfigError, match=r"study point gptq-int4-g8: .*multiple of 16"):
        Study(tmp_path / "s", _settings(model_dir, text_file), points).run()
    assert not (tmp_path / "s").exists()


def test_a_width_left_by_a_structured_cut_is_checked_before_any_work(model_dir: Path, text_file: Path,
                                                                     tmp_path: Path) -> None:
    # OSSCAR will leave 72 of 96 MLP channels: groups of 32 cannot quantize that width
    points = build_grid("none; osscar:0.25", "int4-g32", "prune-first")
    with pytest.raises(ConfigError, match=r"study point osscar-0.25__int4-g32__prune-first: .*72 inputs"):
        Study(tmp_path / "s", _settings(model_dir, text_file), points).run()
    assert not (tmp_path / "s").exists()


def test_cli_dry_run_lists_points_without_running(model_dir: Path, tmp_path: Path, capsys) -> None:
    argv = ["study", "--model", str(model_dir), "--prune", "none; sparsegpt:2:4", "--quant", "mxfp4",
            "--order", "prune-first,quant-first,joint", "--out", str(tmp_path / "s"), "--dry-run"]
    assert main(argv) == 0
    said = capsys.readouterr().out
    for pid in ("mxfp4", "sparsegpt-2-4__mxfp4__prune-first", "sparsegpt-2-4__mxfp4__quant-first",
                "sparsegpt-2-4__mxfp4__joint"):
        assert pid in said
    assert not (tmp_path / "s").exists()
