"""SparseGPT's OBS solver (Frantar & Alistarh, 2023) on seeded tensors."""

from __future__ import annotations

import logging

import pytest
import torch

from pare.ops.masks import layer_mask, nm_mask, row_mask
from pare.ops.sparsegpt import block_counts, inverse_hessian_factor, nm_candidates, nm_group_obs_mask, sparsegpt_prune
from pare.ops.wanda import wanda_mask


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def correlated_inputs(n: int = 2048, d: int = 64, seed: int = 0) -> torch.Tensor:
    """``X: [n, d]`` with correlated features of very different scales (like LLM activations)."""
    g = _gen(seed)
    z = torch.randn(n, d, generator=g)
    mix = torch.eye(d) + 2.0 * torch.randn(d, d, generator=g) / d**0.5
    scales = torch.exp(torch.randn(d, generator=g))
    return (z @ mix) * scales


def recon_error(w: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ w.t()) - (x @ w2.t())).square().sum())


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_identity_hessian_nm_is_magnitude_and_keeps_weights(nm) -> None:
    w = torch.randn(32, 64, generator=_gen(1))
    out, _ = sparsegpt_prune(w, torch.eye(64), 0.5, nm=nm, blocksize=16)
    mask = out == 0
    assert torch.equal(mask, nm_mask(w.abs(), *nm))
    assert torch.equal(out[~mask], w[~mask])  # bit-identical survivors: no update with a diagonal H


def test_identity_hessian_unstructured_row_groups_is_per_row_magnitude() -> None:
    """Exact statement (default ``mask_group="row"``): with a diagonal H no weight moves and each
    row's slice of each block loses its floor-allocated count of smallest |w|; with blocksize >= in
    that is exactly pare's per-row magnitude pruning."""
    w = torch.randn(32, 64, generator=_gen(2))
    full, _ = sparsegpt_prune(w, 3.0 * torch.eye(64), 0.6, blocksize=128)
    assert torch.equal(full == 0, row_mask(w.abs(), 0.6))
    assert torch.equal(full[full != 0], w[full != 0])
    blocked, _ = sparsegpt_prune(w, torch.eye(64), 0.6, blocksize=16)
    for b, k in enumerate(block_counts(1, 64, 16, 0.6)):
        cols = slice(16 * b, 16 * (b + 1))
        assert torch.equal(blocked[:, cols] == 0, row_mask(w[:, cols].abs(), k / 16 + 1e-9))
    assert torch.equal((blocked == 0).sum(1), torch.full((32,), int(64 * 0.6)))  # per-row exact
    assert torch.equal(blocked[blocked != 0], w[blocked != 0])


def test_identity_hessian_unstructured_block_groups_is_layer_magnitude_within_each_block() -> None:
    """``mask_group="block"`` (the reference's choice): magnitude over each [out, blocksize] block with
    floor-exact counts per matrix; with blocksize >= in, magnitude over the whole matrix."""
    w = torch.randn(32, 64, generator=_gen(2))
    full, _ = sparsegpt_prune(w, 3.0 * torch.eye(64), 0.6, blocksize=128, mask_group="block")
    assert torch.equal(full == 0, layer_mask(w.abs(), 0.6))
    assert torch.equal(full[full != 0], w[full != 0])
    blocked, _ = sparsegpt_prune(w, torch.eye(64), 0.6, blocksize=16, mask_group="block")
    for b, k in enumerate(block_counts(32, 64, 16, 0.6)):
        block = w[:, 16 * b:16 * (b + 1)]
        expected = torch.zeros(block.numel(), dtype=torch.bool)
        expected[torch.topk(block.abs().flatten(), k, largest=False).indices] = True
        assert torch.equal(blocked[:, 16 * b:16 * (b + 1)] == 0, expected.view_as(block))
    assert int((blocked == 0).sum()) == int(32 * 64 * 0.6)


@pytest.mark.parametrize("pattern,group", [(None, "row"), (None, "block"), ((2, 4), "row")])
def test_reconstruction_error_sparsegpt_le_wanda_le_magnitude(pattern, group) -> None:
    x = correlated_inputs()
    w = torch.randn(48, 64, generator=_gen(3))
    h = 2.0 / x.shape[0] * x.t() @ x
    sgpt, _ = sparsegpt_prune(w, h, 0.5, nm=pattern, blocksize=32, mask_group=group)
    wanda = w.masked_fill(wanda_mask(w, x.norm(dim=0), 0.5, pattern), 0)
    mag = w.masked_fill(wanda_mask(w, torch.ones(64), 0.5, pattern), 0)
    e_s, e_w, e_m = (recon_error(w, v, x) for v in (sgpt, wanda, mag))
    assert e_s <= e_w <= e_m
    assert e_s < 0.8 * e_w  # the reconstruction does real work on correlated inputs
    assert int((sgpt == 0).sum()) == 48 * 32


def test_loss_is_the_obs_error_of_the_dampened_hessian() -> None:
    x = correlated_inputs(seed=4)
    w = torch.randn(16, 64, generator=_gen(4))
    h = 2.0 / x.shape[0] * x.t() @ x
    out, loss = sparsegpt_prune(w, h, 0.5, blocksize=16, percdamp=0.01)
    hd = h + 0.01 * h.diagonal().mean() * torch.eye(64)
    dw = (w - out).double()
    expected = 0.5 * float(torch.einsum("ri,ij,rj->", dw, hd.double(), dw))
    assert loss == pytest.approx(expected, rel=1e-3)


def test_matches_reference_nm_algorithm() -> None:
    """The reference rule (``nm_select="score"``) against a transcription of the published
    ``fasterprune`` (N:M path, no ties possible)."""
    x = correlated_inputs(seed=5)
    w = torch.randn(16, 64, generator=_gen(5))
    h = 2.0 / x.shape[0] * x.t() @ x
    ours, _ = sparsegpt_prune(w, h, 0.5, nm=(2, 4), blocksize=32, nm_select="score")
    assert torch.allclose(ours, _reference_fasterprune(w, h, 2, 4, 32), atol=1e-4, rtol=1e-4)


def _reference_fasterprune(W, H, prunen, prunem, blocksize, percdamp=0.01):
    W, H = W.clone().float(), H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(H.shape[0])
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, W.shape[1], blocksize):
        i2 = min(i1 + blocksize, W.shape[1])
        W1 = W[:, i1:i2].clone()
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        mask1 = torch.zeros_like(W1) == 1
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if i % prunem == 0:
                tmp = W1[:, i:i + prunem] ** 2 / (torch.diag(Hinv1)[i:i + prunem].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def test_dead_inputs_are_zeroed() -> None:
    x = correlated_inputs(seed=6)
    x[:, [3, 17]] = 0
    h = 2.0 / x.shape[0] * x.t() @ x
    w = torch.randn(8, 64, generator=_gen(6))
    out, loss = sparsegpt_prune(w, h, 0.5, blocksize=16)
    assert bool((out[:, [3, 17]] == 0).all())
    assert torch.isfinite(out).all() and loss >= 0
    assert int((out == 0).sum()) == 8 * 32  # dead weights count among the pruned ones


def test_not_positive_definite_raises_dampening_with_a_warning(caplog) -> None:
    g = _gen(7)
    v = torch.randn(64, 8, generator=g)
    h = v @ v.t()  # rank 8: singular
    h -= 0.5 * torch.eye(64) * float(h.diagonal().mean())  # and indefinite
    with caplog.at_level(logging.WARNING, logger="pare.ops.hessian"):
        factor = inverse_hessian_factor(h, percdamp=0.01)
    assert "raising it" in caplog.text
    assert factor.damp > 0.01 * float(h.diagonal().mean())
    out, _ = sparsegpt_prune(torch.randn(8, 64, generator=g), h, 0.5)
    assert torch.isfinite(out).all()


def test_low_precision_weights_are_computed_in_fp32() -> None:
    x = correlated_inputs(seed=8)
    h = 2.0 / x.shape[0] * x.t() @ x
    w = torch.randn(16, 64, generator=_gen(8)).to(torch.bfloat16)
    w_before = w.clone()
    out, _ = sparsegpt_prune(w, h, 0.5, nm=(2, 4))
    ref, _ = sparsegpt_prune(w.float(), h, 0.5, nm=(2, 4))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref.to(torch.bfloat16))
    assert torch.equal(w, w_before)  # W itself is not edited


def test_finite_check_sees_nan_and_inf_and_survives_an_overflowing_sum() -> None:
    from pare.ops.hessian import all_finite as _all_finite

    assert _all_finite(torch.ones(3, 3))
    assert _all_finite(torch.full((2, 2), 3e38))  # the fp32 sum overflows; every value is finite
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.ones(3, 3)
        t[1, 2] = bad
        assert not _all_finite(t)
    t = torch.full((2, 2), 3e38)
    t[0, 0] = float("-inf")
    assert not _all_finite(t)


def test_nm_obs_selection_is_the_best_sequential_mask_of_a_single_group() -> None:
    """With one group of M inputs, OBS's sequential loss is the exact reconstruction error (a pruned
    input is compensated by the inputs to its right), so the 'obs' rule finds, per row, the best of
    the C(M, N) masks under that update: never worse than the per-column scores, better on some rows."""
    x = correlated_inputs(n=512, d=4, seed=3)
    w = torch.randn(256, 4, generator=_gen(4))
    h = 2 * x.t() @ x / x.shape[0]
    obs, _ = sparsegpt_prune(w, h, 0.5, nm=(2, 4), blocksize=4, percdamp=0.0, nm_select="obs")
    score, _ = sparsegpt_prune(w, h, 0.5, nm=(2, 4), blocksize=4, percdamp=0.0, nm_select="score")
    err_obs = ((x @ w.t()) - (x @ obs.t())).square().sum(0)
    err_score = ((x @ w.t()) - (x @ score.t())).square().sum(0)
    assert bool((err_obs <= err_score * (1 + 1e-4) + 1e-4).all())
    assert bool((err_obs < err_score * 0.99).any())


def _played_group_mask(wg: torch.Tensor, ug: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
    """The group's OBS loss by playing every candidate through the M columns, one column at a time."""
    losses = []
    for cand in cands:
        w, loss = wg.clone(), torch.zeros(wg.shape[1], dtype=torch.float64)
        for a in range(wg.shape[0]):
            err = w[a] / ug[a, a] if cand[a] else torch.zeros_like(w[a])
            loss += err.square()
            w[a + 1:] -= ug[a, a + 1:, None] * err
        losses.append(loss)
    return cands[torch.stack(losses).argmin(0)].t()


@pytest.mark.parametrize("nm", [(1, 4), (2, 4), (3, 4), (2, 8), (4, 8)])
def test_nm_group_obs_mask_equals_the_column_by_column_play(nm: tuple[int, int]) -> None:
    """The forward-substitution form of the group's OBS loss picks the same mask, row by row, as
    playing each candidate through the group's columns (float64, so no near-tie flips)."""
    cands = nm_candidates(nm)
    for seed in range(5):
        a = torch.randn(nm[1], nm[1], generator=_gen(seed), dtype=torch.float64)
        ug = torch.linalg.cholesky(a @ a.t() + 0.1 * torch.eye(nm[1], dtype=torch.float64), upper=True)
        wg = torch.randn(nm[1], 300, generator=_gen(100 + seed), dtype=torch.float64)
        assert torch.equal(nm_group_obs_mask(wg, ug, cands), _played_group_mask(wg, ug, cands))


def test_prune_rows_overwrite_uses_the_stacked_buffer_and_gives_the_copying_result():
    """The stacked fp32 work buffer of q/k/v or gate/up is pruned in place (no second copy), with
    bitwise the result of the copying call."""
    from pare.ops.sparsegpt import sparsegpt_prune_rows, stack_rows_fp32

    g = torch.Generator().manual_seed(3)
    X = torch.randn(256, 32, generator=g)
    factor = inverse_hessian_factor(2 / 256 * X.T @ X)
    ws = [torch.randn(rows, 32, generator=g).to(torch.bfloat16) for rows in (16, 8, 8)]
    stacked = stack_rows_fp32(ws, factor.U.device)
    assert stacked.dtype == torch.float32 and torch.equal(stacked, torch.cat([w.float() for w in ws]))
    copied, loss_copied = sparsegpt_prune_rows(stacked, factor, 0.5)
    assert not torch.equal(copied, stacked)  # the copying call left its input alone
    pruned, loss = sparsegpt_prune_rows(stacked, factor, 0.5, overwrite=True)
    assert pruned.data_ptr() == stacked.data_ptr()
    assert torch.equal(pruned, copied) and torch.equal(loss, loss_copied)
