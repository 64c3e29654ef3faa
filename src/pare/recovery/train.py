"""The training loop of recovery: AdamW, warmup then cosine decay, held-out loss, checkpoints.

Everything that decides a step is a function of the seed and the step number (the batch comes from
:meth:`pare.recovery.data.Windows.batch`, the dropout from the torch RNG state saved with each
checkpoint), so a run killed after a checkpoint and resumed gives bitwise the weights of an
uninterrupted run on CPU. A checkpoint holds the trained parameters, the optimizer and scheduler
state, the RNG state and the losses so far, written to a temporary file and renamed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pare.errors import ConfigError
from pare.recovery.data import Windows

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
"""``loss(model, ids [B, L]) -> scalar``: what the optimizer minimises."""

CHECKPOINT = "recover-state.pt"


@dataclass(frozen=True)
class TrainSettings:
    """How to train (the recovery config's training fields, resolved).

    Attributes:
        steps: optimizer steps (0: none).
        batch_size: windows per step.
        lr / weight_decay / warmup_steps / max_grad_norm: AdamW, linear warmup then cosine decay to
            zero, gradient-norm clipping (0: none).
        eval_every: held-out loss every this many steps (and after the last; 0: only before and after).
        seed: the batch order and the RNG (dropout).
        precision: ``no`` or ``bf16`` (autocast).
        checkpoint_dir / checkpoint_every: where and how often to write a resumable checkpoint.
        fingerprint: what a checkpoint must match to be resumed (the config, the data).
        progress: show a progress bar.
    """

    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    eval_every: int = 0
    seed: int = 0
    precision: str = "no"
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 0
    fingerprint: dict[str, Any] = field(default_factory=dict)
    progress: bool = True


@dataclass
class TrainResult:
    """What training did: per-step losses, the held-out losses ``[(step, loss)]``, the cost."""

    steps: int = 0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)
    heldout: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int | None = None

    def summary(self) -> dict[str, Any]:
        n = len(self.losses)
        tail = self.losses[-max(1, n // 10):] if n else []
        return {
            "steps": self.steps, "tokens": self.tokens,
            "loss_first": self.losses[0] if n else None,
            "loss_last": self.losses[-1] if n else None,
            "loss_last_tenth_mean": sum(tail) / len(tail) if tail else None,
            "heldout": [[s, v] for s, v in self.heldout],
            "seconds": self.seconds,
            "tokens_per_s": self.tokens / self.seconds if self.seconds > 0 else None,
            "resumed_from_step": self.resumed_from,
        }


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to zero at ``steps``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of ``model`` on ``ids`` (every position but the last predicts)."""
    out: Any = model(input_ids=ids, labels=ids, use_cache=False)
    loss: torch.Tensor = out.loss
    return loss


@torch.no_grad()
def heldout_loss(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device,
                 precision: str) -> float:
    """Mean next-token cross-entropy over held-out windows (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, int(windows.shape[0]), batch_size):
        ids = windows[start:start + batch_size].to(device)
        with _autocast(device, precision):
            total += float(lm_loss(model, ids)) * ids.shape[0]
        count += int(ids.shape[0])
    model.train(was_training)
    return total / max(count, 1)


def _checkpoint_path(settings: TrainSettings) -> Path | None:
    return None if settings.checkpoint_dir is None else Path(settings.checkpoint_dir) / CHECKPOINT


def save_checkpoint(path: Path, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer,
                    sched: Any, result: TrainResult, step: int, fingerprint: dict[str, Any]) -> None:
    """Write the training state after ``step`` steps atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step, "fingerprint": repr(sorted(fingerprint.items())),
        "params": {n: p.detach().cpu().clone() for n, p in params.items()},
        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
        "losses": list(result.losses), "heldout": [list(h) for h in result.heldout], "tokens": result.tokens,
    }
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _resume(path: Path, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer, sched: Any,
            result: TrainResult, fingerprint: dict[str, Any]) -> int:
    """Load a checkpoint into the parameters, optimizer and scheduler; the step to continue from."""
    state = torch.load(path, weights_only=True, map_location="cpu")
    if state.get("fingerprint") != repr(sorted(fingerprint.items())):
        raise ConfigError(f"the checkpoint {path} was written by a run with other options or data; resume it with the "
                          "same command, or delete it to start over")
    missing = set(params) ^ set(state["params"])
    if missing:
        raise ConfigError(f"the checkpoint {path} holds other parameters than this run trains ({sorted(missing)[:3]})")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state["params"][n])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    result.losses = list(state["losses"])
    result.heldout = [(int(s), float(v)) for s, v in state["heldout"]]
    result.tokens = int(state["tokens"])
    step = int(state["step"])
    result.resumed_from = step
    return step


def train(model: nn.Module, params: dict[str, nn.Parameter], windows: Windows, loss_fn: LossFn,
          settings: TrainSettings, device: torch.device, *, resume: bool = False,
          after_step: Callable[[], None] | None = None, on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Minimise ``loss_fn`` over ``windows`` by training ``params`` (the others stay frozen).

    Args:
        model: the model to train (already on ``device``); left in eval mode.
        params: the parameters the optimizer updates, by name (checkpoints key them so).
        windows: training and held-out windows.
        loss_fn: the loss of one batch.
        settings: steps, learning rate, checkpoints...
        device: where the batches go.
        resume: continue from the checkpoint in ``settings.checkpoint_dir`` (ConfigError when none).
        after_step: called after each optimizer step (e.g. to re-apply masks).
        on_step: called with the number of steps done after each step (and its checkpoint).
    """
    result = TrainResult()
    opt = torch.optim.AdamW(list(params.values()), lr=settings.lr, weight_decay=settings.weight_decay,
                            foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: lr_factor(k, settings.steps, settings.warmup_steps))
    ckpt = _checkpoint_path(settings)
    start = 0
    torch.manual_seed(settings.seed)
    if resume:
        if ckpt is None or not ckpt.is_file():
            raise ConfigError(f"nothing to resume: no checkpoint at {ckpt}; run without --resume to start")
        start = _resume(ckpt, params, opt, sched, result, settings.fingerprint)
        log.info("resuming recovery at step %d of %d", start, settings.steps)
    tokens_per_step = settings.batch_size * int(windows.train.shape[1])
    has_heldout = int(windows.heldout.shape[0]) > 0
    if start == 0 and has_heldout:
        result.heldout.append((0, heldout_loss(model, windows.heldout, settings.batch_size, device,
                                               settings.precision)))
    model.train()
    began = time.perf_counter()
    bar = tqdm(total=settings.steps, initial=start, desc="recover", disable=not settings.progress, leave=False)
    try:
        for step in range(start, settings.steps):
            ids = windows.batch(step, settings.batch_size, settings.seed).to(device)
            with _autocast(device, settings.precision):
                loss = loss_fn(model, ids)
            if not torch.isfinite(loss):
                raise ConfigError(f"the training loss became {float(loss)} at step {step}: lower the learning rate "
                                  f"(lr={settings.lr})")
            loss.backward()
            if settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(list(params.values()), settings.max_grad_norm, foreach=False)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step()
            done = step + 1
            result.losses.append(float(loss.detach()))
            result.tokens += tokens_per_step
            elapsed = time.perf_counter() - began
            if has_heldout and (done == settings.steps or (settings.eval_every and done % settings.eval_every == 0)):
                result.heldout.append((done, heldout_loss(model, windows.heldout, settings.batch_size, device,
                                                          settings.precision)))
                log.info("step %d: held-out loss %.4f", done, result.heldout[-1][1])
            postfix = {"loss": f"{result.losses[-1]:.3f}",
                       "tok_s": f"{(done - start) * tokens_per_step / max(elapsed, 1e-9):.0f}"}
            if result.heldout:
                postfix["heldout"] = f"{result.heldout[-1][1]:.3f}"
            bar.set_postfix(postfix)
            bar.update(1)
            if ckpt is not None and settings.checkpoint_every and done % settings.checkpoint_every == 0 \
                    and done < settings.steps:
                save_checkpoint(ckpt, params, opt, sched, result, done, settings.fingerprint)
            if on_step is not None:
                on_step(done)
    finally:
        bar.close()
        model.eval()
        opt.zero_grad(set_to_none=True)
    result.steps = settings.steps
    result.seconds = time.perf_counter() - began
    return result
