"""Cart-pole (a pole hinged on a cart on a frictionless track), the physics of mpc.pytorch."""

from __future__ import annotations

import torch
from torch import Tensor

from diffmpc.cost import GoalCost
from diffmpc.systems._common import (
    StepModel,
    angle_derivatives,
    angle_output_curvature,
    euler_closed_form,
    explicit_step,
    init_step_and_bounds,
    log_param,
    rows_first,
)

__all__ = ["Cartpole"]


class Cartpole(StepModel):
    """Cart-pole swing-up model with learnable gravity, masses and pole half-length.

    State ``x = [p, pdot, cos th, sin th, thdot]`` (cart position, its velocity, pole angle
    with ``th = 0`` upright, its rate); control ``u = [force]`` in N on the cart. With
    ``M = m_cart + m_pole`` and ``a = (u + m_pole l thdot^2 sin th) / M`` (the classic
    cart-pole of Barto, Sutton and Anderson, pole half-length ``l``)::

        thddot = (g sin th - cos th a) / (l (4/3 - m_pole cos^2 th / M))
        pddot  = a - m_pole l thddot cos th / M

    ``method="euler"`` is the explicit Euler step of mpc.pytorch's ``CartpoleDx`` on
    ``(p, pdot, th, thdot)`` (its accelerations read ``cos th``, ``sin th`` from the state);
    ``method="rk4"`` integrates the same ODE with classical RK4.

    Differences from ``CartpoleDx``: ``u`` is not clamped inside the model (the solver enforces
    the bounds, the envs clip actions).

    Args:
        g, m_cart, m_pole, l: gravity (m/s^2), cart and pole masses (kg), pole half-length (m);
            learnable, positive (stored as logs).
        dt: time step (s).
        method: ``"euler"`` or ``"rk4"``.
        max_force: the control bounds are ``[-max_force, max_force]`` (CartpoleDx: 100 N).
        dtype: dtype of the parameters and bounds (None: ``torch.get_default_dtype()``).

    Example:
        >>> cp = Cartpole()
        >>> cp(torch.tensor([[0.0, 0.0, -1.0, 0.0, 0.0]]), torch.zeros(1, 1)).shape
        torch.Size([1, 5])
    """

    n_state = 5
    n_ctrl = 1

    def __init__(
        self,
        g: float = 9.8,
        m_cart: float = 1.0,
        m_pole: float = 0.1,
        l: float = 0.5,
        dt: float = 0.05,
        method: str = "euler",
        max_force: float = 100.0,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.log_g = log_param("Cartpole", "g", g, dtype)
        self.log_m_cart = log_param("Cartpole", "m_cart", m_cart, dtype)
        self.log_m_pole = log_param("Cartpole", "m_pole", m_pole, dtype)
        self.log_l = log_param("Cartpole", "l", l, dtype)
        init_step_and_bounds(self, "Cartpole", dt, method, "max_force", max_force, dtype)

    @property
    def g(self) -> Tensor:
        return self.log_g.exp()

    @property
    def m_cart(self) -> Tensor:
        return self.log_m_cart.exp()

    @property
    def m_pole(self) -> Tensor:
        return self.log_m_pole.exp()

    @property
    def l(self) -> Tensor:
        return self.log_l.exp()

    def _constants(self) -> tuple[Tensor, ...]:
        """What ``accel`` (and the closed-form derivatives) need of the parameters: ``l``,
        ``g``, ``1 / M`` (``M = m_cart + m_pole``), ``m_pole l``, ``m_pole / M`` and
        ``m_pole l / M``."""
        mp, l = self.m_pole, self.l
        inv_M = (self.m_cart + mp).reciprocal()
        mpl = mp * l
        return l, self.g, inv_M, mpl, mp * inv_M, mpl * inv_M

    def accel(self, cos_th: Tensor, sin_th: Tensor, thdot: Tensor, force: Tensor,
              consts: tuple[Tensor, ...] | None = None):
        """Cart and pole accelerations ``(pddot, thddot)`` ``[...]`` from ``[...]`` tensors
        (``consts``: ``_constants()``, if the caller has it).

        (Written in fused operations: the solver evaluates the model thousands of times per
        solve on small batches, where each operation costs its dispatch.)
        """
        l, g, inv_M, mpl, k, mu = self._constants() if consts is None else consts
        a = torch.addcmul(force, mpl * sin_th, thdot * thdot) * inv_M
        denom = l * (4.0 / 3.0 - k * (cos_th * cos_th))
        thddot = torch.addcmul(g * sin_th, cos_th, a, value=-1.0) / denom
        pddot = torch.addcmul(a, thddot * cos_th, mu, value=-1.0)
        return pddot, thddot

    def _step(self, x: Tensor, u: Tensor, consts: tuple[Tensor, ...]) -> Tensor:
        p, v, c, s, w = x.unbind(-1)
        if self.method == "euler":
            pddot, thddot = self.accel(c, s, w, u[..., 0], consts)
            dt = self.dt
            th = torch.add(torch.atan2(s, c), w, alpha=dt)
            return torch.stack([torch.add(p, v, alpha=dt), torch.add(v, pddot, alpha=dt),
                                torch.cos(th), torch.sin(th), torch.add(w, thddot, alpha=dt)], -1)

        def qdot(q: Tensor, u: Tensor) -> Tensor:  # q = [p, pdot, th, thdot]
            _, v, th, w = q.unbind(-1)
            pddot, thddot = self.accel(torch.cos(th), torch.sin(th), w, u[..., 0], consts)
            return torch.stack([v, pddot, w, thddot], -1)

        q = torch.stack([p, v, torch.atan2(s, c), w], -1)
        p, v, th, w = explicit_step(qdot, q, u, self.dt, "rk4").unbind(-1)
        return torch.stack([p, v, torch.cos(th), torch.sin(th), w], -1)

    def _native_model(self) -> tuple[int, Tensor] | None:
        """The Euler step's compiled copy: model 2, constants ``_constants()`` and ``dt``."""
        if not self._own_step(Cartpole, "accel"):
            return None
        consts = self._constants()
        return 2, torch.stack([*consts, consts[0].new_tensor(self.dt)])

    def _euler_expansion(self, x: Tensor, u: Tensor):
        """First and second derivatives of the Euler step's accelerations and angle in the
        coordinates ``r = [cos th, sin th, thdot, force]`` (the cart's position and velocity do
        not enter them). With ``a = (u + m_pole l thdot^2 sin th) / M``, ``thddot = N / D``
        (``N = g sin th - cos th a``, ``D = l (4/3 - k cos^2 th)``, ``k = m_pole / M``) and
        ``pddot = a - mu thddot cos th`` (``mu = m_pole l / M``).

        Returns a dict of ``[N]`` tensors and ``[4, N]`` gradients (rows last, see
        ``angle_output_curvature``; see the code for the names). The gradient of ``cos th`` in
        r, ``e_c``, is the first unit vector: its terms are written as updates of the first entry.
        """
        _, _, c, s, w = x.unbind(-1)
        F = u[..., 0]
        dt = self.dt
        l, g, inv_M, _, k, mu = self._constants()
        a = inv_M * F + mu * s * w * w
        D = l * (4.0 / 3.0 - k * c * c)
        q = (g * s - c * a) / D  # thddot
        zero, one = torch.zeros_like(c), torch.ones_like(c)
        ga = torch.stack([zero, mu * w * w, 2 * mu * s * w, inv_M * one])
        gN = torch.stack([-a, g * one, zero, zero]) - c * ga
        d = -2 * l * k * c  # gradient of D: d e_c
        gN[0] -= q * d
        gq = gN / D
        cgq = c * gq
        cgq[0] += q
        gp = ga - mu * cgq  # gradient of pddot: ga - mu (c gq + q e_c)
        th_n = torch.atan2(s, c) + dt * w
        d_c, d_s, h_cc, h_cs, h_ss = angle_derivatives(c, s)
        phi = torch.stack([d_c, d_s, dt * one, zero])
        return dict(c=c, s=s, w=w, mu=mu, k=k, l=l, D=D, q=q, d=d, ga=ga, gq=gq,
                    gp=gp, cos_n=torch.cos(th_n), sin_n=torch.sin(th_n), phi=phi,
                    h=(h_cc, h_cs, h_ss))

    def jacobian(self, x: Tensor, u: Tensor) -> Tensor | None:
        """Closed-form Jacobian ``[N, 5, 6]`` of the Euler step in ``[x, u]`` (x ``[N, 5]``, u
        ``[N, 1]``); None for RK4 (the solver then differentiates ``forward`` by autograd).
        Differentiable in the parameters."""
        if not euler_closed_form(self, x, u):
            return None
        e = self._euler_expansion(x, u)
        dt, phi = self.dt, e["phi"]
        g_w = dt * e["gq"]
        g_w[2] += 1.0  # thdot' = thdot + dt thddot
        rows = torch.stack([dt * e["gp"], -e["sin_n"] * phi, e["cos_n"] * phi, g_w])
        J = rows_first(rows, 1, 2)  # v', cos th', sin th', thdot' in r
        J[:, 0, 0], J[:, 0, 1], J[:, 1, 1] = 1.0, dt, 1.0  # p' = p + dt v, v' = v + dt pddot
        return J

    def curvature(self, x: Tensor, u: Tensor, lam: Tensor) -> Tensor | None:
        """Closed-form ``sum_i lam_i Hess f_i`` ``[N, 6, 6]`` of the Euler step ``f`` in ``[x, u]``,
        weighted by ``lam [N, 5]``; None for RK4 (autograd then).

        Only ``pddot`` (through v'), ``thddot`` (through thdot') and the angle (through cos th',
        sin th') are nonlinear; with ``Hess pddot = Hess a - mu (c Hess thddot + e_c gq' +
        gq e_c')`` and the quotient rule for ``thddot = N / D`` the weighted sum collapses to
        ``(dt lam_v - beta c) Hess a - e_c h' - h e_c' + 2 l k q beta e_c e_c'`` plus the angle's
        part, with ``beta = dt (lam_w - mu c lam_v) / D`` and
        ``h = beta (ga + d gq) + dt mu lam_v gq``.
        """
        block = self.curvature_block(x, u, lam)
        return None if block is None else rows_first(block[0], block[1])

    def curvature_block(self, x: Tensor, u: Tensor, lam: Tensor) -> tuple[Tensor, int] | None:
        """``curvature`` as its rows-last block ``[4, 4, N]`` in ``r = [cos th, sin th, thdot,
        force]`` and the block's first coordinate in ``[x, u]`` (2; the cart's position and
        velocity enter linearly); None for RK4."""
        if not euler_closed_form(self, x, u):
            return None
        e = self._euler_expansion(x, u)
        dt, c, gq = self.dt, e["c"], e["gq"]
        lam_v, lam_c, lam_s, lam_w = lam[:, 1], lam[:, 2], lam[:, 3], lam[:, 4]
        beta = dt * (lam_w - e["mu"] * c * lam_v) / e["D"]
        h = beta * (e["ga"] + e["d"] * gq) + (dt * e["mu"] * lam_v) * gq
        H = angle_output_curvature(e["cos_n"], e["sin_n"], lam_c, lam_s, e["phi"], *e["h"], 0, 1)
        H[0] -= h  # - e_c h'
        H[:, 0] -= h  # - h e_c'
        H[0, 0] += 2 * e["l"] * e["k"] * e["q"] * beta
        ha = (dt * lam_v - beta * c) * 2 * e["mu"]  # Hess a: [s, w] = 2 mu w, [w, w] = 2 mu s
        H[1, 2] += ha * e["w"]
        H[2, 1] += ha * e["w"]
        H[2, 2] += ha * e["s"]
        return H, 2

    def default_cost(self, **kwargs) -> GoalCost:
        """CartpoleDx's cost: goal ``[0, 0, 1, 0, 0]``, weights ``[0.1, 0.1, 1, 1, 0.1]``,
        control 0.001, i.e. ``1/2 sum_i w_i (x_i - goal_i)^2 + 1/2 0.001 u^2`` per step.

        Args:
            **kwargs: passed to ``GoalCost`` (``learn_goal``, ``learn_weights``).
        """
        dtype = self.log_g.dtype
        return GoalCost(
            torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0], dtype=dtype),
            torch.tensor([0.1, 0.1, 1.0, 1.0, 0.1], dtype=dtype),
            torch.tensor([0.001], dtype=dtype),
            **kwargs,
        )

    def extra_repr(self) -> str:
        return f"dt={self.dt}, method={self.method!r}"
