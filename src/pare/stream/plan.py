"""How much memory a streamed prune needs: one decoder layer, the activations, the method's work.

The figures come from the model skeleton's shapes (nothing is read): the largest decoder layer in
the compute dtype, the parts outside the layers held while the first layer's inputs are captured,
the calibration activations ``N x L x hidden``, one batch's forward through a layer, and the
method's per-layer work (SparseGPT's Gram matrices and inverse-Hessian factor, the mask of the
largest matrix). The process itself (Python, torch) is measured, not guessed.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import psutil
import torch
from torch import nn

from pare.arch.roles import ModelArch
from pare.arch.targets import layer_targets
from pare.errors import ConfigError
from pare.stream.config import fmt_bytes


@dataclass
class MemoryPlan:
    """Bytes of each part of a streamed run (see the module docstring)."""

    layer: int
    outside: int
    activations: int
    forward: int
    method: int
    process: int
    replicas: int = 0
    """Copies of the current layer on the same device (several devices listed as one, e.g. the tests'
    ``["cpu", "cpu"]``); copies on other devices do not count here."""

    def device_need(self, activations_on_device: bool) -> int:
        """Peak on the compute device while a layer is processed."""
        acts = self.activations if activations_on_device else 0
        layers = self.layer * (1 + self.replicas)
        return max(layers + acts + self.forward + self.method, self.outside + acts + self.forward)

    def ram_need(self, where: str, device: torch.device) -> int:
        """Peak RAM of the process: everything on a CPU device; a layer in transit otherwise."""
        if device.type == "cpu":
            return self.process + self.device_need(where != "disk")
        return self.process + max(self.layer, self.outside) + (self.activations if where == "cpu" else 0)

    def figures(self) -> dict[str, int]:
        return asdict(self)

    def describe(self, where: str, device: torch.device) -> str:
        parts = [f"largest decoder layer {fmt_bytes(self.layer)}",
                 f"activations {fmt_bytes(self.activations)} ({where})",
                 f"one batch's forward {fmt_bytes(self.forward)}", f"method work {fmt_bytes(self.method)}",
                 f"embeddings/head while capturing {fmt_bytes(self.outside)}"]
        if device.type == "cpu":
            parts.append(f"the process itself {fmt_bytes(self.process)}")
        return ", ".join(parts)


def _bytes_of(module: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def plan_memory(model: nn.Module, arch: ModelArch, nsamples: int, seqlen: int, batch_size: int, dense: bool,
                gram: bool, act_dtype: torch.dtype, replicas: int = 0) -> MemoryPlan:
    """The :class:`MemoryPlan` of streaming ``model`` (a skeleton) with these calibration figures.

    With several compute devices the plan is that of the first one, which holds the layer, the summed
    statistics and the method's work; counting all the activations there is an upper bound on its
    share. ``replicas``: copies of the layer on that same device."""
    layers = arch.layer_modules(model)
    layer = max((_bytes_of(m) for m in layers), default=0)
    outside = _bytes_of(model) - sum(_bytes_of(m) for m in layers)
    config: Any = model.config
    hidden = int(getattr(config.get_text_config(), arch.fields.hidden, 0) or 0)
    item = torch.empty(0, dtype=act_dtype).element_size()
    acts = nsamples * seqlen * hidden * item * (2 if dense else 1)
    widest = 0
    gram_bytes = 0
    largest = 0
    for i, m in enumerate(layers):
        targets = layer_targets(m, arch.layers[i], arch.layer_prefix(i))
        widths = {t.shape[1] for t in targets}
        widest = max([widest, *(t.shape[0] for t in targets), *widths])
        largest = max([largest, *(t.shape[0] * t.shape[1] for t in targets)])
        gram_bytes = max(gram_bytes, sum(4 * w * w for t in targets for w in [t.shape[1]]))
    heads = (arch.layers[0].attention.num_heads if arch.layers and arch.layers[0].attention else 0) or 0
    batch = min(batch_size, nsamples)
    forward = batch * seqlen * (8 * max(hidden, 1) + 3 * widest) * max(item, 4) + batch * heads * seqlen * seqlen * 4
    mask_work = largest * (4 + 8 + 1)  # scores in float32, sort indices, the mask
    method = mask_work + (gram_bytes + 2 * 4 * widest * widest if gram else 0)
    process = psutil.Process(os.getpid()).memory_info().rss
    return MemoryPlan(layer, outside, acts, forward, method, process, replicas)


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device`` now (RAM available to a new allocation on the CPU)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)


def choose_activations(plan: MemoryPlan, asked: str, device: torch.device, budget: int, ram: int) -> str:
    """Where the activations go (``device``, ``cpu`` or ``disk``), or a ConfigError with the figures
    when not even one layer fits in ``budget``.

    Args:
        asked: ``auto`` or a place.
        budget: bytes allowed on the compute device (``--max-memory``, else what is free).
        ram: bytes of RAM allowed (the same as ``budget`` on a CPU device).
    """
    cpu = device.type == "cpu"
    order = ["device", "cpu", "disk"] if asked == "auto" else [asked]
    if cpu:
        order = [w for w in order if w != "cpu"] if asked == "auto" else order
    for where in order:
        on_device = where == "device" or (cpu and where == "cpu")
        device_need = plan.device_need(on_device) + (plan.process if cpu else 0)
        ram_need = plan.ram_need(where, device)
        if device_need <= budget and ram_need <= ram:
            return where
    where = order[-1]
    on_device = where == "device" or (cpu and where == "cpu")
    need = plan.device_need(on_device) + (plan.process if cpu else 0)
    what = "RAM" if cpu else f"memory on {device}"
    hint = (" with the activations on disk (--activations disk) it would need "
            f"{fmt_bytes(plan.device_need(False) + (plan.process if cpu else 0))}" if where != "disk" else "")
    raise ConfigError(
        f"not enough {what} to stream this model: one layer at a time needs {fmt_bytes(need)} "
        f"({plan.describe(where, device)}), but {fmt_bytes(budget)} is allowed"
        f"{' (--max-memory)' if budget else ''};{hint}. Use fewer or shorter calibration windows (--nsamples, "
        "--seqlen), a smaller --batch-size, or a larger --max-memory. Nothing was read or written.")
