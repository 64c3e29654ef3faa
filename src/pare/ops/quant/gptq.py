"""GPTQ: quantization by Optimal Brain Surgeon updates, column by column; optionally joint with
SparseGPT's pruning in the same pass.

Frantar, Ashkboos, Hoefler & Alistarh, 2023, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers" (arXiv:2210.17323), Algorithm 1. With ``U`` the upper
Cholesky factor of the dampened ``H^-1`` (:mod:`pare.ops.hessian`), columns are fixed left to right:

    q_j = quant(w_j),    err_j = (w_j - q_j) / U_jj,    W_{:, j+1:} -= err_j U_{j, j+1:}

with lazy batches of ``blocksize`` columns (rank-1 updates inside the batch, one matmul for the rest
of the matrix). Group parameters (scale, zero point) are computed when the group's first column is
reached, from the weights as updated so far. ``act_order`` processes the columns in order of
decreasing ``H_jj`` (the reference's ``--act-order``); its groups stay the contiguous groups of the
original order (no ``g_idx`` in the stored format), their parameters computed up front from the
original weights (the reference's ``--static-groups``).

Joint pruning (SparseGPT, Frantar & Alistarh 2023, Section 3.4 "joint sparsification and
quantization"): each column is masked and its kept weights quantized before its error
``(w - q) / U_jj`` is spread, so the remaining weights absorb both errors. The mask is chosen as in
:func:`pare.ops.sparsegpt.sparsegpt_prune_factored` (per block for unstructured sparsity, per group
of M for N:M); a quantization group's parameters come from the weights the mask keeps (for N:M, a
provisional N:M choice on the group's current scores).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pare.errors import ConfigError
from pare.ops.hessian import InverseHessianFactor
from pare.ops.quant.rtn import int_params_searched, int_range
from pare.ops.quant.scheme import INT_SCHEMES, GroupParams, QuantScheme, group_params, quantize_with, tensor_param
from pare.ops.sparsegpt import block_counts, block_mask, nm_candidates, nm_group_obs_mask, nm_mask_rows

SUB = 16  # columns per inner sub-block of the lazy updates (group sizes are multiples of it)


@dataclass(frozen=True)
class PruneSpec:
    """The pruning half of a joint pass: ``sparsity`` (unstructured) or ``nm`` (N zeros of every M),
    the unstructured selection group (``row`` or ``block``) and the N:M rule (``obs`` or ``score``,
    see :func:`pare.ops.sparsegpt.sparsegpt_prune_factored`)."""

    sparsity: float = 0.0
    nm: tuple[int, int] | None = None
    mask_group: str = "row"
    nm_select: str = "obs"
    nm_quant: bool = False


@dataclass
class GPTQResult:
    """What :func:`gptq_quantize` produced.

    Attributes:
        weight: ``[out, in]`` fp32 dequantized weights (pruned ones exact zeros).
        loss: the OBS estimate of the reconstruction error, in units of ``H``.
        scale: ``[out, in / g]`` fp32 scales of the groups (original column order).
        zero: ``[out, in / g]`` zero points, or None (symmetric and FP schemes).
        pruned: ``[out, in]`` bool: the prune mask (all False without ``prune``).
        row_loss: ``[out]`` the loss of each row (rows are independent: matrices sharing a Hessian
            can be solved as one row-stacked matrix and their losses read back by rows).
    """

    weight: torch.Tensor
    loss: float
    scale: torch.Tensor
    zero: torch.Tensor | None
    pruned: torch.Tensor
    row_loss: torch.Tensor


def act_order_perm(H: torch.Tensor) -> torch.Tensor:
    """Column order by decreasing Hessian diagonal (stable)."""
    return torch.argsort(H.diagonal(), descending=True, stable=True)


class _Grid:
    """Group parameters of one matrix: computed on demand in processing order, or all up front.

    The solver reads them per processed column: :meth:`fill` writes the scale (and zero point) of
    every column of a block, in processing order, into ``[B, out]`` tables, so the column loop only
    indexes a row of a table instead of looking a group up per column.
    """

    def __init__(self, scheme: QuantScheme, W: torch.Tensor, static: bool, clip_search: bool = False) -> None:
        self.scheme = scheme
        self.clip_search = clip_search and scheme.name in INT_SCHEMES
        self.g = scheme.group(W.shape[1])
        self.ts = tensor_param(scheme, W)
        self.params: dict[int, GroupParams] = {}
        self._tables: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.fast_int = scheme.name in INT_SCHEMES and scheme.symmetric
        self.qmin, self.qmax = int_range(scheme.bits, True) if self.fast_int else (0, 0)
        if static or self.g == W.shape[1]:  # per channel: from the original row, as the reference
            rows, cols = W.shape
            p = self._params(W.reshape(rows * cols // self.g, self.g))
            for k in range(cols // self.g):
                z = None if p.zero is None else p.zero.view(rows, -1)[:, k:k + 1]
                self.params[k] = GroupParams(p.scale.view(rows, -1)[:, k:k + 1], z)

    def at(self, k: int, current: torch.Tensor | None) -> GroupParams:
        """Parameters of group ``k``; ``current: [out, g]`` its weights now (used once, when first asked)."""
        if k not in self.params:
            assert current is not None
            self.params[k] = self._params(current)
        return self.params[k]

    def _params(self, W: torch.Tensor) -> GroupParams:
        if self.clip_search:
            scale, zero = int_params_searched(W, self.scheme.bits, self.scheme.symmetric, self.scheme.scale_dtype)
            return GroupParams(scale, zero)
        return group_params(self.scheme, W, self.ts)

    @property
    def has_zero(self) -> bool:
        """Whether the scheme stores zero points (asymmetric integers)."""
        return self.scheme.name in INT_SCHEMES and not self.scheme.symmetric

    def fill(self, k: int, rows: slice, S: torch.Tensor, Z: torch.Tensor | None) -> None:
        """Copy group ``k``'s scale (zero point) into rows ``rows`` of the tables ``S`` (``Z``) ``[B, out]``."""
        p = self.params[k]
        S[rows] = p.scale[:, 0]
        if Z is not None and p.zero is not None:
            Z[rows] = p.zero[:, 0]

    def fill_columns(self, cols: torch.Tensor, S: torch.Tensor, Z: torch.Tensor | None) -> None:
        """Rows ``i`` of ``S`` (``Z``) ``[B, out]``: the parameters of original column ``cols[i]``
        (every group's parameters already known)."""
        if self._tables is None:
            groups = range(len(self.params))
            scale = torch.cat([self.params[k].scale for k in groups], dim=1).t().contiguous()  # [groups, out]
            zero = None if Z is None else torch.cat([self.params[k].zero for k in groups],  # type: ignore[misc]
                                                    dim=1).t().contiguous()
            self._tables = (scale, zero)
        idx = cols // self.g
        torch.index_select(self._tables[0], 0, idx, out=S)
        if Z is not None and self._tables[1] is not None:
            torch.index_select(self._tables[1], 0, idx, out=Z)

    def round(self, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """Dequantized values of one column ``w: [..., out]`` with its scale ``s`` (zero point ``z``) ``[out]``."""
        if self.fast_int:  # symmetric integers, the common case: the ops of int_quantize, without views
            return torch.div(w, s).round_().clamp_(self.qmin, self.qmax).mul_(s)
        return quantize_with(self.scheme, w, GroupParams(s, z))[0]  # elementwise: any shape broadcasts


def _nm_joint_mask(Wg: torch.Tensor, Ug: torch.Tensor, cands: torch.Tensor, grid: _Grid, Sg: torch.Tensor,
                   Zg: torch.Tensor | None) -> torch.Tensor:
    """The N:M choice for one group of M columns that minimises the joint pass's own loss over them.

    As :func:`pare.ops.sparsegpt.nm_group_obs_mask`, every candidate mask is played through the
    group's columns for every row at once, but each kept weight is quantized the way the pass will
    quantize it (its error ``(w' - q(w')) / U_aa`` counted and spread onto the group's later columns),
    so the choice sees the quantization error of the weights it keeps, not only the pruning error.

    Args:
        Wg: ``[M, out]`` the group's columns (transposed), as updated so far.
        Ug: ``[M, M]`` the group's diagonal block of the inverse-Hessian factor.
        cands: ``[C, M]`` candidate masks (``True`` = prune).
        grid: the matrix's quantization grid.
        Sg, Zg: ``[M, out]`` the columns' scales (zero points or None).

    Returns:
        ``[M, out]`` bool prune mask.
    """
    m = Wg.shape[0]
    w = Wg.unsqueeze(0).expand(cands.shape[0], -1, -1).clone()  # [C, M, out]
    keep = (~cands).to(Wg.dtype).unsqueeze(-1)  # [C, M, 1]
    loss = torch.zeros(cands.shape[0], Wg.shape[1], dtype=Wg.dtype, device=Wg.device)
    for a in range(m):
        col = w[:, a]  # [C, out]
        q = grid.round(col, Sg[a], None if Zg is None else Zg[a]) * keep[:, a]
        err = (col - q) / Ug[a, a]
        loss += err.square()
        if a + 1 < m:
            w[:, a + 1:] -= Ug[a, a + 1:, None] * err[:, None, :]
    return cands.index_select(0, torch.min(loss, 0).indices).t()  # [M, out] (torch.min: argmin(0) is slow on CPU)


def _block(Wt: torch.Tensor, U1: torch.Tensor, cols: torch.Tensor, grid: _Grid, Mt: torch.Tensor,
           nm: tuple[int, int] | None, cands: torch.Tensor | None, quant_aware: bool = False) -> torch.Tensor:
    """OBS over one transposed block ``Wt: [B, out]`` (updated in place into the quantized block).

    ``cols[i]`` is the original column of row ``i`` of the block (act-order), ``Mt [B, out]`` the
    prune mask (filled in as N:M groups are reached). Returns the scaled errors ``Et [B, out]``.
    The column loop is the solver's only Python-level loop: each column costs a handful of vector
    operations on pre-split row views (scale and zero point read from per-column tables).
    """
    count = Wt.shape[0]
    d = U1.diagonal()
    Et = torch.empty_like(Wt)
    g = grid.g
    col_list = cols.tolist()
    S = torch.empty_like(Wt)
    Z = torch.empty_like(Wt) if grid.has_zero else None
    static = col_list[0] // g in grid.params  # blocks hold whole groups: all known up front, or none
    if static:
        grid.fill_columns(cols, S, Z)
    w_rows, e_rows, s_rows, m_rows, d_rows = Wt.unbind(0), Et.unbind(0), S.unbind(0), Mt.unbind(0), d.unbind(0)
    z_rows = Z.unbind(0) if Z is not None else None
    masked = nm is not None or bool(Mt.any())
    for j1 in range(0, count, SUB):
        j2 = min(j1 + SUB, count)
        for i in range(j1, j2):
            if not static and col_list[i] % g == 0:  # a group's first column: its weights are up to date here
                k = col_list[i] // g
                cur = Wt[i:i + g].t()
                pruned = Mt[i:i + g].t() if nm is None else nm_mask_rows(cur, d[i:i + g], nm)
                grid.at(k, cur.masked_fill(pruned, 0.0))
                grid.fill(k, slice(i, i + g), S, Z)
            if nm is not None and i % nm[1] == 0:
                m = nm[1]
                if cands is None:
                    Mt[i:i + m] = nm_mask_rows(Wt[i:i + m].t(), d[i:i + m], nm).t()
                elif quant_aware:
                    Mt[i:i + m] = _nm_joint_mask(Wt[i:i + m], U1[i:i + m, i:i + m], cands, grid, S[i:i + m],
                                                 None if Z is None else Z[i:i + m])
                else:
                    Mt[i:i + m] = nm_group_obs_mask(Wt[i:i + m], U1[i:i + m, i:i + m], cands)
            w = w_rows[i]
            q = grid.round(w, s_rows[i], None if z_rows is None else z_rows[i])
            if masked:
                q.masked_fill_(m_rows[i], 0.0)
            err = torch.sub(w, q, out=e_rows[i]).div_(d_rows[i])
            w.copy_(q)
            if i + 1 < j2:
                Wt[i + 1:j2].addr_(U1[i, i + 1:j2], err, alpha=-1.0)
        if j2 < count:
            Wt[j2:].addmm_(U1[j1:j2, j2:].t(), Et[j1:j2], alpha=-1.0)
    return Et


def check_gptq_width(scheme: QuantScheme, cols: int, what: str) -> None:
    """ConfigError unless GPTQ can quantize a matrix of ``cols`` inputs with ``scheme``'s groups: the
    group size divides ``cols`` and is a multiple of the lazy updates' sub-block (or the whole row)."""
    scheme.check_width(cols, what)
    g = scheme.group(cols)
    if g < cols and g % SUB:
        raise ConfigError(f"GPTQ needs a group size that is a multiple of {SUB} (or 0, per channel), got {g} "
                          f"for {what} ({cols} inputs): use a group size that is a multiple of {SUB} and divides "
                          f"{cols} (or 0, per channel); RTN (pare quantize --method rtn) takes any group size "
                          "that divides it")


def gptq_quantize(
    W: torch.Tensor,
    factor: InverseHessianFactor,
    scheme: QuantScheme,
    *,
    blocksize: int = 128,
    perm: torch.Tensor | None = None,
    prune: PruneSpec | None = None,
    keep_zero: torch.Tensor | None = None,
    clip_search: bool = False,
) -> GPTQResult:
    """Quantize ``W: [out, in]`` with GPTQ (and prune it jointly when ``prune`` is given).

    Args:
        W: weights, any float dtype; not modified.
        factor: inverse-Hessian factor of the inputs, in processing order (for ``perm``: of
            ``H[perm][:, perm]``).
        scheme: the quantization scheme (its group size must divide ``in``; MX and NVFP4 blocks
            of 32 and 16 are multiples of the inner sub-block of 16).
        blocksize: lazy-update block width; raised to the group size when smaller, and a multiple of M.
        perm: act-order column permutation (``None``: left to right). Not with ``prune``.
        prune: prune jointly (SparseGPT's masks).
        keep_zero: ``[out, in]`` bool, weights already pruned (original column order): they stay exact
            zeros (errors spread only onto kept weights, and groups whose parameters the pass computes
            leave them out), so a pruned model keeps its sparsity. Not with ``prune``.
        clip_search: integer schemes: each group's range is the shrink of its weights' range with the
            least rounding error (:func:`pare.ops.quant.rtn.int_params_searched`) instead of the full range.

    Returns:
        A :class:`GPTQResult`: pruned weights exact zeros and every other weight on the scheme's grid.
    """
    rows, cols = W.shape
    nm = prune.nm if prune is not None else None
    if prune is not None and perm is not None:
        raise ConfigError("act_order cannot be combined with pruning: N:M groups and SparseGPT's blocks follow "
                          "the input order")
    if keep_zero is not None and (prune is not None or tuple(keep_zero.shape) != (rows, cols)):
        raise ConfigError("keep_zero is a [out, in] mask of an already pruned matrix; it cannot be combined with "
                          "joint pruning")
    check_gptq_width(scheme, cols, "the matrix")
    g = scheme.group(cols)
    if g < cols:
        blocksize = max(blocksize, g) // g * g
    if nm is not None and (blocksize % nm[1] or cols % nm[1]):
        raise ConfigError(f"the {nm[0]}:{nm[1]} pattern needs blocksize ({blocksize}) and the input width ({cols}) "
                          f"to be multiples of {nm[1]}")
    U = factor.U
    Wf = W.detach().to(device=U.device, dtype=torch.float32)
    order = torch.arange(cols, device=U.device) if perm is None else perm.to(U.device)
    grid = _Grid(scheme, Wf, static=perm is not None, clip_search=clip_search)
    # the solver works on the transpose [in, out] in processing order: a column is a contiguous row,
    # a block a contiguous slice, and the trailing update one matrix product, with no copies per block
    WT = Wf.t().contiguous()
    MT = torch.zeros_like(WT, dtype=torch.bool) if keep_zero is None \
        else keep_zero.to(device=U.device, dtype=torch.bool).t().contiguous()
    if perm is not None:
        WT, MT = WT.index_select(0, order), MT.index_select(0, order)
    WT.index_fill_(0, factor.dead.nonzero().flatten(), 0.0)
    per_row = prune is None or prune.mask_group == "row"
    cands = nm_candidates(nm, U.device) if nm is not None and prune is not None and prune.nm_select == "obs" else None
    counts = block_counts(1 if per_row else rows, cols, blocksize, prune.sparsity) \
        if prune is not None and nm is None else []
    row_loss = torch.zeros(rows, dtype=torch.float32, device=U.device)
    for b, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        U1 = U[i1:i2, i1:i2]
        Wt, Mt = WT[i1:i2], MT[i1:i2]  # views, updated in place
        if counts:
            Mt.copy_(block_mask(Wt.t(), U1.diagonal(), counts[b], per_row).t())
        Et = _block(Wt, U1, order[i1:i2], grid, Mt, nm, cands, prune is not None and prune.nm_quant)
        row_loss += Et.square().sum(0) / 2
        if i2 < cols:
            WT[i2:].addmm_(U[i1:i2, i2:].t(), Et, alpha=-1.0)
    if perm is not None:
        inv = torch.argsort(order)
        WT, MT = WT.index_select(0, inv), MT.index_select(0, inv)
    Wf, pruned = WT.t().contiguous(), MT.t().contiguous()
    params = [grid.params[k] for k in range(cols // g)]
    scale = torch.cat([p.scale for p in params], dim=1)
    zero = None if params[0].zero is None else torch.cat([p.zero for p in params if p.zero is not None], dim=1)
    return GPTQResult(Wf, float(row_loss.sum()), scale, zero, pruned, row_loss)
