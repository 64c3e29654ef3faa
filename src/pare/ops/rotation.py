"""Rotation math of SliceGPT (Ashkboos et al., 2024, arXiv 2401.15024): pure functions on tensors.

SliceGPT rests on computational invariance: with every norm's scale fused into the linears that read
its output, a norm computes ``x / ||x||`` (up to a constant), so for an orthogonal ``Q``
``norm(x Q) = norm(x) Q`` (eq. 2 of the paper). Rotating the residual stream by ``Q`` (writers
``W_out <- Q^T W_out``, readers ``W_in <- W_in Q``) leaves the function unchanged; with ``Q`` the PCA
basis of the stream (eigenvectors of ``sum_t x_t x_t^T``, eq. 7) the last columns carry the least
energy and are deleted (eq. 8: ``Q <- Q[:, :k]``).

Conventions: ``W: [out, in]`` (a Linear's weight), activations are rows ``x: [..., H]``.
"""

from __future__ import annotations

import math

import torch


def second_moment(x: torch.Tensor, unit_tokens: bool = False) -> torch.Tensor:
    """``sum_t x_t x_t^T`` over every token of ``x: [..., H]``, in fp64. ``[H, H]``.

    With ``unit_tokens`` every token is first scaled to unit length, so each token weighs the same
    whatever its norm (the norms downstream only see directions; massive-activation tokens would
    otherwise decide the basis alone).
    """
    flat = x.reshape(-1, x.shape[-1]).to(torch.float64)
    if unit_tokens:
        flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return flat.T @ flat


def pca_basis(moment: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a symmetric second moment ``[H, H]`` in fp64, largest first.

    ``damp`` times the mean diagonal is added to the diagonal first (as the reference code does) so
    that directions with no energy still get a well-conditioned, orthonormal basis.

    Returns:
        ``(eigenvalues [H], Q [H, H])`` with orthonormal columns sorted by decreasing eigenvalue.
    """
    m = moment.to(torch.float64)
    m = (m + m.T) / 2
    m = m + damp * m.diagonal().mean() * torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    values, vectors = torch.linalg.eigh(m)
    order = torch.argsort(values, descending=True)
    return values[order], vectors[:, order]


def mean_free_basis(moment: torch.Tensor, k: int, damp: float = 0.01) -> torch.Tensor:
    """A ``[H, k]`` orthonormal basis for a zero-mean stream whose coordinates stay zero-mean.

    A LayerNorm subtracts the mean of its input. When every writer of the stream is centred, the
    stream lies in ``1^perp`` and the mean subtraction does nothing; after a rotation that stays true
    only if the new basis maps the all-ones vector of ``k`` coordinates onto the all-ones direction
    of ``H``. This basis spans the top ``k - 1`` principal directions inside ``1^perp`` plus
    ``1 / sqrt(H)``, mixed by a Householder reflection so that ``B @ 1_k`` is parallel to ``1_H``:
    for any ``x`` with ``sum(x) = 0``, ``x @ B`` also sums to zero. It costs one of the ``k``
    dimensions (always zero in the stream).

    Args:
        moment: ``[H, H]`` second moment of the centred stream.
        k: kept width, ``2 <= k <= H``.
    """
    h = moment.shape[0]
    if not 2 <= k <= h:
        raise ValueError(f"k must be in [2, {h}], got {k}")
    ones = torch.full((h, 1), 1 / math.sqrt(h), dtype=torch.float64, device=moment.device)
    proj = torch.eye(h, dtype=torch.float64, device=moment.device) - ones @ ones.T
    _, q = pca_basis(proj @ moment.to(torch.float64) @ proj, damp)
    top = proj @ q[:, : k - 1]  # remove the numerical residue along 1, then re-orthonormalise
    top, _ = torch.linalg.qr(top)
    v = torch.cat([top, ones], dim=1)  # [H, k], orthonormal
    e = torch.zeros(k, 1, dtype=torch.float64, device=moment.device)
    e[-1] = 1.0
    u = e - torch.full_like(e, 1 / math.sqrt(k))  # Householder: 1_k / sqrt(k) <-> e_k
    reflect = torch.eye(k, dtype=torch.float64, device=moment.device) - 2 * (u @ u.T) / (u.T @ u)
    return v @ reflect


def complete_basis(b: torch.Tensor) -> torch.Tensor:
    """Extend orthonormal columns ``b: [H, k]`` to an orthogonal ``[H, H]`` whose first ``k`` columns are ``b``."""
    h, k = b.shape
    if k == h:
        return b.clone()
    b64 = b.to(torch.float64)
    rest = torch.eye(h, dtype=torch.float64, device=b.device) - b64 @ b64.T
    values, vectors = torch.linalg.eigh((rest + rest.T) / 2)
    return torch.cat([b64, vectors[:, torch.argsort(values, descending=True)[: h - k]]], dim=1)


def rotate_input(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A reader's weight for a rotated input: ``W: [..., out, H] -> W @ Q: [..., out, H']`` (``Q: [H, H']``)."""
    return (w.to(torch.float64) @ q.to(w.device, torch.float64)).to(w.dtype)


def rotate_output(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A writer's weight for a rotated output: ``W: [..., H, in] -> Q^T @ W: [..., H', in]``."""
    return (q.to(w.device, torch.float64).T @ w.to(torch.float64)).to(w.dtype)


def rotate_rows(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Vectors living in the stream (embedding rows, biases): ``x: [..., H] -> x @ Q``."""
    return (x.to(torch.float64) @ q.to(x.device, torch.float64)).to(x.dtype)


def fold_norm_into_reader(
    w: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A reader of ``n * scale + shift`` rewritten to read ``n`` directly.

    ``W (n * s + b) + c = (W diag(s)) n + (W b + c)``.

    Args:
        w: ``[..., out, H]``.
        bias: ``[..., out]`` or None (then ``shift`` must be None or zero).
        scale: the norm's weight ``[H]``.
        shift: the norm's bias ``[H]`` or None.

    Returns:
        ``(W diag(scale), bias + W shift)``.
    """
    w64 = w.to(torch.float64)
    new_bias = bias
    if shift is not None:
        extra = w64 @ shift.to(w.device, torch.float64)
        new_bias = (extra if bias is None else bias.to(torch.float64) + extra).to(w.dtype)
    return (w64 * scale.to(w.device, torch.float64)).to(w.dtype), new_bias


def center_output(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Subtract the mean along the stream dimension ``dim`` (a writer's output, an embedding row, a
    bias), so that what it adds to the stream sums to zero over the channels."""
    w64 = w.to(torch.float64)
    return (w64 - w64.mean(dim=dim, keepdim=True)).to(w.dtype)


def kept_width(hidden: int, slicing: float, multiple: int, minimum: int = 1) -> int:
    """``floor((1 - slicing) * hidden)`` rounded down to ``multiple`` (at least ``minimum``, at most ``hidden``)."""
    k = math.floor((1 - slicing) * hidden + 1e-9)
    k -= k % multiple
    return min(hidden, max(k, minimum))


__all__ = [
    "center_output",
    "complete_basis",
    "fold_norm_into_reader",
    "kept_width",
    "mean_free_basis",
    "pca_basis",
    "rotate_input",
    "rotate_output",
    "rotate_rows",
    "second_moment",
]
