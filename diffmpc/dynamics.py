"""Dynamics: the protocol the solver accepts, linear time-varying dynamics, integrators.

Notation (shared by the whole package): B batch, T horizon (T states x_0..x_{T-1} and T controls
u_0..u_{T-1}), n state size, m control size, p = n + m, tau_t = [x_t; u_t].

A dynamics model is any differentiable callable ``dynamics(x [N, n], u [N, m]) -> [N, n]`` whose
rows are independent (sample i of the output depends only on row i of x and u). An
``nn.Module`` with parameters is the usual case; the solver differentiates it with autograd.
A model may also supply derivatives in closed form, which the solver then uses instead of
autograd (both may return None to leave a case to autograd):

- ``jacobian(x [N, n], u [N, m]) -> [N, n, p]``, the Jacobian of the step in ``[x, u]``;
- ``curvature(x [N, n], u [N, m], lam [N, n]) -> [N, p, p]``, ``sum_i lam_i Hess f_i``, the
  dynamics' second-order term of Newton steps and of the exact implicit gradient.

Both must be differentiable in the model's parameters where unrolled gradients are wanted
(``backward="unroll"``). ``diffmpc.systems.Pendulum`` and ``Cartpole`` supply both for their
Euler steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["LinearDynamics", "ContinuousDynamics", "Discretize", "euler_step", "rk4_step"]


class LinearDynamics:
    """Time-varying affine dynamics ``x_{t+1} = F_t [x_t; u_t] + f_t``.

    Args:
        F: ``[B, T-1, n, n+m]`` (leading dimensions may be left out and broadcast).
        f: ``[B, T-1, n]`` or None for zero (leading dimensions may be left out).

    Example:
        >>> F = torch.cat([torch.eye(2), torch.ones(2, 1)], -1)   # [n, n+m], time-invariant
        >>> dyn = LinearDynamics(F)
        >>> dyn.step(torch.zeros(4, 2), torch.ones(4, 1), t=0).shape
        torch.Size([4, 2])
    """

    def __init__(self, F: Tensor, f: Tensor | None = None) -> None:
        if not isinstance(F, Tensor):
            raise ValueError(f"LinearDynamics: F must be a torch.Tensor, got {type(F).__name__}")
        if F.dim() < 2:
            raise ValueError(
                f"LinearDynamics: F must have shape [B, T-1, n, n+m] (leading dims optional), "
                f"got shape {tuple(F.shape)}"
            )
        if f is not None and not isinstance(f, Tensor):
            raise ValueError(f"LinearDynamics: f must be a torch.Tensor or None, got {type(f)}")
        self.F = F
        self.f = f

    @property
    def n_state(self) -> int:
        return self.F.shape[-2]

    def step(self, x: Tensor, u: Tensor, t: int) -> Tensor:
        """One transition at time ``t``: x ``[..., B, n]``, u ``[..., B, m]`` -> ``[..., B, n]``."""
        F_t = self.F[..., t, :, :] if self.F.dim() >= 3 else self.F
        tau = torch.cat([x, u], -1)
        out = (F_t @ tau.unsqueeze(-1)).squeeze(-1)
        if self.f is not None:
            out = out + (self.f[..., t, :] if self.f.dim() >= 2 else self.f)
        return out

    def __repr__(self) -> str:
        f_shape = None if self.f is None else tuple(self.f.shape)
        return f"LinearDynamics(F={tuple(self.F.shape)}, f={f_shape})"


class ContinuousDynamics(nn.Module):
    """Base class for continuous-time models ``xdot = f(x, u)``; subclasses define ``xdot``."""

    def xdot(self, x: Tensor, u: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def euler_step(xdot: Callable[[Tensor, Tensor], Tensor], x: Tensor, u: Tensor, dt: float) -> Tensor:
    """Explicit Euler: ``x + dt * xdot(x, u)``."""
    return x + dt * xdot(x, u)


def rk4_step(xdot: Callable[[Tensor, Tensor], Tensor], x: Tensor, u: Tensor, dt: float) -> Tensor:
    """Classical fourth-order Runge-Kutta with the control held constant over the step."""
    k1 = xdot(x, u)
    k2 = xdot(x + 0.5 * dt * k1, u)
    k3 = xdot(x + 0.5 * dt * k2, u)
    k4 = xdot(x + dt * k3, u)
    return x + dt / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


_INTEGRATORS = {"euler": euler_step, "rk4": rk4_step}


class Discretize(nn.Module):
    """Discrete-time dynamics from a continuous-time model.

    Args:
        model: a module with ``xdot(x [N, n], u [N, m]) -> [N, n]``.
        dt: time step in seconds (> 0).
        method: ``"euler"`` or ``"rk4"``.
        substeps: integration steps per call (each of length ``dt / substeps``).
    """

    def __init__(self, model: nn.Module, dt: float, method: str = "rk4", substeps: int = 1):
        super().__init__()
        if method not in _INTEGRATORS:
            raise ValueError(f"Discretize: method must be one of {sorted(_INTEGRATORS)}, got {method!r}")
        if not dt > 0:
            raise ValueError(f"Discretize: dt must be > 0, got {dt}")
        if int(substeps) < 1:
            raise ValueError(f"Discretize: substeps must be >= 1, got {substeps}")
        self.model, self.dt, self.method, self.substeps = model, float(dt), method, int(substeps)

    def forward(self, x: Tensor, u: Tensor) -> Tensor:
        step, h = _INTEGRATORS[self.method], self.dt / self.substeps
        for _ in range(self.substeps):
            x = step(self.model.xdot, x, u, h)
        return x
