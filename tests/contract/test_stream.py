"""Streaming (``--stream``): the same weights and manifest as the in-memory run, resumable, refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import pare
from pare.errors import ConfigError
from pare.stream import StreamConfig, parse_bytes, plan_stream, stream_prune
from stage_contract import stage_cases
from tiny import tiny_batch, tiny_model

RUNTIME = pare.RuntimeConfig(device="cpu", progress=False)
VOLATILE = {"prune_seconds", "peak_rss_mb"}


class Stop(Exception):
    """Raised by a test's event hook to interrupt a streamed run."""


def saved(tmp_path: Path, arch: str = "llama", **overrides) -> Path:
    """A tiny model saved sharded into several files (as large checkpoints are)."""
    src = tmp_path / f"src-{arch}"
    tiny_model(arch, **overrides).save_pretrained(src, max_shard_size="40KB")
    assert len(list(src.glob("*.safetensors"))) > 2
    return src


def in_memory(src: Path, out: Path, config: pare.PruneConfig, ids: torch.Tensor,
              runtime: pare.RuntimeConfig = RUNTIME) -> None:
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    report = pare.prune(model, config, ids, runtime=runtime, batch_size=2)
    pare.save(model, None, out, report)


def streamed(src: Path, out: Path, config: pare.PruneConfig, ids: torch.Tensor, runtime=RUNTIME, resume=False,
             event=None, **stream) -> Path:
    plan = plan_stream(str(src), config, out, ids, None, runtime, StreamConfig(stream=True, **stream), batch_size=2)
    return stream_prune(plan, runtime, resume=resume, event=event)[1]


def state(path: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def manifest(path: Path) -> dict:
    data = json.loads((path / "pare.json").read_text())
    for key in VOLATILE:
        data.pop(key)
    data["runtime"].pop("stream", None)
    data["figures"].pop("size_on_disk_bytes_after")
    return data


def assert_same_model(a: Path, b: Path) -> None:
    sa, sb = state(a), state(b)
    assert sorted(sa) == sorted(sb)
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"weights differ: {different[:5]}"
    assert manifest(a) == manifest(b)


STREAMED = ["wanda", "sparsegpt"]


@pytest.mark.parametrize(("method", "arch"), stage_cases(STREAMED, fast=True) + stage_cases(STREAMED, fast=False))
def test_streamed_equals_in_memory(tmp_path: Path, arch: str, method: str) -> None:
    src = saved(tmp_path, arch)
    ids = tiny_batch(4, 16)
    config = pare.config_from_dict({"method": method, "sparsity": 0.5})
    in_memory(src, tmp_path / "mem", config, ids)
    out = streamed(src, tmp_path / "stream", config, ids)
    assert_same_model(tmp_path / "mem", out)
    assert len(list(out.glob("model-*.safetensors"))) == tiny_model(arch).config.num_hidden_layers + 1
    assert not (tmp_path / ".stream.stream").exists()  # the work directory is gone once published
    pruned = state(out)
    assert any((t == 0).float().mean() > 0.4 for t in pruned.values())  # it pruned something


@pytest.mark.parametrize("activations", ["cpu", "disk"])
def test_activation_places_and_dense_inputs_give_the_same_weights(tmp_path: Path, activations: str) -> None:
    src = saved(tmp_path)
    ids = tiny_batch(4, 16)
    runtime = pare.RuntimeConfig(device="cpu", progress=False, sequential=False)
    config = pare.SparseGPTConfig(sparsity=0.5, pattern="2:4")
    in_memory(src, tmp_path / "mem", config, ids, runtime)
    out = streamed(src, tmp_path / "stream", config, ids, runtime, activations=activations)
    assert_same_model(tmp_path / "mem", out)


def test_data_free_magnitude_streams(tmp_path: Path) -> None:
    src = saved(tmp_path, "gpt2")
    config = pare.MagnitudeConfig(layer_sparsity=(0.5, 0.6, 0.7))
    in_memory(src, tmp_path / "mem", config, tiny_batch(4, 16))
    plan = plan_stream(str(src), config, tmp_path / "stream", None, None, RUNTIME, StreamConfig(stream=True),
                       batch_size=2)
    out = stream_prune(plan, RUNTIME)[1]
    assert_same_model(tmp_path / "mem", out)


def shard_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != "pare.json"}


@pytest.mark.parametrize(("where", "activations"), [("pruned", "device"), ("writing", "device"),
                                                     ("written", "device"), ("recorded", "device"),
                                                     ("writing", "disk"), ("recorded", "disk")])
def test_resume_after_an_interruption_gives_the_same_files(tmp_path: Path, where: str, activations: str) -> None:
    src = saved(tmp_path)
    ids = tiny_batch(4, 16)
    config = pare.SparseGPTConfig(sparsity=0.5)
    whole = streamed(src, tmp_path / "whole", config, ids, activations=activations)

    def interrupt(stage: str, layer: int) -> None:
        if (stage, layer) == (where, 1):
            raise Stop

    out = tmp_path / "resumed"
    with pytest.raises(Stop):
        streamed(src, out, config, ids, event=interrupt, activations=activations)
    assert not out.exists()
    work = tmp_path / ".resumed.stream"
    done = json.loads((work / "progress.json").read_text())["done"]
    assert done == (1 if where == "recorded" else 0)
    if where == "writing":  # a half-written shard is left as .partial and written again
        assert any(p.name.endswith(".partial") for p in work.iterdir())
    with pytest.raises(ConfigError, match="--resume"):  # not resumed silently, nor started over
        streamed(src, out, config, ids, activations=activations)
    streamed(src, out, config, ids, resume=True, activations=activations)
    assert shard_bytes(out) == shard_bytes(whole)
    assert manifest(out) == manifest(whole)
    assert not work.exists()


def test_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    src = saved(tmp_path)
    ids = tiny_batch(4, 16)

    def interrupt(stage: str, layer: int) -> None:
        if stage == "recorded":
            raise Stop

    with pytest.raises(Stop):
        streamed(src, tmp_path / "o", pare.WandaConfig(sparsity=0.5), ids, event=interrupt)
    with pytest.raises(ConfigError, match="other settings"):
        streamed(src, tmp_path / "o", pare.WandaConfig(sparsity=0.6), ids, resume=True)
    out = streamed(src, tmp_path / "fresh", pare.WandaConfig(sparsity=0.5), ids, resume=True)  # nothing to resume
    assert (out / "pare.json").is_file()


def test_pickled_checkpoint_is_refused_without_unpickling(tmp_path: Path) -> None:
    src = tmp_path / "pickled"
    tiny_model("llama").config.save_pretrained(src)
    (src / "pytorch_model.bin").write_bytes(b"not a pickle: reading it would fail loudly")
    with pytest.raises(ConfigError, match=r"pickled.*never unpickles"):
        plan_stream(str(src), pare.WandaConfig(), tmp_path / "o", tiny_batch(4, 16), None, RUNTIME,
                    StreamConfig(stream=True))
    assert not (tmp_path / "o").exists()


def test_not_enough_memory_is_refused_before_any_work(tmp_path: Path) -> None:
    src = saved(tmp_path)
    with pytest.raises(ConfigError) as err:
        plan_stream(str(src), pare.SparseGPTConfig(), tmp_path / "o", tiny_batch(4, 16), None, RUNTIME,
                    StreamConfig(stream=True, max_memory="1MB"))
    msg = str(err.value)
    assert "largest decoder layer" in msg and "activations" in msg and "0.95 MiB" not in msg
    assert "1 MiB" in msg or "MiB is allowed" in msg
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.stream").exists()


@pytest.mark.parametrize("config", [pare.config_from_dict({"method": "ppl-window", "num_layers": 1}),
                                    pare.WandaConfig(profile="owl")])
def test_whole_model_methods_say_so_with_the_memory_they_need(tmp_path: Path, config) -> None:
    src = saved(tmp_path)
    with pytest.raises(ConfigError, match=r"cannot stream.*(GiB|MiB)"):
        plan_stream(str(src), config, tmp_path / "o", tiny_batch(4, 16), None, RUNTIME, StreamConfig(stream=True))


def test_stream_config_checks() -> None:
    assert parse_bytes("8GB") == 8 * 10**9 and parse_bytes("1.5GiB") == 3 * 2**29 and parse_bytes(512) == 512
    for bad in ("lots", "0GB", "-1"):
        with pytest.raises(ConfigError, match="max_memory"):
            parse_bytes(bad)
    with pytest.raises(ConfigError, match="add --stream"):
        StreamConfig(resume=True)
    with pytest.raises(ConfigError, match="activations"):
        StreamConfig(stream=True, activations="gpu")


def test_shards_hold_one_layer_each(tmp_path: Path) -> None:
    src = saved(tmp_path)
    out = streamed(src, tmp_path / "o", pare.WandaConfig(), tiny_batch(4, 16))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for name in sorted(set(index["weight_map"].values()))[1:]:
        with safe_open(str(out / name), "pt") as f:
            layers = {k.split(".")[2] for k in f.keys()}  # noqa: SIM118 - a safe_open handle is not iterable
        assert len(layers) == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streams_on_cuda_with_one_layer_on_the_device(tmp_path: Path) -> None:
    src = saved(tmp_path)
    ids = tiny_batch(4, 16)
    runtime = pare.RuntimeConfig(device="cuda", progress=False)
    out = streamed(src, tmp_path / "o", pare.WandaConfig(), ids, runtime)
    in_memory(src, tmp_path / "mem", pare.WandaConfig(), ids, runtime)
    sa, sb = state(out), state(tmp_path / "mem")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("options", [{"algorithm": "rtn", "group_size": 0}, {"algorithm": "gptq", "group_size": 0}])
def test_quantize_streams(tmp_path: Path, options: dict) -> None:
    src = saved(tmp_path, "qwen2")
    ids = tiny_batch(4, 16)
    config = pare.config_from_dict({"method": "quantize", **options})
    in_memory(src, tmp_path / "mem", config, ids)
    out = streamed(src, tmp_path / "stream", config, ids)
    assert_same_model(tmp_path / "mem", out)


def _killed_after_publish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out: Path) -> Path:
    """Stream into ``out``, stopped between the publish rename and the work directory's removal."""
    import pare.io.partial as partial

    work = out.with_name(f".{out.name}.stream")
    rmtree = partial.shutil.rmtree

    def stop_at_work(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if Path(path) == work:
            raise Stop
        return rmtree(path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(partial.shutil, "rmtree", stop_at_work)
        with pytest.raises(Stop):
            streamed(saved(tmp_path), out, pare.WandaConfig(sparsity=0.5), tiny_batch(4, 16))
    assert (out / "pare.json").is_file() and (work / "progress.json").is_file()
    return work


def test_work_left_by_a_run_killed_after_publishing_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "o"
    work = _killed_after_publish(tmp_path, monkeypatch, out)
    ids = tiny_batch(4, 16)
    with caplog.at_level("WARNING", logger="pare.io.partial"):
        plan = plan_stream(str(tmp_path / "src-llama"), pare.WandaConfig(sparsity=0.6), out, ids, None, RUNTIME,
                           StreamConfig(stream=True), batch_size=2, overwrite=True)
    assert not work.exists()
    assert any("published" in r.getMessage() and str(work) in r.getMessage() for r in caplog.records)
    stream_prune(plan, RUNTIME, overwrite=True)  # a fresh run, not a refusal to resume
    assert json.loads((out / "pare.json").read_text())["config"]["sparsity"] == 0.6
    assert not work.exists()


def test_only_pares_own_published_work_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "o"
    work = _killed_after_publish(tmp_path, monkeypatch, out)
    from pare.io.partial import PartialOutput

    (work / "notes.txt").write_text("mine")  # something pare did not write: the directory stays
    assert not PartialOutput(out).discard_if_published() and (work / "notes.txt").is_file()
    (work / "notes.txt").unlink()
    shard = next(out.glob("model-*.safetensors"))  # the output no longer holds this run's files
    data = shard.read_bytes()
    shard.unlink()
    shard.write_bytes(data)
    assert not PartialOutput(out).discard_if_published() and work.is_dir()
    with PartialOutput(out).locked():  # a run holds it
        shard.unlink()
        os.link(work / shard.name, shard)  # the output's file is the run's again
        assert not PartialOutput(out).discard_if_published() and work.is_dir()
    assert PartialOutput(out).discard_if_published() and not work.exists()
