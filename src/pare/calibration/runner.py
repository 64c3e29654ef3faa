"""The layer-wise runner: process a model one decoder layer at a time on calibration data.

It captures the inputs of every decoder layer exactly as the model passes them (hidden states plus
whatever positional embeddings, masks and cache arguments it sends, per layer, so Gemma's
sliding/global layers each get their own mask) by standing a recorder in for each layer during one
embedding-only forward. No transformers ``forward`` is copied. Then, for each layer in turn, it
moves the layer to the compute device, lets the caller gather statistics and prune, recomputes the
layer's outputs with the pruned weights and feeds them to the next layer.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pare.arch.roles import LayerRoles, ModelArch
from pare.arch.targets import Target
from pare.arch.wrapper import LayerWrapper
from pare.calibration.images import model_inputs
from pare.calibration.replicas import Replicas, batch_shares, merge_stats, retarget, run_concurrently
from pare.calibration.stats import InputsRecorded, InputStats, record_inputs
from pare.config import usable_devices

log = logging.getLogger(__name__)


class _StandIn(LayerWrapper):
    """Takes a decoder layer's place for one forward: records its call, returns a chosen output."""

    def __init__(self, inner: nn.Module, on_call: Callable[..., torch.Tensor], as_tuple: bool) -> None:
        super().__init__(inner)
        self._on_call = on_call
        self._as_tuple = as_tuple

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self._on_call(*args, **kwargs)
        return (out,) if self._as_tuple else out


@contextlib.contextmanager
def stand_ins(layers: nn.ModuleList, make_call: Callable[[int], Callable[..., torch.Tensor]], as_tuple: bool):
    """Swap every layer of ``layers`` for a :class:`_StandIn`; always put the real layers back."""
    originals = list(layers)
    try:
        for i, layer in enumerate(originals):
            layers[i] = _StandIn(layer, make_call(i), as_tuple)
        yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


class _Interner:
    """Deduplicates equal tensors across batches and layers (masks, rotary tables) to save memory."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seen: list[torch.Tensor] = []
        self.by_id: dict[int, torch.Tensor] = {}

    def __call__(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            if id(obj) in self.by_id:
                return self.by_id[id(obj)]
            for t in self.seen:
                if t.shape == obj.shape and t.dtype == obj.dtype and torch.equal(t, obj.to(t.device)):
                    self.by_id[id(obj)] = t
                    return t
            stored = obj.detach().to(self.device)
            self.seen.append(stored)
            self.by_id[id(obj)] = stored
            return stored
        if isinstance(obj, tuple):
            return tuple(self(o) for o in obj)
        if isinstance(obj, list):
            return [self(o) for o in obj]
        if isinstance(obj, dict):
            return {k: self(v) for k, v in obj.items()}
        return obj


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """``module`` on ``device`` while the block runs, then back where it was: the one way pare moves
    a layer (or a whole model, for a gradient pass) to the compute device."""
    home = model_device(module)
    if home != device:  # Module.to walks every parameter even when nothing moves
        module.to(device)
    try:
        yield module
    finally:
        if home != device:
            module.to(home)


def first_tensor(out: Any) -> torch.Tensor:
    """A decoder layer's hidden-state output, whether it returns a tensor or a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


def move_outside_layers(model: nn.Module, arch: ModelArch, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside a decoder layer to ``device``."""
    prefix = arch.layers_path + "."
    for name, module in model.named_modules():
        if name == arch.layers_path or name.startswith(prefix):
            continue
        for _pname, p in list(module._parameters.items()):
            if p is not None and p.device != device:
                p.data = p.data.to(device)
        for bname, b in list(module._buffers.items()):
            if b is not None and b.device != device:
                module._buffers[bname] = b.to(device)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (where inputs go; CPU for a parameterless model)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")



@dataclass
class LayerCall:
    """How the model calls one layer for one batch: positional extras and keyword arguments."""

    args: tuple
    kwargs: dict


@dataclass
class Captured:
    """First-layer hidden states per batch and every layer's call arguments per batch."""

    hidden: list[torch.Tensor]
    calls: list[list[LayerCall]]  # [layer][batch]


def base_module(model: nn.Module, arch: ModelArch) -> nn.Module:
    return model.get_submodule(arch.base_path) if arch.base_path else model


class _CaptureDone(Exception):
    """Ends a capture forward once the last decoder layer's call is recorded."""


def capture(
    model: nn.Module, arch: ModelArch, batches: list[torch.Tensor], device: torch.device, store: torch.device
) -> Captured:
    """Record every decoder layer's inputs for each batch of token ids ``[B, L]`` (of images
    ``[B, C, H, W]`` when ``arch`` describes a vision tower: :func:`~pare.calibration.images.model_inputs`).

    Only the modules outside the decoder layers run (embeddings, rotary tables, mask building). A
    model whose loop unpacks what a layer returns (Bamba: ``hidden, attn = layer(...)``) cannot take
    the stand-in's plain tensor: it is captured again with every layer but the last run for real.
    """
    try:
        return _capture(model, arch, batches, device, store, run_layers=False)
    except (ValueError, TypeError, IndexError):  # IndexError: MVP / TrOCR index a layer's output tuple
        log.debug("capture with stand-in outputs failed; running the layers", exc_info=True)
        return _capture(model, arch, batches, device, store, run_layers=True)


def _capture(model: nn.Module, arch: ModelArch, batches: list[torch.Tensor], device: torch.device,
             store: torch.device, run_layers: bool) -> Captured:
    layers = arch.layer_modules(model)
    originals = list(layers)
    interner = _Interner(store)
    hidden: list[torch.Tensor] = []
    calls: list[list[LayerCall]] = [[] for _ in range(len(layers))]

    last = len(layers) - 1

    def make_call(i: int) -> Callable[..., Any]:
        def call(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if i == 0:
                hidden.append(hidden_states.detach().to(store))
            calls[i].append(LayerCall(interner(args), interner(kwargs)))
            if i == last:  # nothing after the last layer is needed
                raise _CaptureDone
            if run_layers:
                return originals[i](hidden_states, *args, **kwargs)
            # a layer returns a tensor or a tuple depending on the model; only layer 0's hidden
            # states are kept, so a model that takes ``outputs[0]`` of this tensor loses nothing
            return hidden_states

        return call

    with torch.no_grad(), stand_ins(layers, make_call, as_tuple=False):
        base = base_module(model, arch)
        for batch in batches:
            interner.by_id.clear()  # ids are only unique among live objects: reset per forward
            with contextlib.suppress(_CaptureDone):
                base(**model_inputs(arch, batch, device))
    return Captured(hidden=hidden, calls=calls)


@dataclass
class LayerStep:
    """One decoder layer, on the compute device, with its calibration inputs.

    Attributes:
        index: layer index.
        layer: the decoder layer module (already on ``device``).
        roles: its architecture roles.
        prefix: its full module name (``model.layers.3``).
        inputs: per batch, the hidden states entering the layer (on the storage device).
        calls: per batch, the other arguments the model passes to this layer.
        replicas: with several compute devices, the layer's copies and each device's share of the
            batches (:mod:`pare.calibration.replicas`); None on one device.
    """

    index: int
    layer: nn.Module
    roles: LayerRoles
    prefix: str
    inputs: list[torch.Tensor]
    calls: list[LayerCall]
    device: torch.device
    dense_outputs: list[torch.Tensor] | None = field(default=None)
    returns_tuple: bool = False  # what the layer's forward returned last (a tuple or the tensor)
    replicas: Replicas | None = None

    def forward_batch(self, b: int, hidden: torch.Tensor | None = None, layer: nn.Module | None = None,
                      device: torch.device | None = None) -> torch.Tensor:
        """Run the layer (or its replica ``layer`` on ``device``) on batch ``b`` (or on ``hidden`` with
        batch ``b``'s arguments)."""
        call = self.calls[b]
        layer = self.layer if layer is None else layer
        device = self.device if device is None else device
        x = (self.inputs[b] if hidden is None else hidden).to(device)
        out = layer(x, *_to(call.args, device), **_to(call.kwargs, device))
        self.returns_tuple = isinstance(out, (tuple, list))
        return first_tensor(out)

    def run(self, keep_outputs: bool = False, replace_inputs: bool = False) -> list[torch.Tensor] | None:
        """Run the layer over every batch (e.g. with statistic hooks attached). A forward that
        a hook ends early with :class:`InputsRecorded` has no output, so ``keep_outputs`` must
        then be False. ``replace_inputs`` puts each batch's output in place of its input (one set
        of activations in memory instead of two) and returns :attr:`inputs`.

        With several devices every replica runs its share of the batches (hooks attached to
        :attr:`layer` see only the first share: gather statistics with :meth:`record`)."""
        if self.replicas is None:
            outs = self._run_share(self.layer, self.device, range(len(self.inputs)), keep_outputs, replace_inputs)
        else:
            reps = self.replicas
            parts = run_concurrently(
                [functools.partial(self._run_share, layer, d, share, keep_outputs, replace_inputs)
                 for layer, d, share in zip(reps.layers(), reps.devices, reps.shares, strict=True)], reps.devices)
            outs = [y for part in parts for y in part]
        if replace_inputs:
            return self.inputs
        return outs if keep_outputs else None

    def _run_share(self, layer: nn.Module, device: torch.device, batches: range, keep_outputs: bool,
                   replace_inputs: bool) -> list[torch.Tensor]:
        """:meth:`run` over ``batches`` with ``layer`` on ``device``; the outputs kept, if asked."""
        outs = []
        keep = keep_outputs or replace_inputs
        with torch.no_grad():
            for b in batches:
                try:
                    y = self.forward_batch(b, layer=layer, device=device)
                except InputsRecorded:
                    if keep:
                        raise RuntimeError("a forward stopped early cannot keep its outputs") from None
                    continue
                if replace_inputs:
                    self.inputs[b] = y.detach().to(self.inputs[b].device)
                elif keep_outputs:
                    outs.append(y.detach().to(self.inputs[b].device))
        return outs

    def record(self, targets: list[Target], new_stats: Callable[[Target], InputStats], *, share_inputs: bool = True,
               keep_outputs: bool = False, replace_inputs: bool = False
               ) -> tuple[dict[str, InputStats], list[torch.Tensor] | None]:
        """Run the layer over every batch with each target's inputs recorded (:func:`record_inputs`) into
        a fresh ``new_stats(target)``; returns the statistics and what :meth:`run` returns. When no
        output is wanted the forwards stop once every input is recorded.

        With several devices each replica records its share of the batches on its own device, and the
        sums are added onto the first device (:func:`pare.calibration.replicas.merge_stats`)."""
        stop = not (keep_outputs or replace_inputs)
        if self.replicas is None:
            stats = {t.name: new_stats(t) for t in targets}
            with record_inputs(targets, stats, stop_in=self.layer if stop else None, share_inputs=share_inputs):
                outs = self.run(keep_outputs=keep_outputs, replace_inputs=replace_inputs)
            return stats, outs
        reps = self.replicas
        layers = reps.layers()
        per = [{t.name: new_stats(t) for t in targets} for _ in layers]

        def share(k: int) -> list[torch.Tensor]:
            mine = retarget(targets, self.layer, layers[k])
            with record_inputs(mine, per[k], stop_in=layers[k] if stop else None, share_inputs=share_inputs):
                return self._run_share(layers[k], reps.devices[k], reps.shares[k], keep_outputs, replace_inputs)

        parts = run_concurrently([functools.partial(share, k) for k in range(len(layers))], reps.devices)
        for other in per[1:]:
            merge_stats(per[0], other, self.device)
        if replace_inputs:
            return per[0], self.inputs
        return per[0], [y for part in parts for y in part] if keep_outputs else None


class LayerwiseRunner:
    """Walks the decoder layers with calibration data; see the module docstring.

    Args:
        model: the causal LM (its weights may live on the CPU).
        arch: its description.
        input_ids: calibration windows ``[N, L]``.
        device: where each layer runs.
        batch_size: windows per forward.
        offload: keep every layer but the current one (and the activations) on the CPU.
        sequential: feed each layer the outputs of the already-pruned layers (False: dense outputs).
        progress: show a progress bar over layers.
        devices: several compute devices (instead of ``device``): the batches are split across replicas
            of each layer, one per device (:mod:`pare.calibration.replicas`). A device may repeat (the
            tests split batches across ``["cpu", "cpu"]``).
    """

    def __init__(
        self,
        model: nn.Module,
        arch: ModelArch,
        input_ids: torch.Tensor,
        device: str | torch.device | None = None,
        batch_size: int = 8,
        offload: bool = True,
        sequential: bool = True,
        progress: bool = True,
        devices: Sequence[str | torch.device] | None = None,
    ) -> None:
        self.model = model
        self.arch = arch
        self.devices = usable_devices(list(devices) if devices else [device])
        self.device = self.devices[0]
        self.offload = offload
        self.sequential = sequential
        self.progress = progress
        self.batches = list(input_ids.split(batch_size))
        self.store = torch.device("cpu") if offload else self.device
        self.final_hidden: list[torch.Tensor] | None = None
        self.not_run: list[int] = []
        """Layers the model did not call on the calibration data (skipped, left as they are)."""

    def capture(self) -> Captured:
        """The first layer's inputs and every layer's call arguments, per batch (no layer runs)."""
        model, arch = self.model, self.arch
        home = model_device(model)
        if self.offload:
            move_outside_layers(model, arch, self.device)
        else:
            model.to(self.device)
        captured = capture(model, arch, self.batches, self.device, self.store)
        if self.offload and home != self.device:
            move_outside_layers(model, arch, home)
        return captured

    def steps(
        self, layer_indices: list[int] | None = None, final_outputs: bool = True, overwrite_inputs: bool = False
    ) -> Iterator[LayerStep]:
        """Yield a :class:`LayerStep` per layer; when the caller resumes, the layer's outputs
        (with whatever the caller changed) become the next layer's inputs. With
        ``final_outputs=False`` the last layer is not run again after the caller's changes and
        :attr:`final_hidden` stays None (pruning needs no outputs past the last layer). With
        ``overwrite_inputs`` (sequential mode) the outputs replace the inputs batch by batch, so a
        step's ``inputs`` must not be kept past its turn."""
        model, arch = self.model, self.arch
        captured = self.capture()
        hidden = self.place(captured.hidden)
        layers = arch.layer_modules(model)
        wanted = set(range(len(layers)) if layer_indices is None else layer_indices)
        bar = tqdm(range(len(layers)), desc="layers", disable=not self.progress, leave=False)
        for i in bar:
            layer = layers[i]
            if not captured.calls[i]:  # the model did not call it on these inputs: it changes nothing here
                self.not_run.append(i)
                log.warning("layer %d did not run on the calibration data (e.g. a cross-attention layer that "
                            "runs only with images); it is left as it is", i)
                continue
            layer_home = model_device(layer)
            layer.to(self.device)
            step = self.step(i, layer, hidden, captured.calls[i])
            if i in wanted:
                if not self.sequential:
                    step.dense_outputs = step.run(keep_outputs=True)
                yield step
            dense = step.dense_outputs
            if dense is None and i == len(layers) - 1 and not final_outputs:
                hidden = []
            elif dense is not None:
                hidden = dense
            else:
                hidden = step.run(keep_outputs=True, replace_inputs=overwrite_inputs) or []
            if step.replicas is not None:
                step.replicas.release()
            if self.offload:
                layer.to(layer_home if layer_home.type == "cpu" else torch.device("cpu"))
        self.final_hidden = hidden or None

    def step(self, index: int, layer: nn.Module, inputs: list[torch.Tensor], calls: list[LayerCall]) -> LayerStep:
        """The :class:`LayerStep` of ``layer`` (on the first device), with its replicas on the others."""
        replicas = Replicas(layer, self.devices, len(inputs)) if len(self.devices) > 1 and inputs else None
        return LayerStep(index, layer, self.arch.layers[index], self.arch.layer_prefix(index), inputs, calls,
                         self.device, replicas=replicas)

    def place(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """With several devices and the activations kept on the devices (not offloaded to the CPU), each
        batch moved to the device of its share; otherwise ``hidden`` as it is."""
        if len(self.devices) == 1 or self.store.type == "cpu":
            return hidden
        shares = batch_shares(len(hidden), len(self.devices))
        for device, share in zip(self.devices, shares, strict=True):
            for b in share:
                hidden[b] = hidden[b].to(device)
        return hidden


@torch.no_grad()
def logits_from_hidden(
    model: nn.Module, arch: ModelArch, input_ids: torch.Tensor, hidden: torch.Tensor, as_tuple: bool = False
) -> torch.Tensor:
    """The model's own logits for last-layer outputs ``hidden`` (final norm, lm_head, softcapping...).

    Runs the model with every decoder layer stood in for: each passes its input through except the
    last, which returns ``hidden``. Used to score layer-wise outputs without copying the head code.
    """
    layers = arch.layer_modules(model)
    last = len(layers) - 1
    device = model_device(model)

    def make_call(i: int) -> Callable[..., torch.Tensor]:
        def call(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return hidden.to(hidden_states.device, hidden_states.dtype) if i == last else hidden_states

        return call

    with stand_ins(layers, make_call, as_tuple=as_tuple):
        return model(input_ids=input_ids.to(device), use_cache=False).logits
