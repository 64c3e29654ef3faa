"""MoE expert pruning: remove whole routed experts per layer (optionally merging them), router-guided.

For each MoE layer the calibration tokens' routing is recorded (which experts each token selects,
with which gate values, and how large each selected expert's output is), every expert gets a
saliency (:mod:`pare.ops.experts`: ``reap`` as in REAP, Lasby et al. 2025, arXiv 2510.13999;
``frequency``; ``gate``; ``reconstruction``), and the lowest-scoring experts are removed with their
router rows. ``merge=True`` instead folds each removed expert into its most similar kept one
(frequency-weighted average of the weights, as HC-SMoE / MC-SMoE do).

``allocation="uniform"`` keeps the same count in every layer, so the config states it and the result
reloads with ``from_pretrained``; layers are visited in order, each scored on the outputs of the
already-pruned layers before it (``RuntimeConfig(sequential=False)``: on the dense model's). Each layer
runs once: after the cut its outputs are updated from its MoE block alone, re-run on the recorded block
inputs with the experts computed only for tokens whose routing changed
(:mod:`pare.calibration.moe_replay`; merging, which changes kept experts too, runs the layer again).
``allocation="global"`` scores every layer on the dense model first and ranks experts of all layers
together (per-layer counts, replayed by ``pare.load``). Shared experts (Qwen2-MoE, DeepSeek) are never
removed. A group-limited router (DeepSeek's ``n_group``) loses the same number of experts in every
group, each group's weakest, so ``n_group`` and ``topk_group`` keep their meaning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from pare.arch.roles import ExpertsRoles, ModelArch
from pare.arch.surgery.experts import (
    current_top_k,
    expert_groups,
    group_limited,
    grouped_count_problem,
    merge_experts,
    remove_experts,
    sync_expert_config,
)
from pare.calibration.moe_replay import BlockCall, NotReplayable, record_blocks, replay_block
from pare.calibration.runner import LayerStep
from pare.calibration.stats import RoutingStats, record_routing, record_routing_once
from pare.config import PruneConfig, check_ratio, help_field, register
from pare.errors import ConfigError
from pare.methods.base import PruneContext, StructuralPruner
from pare.ops import experts as ops

log = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "global")


@dataclass(frozen=True)
class ExpertsConfig(PruneConfig):
    """Expert pruning options; give one of ``num_experts`` and ``expert_ratio``.

    Attributes:
        num_experts: routed experts kept per MoE layer (with ``allocation="global"``: on average); when
            given, it replaces ``expert_ratio`` (recorded as 0).
        expert_ratio: fraction of each layer's routed experts removed, in [0, 1) (default 0.25).
        importance: ``reap``, ``frequency``, ``gate`` or ``reconstruction`` (see :mod:`pare.ops.experts`).
        allocation: ``uniform`` (same count per layer; plain ``from_pretrained``) or ``global``.
        merge: fold removed experts into their most similar kept expert instead of dropping them.
        top_k: experts each token selects after the cut (0: the model's ``num_experts_per_tok``); needed
            when fewer experts are kept than tokens select.
        probe_tokens: tokens per calibration batch every expert is run on to compare experts (merge).
    """

    method: ClassVar[str] = "experts"

    num_experts: int = help_field(0, "routed experts kept per MoE layer (instead of --expert-ratio)")
    expert_ratio: float = help_field(0.25, "fraction of routed experts removed per MoE layer, in [0, 1)")
    importance: str = help_field("reap", "reap | frequency | gate | reconstruction")
    allocation: str = help_field("uniform", "uniform (same count per layer) | global (counts per layer)")
    merge: bool = help_field(False, "merge each removed expert into its most similar kept one (frequency-weighted)")
    top_k: int = help_field(0, "experts each token selects after the cut (0: keep num_experts_per_tok)")
    probe_tokens: int = help_field(64, "merge: tokens per batch every expert runs on to measure similarity")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_experts", "top_k", "probe_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        check_ratio("expert_ratio", self.expert_ratio)
        default = ExpertsConfig.__dataclass_fields__["expert_ratio"].default
        if self.num_experts and self.expert_ratio not in (0.0, default):
            raise ConfigError("give one of num_experts (experts kept per layer, e.g. --num-experts 6) and "
                              f"expert_ratio (fraction removed, e.g. --expert-ratio 0.25), not both; got num_experts="
                              f"{self.num_experts}, expert_ratio={self.expert_ratio}")
        if self.num_experts:
            object.__setattr__(self, "expert_ratio", 0.0)  # the manifest says what was done
        elif self.expert_ratio == 0:
            raise ConfigError("expert_ratio=0 removes nothing: give expert_ratio > 0 or num_experts (experts kept)")
        if self.importance not in ops.IMPORTANCES:
            raise ConfigError(f"importance must be one of {list(ops.IMPORTANCES)}, got {self.importance!r}")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"allocation must be one of {list(ALLOCATIONS)}, got {self.allocation!r}")
        if self.merge and self.probe_tokens == 0:
            raise ConfigError("merge compares experts on probe tokens: probe_tokens must be at least 1")

    def kept(self, num_experts: int) -> int:
        """Experts kept out of ``num_experts`` (at least 1)."""
        if self.num_experts:
            return self.num_experts
        return max(1, round((1 - self.expert_ratio) * num_experts))


@register
class ExpertsPruner(StructuralPruner):
    """Score routed experts from the calibration tokens' routing, then remove (or merge) the weakest."""

    config_class = ExpertsConfig
    config: ExpertsConfig
    needs_calibration: ClassVar[bool] = True

    def check(self, model: nn.Module, arch: ModelArch) -> None:
        cfg = self.config
        moe = [r for r in arch.layers if r.experts is not None]
        if not moe:
            raise ConfigError(f"{arch.model_type} has no routed experts (no MoE layer): expert pruning needs a "
                              "Mixture-of-Experts model such as Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE")
        layers = arch.layer_modules(model)
        for roles in moe:
            ex = roles.experts
            assert ex is not None
            layer = layers[roles.index]
            k, selects = cfg.kept(ex.num_experts), cfg.top_k or current_top_k(layer, ex)
            router = layer.get_submodule(ex.router)
            if group_limited(router):
                if cfg.allocation == "global":
                    raise ConfigError(f"layer {roles.index}: the router selects experts within groups (n_group > 1), "
                                      "so each group must keep as many experts; use allocation='uniform'")
                why = grouped_count_problem(router, ex.num_experts, k, selects)
                if why is not None:
                    raise ConfigError(f"layer {roles.index}: {why} (--num-experts)")
            if k > ex.num_experts:
                raise ConfigError(f"num_experts={k} is more than layer {roles.index}'s {ex.num_experts} experts")
            if cfg.top_k and cfg.top_k > k:
                raise ConfigError(f"top_k={cfg.top_k} is more than the {k} experts kept in layer {roles.index}")
            if k < selects:
                raise ConfigError(
                    f"keeping {k} of layer {roles.index}'s {ex.num_experts} experts leaves fewer than the {selects} "
                    f"each token selects (num_experts_per_tok): keep at least {selects}, or say how many each token "
                    f"should select with top_k (--top-k N, N <= {k})")

    def run(self, ctx: PruneContext) -> None:
        cfg = self.config
        top_k = cfg.top_k or None
        rows: list[dict[str, Any]] = []
        if cfg.allocation == "global":
            stats = self._dense_stats(ctx)
            scores = {i: ops.expert_scores(cfg.importance, s.sums, s.tokens) for i, s in stats.items()}
            minimum = cfg.top_k or max(self._top_k(ctx, i) for i in stats)
            total = sum(cfg.kept(int(s.numel())) for s in scores.values())
            counts = ops.global_counts(list(scores.values()), total, minimum)
            for (i, s), k in zip(scores.items(), counts, strict=True):
                rows.append(self._cut(ctx, i, stats[i], s, k, top_k))
            ctx.report.notes.append("allocation=global scores every layer on the dense model's activations")
        else:
            sequential = ctx.runtime.sequential
            last = ctx.arch.num_layers - 1
            runner = ctx.runner(sequential=True)
            self._additive: dict[type, bool] = {}
            for step in runner.steps(final_outputs=False, overwrite_inputs=sequential):
                ex = step.roles.experts
                if ex is None:
                    continue
                if sequential and step.index < last and self._replayable(step, ex):
                    row = self._prune_replaying(ctx, step, ex, top_k)
                    if row is not None:
                        rows.append(row)
                        continue
                st = self._record(step, ex.num_experts, keep_outputs=not sequential and step.index < last)
                layer_scores = ops.expert_scores(cfg.importance, st.sums, st.tokens)
                rows.append(self._cut(ctx, step.index, st, layer_scores, cfg.kept(ex.num_experts), top_k))
        ctx.report.uniform = sync_expert_config(ctx.model, ctx.describe(), top_k)
        ctx.report.scores["experts"] = rows

    @staticmethod
    def _top_k(ctx: PruneContext, i: int) -> int:
        ex = ctx.arch.layers[i].experts
        assert ex is not None
        return current_top_k(ctx.arch.layer_modules(ctx.model)[i], ex)

    def _record(self, step: LayerStep, num_experts: int, keep_outputs: bool) -> RoutingStats:
        """Routing statistics of one layer's experts over every calibration batch. With
        ``keep_outputs`` the layer's (dense) outputs become the next layer's inputs."""
        ex = step.roles.experts
        assert ex is not None
        cfg = self.config
        st = RoutingStats(num_experts, probe_tokens=cfg.probe_tokens if cfg.merge else 0,
                          outputs=cfg.importance in ("reap", "reconstruction"))
        experts = step.layer.get_submodule(ex.path)
        if keep_outputs and st.outputs:  # one expert pass gives the statistics and the layer's outputs
            recording = record_routing_once(experts, st)
        else:
            recording = record_routing(experts, st, stop=not keep_outputs)
        with recording:
            outputs = step.run(replace_inputs=keep_outputs)
        if keep_outputs:
            step.dense_outputs = outputs
        return st

    def _replayable(self, step: LayerStep, ex: ExpertsRoles) -> bool:
        """Whether the layer's outputs after the cut can come from its MoE block alone (moe_replay):
        experts removed (merging changes the kept experts too), a block below the layer, and a
        layer class not found to combine its block otherwise."""
        return (not self.config.merge and "." in ex.path
                and self._additive.get(type(step.layer), True))

    def _prune_replaying(self, ctx: PruneContext, step: LayerStep, ex: ExpertsRoles,
                         top_k: int | None) -> dict[str, Any] | None:
        """Score, cut and update one layer's outputs with a single forward of the layer (None, nothing
        cut, when the block cannot be recorded for a replay: the caller takes the two-forward path).

        The forward records the routing statistics and every call of the MoE block; after the cut the
        outputs become ``y + block_new(x) - block_old(x)``, the pruned block run on its recorded inputs
        with its experts only on tokens whose routing changed (:mod:`pare.calibration.moe_replay`). The
        first layer of each class is checked against a full forward of the pruned layer on one batch
        (its inputs kept for that); a class that fails gets full forwards from then on.
        """
        cfg = self.config
        experts = step.layer.get_submodule(ex.path)
        block = step.layer.get_submodule(ex.path.rsplit(".", 1)[0])
        st = RoutingStats(ex.num_experts, outputs=cfg.importance in ("reap", "reconstruction"))
        calls: list[BlockCall] = []
        unchecked = type(step.layer) not in self._additive
        recording = record_routing_once(experts, st) if st.outputs else record_routing(experts, st)
        try:
            with recording, record_blocks(block, experts, calls):
                outputs = step.run(keep_outputs=True) if unchecked else step.run(replace_inputs=True)
        except NotReplayable as exc:
            if not unchecked:  # the inputs were already replaced: a class that passed cannot fail later
                raise
            log.info("%s: %s; its outputs are recomputed with full forwards", type(step.layer).__name__, exc)
            self._additive[type(step.layer)] = False
            return None
        assert outputs is not None
        layer_scores = ops.expert_scores(cfg.importance, st.sums, st.tokens)
        row = self._cut(ctx, step.index, st, layer_scores, cfg.kept(ex.num_experts), top_k)
        if len(row["kept"]) < ex.num_experts or top_k is not None:
            kept = torch.as_tensor(row["kept"])
            row["rerouted_tokens"] = 0
            with torch.no_grad():
                for b, call in enumerate(calls):
                    new, n = replay_block(block, experts, call, kept, ex.num_experts)
                    outputs[b].add_((new - call.out).to(outputs[b].device, outputs[b].dtype))
                    row["rerouted_tokens"] += n
                if unchecked:
                    full = step.forward_batch(0)
                    err = float((outputs[0] - full.to(outputs[0].device)).abs().max())
                    self._additive[type(step.layer)] = err <= 1e-4 * float(full.abs().max()) + 1e-6
                    if not self._additive[type(step.layer)]:
                        log.info("%s does not add its MoE block's output to its residual (max diff %.3g): its "
                                 "outputs are recomputed with full forwards", type(step.layer).__name__, err)
                        outputs = step.run(keep_outputs=True)
        step.dense_outputs = outputs
        return row

    def _dense_stats(self, ctx: PruneContext) -> dict[int, RoutingStats]:
        out: dict[int, RoutingStats] = {}
        last = ctx.arch.num_layers - 1
        for step in ctx.runner(sequential=True).steps(final_outputs=False, overwrite_inputs=True):
            ex = step.roles.experts
            if ex is not None:
                out[step.index] = self._record(step, ex.num_experts, keep_outputs=step.index < last)
        return out

    def _cut(self, ctx: PruneContext, i: int, st: RoutingStats, scores: torch.Tensor, k: int,
             top_k: int | None) -> dict[str, Any]:
        """Remove (or merge away) all but the ``k`` best experts of layer ``i``; the report row."""
        layer = ctx.arch.layer_modules(ctx.model)[i]
        ex = ctx.arch.layers[i].experts
        assert ex is not None
        keep = ops.keep_experts(scores, k, expert_groups(layer.get_submodule(ex.router)))
        row: dict[str, Any] = {"layer": i, "scores": [float(v) for v in scores], "kept": keep.tolist(),
                               "tokens": st.tokens, "frequency": [int(v) for v in st.sums["count"]]}
        if k == scores.numel() and top_k is None:
            return row
        if self.config.merge:
            groups = ops.merge_groups(ops.cosine_similarity_matrix(st.mean_outputs()), keep)
            row["merged"] = {str(g): m[1:] for g, m in groups.items() if len(m) > 1}
            edit = merge_experts(ctx.model, ctx.arch, i, groups, st.sums["count"], top_k)
        else:
            edit = remove_experts(ctx.model, ctx.arch, i, keep, top_k)
        ctx.report.edits.append(edit)
        return row


__all__ = ["ALLOCATIONS", "ExpertsConfig", "ExpertsPruner"]
