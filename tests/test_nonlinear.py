"""MPC on nonlinear systems: exact gradients, solutions against independent optimizers.

References, never diffmpc itself:
- central finite differences of the converged solution map (every perturbed problem re-solved
  to ``tol=1e-12``, warm-started at the unperturbed solution so it stays on the same branch);
- scipy's L-BFGS-B on the shooting formulation (controls only, with their bounds), whose
  gradient is autograd through a plain rollout of the model;
- the first-order optimality conditions of the shooting problem (projected gradient zero,
  multipliers of the active bounds of the right sign);
- mpc.pytorch (``mpc``) on the same problems with its example settings.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch import Tensor, nn
from torch.autograd import gradcheck

import diffmpc as dm
from diffmpc.systems import Cartpole, Pendulum, TwoLinkArm

DT = torch.float64
TIGHT = {"tol": 1e-12, "max_iter": 200}
FD_STEP = 1e-5
SYSTEMS = ["pendulum", "cartpole"]


# ----------------------------------------------------------------------------- helpers


def make_system(name: str, method: str = "euler") -> nn.Module:
    if name == "arm":
        return TwoLinkArm(dtype=DT)
    return (Pendulum if name == "pendulum" else Cartpole)(dtype=DT, method=method)


def starts(name: str, B: int, seed: int, spread: float = math.pi) -> Tensor:
    """``[B, n]`` swing-up starts: pole angles uniform in ``[-spread, spread]`` (0 is upright)."""
    g = torch.Generator().manual_seed(seed)
    th = (2 * torch.rand(B, generator=g, dtype=DT) - 1) * spread
    r = lambda s: s * torch.randn(B, generator=g, dtype=DT)  # noqa: E731
    if name == "arm":  # joint angles and rates
        th2 = (2 * torch.rand(B, generator=g, dtype=DT) - 1) * spread
        return torch.stack([th, th2, r(0.5), r(0.5)], -1)
    if name == "pendulum":
        return torch.stack([th.cos(), th.sin(), r(1.0)], -1)
    return torch.stack([r(0.5), r(0.5), th.cos(), th.sin(), r(0.5)], -1)


# Starts with free controls and no ties at the bounds (checked by ``assert_well_posed`` in every
# test that relies on it). Cartpole: swing-ups from 2.95, 1.31 and 2.64 rad. Pendulum: from
# farther than about 0.5 rad its torque limit makes almost every control saturate.
def exact_starts(name: str) -> Tensor:
    if name == "pendulum":
        return starts("pendulum", 6, seed=0, spread=0.5)[[2, 3, 5]]
    if name == "arm":
        return starts("arm", 3, seed=0, spread=1.5)[1:]
    return starts("cartpole", 6, seed=0)[[0, 1, 3]]


def solve(system, cost, x_init, T=20, lower=None, upper=None, u_init=None, backward="implicit",
          **options):
    """A tight MPC solve with the system's default bounds unless bounds are given."""
    lower = system.u_lower if lower is None else lower
    upper = system.u_upper if upper is None else upper
    kw = {**TIGHT, "unconverged": "raise", **options}
    mpc = dm.MPC(system.n_state, system.n_ctrl, T, lower, upper, backward=backward, **kw)
    return mpc(x_init, cost, system, u_init=u_init)


def shooting(system, cost, x_init: Tensor, u: Tensor) -> Tensor:
    """Objective ``[B]`` of controls ``u [B, T, m]``: a plain rollout of the model, then the cost."""
    xs = [x_init]
    for t in range(u.shape[1] - 1):
        xs.append(system(xs[-1], u[:, t]))
    x = torch.stack(xs, 1)
    return cost(x, u).sum(-1)


def shooting_grad(system, cost, x_init: Tensor, u: Tensor) -> Tensor:
    """``dJ/du [B, T, m]`` of the shooting objective (autograd through the rollout)."""
    u = u.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(shooting(system, cost, x_init.detach(), u).sum(), u)
    return g


def assert_well_posed(system, cost, x_init, sol, lower, upper, min_free=0.2, margin=1e-4):
    """The solution is a strict KKT point of the shooting problem with free controls:
    zero gradient on the free controls, gradients of the right sign and away from zero on the
    active ones (no ties), free controls away from the bounds."""
    u = sol.u.detach()
    lo, hi = lower.detach().expand_as(u), upper.detach().expand_as(u)
    at_lo, at_hi = u <= lo + 1e-9, u >= hi - 1e-9
    free = ~(at_lo | at_hi)
    g = shooting_grad(system, cost, x_init, u)
    assert bool(sol.converged.all())
    assert float(free[:, :-1].double().mean()) >= min_free, "too few free controls"
    assert float(g[free].abs().max()) <= 1e-9, "not stationary on the free controls"
    if bool((at_lo | at_hi).any()):
        assert float(torch.cat([g[at_lo], -g[at_hi]]).min()) >= margin, "a tie at a bound"
    dist = torch.minimum(u - lo, hi - u)[free]
    assert float(dist.min()) >= 1e-3, "a free control next to a bound"


def loss_weights(sol_u: Tensor, seed: int = 7) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sol_u.shape, generator=g, dtype=DT)


def random_like(tensors, seed: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in tensors]


def fd_directional(loss_fn, tensors, dirs, h: float = FD_STEP) -> float:
    """Central difference of ``loss_fn()`` along ``dirs``, perturbing ``tensors`` in place."""
    saved = [t.detach().clone() for t in tensors]
    vals = []
    with torch.no_grad():
        for s in (1.0, -1.0):
            for t, d, t0 in zip(tensors, dirs, saved, strict=True):
                t.copy_(t0 + s * h * d)
            vals.append(float(loss_fn()))
        for t, t0 in zip(tensors, saved, strict=True):
            t.copy_(t0)
    return (vals[0] - vals[1]) / (2 * h)


def analytic_directional(grads, dirs) -> float:
    return float(sum((g * d).sum() for g, d in zip(grads, dirs, strict=True)))


def rel_err(a: float | Tensor, b: float | Tensor) -> float:
    a, b = torch.as_tensor(a, dtype=DT), torch.as_tensor(b, dtype=DT)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


class Problem:
    """A nonlinear MPC instance whose loss ``sum(W * sol.u)`` is a function of its tensors."""

    def __init__(self, name: str, x_init: Tensor, T: int = 20, cost=None, lower=None, upper=None,
                 method: str = "euler", system=None):
        self.system = make_system(name, method) if system is None else system
        self.cost = self.system.default_cost() if cost is None else cost
        self.x_init = x_init.clone().requires_grad_(True)
        self.T = T
        self.lower = self.system.u_lower if lower is None else lower
        self.upper = self.system.u_upper if upper is None else upper
        self.sol = solve(self.system, self.cost, self.x_init, T, self.lower, self.upper)
        self.W = loss_weights(self.sol.u)
        self.u_star = self.sol.u.detach()

    def loss(self, backward: str = "implicit", warm: bool = True, **options) -> Tensor:
        sol = solve(self.system, self.cost, self.x_init, self.T, self.lower, self.upper,
                    u_init=self.u_star if warm else None, backward=backward, **options)
        return (self.W * sol.u).sum()

    def grads(self, tensors, backward: str = "implicit", **options) -> list[Tensor]:
        loss = self.loss(backward, warm=False, **options)
        return list(torch.autograd.grad(loss, tensors, allow_unused=True, materialize_grads=True))

    def check_directional(self, tensors, seeds=(1, 2), backward="implicit") -> list[float]:
        """Relative errors of ``<grad, v>`` against central differences for random ``v``."""
        grads = self.grads(tensors, backward)
        errs = []
        for seed in seeds:
            dirs = random_like(tensors, seed)
            fd = fd_directional(self.loss, tensors, dirs)
            errs.append(rel_err(analytic_directional(grads, dirs), fd))
        return errs

    def well_posed(self, **kw) -> None:
        assert_well_posed(self.system, self.cost, self.x_init, self.sol,
                          torch.as_tensor(self.lower), torch.as_tensor(self.upper), **kw)


# ------------------------------------------------------------------ exactness of the gradient


@pytest.mark.parametrize("method", ["euler", "rk4"])
@pytest.mark.parametrize("name", SYSTEMS)
@pytest.mark.usefixtures("recursion")
def test_gradient_wrt_dynamics_parameters_matches_fd(name, method):
    prob = Problem(name, exact_starts(name), method=method)
    prob.well_posed()
    params = list(prob.system.parameters())
    grads = prob.grads(params)
    for p, g in zip(params, grads, strict=True):
        fd = fd_directional(prob.loss, [p], [torch.ones_like(p)])
        assert rel_err(g.sum(), fd) <= 1e-5, (name, p.shape, float(g.sum()), fd)


@pytest.mark.parametrize("name", SYSTEMS)
@pytest.mark.usefixtures("recursion")
def test_double_backward_wrt_dynamics_parameters_matches_fd(name):
    """Second derivatives through the implicit backward: the derivative in x_init of
    ``||dL/d params||^2`` (the physical parameters) against central differences of that first
    derivative. It needs the solution's and the costate's own dependence on x_init inside the
    backward's graph (the first derivative goes through the Jacobians and the curvature at the
    solution)."""
    x0 = exact_starts(name)
    prob = Problem(name, x0)
    prob.well_posed()
    params = list(prob.system.parameters())
    d = random_like([x0], 3)[0]

    def grad_norm(x_init, create_graph=False):
        sol = solve(prob.system, prob.cost, x_init, prob.T, prob.lower, prob.upper,
                    u_init=prob.u_star)
        gs = torch.autograd.grad((prob.W * sol.u).sum() + sol.u.square().sum(), params,
                                 create_graph=create_graph)
        return sum(g.square().sum() for g in gs)

    x = x0.clone().requires_grad_(True)
    (h,) = torch.autograd.grad(grad_norm(x, create_graph=True), x)
    fd = (grad_norm(x0 + FD_STEP * d) - grad_norm(x0 - FD_STEP * d)) / (2 * FD_STEP)
    got = float((h * d).sum())
    assert rel_err(got, float(fd)) <= 1e-5, (got, float(fd))


@pytest.mark.usefixtures("recursion")
def test_double_backward_wrt_bound_tensors_matches_fd():
    """The pendulum with 30 % of its controls at a bound: the derivative in x_init of
    ``||dL/d(bounds)||^2``, the bounds being tensors (they enter the solution through the held
    controls)."""
    system = make_system("pendulum")
    x0 = exact_starts("pendulum")
    T = 20
    lo, hi = (torch.full((x0.shape[0], T, 1), v, dtype=DT, requires_grad=True)
              for v in (float(system.u_lower), float(system.u_upper)))
    sol = solve(system, system.default_cost(), x0, T, lo, hi)
    assert_well_posed(system, system.default_cost(), x0, sol, lo, hi)
    held = (sol.u.detach() - lo.detach()).abs().le(1e-9) | (sol.u.detach() - hi.detach()).abs().le(1e-9)
    assert 0.1 <= float(held.double().mean()) <= 0.6
    W, u_star, d = loss_weights(sol.u), sol.u.detach(), random_like([x0], 3)[0]

    def grad_norm(x_init, create_graph=False):
        s = solve(system, system.default_cost(), x_init, T, lo, hi, u_init=u_star)
        gs = torch.autograd.grad((W * s.u).sum() + s.u.square().sum(), [lo, hi],
                                 create_graph=create_graph)
        return sum(g.square().sum() for g in gs)

    x = x0.clone().requires_grad_(True)
    (h,) = torch.autograd.grad(grad_norm(x, create_graph=True), x)
    fd = (grad_norm(x0 + FD_STEP * d) - grad_norm(x0 - FD_STEP * d)) / (2 * FD_STEP)
    assert rel_err(float((h * d).sum()), float(fd)) <= 1e-5, (float((h * d).sum()), float(fd))


@pytest.mark.usefixtures("recursion")
def test_double_backward_with_a_parameter_shared_by_cost_and_dynamics():
    """A parameter read by both the cost and the dynamics: its second derivatives (through
    the solution's dependence on it) must count it once."""

    class Dyn(nn.Module):
        def __init__(self, a):
            super().__init__()
            self.a = a

        def forward(self, x, u):
            return x + 0.1 * torch.stack([x[..., 1], torch.sin(x[..., 0]) * self.a + u[..., 0]], -1)

    class Cost(nn.Module):
        def __init__(self, a):
            super().__init__()
            self.a = a

        def forward(self, x, u):
            return self.a.square() * x.square().sum(-1) + 0.5 * u.square().sum(-1) + x[..., 0]

    a = nn.Parameter(torch.tensor(0.7, dtype=DT))
    dyn, cost = Dyn(a), Cost(a)
    x0 = torch.tensor([[0.3, -0.2], [-0.1, 0.4]], dtype=DT)
    W = torch.randn(2, 6, 1, generator=torch.Generator().manual_seed(0), dtype=DT)
    d = random_like([x0], 4)[0]

    def grad_norm(x_init, create_graph=False):
        mpc = dm.MPC(2, 1, 6, **TIGHT, unconverged="raise")
        sol = mpc(x_init, cost, dyn)
        (g,) = torch.autograd.grad((W * sol.u).sum() + sol.u.square().sum(), a,
                                   create_graph=create_graph)
        return g.square()

    x = x0.clone().requires_grad_(True)
    (h,) = torch.autograd.grad(grad_norm(x, create_graph=True), x)
    fd = (grad_norm(x0 + FD_STEP * d) - grad_norm(x0 - FD_STEP * d)) / (2 * FD_STEP)
    assert rel_err(float((h * d).sum()), float(fd)) <= 1e-5, (float((h * d).sum()), float(fd))


@pytest.mark.parametrize("name", SYSTEMS)
@pytest.mark.usefixtures("recursion")
def test_gradient_wrt_cost_parameters_and_x_init_matches_fd(name):
    prob = Problem(name, exact_starts(name))
    prob.well_posed()
    cost_params = list(prob.cost.parameters())
    assert len(cost_params) == 3  # goal, state weights, control weight
    for tensors in (cost_params, [prob.x_init]):
        errs = prob.check_directional(tensors)
        assert max(errs) <= 1e-5, errs


@pytest.mark.usefixtures("recursion")
def test_gradients_match_fd_two_link_arm_reaching():
    """Two controls (the box QP with several controls), RK4 dynamics and a cost that is not
    quadratic in the state (forward kinematics), every parameter learnable."""
    system = make_system("arm")
    cost = system.default_cost(learn_target=True)
    prob = Problem("arm", exact_starts("arm"), cost=cost, system=system)
    prob.well_posed(min_free=0.5)
    for tensors in (list(system.parameters()), list(cost.parameters()), [prob.x_init]):
        errs = prob.check_directional(tensors, seeds=(1,))
        assert max(errs) <= 1e-5, errs


def test_gauss_newton_gradient_differs_on_pendulum_mass_and_length():
    """The Gauss-Newton backward (mpc.pytorch's) drops the dynamics' curvature: on the pendulum
    its gradients w.r.t. the mass and length are off by more than 1e-3 (relative), while the
    implicit ones match finite differences."""
    prob = Problem("pendulum", exact_starts("pendulum"))
    prob.well_posed()
    sysm = prob.system
    exact = prob.grads([sysm.log_m, sysm.log_l], "implicit")
    gn = prob.grads([sysm.log_m, sysm.log_l], "gauss_newton")
    for p, ge, gg in zip((sysm.log_m, sysm.log_l), exact, gn, strict=True):
        fd = fd_directional(prob.loss, [p], [torch.ones_like(p)])
        assert rel_err(ge, fd) <= 1e-5
        assert rel_err(gg, fd) > 1e-3, f"Gauss-Newton error {rel_err(gg, fd):.3g}"


@pytest.mark.usefixtures("recursion")
def test_gradcheck_small_nonlinear():
    """gradcheck on T=4, B=2 w.r.t. x_init and the diagonal of a QuadCost, pendulum dynamics."""
    sysm = Pendulum(dtype=DT)
    x_init = torch.tensor([[math.cos(0.3), math.sin(0.3), -0.2],
                           [math.cos(-0.5), math.sin(-0.5), 0.4]], dtype=DT)
    q = torch.tensor([1.0, 1.0, 0.1, 0.05], dtype=DT)
    c = torch.tensor([-1.0, 0.0, 0.0, 0.0], dtype=DT)

    def fn(x_init, q, c):
        sol = solve(sysm, dm.QuadCost(torch.diag(q), c), x_init, T=4)
        return sol.u, sol.x

    sol_u, _ = fn(x_init, q, c)
    assert float(sol_u[:, :-1].detach().abs().max()) < 1.9  # every control strictly inside [-2, 2]
    inputs = tuple(t.clone().requires_grad_(True) for t in (x_init, q, c))
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", SYSTEMS)
def test_unrolled_and_implicit_gradients_agree_when_converged(name):
    prob = Problem(name, exact_starts(name))
    tensors = [*prob.system.parameters(), *prob.cost.parameters(), prob.x_init]
    g_imp = prob.grads(tensors, "implicit")
    g_unr = prob.grads(tensors, "unroll")
    for a, b in zip(g_imp, g_unr, strict=True):
        assert rel_err(b, a) <= 1e-6


def test_batch_stored_batch_last_matches_fd_and_unrolling():
    """From ``_SOA_MIN_BATCH`` samples on a CPU, the one-control Riccati pass stores its steps
    batch-last (with autograd recording it in unrolled mode): the gradients still match central
    differences and agree with unrolling."""
    from diffmpc import lqr

    B = lqr._SOA_MIN_BATCH + 2
    x0 = exact_starts("pendulum").repeat(B, 1)[:B]
    x0 = x0 + 0.01 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=DT)
    prob = Problem("pendulum", x0)
    tensors = [*prob.system.parameters(), *prob.cost.parameters(), prob.x_init]
    for a, b in zip(prob.grads(tensors, "implicit"), prob.grads(tensors, "unroll"), strict=True):
        assert rel_err(b, a) <= 1e-6
    assert max(prob.check_directional(tensors, seeds=(1,))) <= 1e-5


@pytest.mark.usefixtures("recursion")
def test_gradient_wrt_bound_tensors_matches_fd():
    """u_lower / u_upper tensors requiring grad, with controls active at both bounds."""
    x_init = starts("pendulum", 6, seed=0, spread=1.5)[[2, 4]]
    B, T = 2, 20
    lower = torch.full((B, T, 1), -2.0, dtype=DT) + 0.1 * torch.rand(
        B, T, 1, generator=torch.Generator().manual_seed(3), dtype=DT)
    upper = -lower.flip(1) + 0.4
    lower.requires_grad_(True)
    upper.requires_grad_(True)
    prob = Problem("pendulum", x_init, T, lower=lower, upper=upper)
    prob.well_posed(min_free=0.3)
    u = prob.u_star
    assert bool((u <= lower.detach() + 1e-9).any()) and bool((u >= upper.detach() - 1e-9).any())
    errs = prob.check_directional([lower, upper])
    assert max(errs) <= 1e-5, errs
    g_lo, g_hi = prob.grads([lower, upper])
    free = (u > lower.detach() + 1e-9) & (u < upper.detach() - 1e-9)
    assert float(g_lo[free].abs().max()) == 0.0 and float(g_hi[free].abs().max()) == 0.0


@pytest.mark.parametrize("name", SYSTEMS)
def test_gradients_reach_every_tensor_and_parameter(name):
    prob = Problem(name, exact_starts(name))
    lower = prob.system.u_lower.expand(3, 20, 1).clone().requires_grad_(True)
    upper = prob.system.u_upper.expand(3, 20, 1).clone().requires_grad_(True)
    prob.lower, prob.upper = lower, upper
    tensors = [*prob.system.parameters(), *prob.cost.parameters(), prob.x_init, lower, upper]
    grads = torch.autograd.grad(prob.loss(warm=False), tensors, allow_unused=True)
    for t, g in zip(tensors, grads, strict=True):
        assert g is not None and g.shape == t.shape
    for g in grads[:-2]:
        assert float(g.abs().max()) > 0
    u = prob.u_star
    for g, active in ((grads[-2], u <= lower.detach() + 1e-9), (grads[-1], u >= upper.detach() - 1e-9)):
        assert float(g[~active].abs().max()) == 0.0  # only active bounds move the solution
        assert bool((g[active] != 0).all())


# --------------------------------------------------------------------- batching, non-convexity


@pytest.mark.parametrize("name", SYSTEMS)
def test_batched_equals_one_by_one(name):
    x_all = starts(name, 4, seed=11, spread=1.0)
    sysm, cost = make_system(name), None
    cost = sysm.default_cost()
    tensors = [*sysm.parameters(), *cost.parameters()]

    def run(x):
        x = x.clone().requires_grad_(True)
        sol = solve(sysm, cost, x, max_iter=300)
        W = loss_weights(sol.u[:1], seed=5)
        grads = torch.autograd.grad((W * sol.u).sum(), [x, *tensors])
        return sol, grads

    batch, g_batch = run(x_all)
    ones = [run(x_all[i:i + 1]) for i in range(4)]
    torch.testing.assert_close(batch.u, torch.cat([s.u for s, _ in ones]), rtol=0, atol=1e-9)
    torch.testing.assert_close(batch.x, torch.cat([s.x for s, _ in ones]), rtol=0, atol=1e-9)
    torch.testing.assert_close(batch.objective, torch.cat([s.objective for s, _ in ones]))
    assert batch.iterations.tolist() == [int(s.iterations) for s, _ in ones]
    torch.testing.assert_close(g_batch[0], torch.cat([g[0] for _, g in ones]), rtol=1e-7,
                               atol=1e-9)
    for k in range(1, len(g_batch)):
        torch.testing.assert_close(g_batch[k], sum(g[k] for _, g in ones), rtol=1e-7, atol=1e-9)


class WavyCost(nn.Module):
    """Non-convex: the pendulum's goal cost plus ``a cos(b thdot)`` (negative curvature in the
    angular rate near thdot = 0) and a learnable weight ``a``."""

    def __init__(self, goal_cost: nn.Module, a: float = 0.2, b: float = 2.0) -> None:
        super().__init__()
        self.goal_cost = goal_cost
        self.a = nn.Parameter(torch.tensor(a, dtype=DT))
        self.b = b

    def forward(self, x: Tensor, u: Tensor) -> Tensor:
        return self.goal_cost(x, u) + self.a * torch.cos(self.b * x[..., 2])


def test_cost_modules_search_on_the_compiled_rollouts():
    """With a cost module (not a QuadCost) the built-in model's line-search rollouts still run
    compiled (``native.model_rollout``), the costs by the module: the same iterates as with the
    model's PyTorch steps, to rounding."""
    from diffmpc import native

    if not native.available():
        pytest.skip(f"native kernels: {native.status()}")
    sysm = Pendulum(dtype=DT)
    cost = WavyCost(sysm.default_cost(learn_goal=False, learn_weights=False))
    x_init = starts("pendulum", 12, seed=4)
    mpc = dm.MPC(3, 1, 20, sysm.u_lower, sysm.u_upper, unconverged="keep")
    calls, real = [], native.model_rollout

    def spy(*a, **k):
        calls.append(len(a) > 5 and a[5] is not None)  # K given: a closed-loop rollout
        return real(*a, **k)

    out = []
    for on in (True, False):
        with torch.no_grad(), native.enabled(on), pytest.MonkeyPatch.context() as mp:
            mp.setattr(native, "model_rollout", spy)
            out.append(mpc(x_init, cost, sysm))
    assert any(calls)
    a, b = out
    assert torch.equal(a.iterations, b.iterations) and bool(a.converged.all())
    torch.testing.assert_close(a.u, b.u, rtol=1e-9, atol=1e-9)


@pytest.mark.usefixtures("recursion")
def test_nonconvex_cost_converges_to_a_kkt_point_with_exact_gradients():
    sysm = Pendulum(dtype=DT)
    cost = WavyCost(sysm.default_cost(learn_goal=False, learn_weights=False))
    # the stage Hessian in thdot is 0.1 - a b^2 cos(b thdot) = -0.7 at thdot = 0
    x_init = exact_starts("pendulum")
    prob = Problem("pendulum", x_init, cost=cost)
    prob.well_posed(min_free=0.25)
    x = prob.sol.x.detach()
    assert float((0.1 - 0.8 * torch.cos(2.0 * x[..., 2])).min()) < 0  # non-convex on the path
    errs = prob.check_directional([cost.a, prob.x_init])
    assert max(errs) <= 1e-5, errs


@pytest.mark.parametrize("case", ["pendulum-goal", "cartpole-goal", "pendulum-wavy", "arm-reach"])
def test_newton_converges_fast_from_a_nearby_start(case):
    """Warm-started at the solution of a problem whose parameters then move by 1e-5, Newton's
    method is in its quadratic regime: a few iterations reach tol=1e-12 (3 for the convex costs).

    A regression test for the non-convex costs (pendulum-wavy, arm-reach): when the forward solve
    raised the cost's Hessian eigenvalues to ``psd_floor`` at every stage, also in Newton steps,
    convergence near a solution was linear (rate about 1/2; up to 32 and 19 iterations here).
    """
    name, kind = case.split("-")
    system = make_system(name)
    cost = {"goal": system.default_cost, "reach": system.default_cost,
            "wavy": lambda: WavyCost(system.default_cost())}[kind]()
    x_init = starts("arm", 3, seed=0, spread=1.5) if name == "arm" else exact_starts(name)
    prob = Problem(name, x_init, cost=cost, system=system)
    with torch.no_grad():
        p = next(system.parameters())
        p.add_(1e-5)
        sol = solve(system, cost, prob.x_init, u_init=prob.u_star, unconverged="keep")
    assert bool(sol.converged.all())
    assert int(sol.iterations.max()) <= 6, sol.iterations.tolist()


# ------------------------------------------------------------- against independent optimizers


def lbfgsb(system, cost, x_init: Tensor, u0: Tensor, lower: float, upper: float) -> Tensor:
    """Solve the shooting problem of one sample (``x_init [1, n]``, ``u0 [1, T, m]``)."""
    shape = u0.shape

    def fun(z):
        u = torch.as_tensor(z, dtype=DT).reshape(shape).requires_grad_(True)
        J = shooting(system, cost, x_init, u).sum()
        (g,) = torch.autograd.grad(J, u)
        return float(J.detach()), g.reshape(-1).numpy().astype(np.float64)

    res = minimize(fun, u0.reshape(-1).numpy(), jac=True, method="L-BFGS-B",
                   bounds=[(lower, upper)] * u0.numel(),
                   options={"maxiter": 20000, "maxcor": 50, "ftol": 0.0, "gtol": 1e-13})
    return torch.as_tensor(res.x, dtype=DT).reshape(shape)


@pytest.mark.parametrize("name", SYSTEMS)
def test_solution_matches_lbfgsb(name):
    sysm = make_system(name)
    cost = sysm.default_cost(learn_goal=False, learn_weights=False)
    for p in sysm.parameters():
        p.requires_grad_(False)
    seed, spread = (0, 0.5) if name == "pendulum" else (4, 1.0)
    x_init = starts(name, 3, seed=seed, spread=spread)
    T = 10
    sol = solve(sysm, cost, x_init, T)
    lo, hi = float(sysm.u_lower), float(sysm.u_upper)
    assert float(((sol.u > lo + 1e-9) & (sol.u < hi - 1e-9)).double().mean()) >= 0.5
    for i in range(3):
        u_ref = lbfgsb(sysm, cost, x_init[i:i + 1], torch.zeros_like(sol.u[i:i + 1]), lo, hi)
        if float((u_ref - sol.u[i]).abs().max()) > 1e-5:
            # another local minimum: ours must be no worse, and a local minimum too
            J_ref = shooting(sysm, cost, x_init[i:i + 1], u_ref)
            assert float(sol.objective[i]) <= float(J_ref) + 1e-9
            kick = 1e-2 * torch.randn(sol.u[i:i + 1].shape, dtype=DT,
                                      generator=torch.Generator().manual_seed(i))
            u_ref = lbfgsb(sysm, cost, x_init[i:i + 1], (sol.u[i:i + 1] + kick).clamp(lo, hi),
                           lo, hi)
        assert float((u_ref - sol.u[i]).abs().max()) <= 1e-5, i


# ------------------------------------------------------------------------- against mpc.pytorch


def mpc_pytorch_solve(name: str, x_init: Tensor, T: int):
    """mpc.pytorch with its examples' settings; returns its controls ``[B, T, m]``."""
    mpcpt = pytest.importorskip("mpc.mpc")
    if name == "pendulum":
        from mpc.env_dx.pendulum import PendulumDx

        dx = PendulumDx(params=torch.tensor((10.0, 1.0, 1.0), dtype=DT))
    else:
        from mpc.env_dx.cartpole import CartpoleDx

        dx = CartpoleDx(params=torch.tensor((9.8, 1.0, 0.1, 0.5), dtype=DT))
    q, p = dx.get_true_obj()
    B, n = x_init.shape
    C = torch.diag(q).to(DT).expand(T, B, n + 1, n + 1)
    c = p.to(DT).expand(T, B, n + 1)
    ctrl = mpcpt.MPC(n, 1, T, u_lower=dx.lower, u_upper=dx.upper, lqr_iter=50, verbose=-1,
                     exit_unconverged=False, detach_unconverged=False,
                     linesearch_decay=dx.linesearch_decay,
                     max_linesearch_iter=dx.max_linesearch_iter,
                     grad_method=mpcpt.GradMethods.AUTO_DIFF, eps=dx.mpc_eps, n_batch=B)
    _, u, _ = ctrl(x_init, mpcpt.QuadCost(C, c), dx)
    return u.detach().transpose(0, 1)


@pytest.mark.reference
@pytest.mark.slow
@pytest.mark.parametrize("second_order", [True, False])
@pytest.mark.parametrize("name", SYSTEMS)
def test_objective_no_worse_than_mpc_pytorch(name, second_order):
    """Default solver options (max_iter=50, as mpc.pytorch's lqr_iter=50), swing-up starts, in
    both forward modes (Newton once the iterate is close, and Gauss-Newton throughout). Newton
    steps taken far from a solution made this fail on the cartpole (3 of 16 samples far from a
    minimum after 50 iterations) before the per-sample Newton/Gauss-Newton switch.
    """
    T, B = 20, 16
    x_init = starts(name, B, seed=0)
    sysm = make_system(name)
    cost = sysm.default_cost(learn_goal=False, learn_weights=False)
    mpc = dm.MPC(sysm.n_state, 1, T, sysm.u_lower, sysm.u_upper, unconverged="keep",
                 second_order=second_order)
    u_ours, u_theirs = mpc(x_init, cost, sysm).u, mpc_pytorch_solve(name, x_init, T)
    with torch.no_grad():
        ours = shooting(sysm, cost, x_init, u_ours)
        theirs = shooting(sysm, cost, x_init, u_theirs)
    worse = (ours > theirs + 1e-6).nonzero().flatten().tolist()
    assert not worse, {i: (float(ours[i]), float(theirs[i])) for i in worse}


@pytest.mark.reference
@pytest.mark.slow
def test_long_horizon_pendulum_objective_no_worse_than_mpc_pytorch():
    """T = 50 from the default guess: Newton steps from the second iteration (with
    ``gauss_newton_iters=0``) left 2 of these 64 samples in a worse local minimum than
    mpc.pytorch's Gauss-Newton iterations reach (6 of 64 with seed 1); the early Gauss-Newton
    iterations keep every sample at or below it."""
    T, B = 50, 64
    x_init = starts("pendulum", B, seed=0)
    sysm = make_system("pendulum")
    cost = sysm.default_cost(learn_goal=False, learn_weights=False)
    mpc = dm.MPC(sysm.n_state, 1, T, sysm.u_lower, sysm.u_upper, unconverged="keep")
    sol = mpc(x_init, cost, sysm)
    u_theirs = mpc_pytorch_solve("pendulum", x_init, T)
    with torch.no_grad():
        ours = shooting(sysm, cost, x_init, sol.u)
        theirs = shooting(sysm, cost, x_init, u_theirs)
    assert bool(sol.converged.all())
    worse = (ours > theirs + 1e-6).nonzero().flatten().tolist()
    assert not worse, {i: (float(ours[i]), float(theirs[i])) for i in worse}


# ------------------------------------------------------------------ the benchmark scripts run


def _load_script(name: str):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.reference
def test_nonlinear_speed_script_tiny(tmp_path, capsys):
    pytest.importorskip("mpc")
    out = tmp_path / "table.md"
    rows = _load_script("nonlinear_speed").main(
        ["--systems", "pendulum", "--sizes", "1x5", "--reps", "1", "--out", str(out)])
    assert len(rows) == 1 and rows[0]["d_conv"] == 1.0 and rows[0]["no_worse"] == 1.0
    table = out.read_text().splitlines()
    assert len(table) == 5 and table[2].startswith("| system | T | B |")
    assert "system=pendulum  T=5  B=1" in capsys.readouterr().out


def test_nonlinear_speed_script_autograd_flag_solves_the_same():
    """``--autograd`` times the same solves with the model's derivatives formed by autograd."""
    script = _load_script("nonlinear_speed")
    args = ["--systems", "cartpole", "--sizes", "3x6", "--reps", "1", "--no-reference"]
    closed, auto = script.main(args)[0], script.main(args + ["--autograd"])[0]
    assert closed["d_iter"] == auto["d_iter"] and closed["d_conv"] == auto["d_conv"] == 1.0
    assert abs(closed["d_obj"] - auto["d_obj"]) <= 1e-9 * abs(closed["d_obj"])


def test_implicit_vs_unroll_script_tiny(tmp_path):
    out = tmp_path / "table.md"
    rows = _load_script("implicit_vs_unroll").main(
        ["--system", "pendulum", "--iters", "1,2", "-B", "2", "-T", "5", "--reps", "1",
         "--out", str(out)])
    assert [r["k"] for r in rows] == [1, 2]
    assert all(r["unr_mb"] > 0 and r["imp_mb"] > 0 for r in rows)
    assert len(out.read_text().splitlines()) == 6


def _cartpole_swing_ups(B: int, seed: int, monkeypatch):
    """Solves of cartpole swing-ups over T = 50 (``starts``) with ``max_iter`` iterations, and the
    batch sizes of the Riccati passes and the Newton flags of the ``_gains`` calls they made.
    Without the early Gauss-Newton iterations (``gauss_newton_iters=0``): Newton steps may come
    from iteration 2, whose fallbacks the tests below check."""
    import diffmpc.ilqr as ilqr_module

    passes, flags = [], []
    riccati, gains = ilqr_module.riccati, ilqr_module._gains
    raw = ilqr_module.raw_scalar_pass

    def recording_riccati(C, *args, **kwargs):
        passes.append(C.shape[0])
        return riccati(C, *args, **kwargs)

    def recording_raw(C, c, *args, **kwargs):  # the compiled one-control pass (or None)
        out = raw(C, c, *args, **kwargs)
        if out is not None:
            passes.append(c.shape[0])
        return out

    def recording_gains(*args):
        flags.append(args[10].clone())  # newton
        return gains(*args)

    monkeypatch.setattr(ilqr_module, "riccati", recording_riccati)
    monkeypatch.setattr(ilqr_module, "raw_scalar_pass", recording_raw)
    monkeypatch.setattr(ilqr_module, "_gains", recording_gains)
    system = make_system("cartpole")
    x_init = starts("cartpole", B, seed=seed)

    def solve(max_iter):
        passes.clear()
        flags.clear()
        mpc = dm.MPC(system.n_state, 1, 50, system.u_lower, system.u_upper, max_iter=max_iter,
                     unconverged="keep", gauss_newton_iters=0)
        with torch.no_grad():
            return mpc(x_init, system.default_cost().quad_cost(), system)

    return solve, passes, flags


def test_failed_newton_step_of_a_single_sample_falls_back_in_the_same_iteration(monkeypatch):
    """One cartpole swing-up over T = 50 whose first Newton step (iteration 2) finds no lower
    cost: it must take the Gauss-Newton step of the same expansion in that iteration (a second
    Riccati pass), not stand still: the failed samples are the whole batch."""
    solve, passes, _ = _cartpole_swing_ups(1, 0, monkeypatch)
    u1 = solve(1).u
    sol = solve(2)
    # iteration 1: Gauss-Newton; iteration 2: Newton, then Gauss-Newton
    assert passes == [1, 1, 1]
    assert bool((sol.u != u1).any())


def test_few_failed_newton_steps_take_gauss_newton_in_the_next_iteration(monkeypatch):
    """Cartpole swing-ups over T = 50, B = 16: in iteration 2 (the first with Newton steps) a few
    Newton steps find no lower cost. With the rest of the batch moving on, those samples wait
    (no second Riccati pass in that iteration) and take Gauss-Newton steps in iteration 3."""
    solve, passes, flags = _cartpole_swing_ups(16, 3, monkeypatch)
    u1 = solve(1).u
    s2 = solve(2)
    assert passes == [16, 16]
    stood = (s2.u == u1).flatten(1).all(-1) & ~s2.converged
    assert 0 < int(stood.sum()) < 8
    s3 = solve(3)
    assert len(flags) == 3 and flags[2].shape[0] == 16  # no sample had converged
    assert not bool(flags[2][stood].any())  # Gauss-Newton for them
    assert bool((s3.u != s2.u)[stood].flatten(1).any(-1).all())  # and they moved


def test_newton_follows_full_steps_and_shortened_steps_that_met_their_prediction():
    """The next iteration's Newton flags (``ilqr._newton_next``): a step accepted in full, or
    shortened (ladder index > 0) with at least ``_NEWTON_RATIO`` of the model's predicted decrease
    for that step size; not a shortened step that fell short, nor a sample with no step, nor a
    step whose predicted decrease is not positive."""
    from diffmpc.ilqr import _NEWTON_RATIO, _newton_next

    found = torch.tensor([True, True, True, False, True, True])
    first = torch.tensor([0, 3, 3, 0, 2, 1])
    predicted = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 2.0], dtype=DT)
    r = _NEWTON_RATIO
    decrease = torch.tensor([0.01, r + 1e-3, r - 1e-3, 1.0, 1e-3, 2.0 * r], dtype=DT)
    got = _newton_next(found, first, decrease, predicted)
    assert got.tolist() == [True, True, False, False, False, True]


def test_early_iterations_take_gauss_newton_steps_on_their_own_ladder(monkeypatch):
    """From the default guess, the first ``gauss_newton_iters`` iterations run no Newton pass
    and try the step sizes ``gauss_newton_decay ** k``; after them Newton steps come (once a
    step is trusted) on the ``line_search_decay`` ladder. A warm start (``u_init``) takes Newton
    steps from its second iteration."""
    import diffmpc.ilqr as ilqr_module

    flags, ladders = [], []
    gains, search = ilqr_module._gains, ilqr_module._search

    def recording_gains(*args):
        flags.append(bool(args[10].any()))  # any Newton step asked for
        return gains(*args)

    def recording_search(*args):
        ladders.append((len(flags), args[9].tolist()))  # iteration, step sizes tried
        return search(*args)

    monkeypatch.setattr(ilqr_module, "_gains", recording_gains)
    monkeypatch.setattr(ilqr_module, "_search", recording_search)
    system = make_system("pendulum")
    x_init = starts("pendulum", 8, seed=3)
    mpc = dm.MPC(system.n_state, 1, 30, system.u_lower, system.u_upper, unconverged="keep",
                 gauss_newton_iters=5, gauss_newton_decay=0.25, line_search_decay=0.5)
    with torch.no_grad():
        sol = mpc(x_init, system.default_cost().quad_cost(), system)
    assert int(sol.iterations.min()) > 5 and flags[:5] == [False] * 5 and any(flags[5:])
    for it, alphas in ladders:  # a run of consecutive powers of the phase's decay
        decay = 0.25 if it <= 5 else 0.5
        k0 = round(math.log(alphas[0]) / math.log(decay))
        assert alphas == pytest.approx([decay ** (k0 + i) for i in range(len(alphas))],
                                       rel=1e-15)
    assert {it for it, a in ladders if len(a) > 1} >= {1, 5, 6}  # shortened steps tried
    # warm-started from the first solve's iterate after one iteration: Newton in iteration 2
    u1 = dm.MPC(system.n_state, 1, 30, system.u_lower, system.u_upper, unconverged="keep",
                max_iter=1)(x_init, system.default_cost().quad_cost(), system).u.detach()
    flags.clear()
    with torch.no_grad():
        mpc(x_init, system.default_cost().quad_cost(), system, u_init=u1)
    assert flags[0] is False and flags[1] is True


def test_a_tiny_shortened_step_does_not_end_a_sample(monkeypatch):
    """Convergence by step size counts full steps only: a step the line search shortened (here,
    forced: ladder index 15, a move of 1e-12 that lowers the cost) is small because its step size
    is, not because the iterate is near a solution (the 0.2 ladder of the early iterations
    reaches 3e-11). Before, such a step ended the sample as converged after one iteration."""
    import diffmpc.ilqr as ilqr_module

    search = ilqr_module._search

    def shortened(x_init, cost, dyn, x, u, J, *args):
        out = search(x_init, cost, dyn, x, u, J, *args)
        U = u + 1e-12
        X = ilqr_module.rollout(dyn, x_init, U)
        Jn = cost.value(X, U).sum(-1)
        ok = Jn < J
        return (X, U, Jn, torch.where(ok, 15, out[3]), ok)

    monkeypatch.setattr(ilqr_module, "_search", shortened)
    system = make_system("pendulum")
    x_init = starts("pendulum", 4, seed=2)
    mpc = dm.MPC(system.n_state, 1, 20, system.u_lower, system.u_upper, max_iter=1,
                 unconverged="keep")
    with torch.no_grad():
        sol = mpc(x_init, system.default_cost().quad_cost(), system)
    moved = sol.step_norm > 0
    assert bool(moved.any()) and float(sol.step_norm.max()) <= 1e-11
    assert not bool(sol.converged[moved].any())


def test_a_saddle_at_the_initial_iterate_is_left():
    """A pendulum hanging at rest with u = 0 is a stationary point of the swing-up (by symmetry no
    first-order step leaves it) but no minimum: the solver must not stop there. Reference:
    L-BFGS-B started just off the symmetric point (a 1e-3 torque)."""
    sysm = make_system("pendulum")
    cost = sysm.default_cost(learn_goal=False, learn_weights=False)
    for p in sysm.parameters():
        p.requires_grad_(False)
    T = 20
    x_init = torch.tensor([[-1.0, 0.0, 0.0]], dtype=DT)
    u0 = torch.zeros(1, T, 1, dtype=DT)
    with torch.no_grad():
        sol = solve(sysm, cost, x_init, T)
        J_rest = float(shooting(sysm, cost, x_init, u0))
        J_sol = float(shooting(sysm, cost, x_init, sol.u))  # the same objective as the reference
    lo, hi = float(sysm.u_lower), float(sysm.u_upper)
    u_ref = lbfgsb(sysm, cost, x_init, u0 + 1e-3, lo, hi)
    J_ref = float(shooting(sysm, cost, x_init, u_ref))
    assert J_ref < J_rest - 1.0  # the reference did leave it
    assert bool(sol.converged.all())
    assert J_sol <= J_ref + 1e-8


def assert_same_iterates(a, b):
    """Two solves of one problem took the same steps: iterations, flags and controls."""
    assert torch.equal(a.iterations, b.iterations)
    assert torch.equal(a.converged, b.converged)
    torch.testing.assert_close(a.u, b.u, rtol=0, atol=1e-12)


@pytest.mark.parametrize("gauss_newton_iters", [0, 8])
@pytest.mark.parametrize("name", SYSTEMS)
def test_whole_ladder_at_once_equals_full_step_first(name, gauss_newton_iters, monkeypatch):
    """The line search's layouts in PyTorch operations (the full step, then the rest of the
    ladder for the samples it failed; or every step size in one rollout, as on small batches and
    on a GPU), and the compiled search of the built-in models (each sample tries the sizes in
    turn), pick the same step for every sample: the same iterates, iteration for iteration.
    With and without the early Gauss-Newton iterations (their own ladder); without them, Newton
    steps from iteration 2 take step sizes deep in the ladder."""
    import diffmpc.ilqr as ilqr_module
    from diffmpc import native

    system = make_system(name)
    B, T = 12, 30
    x_init = starts(name, B, seed=5)
    split_at = ilqr_module._ladder_split
    ends = []

    def record(hints, n_alpha):
        ends.append(split_at(hints, n_alpha))
        return ends[-1]

    monkeypatch.setattr(ilqr_module, "_ladder_split", record)
    newton_next = ilqr_module._newton_next
    taken = []  # per layout, per iteration: each sample's accepted step-size index

    def record_steps(found, first, decrease, predicted):
        taken[-1].append(torch.where(found, first, -1))
        return newton_next(found, first, decrease, predicted)

    monkeypatch.setattr(ilqr_module, "_newton_next", record_steps)
    out = []
    # 0 rows: the full step first; then 0 for a rollout's own cost: the rest in two rollouts
    # wherever the samples' last shortened steps suggest it; 10**9: the whole ladder at once
    # (the compiled search first, where there is one)
    layouts = [(10**9, 0, True)] if native.available() else []
    for rows, stage, compiled in layouts + [(0, 10**9, False), (0, 0, False), (10**9, 0, False)]:
        monkeypatch.setattr(ilqr_module, "_LADDER_ROWS", rows)
        monkeypatch.setattr(ilqr_module, "_STAGE_ROWS", stage)
        mpc = dm.MPC(system.n_state, 1, T, system.u_lower, system.u_upper, max_iter=15,
                     unconverged="keep", gauss_newton_iters=gauss_newton_iters)
        taken.append([])
        with torch.no_grad(), native.enabled(compiled):
            out.append(mpc(x_init, system.default_cost().quad_cost(), system))
    assert any(e < 16 for e in ends)  # some line searches did take two rollouts
    if gauss_newton_iters == 0:  # and steps past the first few
        assert any(bool((steps > 1).any()) for steps in taken[0])
    whole = out[-1]
    for i, (split, steps) in enumerate(zip(out[:-1], taken[:-1], strict=True)):
        assert len(steps) == len(taken[-1])
        assert all(torch.equal(a, b) for a, b in zip(steps, taken[-1], strict=True))
        if i == 0 and layouts:
            # all the compiled kernels against none: the same steps, rounded differently (15
            # iterations of unconverged cartpole swing-ups carry it to 1e-9 of the controls)
            assert torch.equal(split.iterations, whole.iterations)
            torch.testing.assert_close(split.u, whole.u, rtol=1e-8, atol=1e-10)
        else:
            assert_same_iterates(split, whole)


@pytest.mark.parametrize("kind", ["quadratic", "wavy"])
@pytest.mark.parametrize("name", SYSTEMS)
def test_newton_curvature_blocks_in_batch_last_costs_equal_full_hessians(name, kind, monkeypatch):
    """On CPU batches of one control the Newton pass adds the models' curvature blocks to the
    Riccati pass's batch-last costs (``TrajDynamics.curvature_blocks``) instead of forming the
    Lagrangian's ``[B, T, p, p]`` Hessians: the same iterates either way, with Newton steps taken
    by part of the batch (the mixed case) and by all of it; for a ``QuadCost`` and for a
    non-convex cost module (whose exact Hessian the Newton samples take, the others its
    convexified one)."""
    from diffmpc.expand import TrajDynamics

    system = make_system(name)
    B, T = 24, 30
    x_init = starts(name, B, seed=3)
    blocks, expansion = TrajDynamics.curvature_blocks, TrajDynamics.newton_expansion
    used = []

    def record(self, x, u, lam):
        used.append(blocks(self, x, u, lam))
        return used[-1]

    def record_expansion(self, x, u, gx):  # the blocks computed with the costate
        out = expansion(self, x, u, gx)
        if out is not None:
            used.append(out[2])
        return out

    out = []
    # None: the [B, T, p, p] path
    for fn, fn2 in ((record, record_expansion), (lambda *a: None, lambda *a: None)):
        monkeypatch.setattr(TrajDynamics, "curvature_blocks", fn)
        monkeypatch.setattr(TrajDynamics, "newton_expansion", fn2)
        mpc = dm.MPC(system.n_state, 1, T, system.u_lower, system.u_upper, max_iter=20,
                     unconverged="keep")
        cost = system.default_cost()
        cost = cost.quad_cost() if kind == "quadratic" else WavyCost(cost)
        with torch.no_grad():
            out.append(mpc(x_init, cost, system))
    assert len(used) > 0 and all(b is not None for b in used)
    assert any(b[0].shape[-1] < B for b in used)  # sub-batches too
    assert_same_iterates(*out)


def test_curvature_blocks_equal_curvature():
    """The rows-last blocks, placed at their coordinates, are the models' ``curvature``."""
    from diffmpc.expand import TrajDynamics

    g = torch.Generator().manual_seed(4)
    for name in SYSTEMS:
        system = make_system(name)
        n, B, T = system.n_state, 5, 7
        x = starts(name, B * T, seed=2).reshape(B, T, n)
        u = torch.randn(B, T, 1, generator=g, dtype=DT)
        lam = torch.randn(B, T, n, generator=g, dtype=DT)
        Hb, first = TrajDynamics(system, B, T, n, 1).curvature_blocks(x, u, lam)
        ref = system.curvature(x[:, :-1].reshape(-1, n), u[:, :-1].reshape(-1, 1),
                               lam[:, 1:].reshape(-1, n)).reshape(B, T - 1, n + 1, n + 1)
        k = Hb.shape[1]
        assert first + k == n + 1
        assert torch.equal(ref[..., first:, first:], Hb.permute(3, 0, 1, 2))
        assert not ref[..., :first, :].any() and not ref[..., :, :first].any()


def test_ladder_split_minimizes_rows():
    """The two-rollout split of the line search's ladder: at the smallest expected number of rows
    (each of R samples rolls out ``end - 1`` step sizes, those expected past them the remaining
    ``16 - end``, plus ``_STAGE_ROWS`` for the second rollout), and one rollout where no split
    saves that much."""
    from diffmpc.ilqr import _STAGE_ROWS, _ladder_split

    def rows(hints, end):
        past = int((hints >= end).sum())
        return (end - 1) * len(hints) + past * (16 - end) + _STAGE_ROWS

    hints = torch.tensor([1] * 90 + [9] * 10)  # most took the first shortened step last time
    end = _ladder_split(hints, 16)
    assert end == 2
    assert rows(hints, end) == min(rows(hints, e) for e in range(2, 16)) < 15 * len(hints)
    spread = torch.arange(100) % 16  # no split saves a rollout's worth of rows
    assert _ladder_split(spread, 16) == 16
    late = torch.tensor([10] * 200)
    assert _ladder_split(late, 16) == 11  # all expected at index 10: 10 sizes, not 15
    assert _ladder_split(late[:100], 16) == 16  # 100 samples: 500 rows saved, not worth it
    assert _ladder_split(torch.tensor([3] * 20), 16) == 16  # 20 samples: not worth a rollout


@pytest.mark.parametrize("shared", ["C and c", "C", "neither"])
def test_quadratic_stage_costs_and_subsets_against_explicit_sums(shared):
    """``TrajCost.value`` (one matrix product when C is shared by every sample and step), on a
    trajectory and on a line search's stack of them, and its gradients, against the explicit
    sum ``1/2 tau' C tau + c' tau``; a subset of a shared C stays shared."""
    from diffmpc.expand import TrajCost

    B, T, n, m = 5, 4, 3, 2
    p = n + m
    g = torch.Generator().manual_seed(8)
    L = torch.randn(p, p, generator=g, dtype=DT)
    C = (L @ L.T + torch.eye(p, dtype=DT)) if shared != "neither" else None
    if C is None:
        L = torch.randn(B, T, p, p, generator=g, dtype=DT)
        C = L @ L.mT
    c = torch.randn(p, generator=g, dtype=DT) if shared == "C and c" else torch.randn(
        B, T, p, generator=g, dtype=DT)
    C, c = C.requires_grad_(True), c.requires_grad_(True)
    cost = TrajCost(dm.QuadCost(C, c), B, T, n, m)
    for lead in ((), (3,)):
        x = torch.randn(*lead, B, T, n, generator=g, dtype=DT, requires_grad=True)
        u = torch.randn(*lead, B, T, m, generator=g, dtype=DT, requires_grad=True)
        tau = torch.cat([x, u], -1)
        Cf, cf = C.expand(B, T, p, p), c.expand(B, T, p)
        ref = 0.5 * torch.einsum("...i,...ij,...j->...", tau, Cf, tau) + (tau * cf).sum(-1)
        got = cost.value(x, u)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        W = torch.randn(ref.shape, generator=g, dtype=DT)
        for a, b in zip(torch.autograd.grad((got * W).sum(), (x, u, C, c)),
                        torch.autograd.grad((ref * W).sum(), (x, u, C, c)), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        with torch.inference_mode():  # the solver's line search: formed in place
            torch.testing.assert_close(cost.value(x.detach(), u.detach()), ref.detach(),
                                       rtol=1e-12, atol=1e-12)
    idx = torch.tensor([3, 0])
    sub = cost.subset(idx)
    assert sub.C.shape == (2, T, p, p) and (sub.C.stride(0) == 0) == (shared != "neither")
    torch.testing.assert_close(sub.value(x[0, idx], u[0, idx]), cost.value(x[0], u[0])[idx],
                               rtol=1e-12, atol=1e-12)
