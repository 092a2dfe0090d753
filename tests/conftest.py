"""Shared fixtures: random LQR problems and an independent reference solver (cvxpy + Clarabel).

The reference solves each batch as one sparse QP in the stacked variable
``z = [tau_{0,0}; ...; tau_{B-1,T-1}]`` (``tau = [x; u]``), written from the problem statement in
DESIGN.md, with none of diffmpc's code: Riccati recursions, box QPs and rollouts are not used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
from torch import Tensor

try:
    import cvxpy as cp
except ImportError:  # pragma: no cover - cvxpy is a test dependency
    cp = None


def pytest_configure(config):
    # Tests solve tiny problems: intra-op threads only add overhead, and with pytest-xdist the
    # workers already use every core.
    torch.set_num_threads(1)


@dataclass
class Problem:
    """A batch of LQR problems in diffmpc's shapes (batch first).

    Attributes:
        x_init: ``[B, n]``. C: ``[B, T, p, p]`` symmetric PD. c: ``[B, T, p]``.
        F: ``[B, T-1, n, p]``. f: ``[B, T-1, n]``.
    """

    x_init: Tensor
    C: Tensor
    c: Tensor
    F: Tensor
    f: Tensor

    @property
    def sizes(self) -> tuple[int, int, int, int]:
        """(B, T, n, m)."""
        B, T, p, _ = self.C.shape
        n = self.x_init.shape[-1]
        return B, T, n, p - n

    def to(self, dtype: torch.dtype) -> Problem:
        return Problem(*(getattr(self, k).to(dtype) for k in ("x_init", "C", "c", "F", "f")))

    def sample(self, i: int) -> Problem:
        """Sample i as a batch of one."""
        return Problem(*(getattr(self, k)[i:i + 1] for k in ("x_init", "C", "c", "F", "f")))


def random_problem(B: int, T: int, n: int, m: int, seed: int = 0,
                   dtype: torch.dtype = torch.float64, rho: float = 0.95) -> Problem:
    """Random stable time-varying dynamics and random positive definite costs.

    ``A_t = rho * M / ||M||_2`` (spectral norm rho < 1), ``B_t ~ N(0, 1/m)``, ``C_t = L L'/p + 0.1 I``
    with a control block at least 0.1 I, ``c_t, f_t, x_init ~ N(0, 1)``.
    """
    g = torch.Generator().manual_seed(seed)
    p = n + m

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    M = randn(B, T - 1, n, n)
    A = rho * M / torch.linalg.matrix_norm(M, ord=2)[..., None, None]
    Bu = randn(B, T - 1, n, m) / m ** 0.5
    L = randn(B, T, p, p)
    C = L @ L.mT / p + 0.1 * torch.eye(p, dtype=torch.float64)
    C = 0.5 * (C + C.mT)
    prob = Problem(x_init=randn(B, n), C=C, c=randn(B, T, p), F=torch.cat([A, Bu], -1),
                   f=0.5 * randn(B, T - 1, n))
    return prob.to(dtype)


def _sparse_qp(prob: Problem):
    """P, h, Aeq, beq of the stacked QP; indices of the controls in z."""
    B, T, n, m = prob.sizes
    p = n + m
    C = prob.C.detach().double().cpu().numpy()
    P = sp.block_diag([C[b, t] for b in range(B) for t in range(T)], format="csc")
    h = prob.c.detach().double().cpu().numpy().reshape(-1)
    F = prob.F.detach().double().cpu().numpy()
    f = prob.f.detach().double().cpu().numpy()
    x0 = prob.x_init.detach().double().cpu().numpy()
    rows, beq = [], []
    eye_n = sp.identity(n, format="csr")
    for b in range(B):
        off = b * T * p
        # x_{b,0} = x_init_b
        rows.append(sp.hstack([sp.csr_matrix((n, off)), eye_n,
                               sp.csr_matrix((n, B * T * p - off - n))]))
        beq.append(x0[b])
        for t in range(T - 1):
            # F_t tau_t - x_{t+1} = -f_t
            blk = sp.hstack([sp.csr_matrix(F[b, t]), -eye_n])
            left = off + t * p
            rows.append(sp.hstack([sp.csr_matrix((n, left)), blk,
                                   sp.csr_matrix((n, B * T * p - left - p - n))]))
            beq.append(-f[b, t])
    Aeq = sp.vstack(rows, format="csc")
    u_idx = (np.arange(B * T)[:, None] * p + n + np.arange(m)[None, :]).reshape(-1)
    return P, h, Aeq, np.concatenate(beq), u_idx


@dataclass
class Reference:
    """Reference solution: x ``[B, T, n]``, u ``[B, T, m]``, objective ``[B]``, and the bound
    multipliers ``mu_lower``, ``mu_upper`` ``[B, T, m]`` (zero where a bound is infinite)."""

    x: Tensor
    u: Tensor
    objective: Tensor
    mu_lower: Tensor
    mu_upper: Tensor


def solve_reference(prob: Problem, lower=None, upper=None) -> Reference:
    """Solve the batch with cvxpy (Clarabel, tight tolerances; OSQP as a fallback), then polish
    the active set (``_polish``) so the answer is exact to rounding when the polish succeeds.

    Args:
        prob: the problem (any float dtype; solved in float64).
        lower, upper: None, floats or tensors broadcastable to ``[B, T, m]``.
    """
    if cp is None:
        pytest.skip("cvxpy is not installed")
    B, T, n, m = prob.sizes
    p = n + m
    P, h, Aeq, beq, u_idx = _sparse_qp(prob)
    z = cp.Variable(B * T * p)
    cons = [Aeq @ z == beq]
    lo = _bound_array(lower, B, T, m, -np.inf)
    hi = _bound_array(upper, B, T, m, np.inf)
    fin_lo, fin_hi = np.isfinite(lo), np.isfinite(hi)
    if fin_lo.any():
        cons.append(z[u_idx[fin_lo]] >= lo[fin_lo])
    if fin_hi.any():
        cons.append(z[u_idx[fin_hi]] <= hi[fin_hi])
    obj = 0.5 * cp.quad_form(z, cp.psd_wrap(P)) + h @ z
    qp = cp.Problem(cp.Minimize(obj), cons)
    try:
        qp.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12,
                 tol_ktratio=1e-10, max_iter=200)
    except cp.SolverError:
        qp.solve(solver=cp.OSQP, eps_abs=1e-12, eps_rel=1e-12, polish=True, max_iter=200000)
    if qp.status not in ("optimal", "optimal_inaccurate") or z.value is None:
        raise RuntimeError(f"reference solver failed: {qp.status}")
    z_val = z.value
    mu_lo, mu_hi = np.zeros(B * T * m), np.zeros(B * T * m)
    k = 1
    if fin_lo.any():
        mu_lo[fin_lo] = cons[k].dual_value
        k += 1
    if fin_hi.any():
        mu_hi[fin_hi] = cons[k].dual_value
    polished = _polish(P, h, Aeq, beq, u_idx, lo, hi, z_val, mu_lo, mu_hi)
    if polished is not None:
        z_val, mu_lo, mu_hi = polished
    zz = torch.as_tensor(z_val.reshape(B, T, p), dtype=torch.float64)
    C, c = prob.C.detach().double().cpu(), prob.c.detach().double().cpu()
    stage = 0.5 * torch.einsum("btp,btpq,btq->bt", zz, C, zz) + (c * zz).sum(-1)
    t64 = torch.float64
    return Reference(
        x=zz[..., :n], u=zz[..., n:], objective=stage.sum(-1),
        mu_lower=torch.as_tensor(mu_lo.reshape(B, T, m), dtype=t64),
        mu_upper=torch.as_tensor(mu_hi.reshape(B, T, m), dtype=t64))


def _polish(P, h, Aeq, beq, u_idx, lo, hi, z, mu_lo, mu_hi, tol: float = 1e-6):
    """Active-set polish of an interior-point solution (as OSQP's polish does): fix the controls
    the solver put at a bound, solve the equality-constrained KKT system exactly, and keep the
    result only if it is feasible and its bound multipliers have the right sign.

    Returns (z, mu_lower, mu_upper), or None if the polished point fails the checks.
    """
    u = z[u_idx]
    at_lo = np.isfinite(lo) & (u - lo <= tol * (1 + np.abs(lo)))
    at_hi = np.isfinite(hi) & (hi - u <= tol * (1 + np.abs(hi))) & ~at_lo
    act = np.flatnonzero(at_lo | at_hi)
    E = sp.csr_matrix((np.ones(act.size), (np.arange(act.size), u_idx[act])),
                      shape=(act.size, z.size))
    A = sp.vstack([Aeq, E], format="csc")
    b = np.concatenate([beq, np.where(at_lo, lo, hi)[act]])
    K = sp.bmat([[P, A.T], [A, None]], format="csc")
    sol = spla.spsolve(K, np.concatenate([-h, b]))
    zp, y = sol[:z.size], sol[z.size + Aeq.shape[0]:]
    # stationarity: P z + h + Aeq' y_eq - mu_lo + mu_hi = 0, so y_E = -mu_lo or +mu_hi
    new_lo, new_hi = np.zeros_like(mu_lo), np.zeros_like(mu_hi)
    new_lo[act] = np.where(at_lo[act], -y, 0.0)
    new_hi[act] = np.where(at_hi[act], y, 0.0)
    up = zp[u_idx]
    slack = 1e-12 * (1 + np.abs(up))
    feasible = bool(np.all(up >= np.where(np.isfinite(lo), lo, -np.inf) - slack)
                    and np.all(up <= np.where(np.isfinite(hi), hi, np.inf) + slack))
    if not (np.all(np.isfinite(zp)) and feasible and new_lo.min() >= -1e-9
            and new_hi.min() >= -1e-9):
        return None
    return zp, new_lo, new_hi


def _bound_array(b, B: int, T: int, m: int, default: float) -> np.ndarray:
    if b is None:
        return np.full(B * T * m, default)
    if isinstance(b, Tensor):
        return b.detach().double().cpu().expand(B, T, m).numpy().reshape(-1).copy()
    return np.full(B * T * m, float(b))


def active_fraction(ref: Reference, lower, upper, tol: float = 1e-7) -> float:
    """Fraction of the controls of ``ref`` at a bound."""
    B, T, m = ref.u.shape
    lo = torch.as_tensor(_bound_array(lower, B, T, m, -np.inf)).reshape(B, T, m)
    hi = torch.as_tensor(_bound_array(upper, B, T, m, np.inf)).reshape(B, T, m)
    at = (ref.u <= lo + tol) | (ref.u >= hi - tol)
    return float(at.double().mean())


def bound_for_fraction(prob: Problem, lo_frac: float = 0.3, hi_frac: float = 0.4,
                       grid: int = 25) -> tuple[float, Reference]:
    """A symmetric bound ``|u| <= b`` whose reference solution has ``lo_frac..hi_frac`` of the
    controls at a bound, found by bisection on b with the reference solver."""
    unc = solve_reference(prob)
    a, z = 0.0, float(unc.u.abs().max())
    for _ in range(grid):
        b = 0.5 * (a + z)
        ref = solve_reference(prob, -b, b)
        frac = active_fraction(ref, -b, b)
        if lo_frac <= frac <= hi_frac:
            return b, ref
        a, z = (b, z) if frac > hi_frac else (a, b)
    raise RuntimeError("no bound gives the requested active fraction")


@pytest.fixture
def make_problem():
    """Factory: ``make_problem(B, T, n, m, seed=0, dtype=torch.float64) -> Problem``."""
    return random_problem


@pytest.fixture
def reference():
    """Reference solver: ``reference(prob, lower=None, upper=None) -> Reference``."""
    return solve_reference


@pytest.fixture
def box_for_fraction():
    """``box_for_fraction(prob, lo=0.3, hi=0.4) -> (b, Reference)``: a bound ``|u| <= b``
    with that fraction of the reference's controls active."""
    return bound_for_fraction


@pytest.fixture
def fraction_active():
    """``fraction_active(ref, lower, upper) -> float``."""
    return active_fraction


@pytest.fixture(params=["native", "sequential", "time_parallel"])
def recursion(request, monkeypatch):
    """Runs a test three times: with the sequential Riccati recursions, compiled
    (``diffmpc.native``, the CPU default where a C compiler is found) and in PyTorch operations,
    and with their scans over time (``SolverOptions.time_parallel``, the CUDA default), whatever
    the options."""
    import diffmpc as dm
    from diffmpc import native

    if request.param == "native" and not native.available():
        pytest.skip(f"native kernels: {native.status()}")
    monkeypatch.setattr(native, "_enabled", request.param == "native")
    flag = request.param == "time_parallel"
    monkeypatch.setattr(dm.SolverOptions, "parallel_for", lambda self, x_init, T: flag)
    return request.param


@pytest.fixture
def one_control_case(make_problem):
    """``one_control_case(mode, B, seed, bad) -> (prob, C, kw)``: a one-control problem (n = 4,
    T = 7) whose sample ``bad`` has an indefinite control block at its last step, and the
    ``riccati`` keywords of a mode: "plain", "box" (|u| <= 0.3), "fixed" (a random free set),
    "box+reg", "reg+floor", "box+floor" (reg: random, zero for sample 0; floor 0.05)."""

    def case(mode: str, B: int, seed: int, bad: int):
        prob = make_problem(B, 7, 4, 1, seed=seed)
        T = prob.sizes[1]
        C = prob.C.clone()
        C[bad, -1, -1, -1] = -0.5
        g = torch.Generator().manual_seed(seed + 1)
        kw = {}
        if "box" in mode:
            kw.update(lower=torch.full((B, T, 1), -0.3, dtype=torch.float64),
                      upper=torch.full((B, T, 1), 0.3, dtype=torch.float64))
        if mode == "fixed":
            kw["free"] = torch.rand(B, T, 1, generator=g) > 0.3
        if "reg" in mode:
            kw["reg"] = torch.rand(B, generator=g, dtype=torch.float64) * (torch.arange(B) > 0)
        if "floor" in mode:
            kw["uu_floor"] = torch.full((B,), 0.05, dtype=torch.float64)
        return prob, C, kw

    return case
