"""diffmpc.boxqp.box_qp against cvxpy (Clarabel, active-set polished) on random batched QPs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmpc.boxqp import box_qp, masked_cholesky

cp = pytest.importorskip("cvxpy")
f64 = torch.float64


def reference_box_qp(H, q, lower, upper):
    """Solve every ``min 1/2 x'Hx + q'x, lower <= x <= upper`` with cvxpy, then polish: fix the
    coordinates found at a bound and solve the rest exactly. Returns x ``[B, m]`` (float64)."""
    Hn, qn = H.double().numpy(), q.double().numpy()
    lo, hi = lower.double().numpy(), upper.double().numpy()
    B, m = qn.shape
    x = cp.Variable((B, m))
    obj = sum(0.5 * cp.quad_form(x[b], cp.psd_wrap(Hn[b])) + qn[b] @ x[b] for b in range(B))
    cons = []
    for bnd, sign in ((lo, 1), (hi, -1)):
        fin = np.isfinite(bnd)
        if fin.any():
            cons.append(sign * (x[fin] - bnd[fin]) >= 0)
    cp.Problem(cp.Minimize(obj), cons).solve(solver=cp.CLARABEL, tol_gap_abs=1e-12,
                                             tol_gap_rel=1e-12, tol_feas=1e-12)
    return torch.as_tensor(np.stack([_polish(Hn[b], qn[b], lo[b], hi[b], x.value[b])
                                     for b in range(B)]))


def _polish(H, q, lo, hi, x, tol=1e-6):
    at_lo = np.isfinite(lo) & (x - lo <= tol * (1 + np.abs(lo)))
    at_hi = np.isfinite(hi) & (hi - x <= tol * (1 + np.abs(hi))) & ~at_lo
    fixed = at_lo | at_hi
    xp = np.where(at_lo, lo, np.where(at_hi, hi, 0.0))
    fr = ~fixed
    if fr.any():
        xp[fr] = np.linalg.solve(H[np.ix_(fr, fr)], -(q[fr] + H[np.ix_(fr, fixed)] @ xp[fixed]))
    g = H @ xp + q
    ok = (np.all(xp >= lo - 1e-12) and np.all(xp <= hi + 1e-12) and np.all(g[at_lo] >= -1e-9)
          and np.all(g[at_hi] <= 1e-9))
    return xp if ok else x


def random_qps(B: int, m: int, seed: int, dtype=f64, p_inf: float = 0.2):
    """Random PD H, q, and bounds that cut the unconstrained minimizer in places; each bound is
    infinite with probability p_inf."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, m, m, generator=g, dtype=f64)
    H = A @ A.mT / m + 0.1 * torch.eye(m, dtype=f64)
    q = 2 * torch.randn(B, m, generator=g, dtype=f64)
    center = 0.5 * torch.randn(B, m, generator=g, dtype=f64)
    width = 0.05 + torch.rand(B, m, generator=g, dtype=f64)
    lower, upper = center - width, center + width
    lower[torch.rand(B, m, generator=g) < p_inf] = -float("inf")
    upper[torch.rand(B, m, generator=g) < p_inf] = float("inf")
    return tuple(t.to(dtype) for t in (H, q, lower, upper))


def _check(res, H, q, lower, upper, atol=1e-9):
    ref = reference_box_qp(H, q, lower, upper)
    assert bool(res.converged.all()), f"{int((~res.converged).sum())} unconverged"
    assert bool(((res.x >= lower) & (res.x <= upper)).all())
    err = (res.x.double() - ref).abs().max()
    assert err <= atol, f"max |x - x_ref| = {float(err):.3g}"
    return ref


@pytest.mark.parametrize("m", [1, 2, 5, 8])
def test_random_qps_match_cvxpy(m):
    H, q, lower, upper = random_qps(64, m, seed=m)
    res = box_qp(H, q, lower, upper)
    ref = _check(res, H, q, lower, upper)
    # the reported free set: coordinates strictly inside their bounds at the reference
    inside = (ref > lower.double() + 1e-7) & (ref < upper.double() - 1e-7)
    assert bool((res.free == inside).all())
    assert 0.1 < float((~inside).double().mean()) < 0.9  # the bounds matter


def test_infinite_bounds_give_the_unconstrained_minimizer():
    H, q, _, _ = random_qps(16, 4, seed=30)
    inf = torch.full_like(q, float("inf"))
    res = box_qp(H, q, -inf, inf)
    assert bool(res.converged.all()) and bool(res.free.all())
    torch.testing.assert_close(res.x, torch.linalg.solve(H, -q), rtol=1e-10, atol=1e-12)


def test_one_sided_bounds_match_cvxpy():
    H, q, lower, upper = random_qps(32, 4, seed=31, p_inf=0.0)
    inf = torch.full_like(q, float("inf"))
    _check(box_qp(H, q, lower, inf), H, q, lower, inf)
    _check(box_qp(H, q, -inf, upper), H, q, -inf, upper)


def test_fully_clamped():
    """Every coordinate at a bound: narrow boxes far from the unconstrained minimizer, and
    lower == upper (fixed coordinates)."""
    H, q, _, _ = random_qps(32, 4, seed=32)
    x_unc = torch.linalg.solve(H, -q)
    lower = torch.where(x_unc > 0, -3.0 - x_unc.abs(), 3.0 + x_unc.abs())  # box on the far side
    upper = lower + 0.01
    res = box_qp(H, q, lower, upper)
    ref = _check(res, H, q, lower, upper)
    assert not bool(res.free.any())
    assert bool(((ref - lower).abs().le(1e-12) | (ref - upper).abs().le(1e-12)).all())
    fixed = torch.randn(32, 4, generator=torch.Generator().manual_seed(1), dtype=f64)
    res = box_qp(H, q, fixed, fixed)
    assert torch.equal(res.x, fixed) and bool(res.converged.all())


def test_mixed_batch_with_degenerate_samples():
    """Unconstrained, fully clamped and partly clamped samples in one batch are solved
    independently: each equals its own solve."""
    H, q, lower, upper = random_qps(12, 3, seed=33)
    lower[:4], upper[:4] = -float("inf"), float("inf")
    lower[4:8] = upper[4:8] = 0.25
    res = box_qp(H, q, lower, upper)
    _check(res, H, q, lower, upper)
    for i in (0, 5, 9):
        one = box_qp(H[i:i + 1], q[i:i + 1], lower[i:i + 1], upper[i:i + 1])
        torch.testing.assert_close(one.x[0], res.x[i], rtol=0, atol=1e-12)


def test_warm_start_outside_the_box_is_projected():
    H, q, lower, upper = random_qps(32, 4, seed=34)
    x0 = 10 * torch.randn(32, 4, generator=torch.Generator().manual_seed(2), dtype=f64)
    _check(box_qp(H, q, lower, upper, x0=x0), H, q, lower, upper)


def test_float32():
    H, q, lower, upper = random_qps(32, 4, seed=35, dtype=torch.float32)
    res = box_qp(H, q, lower, upper)
    assert res.x.dtype == torch.float32
    _check(res, H, q, lower, upper, atol=1e-4)


def test_start_just_inside_a_bound():
    """Projected-Newton stall. The unconstrained minimizer's first coordinate lies 1e-9 inside its
    lower bound and the third coordinate is clamped at its upper bound, so the start point has
    coordinate 0 strictly inside with the gradient pushing it out. The free-subspace Newton step
    then moves coordinate 1 as well; once coordinate 0 is projected back onto its bound no step
    size decreases the cost, the line search rejects every step, and box_qp returns its start
    point after max_iter iterations, unconverged, with coordinate 0 reported free.
    (Projected Newton needs an epsilon-active set here, Bertsekas 1982: treat a coordinate
    within eps of a bound with an outward gradient as clamped.)"""
    g = torch.Generator().manual_seed(0)
    B, m = 64, 3
    A = torch.randn(B, m, m, generator=g, dtype=f64)
    H = A @ A.mT + 0.1 * torch.eye(m, dtype=f64)
    x_unc = torch.randn(B, m, generator=g, dtype=f64)
    q = -(H @ x_unc.unsqueeze(-1)).squeeze(-1)
    lower = torch.full((B, m), -10.0, dtype=f64)
    upper = torch.full((B, m), 10.0, dtype=f64)
    lower[:, 0] = x_unc[:, 0] - 1e-9
    upper[:, 2] = x_unc[:, 2] - 0.5
    _check(box_qp(H, q, lower, upper), H, q, lower, upper, atol=1e-8)


def test_masked_cholesky():
    H, _, _, _ = random_qps(8, 5, seed=36)
    free = torch.rand(8, 5, generator=torch.Generator().manual_seed(3)) < 0.6
    L, info = masked_cholesky(H, free)
    assert bool((info == 0).all())
    mask = free.unsqueeze(-1) & free.unsqueeze(-2)
    expected = torch.where(mask, H, torch.zeros_like(H)) + torch.diag_embed((~free).double())
    torch.testing.assert_close(L @ L.mT, expected, rtol=1e-12, atol=1e-12)
