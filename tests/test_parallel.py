"""The time-parallel recursions (diffmpc.parallel): scans against plain loops written here, the
time-parallel LQR against cvxpy (also every test of test_lqr.py, through the ``recursion``
fixture) and against the sequential recursion it replaces.
"""

from __future__ import annotations

import pytest
import torch

import diffmpc as dm
from diffmpc import lqr
from diffmpc.ilqr import auto_time_parallel
from diffmpc.parallel import affine_suffix, prefix_products, suffix_scan

DT = torch.float64
LENGTHS = [1, 2, 3, 5, 8, 9, 17]


def _mats(T, B=3, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, B, k, k, generator=g, dtype=DT) / k ** 0.5


@pytest.mark.parametrize("T", LENGTHS)
def test_suffix_scan_of_matrix_products_equals_a_loop(T):
    M = _mats(T)
    S = suffix_scan(M, lambda earlier, later, last: earlier @ later)
    for t in range(T):
        ref = M[t]
        for s in range(t + 1, T):
            ref = ref @ M[s]
        torch.testing.assert_close(S[t], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T", LENGTHS)
def test_prefix_products_equal_a_loop(T):
    M = _mats(T, seed=1)
    P = prefix_products(M)
    ref = M[0]
    torch.testing.assert_close(P[0], ref)
    for t in range(1, T):
        ref = M[t] @ ref
        torch.testing.assert_close(P[t], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T", LENGTHS)
def test_affine_suffix_equals_a_loop(T):
    M = _mats(max(T - 1, 1), seed=2)[:T - 1]
    a = torch.randn(T, 3, 4, dtype=DT)
    y = affine_suffix(a, M if T > 1 else None)
    ref = a[T - 1]
    torch.testing.assert_close(y[T - 1], ref)
    for t in range(T - 2, -1, -1):
        ref = a[t] + (M[t] @ ref.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(y[t], ref, rtol=1e-12, atol=1e-12)


def _loop_riccati(C, c, F, f, free):
    """The fixed-set LQR of one sample by the textbook recursion, in plain loops: ``[T, m, n]``
    gains K and ``[T, m]`` k (zero on the held controls)."""
    T, p = C.shape[0], C.shape[-1]
    n = F.shape[-2]
    S, s = torch.zeros(n, n, dtype=DT), torch.zeros(n, dtype=DT)
    Ks, ks = [None] * T, [None] * T
    for t in range(T - 1, -1, -1):
        Q, q = C[t].clone(), c[t].clone()
        if t < T - 1:
            Q += F[t].T @ S @ F[t]
            q += F[t].T @ (S @ f[t] + s)
        idx = free[t].nonzero().squeeze(1) + n
        K, k = torch.zeros(p - n, n, dtype=DT), torch.zeros(p - n, dtype=DT)
        Kf = -torch.linalg.solve(Q[idx][:, idx], Q[idx, :n])
        kf = -torch.linalg.solve(Q[idx][:, idx], q[idx])
        K[idx - n], k[idx - n] = Kf, kf
        S = Q[:n, :n] + Q[:n, n:] @ K + K.T @ Q[n:, :n] + K.T @ Q[n:, n:] @ K
        s = q[:n] + K.T @ q[n:] + Q[:n, n:] @ k + K.T @ Q[n:, n:] @ k
        Ks[t], ks[t] = K, k
    return torch.stack(Ks), torch.stack(ks)


@pytest.mark.parametrize("T", [1, 2, 7, 20])
@pytest.mark.parametrize("held", [False, True])
def test_time_parallel_gains_equal_the_textbook_recursion(make_problem, T, held):
    prob = make_problem(3, T, 4, 3, seed=T)
    g = torch.Generator().manual_seed(5)
    free = (torch.rand(3, T, 3, generator=g) > 0.4) if held else torch.ones(3, T, 3, dtype=bool)
    gains = lqr.riccati(prob.C, prob.c, prob.F, prob.f, free=free if held else None,
                        parallel=True)
    assert gains.parallel and bool(gains.ok.all())
    for b in range(3):
        K, k = _loop_riccati(prob.C[b], prob.c[b], prob.F[b], prob.f[b], free[b])
        torch.testing.assert_close(gains.K[b], K, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(gains.k[b], k, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 2e-4)])
@pytest.mark.parametrize("held", [False, True])
def test_time_parallel_pass_equals_the_sequential_one(make_problem, dtype, tol, held):
    """Gains, factors, predicted change, rollouts (with and without offsets), feedforward and
    costate of both recursions on the same problems, T = 33 (a partial last scan level)."""
    B, T, n, m = 4, 33, 5, 3
    prob = make_problem(B, T, n, m, seed=3, dtype=dtype)
    free = (torch.rand(B, T, m, generator=torch.Generator().manual_seed(0)) > 0.35) if held \
        else None
    args = (prob.C, prob.c, prob.F, prob.f)
    seq, par = lqr.riccati(*args, free=free), lqr.riccati(*args, free=free, parallel=True)
    assert par.parallel and not seq.parallel

    def close(a, b):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * (1 + b.abs().max().item()))

    for name in ("K", "k", "L", "dV"):
        close(getattr(par, name), getattr(seq, name))
    assert torch.equal(par.free, seq.free) and torch.equal(par.ok, seq.ok)
    for offsets in (True, False):
        for a, b in zip(lqr.rollout_affine(par, prob.x_init, offsets),
                        lqr.rollout_affine(seq, prob.x_init, offsets), strict=True):
            close(a, b)
    c2 = torch.randn(B, T, n + m, dtype=dtype)
    fp, fs = lqr.feedforward(par, c2), lqr.feedforward(seq, c2)
    assert fp.parallel
    close(fp.k, fs.k)
    gx, Fx = c2[..., :n], lqr.time_major(prob.F[..., :n])
    close(lqr.costate(gx, Fx, parallel=True), lqr.costate(gx, Fx))


def test_time_parallel_falls_back_where_a_control_cost_is_not_positive_definite():
    """A concave control cost whose next value makes Q_uu positive definite: the sequential
    recursion handles it, the elimination of the scan cannot, so the pass is sequential."""
    T = 3
    C = torch.tensor([[1.0, 0.0], [0.0, -0.5]], dtype=DT).expand(1, T, 2, 2).clone()
    C[:, -1, 1, 1] = 1.0
    F = torch.tensor([[[[1.0, 2.0]]]], dtype=DT).expand(1, T - 1, 1, 2)
    c = torch.zeros(1, T, 2, dtype=DT)
    gains = lqr.riccati(C, c, F, parallel=True)
    assert not gains.parallel and bool(gains.ok.all())
    seq = lqr.riccati(C, c, F)
    torch.testing.assert_close(gains.K, seq.K)


def test_unstable_dynamics_match_cvxpy(make_problem, reference):
    """Open-loop growth of 1.3 per step over T = 40 (the scan multiplies up to 32 steps of it)."""
    prob = make_problem(3, 40, 4, 2, seed=7)
    prob.F[..., :4] *= 1.3 / 0.95
    for box in (None, 0.8):
        bounds = (None, None) if box is None else (-box, box)
        ref = reference(prob, *bounds)
        mpc = dm.MPC(4, 2, 40, *bounds, time_parallel=True, tol=1e-12, max_iter=100,
                     unconverged="raise")
        sol = mpc(prob.x_init, dm.QuadCost(prob.C, prob.c), dm.LinearDynamics(prob.F, prob.f))
        assert (sol.u - ref.u).abs().max() <= 1e-6


def test_time_parallel_option_resolves_by_device_and_size():
    from diffmpc import native

    cpu = torch.zeros(4, 10)
    assert not dm.SolverOptions().parallel_for(cpu, 50)
    # one sample: dispatch-bound in PyTorch operations, not where the passes run compiled
    assert dm.SolverOptions().parallel_for(cpu[:1], 50) == (not native.available())
    with native.enabled(False):
        assert dm.SolverOptions().parallel_for(cpu[:1], 50)
    assert dm.SolverOptions(time_parallel=True).parallel_for(cpu, 50)
    assert not dm.SolverOptions(time_parallel=False).parallel_for(cpu[:1], 50)
    assert auto_time_parallel(True, 256, 50, 10) and auto_time_parallel(True, 1024, 50, 10)
    assert not auto_time_parallel(True, 4096, 50, 10)  # the scans' arithmetic outweighs
    assert auto_time_parallel(False, 1, 20, 10) and not auto_time_parallel(False, 1, 10, 10)
    assert not auto_time_parallel(False, 2, 50, 10) and not auto_time_parallel(False, 1, 50, 32)
    assert not auto_time_parallel(False, 1, 50, 10, compiled=True)
    assert auto_time_parallel(True, 1, 50, 10, compiled=True)  # (CUDA: no kernels)
    with pytest.raises(ValueError, match="time_parallel"):
        dm.MPC(2, 1, 5, time_parallel="yes")


@pytest.mark.parametrize("held", [False, True])
def test_value_gradient_along_the_solution_is_the_costate(make_problem, held):
    """``Gains.V`` of a time-parallel pass: along that pass's own solution, ``J_t x_t + r_t``
    equals the costate of the cost gradient, computed here by the plain backward recursion."""
    B, T, n, m = 3, 12, 4, 2
    prob = make_problem(B, T, n, m, seed=11)
    free = (torch.rand(B, T, m, generator=torch.Generator().manual_seed(1)) > 0.4) if held \
        else None
    gains = lqr.riccati(prob.C, prob.c, prob.F, prob.f, free=free, parallel=True)
    x, u = lqr.rollout_affine(gains, prob.x_init)
    g = (prob.C @ torch.cat([x, u], -1).unsqueeze(-1)).squeeze(-1) + prob.c
    lam = g[:, T - 1, :n]
    for t in range(T - 1, -1, -1):
        if t < T - 1:
            lam = g[:, t, :n] + (prob.F[:, t, :, :n].mT @ lam.unsqueeze(-1)).squeeze(-1)
        J, r = gains.V[t, ..., :n], gains.V[t, ..., n]
        torch.testing.assert_close((J @ x[:, t].unsqueeze(-1)).squeeze(-1) + r, lam,
                                   rtol=1e-10, atol=1e-10)
