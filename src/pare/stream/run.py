"""``pare.stream_prune``: prune a model larger than memory, one decoder layer at a time, resumably.

The model is built on the ``meta`` device from its config; the parts outside the decoder layers are
read from the safetensors files, written to the first output shard and used to capture the first
layer's inputs; then each decoder layer is read, stepped by the stage's per-layer step (the same
one the in-memory run uses), its outputs computed for the next layer, and it is written to its own
output shard and freed. Everything is refused before any work when it cannot work: a method that
needs the whole model, pickled weights, not enough memory for one layer and the activations.

The weights written are those of the in-memory run (bitwise on the CPU) and the manifest has the
same content; what differs is the file layout (one shard per layer), so the size on disk differs
by the shards' headers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pare.arch import ArchOverride, describe
from pare.calibration.stream import MappedBatches, StreamRunner
from pare.config import CalibrationConfig, PruneConfig, RuntimeConfig, stage_for_config, usable_devices
from pare.errors import ConfigError
from pare.eval.cost import measure_cost
from pare.io.checkpoint import Checkpoint, KeyMap
from pare.io.outdir import check_output
from pare.io.partial import PartialOutput
from pare.methods.base import PruneContext
from pare.pipeline import check_split
from pare.report import Report
from pare.stream.config import StreamConfig, fmt_bytes
from pare.stream.files import Event, StreamFiles, build_skeleton, fingerprint
from pare.stream.plan import MemoryPlan, available_bytes, choose_activations, plan_memory

log = logging.getLogger(__name__)


@dataclass
class StreamPlan:
    """A streamed run checked and ready: nothing read but the config, the index and the calibration text."""

    source: str
    out: Path
    model: Any
    arch: Any
    stage: Any
    ckpt: Checkpoint
    keymap: KeyMap
    ids: torch.Tensor | None
    calibration: dict[str, Any] | None
    device: torch.device
    activations: str
    memory: MemoryPlan
    batch_size: int
    devices: list[torch.device]


def whole_model_bytes(model: Any) -> int:
    """Bytes of every parameter of a skeleton (tied ones once)."""
    seen = {id(p): p.numel() * p.element_size() for p in model.parameters()}
    return sum(seen.values())


def plan_stream(source: str, config: PruneConfig, out: str | Path, calibration: CalibrationConfig | torch.Tensor | None,
                tokenizer: Any, runtime: RuntimeConfig, stream: StreamConfig, dtype: torch.dtype | None = None,
                batch_size: int | None = None, overwrite: bool = False,
                arch_override: ArchOverride | None = None,
                devices: Sequence[str | torch.device] | None = None) -> StreamPlan:
    """Check everything a streamed run needs, before any weight is read.

    Args:
        devices: the compute devices as given, in place of the runtime's (internal: a device may
            repeat, so the tests split batches across ``["cpu", "cpu"]``).

    Raises:
        ConfigError: a method that needs the whole model (with the memory it would need), pickled
            weights, an output that cannot be written, not enough memory for one layer, several
            devices for a method that cannot split its batches.
    """
    all_devices = usable_devices(list(devices)) if devices else runtime.compute_devices()
    device = all_devices[0]
    if str(out).strip():  # an empty path is refused just below
        PartialOutput(out).discard_if_published()
    path = check_output(out, overwrite, source)
    ckpt = Checkpoint.open(source)
    model = build_skeleton(source, dtype)
    arch = describe(model, arch_override)
    stage = stage_for_config(config)(config)
    refusal = stage.stream_refusal()
    if refusal:
        need = whole_model_bytes(model)
        raise ConfigError(f"--stream: {refusal}. Without --stream it loads the whole model: about {fmt_bytes(need)} "
                          f"of weights ({model.dtype}) plus the calibration activations and the method's work; "
                          "prune on a machine with that much memory. Nothing was read or written.")
    if not runtime.sequential and not stage.dense_in_step:
        raise ConfigError(f"--stream with dense inputs (--no-sequential) needs a per-layer step that keeps the dense "
                          f"outputs itself; {config.method}'s does not: stream it with sequential inputs")
    check_split([stage], all_devices)
    stage.check(model, arch)
    keymap = KeyMap(model, ckpt.weight_map)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    missing = keymap.missing([n for n, _ in model.named_parameters(remove_duplicate=False)], tied)
    if missing:
        raise ConfigError(f"{source!r}: its safetensors files hold no weights for {missing[:3]} ({len(missing)} "
                          "parameters); the checkpoint does not match its config")
    ids, info, batch = _calibration(model, stage, calibration, tokenizer, batch_size)
    nsamples, seqlen = (int(ids.shape[0]), int(ids.shape[1])) if ids is not None else (0, 0)
    memory = plan_memory(model, arch, nsamples, seqlen, batch, dense=not runtime.sequential,
                         gram="gram" in getattr(type(stage), "stats", frozenset()), act_dtype=_dtype(model),
                         replicas=sum(d == device for d in all_devices[1:]))
    budget = stream.max_bytes or available_bytes(device)
    ram = budget if device.type == "cpu" else available_bytes(torch.device("cpu"))
    where = choose_activations(memory, stream.activations, device, budget, ram) if ids is not None else "device"
    log.info("streaming plan: %s; activations on %s", memory.describe(where, device), where)
    return StreamPlan(source, path, model, arch, stage, ckpt, keymap, ids, info, device, where, memory, batch,
                      all_devices)


def _dtype(model: Any) -> torch.dtype:
    first = next(model.parameters(), None)
    return first.dtype if first is not None else torch.float32


def _calibration(model: Any, stage: Any, calibration: Any, tokenizer: Any,
                 batch_size: int | None) -> tuple[torch.Tensor | None, dict[str, Any] | None, int]:
    from pare.api import calibration_for

    if stage.needs() == "nothing":
        return None, None, batch_size or 8
    if stage.needs() != "windows":
        raise ConfigError(f"--stream: {stage.config.method} needs gradients over the whole model; it cannot stream")
    ids, info, batch = calibration_for(model, calibration, tokenizer, batch_size)
    if ids is None:
        raise ConfigError(f"method {stage.config.method!r} needs calibration data: pass token windows or a "
                          "CalibrationConfig")
    return ids, info, batch


def stream_prune(plan: StreamPlan, runtime: RuntimeConfig, *, resume: bool = False, overwrite: bool = False,
                 tokenizer: Any = None, event: Event | None = None,
                 earlier: list[Report] | None = None, figures: dict[str, Any] | None = None) -> tuple[Report, Path]:
    """Run a checked :class:`StreamPlan`; returns the stage's report and the published output.

    Args:
        runtime: sequential / progress settings (the device is the plan's).
        resume: continue from the work directory of an interrupted run to the same output.
        overwrite: replace an existing saved model at the output.
        tokenizer: saved beside the model when given.
        event: called at each stage of each layer (see :data:`pare.stream.files.Event`).
        earlier: reports of earlier prunes of the source model (its manifest), kept in the new one.
        figures: added to the report's figures before it is written (e.g. ``size_on_disk_bytes_before``).
    """
    settings = {"method": plan.stage.config.to_dict(), "calibration": plan.calibration, "batch_size": plan.batch_size,
                "sequential": runtime.sequential, "dtype": str(plan.model.dtype), "device": plan.device.type,
                "activations": plan.activations}
    if len(plan.devices) > 1:  # the sums are taken in another order: a resume must split the batches alike
        settings["devices"] = [str(d) for d in plan.devices]
    wanted = fingerprint(plan.source, plan.ckpt, settings, plan.ids)
    part = PartialOutput(plan.out)
    with part.locked():
        record = part.progress()
        if record is not None and not resume:
            raise ConfigError(f"an interrupted streamed run to {str(plan.out)!r} left its work (layer "
                              f"{record.get('done', -1) + 1} of {plan.arch.num_layers} done) in {str(part.work)!r}: "
                              "pass --resume to continue it, or remove that directory to start over")
        if record is not None and record.get("fingerprint") != wanted:
            before = record.get("fingerprint") or {}
            changed = sorted(k for k in {*before, *wanted} if before.get(k) != wanted.get(k))
            raise ConfigError(f"--resume: the interrupted run to {str(plan.out)!r} used other settings ({changed}); "
                              f"resume with the same ones, or remove {str(part.work)!r} to start over")
        if record is None:
            part.clear()
            record = {"fingerprint": wanted}
        else:
            log.warning("resuming the streamed run to %s after layer %d", plan.out, record.get("done", -1))
        with torch.no_grad(), measure_cost() as cost:
            report = _run_layers(plan, runtime, part, record, event)
        report.prune_seconds = float(record.get("seconds", cost.seconds))
        report.peak_rss_mb = max(float(record.get("peak_rss_mb", 0.0)), cost.peak_rss_mb)
        report.figures.update(figures or {})
        return report, _publish(plan, part, record, report, tokenizer, overwrite, earlier or [])


def _run_layers(plan: StreamPlan, runtime: RuntimeConfig, part: PartialOutput, record: dict[str, Any],
                event: Event | None) -> Report:
    model, arch, stage = plan.model, plan.arch, plan.stage
    cfg = stage.config
    several = {"devices": [str(d) for d in plan.devices]} if len(plan.devices) > 1 else {}
    run_info = {"device": str(plan.device), **several, "dtype": str(model.dtype), "sequential": runtime.sequential,
                "offload": runtime.offload, "batch_size": plan.batch_size,
                "stream": {"activations": plan.activations, "resumed_after_layer": record.get("done")}}
    report = Report(method=cfg.method, config=cfg.to_dict(), calibration=plan.calibration, runtime=run_info,
                    arch_override=None)
    ctx = PruneContext(model, arch, plan.ids, runtime, report, plan.batch_size, device=plan.device,
                       devices=list(plan.devices))
    params = sum(p.numel() for p in model.parameters())
    files = StreamFiles(model, arch, plan.ckpt, plan.keymap, part, stage, record,
                        mapped=plan.activations == "disk", event=event)
    store = plan.device if plan.activations == "device" else torch.device("cpu")
    start = int(record.get("done", -1)) + 1
    runner = StreamRunner(model, arch, plan.ids if plan.ids is not None else torch.zeros(1, 1, dtype=torch.long),
                          files, plan.device, batch_size=plan.batch_size, sequential=runtime.sequential,
                          progress=runtime.progress, start=start, store=store, devices=plan.devices)
    files.load_outside(plan.device)
    files.write_outside()
    calls, hidden = None, None
    if plan.ids is not None:
        captured = runner.capture()
        calls, hidden = captured.calls, captured.hidden
        if start > 0 or plan.activations == "disk":
            hidden = _inputs(part, record, hidden, plan.activations, start)
    files.free_outside()
    stage.start(ctx)
    stage.begin_layers(ctx)
    if record.get("stage"):
        stage.restore_layer_state(record["stage"])
    for step in runner.stream_steps(calls or [], hidden):
        stage.layer_step(ctx, step)
    stage.end_layers(ctx)
    report.figures["params_before"] = params
    report.figures["params_after"] = params
    outside = int(record.get("outside_nonzero", 0))
    stage.finish_with(ctx, dict(record.get("modules", {})), outside + int(record.get("nonzero_before", 0)),
                      outside + int(record.get("nonzero_after", 0)))
    return report


def _inputs(part: PartialOutput, record: dict[str, Any], captured: list[torch.Tensor], where: str,
            start: int) -> list[torch.Tensor]:
    """The inputs of layer ``start``: the captured ones (a fresh run) or the recorded ones (a resume),
    in a memory-mapped pair of files for ``--activations disk``."""
    shapes = [t.shape for t in captured]
    dtype = captured[0].dtype
    if where == "disk":
        files = (part.work / "activations-0.bin", part.work / "activations-1.bin")
        current = int(record["inputs"]["mapped"]) if start > 0 else 0
        mapped = MappedBatches(files, shapes, dtype, current=current)
        if start == 0:
            for b, t in enumerate(captured):
                mapped.views[current][b].copy_(t)
            mapped.flush()
            list.__init__(mapped, mapped.views[current])
        return mapped
    device = captured[0].device
    return part.load_tensors(record["inputs"], device)


def _publish(plan: StreamPlan, part: PartialOutput, record: dict[str, Any], report: Report, tokenizer: Any,
             overwrite: bool, earlier: list[Report]) -> Path:
    from pare.io.save import manifest_of, weights_bytes

    reports = [*earlier, report]
    manifest = manifest_of(reports)

    def write_rest(tmp: Path) -> None:
        import json

        from pare.io.outdir import MANIFEST

        plan.model.config.save_pretrained(tmp)
        source_gen = Path(plan.source) / "generation_config.json"
        if source_gen.is_file():
            (tmp / source_gen.name).write_bytes(source_gen.read_bytes())
        elif getattr(plan.model, "generation_config", None) is not None and plan.model.can_generate():
            plan.model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if manifest is not None:
            size = weights_bytes(tmp)
            report.figures["size_on_disk_bytes_after"] = size
            for entry in [manifest, *manifest.get("stages", [])[-1:]]:
                entry["figures"]["size_on_disk_bytes_after"] = size
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str), encoding="utf-8")
        mask = os.umask(0o022)
        os.umask(mask)
        tmp.chmod(0o777 & ~mask)
        for f in tmp.rglob("*"):
            if f.is_file():
                f.chmod(0o666 & ~mask)

    return part.publish(record["shards"], write_rest, overwrite)
