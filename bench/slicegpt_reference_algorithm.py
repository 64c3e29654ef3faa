"""SliceGPT's own sequential algorithm (microsoft/TransformerCompression ``rotate_and_slice_sequential``
with ``ConstSlicingScheduler``), written out for a Llama model, to compare pare's SliceGPT with on the same
calibration and evaluation windows as ``bench/slicegpt_real.py``.

The reference package cannot be installed here (it is not on PyPI and GitHub is not reachable), so this
script re-implements what its code does, step by step, for Llama (RMSNorm) models only:

1. Fold every RMSNorm's weight into the linears that read it (the tied head is untied first); the norms
   become ``x / sqrt(sum(x^2) / H + eps)`` with ``H`` the *original* hidden size (the reference's ``RMSN``).
2. PCA (fp64, eigenvectors of ``sum_t x_t x_t^T`` plus 1% of its mean diagonal) of the first layer's inputs:
   rotate and slice the embeddings.
3. For each layer: q/k/v read the layer's input in the previous basis ``Q`` (sliced); the signal entering
   the MLP norm (computed with the sliced input) gives ``Q_mid``: o_proj writes and gate/up read in it, and
   the attention residual passes ``Q^T Q_mid``; the layer's output (computed with the above) gives
   ``Q_out``: down_proj writes in it and the MLP residual passes ``Q_mid^T Q_out``. Every dimension is
   ``k`` except the last layer's output and the head (``do_slice_head=False``, the reference's default).
4. The head reads the last basis.

A decoder layer with two shortcut matrices is not something transformers' Llama layer computes, so the
layers are wrapped by a module that runs their attention, MLP and norms with the shortcuts on the two
residual paths (as the reference's ``CompressibleLlamaDecoderLayer`` does): fine for a benchmark, and the
reason pare offers a shared basis (no shortcuts) and one basis per layer (one shortcut on the layer input).

    python bench/slicegpt_reference_algorithm.py [--slicing 0.25 --nsamples 8 --eval-windows 4]

Prints one JSON object (also cached under bench/results/slicegpt_real/).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from pare.calibration.data import calibration_windows, eval_token_ids  # noqa: E402
from pare.eval.perplexity import perplexity  # noqa: E402

MODEL = Path(os.environ.get("PARE_MODELS_DIR", Path.home() / ".cache/pare-models")) / "smollm2-135m"


class FixedRMS(nn.Module):
    """``x / sqrt(sum(x^2) / H + eps)`` with ``H`` fixed at the original hidden size, whatever the width."""

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.hidden, self.eps = hidden, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).sum(-1, keepdim=True) / self.hidden
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype)


class ShortcutLayer(nn.Module):
    """A Llama decoder layer whose two residual paths pass the matrices ``attn_q`` and ``mlp_q`` (None: identity)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.attn_q: torch.Tensor | None = None
        self.mlp_q: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        lay = self.layer
        attn, _ = lay.self_attn(hidden_states=lay.input_layernorm(hidden_states), **kwargs)
        res = hidden_states if self.attn_q is None else hidden_states @ self.attn_q
        h = res + attn
        mlp = lay.mlp(lay.post_attention_layernorm(h))
        res = h if self.mlp_q is None else h @ self.mlp_q
        return res + mlp


def pca(signals: list[torch.Tensor]) -> torch.Tensor:
    """Eigenvectors (columns, largest eigenvalue first) of ``sum x x^T`` over ``signals`` with 1% damping."""
    h = sum(x.reshape(-1, x.shape[-1]).double().T @ x.reshape(-1, x.shape[-1]).double() for x in signals)
    assert isinstance(h, torch.Tensor)
    h = h + 0.01 * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    values, vectors = torch.linalg.eigh(h)
    return vectors[:, torch.argsort(values, descending=True)]


def set_weight(linear: nn.Linear, w: torch.Tensor) -> None:
    linear.weight = nn.Parameter(w.to(linear.weight.dtype).contiguous())
    linear.out_features, linear.in_features = w.shape


def read_in(linears: list[nn.Linear], q: torch.Tensor, k: int) -> None:
    """Readers of the stream: ``W <- (W Q)[:, :k]``."""
    for lin in linears:
        set_weight(lin, (lin.weight.double() @ q)[:, :k])


def write_in(linear: nn.Linear, q: torch.Tensor, k: int) -> None:
    """Writers of the stream: ``W <- (Q^T W)[:k]``."""
    assert linear.bias is None
    set_weight(linear, (q.T @ linear.weight.double())[:k])


def fuse_norms(model: Any) -> None:
    hidden, eps = model.config.hidden_size, model.config.rms_norm_eps
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # untie
    for layer in model.model.layers:
        for norm, readers in ((layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                       layer.self_attn.v_proj]),
                              (layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj])):
            for lin in readers:
                set_weight(lin, lin.weight.double() * norm.weight.double())
    set_weight(model.lm_head, model.lm_head.weight.double() * model.model.norm.weight.double())
    for layer in model.model.layers:
        layer.input_layernorm = FixedRMS(hidden, eps)
        layer.post_attention_layernorm = FixedRMS(hidden, eps)
    model.model.norm = FixedRMS(hidden, eps)


def layer0_inputs(model: Any, windows: torch.Tensor) -> tuple[list[torch.Tensor], list[dict]]:
    """The first layer's hidden-state input and keyword arguments for every window."""
    seen: list[tuple[torch.Tensor, dict]] = []

    class Stop(Exception):
        pass

    def grab(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append((args[0] if args else kwargs.pop("hidden_states"), kwargs))
        raise Stop

    handle = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for w in windows:
            with contextlib.suppress(Stop):
                model(w[None], use_cache=False)
    finally:
        handle.remove()
    return [x for x, _ in seen], [kw for _, kw in seen]


@torch.no_grad()
def slice_model(model: Any, windows: torch.Tensor, k: int) -> None:
    fuse_norms(model)
    inps, kwargs = layer0_inputs(model, windows)
    layers = [ShortcutLayer(layer) for layer in model.model.layers]
    for i, wrapped in enumerate(layers):
        model.model.layers[i] = wrapped
    q = pca(inps)
    emb = model.model.embed_tokens
    emb.weight = nn.Parameter((emb.weight.double() @ q)[:, :k].to(emb.weight.dtype))
    last = len(layers) - 1
    for i, wrapped in enumerate(layers):
        lay = wrapped.layer
        attn, mlp = lay.self_attn, lay.mlp
        wrapped.attn_q = q.T[:k].to(inps[0].dtype)  # [k, H] until the mid basis is known
        read_in([attn.q_proj, attn.k_proj, attn.v_proj], q, k)
        inps = [(x.double() @ q)[..., :k].to(x.dtype) for x in inps]
        mids: list[torch.Tensor] = []
        hook = lay.post_attention_layernorm.register_forward_hook(lambda _m, a, _o, into=mids: into.append(a[0]))
        for x, kw in zip(inps, kwargs, strict=True):
            wrapped(x, **kw)
        hook.remove()
        q_mid = pca(mids)
        wrapped.attn_q = (wrapped.attn_q.double() @ q_mid[:, :k]).to(inps[0].dtype)
        write_in(attn.o_proj, q_mid, k)
        wrapped.mlp_q = q_mid.T[:k].to(inps[0].dtype)  # [k, H] until the output basis is known
        read_in([mlp.gate_proj, mlp.up_proj], q_mid, k)
        outs = [wrapped(x, **kw) for x, kw in zip(inps, kwargs, strict=True)]
        q = pca(outs)
        k_out = k if i < last else q.shape[0]  # the head is not sliced (do_slice_head=False)
        wrapped.mlp_q = (wrapped.mlp_q.double() @ q[:, :k_out]).to(inps[0].dtype)
        write_in(mlp.down_proj, q, k_out)
        inps = outs
    set_weight(model.lm_head, model.lm_head.weight.double() @ q)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slicing", type=float, default=0.25)
    ap.add_argument("--round-to", type=int, default=1, help="kept width: a multiple of this (and of the heads)")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--cache-dir", default=str(REPO / "bench" / "results" / "slicegpt_real"))
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tok = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    hidden, heads = model.config.hidden_size, model.config.num_attention_heads
    k = int((1 - a.slicing) * hidden + 1e-9)
    k -= k % a.round_to
    while k % heads:  # the same kept width as pare's (its config needs hidden % heads == 0)
        k -= a.round_to
    calib = calibration_windows(tok, "wikitext2", a.nsamples, a.seqlen, seed=0)
    t0 = time.perf_counter()
    slice_model(model, calib, k)
    prune_s = time.perf_counter() - t0
    test = eval_token_ids(tok, "wikitext2", split="test")
    res = perplexity(model, test, a.eval_seqlen, progress=False, max_windows=a.eval_windows)
    shortcuts = sum(int(m.attn_q.numel() + m.mlp_q.numel()) for m in model.model.layers)
    row = {"model": f"reference algorithm (3 bases per layer, 2 shortcuts) {a.slicing}", "slicing": a.slicing,
           "hidden": k, "ppl": round(res.ppl, 3), "eval_windows": res.n_windows, "eval_tokens": res.n_tokens,
           "params": sum(p.numel() for p in model.parameters()), "shortcut_params": shortcuts,
           "prune_s": round(prune_s, 1), "nsamples": a.nsamples, "seqlen": a.seqlen}
    out = Path(a.cache_dir) / f"reference_algorithm-{a.slicing}-{a.nsamples}x{a.seqlen}-{a.eval_windows}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=1))
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
