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


def inverse_hessian_factor(H: torch.Tensor, percdamp: float = 0.01,
                           model_dtype: torch.dtype | None = None) -> InverseHessianFactor:
    """Dampen ``H``, invert it through Cholesky and return the upper factor of ``H^-1``.

    Dead inputs (``H_ii == 0``) get ``H_ii = 1`` so that ``H`` stays invertible. The dampening starts
    at ``percdamp * mean(diag(H))``; if a Cholesky factorisation fails (``H`` not numerically
    positive definite), it is multiplied by 10 and the attempt repeated, with a warning.

    Args:
        H: ``[in, in]`` Hessian (e.g. ``2/n X^T X``); not modified.
        percdamp: dampening as a fraction of the mean diagonal.
        model_dtype: the dtype of the weights the Hessian serves (for the hint when it is not finite).

    Raises:
        PareError: ``H`` holds NaN/inf, or no dampening up to ``10^12`` times the start worked.
    """
    H = H.detach().to(torch.float32, copy=True)
    if not all_finite(H):
        raise PareError("the Hessian holds NaN or inf values, so the calibration activations are not finite; "
                        + non_finite_hint(model_dtype))
    diag = H.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    base = float(diag.mean())
    damp = percdamp * base if percdamp > 0 else 0.0
    eye = torch.arange(H.shape[0], device=H.device)
    for attempt in range(MAX_DAMP_TRIES):
        Hd = H.clone()
        Hd[eye, eye] += damp
        U = _upper_factor_of_inverse(Hd)
        if U is not None:
            return InverseHessianFactor(U, dead, damp)
        new_damp = damp * 10 if damp > 0 else 1e-6 * base
        log.warning(
            "Hessian not positive definite with dampening %.3g (try %d); raising it to %.3g",
            damp, attempt + 1, new_damp,
        )
        damp = new_damp
    raise PareError(f"Cholesky failed even with dampening {damp:.3g}; the Hessian is degenerate")


def _upper_factor_of_inverse(H: torch.Tensor) -> torch.Tensor | None:
    """Upper triangular ``U`` with ``U^T U = H^-1``, or None when ``H`` is not positive definite.

    With ``P`` the index reversal and ``P H P = L L^T``: ``H^-1 = P L^-T L^-1 P``, so
    ``U = P L^-1 P`` (upper triangular, positive diagonal). One Cholesky and one triangular
    inverse, instead of the reference's Cholesky, ``cholesky_inverse`` and a second Cholesky.
    """
    L, info = torch.linalg.cholesky_ex(H.flip(0, 1))
    if int(info) != 0:
        return None
    U = lower_inverse(L).flip(0, 1)
    return U if all_finite(U) else None


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
