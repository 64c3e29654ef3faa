"""``pare eval --tasks`` and ``pare prune --eval-tasks`` end to end on a tiny model and tiny task files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pare.cli import main
from tiny import tiny_model
from tiny_zeroshot import write_zeroshot_dir


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch) -> Path:
    root = write_zeroshot_dir(tmp_path / "data")
    monkeypatch.setenv("PARE_DATA_DIR", str(root))
    return root


def test_eval_tasks_table_and_json(model_dir: Path, data_dir: Path, capsys) -> None:
    assert main(["eval", str(model_dir), "--tasks", "piqa,winogrande,lambada_openai", "--limit", "2",
                 "--batch-size", "3"]) == 0
    out = capsys.readouterr().out
    assert "piqa" in out and "winogrande" in out and "lambada_openai" in out and "mean acc" in out
    assert "prefill" not in out and "ppl" in out  # tasks alone: no perplexity run, no speed run
    assert main(["eval", str(model_dir), "--tasks", "piqa,arc_easy", "--limit", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    zs = res["zeroshot"]
    assert set(zs["tasks"]) == {"piqa", "arc_easy"} and zs["tasks"]["arc_easy"]["n"] == 2
    assert res["zeroshot_mean"] == pytest.approx((zs["tasks"]["piqa"]["acc"] + zs["tasks"]["arc_easy"]["acc"]) / 2)
    assert "ppl" not in res


def test_prune_eval_tasks_before_and_after(model_dir: Path, data_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(model_dir), "--method", "magnitude", "--sparsity", "0.5", "--out",
                 str(out), "--eval-tasks", "piqa,arc_easy", "--eval-limit", "2", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "zero-shot mean acc" in text and "piqa acc" in text and "arc_easy acc_norm" in text
    figures = json.loads((out / "pare.json").read_text())["figures"]
    for when in ("before", "after"):
        assert figures[f"zeroshot_{when}"]["tasks"]["piqa"]["n"] == 2
        assert figures[f"zeroshot_mean_{when}"] == figures[f"zeroshot_{when}"]["mean_acc"]


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "piqa", "--limit", "0"], "--limit must be a positive integer"),
    (["--tasks", "piqa", "--limit", "-2"], "--limit must be a positive integer"),
    (["--tasks", "piqa,nope"], "unknown task 'nope': known tasks are piqa, arc_easy"),
    (["--limit", "3"], "--limit applies to --tasks or --lm-eval"),
])
def test_eval_bad_task_options_are_refused_before_loading(argv, message, tmp_path: Path, capsys) -> None:
    assert main(["eval", str(tmp_path / "no-model"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_zero_batch_size_is_a_usage_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(tmp_path / "no-model"), "--tasks", "piqa", "--batch-size", "0"])
    assert exc.value.code == 2
    assert "argument --batch-size: must be a positive integer" in capsys.readouterr().err


def test_prune_bad_task_options_are_refused(model_dir: Path, tmp_path: Path, capsys) -> None:
    base = ["prune", "--model", str(model_dir), "--method", "magnitude", "--sparsity", "0.5", "--no-save"]
    assert main([*base, "--eval-tasks", "piqa", "--eval-limit", "0"]) == 2
    assert "--eval-limit must be a positive integer" in capsys.readouterr().err
    assert main([*base, "--eval-tasks", "hellaswagg"]) == 2
    assert "unknown task 'hellaswagg'" in capsys.readouterr().err


def test_missing_task_data_names_every_place_looked(model_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PARE_DATA_DIR", str(tmp_path / "nothing-here"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert main(["eval", str(model_dir), "--tasks", "boolq"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nothing-here" / "zeroshot" / "boolq" / "val.jsonl") in err
    assert "datasets.load_dataset('aps/super_glue', 'boolq', split='validation')" in err


def test_lm_eval_without_the_harness_says_how_to_install(model_dir: Path, capsys) -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("lm-eval is installed here: the missing-package message cannot be seen")
    assert main(["eval", str(model_dir), "--lm-eval", "piqa", "--limit", "2"]) == 2
    assert "pip install 'pare[lm-eval]'" in capsys.readouterr().err


def test_model_without_tokenizer_gets_a_clear_error(tmp_path: Path) -> None:
    from pare.api import evaluate
    from pare.errors import ConfigError

    with pytest.raises(ConfigError, match="tokenizer"):
        evaluate(tiny_model("llama"), None, dataset=None, speed=False, tasks="piqa")


def test_model_directory_without_tokenizer_files_is_refused_naming_them(tmp_path: Path, capsys) -> None:
    tiny_model("llama").save_pretrained(tmp_path / "no-tokenizer")
    assert main(["eval", str(tmp_path / "no-tokenizer"), "--tasks", "piqa", "--limit", "2"]) == 2
    err = capsys.readouterr().err
    assert "has no tokenizer: none of tokenizer.json, tokenizer_config.json" in err
    assert "save_pretrained" in err and "sentencepiece" not in err  # not transformers' conversion advice
