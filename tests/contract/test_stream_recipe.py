"""A recipe streamed stage by stage (``pare run --stream``) equals the in-memory recipe, bitwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import pare
from pare.errors import ConfigError
from pare.stream import StreamConfig
from pare.stream.recipe import recipe_work_dir, stream_recipe
from tiny import tiny_batch, tiny_model

RUNTIME = pare.RuntimeConfig(device="cpu", progress=False)

RECIPES = {
    "sparsegpt+gptq": [{"method": "sparsegpt", "sparsity": 0.5}, {"method": "quantize", "scheme": "int4",
                                                                  "group_size": 32}],
    "wanda-2:4+magnitude+rtn": [{"method": "wanda", "pattern": "2:4"}, {"method": "magnitude", "sparsity": 0.6},
                                {"method": "quantize", "scheme": "int8", "algorithm": "rtn",
                                 "group_size": 32}],
}


def saved(tmp_path: Path, arch: str) -> Path:
    src = tmp_path / f"src-{arch}"
    tiny_model(arch).save_pretrained(src, max_shard_size="40KB")
    return src


def stages_of(path: Path) -> list[str]:
    return [s["method"] for s in json.loads((path / "pare.json").read_text())["stages"]]


def assert_same_weights(a: Path, b: Path) -> None:
    sa = AutoModelForCausalLM.from_pretrained(a).state_dict()
    sb = AutoModelForCausalLM.from_pretrained(b).state_dict()
    assert sorted(sa) == sorted(sb)
    assert not [k for k in sa if not torch.equal(sa[k], sb[k])]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_streamed_recipe_equals_in_memory(tmp_path: Path, arch: str, name: str) -> None:
    src = saved(tmp_path, arch)
    ids = tiny_batch(4, 16)
    configs = [pare.config_from_dict(d) for d in RECIPES[name]]
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    reports = pare.run(model, configs, ids, runtime=RUNTIME, batch_size=2)
    pare.save(model, None, tmp_path / "mem", reports)
    ran, out = stream_recipe(str(src), configs, tmp_path / "stream", ids, None, RUNTIME, StreamConfig(stream=True),
                             batch_size=2)
    assert [r.method for r in ran] == [c.method for c in configs]
    assert_same_weights(tmp_path / "mem", out)
    assert stages_of(out) == stages_of(tmp_path / "mem")
    assert not recipe_work_dir(out).exists()


def test_a_whole_model_stage_is_refused_with_the_memory_figure(tmp_path: Path) -> None:
    src = saved(tmp_path, "llama")
    configs = [pare.config_from_dict({"method": "wanda"}), pare.config_from_dict({"method": "shortgpt",
                                                                                  "num_layers": 1})]
    with pytest.raises(ConfigError, match=r"stage 2 \(shortgpt\) cannot stream.*about .*iB of weights"):
        stream_recipe(str(src), configs, tmp_path / "out", tiny_batch(4, 16), None, RUNTIME,
                      StreamConfig(stream=True), batch_size=2)
    assert not (tmp_path / "out").exists() and not recipe_work_dir(tmp_path / "out").exists()


def test_resume_skips_finished_stages_and_gives_the_same_weights(tmp_path: Path, monkeypatch) -> None:
    import pare.stream.recipe as rec

    src = saved(tmp_path, "llama")
    ids = tiny_batch(4, 16)
    configs = [pare.config_from_dict(d) for d in RECIPES["sparsegpt+gptq"]]
    stream_recipe(str(src), configs, tmp_path / "whole", ids, None, RUNTIME, StreamConfig(stream=True), batch_size=2)
    real = rec.stream_prune
    calls = []

    def second_fails(plan, *args, **kwargs):
        calls.append(plan.stage.config.method)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(plan, *args, **kwargs)

    monkeypatch.setattr(rec, "stream_prune", second_fails)
    with pytest.raises(KeyboardInterrupt):
        stream_recipe(str(src), configs, tmp_path / "out", ids, None, RUNTIME, StreamConfig(stream=True),
                      batch_size=2)
    assert recipe_work_dir(tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="--resume"):
        stream_recipe(str(src), configs, tmp_path / "out", ids, None, RUNTIME, StreamConfig(stream=True),
                      batch_size=2)
    calls.clear()
    monkeypatch.setattr(rec, "stream_prune", lambda plan, *a, **k: (calls.append(plan.stage.config.method),
                                                                     real(plan, *a, **k))[1])
    stream_recipe(str(src), configs, tmp_path / "out", ids, None, RUNTIME, StreamConfig(stream=True, resume=True),
                  batch_size=2)
    assert calls == ["quantize"]  # the finished SparseGPT stage was not run again
    assert_same_weights(tmp_path / "whole", tmp_path / "out")
    assert stages_of(tmp_path / "out") == ["sparsegpt", "quantize"]
