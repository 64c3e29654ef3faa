"""The dampened inverse Hessian of a layer's inputs and its Cholesky factor (SparseGPT, GPTQ).

Both OBS solvers (Frantar & Alistarh, 2023, SparseGPT; Frantar et al., 2023, GPTQ, arXiv:2210.17323)
need the upper Cholesky factor ``U`` of ``(H + damp I)^-1`` with ``H = 2/n X^T X``: row ``q`` of ``U``
scaled by ``1 / U_qq`` gives the OBS update of the not-yet-processed columns when column ``q`` is
fixed. This module computes it once, with dead inputs and dampening handled the same way for both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pare.errors import PareError
from pare.ops.finite import all_finite, non_finite_hint

log = logging.getLogger(__name__)

MAX_DAMP_TRIES = 12


@dataclass
class InverseHessianFactor:
    """The upper Cholesky factor of the dampened inverse Hessian, and which inputs were dead.

    Attributes:
        U: ``[in, in]`` fp32 upper triangular with ``U^T U = (H + damp I)^-1``.
        dead: ``[in]`` bool: inputs that never fired (``H_ii == 0``); their weights are zeroed.
        damp: the dampening finally added to the diagonal.
    """

    U: torch.Tensor
    dead: torch.Tensor
    damp: float


def inverse_hessian_factor(H: torch.Tensor, percdamp: float = 0.01, model_dtype: torch.dtype | None = None,
                           overwrite: bool = False) -> InverseHessianFactor:
    """Dampen ``H``, invert it through Cholesky and return the upper factor of ``H^-1``.

    Dead inputs (``H_ii == 0``) get ``H_ii = 1`` so that ``H`` stays invertible. The dampening starts
    at ``percdamp * mean(diag(H))``; if a Cholesky factorisation fails (``H`` not numerically
    positive definite), it is multiplied by 10 and the attempt repeated, with a warning.

    Only the upper triangle of ``H`` is read (it is symmetric). The work is done in one ``[in, in]``
    buffer (a down projection's fp32 Hessian is most of a streamed layer's memory): the factor is
    built in place, plus half a matrix kept until the Cholesky factorisation succeeds (to retry with
    more dampening) and a quarter-matrix temporary; the result is bitwise the one of
    :func:`inverse_hessian_factor_copies`, the straightforward version.

    Args:
        H: ``[in, in]`` Hessian (e.g. ``2/n X^T X``); not modified unless ``overwrite``.
        percdamp: dampening as a fraction of the mean diagonal.
        model_dtype: the dtype of the weights the Hessian serves (for the hint when it is not finite).
        overwrite: ``H`` (contiguous fp32) may be used as the work buffer: it becomes the factor's
            storage, so the caller must not read it again. Otherwise a copy is made.

    Raises:
        PareError: ``H`` holds NaN/inf, or no dampening up to ``10^12`` times the start worked.
    """
    work = H.detach()
    if not overwrite or work.dtype != torch.float32 or not work.is_contiguous():
        work = work.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    del H
    dead, base = _check_and_mark_dead(work, model_dtype)
    damp = percdamp * base if percdamp > 0 else 0.0
    _mirror_upper_exactly_(work)
    for attempt in range(MAX_DAMP_TRIES):
        U = _upper_factor_of_inverse_(work, damp, last=attempt == MAX_DAMP_TRIES - 1)
        if U is not None:
            return InverseHessianFactor(U, dead, damp)
        damp = _raised(damp, base, attempt)
    raise PareError(f"Cholesky failed even with dampening {damp:.3g}; the Hessian is degenerate")


def _check_and_mark_dead(H: torch.Tensor, model_dtype: torch.dtype | None) -> tuple[torch.Tensor, float]:
    """Refuse a non-finite ``H``; set the diagonal of dead inputs to 1 in place; return them and the
    mean diagonal after that."""
    if not all_finite(H):
        raise PareError("the Hessian holds NaN or inf values, so the calibration activations are not finite; "
                        + non_finite_hint(model_dtype))
    diag = H.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    return dead, float(diag.mean())


def _raised(damp: float, base: float, attempt: int) -> float:
    new_damp = damp * 10 if damp > 0 else 1e-6 * base
    log.warning("Hessian not positive definite with dampening %.3g (try %d); raising it to %.3g",
                damp, attempt + 1, new_damp)
    return new_damp


def inverse_hessian_factor_copies(H: torch.Tensor, percdamp: float = 0.01,
                                  model_dtype: torch.dtype | None = None) -> InverseHessianFactor:
    """:func:`inverse_hessian_factor` written with a fresh tensor for each step (several ``[in, in]``
    copies alive at once): the reference the in-place version is tested against."""
    H = H.detach().to(torch.float32, copy=True)
    dead, base = _check_and_mark_dead(H, model_dtype)
    damp = percdamp * base if percdamp > 0 else 0.0
    eye = torch.arange(H.shape[0], device=H.device)
    for attempt in range(MAX_DAMP_TRIES):
        Hd = H.clone()
        Hd[eye, eye] += damp
        L, info = torch.linalg.cholesky_ex(Hd.flip(0, 1))
        if int(info) == 0:
            U = lower_inverse(L).flip(0, 1)
            if all_finite(U):
                return InverseHessianFactor(U, dead, damp)
        damp = _raised(damp, base, attempt)
    raise PareError(f"Cholesky failed even with dampening {damp:.3g}; the Hessian is degenerate")


def _upper_factor_of_inverse_(H: torch.Tensor, damp: float, last: bool, block: int = 256) -> torch.Tensor | None:
    """Upper triangular ``U`` with ``U^T U = (H + damp I)^-1``, built in ``H``'s storage (returned as a
    view of it), or None when that is not positive definite (``H`` is then as it was).

    With ``P`` the index reversal and ``P H P = L L^T``: ``H^-1 = P L^-T L^-1 P``, so
    ``U = P L^-1 P`` (upper triangular, positive diagonal). One Cholesky and one triangular
    inverse, instead of the reference's Cholesky, ``cholesky_inverse`` and a second Cholesky.
    ``H`` (C-contiguous, exactly symmetric) is reversed in place; its transpose is then the
    column-major matrix LAPACK factors in place; the lower factor's inverse replaces it; a last
    reversal leaves ``U`` in the layout the copying version returns. Unless ``last``, the upper block
    rows of ``H`` are kept (half a matrix) to put ``H`` back when the factorisation fails.
    """
    n = H.shape[0]
    saved = None if last else _upper_rows(H, block)
    _reverse_(H, block)
    H.diagonal().add_(damp)
    L = H.mT  # column-major: what cholesky_ex writes its lower factor into
    info = torch.empty((), dtype=torch.int32, device=H.device)
    torch.linalg.cholesky_ex(L, out=(L, info))
    if int(info) != 0:
        assert saved is not None, "the last try keeps no copy"
        offset = 0
        for i in range(0, n, block):
            rows = H[i:i + block, i:]
            rows.copy_(saved[offset:offset + rows.numel()].view_as(rows))
            offset += rows.numel()
        _mirror_upper_exactly_(H, block)
        return None
    del saved
    lower_inverse_(L)
    _reverse_(H, block)
    U = H.mT
    if all_finite(U):
        return U
    return None


def _upper_rows(H: torch.Tensor, block: int) -> torch.Tensor:
    """The upper block rows ``H[i:i+block, i:]`` packed one after the other in one flat tensor (one
    allocation, given back whole when freed: many block-sized ones would leave heap holes)."""
    n = H.shape[0]
    starts = range(0, n, block)
    out = torch.empty(sum(min(block, n - i) * (n - i) for i in starts), dtype=H.dtype, device=H.device)
    offset = 0
    for i in starts:
        rows = H[i:i + block, i:]
        out[offset:offset + rows.numel()].view_as(rows).copy_(rows)
        offset += rows.numel()
    return out


def _reverse_(H: torch.Tensor, block: int = 256) -> None:
    """``H <- P H P`` (rows and columns in reverse order) in place, ``block`` rows of temporaries."""
    n = H.shape[0]
    half = n // 2
    for i in range(0, half, block):
        j = min(i + block, half)
        top = H[i:j].flip(0, 1)
        H[i:j] = H[n - j:n - i].flip(0, 1)
        H[n - j:n - i] = top
    if n % 2:
        H[half] = H[half].flip(0)


def _mirror_upper_exactly_(H: torch.Tensor, block: int = 256) -> None:
    """Copy the upper triangle onto the lower one in place, exactly (no arithmetic)."""
    n = H.shape[0]
    for i in range(0, n, block):
        j = min(i + block, n)
        diag = H[i:j, i:j]
        upper = torch.ones(j - i, j - i, dtype=torch.bool, device=H.device).triu()
        diag.copy_(torch.where(upper, diag, diag.t()))
        if j < n:
            H[j:, i:j] = H[i:j, j:].t()


def lower_inverse(L: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """``L^-1`` of a lower triangular ``L: [n, n]``, by halves: with ``L = [[A, 0], [C, D]]``,
    ``L^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]]``. The off-diagonal block is two matrix products, so
    the whole inverse costs about ``n^3 / 3`` flops in GEMMs, against ``n^3`` for a triangular solve
    with the identity as right-hand side; blocks of ``leaf`` or fewer rows use that solve."""
    n = L.shape[0]
    if n <= leaf:
        return torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=L.device), upper=False)
    h = n // 2
    A, D = lower_inverse(L[:h, :h], leaf), lower_inverse(L[h:, h:], leaf)
    out = torch.zeros_like(L)
    out[:h, :h] = A
    out[h:, h:] = D
    torch.mm(D, L[h:, :h] @ A, out=out[h:, :h])
    out[h:, :h].neg_()
    return out


def lower_inverse_(L: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """:func:`lower_inverse` in place (``L``'s strictly upper triangle must be zero); returns ``L``.
    The only temporary is the ``[n/2, n/2]`` product ``C A^-1``."""
    n = L.shape[0]
    if n <= leaf:
        L.copy_(torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=L.device), upper=False))
        return L
    h = n // 2
    A, D = lower_inverse_(L[:h, :h], leaf), lower_inverse_(L[h:, h:], leaf)
    C = L[h:, :h]
    torch.mm(D, C @ A, out=C)
    C.neg_()
    return L
