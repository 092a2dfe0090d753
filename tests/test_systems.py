"""Tests of diffmpc.systems: references from mpc.pytorch, scipy, closed forms and autograd."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from diffmpc.cost import GoalCost
from diffmpc.systems import Cartpole, Pendulum, ReachCost, TwoLinkArm

SYSTEMS = [Pendulum, Cartpole, TwoLinkArm]


def _angles(gen: torch.Generator, B: int, dtype=torch.float32) -> torch.Tensor:
    return (torch.rand(B, generator=gen, dtype=dtype) * 2 - 1) * math.pi


def random_xu(system, B: int = 16, seed: int = 0, dtype=torch.float32):
    """Random states (angles on the unit circle) and controls inside the default bounds."""
    gen = torch.Generator().manual_seed(seed)
    th = _angles(gen, B, dtype)
    r = lambda scale: scale * torch.randn(B, generator=gen, dtype=dtype)  # noqa: E731
    if isinstance(system, Pendulum):
        x = torch.stack([th.cos(), th.sin(), r(3.0)], -1)
    elif isinstance(system, Cartpole):
        x = torch.stack([r(1.0), r(1.0), th.cos(), th.sin(), r(3.0)], -1)
    else:
        x = torch.stack([th, _angles(gen, B, dtype), r(2.0), r(2.0)], -1)
    lo, hi = system.u_lower.to(dtype), system.u_upper.to(dtype)
    u = lo + (hi - lo) * torch.rand(B, system.n_ctrl, generator=gen, dtype=dtype)
    return x, u


# ----------------------------------------------------------------- reference: mpc.pytorch


@pytest.mark.reference
@pytest.mark.parametrize("name", ["pendulum", "cartpole"])
def test_equals_mpc_pytorch_reference(name):
    env_dx = pytest.importorskip(f"mpc.env_dx.{name}")
    ours = Pendulum() if name == "pendulum" else Cartpole()
    ref = env_dx.PendulumDx() if name == "pendulum" else env_dx.CartpoleDx()
    x, u = random_xu(ours, B=256, seed=1)
    torch.testing.assert_close(ours(x, u), ref(x, u), rtol=1e-5, atol=2e-5)
    assert ours.dt == ref.dt and ours.n_state == ref.n_state and ours.n_ctrl == ref.n_ctrl
    assert float(ours.u_lower) == ref.lower and float(ours.u_upper) == ref.upper


@pytest.mark.reference
@pytest.mark.parametrize("name", ["pendulum", "cartpole"])
def test_jacobian_equals_mpc_pytorch_reference(name):
    env_dx = pytest.importorskip(f"mpc.env_dx.{name}")
    ours = Pendulum() if name == "pendulum" else Cartpole()
    ref = env_dx.PendulumDx() if name == "pendulum" else env_dx.CartpoleDx()
    x, u = random_xu(ours, B=4, seed=2)
    u = 0.9 * u  # strictly inside the bounds, where the reference's clamp is the identity
    for i in range(4):
        J_ours = torch.autograd.functional.jacobian(ours, (x[i : i + 1], u[i : i + 1]))
        J_ref = torch.autograd.functional.jacobian(ref, (x[i : i + 1], u[i : i + 1]))
        for a, b in zip(J_ours, J_ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.reference
@pytest.mark.parametrize("name", ["pendulum", "cartpole"])
def test_default_cost_equals_mpc_pytorch_objective(name):
    env_dx = pytest.importorskip(f"mpc.env_dx.{name}")
    ours = Pendulum() if name == "pendulum" else Cartpole()
    ref = env_dx.PendulumDx() if name == "pendulum" else env_dx.CartpoleDx()
    q, p = ref.get_true_obj()  # cost 1/2 tau' diag(q) tau + p' tau (up to a constant)
    x, u = random_xu(ours, B=32, seed=3)
    tau = torch.cat([x, u], -1)
    ref_cost = 0.5 * (q * tau * tau).sum(-1) + (p * tau).sum(-1)
    cost = ours.default_cost()
    assert isinstance(cost, GoalCost)
    ours_cost = cost(x, u)
    # equal up to one constant (the goal's 1/2 g' W g)
    torch.testing.assert_close(ours_cost - ref_cost, (ours_cost - ref_cost)[:1].expand(32),
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ rk4 against an independent ODE


def _pendulum_ode(g, m, l):
    def f(_t, z, u):
        th, w = z
        return [w, 1.5 * g / l * np.sin(th) + 3.0 * u / (m * l * l)]

    return f


def _cartpole_ode(g, mc, mp, l):
    def f(_t, z, u):
        _, v, th, w = z
        M = mc + mp
        a = (u + mp * l * w * w * np.sin(th)) / M
        thdd = (g * np.sin(th) - np.cos(th) * a) / (l * (4 / 3 - mp * np.cos(th) ** 2 / M))
        return [v, a - mp * l * thdd * np.cos(th) / M, w, thdd]

    return f


@pytest.mark.parametrize("name", ["pendulum", "cartpole"])
def test_rk4_matches_scipy_integration(name):
    torch.set_default_dtype(torch.float64)
    try:
        sys = Pendulum(g=9.0, m=1.3, l=0.8, dt=0.01, method="rk4") if name == "pendulum" else (
            Cartpole(g=9.5, m_cart=1.2, m_pole=0.2, l=0.6, dt=0.01, method="rk4"))
    finally:
        torch.set_default_dtype(torch.float32)
    x, u = random_xu(sys, B=5, seed=4, dtype=torch.float64)
    out = sys(x, u)
    for i in range(5):
        if name == "pendulum":
            z0, f = [math.atan2(x[i, 1], x[i, 0]), float(x[i, 2])], _pendulum_ode(9.0, 1.3, 0.8)
        else:
            z0 = [float(x[i, 0]), float(x[i, 1]), math.atan2(x[i, 3], x[i, 2]), float(x[i, 4])]
            f = _cartpole_ode(9.5, 1.2, 0.2, 0.6)
        sol = solve_ivp(f, (0, 0.01), z0, args=(float(u[i, 0]),), rtol=1e-11, atol=1e-11)
        z = sol.y[:, -1]
        th = z[0] if name == "pendulum" else z[2]
        want = [math.cos(th), math.sin(th), z[1]] if name == "pendulum" else (
            [z[0], z[1], math.cos(th), math.sin(th), z[3]])
        # RK4's local error is O(dt^5) (explicit Euler's, O(dt^2), is ~1e-3 here)
        np.testing.assert_allclose(out[i].detach().numpy(), want, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ generic model properties


@pytest.mark.parametrize("cls", SYSTEMS)
def test_parameters_positive_and_receive_gradients(cls):
    sys = cls()
    x, u = random_xu(sys, B=8, seed=5)
    sys(x, u).square().sum().backward()
    for name, p in sys.named_parameters():
        assert name.startswith("log_")
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs() > 0, name
        assert getattr(sys, name[4:]) > 0
    with torch.no_grad():
        for p in sys.parameters():
            p.fill_(-30.0)  # a gradient step can make the log any number: values stay positive
    assert all(getattr(sys, n[4:]) > 0 for n, _ in sys.named_parameters())


def _gradcheck_all(sys, x, u) -> None:
    """gradcheck and gradgradcheck of the step w.r.t. x, u and every parameter."""
    names = [n for n, _ in sys.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in sys.parameters())

    def f(x, u, *ps):
        return torch.func.functional_call(sys, dict(zip(names, ps, strict=True)), (x, u))

    inputs = (x.requires_grad_(), u.requires_grad_(), *params)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("cls", SYSTEMS)
@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_gradcheck_state_control_parameters(cls, method):
    sys = cls(method=method).double()
    x, u = random_xu(sys, B=3, seed=6, dtype=torch.float64)
    _gradcheck_all(sys, x, u)


@pytest.mark.parametrize("cls", SYSTEMS)
@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_batch_equals_one_by_one(cls, method):
    sys = cls(method=method)
    x, u = random_xu(sys, B=10, seed=7)
    batched = sys(x, u)
    single = torch.cat([sys(x[i : i + 1], u[i : i + 1]) for i in range(10)])
    torch.testing.assert_close(batched, single)
    assert not torch.equal(batched[0], batched[1])


@pytest.mark.parametrize("cls", SYSTEMS)
@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_rollout_step_equals_forward_and_its_gradients(cls, method):
    """``rollout_step()`` (the constants formed once for a rollout's steps) computes exactly
    ``forward``, and the parameters get the same gradients through a three-step rollout."""
    sys = cls(method=method, dtype=torch.float64)
    x, u = random_xu(sys, B=6, seed=8, dtype=torch.float64)
    step = sys.rollout_step()
    assert torch.equal(step(x, u), sys(x, u))
    grads = []
    for fn in (sys, sys.rollout_step()):
        y = x
        for _ in range(3):
            y = fn(y, u)
        grads.append(torch.autograd.grad(y.square().sum(), list(sys.parameters())))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=0)


# --------------------------------------------- closed-form derivatives (Pendulum, Cartpole)

CLOSED_FORM = {Pendulum: dict(g=9.0, m=1.3, l=0.7), Cartpole: dict(g=9.5, m_cart=1.4, m_pole=0.3, l=0.6)}


def _off_circle_xu(sys, B: int, seed: int):
    """Random states with (cos th, sin th) scaled off the unit circle (the solver's iterates
    leave it), float64."""
    x, u = random_xu(sys, B=B, seed=seed, dtype=torch.float64)
    ic = 0 if isinstance(sys, Pendulum) else 2
    scale = torch.linspace(0.6, 1.5, B, dtype=torch.float64)
    x[:, ic:ic + 2] *= scale[:, None]
    return x, u


def _step_and_weighted(sys, n: int, lam_i: torch.Tensor):
    """One sample's step ``z [p] -> [n]`` and ``z -> lam_i' step(z)``."""

    def step(z):
        return sys(z[None, :n], z[None, n:])[0]

    return step, lambda z: (step(z) * lam_i).sum()


@pytest.mark.parametrize("cls", [Pendulum, Cartpole])
def test_closed_form_jacobian_and_curvature_equal_autograd(cls):
    """jacobian and curvature of the Euler step against torch.autograd.functional, per sample,
    at non-default parameters and states off the unit circle."""
    sys = cls(dtype=torch.float64, **CLOSED_FORM[cls])
    n = sys.n_state
    x, u = _off_circle_xu(sys, B=12, seed=11)
    lam = torch.randn(12, n, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    J, H = sys.jacobian(x, u), sys.curvature(x, u, lam)
    assert J.shape == (12, n, n + 1) and H.shape == (12, n + 1, n + 1)
    for i in range(12):
        z = torch.cat([x[i], u[i]])
        step, weighted = _step_and_weighted(sys, n, lam[i])
        J_ref = torch.autograd.functional.jacobian(step, z)
        H_ref = torch.autograd.functional.hessian(weighted, z)
        torch.testing.assert_close(J[i], J_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(H[i], H_ref, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("cls", [Pendulum, Cartpole])
def test_closed_form_derivatives_are_differentiable(cls):
    """Unrolled gradients go through jacobian and curvature: their derivatives in the
    parameters, the state and the control equal those of autograd's Jacobian and Hessian."""
    sys = cls(dtype=torch.float64, **CLOSED_FORM[cls])
    n = sys.n_state
    x, u = (t.requires_grad_() for t in _off_circle_xu(sys, B=5, seed=13))
    gen = torch.Generator().manual_seed(14)
    lam = torch.randn(5, n, generator=gen, dtype=torch.float64)
    WJ = torch.randn(5, n, n + 1, generator=gen, dtype=torch.float64)
    WH = torch.randn(5, n + 1, n + 1, generator=gen, dtype=torch.float64)
    params = list(sys.parameters()) + [x, u]
    closed = (sys.jacobian(x, u) * WJ).sum() + (sys.curvature(x, u, lam) * WH).sum()
    got = torch.autograd.grad(closed, params)
    ref = 0.0
    for i in range(5):
        z = torch.cat([x[i], u[i]])
        step, weighted = _step_and_weighted(sys, n, lam[i])
        J = torch.autograd.functional.jacobian(step, z, create_graph=True)
        H = torch.autograd.functional.hessian(weighted, z, create_graph=True)
        ref = ref + (J * WJ[i]).sum() + (H * WH[i]).sum()
    want = torch.autograd.grad(ref, params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
        assert w.abs().amax() > 0


class _AutogradOnly(torch.nn.Module):
    """The same model without closed-form derivatives: the solver falls back to autograd."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, u):
        return self.model(x, u)


@pytest.mark.parametrize("cls", [Pendulum, Cartpole])
def test_solver_with_closed_forms_equals_autograd_path(cls):
    """MPC solutions and exact implicit gradients are the same whether the solver uses the
    closed forms or differentiates the model itself; RK4 models return None (autograd)."""
    import diffmpc as dm

    sys = cls(dtype=torch.float64)
    assert cls(method="rk4").jacobian(*random_xu(sys, B=2)) is None
    x0, _ = random_xu(sys, B=6, seed=15, dtype=torch.float64)
    T = 12
    W = torch.randn(6, T, 1, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    out = []
    for model in (sys, _AutogradOnly(sys)):
        mpc = dm.MPC(sys.n_state, 1, T, sys.u_lower, sys.u_upper, tol=1e-10, unconverged="raise")
        sol = mpc(x0, sys.default_cost(), model)
        grads = torch.autograd.grad((sol.u * W).sum(), list(sys.parameters()))
        out.append((sol.u.detach(), sol.iterations, grads))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=0, atol=1e-10)
    for g, w in zip(out[0][2], out[1][2], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("cls", SYSTEMS)
def test_inputs_not_modified_and_vmap_works(cls):
    sys = cls()
    x, u = random_xu(sys, B=6, seed=8)
    x0, u0 = x.clone(), u.clone()
    out = torch.func.vmap(sys)(x, u)  # per-sample calls see x [n], u [m]
    torch.testing.assert_close(out, sys(x, u))
    assert torch.equal(x, x0) and torch.equal(u, u0)


@pytest.mark.parametrize("cls", SYSTEMS)
def test_bad_input_raises_value_error(cls):
    sys = cls()
    n, m = sys.n_state, sys.n_ctrl
    with pytest.raises(ValueError, match="x must have shape"):
        sys(torch.zeros(2, n + 1), torch.zeros(2, m))
    with pytest.raises(ValueError, match="u must have shape"):
        sys(torch.zeros(2, n), torch.zeros(2, m + 1))
    with pytest.raises(ValueError, match="same batch dims"):
        sys(torch.zeros(2, n), torch.zeros(3, m))
    with pytest.raises(ValueError, match="floating-point"):
        sys(np.zeros((2, n)), torch.zeros(2, m))
    with pytest.raises(ValueError, match="floating-point"):
        sys(torch.zeros(2, n, dtype=torch.long), torch.zeros(2, m))
    with pytest.raises(ValueError, match="method"):
        cls(method="midpoint")
    with pytest.raises(ValueError, match="dt"):
        cls(dt=0.0)
    first = next(iter(sys.named_parameters()))[0][4:]
    with pytest.raises(ValueError, match=first):
        cls(**{first: -1.0})


@pytest.mark.parametrize("cls", SYSTEMS)
def test_dtype_argument(cls):
    sys = cls(dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in sys.parameters())
    assert sys.u_lower.dtype == torch.float64
    assert next(sys.default_cost().parameters()).dtype == torch.float64
    name, p = next(iter(sys.named_parameters()))
    default = {Pendulum: 10.0, Cartpole: 9.8, TwoLinkArm: 1.0}[cls]  # g, g, m1
    assert float(getattr(sys, name[4:]).detach()) == pytest.approx(default, rel=1e-15)


@pytest.mark.parametrize("cls", SYSTEMS)
def test_bounds_and_default_cost(cls):
    sys = cls()
    assert sys.u_lower.shape == (sys.n_ctrl,) and sys.u_upper.shape == (sys.n_ctrl,)
    assert bool((sys.u_lower < sys.u_upper).all())
    cost = sys.default_cost()
    x, u = random_xu(sys, B=4, seed=9)
    c = cost(x, u)
    assert c.shape == (4,) and bool((c > 0).all())


def test_pendulum_upright_is_an_equilibrium_and_hanging_is_stable():
    pend = Pendulum(method="rk4")
    up = torch.tensor([[1.0, 0.0, 0.0]])
    torch.testing.assert_close(pend(up, torch.zeros(1, 1)), up)
    x = torch.tensor([[math.cos(math.pi - 0.1), math.sin(math.pi - 0.1), 0.0]])
    with torch.no_grad():
        for _ in range(20):  # small oscillation about the bottom
            x = pend(x, torch.zeros(1, 1))
    assert float(x[0, 0]) < -0.99


def test_cartpole_pushes_cart_forward():
    cp = Cartpole()
    down = torch.tensor([[0.0, 0.0, -1.0, 0.0, 0.0]])
    nxt = cp(down, torch.tensor([[10.0]]))
    # a hanging uniform rod (at rest) pushed at its pivot: the rod rotates about its centre
    # of percussion, so the cart sees an effective mass m_cart + m_pole / 4 (Newton-Euler)
    want = 0.05 * 10.0 / (1.0 + 0.1 / 4)
    torch.testing.assert_close(nxt[0, 1], torch.tensor(want), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------ two-link arm


def _lagrangian_accel(arm: TwoLinkArm, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """qddot from the Euler-Lagrange equations of two uniform rods, derived by autograd."""
    m1, m2, l1, l2 = (float(v.detach()) for v in (arm.m1, arm.m2, arm.l1, arm.l2))
    g, d = arm.g, float(arm.damping.detach())

    def com(q):  # centres of mass [2, 2] and link angles [2]
        p1 = 0.5 * l1 * torch.stack([q[0].cos(), q[0].sin()])
        p2 = 2 * p1 + 0.5 * l2 * torch.stack([(q[0] + q[1]).cos(), (q[0] + q[1]).sin()])
        return torch.stack([p1, p2]), torch.stack([q[0], q[0] + q[1]])

    def lagrangian(q, dq):
        J_p = torch.autograd.functional.jacobian(lambda q: com(q)[0], q, create_graph=True)
        v = J_p @ dq  # [2 links, 2]
        w = torch.stack([dq[0], dq[0] + dq[1]])
        T = 0.5 * (m1 * v[0] @ v[0] + m2 * v[1] @ v[1])
        T = T + 0.5 * (m1 * l1**2 / 12 * w[0] ** 2 + m2 * l2**2 / 12 * w[1] ** 2)
        V = g * (m1 * com(q)[0][0, 1] + m2 * com(q)[0][1, 1])
        return T - V

    q, dq = x[:2], x[2:]
    H = torch.autograd.functional.hessian(lagrangian, (q, dq))
    M, L_dq_q = H[1][1], H[1][0]  # d2L/ddq2, d2L/(ddq dq)
    dL_dq = torch.autograd.functional.jacobian(lambda q: lagrangian(q, dq), q)
    rhs = u - d * dq - L_dq_q @ dq + dL_dq
    return torch.linalg.solve(M, rhs)


def test_arm_accel_matches_euler_lagrange():
    arm = TwoLinkArm(m1=1.3, m2=0.7, l1=0.6, l2=0.4, damping=0.2).double()
    x, u = random_xu(arm, B=5, seed=10, dtype=torch.float64)
    ours = arm.accel(x, u).detach()
    for i in range(5):
        torch.testing.assert_close(ours[i], _lagrangian_accel(arm, x[i], u[i]), rtol=1e-9,
                                   atol=1e-9)


def test_arm_mass_matrix_symmetric_positive_definite():
    arm = TwoLinkArm(m1=2.0, m2=0.5, l1=0.3, l2=0.9)
    q = torch.linspace(-math.pi, math.pi, 50).unsqueeze(-1).expand(50, 2)
    M = arm.mass_matrix(q)
    torch.testing.assert_close(M, M.mT)
    assert bool((torch.linalg.eigvalsh(M) > 0).all())


def test_arm_single_link_limit_is_a_physical_pendulum():
    # a negligible second link: link 1 is a rod on a pivot, qdd = (tau - m g l/2 cos q - d w) / I
    arm = TwoLinkArm(m1=1.5, m2=1e-9, l1=0.8, l2=1e-3, damping=0.3).double()
    x = torch.tensor([[0.4, 0.0, 1.2, 0.0]], dtype=torch.float64)
    u = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    want = (2.0 - 1.5 * 9.81 * 0.4 * math.cos(0.4) - 0.3 * 1.2) / (1.5 * 0.8**2 / 3)
    torch.testing.assert_close(arm.accel(x, u)[0, 0].detach(), torch.tensor(want).double(),
                               rtol=1e-6, atol=1e-6)


def test_arm_end_effector_closed_form():
    arm = TwoLinkArm(l1=0.7, l2=0.4)
    q = torch.tensor([[0.0, 0.0], [math.pi / 2, 0.0], [0.0, math.pi / 2], [math.pi, -math.pi]])
    want = torch.tensor([[1.1, 0.0], [0.0, 1.1], [0.7, 0.4], [-0.3, 0.0]])
    torch.testing.assert_close(arm.end_effector(q), want, atol=1e-6, rtol=1e-6)


def test_arm_rk4_conserves_energy_to_fourth_order():
    torch.set_default_dtype(torch.float64)
    try:
        drifts = []
        for dt in (0.05, 0.025):
            arm = TwoLinkArm(damping=1e-12, dt=dt, method="rk4")
            x = torch.tensor([[-1.2, 0.5, 0.0, 0.0]])  # released from rest: swings for 2 s
            with torch.no_grad():
                e0 = arm.energy(x)
                for _ in range(round(2.0 / dt)):
                    x = arm(x, torch.zeros(1, 2))
                drifts.append(float((arm.energy(x) - e0).abs()))
    finally:
        torch.set_default_dtype(torch.float32)
    assert drifts[0] < 2e-4 * float(e0.abs())
    assert drifts[0] / drifts[1] > 12.0  # O(dt^4): halving dt divides the drift by ~16


def test_arm_damping_dissipates_energy():
    arm = TwoLinkArm(damping=0.5)
    x = torch.tensor([[0.3, 1.0, 0.5, -1.0]])
    energies = []
    with torch.no_grad():
        for _ in range(40):
            energies.append(float(arm.energy(x)))
            x = arm(x, torch.zeros(1, 2))
    assert all(b < a for a, b in zip(energies[:-1], energies[1:], strict=True))


def test_arm_default_stays_stable_under_any_admissible_torques():
    arm = TwoLinkArm(dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    x = 6 * torch.rand(300, 4, generator=gen, dtype=torch.float64) - 3
    with torch.no_grad():
        for k in range(300):  # alternating bang-bang and uniform random torques, 15 s
            u = 2 * torch.rand(300, 2, generator=gen, dtype=torch.float64) - 1
            u = 15.0 * (u.sign() if k % 2 else u)
            x = arm(x, u)
    assert bool(torch.isfinite(x).all()) and float(x[:, 2:].abs().max()) < 100.0


def test_reach_cost_zero_at_target_and_gradients():
    arm = TwoLinkArm()
    cost = arm.default_cost(target=(0.5, 0.5), learn_target=True)
    assert isinstance(cost, ReachCost)
    # the elbow-up solution of the inverse kinematics for (0.5, 0.5) with l1 = l2 = 0.5
    x = torch.tensor([[math.pi / 2, -math.pi / 2, 0.0, 0.0]])
    torch.testing.assert_close(cost(x, torch.zeros(1, 2)), torch.zeros(1), atol=1e-6, rtol=0)
    x2 = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    c = cost(x2, torch.ones(1, 2))
    assert float(c.detach()) > 0
    c.sum().backward()
    assert cost.target.grad is not None and cost.target.grad.abs().sum() > 0
    assert arm.log_l1.grad is not None  # the kinematics belong to the arm
    assert not any(p is arm.log_l1 for p in cost.parameters())


def test_reach_cost_bad_input_raises():
    arm = TwoLinkArm()
    with pytest.raises(ValueError, match="target"):
        ReachCost(arm.end_effector, torch.zeros(3))
    with pytest.raises(ValueError, match="pos_weight"):
        ReachCost(arm.end_effector, torch.zeros(2), pos_weight=-1.0)
    with pytest.raises(ValueError, match="end_effector"):
        ReachCost(None, torch.zeros(2))
