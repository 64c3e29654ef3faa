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
already-updated weights. Unstructured, ``mask_group="row"`` (pare's default) prunes the same share of
every row inside each block, so each row ends with exactly ``floor(in * sparsity)`` zeros (Wanda's
per-output comparison group; the README compares the two);
``mask_group="block"`` is the reference code's choice: the lowest scores over the whole
``[out, blocksize]`` block (exact count per matrix, uneven rows). N:M: chosen when the group is
reached, from the error-compensated weights: by default (``nm_select="obs"``) the mask whose OBS
loss over the group's M columns is least, the compensation of a pruned column by the group's later
columns included (:func:`nm_group_obs_mask`); ``"score"`` keeps the reference code's rule, the N
lowest ``w^2 / U_qq^2`` taken column by column independently.
"""

from __future__ import annotations

import itertools
import logging

import torch

from pare.errors import ConfigError
from pare.ops.hessian import InverseHessianFactor, inverse_hessian_factor

log = logging.getLogger(__name__)

__all__ = ["InverseHessianFactor", "inverse_hessian_factor", "sparsegpt_prune", "sparsegpt_prune_factored",
           "sparsegpt_prune_rows"]

SUB = 16  # columns per inner sub-block of the lazy updates
NM_SELECT = ("obs", "score")


def block_counts(rows: int, cols: int, blocksize: int, sparsity: float) -> list[int]:
    """Weights to prune per column block so that the ``rows x cols`` total is ``floor(rows*cols*s)``
    (``rows=1``: per row)."""
    counts, done = [], 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        upto = int(rows * i2 * sparsity) if i2 < cols else int(rows * cols * sparsity)
        counts.append(upto - done)
        done = upto
    return counts


def block_mask(W1: torch.Tensor, d: torch.Tensor, k: int, per_row: bool) -> torch.Tensor:
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


def nm_mask_rows(W: torch.Tensor, d: torch.Tensor, nm: tuple[int, int]) -> torch.Tensor:
    """N:M prune mask of ``W: [out, k]`` (``k`` a multiple of M): in each row, the N lowest
    ``(w / d)^2`` of every group of M consecutive columns (``True`` = prune)."""
    n, m = nm
    rows, k = W.shape
    scores = (W / d).square().reshape(rows, k // m, m)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(2, torch.topk(scores, n, dim=2, largest=False, sorted=False).indices, True)
    return mask.reshape(rows, k)


def nm_candidates(nm: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """Every way to prune N of M: ``[C(M, N), M]`` bool (``True`` = prune)."""
    n, m = nm
    combos = list(itertools.combinations(range(m), n))
    out = torch.zeros(len(combos), m, dtype=torch.bool, device=device)
    for c, idx in enumerate(combos):
        out[c, list(idx)] = True
    return out


def nm_group_obs_mask(Wg: torch.Tensor, Ug: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
    """The N:M choice for one group of M columns that minimises the group's exact OBS loss.

    Pruning column ``a`` of the group costs ``err_a^2`` with ``err_a = w'_a / U_aa``, where ``w'_a``
    already holds the compensation of the group's earlier pruned columns
    (``w'_b -= err_a U_ab`` for ``b > a``). Scoring each column alone by ``(w / U_aa)^2`` (the
    reference) ignores that compensation; here every candidate mask is played through the M columns
    for every row at once and the cheapest is kept.

    Args:
        Wg: ``[M, out]`` the group's columns (transposed), as updated so far.
        Ug: ``[M, M]`` the group's diagonal block of the inverse-Hessian factor.
        cands: ``[C, M]`` candidate masks from :func:`nm_candidates`.

    Returns:
        ``[M, out]`` bool prune mask.
    """
    # the sequential update is a triangular system: with P a candidate's pruned columns (ascending),
    # err_p = (w_p - sum_{p' < p in P} err_p' U_p'p) / U_pp, i.e. U_PP^T err_P = w_P, and the loss is
    # ||err_P||^2. Forward substitution over the N pruned columns, for every candidate and row at once,
    # costs a few vector operations instead of playing all M columns of C copies of the group
    count, n = cands.shape[0], int(cands[0].sum())
    idx = cands.nonzero()[:, 1].view(count, n)  # [C, N] pruned columns of each candidate, ascending
    upp = Ug[idx.unsqueeze(2), idx.unsqueeze(1)]  # [C, N, N] upper triangular
    wp = Wg.index_select(0, idx.flatten()).view(count, n, -1)  # [C, N, out]
    errs: list[torch.Tensor] = []
    loss = torch.zeros_like(wp[:, 0])
    for k in range(n):
        r = wp[:, k]
        for j in range(k):
            r = r - upp[:, j, k, None] * errs[j]
        e = r / upp[:, k, k, None]
        errs.append(e)
        loss.addcmul_(e, e)
    # torch.min over dim 0 rather than argmin: the same first-minimum index, far faster on CPU
    return cands.index_select(0, torch.min(loss, 0).indices).t()  # [M, out]


def _prune_block(W1: torch.Tensor, U1: torch.Tensor, mask1: torch.Tensor | None, nm: tuple[int, int] | None,
                 cands: torch.Tensor | None = None):
    """OBS inside one block, column by column (the algorithm's inner loop; vectorised over rows).

    The block is held transposed (``[B, out]``, each column contiguous) and processed in sub-blocks
    of ``SUB`` columns: the rank-1 updates touch only the current sub-block and the rest of the
    block gets one matmul per sub-block: the same arithmetic as Algorithm 1, in a cache-friendly order.

    Args:
        W1: ``[out, B]`` fp32 block, updated in place into the pruned block.
        U1: ``[B, B]`` the block's diagonal block of the inverse-Hessian factor.
        mask1: ``[out, B]`` prune mask (unstructured) or None (N:M: chosen as groups are reached).
        nm: the N:M pattern or None.
        cands: N:M candidate masks to choose each group by its exact OBS loss
            (:func:`nm_group_obs_mask`), or None for the reference's per-column scores.

    Returns:
        ``Err1 [out, B]``: the scaled errors ``(w - q) / U_qq`` that update the later columns.
    """
    count = W1.shape[1]
    d = U1.diagonal()
    Wt = W1.t().contiguous()  # [B, out]
    Mt = torch.zeros_like(Wt, dtype=torch.bool) if mask1 is None else mask1.t().contiguous()
    Et = torch.empty_like(Wt)
    sub = SUB if nm is None else max(nm[1], SUB // nm[1] * nm[1])
    # per-column row views made once: the loop below is Python-bound, a handful of vector ops per column
    w_rows, e_rows, m_rows, d_rows = Wt.unbind(0), Et.unbind(0), Mt.unbind(0), d.unbind(0)
    for j1 in range(0, count, sub):
        j2 = min(j1 + sub, count)
        for i in range(j1, j2):
            if nm is not None and (i - j1) % nm[1] == 0:
                m = nm[1]
                if cands is not None:
                    Mt[i:i + m] = nm_group_obs_mask(Wt[i:i + m], U1[i:i + m, i:i + m], cands)
                else:
                    idx = torch.topk((Wt[i:i + m] / d[i:i + m, None]).square(), nm[0], dim=0, largest=False,
                                     sorted=False).indices + i
                    Mt.scatter_(0, idx, True)
            err = torch.mul(w_rows[i], m_rows[i], out=e_rows[i]).div_(d_rows[i])
            if i + 1 < j2:
                Wt[i + 1:j2].addr_(U1[i, i + 1:j2], err, alpha=-1.0)
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
    nm_select: str = "obs",
) -> tuple[torch.Tensor, float]:
    """SparseGPT on ``W`` with a precomputed inverse-Hessian factor (shared by matrices with one input).

    Args:
        W: ``[out, in]`` weights, any float dtype; not modified.
        factor: from :func:`inverse_hessian_factor`.
        sparsity: fraction pruned (unstructured; ignored with ``nm``).
        nm: ``(N, M)`` to prune N of every M consecutive inputs, or None.
        blocksize: lazy-update block width (a multiple of M for N:M).
        mask_group: unstructured selection group inside a block: ``row`` or ``block`` (see module doc).
        nm_select: N:M: ``obs`` picks each group's mask by its exact OBS loss (compensation inside
            the group included, :func:`nm_group_obs_mask`); ``score`` by the per-column scores
            ``(w / U_qq)^2`` (the reference code).

    Returns:
        ``(W_pruned [out, in] in W's dtype, loss)``, the loss being the OBS estimate of
        ``sum_rows ||w X - w' X||^2 / 2`` in units of ``H``.
    """
    pruned, row_loss = sparsegpt_prune_rows(W, factor, sparsity, nm, blocksize, mask_group, nm_select)
    return pruned.to(device=W.device, dtype=W.dtype), float(row_loss.sum())


def sparsegpt_prune_rows(
    W: torch.Tensor,
    factor: InverseHessianFactor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    mask_group: str = "row",
    nm_select: str = "obs",
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sparsegpt_prune_factored` with the loss of each row: ``(W_pruned [out, in] fp32 on the
    factor's device, row_loss [out])``. With ``mask_group="row"`` or N:M the rows are independent, so
    matrices sharing a factor (q/k/v, gate/up) can be pruned as one row-stacked matrix. With
    ``overwrite`` a contiguous fp32 ``W`` on the factor's device is the work buffer (no copy: a
    stacked gate/up of a large model is hundreds of MB); the result is then ``W`` itself."""
    rows, cols = W.shape
    if nm is not None and (blocksize % nm[1] or cols % nm[1]):
        raise ConfigError(f"the {nm[0]}:{nm[1]} pattern needs blocksize ({blocksize}) and the input width ({cols}) "
                          f"to be multiples of {nm[1]}")
    U = factor.U
    in_place = overwrite and W.dtype == torch.float32 and W.device == U.device and W.is_contiguous()
    Wf = W.detach() if in_place else W.detach().to(device=U.device, dtype=torch.float32, copy=True)
    Wf[:, factor.dead] = 0.0
    if mask_group not in ("row", "block"):
        raise ConfigError(f"mask_group must be 'row' or 'block', got {mask_group!r}")
    if nm_select not in NM_SELECT:
        raise ConfigError(f"nm_select must be one of {', '.join(NM_SELECT)}, got {nm_select!r}")
    cands = nm_candidates(nm, U.device) if nm is not None and nm_select == "obs" else None
    per_row = mask_group == "row"
    counts = block_counts(1 if per_row else rows, cols, blocksize, sparsity) if nm is None else []
    row_loss = torch.zeros(rows, dtype=torch.float32, device=U.device)
    for b, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        W1 = Wf[:, i1:i2]  # a view: updated in place
        U1 = U[i1:i2, i1:i2]
        mask1 = block_mask(W1, U1.diagonal(), counts[b], per_row) if nm is None else None
        Err1 = _prune_block(W1, U1, mask1, nm, cands)
        row_loss += Err1.square().sum(1) / 2
        if i2 < cols:
            Wf[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)
    return Wf, row_loss


def stack_rows_fp32(ws: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The matrices ``ws`` (one input width, any float dtype) stacked by rows into one new contiguous fp32
    tensor on ``device``, converted one at a time (``torch.cat`` of converted copies holds twice the
    stacked size)."""
    out = torch.empty(sum(w.shape[0] for w in ws), ws[0].shape[1], dtype=torch.float32, device=device)
    start = 0
    for w in ws:
        out[start:start + w.shape[0]].copy_(w.detach())
        start += w.shape[0]
    return out


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    mask_group: str = "row",
    nm_select: str = "obs",
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
    return sparsegpt_prune_factored(W, factor, sparsity, nm, blocksize, mask_group, nm_select)
