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
