"""Planar two-link arm (two uniform rods, torque at each joint) and a reaching cost."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from diffmpc.systems._common import StepModel, explicit_step, init_step_and_bounds, log_param

__all__ = ["TwoLinkArm", "ReachCost"]


class TwoLinkArm(StepModel):
    """Two-link arm in a vertical plane (``g > 0``) or a horizontal one (``g = 0``).

    State ``x = [q1, q2, dq1, dq2]``: ``q1`` is the angle of link 1 from the horizontal x-axis,
    ``q2`` that of link 2 relative to link 1 (counter-clockwise positive, gravity along -y);
    control ``u = [tau1, tau2]`` joint torques in N m. Links are uniform rods (mass ``m_i``,
    length ``l_i``, centre of mass at ``l_i / 2``, inertia ``m_i l_i^2 / 12``). The manipulator
    equation::

        M(q) qddot + C(q, dq) dq + G(q) = tau - damping * dq

    with ``M11 = a + 2 b cos q2``, ``M12 = d + b cos q2``, ``M22 = d``, ``a = m1 l1^2/3 +
    m2 l1^2 + m2 l2^2/3``, ``b = m2 l1 l2 / 2``, ``d = m2 l2^2 / 3``;
    ``C dq = b sin q2 [-(2 dq1 dq2 + dq2^2), dq1^2]``;
    ``G = g [(m1 l1/2 + m2 l1) cos q1 + m2 l2/2 cos(q1+q2), m2 l2/2 cos(q1+q2)]``.

    Args:
        m1, m2, l1, l2: link masses (kg) and lengths (m); learnable, positive (stored as logs).
        damping: viscous joint damping (N m s); learnable, positive (use a tiny value for an
            undamped arm). With the other defaults, RK4 at ``dt = 0.05`` stays stable under any
            torques within the bounds for damping in about [0.4, 1.2] (too little lets the
            links spin up until the step is unstable, too much makes the damping term stiff).
        g: gravity (m/s^2), a fixed number >= 0; 0 puts the arm in a horizontal plane.
        dt: time step (s).
        method: ``"rk4"`` or ``"euler"`` (explicit).
        max_torque: the control bounds are ``[-max_torque, max_torque]`` for both joints.
        dtype: dtype of the parameters and bounds (None: ``torch.get_default_dtype()``).

    Example:
        >>> arm = TwoLinkArm()
        >>> arm(torch.zeros(2, 4), torch.zeros(2, 2)).shape
        torch.Size([2, 4])
    """

    n_state = 4
    n_ctrl = 2

    def __init__(
        self,
        m1: float = 1.0,
        m2: float = 1.0,
        l1: float = 0.5,
        l2: float = 0.5,
        damping: float = 0.7,
        g: float = 9.81,
        dt: float = 0.05,
        method: str = "rk4",
        max_torque: float = 15.0,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.log_m1 = log_param("TwoLinkArm", "m1", m1, dtype)
        self.log_m2 = log_param("TwoLinkArm", "m2", m2, dtype)
        self.log_l1 = log_param("TwoLinkArm", "l1", l1, dtype)
        self.log_l2 = log_param("TwoLinkArm", "l2", l2, dtype)
        self.log_damping = log_param("TwoLinkArm", "damping", damping, dtype)
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
            raise ValueError(f"TwoLinkArm: g must be a finite number >= 0, got {g!r}")
        self.g = float(g)
        init_step_and_bounds(self, "TwoLinkArm", dt, method, "max_torque", max_torque, dtype)

    @property
    def m1(self) -> Tensor:
        return self.log_m1.exp()

    @property
    def m2(self) -> Tensor:
        return self.log_m2.exp()

    @property
    def l1(self) -> Tensor:
        return self.log_l1.exp()

    @property
    def l2(self) -> Tensor:
        return self.log_l2.exp()

    @property
    def damping(self) -> Tensor:
        return self.log_damping.exp()

    def _abd(self) -> tuple[Tensor, Tensor, Tensor]:
        """The inertia constants ``a, b, d`` of the mass matrix (see the class docstring)."""
        m1, m2, l1, l2 = self.m1, self.m2, self.l1, self.l2
        d = m2 * l2**2 / 3.0
        return m1 * l1**2 / 3.0 + m2 * l1**2 + d, 0.5 * m2 * l1 * l2, d

    def mass_matrix(self, q: Tensor) -> Tensor:
        """``M(q) [..., 2, 2]`` (symmetric positive definite) from joint angles ``q [..., 2]``."""
        a, b, d = self._abd()
        c2 = torch.cos(q[..., 1])
        m11, m12, m22 = a + 2.0 * b * c2, d + b * c2, d + 0.0 * c2
        return torch.stack([torch.stack([m11, m12], -1), torch.stack([m12, m22], -1)], -2)

    def end_effector(self, q: Tensor) -> Tensor:
        """Tip position ``[..., 2]`` (m, shoulder at the origin) of joint angles ``q [..., 2]``."""
        q1, q12 = q[..., 0], q[..., 0] + q[..., 1]
        px = self.l1 * torch.cos(q1) + self.l2 * torch.cos(q12)
        py = self.l1 * torch.sin(q1) + self.l2 * torch.sin(q12)
        return torch.stack([px, py], -1)

    def energy(self, x: Tensor) -> Tensor:
        """Kinetic plus potential energy ``[...]`` (J) of states ``x [..., 4]``."""
        q, dq = x[..., :2], x[..., 2:]
        kinetic = 0.5 * (dq.unsqueeze(-2) @ self.mass_matrix(q) @ dq.unsqueeze(-1))[..., 0, 0]
        y1 = 0.5 * self.l1 * torch.sin(q[..., 0])
        y2 = self.l1 * torch.sin(q[..., 0]) + 0.5 * self.l2 * torch.sin(q[..., 0] + q[..., 1])
        return kinetic + self.g * (self.m1 * y1 + self.m2 * y2)

    def _constants(self) -> tuple[Tensor, ...]:
        """What ``accel`` needs of the parameters: ``a, b, d`` (``_abd``), the gravity factors
        ``(m1/2 + m2) l1`` and ``g m2 l2 / 2``, and the damping."""
        m1, m2, l1, l2 = self.m1, self.m2, self.l1, self.l2
        return (*self._abd(), (0.5 * m1 + m2) * l1, self.g * 0.5 * m2 * l2, self.damping)

    def accel(self, x: Tensor, u: Tensor, consts: tuple[Tensor, ...] | None = None) -> Tensor:
        """Joint accelerations ``qddot [..., 2]`` from ``x [..., 4]`` and ``u [..., 2]``
        (``consts``: ``_constants()``, if the caller has it)."""
        q1, q2, w1, w2 = x.unbind(-1)
        a, b, d, k1, k2, damping = self._constants() if consts is None else consts
        c2, h = torch.cos(q2), b * torch.sin(q2)
        g1 = self.g * (k1 * torch.cos(q1))
        g2 = k2 * torch.cos(q1 + q2)
        r1 = u[..., 0] - damping * w1 + h * (2.0 * w1 * w2 + w2**2) - g1 - g2
        r2 = u[..., 1] - damping * w2 - h * w1**2 - g2
        m11, m12 = a + 2.0 * b * c2, d + b * c2
        det = m11 * d - m12**2  # > 0: M is positive definite
        return torch.stack([(d * r1 - m12 * r2) / det, (m11 * r2 - m12 * r1) / det], -1)

    def xdot(self, x: Tensor, u: Tensor, consts: tuple[Tensor, ...] | None = None) -> Tensor:
        """Continuous-time dynamics ``[dq, qddot] [..., 4]``."""
        return torch.cat([x[..., 2:], self.accel(x, u, consts)], -1)

    def _step(self, x: Tensor, u: Tensor, consts: tuple[Tensor, ...]) -> Tensor:
        return explicit_step(lambda y, v: self.xdot(y, v, consts), x, u, self.dt, self.method)

    def default_cost(self, target: tuple[float, float] = (0.6, 0.4), **kwargs) -> ReachCost:
        """A ``ReachCost`` for reaching ``target`` (m) with this arm's end effector.

        Args:
            target: the point to reach, ``(x, y)`` in m.
            **kwargs: passed to ``ReachCost`` (weights, ``learn_target``, ``learn_weights``).
        """
        dtype = self.log_m1.dtype
        return ReachCost(self.end_effector, torch.tensor(target, dtype=dtype), **kwargs)

    def extra_repr(self) -> str:
        return f"g={self.g}, dt={self.dt}, method={self.method!r}"


class ReachCost(nn.Module):
    """Reaching cost ``1/2 w_p |e(q) - target|^2 + 1/2 sum_i w_v,i dq_i^2 + 1/2 sum_j r_j u_j^2``.

    Non-quadratic in the state (``e`` is the forward kinematics). Weights are positive by
    construction (stored as logs). ``end_effector`` is called, not owned: pass
    ``arm.end_effector`` and the arm's parameters stay the arm's (gradients still reach them).

    Args:
        end_effector: ``q [..., 2] -> position [..., 2]``.
        target: ``[2]`` point to reach.
        pos_weight: ``w_p`` (> 0).
        vel_weight: ``[2]`` or a float, ``w_v`` (> 0).
        ctrl_weight: ``[2]`` or a float, ``r`` (> 0).
        learn_target, learn_weights: which parts are parameters.
    """

    def __init__(
        self,
        end_effector: Callable[[Tensor], Tensor],
        target: Tensor,
        pos_weight: float = 10.0,
        vel_weight: float | Tensor = 0.1,
        ctrl_weight: float | Tensor = 1e-3,
        learn_target: bool = False,
        learn_weights: bool = True,
    ) -> None:
        super().__init__()
        if not callable(end_effector):
            raise ValueError(f"ReachCost: end_effector must be callable, got {type(end_effector)}")
        target = torch.as_tensor(target)
        if target.shape != (2,) or not target.is_floating_point():
            raise ValueError(f"ReachCost: target must be a float tensor of shape [2], "
                             f"got {target!r}")
        self.end_effector = end_effector
        self.target = nn.Parameter(target.clone(), requires_grad=learn_target)
        dtype, learn = target.dtype, learn_weights
        self.log_pos_weight = _log_weight("pos_weight", pos_weight, (), dtype, learn)
        self.log_vel_weight = _log_weight("vel_weight", vel_weight, (2,), dtype, learn)
        self.log_ctrl_weight = _log_weight("ctrl_weight", ctrl_weight, (2,), dtype, learn)

    def forward(self, x: Tensor, u: Tensor) -> Tensor:
        """Cost ``[...]`` of states ``x [..., 4]`` and controls ``u [..., 2]``."""
        e = self.end_effector(x[..., :2]) - self.target
        dq = x[..., 2:]
        return 0.5 * (
            self.log_pos_weight.exp() * (e * e).sum(-1)
            + (self.log_vel_weight.exp() * dq * dq).sum(-1)
            + (self.log_ctrl_weight.exp() * u * u).sum(-1)
        )


def _log_weight(name: str, w, shape: tuple, dtype: torch.dtype, learn: bool) -> nn.Parameter:
    """``log(w)`` as a parameter of ``shape``; ``w`` a positive float or tensor of that shape."""
    w = torch.as_tensor(w, dtype=dtype)
    if w.dim() == 0:
        w = w.expand(shape)
    if w.shape != shape or not bool((w > 0).all()) or not bool(torch.isfinite(w).all()):
        raise ValueError(f"ReachCost: {name} must be a positive float or a positive tensor of "
                         f"shape {list(shape)}, got {w}")
    return nn.Parameter(w.log().clone(), requires_grad=learn)
