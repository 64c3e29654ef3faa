"""The residual stream of a pre-norm decoder: who writes it, which norm each reader reads it through.

SliceGPT (and any rotation of the hidden size) needs, for every decoder layer, the modules that add
to the residual stream (the *writers*: embeddings, attention output, MLP / expert output) and the
modules that read it (q/k/v, gate/up, router, experts, the head), each through exactly one norm
whose scale can be fused into it. The static roles of :class:`~pare.arch.roles.ModelArch` say which
projection is which; :func:`residual_plan` checks the dataflow with one short forward (hooks inside a
context manager, always removed): every reader's input is the output of one of the layer's norms,
every norm reads the stream (the layer's input, plus the attention output in a sequential block),
the layer's output is its input plus its writers' outputs, and each norm computes RMSNorm or
LayerNorm. Anything else (post-norms, Gemma's sandwich norms and ``1 + w`` scale, residual scaling,
a reader without a norm) is refused with the reason.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from pare.arch.roles import LayerRoles, ModelArch, Proj
from pare.errors import ConfigError
from pare.hooks import removed_after

PortKind = Literal["linear", "conv1d", "experts"]
NormKind = Literal["rms", "layernorm"]


@dataclass(frozen=True)
class Port:
    """One parameter that reads or writes the stream.

    Attributes:
        module: full module name.
        param: parameter name (``weight``, or a fused expert parameter such as ``gate_up_proj``).
        kind: ``linear`` (``[out, in]``), ``conv1d`` (GPT-2, stored ``[in, out]``) or ``experts`` (3-D
            ``[E, out, in]``).
    """

    module: str
    param: str = "weight"
    kind: PortKind = "linear"


@dataclass
class NormSite:
    """A norm and the readers that read the stream through it (``layer`` None: the final norm)."""

    norm: str
    kind: NormKind
    layer: int | None
    readers: list[Port] = field(default_factory=list)
    norm_blocks: set[str] = field(default_factory=set)


@dataclass
class ResidualPlan:
    """Every writer and every (norm, readers) site of the stream, in model order."""

    embeddings: tuple[str, ...]
    writers: dict[int, list[Port]]
    sites: list[NormSite]


BlockName = Literal["attention", "mlp", "experts", "shared"]
PortRole = Literal["reader", "writer"]
PortSort = Literal["proj", "experts", "router", "shared_gate"]


@dataclass(frozen=True)
class StreamPort:
    """One parameter of a decoder layer that reads or writes the residual stream, as the layer's roles
    name it (paths inside the layer). This is the one list of the stream's readers and writers:
    hidden-size surgery slices each, width importance scores them, SliceGPT rotates them.

    Attributes:
        role: ``reader`` (its input side is the hidden size) or ``writer`` (its output side is).
        block: ``attention``, ``mlp``, ``experts`` (routed experts and their router) or ``shared``
            (a MoE layer's shared expert).
        sort: ``proj`` (a Linear / Conv1D with roles ``proj``), ``experts`` (a fused 3-D expert
            parameter ``param``: ``gate_up [E, 2I, H]`` reads, ``down [E, H, I]`` writes), ``router``
            or ``shared_gate`` (plain Linears reading the stream).
        path: the module's path inside the layer.
        proj: the projection's roles (``sort == "proj"``), else None.
        param: the parameter's name.
    """

    role: PortRole
    block: BlockName
    sort: PortSort
    path: str
    proj: Proj | None = None
    param: str = "weight"


def _proj_ports(block: BlockName, inputs: tuple[Proj, ...] | list[Proj], output: Proj) -> Iterator[StreamPort]:
    for p in inputs:
        yield StreamPort("reader", block, "proj", p.path, p)
    yield StreamPort("writer", block, "proj", output.path, output)


def stream_ports(roles: LayerRoles) -> Iterator[StreamPort]:
    """Every parameter of one decoder layer that reads or writes the residual stream, in model order:
    attention (q/k/v or qkv, then o), MLP (gate/up, then down), routed experts (fused gate/up, router,
    shared expert's inputs, shared-expert gate; then fused down, shared expert's down)."""
    att = roles.attention
    if att is not None:
        yield from _proj_ports("attention", att.inputs, att.o)
    if roles.mla is not None:  # latent attention: q (or q_a) and kv_a read the stream, o writes it
        yield from _proj_ports("attention", roles.mla.inputs, roles.mla.o)
    if roles.mlp is not None:
        yield from _proj_ports("mlp", roles.mlp.inputs, roles.mlp.down)
    ex = roles.experts
    if ex is None:
        return
    yield StreamPort("reader", "experts", "experts", ex.path, param=ex.gate_up_param)
    yield StreamPort("reader", "experts", "router", ex.router)
    if ex.shared is not None:
        yield from (StreamPort("reader", "shared", "proj", p.path, p) for p in ex.shared.inputs)
    if ex.shared_gate is not None:
        yield StreamPort("reader", "experts", "shared_gate", ex.shared_gate)
    yield StreamPort("writer", "experts", "experts", ex.path, param=ex.down_param)
    if ex.shared is not None:
        yield StreamPort("writer", "shared", "proj", ex.shared.down.path, ex.shared.down)


def _port(prefix: str, sp: StreamPort) -> Port:
    """The :class:`Port` (full module name) of a stream port of the layer at ``prefix``."""
    kind: PortKind = "experts" if sp.sort == "experts" else (
        "conv1d" if sp.proj is not None and sp.proj.conv1d else "linear")
    return Port(f"{prefix}.{sp.path}", sp.param, kind)


def _blocks(prefix: str, roles: LayerRoles) -> list[tuple[str, list[Port], Port, str]]:
    """Per block of a layer: (name, readers, writer, module whose output is the block's contribution).
    A MoE block (routed and shared experts) is the layer's ``mlp``; the shared expert's down is not its
    writer (see :func:`writers_of`)."""
    ports = list(stream_ports(roles))
    out = []
    for name, blocks, owner in (("attention", ("attention",), None), ("mlp", ("mlp",), None),
                                ("mlp", ("experts", "shared"), roles.experts)):
        mine = [p for p in ports if p.block in blocks]
        if not mine:
            continue
        readers = [_port(prefix, p) for p in mine if p.role == "reader"]
        writer = next(p for p in mine if p.role == "writer" and p.block != "shared")
        full = _port(prefix, writer)
        block = full.module.rsplit(".", 1)[0] if owner is not None else full.module
        out.append((name, readers, full, block))
    return out


def writers_of(arch: ModelArch, index: int) -> list[Port]:
    """The parameters of layer ``index`` that write the stream (attention output, MLP / experts output)."""
    prefix = arch.layer_prefix(index)
    return [_port(prefix, p) for p in stream_ports(arch.layers[index]) if p.role == "writer"]


class _Recorder:
    """Inputs and outputs of chosen modules during one forward."""

    def __init__(self) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def attach(self, model: nn.Module, names: set[str]) -> Iterator[None]:
        def hook(name: str) -> Any:
            def record(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
                x = args[0] if args else kwargs.get("hidden_states")
                if isinstance(x, torch.Tensor) and name not in self.inputs:
                    self.inputs[name] = x.detach()
                y = out[0] if isinstance(out, (tuple, list)) else out
                if isinstance(y, torch.Tensor) and name not in self.outputs:
                    self.outputs[name] = y.detach()
            return record

        with removed_after() as handles:
            for name in names:
                handles.append(model.get_submodule(name).register_forward_hook(hook(name), with_kwargs=True))
            yield


def _same(a: torch.Tensor | None, b: torch.Tensor | None, tol: float = 1e-4) -> bool:
    if a is None or b is None or a.shape[-1] != b.shape[-1] or a.numel() != b.numel():
        return False
    a2, b2 = a.reshape(-1, a.shape[-1]).float(), b.reshape(-1, b.shape[-1]).float()
    return bool(torch.equal(a2, b2) or (a2 - b2).norm() <= tol * max(float(b2.norm()), 1e-6))


def norm_kind(norm: nn.Module, x: torch.Tensor, y: torch.Tensor) -> NormKind | None:
    """``rms`` or ``layernorm`` when ``y = norm(x)`` is what that formula gives with the module's own
    weight (and bias, eps); None for anything else (Gemma's ``x * (1 + w)``, no weight...)."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1:
        return None
    b = getattr(norm, "bias", None)
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    xf = x.float()
    tol = 1e-3 if y.dtype == torch.float32 else 2e-2
    rms = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()
    if b is None and _same(y, rms, tol):
        return "rms"
    ln = F.layer_norm(xf, (xf.shape[-1],), w.float(), None if b is None else b.float(), eps)
    if _same(y, ln, tol):
        return "layernorm"
    return None


def residual_plan(model: nn.Module, arch: ModelArch) -> ResidualPlan:
    """Check the dataflow of the stream with one short forward and say which norm each reader reads
    through. Raises ConfigError naming what does not fit (see the module docstring)."""
    rec = _Recorder()
    names: set[str] = set()
    blocks = {i: _blocks(arch.layer_prefix(i), r) for i, r in enumerate(arch.layers)}
    for i, roles in enumerate(arch.layers):
        prefix = arch.layer_prefix(i)
        names.add(prefix)
        names.update(f"{prefix}.{n}" for n in roles.norms)
        for _n, readers, _w, block in blocks[i]:
            names.add(block)
            names.update(p.module for p in readers)
    if arch.final_norm_path is None:
        raise ConfigError(f"{arch.model_type}: no final norm before the head (a post-norm model), so the head reads "
                          "the raw stream; SliceGPT needs a norm in front of every reader")
    names.update({arch.final_norm_path, arch.lm_head_path, arch.embed_path, *arch.extra_embeddings})
    device = next(model.parameters()).device
    ids = torch.arange(1, 9, device=device).unsqueeze(0) % int(model.get_input_embeddings().weight.shape[0])  # type: ignore[operator]
    with torch.no_grad(), rec.attach(model, names):
        model(input_ids=ids, use_cache=False)
    _check_embeddings(arch, rec)
    sites: list[NormSite] = []
    writers: dict[int, list[Port]] = {}
    for i, roles in enumerate(arch.layers):
        sites += _layer_sites(model, arch, i, roles, blocks[i], rec)
        writers[i] = writers_of(arch, i)
    last = arch.layer_prefix(arch.num_layers - 1)
    final = arch.final_norm_path
    kind = norm_kind(model.get_submodule(final), rec.inputs[final], rec.outputs[final])
    if kind is None or not _same(rec.inputs[final], rec.outputs.get(last)):
        raise ConfigError(f"{arch.model_type}: the final norm {final!r} is not an RMSNorm / LayerNorm of the last "
                          "layer's output, so it cannot be fused into the head")
    if not _same(rec.inputs.get(arch.lm_head_path), rec.outputs[final]):
        raise ConfigError(f"{arch.model_type}: the head does not read the final norm's output directly")
    sites.append(NormSite(final, kind, None, [Port(arch.lm_head_path)]))
    return ResidualPlan(tuple([arch.embed_path, *arch.extra_embeddings]), writers, sites)


def _check_embeddings(arch: ModelArch, rec: _Recorder) -> None:
    """The first layer must read the embeddings' sum as it is (up to one scale, as Gemma's ``sqrt(H)``)."""
    first = rec.inputs[arch.layer_prefix(0)].float()
    total = sum(rec.outputs[n].float().reshape(first.shape) for n in (arch.embed_path, *arch.extra_embeddings))
    assert isinstance(total, torch.Tensor)
    scale = float((first * total).sum() / (total * total).sum().clamp_min(1e-30))
    if not _same(first, scale * total):
        raise ConfigError(f"{arch.model_type}: the first layer does not read the embeddings as they are (a norm or "
                          "projection between them, as Bloom's embedding LayerNorm): the stream cannot be rotated")


def _layer_sites(model: nn.Module, arch: ModelArch, i: int, roles: LayerRoles,
                 blocks: list[tuple[str, list[Port], Port, str]], rec: _Recorder) -> list[NormSite]:
    prefix = arch.layer_prefix(i)
    x_in, x_out = rec.inputs[prefix], rec.outputs[prefix]
    family = arch.model_type
    contributions = {name: rec.outputs[block] for name, _r, _w, block in blocks}
    total = x_in.float().reshape(-1, x_in.shape[-1])
    for y in contributions.values():
        total = total + y.float().reshape(total.shape)
    if not _same(x_out, total):
        raise ConfigError(f"{family}: layer {i}'s output is not its input plus its attention and MLP outputs (a "
                          "post-norm, sandwich norm or scaled residual): the residual stream cannot be rotated")
    sites: dict[str, NormSite] = {}
    for name, readers, _w, _block in blocks:
        for port in readers:
            seen = rec.inputs.get(port.module)
            matches = [n for n in roles.norms if _same(seen, rec.outputs.get(f"{prefix}.{n}"))]
            # two norms with equal weights give equal outputs (parallel blocks): a block that has not
            # found its norm yet takes one no other block uses
            taken = {s.norm for s in sites.values()}
            block_norm = next((s.norm for s in sites.values() if name in s.norm_blocks), None)
            free = [n for n in matches if f"{prefix}.{n}" not in taken]
            own = block_norm.rsplit(".", 1)[-1] if block_norm else None
            norm = own if own in matches else next(iter(free or matches), None)
            if norm is None:
                raise ConfigError(f"{family}: {port.module} does not read the output of one of layer {i}'s norms "
                                  "(a post-norm block or a reader without a norm): SliceGPT needs a pre-norm model")
            full = f"{prefix}.{norm}"
            if full not in sites:
                expected = x_in if name == "attention" or roles.parallel_residual else None
                ok = _same(rec.inputs[full], x_in) or (
                    expected is None and "attention" in contributions
                    and _same(rec.inputs[full], x_in.float() + contributions["attention"].float().reshape(x_in.shape)))
                kind = norm_kind(model.get_submodule(full), rec.inputs[full], rec.outputs[full])
                if not ok or kind is None:
                    why = "does not read the residual stream" if not ok else "is neither an RMSNorm nor a LayerNorm"
                    raise ConfigError(f"{family}: norm {full!r} {why}, so its scale cannot be fused into the "
                                      "linears after it")
                sites[full] = NormSite(full, kind, i)
            sites[full].readers.append(port)
            sites[full].norm_blocks.add(name)
    unused = [n for n in roles.norms if f"{prefix}.{n}" not in sites]
    if unused:
        raise ConfigError(f"{family}: layer {i}'s norm(s) {unused} do not feed a reader of the stream (post-norms "
                          "on a block's output, as Gemma's sandwich norms): a rotated stream cannot pass them")
    return list(sites.values())


@dataclass(frozen=True)
class Stage:
    """One residual addition of a decoder layer: the blocks whose outputs are added to the stream at the
    same point (attention, then the MLP, in a sequential layer; both at once in a parallel layer).
    SliceGPT's per-layer scheme gives every stage its own basis: the stage's readers read the stream in
    the basis it entered with, its writers write in the stage's own, and the residual passes a shortcut
    ``Q_in^T Q_out`` between them.

    Attributes:
        blocks: the block names (``attention``, ``mlp``).
        outputs: paths inside the layer of the modules whose outputs the layer adds to the stream, in
            call order (o_proj, down_proj, a MoE block).
        writers: the stage's writer ports (full module names).
    """

    blocks: tuple[str, ...]
    outputs: tuple[str, ...]
    writers: tuple[Port, ...]


def layer_stages(arch: ModelArch, index: int) -> list[Stage]:
    """The residual additions of layer ``index`` in order (see :class:`Stage`)."""
    prefix, roles = arch.layer_prefix(index), arch.layers[index]
    blocks = _blocks(prefix, roles)
    writers = writers_of(arch, index)
    owner = {p.module: name for name, _r, _w, block in blocks
             for p in writers if p.module == block or p.module.startswith(block + ".")}
    cut = len(prefix) + 1
    # one norm for two blocks (GPT-J) means both read the same input: a parallel layer
    parallel = roles.parallel_residual or len(roles.norms) < 2
    groups = [blocks] if parallel or len(blocks) < 2 else [[b] for b in blocks]
    stages = []
    for group in groups:
        names = tuple(name for name, *_ in group)
        stages.append(Stage(names, tuple(block[cut:] for *_, block in group),
                            tuple(p for p in writers if owner.get(p.module) in names)))
    return stages


@contextlib.contextmanager
def stage_shortcuts(layer: nn.Module, stages: list[Stage], residual: list[torch.Tensor | None],
                    written: list[torch.Tensor | None], stream: torch.Tensor,
                    record: list[torch.Tensor] | None = None) -> Iterator[list[torch.Tensor]]:
    """Within the block, layer ``layer`` computes SliceGPT's per-stage residual: at stage ``s`` the
    stream ``r`` that entered it becomes ``r R_s + sum_b y_b W_s`` (``R_s = residual[s]``, ``W_s = written[s]``,
    None: identity) instead of ``r + sum_b y_b``, through hooks on the stage's output modules (the layer's
    own ``forward`` adds ``r``; the first output's hook adds ``r (R_s - I)``). ``stream`` is the layer's
    input. A non-square ``R_s`` (the last stage widening into an unsliced head) cannot be added inside
    the layer: its outputs are zeroed there and collected in the yielded list (one tensor), and the
    caller computes ``out R_s + collected``. ``record`` receives the stream after each non-last stage
    (before ``R`` and ``W``: what the next stage's norm would read unsliced). Hooks always removed."""
    state = {"r": stream}
    collected: list[torch.Tensor] = []

    def hook(s: int, first: bool, last_of_stage: bool) -> Any:
        def apply(_m: nn.Module, _args: tuple, out: Any) -> Any:
            y = out[0] if isinstance(out, (tuple, list)) else out
            r, res, w = state["r"], residual[s], written[s]
            wide = res is not None and res.shape[0] != res.shape[1]
            if w is not None:
                y = y @ w.to(y.dtype)
            if wide:  # (OPT flattens tokens inside its MLP: shapes follow r's where they meet it)
                lead = y.shape[:-1]
                y = y.reshape(*r.shape[:-1], y.shape[-1])
                collected[:] = [y if not collected else collected[0] + y]
                new = r.new_zeros(*lead, r.shape[-1])
            elif first and res is not None:
                eye = torch.eye(res.shape[0], dtype=r.dtype, device=r.device)
                new = y + (r @ (res.to(r.dtype) - eye)).reshape(y.shape)
            else:
                new = y
            if last_of_stage and s + 1 < len(stages):
                if record is not None:
                    raw = out[0] if isinstance(out, (tuple, list)) else out
                    record.append(r + raw.reshape(r.shape))
                state["r"] = r + new.reshape(r.shape)
            return type(out)([new, *out[1:]]) if isinstance(out, (tuple, list)) else new
        return apply

    with removed_after() as handles:
        for s, stage in enumerate(stages):
            for j, path in enumerate(stage.outputs):
                handles.append(layer.get_submodule(path).register_forward_hook(
                    hook(s, j == 0, j == len(stage.outputs) - 1)))
        yield collected


__all__ = [
    "NormSite", "Port", "ResidualPlan", "Stage", "StreamPort", "layer_stages", "norm_kind",
    "residual_plan", "stage_shortcuts", "stream_ports", "writers_of",
]
