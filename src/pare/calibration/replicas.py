"""Several compute devices: the calibration batches split across replicas of the current layer.

With devices ``[d0, d1, ...]`` the layer-wise runner keeps the decoder layer being processed on
``d0`` and a copy of it (a replica) on each other device; the batches are split into contiguous
shares, one per device, and each device holds its share of the activations. Every pass over the
batches runs the replicas' forwards concurrently with :func:`torch.nn.parallel.parallel_apply`
(threads: CUDA kernels on different devices overlap). Statistics are recorded per replica on its
own device and summed onto ``d0`` (:func:`merge_stats`, token counts included) before the method's
per-layer step runs there; the weights it changed are copied to the replicas before the next pass.

Only the current layer is replicated, so each device holds one layer plus its share of the
activations. The sums are taken in another order than on one device (per share, then across
shares), so results agree with a one-device run to rounding, not bitwise.

``parallel_apply`` needs an accelerator: replicas on the CPU (``["cpu", "cpu"]``, which the tests
use to exercise the split and the sums without a GPU) run one after another in the calling thread,
through the same code.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import parallel_apply

from pare.arch.targets import Target
from pare.calibration.stats import InputStats


def batch_shares(n_batches: int, n_devices: int) -> list[range]:
    """Contiguous shares of ``range(n_batches)``, one per device, sizes differing by at most one (the
    first devices take the extra batches); a device without a batch gets an empty range."""
    base, extra = divmod(n_batches, n_devices)
    shares, start = [], 0
    for k in range(n_devices):
        size = base + (1 if k < extra else 0)
        shares.append(range(start, start + size))
        start += size
    return shares


def replicate(layer: nn.Module, device: torch.device) -> nn.Module:
    """A copy of ``layer`` whose parameters and buffers are made directly on ``device`` (the layer's own
    device never holds a second copy); its other attributes are deep copies."""
    memo: dict[int, Any] = {}
    for p in layer.parameters():
        memo[id(p)] = nn.Parameter(p.detach().to(device, copy=True), requires_grad=p.requires_grad)
    for b in layer.buffers():
        memo[id(b)] = b.detach().to(device, copy=True)
    return copy.deepcopy(layer, memo)


def copy_weights(src: nn.Module, dst: nn.Module) -> None:
    """Copy every parameter and buffer of ``src`` into ``dst`` (a replica: same names and shapes)."""
    with torch.no_grad():
        pairs = zip(
            list(src.named_parameters()) + list(src.named_buffers()),
            list(dst.named_parameters()) + list(dst.named_buffers()),
            strict=True,
        )
        for (name, s), (other, d) in pairs:
            if name != other or s.shape != d.shape:
                raise RuntimeError(
                    f"replica out of step with its layer: {name} {tuple(s.shape)} against {other} {tuple(d.shape)}"
                )
            d.copy_(s)


def retarget(targets: Sequence[Target], layer: nn.Module, replica: nn.Module) -> list[Target]:
    """``targets`` of ``layer`` pointed at the same modules of ``replica``."""
    same = {id(m): r for (_, m), (_, r) in zip(layer.named_modules(), replica.named_modules(), strict=True)}
    return [dataclasses.replace(t, module=same[id(t.module)]) for t in targets]


def merge_stats(into: dict[str, InputStats], other: dict[str, InputStats], device: torch.device) -> None:
    """Add the statistics ``other`` (one replica's share of the batches) to ``into`` (those of the first
    device), target by target. Targets that share one accumulator in ``into`` (q/k/v read one input)
    receive ``other``'s sums once."""
    done: set[int] = set()
    for name, acc in into.items():
        if id(acc) not in done:
            done.add(id(acc))
            acc.merge_(other[name], device)


class _Pass(nn.Module):
    """One device's share of a pass, as the module :func:`parallel_apply` calls."""

    def __init__(self, work: Callable[[], Any]) -> None:
        super().__init__()
        self.work = work

    def forward(self) -> Any:
        return self.work()


def run_concurrently(work: Sequence[Callable[[], Any]], devices: Sequence[torch.device]) -> list[Any]:
    """``[w() for w in work]``, each on its device: concurrently through :func:`parallel_apply` when every
    device is an accelerator, else (CPU) one after another. An exception in one is raised here."""
    if all(d.type != "cpu" for d in devices) and torch.accelerator.is_available():
        return parallel_apply([_Pass(w) for w in work], [()] * len(work), devices=list(devices))
    return [w() for w in work]


class Replicas:
    """The current decoder layer on every device of ``devices`` (``layer`` itself on the first).

    Args:
        layer: the layer, already on ``devices[0]``.
        devices: the compute devices.
        n_batches: how many calibration batches there are (split with :func:`batch_shares`).
    """

    def __init__(self, layer: nn.Module, devices: Sequence[torch.device], n_batches: int) -> None:
        self.layer = layer
        shares = batch_shares(n_batches, len(devices))
        used = [k for k, s in enumerate(shares) if len(s) or k == 0]
        self.devices = [devices[k] for k in used]
        self.shares = [shares[k] for k in used]
        self._copies: list[nn.Module] | None = None

    def layers(self) -> list[nn.Module]:
        """One layer per used device with the first device's current weights: the copies are made at the
        first call and refreshed from ``layer`` at every later one (the method may have changed it)."""
        if self._copies is None:
            self._copies = [replicate(self.layer, d) for d in self.devices[1:]]
        else:
            for replica in self._copies:
                copy_weights(self.layer, replica)
        return [self.layer, *self._copies]

    def release(self) -> None:
        """Drop the copies (the next :meth:`layers` makes new ones)."""
        self._copies = None
