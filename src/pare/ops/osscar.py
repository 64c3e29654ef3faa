"""OSSCAR: combinatorial selection of input groups with least-squares refit (pure tensor math).

Meng, Behdin, Wang, Mazumder, "OSSCAR: One-Shot Structured Pruning in Vision and Language Models
with Combinatorial Optimization", ICML 2024, arXiv 2403.12983.

For an output projection ``W: [out, C]`` (MLP ``down_proj``, or ``o_proj`` with head groups) and
its calibration inputs ``H: [C, n]`` with Gram ``G = H H^T``, choose kept groups ``S`` and new
weights ``B`` minimising the layer reconstruction error (paper eq. 2)::

    f(S) = min_B ||W H - B H_S||_F^2 + lam ||B||_F^2
         = tr(W G W^T) - tr(M_S^T (G_SS + lam I)^{-1} M_S),     M = G W^T  ([C, out], cross term)

The search (paper Sec. 3, local search over supports) runs in two stages on the precision matrix
``A = (G_SS + lam I)^{-1}`` and the refit ``Bt = A M_S``:

1. greedy backward elimination: removing group ``J`` raises ``f`` by
   ``tr(Bt_J^T (A_JJ)^{-1} Bt_J)``; remove the cheapest, downdate ``A`` and ``Bt`` (Schur complement).
   ``exact=True`` removes one group per ``O(k^2)`` downdate. The default removes blocks of a quarter
   of the remaining excess (at most 256, down to 1 near the quota), each block chosen by the same
   greedy run exactly inside a pool of the cheapest candidates on ``|P| x |P|`` matrices, then one
   batched downdate: ~30 instead of thousands of ``O(k^2)`` steps for a 5632-channel MLP, with ``f``
   within ~1e-5 (relative) of the one-at-a-time greedy in ``bench/osscar_speed.py`` runs;
2. swap local search: add the removed group with the largest gain
   ``r_j^T (s_j)^{-1} r_j`` (``r_j = M_j - G_jS Bt``, ``s_j = G_jj + lam - G_jS A G_Sj``), then drop the
   cheapest kept group of the same partition; keep the swap only when ``f`` decreases.

The best of this search and of a magnitude start (``||W_J||^2 G_JJ`` ranking) is returned, so the
result is never worse than magnitude selection on ``f``. Partitions with quotas express GQA: each
KV group keeps the same number of query heads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class Selection:
    """Result of :func:`select_groups`.

    Attributes:
        keep: kept group indices, sorted.
        weight: refit ``W_new: [out, |S| * group]`` (columns in ``keep`` order).
        error: ``f(S)`` with refit; ``error_no_refit``: ``||W_{not S} H_{not S}||^2`` (kept weights as they were).
        total: ``tr(W G W^T)`` (error of removing everything), for relative errors.
        swaps: accepted swaps of the local search.
    """

    keep: torch.Tensor
    weight: torch.Tensor
    error: float
    error_no_refit: float
    total: float
    swaps: int = 0


def _cols(groups: torch.Tensor, size: int) -> torch.Tensor:
    return (groups[:, None] * size + torch.arange(size, device=groups.device)).flatten()


def damping(gram: torch.Tensor, damp: float) -> float:
    """Ridge ``lam = damp * mean(diag(G))`` (at least a tiny constant for all-zero inputs)."""
    return float(damp * gram.diagonal().mean().clamp_min(1e-8))


def objective(gram: torch.Tensor, w: torch.Tensor, keep: torch.Tensor, group: int, lam: float) -> float:
    """``f(S)`` for kept groups ``keep`` (exact, via a Cholesky solve)."""
    g, wt = gram.double(), w.double()
    m = g @ wt.t()
    total = float((wt * m.t()).sum())
    cols = _cols(keep.to(gram.device), group)
    gss = g[cols][:, cols] + lam * torch.eye(len(cols), dtype=g.dtype, device=g.device)
    sol = torch.linalg.solve(gss, m[cols])
    return total - float((m[cols] * sol).sum())


def error_without_refit(gram: torch.Tensor, w: torch.Tensor, keep: torch.Tensor, group: int) -> float:
    """``||W_{not S} H_{not S}||^2 = tr(W_R G_RR W_R^T)`` for the removed groups ``R``."""
    n_groups = w.shape[1] // group
    mask = torch.ones(n_groups, dtype=torch.bool, device=gram.device)
    mask[keep.to(gram.device)] = False
    cols = _cols(torch.nonzero(mask).flatten(), group)
    wr = w.double()[:, cols]
    return float((wr @ gram.double()[cols][:, cols] * wr).sum())


def refit(gram: torch.Tensor, w: torch.Tensor, keep: torch.Tensor, group: int, lam: float) -> torch.Tensor:
    """Least-squares refit ``B = argmin ||W H - B H_S||^2 + lam ||B||^2 = W G_{:,S} (G_SS + lam I)^{-1}``."""
    g = gram.double()
    cols = _cols(keep.to(gram.device), group)
    gss = g[cols][:, cols] + lam * torch.eye(len(cols), dtype=g.dtype, device=g.device)
    m = g[cols] @ w.double().t()  # [S, out]
    return torch.linalg.solve(gss, m).t().to(w.dtype)


class _State:
    """Precision matrix and refit for the current support, with rank-|group| updates."""

    def __init__(self, gram: torch.Tensor, m: torch.Tensor, keep: torch.Tensor, group: int, lam: float) -> None:
        self.g, self.m, self.group, self.lam = gram, m, group, lam
        self.keep = keep.clone()
        cols = _cols(self.keep, group)
        gss = gram.clone() if len(cols) == gram.shape[0] else gram[cols][:, cols]  # full start: no gathers
        gss.diagonal().add_(lam)
        self.a = torch.cholesky_inverse(torch.linalg.cholesky(gss))
        del gss
        self.bt = self.a @ m[cols]

    def removal_costs(self) -> torch.Tensor:
        """``tr(Bt_J^T A_JJ^{-1} Bt_J)`` per kept group (position in ``keep``)."""
        k, s = len(self.keep), self.group
        a_blocks = self.a.reshape(k, s, k, s).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [k, s, s]
        bt = self.bt.reshape(k, s, -1)
        if s == 1:
            return bt.pow(2).sum((1, 2)) / a_blocks.reshape(k)
        # (bt_J^T A_JJ^{-1} bt_J) = sum over (i, l) of inv(A_JJ)_il <bt_i, bt_l>
        inner = torch.bmm(bt, bt.transpose(1, 2))  # [k, s, s]
        return (torch.linalg.inv(a_blocks) * inner).sum((1, 2))

    def remove(self, positions: list[int] | int) -> None:
        """Drop kept groups at ``positions`` (indices into ``keep``): block Schur downdate."""
        pos = torch.as_tensor([positions] if isinstance(positions, int) else positions, device=self.a.device)
        s = self.group
        idx = _cols(pos, s)
        rest = torch.ones(self.a.shape[0], dtype=torch.bool, device=self.a.device)
        rest[idx] = False
        r_idx = torch.nonzero(rest).flatten()
        a_jj = self.a[idx][:, idx]
        a_rj = self.a.index_select(1, idx).index_select(0, r_idx)  # thin block first: one pass less
        upd = torch.linalg.solve(a_jj, a_rj.t()).t()  # A_rJ A_JJ^{-1}
        self.bt = self.bt.index_select(0, r_idx) - upd @ self.bt[idx]
        a = self.a.index_select(0, r_idx).index_select(1, r_idx)
        self.a = a.addmm_(upd, a_rj.t(), alpha=-1)
        kmask = torch.ones(len(self.keep), dtype=torch.bool, device=self.keep.device)
        kmask[pos.to(self.keep.device)] = False
        self.keep = self.keep[kmask]

    def add_gains(self, candidates: torch.Tensor) -> torch.Tensor:
        """Decrease of ``f`` from adding each candidate group (vectorised over candidates)."""
        s, n = self.group, len(candidates)
        kc, rc = _cols(self.keep, s), _cols(candidates, s)
        g_rs = self.g[rc][:, kc]  # [n s, k s]
        p = g_rs @ self.a
        pb, gb = p.reshape(n, s, -1), g_rs.reshape(n, s, -1)
        g_rr = self.g[rc][:, rc].reshape(n, s, n, s).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        eye = torch.eye(s, dtype=self.g.dtype, device=self.g.device)
        sj = g_rr + self.lam * eye - torch.bmm(pb, gb.transpose(1, 2))  # [n, s, s]
        r = (self.m[rc] - p @ self.m[kc]).reshape(n, s, -1)  # [n, s, out]
        inner = torch.bmm(r, r.transpose(1, 2))
        return (torch.linalg.inv(sj) * inner).sum((1, 2))

    def add(self, j: int) -> None:
        s = self.group
        kc = _cols(self.keep, s)
        cj = torch.arange(j * s, (j + 1) * s, device=self.g.device)
        g_js = self.g[cj][:, kc]
        p = g_js @ self.a  # [s, k]
        sj = self.g[cj][:, cj] + self.lam * torch.eye(s, dtype=self.g.dtype, device=self.g.device) - p @ g_js.t()
        sinv = torch.linalg.inv(sj)
        top_left = self.a + p.t() @ sinv @ p
        top_right = -p.t() @ sinv
        self.a = torch.cat([torch.cat([top_left, top_right], 1), torch.cat([top_right.t(), sinv], 1)], 0)
        r = self.m[cj] - p @ self.m[kc]
        delta = sinv @ r  # new group's refit rows
        self.bt = torch.cat([self.bt - p.t() @ delta, delta], 0)
        self.keep = torch.cat([self.keep, self.keep.new_tensor([j])])


def _block(excess: int, chunk: int | None, frac: float, max_block: int = 256) -> int:
    """Groups removed by the next elimination step: ``chunk`` if fixed, else ``frac`` of the excess.

    Adaptive blocks are capped at ``max_block``: the in-pool greedy costs ``O(block^3)`` per step.
    """
    if chunk is not None:
        return max(1, min(chunk, excess))
    return max(1, min(max_block, int(frac * excess)))


@contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """Run many tiny CPU ops single-threaded: on |P| x |P| rank-1 updates thread sync costs more than
    the work (measured 3 ms vs 0.06 ms per 512 x 512 ``addr_`` on 2 busy cores)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _pool_greedy(state: _State, pool: torch.Tensor, n: int, left: torch.Tensor, part: torch.Tensor) -> list[int]:
    """One-at-a-time greedy removal of ``n`` groups restricted to ``pool`` (positions in ``keep``, group 1).

    Removing ``j`` changes the cost ``||Bt_i||^2 / A_ii`` of every other ``i`` through ``A_ij`` and
    ``<Bt_i, Bt_j>`` only, so the costs inside the pool are tracked exactly with rank-1 Schur
    downdates of ``A_PP`` and ``K = Bt_P Bt_P^T`` (both ``|P| x |P|``, fp64). Equal to the exact
    greedy as long as its choices stay inside the pool (the pool holds the cheapest groups).
    """
    a = state.a[pool][:, pool].double()
    bt = state.bt[pool].double()
    k = bt @ bt.t()
    dead = torch.zeros(len(pool), dtype=torch.bool, device=a.device)
    pool_part = part[state.keep[pool]]
    left = left.clone()
    taken: list[int] = []
    inf = torch.tensor(float("inf"), dtype=a.dtype, device=a.device)
    with _one_thread(a.device):
        for _ in range(n):
            costs = k.diagonal() / a.diagonal()
            blocked = dead | (left[pool_part] <= 0)
            j = int(torch.argmin(torch.where(blocked, inf, costs)))
            if bool(blocked[j]):
                break
            taken.append(int(pool[j]))
            left[pool_part[j]] -= 1
            dead[j] = True
            u = a[:, j] / a[j, j]
            kj = k[:, j].clone()
            k.addr_(u, kj, alpha=-1).addr_(kj, u, alpha=-1).addr_(u, u, alpha=float(kj[j]))
            a.addr_(u, a[j].clone(), alpha=-1)
    return taken


def _backward_eliminate(state: _State, quota: torch.Tensor, part: torch.Tensor, chunk: int | None,
                        frac: float = 0.25) -> int:
    """Remove the cheapest groups until every partition is down to its quota; returns the step count.

    ``chunk`` fixed: remove the ``chunk`` cheapest by the current costs per step (``chunk=1`` is the
    exact one-at-a-time greedy). ``chunk=None`` (single-column groups): remove ``frac`` of the
    remaining excess per step, chosen by the exact greedy inside a pool of the ``2 x block``
    cheapest (:func:`_pool_greedy`), then one batched Schur downdate: about ``log(excess) / frac``
    ``O(k^2)`` downdates instead of ``excess``.
    """
    steps = 0
    while True:
        counts = torch.bincount(part[state.keep], minlength=len(quota))
        excess = int((counts - quota).clamp_min(0).sum())
        if excess == 0:
            return steps
        costs = state.removal_costs()
        allowed = (counts - quota)[part[state.keep]] > 0
        costs = torch.where(allowed, costs, torch.full_like(costs, float("inf")))
        left = (counts - quota).clone()
        if chunk is None and state.group == 1:
            n = _block(excess, None, frac)
            pool = torch.argsort(costs)[: min(int(allowed.sum()), 2 * n)]
            taken = _pool_greedy(state, pool, n, left, part)
        else:
            n = _block(excess, chunk or 1, frac)
            # remove one group per partition-with-excess at a time to respect quotas exactly
            taken = []
            for pos in torch.argsort(costs).tolist():
                if len(taken) >= n or costs[pos] == float("inf"):
                    break
                pp = int(part[state.keep[pos]])
                if left[pp] > 0:
                    taken.append(pos)
                    left[pp] -= 1
        state.remove(taken)
        steps += 1


def _local_search(state: _State, part: torch.Tensor, prior: torch.Tensor, max_swaps: int, pool: int) -> int:
    """Add-best-then-drop-cheapest swaps inside each partition; stop when none improves ``f``.

    Adding gains are evaluated exactly for the ``pool`` removed groups with the highest ``prior``
    (cost ``pool * k^2`` per swap instead of ``n_removed * k^2``).
    """
    swaps = 0
    for _ in range(max_swaps):
        mask = torch.ones(len(prior), dtype=torch.bool, device=state.keep.device)
        mask[state.keep] = False
        removed = torch.nonzero(mask).flatten()
        if len(removed) > pool:
            removed = removed[torch.argsort(prior[removed], descending=True)[:pool]]
        if len(removed) == 0:
            return swaps
        gains = state.add_gains(removed)
        best = int(torch.argmax(gains))
        j = int(removed[best])
        gain = float(gains[best])
        state.add(j)
        costs = state.removal_costs()
        same = part[state.keep] == part[j]
        costs = torch.where(same, costs, torch.full_like(costs, float("inf")))
        pos = int(torch.argmin(costs))
        if int(state.keep[pos]) == j or float(costs[pos]) >= gain * (1 - 1e-9):
            state.remove(len(state.keep) - 1)  # undo: no improving swap
            return swaps
        state.remove(pos)
        swaps += 1
    return swaps


def _fit(g: torch.Tensor, m: torch.Tensor, total: float, keep: torch.Tensor, group: int,
         lam: float) -> tuple[float, torch.Tensor]:
    """``(f(S), B^T)`` from one Cholesky of ``G_SS + lam I`` (fp64; ``g``, ``m`` already fp64)."""
    cols = _cols(keep.to(g.device), group)
    gss = g[cols][:, cols]
    gss.diagonal().add_(lam)
    chol = torch.linalg.cholesky(gss)
    z = torch.linalg.solve_triangular(chol, m[cols], upper=False)  # L^{-1} M_S
    err = total - float(z.pow(2).sum())
    return err, torch.linalg.solve_triangular(chol.t(), z, upper=True)


def select_groups(
    gram: torch.Tensor, w: torch.Tensor, quota: torch.Tensor | int, group: int = 1,
    partition: torch.Tensor | None = None, damp: float = 0.01, max_swaps: int = 32,
    chunk: int | None = None, pool: int = 256, exact: bool = False, frac: float = 0.25,
) -> Selection:
    """OSSCAR selection + refit of the input groups of ``W``.

    Args:
        gram: ``G = H H^T: [C, C]`` of the projection's inputs over calibration tokens.
        w: ``W: [out, C]``.
        quota: groups to keep (int), or per partition ``[P]``.
        group: columns per group (1 for MLP channels, ``head_dim`` for heads).
        partition: partition id per group ``[C / group]`` (e.g. the KV group of each query head).
        damp: ridge ``lam = damp * mean(diag(G))``.
        max_swaps: local-search iterations.
        chunk: groups removed per elimination step (fixed); default: adaptive, ``frac`` of the
            remaining excess per step (see :func:`_backward_eliminate`).
        pool: removed groups whose adding gain is evaluated per swap (highest magnitude first).
        exact: one-at-a-time greedy elimination (``chunk=1``): slow on thousands of channels.
        frac: share of the remaining excess removed per adaptive step.

    Returns:
        A :class:`Selection` with the kept groups and refit weights.
    """
    n_groups = w.shape[1] // group
    dev = gram.device
    part = torch.zeros(n_groups, dtype=torch.long, device=dev) if partition is None else partition.to(dev).long()
    quota_t = torch.as_tensor([quota] if isinstance(quota, int) else quota, dtype=torch.long, device=dev)
    g = gram.double()
    lam = damping(g, damp)
    m = g @ w.double().t()
    total = float((w.double() * m.t()).sum())
    n_remove = n_groups - int(quota_t.sum())
    # the search runs in fp32 (memory traffic dominates); f and the refit are re-evaluated in fp64
    state = _State(g.float(), m.float(), torch.arange(n_groups, device=dev), group, lam)
    _backward_eliminate(state, quota_t, part, 1 if exact else chunk, frac)
    mag = (w.float().pow(2).sum(0) * g.diagonal().float()).reshape(n_groups, group).sum(1)
    swaps = _local_search(state, part, mag, max_swaps, pool) if n_remove > 0 else 0
    keep = state.keep.sort().values
    del state
    # magnitude start: never return something worse than the simple ranking
    mag_keep = torch.cat([
        torch.nonzero(part == p).flatten()[torch.argsort(mag[part == p], descending=True)[: int(quota_t[p])]]
        for p in range(len(quota_t))
    ]).sort().values
    err, bt = _fit(g, m, total, keep, group, lam)
    if not torch.equal(mag_keep, keep):
        mag_err, mag_bt = _fit(g, m, total, mag_keep, group, lam)
        if mag_err < err:
            keep, err, bt = mag_keep, mag_err, mag_bt
    return Selection(
        keep=keep, weight=bt.t().to(w.dtype), error=err,
        error_no_refit=error_without_refit(gram, w, keep, group), total=total, swaps=swaps,
    )


__all__ = ["Selection", "damping", "error_without_refit", "objective", "refit", "select_groups"]
