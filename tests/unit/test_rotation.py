"""ops.rotation: PCA bases, the mean-free basis, norm folding, rotations (exact invariants)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pare.ops import rotation as rot

G = torch.Generator().manual_seed(0)


def _x(n=200, h=12):
    return torch.randn(n, h, generator=G, dtype=torch.float64) @ torch.randn(h, h, generator=G, dtype=torch.float64)


def test_second_moment_and_unit_tokens():
    x = _x()
    assert torch.allclose(rot.second_moment(x), x.T @ x)
    unit = rot.second_moment(x, unit_tokens=True)
    assert torch.allclose(unit.trace(), torch.tensor(200.0, dtype=torch.float64))


def test_pca_basis_is_orthogonal_and_sorted():
    values, q = rot.pca_basis(rot.second_moment(_x()), damp=0.0)
    assert torch.allclose(q.T @ q, torch.eye(12, dtype=torch.float64), atol=1e-10)
    assert (values[:-1] >= values[1:]).all()


def test_mean_free_basis_keeps_coordinates_zero_mean():
    x = _x()
    x = x - x.mean(1, keepdim=True)  # a centred stream
    for k in (12, 8, 2):
        b = rot.mean_free_basis(rot.second_moment(x), k)
        assert torch.allclose(b.T @ b, torch.eye(k, dtype=torch.float64), atol=1e-10)
        y = x @ b
        assert torch.allclose(y.mean(1), torch.zeros(200, dtype=torch.float64), atol=1e-10)
    full = rot.mean_free_basis(rot.second_moment(x), 12)
    # LayerNorm on the rotated stream equals LayerNorm of the original, rotated
    assert torch.allclose(F.layer_norm(x @ full, (12,)), F.layer_norm(x, (12,)) @ full, atol=1e-8)
    with pytest.raises(ValueError):
        rot.mean_free_basis(rot.second_moment(x), 1)


def test_complete_basis_extends_columns():
    b = torch.linalg.qr(torch.randn(10, 4, generator=G, dtype=torch.float64))[0]
    q = rot.complete_basis(b)
    assert torch.allclose(q[:, :4], b)
    assert torch.allclose(q.T @ q, torch.eye(10, dtype=torch.float64), atol=1e-10)


def test_rotation_of_reader_and_writer_is_invariant():
    q = torch.linalg.qr(torch.randn(12, 12, generator=G, dtype=torch.float64))[0]
    w_out = torch.randn(12, 5, generator=G, dtype=torch.float64)  # writer [H, in]
    w_in = torch.randn(7, 12, generator=G, dtype=torch.float64)  # reader [out, H]
    h = torch.randn(3, 5, generator=G, dtype=torch.float64)
    ref = h @ w_out.T @ w_in.T
    got = h @ rot.rotate_output(w_out, q).T @ rot.rotate_input(w_in, q).T
    assert torch.allclose(got, ref)
    experts = torch.randn(2, 12, 5, generator=G, dtype=torch.float64)  # [E, H, I]
    assert torch.allclose(rot.rotate_output(experts, q)[1], rot.rotate_output(experts[1], q))


def test_fold_norm_into_reader():
    w, c = torch.randn(4, 6, generator=G), torch.randn(4, generator=G)
    s, b, n = torch.randn(6, generator=G), torch.randn(6, generator=G), torch.randn(3, 6, generator=G)
    new_w, new_b = rot.fold_norm_into_reader(w, c, s, b)
    assert torch.allclose(n @ new_w.T + new_b, (n * s + b) @ w.T + c, atol=1e-5)


def test_center_output_and_kept_width():
    w = rot.center_output(torch.randn(6, 3, generator=G), 0)
    assert torch.allclose(w.sum(0), torch.zeros(3), atol=1e-6)
    assert rot.kept_width(576, 0.25, 8) == 432
    assert rot.kept_width(576, 0.2, 8) == 456
    assert rot.kept_width(64, 0.0, 8) == 64
    assert rot.kept_width(16, 0.99, 8, minimum=8) == 8
