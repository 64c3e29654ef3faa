"""Recovery after pruning: LoRA, full fine-tuning or distillation, with the pruning kept.

LLM-Pruner (Ma et al., 2023) recovers a structurally pruned model with LoRA; Sheared-LLaMA and
Minitron continue training, Minitron by distillation from the unpruned model. This stage trains the
model it is given on a little text and leaves an ordinary model of the same shapes: LoRA adapters
are merged at the end (the update masked by the pruning mask, so zeros stay zeros and N:M stays
N:M; see :mod:`pare.recovery.lora`), full fine-tuning masks the gradients of pruned weights, and
distillation (:mod:`pare.recovery.distill`) trains either way against the teacher's logits.
In a recipe it follows the pruning stages (``- recover: {mode: lora, tokens: 2000000}``).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from pare.arch.roles import ModelArch
from pare.arch.targets import check_selection, select
from pare.calibration.runner import model_device
from pare.config import PruneConfig, check_regexes, help_field, register
from pare.errors import ConfigError
from pare.methods.base import PruneContext, Pruner, measure_sparsity
from pare.recovery import distill as kd
from pare.recovery import lora
from pare.recovery.data import CALIBRATION, Windows, parse_token_count, training_windows
from pare.recovery.masks import (
    apply_masks_,
    masked_gradients,
    model_targets,
    target_params,
    zero_masks,
    zeros_kept,
)
from pare.recovery.train import LossFn, TrainResult, TrainSettings, lm_loss, train

log = logging.getLogger(__name__)

MODES = ("lora", "full", "distill")
_NOT_FINGERPRINTED = ("resume", "checkpoint_dir", "checkpoint_every", "eval_every")
"""Options a resumed run may change: they decide where and how often to write, not the weights."""
_LORA_OPTIONS = ("lora_r", "lora_alpha", "lora_dropout", "targets", "lora_masked")
"""Options that only LoRA training reads."""


def _positive(name: str, value: Any, *, zero: bool = False) -> None:
    low_ok = value >= 0 if zero else value > 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low_ok:
        raise ConfigError(f"{name} must be a {'non-negative' if zero else 'positive'} number, got {value!r}")


@dataclass(frozen=True)
class RecoverConfig(PruneConfig):
    """Recovery training options.

    Attributes:
        mode: ``lora`` (adapters, merged at the end), ``full`` (every decoder-layer weight and norm,
            pruned weights' gradients masked) or ``distill`` (from ``teacher``, training what
            ``distill_train`` says).
        data: the training text: a named set's train split, a file, or ``calibration`` (the
            pipeline's calibration windows).
        tokens / steps: the budget; ``steps`` (when given) wins, ``tokens = steps x batch_size x seqlen``.
        targets: regexes of the modules LoRA adapts (default: every projection of every decoder layer).
        lora_masked: train the adapter mask-aware (the update on pruned weights is left out of the
            training forward too), instead of masking it only at the merge.
        keep_zeros: keep every zero weight of the decoder matrices at zero (sparse models stay sparse).
        teacher: the unpruned model (directory or hub id) for ``distill``.
        hidden_weight: weight of the hidden-state MSE at the kept layers (distillation).
        checkpoint_dir / checkpoint_every / resume: resumable training.
    """

    method: ClassVar[str] = "recover"

    mode: str = help_field("lora", "what to train: lora (adapters, merged), full (decoder weights, masked "
                                   "gradients) or distill (from --teacher)")
    data: str = help_field("c4", "training text: c4, wikitext2, tinystories, a .txt/.jsonl/.parquet file, or "
                                 "'calibration' (the calibration windows)")
    tokens: int = help_field(2_000_000, "training tokens (steps = tokens / (batch_size x seqlen), rounded up)")
    steps: int | None = help_field(None, "optimizer steps (default: from tokens; 0 trains nothing)")
    seqlen: int = help_field(512, "tokens per training window")
    batch_size: int = help_field(4, "windows per optimizer step")
    lr: float = help_field(1e-4, "peak learning rate (AdamW; linear warmup, then cosine decay to zero)")
    weight_decay: float = help_field(0.0, "AdamW weight decay")
    warmup: float = help_field(0.05, "fraction of the steps spent warming the learning rate up")
    max_grad_norm: float = help_field(1.0, "clip the gradient norm to this (0: no clipping)")
    lora_r: int = help_field(8, "LoRA rank")
    lora_alpha: float = help_field(16.0, "LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = help_field(0.0, "dropout on the LoRA input (LLM-Pruner used 0.05)")
    targets: tuple[str, ...] = help_field((), "regexes of the modules LoRA adapts (default: every decoder "
                                              "projection)")
    lora_masked: bool = help_field(False, "mask-aware LoRA: leave the update on pruned weights out of training "
                                          "too (default: masked at the merge only)")
    keep_zeros: bool = help_field(True, "keep every zero weight of the decoder matrices at zero (sparsity kept)")
    teacher: str | None = help_field(None, "distill: the unpruned model (directory or hub id), same vocabulary")
    temperature: float = help_field(2.0, "distill: softmax temperature of the logit KL")
    hidden_weight: float = help_field(0.0, "distill: weight of the hidden-state MSE at the kept layers (0: off)")
    distill_train: str = help_field("lora", "distill: what to train, lora or full")
    eval_every: int = help_field(50, "held-out loss every this many steps (and before and after)")
    eval_windows: int = help_field(8, "held-out windows (the end of the text, never trained on)")
    seed: int = help_field(0, "seed of the batch order, the adapter init and dropout")
    precision: str = help_field("no", "autocast: no (the model's dtype) or bf16")
    grad_checkpointing: bool = help_field(False, "recompute activations in backward (less memory, slower)")
    checkpoint_dir: str | None = help_field(None, "write resumable checkpoints here")
    checkpoint_every: int = help_field(50, "steps between checkpoints (with checkpoint_dir)")
    resume: bool = help_field(False, "continue from the checkpoint in checkpoint_dir")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.data:
            raise ConfigError("data must name the training text: c4, wikitext2, tinystories, a file, or calibration")
        if self.tokens < 1:
            raise ConfigError(f"tokens must be a positive number of training tokens (e.g. 2000000), got {self.tokens}")
        if self.steps is not None and self.steps < 0:
            raise ConfigError(f"steps must be 0 or more (or unset: from tokens), got {self.steps}")
        for name in ("seqlen", "batch_size", "lora_r"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("lr", "lora_alpha", "temperature"):
            _positive(name, getattr(self, name))
        for name in ("weight_decay", "max_grad_norm", "hidden_weight", "eval_every", "eval_windows",
                     "checkpoint_every"):
            _positive(name, getattr(self, name), zero=True)
        if not (0 <= self.warmup < 1) or not (0 <= self.lora_dropout < 1):
            raise ConfigError(f"warmup and lora_dropout must be fractions in [0, 1), got {self.warmup} and "
                              f"{self.lora_dropout}")
        check_regexes("targets", self.targets)
        if self.distill_train not in ("lora", "full"):
            raise ConfigError(f"distill_train must be lora or full, got {self.distill_train!r}")
        if self.precision not in ("no", "bf16"):
            raise ConfigError(f"precision must be 'no' or 'bf16', got {self.precision!r}")
        if self.lora_masked and self.lora_dropout:
            raise ConfigError("lora_masked trains the masked update on the layer input, so it takes no adapter "
                              "dropout: set lora_dropout=0")
        if self.mode == "distill" and not self.teacher:
            raise ConfigError("mode='distill' needs the unpruned model as teacher (--teacher DIR or teacher: DIR)")
        if self.mode != "distill" and (self.teacher or self.hidden_weight):
            raise ConfigError(f"teacher and hidden_weight apply to mode='distill', not {self.mode!r}")
        self._check_unused()
        if self.resume and not self.checkpoint_dir:
            raise ConfigError("resume needs the checkpoint_dir of the run to continue")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecoverConfig:
        """As :meth:`BaseConfig.from_dict`; ``tokens`` may also be text as on the command line (``2M``)."""
        tokens = data.get("tokens") if isinstance(data, dict) else None
        if isinstance(tokens, str):
            try:
                data = {**data, "tokens": parse_token_count(tokens)}
            except ValueError as exc:
                raise ConfigError(f"RecoverConfig.tokens {exc}") from None
        return super().from_dict(data)

    def _check_unused(self) -> None:
        """Options the chosen training ignores, set to something else than their default, are refused:
        a ``--lora-r`` or ``--targets`` given to full fine-tuning would otherwise do nothing, silently."""
        defaults = {f.name: f.default for f in fields(self)}
        unused = list(_LORA_OPTIONS) if not self.uses_lora else []
        if self.mode != "distill":
            unused += ["temperature", "distill_train"]
        changed = [name for name in unused if getattr(self, name) != defaults[name]]
        if changed:
            training = f"mode={self.mode!r}" + (f", distill_train={self.distill_train!r}" if self.mode == "distill"
                                                 else "")
            raise ConfigError(f"{', '.join(changed)} would be ignored with {training}: the LoRA options apply to "
                              "mode='lora' or to distillation with distill_train='lora', temperature and "
                              "distill_train to mode='distill'; leave them out")

    @property
    def uses_lora(self) -> bool:
        return self.mode == "lora" or (self.mode == "distill" and self.distill_train == "lora")

    def num_steps(self) -> int:
        """Optimizer steps: ``steps`` when given, else the token budget over the tokens per step."""
        return self.steps if self.steps is not None else math.ceil(self.tokens / (self.batch_size * self.seqlen))


@register
class RecoverStage(Pruner):
    """Train the pruned model a little, keeping its shapes and zeros."""

    config_class = RecoverConfig
    config: RecoverConfig
    runs_elsewhere = ("`pare recover DIR --out DIR2 --method lora|full|distill` on a saved pruned model, or a recipe "
                      "stage after the pruning ones (`pare run`: `- recover: {mode: lora, tokens: 2000000}`)")

    def __init__(self, config: PruneConfig) -> None:
        super().__init__(config)
        self.on_step: Callable[[int], None] | None = None  # called after each optimizer step (tests stop a run)

    @classmethod
    def example_config(cls) -> RecoverConfig:
        return RecoverConfig(mode="full", data=CALIBRATION, tokens=64, seqlen=8, batch_size=2, eval_windows=1)

    def uses_calibration(self) -> bool:
        return self.config.data == CALIBRATION

    def check(self, model: nn.Module, arch: ModelArch) -> None:
        """LoRA targets that match, a data source that exists, a teacher with the model's vocabulary:
        refused before any work (the teacher's config is read here, its weights only in ``run``)."""
        cfg = self.config
        if cfg.data != CALIBRATION:
            from pare.calibration.sources import _named, _source_path

            if _named(cfg.data) is None:
                _source_path(cfg.data)
        if cfg.teacher:
            from pare.io.load import causal_lm_config

            if _looks_like_path(cfg.teacher) and not Path(cfg.teacher).expanduser().is_dir():
                raise ConfigError(f"the teacher {cfg.teacher!r} is not a directory: pass the unpruned model's "
                                  "directory or hub id")
            try:
                vocab = getattr(causal_lm_config(cfg.teacher), "vocab_size", None)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot read the teacher {cfg.teacher!r}: {exc}") from exc
            if isinstance(vocab, int) and vocab != kd.vocab_size(model):
                raise ConfigError(f"the teacher {cfg.teacher!r} has a vocabulary of {vocab} tokens, the pruned model "
                                  f"{kd.vocab_size(model)}: {kd.SAME_VOCAB}")
        if self.config.uses_lora:
            lora.require_peft()
            names = [t.name for t in model_targets(model, arch)]
            check_selection(names, self.config.targets, ())
            if not self._lora_targets(model, arch):
                raise ConfigError("LoRA adapts linear layers, and this model's decoder layers have none pare can "
                                  "adapt (fused expert weights only): use mode='full'")

    def _lora_targets(self, model: nn.Module, arch: ModelArch) -> list[str]:
        chosen = select(model_targets(model, arch), self.config.targets, ())
        return [t.name for t in chosen if t.expert is None]

    def run(self, ctx: PruneContext) -> None:
        cfg = self.config
        teacher = self._teacher(ctx)
        windows = self._windows(ctx)
        steps = cfg.num_steps()
        targets = model_targets(ctx.model, ctx.arch)
        masks = zero_masks(target_params(ctx.model, targets)) if cfg.keep_zeros else {}
        flags = {n: p.requires_grad for n, p in ctx.model.named_parameters()}
        home = model_device(ctx.model)
        ctx.model.to(ctx.device)
        try:
            with torch.inference_mode(False), torch.enable_grad():
                result = self._train(ctx, windows, steps, masks, teacher)
        finally:
            for n, p in ctx.model.named_parameters():
                p.requires_grad_(flags.get(n, False))
                p.grad = None
            ctx.model.to(home)
        kept = zeros_kept(target_params(ctx.model, targets), masks)
        if not kept:  # the masks make this impossible; a failure here is a bug, not bad input
            raise RuntimeError("recovery revived pruned weights")
        self._record(ctx, windows, steps, result, masks, kept)

    def _teacher(self, ctx: PruneContext) -> nn.Module | None:
        cfg = self.config
        if cfg.mode != "distill" or cfg.teacher is None:
            return None
        teacher = kd.load_teacher(cfg.teacher, ctx.dtype, ctx.device)
        kd.check_teacher(ctx.model, teacher, repr(cfg.teacher))
        if cfg.hidden_weight:
            width = (getattr(ctx.model.config, "hidden_size", None), getattr(teacher.config, "hidden_size", None))
            if width[0] != width[1]:
                raise ConfigError(f"hidden_weight compares hidden states, but the widths differ (model {width[0]}, "
                                  f"teacher {width[1]}): set hidden_weight=0")
        return teacher

    def _windows(self, ctx: PruneContext) -> Windows:
        cfg = self.config
        tokenizer = ctx.tokenizer
        if tokenizer is None and cfg.data != CALIBRATION:
            tokenizer = _tokenizer_of(ctx.model)
        windows = training_windows(tokenizer, cfg.data, cfg.seqlen, cfg.tokens, cfg.eval_windows, ctx.calibration)
        from pare.calibration.data import check_ids_in_vocab

        check_ids_in_vocab(ctx.model, windows.train, "training")
        if windows.train.shape[0] == 0:
            raise ConfigError(f"{windows.source} gives no training window of seqlen={cfg.seqlen} besides the held-out "
                              "ones: use more text or a smaller seqlen")
        return windows

    def _loss(self, ctx: PruneContext, teacher: nn.Module | None) -> LossFn:
        if teacher is None:
            return lm_loss
        cfg = self.config
        hidden = cfg.hidden_weight > 0
        num_teacher = int(getattr(teacher.config, "num_hidden_layers", 0) or 0)
        kept = kd.kept_layers(num_teacher, [e for r in ctx.history for e in r.edits]) if hidden else []
        if hidden and len(kept) != ctx.arch.num_layers:
            raise ConfigError(f"the model has {ctx.arch.num_layers} layers, the teacher {num_teacher} and the recorded "
                              f"cuts keep {len(kept)}: the layer map is unknown; set hidden_weight=0")

        def loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                t = teacher(input_ids=ids, output_hidden_states=hidden, use_cache=False)
            s = model(input_ids=ids, output_hidden_states=hidden, use_cache=False)
            value = kd.logit_kl(s.logits, t.logits, cfg.temperature)
            if hidden:
                value = value + cfg.hidden_weight * kd.hidden_mse(s.hidden_states[1:], t.hidden_states[1:], kept)
            return value

        return loss

    def _train(self, ctx: PruneContext, windows: Windows, steps: int, masks: dict[str, torch.Tensor],
               teacher: nn.Module | None) -> TrainResult:
        cfg = self.config
        model = ctx.model
        for p in model.parameters():
            p.requires_grad_(False)
        torch.manual_seed(cfg.seed)  # the adapter init
        hooks: contextlib.ExitStack = contextlib.ExitStack()
        if cfg.uses_lora:
            names = self._lora_targets(model, ctx.arch)
            conv1d = any(t.conv1d for t in model_targets(model, ctx.arch) if t.name in set(names))
            trained: nn.Module = lora.wrap(model, names, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, conv1d)
            params = lora.trainable(trained)
            if cfg.lora_masked and masks:
                hooks.enter_context(lora.mask_aware(lora.lora_layers(trained), masks))
        else:
            trained = model
            params = self._full_params(ctx)
            for p in params.values():
                p.requires_grad_(True)
            hooks.enter_context(masked_gradients(params, {n: m for n, m in masks.items() if n in params}))
        full_masks = {} if cfg.uses_lora else {n: m for n, m in masks.items() if n in params}
        settings = TrainSettings(
            steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
            warmup_steps=int(cfg.warmup * steps), max_grad_norm=cfg.max_grad_norm, eval_every=cfg.eval_every,
            seed=cfg.seed, precision=cfg.precision,
            checkpoint_dir=Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None,
            checkpoint_every=cfg.checkpoint_every, progress=ctx.runtime.progress,
            fingerprint={"config": repr({k: v for k, v in cfg.to_dict().items() if k not in _NOT_FINGERPRINTED}),
                         "train": list(windows.train.shape),
                         "data_sum": int(windows.train.sum())})
        if cfg.grad_checkpointing:
            model.gradient_checkpointing_enable(  # type: ignore[operator]
                gradient_checkpointing_kwargs={"use_reentrant": False})
        try:
            with hooks:
                result = train(trained, params, windows, self._loss(ctx, teacher), settings, ctx.device,
                               resume=cfg.resume, after_step=(lambda: apply_masks_(params, full_masks)),
                               on_step=self.on_step)
        finally:
            if cfg.grad_checkpointing:
                model.gradient_checkpointing_disable()  # type: ignore[operator]
            if cfg.uses_lora:
                lora.merge(trained, masks)
        return result

    def _full_params(self, ctx: PruneContext) -> dict[str, nn.Parameter]:
        """Every parameter of the decoder layers and the final norm (embeddings and head stay frozen)."""
        prefixes = [ctx.arch.layers_path + "."]
        if ctx.arch.final_norm_path:
            prefixes.append(ctx.arch.final_norm_path + ".")
        return {n: p for n, p in ctx.model.named_parameters() if any(n.startswith(x) for x in prefixes)}

    def _record(self, ctx: PruneContext, windows: Windows, steps: int, result: TrainResult,
                masks: dict[str, torch.Tensor], kept: bool) -> None:
        cfg, report = self.config, ctx.report
        tokens_per_step = cfg.batch_size * int(windows.train.shape[1])
        train_tokens = int(windows.train.numel())
        info: dict[str, Any] = {
            "mode": cfg.mode, "data": windows.source, "train_windows": int(windows.train.shape[0]),
            "heldout_windows": int(windows.heldout.shape[0]), "seqlen": int(windows.train.shape[1]),
            "tokens": steps * tokens_per_step, "steps": steps, "lr": cfg.lr,
            "epochs": steps * tokens_per_step / train_tokens if train_tokens else None,
            "masked_params": len(masks), "zeros_kept": kept, **result.summary(),
        }
        if cfg.uses_lora:
            info["lora"] = {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                            "masked_training": cfg.lora_masked, "merged": "masked" if masks else "plain"}
        if cfg.mode == "distill":
            info["distill"] = {"teacher": cfg.teacher, "temperature": cfg.temperature,
                               "hidden_weight": cfg.hidden_weight, "trained": cfg.distill_train}
        report.scores["recovery"] = info
        if result.heldout:
            if result.heldout[0][0] == 0:
                report.figures["heldout_loss_before"] = result.heldout[0][1]
            report.figures["heldout_loss_after"] = result.heldout[-1][1]
        report.modules = measure_sparsity(model_targets(ctx.model, ctx.arch))
        report.pattern = next((r.pattern for r in reversed(ctx.history) if r.pattern), None)
        if info["epochs"] and info["epochs"] > 1:
            report.notes.append(f"the training text holds {train_tokens} tokens in windows, fewer than the budget: "
                                f"{info['epochs']:.1f} epochs over it")


def _tokenizer_of(model: nn.Module) -> Any:
    """The tokenizer saved with the model's directory (for a recipe run without one)."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name:
        raise ConfigError("recovery on a named data set needs the model's tokenizer: pass it (pare.run(..., "
                          "tokenizer=tok)) or train on data='calibration'")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the tokenizer of {name!r} for recovery ({exc}): pass it") from exc


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id (``org/model``)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or Path(name).exists()
