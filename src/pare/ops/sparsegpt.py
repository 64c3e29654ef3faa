"""SparseGPT: one-shot pruning by Optimal Brain Surgeon reconstruction, one matrix at a time.

Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"
(arXiv:2301.00774). For a layer ``W: [out, in]`` with inputs ``X: [in, n]`` it minimises
``||W X - W' X||_2^2`` under a sparsity mask. With ``H = 2 X X^T`` (the layer-wise Hessian, dampened),
removing weight ``q`` of a row and compensating the row's not-yet-processed weights ``F`` costs (OBS)

    eps_q = w_q^2 / [H_F^-1]_qq,      delta_F = -(w_q / [H_F^-1]_qq) * [H_F^-1]_{:,q}     (paper, Eq. 3)

and with ``U`` the upper Cholesky factor of ``H^-1``, ``[H_F^-1]_qq = U_qq^2`` and the update is
``-(w_q / U_qq) * U_{q, q:}`` (Algorithm 1).

Columns are processed left to right; the rows of the upper Cholesky factor ``U`` of ``H^-1`` give
the updates for the remaining columns (the sequence of ``H^-1`` restricted to columns ``>= j``).
Updates are lazy: inside a block of ``blocksize`` columns they are rank-1; the rest of the matrix
gets one matmul per block. The mask is chosen adaptively per block from ``w^2 / U_qq^2`` of the
already-updated weights. Unstructured, ``mask_group="row"`` (pare's default) prunes the same share
of every row inside each block, so each row ends with exactly ``floor(in * sparsity)`` zeros
(Wanda's per-output comparison group; the README compares the two); ``mask_group="block"`` is the
reference code's choice: the lowest scores over the whole ``[out, blocksize]`` block (exact count
per matrix, uneven rows). N:M: the N lowest of each group of M, chosen when the group is reached.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pare.errors import ConfigError, PareError
from pare.ops.finite import all_finite, non_finite_hint

log = logging.getLogger(__name__)

MAX_DAMP_TRIES = 12
SUB = 16  # columns per inner sub-block of the lazy updates


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
    if not _all_finite(H):
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
            "SparseGPT: Hessian not positive definite with dampening %.3g (try %d); raising it to %.3g",
            damp, attempt + 1, new_damp,
        )
        damp = new_damp
    raise PareError(f"SparseGPT: Cholesky failed even with dampening {damp:.3g}; the Hessian is degenerate")


def _upper_factor_of_inverse(H: torch.Tensor) -> torch.Tensor | None:
    """Upper triangular ``U`` with ``U^T U = H^-1``, or None when ``H`` is not positive definite.

    With ``P`` the index reversal and ``P H P = L L^T``: ``H^-1 = P L^-T L^-1 P``, so
    ``U = P L^-1 P`` (upper triangular, positive diagonal). One Cholesky and one triangular
    inverse, instead of the reference's Cholesky, ``cholesky_inverse`` and a second Cholesky.
    """
    L, info = torch.linalg.cholesky_ex(H.flip(0, 1))
    if int(info) != 0:
        return None
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    U = torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)
    return U if _all_finite(U) else None


_all_finite = all_finite


def _block_counts(rows: int, cols: int, blocksize: int, sparsity: float) -> list[int]:
    """Weights to prune per column block so that the ``rows x cols`` total is ``floor(rows*cols*s)``
    (``rows=1``: per row)."""
    counts, done = [], 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        upto = int(rows * i2 * sparsity) if i2 < cols else int(rows * cols * sparsity)
        counts.append(upto - done)
        done = upto
    return counts


def _block_mask(W1: torch.Tensor, d: torch.Tensor, k: int, per_row: bool) -> torch.Tensor:
    """Prune the ``k`` lowest ``w^2 / d^2`` scores of a block, or of each of its rows (``True`` = prune)."""
    scores = (W1 / d).square()
    if per_row:
        mask = torch.zeros_like(W1, dtype=torch.bool)
        if k > 0:
            mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False, sorted=False).indices, True)
        return mask
    flat = torch.zeros(W1.numel(), dtype=torch.bool, device=W1.device)
    if k > 0:
        flat[torch.topk(scores.flatten(), k, largest=False, sorted=False).indices] = True
    return flat.view_as(W1)


def _prune_block(W1: torch.Tensor, U1: torch.Tensor, mask1: torch.Tensor | None, nm: tuple[int, int] | None):
    """OBS inside one block, column by column (the algorithm's inner loop; vectorised over rows).

    The block is held transposed (``[B, out]``, each column contiguous) and processed in sub-blocks
    of ``SUB`` columns: the rank-1 updates touch only the current sub-block and the rest of the
    block gets one matmul per sub-block: the same arithmetic as Algorithm 1, in a cache-friendly order.

    Args:
        W1: ``[out, B]`` fp32 block, updated in place into the pruned block.
        U1: ``[B, B]`` the block's diagonal block of the inverse-Hessian factor.
        mask1: ``[out, B]`` prune mask (unstructured) or None (N:M: chosen as groups are reached).
        nm: the N:M pattern or None.

    Returns:
        ``Err1 [out, B]``: the scaled errors ``(w - q) / U_qq`` that update the later columns.
    """
    count = W1.shape[1]
    d = U1.diagonal()
    Wt = W1.t().contiguous()  # [B, out]
    Mt = torch.zeros_like(Wt, dtype=torch.bool) if mask1 is None else mask1.t().contiguous()
    Et = torch.empty_like(Wt)
    sub = SUB if nm is None else max(nm[1], SUB // nm[1] * nm[1])
    for j1 in range(0, count, sub):
        j2 = min(j1 + sub, count)
        for i in range(j1, j2):
            if nm is not None and (i - j1) % nm[1] == 0:
                n, m = nm
                scores = (Wt[i:i + m] / d[i:i + m, None]).square()
                idx = torch.topk(scores, n, dim=0, largest=False, sorted=False).indices + i
                Mt.scatter_(0, idx, True)
            err = Wt[i] * Mt[i] / d[i]
            if i + 1 < j2:
                Wt[i + 1:j2].addr_(U1[i, i + 1:j2], err, alpha=-1.0)
            Et[i] = err
        if j2 < count:
            Wt[j2:].addmm_(U1[j1:j2, j2:].t(), Et[j1:j2], alpha=-1.0)
    Wt.masked_fill_(Mt, 0.0)  # pruned weights become exact zeros
    W1.copy_(Wt.t())
    return Et.t()


def sparsegpt_prune_factored(
    W: torch.Tensor,
    factor: InverseHessianFactor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    mask_group: str = "row",
) -> tuple[torch.Tensor, float]:
    """SparseGPT on ``W`` with a precomputed inverse-Hessian factor (shared by matrices with one input).

    Args:
        W: ``[out, in]`` weights, any float dtype; not modified.
        factor: from :func:`inverse_hessian_factor`.
        sparsity: fraction pruned (unstructured; ignored with ``nm``).
        nm: ``(N, M)`` to prune N of every M consecutive inputs, or None.
        blocksize: lazy-update block width (a multiple of M for N:M).
        mask_group: unstructured selection group inside a block: ``row`` or ``block`` (see module doc).

    Returns:
        ``(W_pruned [out, in] in W's dtype, loss)``, the loss being the OBS estimate of
        ``sum_rows ||w X - w' X||^2 / 2`` in units of ``H``.
    """
    rows, cols = W.shape
    if nm is not None and (blocksize % nm[1] or cols % nm[1]):
        raise ConfigError(f"the {nm[0]}:{nm[1]} pattern needs blocksize ({blocksize}) and the input width ({cols}) "
                          f"to be multiples of {nm[1]}")
    U = factor.U
    Wf = W.detach().to(device=U.device, dtype=torch.float32, copy=True)
    Wf[:, factor.dead] = 0.0
    if mask_group not in ("row", "block"):
        raise ConfigError(f"mask_group must be 'row' or 'block', got {mask_group!r}")
    per_row = mask_group == "row"
    counts = _block_counts(1 if per_row else rows, cols, blocksize, sparsity) if nm is None else []
    loss = torch.zeros((), dtype=torch.float32, device=U.device)
    for b, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        W1 = Wf[:, i1:i2]  # a view: updated in place
        U1 = U[i1:i2, i1:i2]
        mask1 = _block_mask(W1, U1.diagonal(), counts[b], per_row) if nm is None else None
        Err1 = _prune_block(W1, U1, mask1, nm)
        loss += Err1.square().sum() / 2
        if i2 < cols:
            Wf[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)
    return Wf.to(device=W.device, dtype=W.dtype), float(loss)


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    mask_group: str = "row",
) -> tuple[torch.Tensor, float]:
    """Prune ``W: [out, in]`` with SparseGPT given the Hessian ``H: [in, in]`` of its inputs.

    Computation is in fp32 whatever ``W``'s dtype. With ``H = c I`` the factor is diagonal, so no
    weight is updated and the mask is magnitude's within each selection group: each row's slice of a
    block (``row``; the whole row when ``blocksize >= in``), the ``[out, blocksize]`` block
    (``block``; the whole matrix when ``blocksize >= in``), or each group of M inputs for N:M.

    Returns:
        ``(W_pruned, loss)``; see :func:`sparsegpt_prune_factored`.
    """
    factor = inverse_hessian_factor(H.to(W.device), percdamp)
    return sparsegpt_prune_factored(W, factor, sparsity, nm, blocksize, mask_group)
