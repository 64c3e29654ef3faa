"""The streamed recipe's work directory ``.<out>.recipe/`` keeps the guards of a save: only pare's own
directory is written into or removed, a user's files are never deleted, ``--resume`` continues only
the same recipe, and a run killed at any point leaves nothing a later run would take as finished."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import pare
import pare.stream.recipe as rec
from pare.errors import ConfigError, OutputExistsError
from pare.stream import StreamConfig
from pare.stream.recipe import recipe_work_dir, stream_recipe
from pare.stream.recipe_dir import RECORD, RecipeWork, recipe_settings
from tiny import tiny_batch, tiny_model

RUNTIME = pare.RuntimeConfig(device="cpu", progress=False)
STAGES = [{"method": "wanda", "sparsity": 0.5}, {"method": "magnitude", "sparsity": 0.6}]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "src"
    tiny_model("llama").save_pretrained(path)
    return path


def configs() -> list[pare.PruneConfig]:
    return [pare.config_from_dict(d) for d in STAGES]


def run(src: Path, out: Path, resume: bool = False, overwrite: bool = False, ids=None):
    return stream_recipe(
        str(src),
        configs(),
        out,
        tiny_batch(4, 16) if ids is None else ids,
        None,
        RUNTIME,
        StreamConfig(stream=True, resume=resume),
        batch_size=2,
        overwrite=overwrite,
    )


def interrupted_after_stage_one(src: Path, out: Path, monkeypatch: pytest.MonkeyPatch, also=None) -> None:
    real = rec.stream_prune
    calls: list[str] = []

    def second_fails(plan, *args, **kwargs):
        calls.append(plan.stage.config.method)
        if len(calls) == 2:
            if also is not None:
                also()
            raise KeyboardInterrupt
        return real(plan, *args, **kwargs)

    monkeypatch.setattr(rec, "stream_prune", second_fails)
    with pytest.raises(KeyboardInterrupt):
        run(src, out)
    monkeypatch.setattr(rec, "stream_prune", real)


@pytest.mark.parametrize("kind", ["symlink", "file", "foreign directory"])
def test_a_work_directory_pare_did_not_make_is_refused_and_left_alone(src: Path, tmp_path: Path, kind: str) -> None:
    out = tmp_path / "out"
    work = recipe_work_dir(out)
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    if kind == "symlink":
        work.symlink_to(target, target_is_directory=True)
    elif kind == "file":
        work.write_text("mine")
    else:
        work.mkdir()
        (work / "stage-1").mkdir()
        (work / "stage-1" / "notes.txt").write_text("mine")
    for resume in (False, True):
        with pytest.raises(ConfigError, match="remove it yourself"):
            run(src, out, resume=resume)
    assert not out.exists()
    assert (target / "notes.txt").read_text() == "mine" and sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    if kind == "foreign directory":
        assert (work / "stage-1" / "notes.txt").read_text() == "mine"


def test_resume_with_other_settings_is_refused(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    interrupted_after_stage_one(src, out, monkeypatch)
    assert (recipe_work_dir(out) / "stage-1" / "pare.json").is_file()
    with pytest.raises(ConfigError, match=r"other settings \(\['calibration'\]\)"):
        run(src, out, resume=True, ids=tiny_batch(4, 16, seed=1))  # stage 1 was made from other windows
    run(src, out, resume=True)
    assert (out / "pare.json").is_file() and not recipe_work_dir(out).exists()


def test_user_files_in_the_work_directory_are_never_deleted(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    out = tmp_path / "out"
    work = recipe_work_dir(out)
    interrupted_after_stage_one(src, out, monkeypatch, also=lambda: (work / "mine.txt").write_text("keep"))
    with caplog.at_level(logging.WARNING):
        run(src, out, resume=True)
    assert (out / "pare.json").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["mine.txt"]  # the stages, record and lock went
    assert (work / "mine.txt").read_text() == "keep"
    assert "mine.txt" in caplog.text


def test_a_published_run_killed_before_removing_its_work_directory(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    monkeypatch.setattr(RecipeWork, "discard", lambda self: None)  # killed right after publishing
    run(src, out)
    monkeypatch.undo()
    work = recipe_work_dir(out)
    assert (work / "stage-1" / "pare.json").is_file() and (out / "pare.json").is_file()
    with pytest.raises(OutputExistsError):  # the leftover is removed; the output itself is not replaced
        run(src, out)
    assert not work.exists() and (out / "pare.json").is_file()
    run(src, out, overwrite=True)
    assert not work.exists()


def test_a_deletion_killed_midway_is_finished_by_the_next_run(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    dead = 2**22 + 12345  # above the default pid_max: no such process
    aside = recipe_work_dir(out).with_name(f"{recipe_work_dir(out).name}.del-{dead}")
    (aside / "stage-1").mkdir(parents=True)
    (aside / RECORD).write_text(json.dumps({"pare": "streamed recipe", "settings": {}}))
    foreign = recipe_work_dir(out).with_name(f"{recipe_work_dir(out).name}.del-{dead + 1}")
    foreign.mkdir()  # no record: not pare's, left alone
    run(src, out)
    assert not aside.exists() and foreign.is_dir()


def test_two_runs_to_one_output_do_not_share_the_work_directory(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    interrupted_after_stage_one(src, out, monkeypatch)
    settings = recipe_settings(str(src), configs(), tiny_batch(4, 16), RUNTIME, 2, None)
    with RecipeWork(out, settings).locked(), pytest.raises(ConfigError, match="another pare process"):
        run(src, out, resume=True)
    assert (recipe_work_dir(out) / "stage-1" / "pare.json").is_file()
