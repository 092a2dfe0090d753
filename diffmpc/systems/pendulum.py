"""Torque-driven pendulum (a uniform rod on a pivot), the physics of Gymnasium's Pendulum-v1."""

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

__all__ = ["Pendulum"]


class Pendulum(StepModel):
    """Pendulum swing-up model with learnable gravity, mass and length.

    State ``x = [cos th, sin th, thdot]`` with ``th = 0`` upright (counter-clockwise positive);
    control ``u = [torque]`` in N m. The continuous dynamics are those of a uniform rod of mass
    ``m`` and length ``l`` pivoted at one end::

        thddot = 3 g / (2 l) sin th + 3 u / (m l^2)

    ``method="euler"`` is the semi-implicit Euler step of mpc.pytorch's ``PendulumDx`` and
    Gymnasium's Pendulum-v1 (``thdot' = thdot + dt thddot``, then ``th' = th + dt thdot'``);
    ``method="rk4"`` integrates ``(th, thdot)`` with classical RK4.

    Differences from ``PendulumDx``: ``u`` is not clamped inside the model (the model stays
    smooth; the solver enforces ``u_lower <= u <= u_upper`` and the envs clip actions), and
    Gymnasium's clip of ``thdot`` to [-8, 8] is not modelled.

    Args:
        g, m, l: gravity (m/s^2), mass (kg), length (m); learnable, positive (stored as logs).
        dt: time step (s).
        method: ``"euler"`` or ``"rk4"``.
        max_torque: the control bounds are ``[-max_torque, max_torque]``.
        dtype: dtype of the parameters and bounds (None: ``torch.get_default_dtype()``).

    Example:
        >>> pend = Pendulum()
        >>> pend(torch.tensor([[1.0, 0.0, 0.0]]), torch.zeros(1, 1)).shape
        torch.Size([1, 3])
    """

    n_state = 3
    n_ctrl = 1

    def __init__(
        self,
        g: float = 10.0,
        m: float = 1.0,
        l: float = 1.0,
        dt: float = 0.05,
        method: str = "euler",
        max_torque: float = 2.0,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.log_g = log_param("Pendulum", "g", g, dtype)
        self.log_m = log_param("Pendulum", "m", m, dtype)
        self.log_l = log_param("Pendulum", "l", l, dtype)
        init_step_and_bounds(self, "Pendulum", dt, method, "max_torque", max_torque, dtype)

    @property
    def g(self) -> Tensor:
        return self.log_g.exp()

    @property
    def m(self) -> Tensor:
        return self.log_m.exp()

    @property
    def l(self) -> Tensor:
        return self.log_l.exp()

    def _coeffs(self) -> tuple[Tensor, Tensor]:
        """``(alpha, beta)`` of ``thddot = alpha sin th + beta u``."""
        return 1.5 * self.g / self.l, 3.0 / (self.m * self.l**2)

    def accel(self, sin_th: Tensor, torque: Tensor, coeffs: tuple[Tensor, Tensor] | None = None
              ) -> Tensor:
        """Angular acceleration ``thddot [...]`` from ``sin th [...]`` and ``torque [...]``
        (``coeffs``: ``_coeffs()``, if the caller has it)."""
        alpha, beta = self._coeffs() if coeffs is None else coeffs
        return alpha * sin_th + beta * torque

    def _constants(self) -> tuple[Tensor, ...]:
        """``(alpha, beta, dt alpha, dt beta)`` (``_coeffs``, and the Euler step's products)."""
        alpha, beta = self._coeffs()
        return alpha, beta, self.dt * alpha, self.dt * beta

    def _step(self, x: Tensor, u: Tensor, consts: tuple[Tensor, ...]) -> Tensor:
        c, s, w = x.unbind(-1)
        th = torch.atan2(s, c)
        coeffs = consts[:2]
        if self.method == "euler":
            # fused: the solver takes this step thousands of times per solve on small batches,
            # where each operation costs its dispatch
            w_next = torch.addcmul(torch.addcmul(w, s, consts[2]), u[..., 0], consts[3])
            th_next = torch.add(th, w_next, alpha=self.dt)
        else:
            def qdot(q: Tensor, u: Tensor) -> Tensor:  # q = [th, thdot]
                th, w = q.unbind(-1)
                return torch.stack([w, self.accel(torch.sin(th), u[..., 0], coeffs)], -1)

            q = explicit_step(qdot, torch.stack([th, w], -1), u, self.dt, "rk4")
            th_next, w_next = q.unbind(-1)
        return torch.stack([torch.cos(th_next), torch.sin(th_next), w_next], -1)

    def _native_model(self) -> tuple[int, Tensor] | None:
        """The Euler step's compiled copy: model 1, constants ``[dt alpha, dt beta, dt]``."""
        if not self._own_step(Pendulum, "_coeffs"):
            return None
        consts = self._constants()
        return 1, torch.stack([consts[2], consts[3], consts[2].new_tensor(self.dt)])

    def _euler_expansion(self, x: Tensor, u: Tensor):
        """Pieces of the Euler step's derivatives in ``z = [cos th, sin th, thdot, u]``:
        ``cos th'``, ``sin th'`` ``[N]``, the gradients of ``th'`` and ``thdot'`` ``[4, N]`` (rows
        last, see ``angle_output_curvature``), and the Hessian entries of ``atan2``
        (``angle_derivatives``)."""
        c, s, w = x.unbind(-1)
        dt = self.dt
        alpha, beta = self._coeffs()
        w_n = w + dt * (alpha * s + beta * u[..., 0])
        th_n = torch.atan2(s, c) + dt * w_n
        d_c, d_s, h_cc, h_cs, h_ss = angle_derivatives(c, s)
        zero, one = torch.zeros_like(c), torch.ones_like(c)
        grad_w = torch.stack([zero, dt * alpha * one, one, dt * beta * one])
        phi = torch.stack([d_c, d_s, zero, zero]) + dt * grad_w  # th' = th + dt thdot'
        return torch.cos(th_n), torch.sin(th_n), phi, grad_w, (h_cc, h_cs, h_ss)

    def jacobian(self, x: Tensor, u: Tensor) -> Tensor | None:
        """Closed-form Jacobian ``[N, 3, 4]`` of the Euler step in ``[x, u]`` (x ``[N, 3]``, u
        ``[N, 1]``); None for RK4 (the solver then differentiates ``forward`` by autograd).
        Differentiable in the parameters."""
        if not euler_closed_form(self, x, u):
            return None
        cos_n, sin_n, phi, grad_w, _ = self._euler_expansion(x, u)
        return rows_first(torch.stack([-sin_n * phi, cos_n * phi, grad_w]))

    def curvature(self, x: Tensor, u: Tensor, lam: Tensor) -> Tensor | None:
        """Closed-form ``sum_i lam_i Hess f_i`` ``[N, 4, 4]`` of the Euler step ``f`` in ``[x, u]``,
        weighted by ``lam [N, 3]``; None for RK4 (autograd then)."""
        block = self.curvature_block(x, u, lam)
        return None if block is None else rows_first(block[0], block[1])

    def curvature_block(self, x: Tensor, u: Tensor, lam: Tensor) -> tuple[Tensor, int] | None:
        """``curvature`` as its rows-last block ``[4, 4, N]`` and the block's first coordinate in
        ``[x, u]`` (0: every coordinate); None for RK4."""
        if not euler_closed_form(self, x, u):
            return None
        cos_n, sin_n, phi, _, h = self._euler_expansion(x, u)
        return angle_output_curvature(cos_n, sin_n, lam[:, 0], lam[:, 1], phi, *h, 0, 1), 0

    def default_cost(self, **kwargs) -> GoalCost:
        """PendulumDx's cost: goal ``[1, 0, 0]``, weights ``[1, 1, 0.1]``, control 0.001.

        The cost per step is ``1/2 sum_i w_i (x_i - goal_i)^2 + 1/2 0.001 u^2``.

        Args:
            **kwargs: passed to ``GoalCost`` (``learn_goal``, ``learn_weights``).
        """
        dtype = self.log_g.dtype
        return GoalCost(
            torch.tensor([1.0, 0.0, 0.0], dtype=dtype),
            torch.tensor([1.0, 1.0, 0.1], dtype=dtype),
            torch.tensor([0.001], dtype=dtype),
            **kwargs,
        )

    def extra_repr(self) -> str:
        return f"dt={self.dt}, method={self.method!r}"
