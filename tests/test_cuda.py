"""The CUDA path: solutions and gradients computed on a GPU equal those computed on the CPU.

The CPU path is checked against independent references in the other test files (cvxpy,
L-BFGS-B, finite differences); here the same problems are solved on both devices and compared,
and ``gradcheck`` runs on the GPU itself (finite differences there). Every test is skipped where
CUDA is unavailable, as on CI; on a GPU machine run ``pytest tests/test_cuda.py``.
``DIFFMPC_TEST_DEVICE=cpu`` runs these tests with the CPU standing in for the GPU, which checks
only that they run.
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

import diffmpc as dm
from diffmpc.systems import Cartpole, Pendulum, TwoLinkArm

DEVICE = torch.device(os.environ.get("DIFFMPC_TEST_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                       reason="needs a CUDA device"),
]
CPU = torch.device("cpu")
DT = torch.float64
NAMES = ("x_init", "C", "c", "F", "f")


def lqr_leaves(prob, device, dtype=DT) -> list[torch.Tensor]:
    return [getattr(prob, k).to(device=device, dtype=dtype).clone().requires_grad_(True)
            for k in NAMES]


def solve_lqr(leaves, bound, **options):
    x_init, C, c, F, f = leaves
    n, p = x_init.shape[-1], C.shape[-1]
    kw = {"tol": 1e-11, "max_iter": 100, "unconverged": "raise", **options}
    lo, hi = (None, None) if bound is None else (-bound, bound)
    mpc = dm.MPC(n, p - n, C.shape[-3], lo, hi, **kw)
    return mpc(x_init, dm.QuadCost(C, c), dm.LinearDynamics(F, f))


def lqr_loss(sol, W):
    return (sol.u * W).sum() + sol.objective.sum() + (sol.x ** 2).sum()


def grads(loss, leaves) -> list[torch.Tensor]:
    return [g.cpu() for g in torch.autograd.grad(loss, leaves)]


def assert_close(a, b, atol, what: str):
    err = float((a.detach().cpu().to(DT) - b.detach().cpu().to(DT)).abs().max())
    assert err <= atol, f"{what}: max |cuda - cpu| = {err:.2e} > {atol:.0e}"


def assert_rel(ga, gb, rtol, what: str):
    for name, a, b in zip(NAMES, ga, gb, strict=True):
        rel = float((a.to(DT) - b.to(DT)).norm() / b.to(DT).norm().clamp_min(1e-300))
        assert rel <= rtol, f"{what}: gradient wrt {name} differs by {rel:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("backward", ["implicit", "gauss_newton", "unroll"])
@pytest.mark.parametrize("bound", [None, 0.4])
def test_lqr_solution_and_gradients_match_cpu(make_problem, bound, backward):
    prob = make_problem(8, 10, 4, 3, seed=3)
    W = torch.randn(8, 10, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
    out = {}
    for dev in (CPU, DEVICE):
        leaves = lqr_leaves(prob, dev)
        sol = solve_lqr(leaves, bound, backward=backward)
        assert sol.u.device.type == dev.type and sol.x.device.type == dev.type
        assert sol.converged.device.type == dev.type and bool(sol.converged.all())
        out[dev] = (sol, grads(lqr_loss(sol, W.to(dev)), leaves))
    (s_cpu, g_cpu), (s_dev, g_dev) = out[CPU], out[DEVICE]
    if bound is not None:  # the box matters: a good share of the controls sit at a bound
        at = (s_cpu.u.abs() >= bound - 1e-9).double().mean()
        assert 0.1 <= float(at) <= 0.9
    assert_close(s_dev.u, s_cpu.u, 1e-9, "u")
    assert_close(s_dev.x, s_cpu.x, 1e-9, "x")
    assert_close(s_dev.objective, s_cpu.objective, 1e-8, "objective")
    assert_rel(g_dev, g_cpu, 1e-8, f"{backward}, bound={bound}")


@pytest.mark.parametrize("bound", [None, 0.4])
def test_time_parallel_and_sequential_recursions_agree_on_the_gpu(make_problem, bound):
    """The CUDA default (scans over time) against the sequential recursions, both on the GPU,
    at a horizon with a partial last scan level."""
    prob = make_problem(32, 37, 5, 3, seed=4)
    W = torch.randn(32, 37, 3, generator=torch.Generator().manual_seed(3), dtype=DT).to(DEVICE)
    out = []
    for par in (True, False):
        leaves = lqr_leaves(prob, DEVICE)
        sol = solve_lqr(leaves, bound, time_parallel=par)
        out.append((sol, grads(lqr_loss(sol, W), leaves)))
    (s_par, g_par), (s_seq, g_seq) = out
    assert_close(s_par.u, s_seq.u, 1e-9, "u")
    assert_rel(g_par, g_seq, 1e-8, f"time_parallel, bound={bound}")


def test_float32_on_the_gpu_matches_float64_on_the_cpu(make_problem):
    prob = make_problem(16, 10, 4, 3, seed=5)
    W = torch.randn(16, 10, 3, generator=torch.Generator().manual_seed(2), dtype=DT)
    ref_leaves = lqr_leaves(prob, CPU)
    ref = solve_lqr(ref_leaves, 0.4)
    g_ref = grads(lqr_loss(ref, W), ref_leaves)
    leaves = lqr_leaves(prob, DEVICE, torch.float32)
    sol = solve_lqr(leaves, 0.4, tol=1e-5)
    assert sol.u.dtype == torch.float32 and bool(sol.converged.all())
    assert_close(sol.u, ref.u, 1e-3, "u (float32)")
    assert_rel(grads(lqr_loss(sol, W.to(DEVICE, torch.float32)), leaves), g_ref, 1e-3,
               "float32")


def test_gradcheck_box_lqr_on_the_gpu(make_problem):
    """Finite differences on the GPU itself; the bound leaves a margin (no ties under eps)."""
    prob = make_problem(2, 3, 2, 2, seed=1)
    leaves = lqr_leaves(prob, DEVICE)
    with torch.no_grad():
        u = solve_lqr(leaves, None).u
    bound = 0.7 * float(u.abs().max())
    sol = solve_lqr(leaves, bound)
    assert bool((sol.u.abs() >= bound - 1e-9).any()), "the box must be active"

    def fn(x_init, C_raw, c, F, f):
        s = solve_lqr([x_init, 0.5 * (C_raw + C_raw.mT), c, F, f], bound)
        return s.x, s.u, s.objective

    assert gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------- nonlinear


def make_system(name: str):
    if name == "arm":
        return TwoLinkArm(dtype=DT)
    return (Pendulum if name == "pendulum" else Cartpole)(dtype=DT)


def swingup_starts(name: str, B: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    th = (2 * torch.rand(B, generator=g, dtype=DT) - 1) * math.pi
    r = 0.3 * torch.randn(B, generator=g, dtype=DT)
    if name == "pendulum":
        return torch.stack([th.cos(), th.sin(), r], -1)
    if name == "arm":
        return torch.stack([th, -th, r, r], -1)
    return torch.stack([r, r, th.cos(), th.sin(), r], -1)


@pytest.mark.parametrize("name", ["pendulum", "cartpole", "arm"])
def test_nonlinear_solution_and_gradients_match_cpu(name):
    """Swing-ups (arm: reaching), T=20: controls, objective and the gradients of a loss on u into
    the physical parameters, the cost's parameters and x_init agree between the devices."""
    B, T = 6, 20
    x0 = swingup_starts(name, B)
    W = torch.randn(B, T, make_system(name).n_ctrl, generator=torch.Generator().manual_seed(3),
                    dtype=DT)
    out = {}
    for dev in (CPU, DEVICE):
        system = make_system(name).to(dev)
        cost = system.default_cost().to(dev)
        x_init = x0.to(dev).requires_grad_(True)
        mpc = dm.MPC(system.n_state, system.n_ctrl, T, system.u_lower, system.u_upper,
                     tol=1e-9, max_iter=200, unconverged="raise")
        sol = mpc(x_init, cost, system)
        leaves = [x_init, *(t for t in (*system.parameters(), *cost.parameters())
                            if t.requires_grad)]
        g = torch.autograd.grad((sol.u * W.to(dev)).sum(), leaves, allow_unused=True,
                                materialize_grads=True)
        out[dev] = (sol, [t.cpu() for t in g])
    (s_cpu, g_cpu), (s_dev, g_dev) = out[CPU], out[DEVICE]
    assert s_dev.u.device.type == DEVICE.type and bool(s_dev.converged.all())
    assert_close(s_dev.u, s_cpu.u, 1e-7, f"{name} u")
    assert_close(s_dev.objective, s_cpu.objective, 1e-8, f"{name} objective")
    for i, (a, b) in enumerate(zip(g_dev, g_cpu, strict=True)):
        rel = float((a - b).norm() / b.norm().clamp_min(1e-12))
        assert rel <= 1e-6, f"{name}: gradient of leaf {i} differs by {rel:.2e}"


def test_bound_tensors_and_warm_start_on_the_gpu():
    """Bounds as GPU tensors requiring grad, and a warm start from the previous solution."""
    system = Pendulum(dtype=DT).to(DEVICE)
    cost = system.default_cost().to(DEVICE)
    x_init = swingup_starts("pendulum", 4).to(DEVICE)
    T = 15
    lo = torch.full((4, T, 1), -1.5, dtype=DT, device=DEVICE, requires_grad=True)
    hi = torch.full((4, T, 1), 1.5, dtype=DT, device=DEVICE, requires_grad=True)
    mpc = dm.MPC(3, 1, T, lo, hi, tol=1e-9, max_iter=200, unconverged="raise")
    sol = mpc(x_init, cost, system)
    sol.u.sum().backward()
    assert lo.grad is not None and lo.grad.device.type == DEVICE.type
    assert float(lo.grad.abs().sum() + hi.grad.abs().sum()) > 0  # some controls at a bound
    again = mpc(x_init, cost, system, u_init=sol.u.detach())
    assert int(again.iterations.max()) <= 1
    assert_close(again.u, sol.u, 1e-8, "warm-started u")


def test_inputs_on_two_devices_raise_a_value_error(make_problem):
    if DEVICE.type == "cpu":
        pytest.skip("needs two devices")
    x_init, C, c, F, f = lqr_leaves(make_problem(2, 4, 3, 2), CPU)
    mpc = dm.MPC(3, 2, 4)
    with pytest.raises(ValueError, match="device"):
        mpc(x_init.to(DEVICE), dm.QuadCost(C, c), dm.LinearDynamics(F, f))


def pendulum_model() -> SimpleNamespace:
    """What MPCPolicy reads of an env's model, without the envs package (no Gymnasium needed)."""
    system = Pendulum(dtype=DT)
    return SimpleNamespace(dynamics=system, cost=system.default_cost(), n_state=3, n_ctrl=1,
                           horizon=10, u_lower=system.u_lower, u_upper=system.u_upper,
                           obs_to_state=lambda o: o, ctrl_to_action=lambda u: u / 2)


def test_policy_acts_from_numpy_with_a_gpu_model():
    policy = dm.MPCPolicy(pendulum_model(), max_iter=30).to(DEVICE)
    assert policy.u_lower.device.type == DEVICE.type
    obs = np.array([-0.995, 0.0998, 0.0])
    action = policy.act(obs)
    assert isinstance(action, np.ndarray) and action.shape == (1,) and action.dtype == np.float32
    ref = dm.MPCPolicy(pendulum_model(), max_iter=30).act(obs)  # the same policy on the CPU
    assert abs(float(action[0]) - float(ref[0])) <= 1e-6
