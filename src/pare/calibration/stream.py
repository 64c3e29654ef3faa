"""The streaming runner: decoder layers read from disk one at a time, stepped, written, freed.

:class:`StreamRunner` is the layer-wise runner for a model whose decoder layers sit on the ``meta``
device (a skeleton): for each layer it asks its :class:`LayerIO` to read the layer's weights onto
the compute device, yields the same :class:`~pare.calibration.runner.LayerStep` the in-memory
runner yields (the stage's per-layer step runs there), computes the layer's outputs for the next
layer, lets the :class:`LayerIO` write and record the layer, and puts the layer back on ``meta``.
Only one layer and the calibration activations are ever materialised.

The activations (``N x L x hidden``) stay on the compute device, on the CPU, or in a memory-mapped
file (:class:`MappedBatches`, two files used in turn so that the inputs of a layer stay whole on
disk while its outputs are written: a run killed in the middle of a layer resumes from them).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from pare.calibration.runner import LayerStep, LayerwiseRunner
from pare.eval.memory import return_freed_memory

log = logging.getLogger(__name__)


class LayerIO(Protocol):
    """What the streaming runner asks of its caller (the files): read a layer, then keep it."""

    def load_layer(self, index: int, layer: nn.Module, device: torch.device) -> None:
        """Fill ``layer``'s parameters (on ``meta``) with its weights on ``device``."""

    def layer_done(self, index: int, layer: nn.Module, next_inputs: Sequence[torch.Tensor] | None) -> None:
        """The layer is stepped and its outputs computed: write it and record the progress."""


class MappedBatches(list):
    """Per-batch activations in two memory-mapped files used in turn.

    Items read as views of the file holding the current inputs; assigning item ``b`` (what
    :meth:`LayerStep.run` does with ``replace_inputs``) copies the value into the *other* file and
    points item ``b`` there, so the current file stays whole until :meth:`flip` after the layer.

    Args:
        files: the two files (created at the right size when missing).
        shapes: the shape of each batch ``[b, L, hidden]``.
        dtype: the activations' dtype.
        current: which file (0 or 1) holds the inputs now.
    """

    def __init__(self, files: tuple[Path, Path], shapes: Sequence[torch.Size], dtype: torch.dtype,
                 current: int = 0) -> None:
        sizes = [int(torch.Size(s).numel()) for s in shapes]
        total = max(1, sum(sizes))
        self.files = files
        self.views: list[list[torch.Tensor]] = []
        for path in files:
            flat = torch.from_file(str(path), shared=True, size=total, dtype=dtype)
            views, offset = [], 0
            for shape, n in zip(shapes, sizes, strict=True):
                views.append(flat[offset:offset + n].view(shape))
                offset += n
            self.views.append(views)
        self.current = current
        super().__init__(self.views[current])

    def __setitem__(self, index, value):  # type: ignore[no-untyped-def]
        dest = self.views[1 - self.current][index]
        dest.copy_(value)
        super().__setitem__(index, dest)

    def flip(self) -> int:
        """The outputs written are now the inputs: returns the file index that holds them."""
        self.current = 1 - self.current
        list.__init__(self, self.views[self.current])
        return self.current

    def flush(self) -> None:
        """Make the current inputs durable (an fsync of the mapped file)."""
        import os

        fd = os.open(self.files[self.current], os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def free_layer(layer: nn.Module) -> None:
    """Put every parameter and buffer of ``layer`` back on ``meta`` (the memory is released)."""
    layer.to(torch.device("meta"))


class StreamRunner(LayerwiseRunner):
    """A :class:`LayerwiseRunner` over a skeleton whose layers come from disk one at a time.

    The modules outside the decoder layers (embeddings, rotary tables) must hold their weights on
    the compute device for :meth:`capture`; the layers stay on ``meta`` until their turn.

    Args:
        io: reads each layer's weights and keeps each finished layer.
        start: the first layer to step (a resumed run skips the layers already written).
    """

    def __init__(self, model: nn.Module, arch, input_ids: torch.Tensor, io: LayerIO, device: torch.device,
                 batch_size: int = 8, sequential: bool = True, progress: bool = True, start: int = 0,
                 store: torch.device | None = None, devices: Sequence[torch.device] | None = None) -> None:
        super().__init__(model, arch, input_ids, device=device, batch_size=batch_size, offload=False,
                         sequential=True, progress=progress, devices=devices)
        self.io = io
        self.start = start
        self.overwrite = sequential  # sequential: each layer's outputs replace its inputs
        self.store = store if store is not None else device

    def capture(self):  # type: ignore[no-untyped-def]
        """Every layer's call arguments, and the first layer's inputs (the skeleton stays where it is)."""
        from pare.calibration.runner import capture

        return capture(self.model, self.arch, self.batches, self.device, self.store)

    def stream_steps(self, calls: list, hidden: list[torch.Tensor] | None) -> Iterator[LayerStep]:
        """Yield a step per layer from :attr:`start`; after the caller's per-layer step the layer's
        outputs become the next inputs, and the layer is written and freed.

        Args:
            calls: per layer, per batch, the call arguments from :meth:`capture`.
            hidden: the inputs of layer :attr:`start` per batch (None for a data-free stage: no
                layer is run).
        """
        layers = self.arch.layer_modules(self.model)
        last = len(layers) - 1
        if hidden is not None and not isinstance(hidden, MappedBatches):
            hidden = self.place(hidden)
        bar = tqdm(range(self.start, len(layers)), desc="layers (streamed)", disable=not self.progress,
                   leave=False)
        for i in bar:
            layer = layers[i]
            self.io.load_layer(i, layer, self.device)
            step = self.step(i, layer, hidden or [], calls[i] if calls else [])
            yield step
            if hidden is None or i == last:
                outputs = None
            elif step.dense_outputs is not None:
                outputs = step.dense_outputs
            else:
                outputs = step.run(keep_outputs=True, replace_inputs=self.overwrite)
            if step.replicas is not None:
                step.replicas.release()
            self.io.layer_done(i, layer, outputs)
            free_layer(layer)
            return_freed_memory()  # the layer's heap holes must not add to the next layer's peak
            if outputs is not None:
                hidden = list(outputs) if not isinstance(outputs, MappedBatches) else outputs
