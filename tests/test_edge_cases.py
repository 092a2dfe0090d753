"""Edge cases of the nonlinear path: a horizon of one step (no transition at all)."""

import math

import pytest
import torch

import diffmpc as dm
from diffmpc.systems import Pendulum


@pytest.mark.parametrize("mode", ["implicit", "gauss_newton", "unroll"])
def test_horizon_one_with_a_module_dynamics(mode):
    """T = 1: the only control minimizes its own cost (u = 0) and d objective / d x_init is the
    closed-form gradient of the goal cost, w * (x - goal)."""
    pend = Pendulum(dtype=torch.float64)
    cost = pend.default_cost()
    th = torch.tensor([2.0, -1.0], dtype=torch.float64)
    x0 = torch.stack([th.cos(), th.sin(), torch.tensor([0.5, -0.3], dtype=torch.float64)], -1)
    x0.requires_grad_(True)
    mpc = dm.MPC(3, 1, 1, u_lower=pend.u_lower, u_upper=pend.u_upper, backward=mode)
    sol = mpc(x0, cost, pend)
    assert sol.x.shape == (2, 1, 3) and sol.u.shape == (2, 1, 1)
    assert bool(sol.converged.all())
    torch.testing.assert_close(sol.u, torch.zeros_like(sol.u))
    (g,) = torch.autograd.grad(sol.objective.sum(), x0)
    w = torch.tensor([1.0, 1.0, 0.1], dtype=torch.float64)
    goal = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(g, w * (x0.detach() - goal), rtol=1e-6, atol=1e-8)
    assert math.isfinite(float(sol.objective.detach().sum()))


class _Autonomous(torch.nn.Module):
    """Dynamics the control cannot affect: x' = 0.5 x."""

    def forward(self, x, u):
        return 0.5 * x


class _WeightedCost(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

    def forward(self, x, u):
        return self.w * (x**2).sum(-1) + (u**2).sum(-1)


def test_dynamics_that_ignore_the_control():
    """u = 0 is optimal; the objective is w * sum_t 0.25^t |x0|^2, so d obj / d w is known."""
    x0 = torch.tensor([[1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    cost = _WeightedCost()
    sol = dm.MPC(2, 2, 4)(x0, cost, _Autonomous())
    torch.testing.assert_close(sol.u, torch.zeros_like(sol.u))
    sol.objective.sum().backward()
    expected = sum(0.25**t for t in range(4)) * 5.0
    torch.testing.assert_close(cost.w.grad, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(x0.grad, 2 * expected / 5.0 * x0.detach())


class _PendulumWithJacobian(Pendulum):
    """The same model, with its Jacobian supplied (here by torch.func, per sample)."""

    calls = 0

    def jacobian(self, x, u):
        type(self).calls += 1
        one = lambda z: self(z[None, :3], z[None, 3:])[0]  # noqa: E731
        return torch.func.vmap(torch.func.jacrev(one))(torch.cat([x, u], -1))


def test_a_model_may_supply_its_jacobian():
    """The solver uses dynamics.jacobian when present; solution and gradients are unchanged."""
    th = torch.tensor([2.5, -0.7, 1.2], dtype=torch.float64)
    x0 = torch.stack([th.cos(), th.sin(), torch.zeros_like(th)], -1)
    out = []
    for model in (Pendulum(dtype=torch.float64), _PendulumWithJacobian(dtype=torch.float64)):
        mpc = dm.MPC(3, 1, 10, u_lower=model.u_lower, u_upper=model.u_upper, tol=1e-10)
        sol = mpc(x0, model.default_cost(), model)
        (g,) = torch.autograd.grad((sol.u * torch.linspace(-1, 1, 10)[:, None]).sum(), model.log_m)
        out.append((sol.u.detach(), g))
    assert _PendulumWithJacobian.calls > 0
    torch.testing.assert_close(out[0][0], out[1][0], rtol=0, atol=1e-9)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-6, atol=1e-9)


def test_nonlinear_solution_tensors_are_ordinary_outside_inference_mode():
    """The nonlinear iterations run in inference mode; what the layer returns must still work
    with autograd and in-place updates, with and without gradients into the solve."""
    model = Pendulum(dtype=torch.float64)
    th = torch.tensor([2.5, -0.7], dtype=torch.float64)
    x0 = torch.stack([th.cos(), th.sin(), torch.zeros_like(th)], -1)
    mpc = dm.MPC(3, 1, 8, u_lower=model.u_lower, u_upper=model.u_upper)
    with torch.no_grad():
        sol = mpc(x0, model.default_cost(), model)
    fields = (sol.x, sol.u, sol.objective, sol.converged, sol.iterations, sol.step_norm)
    assert not any(t.is_inference() for t in fields)
    w = torch.ones(2, 8, 1, dtype=torch.float64, requires_grad=True)
    (sol.u * w).square().sum().backward()  # sol.u saved for backward
    torch.testing.assert_close(w.grad, 2 * sol.u.square() * w.detach())
    sol.u.add_(1.0)  # in-place outside inference mode
    sol = mpc(x0, model.default_cost(), model)  # with gradients into the model
    assert not sol.u.is_inference() and sol.u.requires_grad
    with torch.inference_mode():  # the caller's own inference mode
        inner = mpc(x0, model.default_cost(), model)
    torch.testing.assert_close(inner.u, sol.u.detach())


class _StridedPendulum(torch.nn.Module):
    """The pendulum, returning its next state as a non-contiguous view (a column slice)."""

    def __init__(self):
        super().__init__()
        self.inner = Pendulum(dtype=torch.float64)

    def forward(self, x, u):
        nxt = self.inner(x, u)
        return torch.cat([nxt, torch.zeros_like(nxt)], -1)[:, :3]


def test_a_model_may_return_a_strided_view():
    """The line search reshapes what the model returns; a view with strides works and solves
    the same problem as the plain model."""
    th = torch.tensor([2.5, -0.7, 1.2], dtype=torch.float64)
    x0 = torch.stack([th.cos(), th.sin(), torch.zeros_like(th)], -1)
    model = _StridedPendulum()
    assert not model(x0, torch.zeros(3, 1, dtype=torch.float64)).is_contiguous()
    mpc = dm.MPC(3, 1, 10, u_lower=-2.0, u_upper=2.0, tol=1e-10)
    got = mpc(x0, model.inner.default_cost(), model)
    ref = mpc(x0, model.inner.default_cost(), model.inner)
    torch.testing.assert_close(got.u, ref.u, rtol=0, atol=1e-9)
