"""Costs: the quadratic cost tensors and learnable cost modules.

A cost is either ``QuadCost(C, c)``, ``cost_t(tau) = 1/2 tau' C_t tau + c_t' tau`` with
``tau_t = [x_t; u_t]``, or any differentiable module ``cost(x [..., n], u [..., m]) -> [...]``
evaluated independently at every time step; the solver takes its second-order expansion itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

__all__ = ["QuadCost", "GoalCost", "PSDQuadCost"]


class QuadCost:
    """Time-varying quadratic cost ``1/2 tau_t' C_t tau_t + c_t' tau_t``.

    Args:
        C: ``[B, T, n+m, n+m]`` symmetric; leading dimensions may be left out and broadcast.
        c: ``[B, T, n+m]`` or None for zero; leading dimensions may be left out.

    Example:
        >>> cost = QuadCost(torch.eye(3), torch.zeros(3))       # n + m = 3, any B and T
        >>> cost(torch.ones(5, 2), torch.ones(5, 1)).shape
        torch.Size([5])
    """

    def __init__(self, C: Tensor, c: Tensor | None = None) -> None:
        if not isinstance(C, Tensor):
            raise ValueError(f"QuadCost: C must be a torch.Tensor, got {type(C).__name__}")
        if C.dim() < 2 or C.shape[-1] != C.shape[-2]:
            raise ValueError(
                f"QuadCost: C must have shape [B, T, n+m, n+m] (leading dims optional), "
                f"got shape {tuple(C.shape)}"
            )
        if c is not None and not isinstance(c, Tensor):
            raise ValueError(f"QuadCost: c must be a torch.Tensor or None, got {type(c).__name__}")
        self.C = C
        self.c = c

    def __call__(self, x: Tensor, u: Tensor) -> Tensor:
        """Cost of ``x [..., n]``, ``u [..., m]`` (leading dims broadcast with C's) -> ``[...]``."""
        tau = torch.cat([x, u], -1)
        val = 0.5 * (tau.unsqueeze(-2) @ self.C @ tau.unsqueeze(-1)).squeeze(-1).squeeze(-1)
        if self.c is not None:
            val = val + (tau * self.c).sum(-1)
        return val

    def __repr__(self) -> str:
        c_shape = None if self.c is None else tuple(self.c.shape)
        return f"QuadCost(C={tuple(self.C.shape)}, c={c_shape})"


class GoalCost(nn.Module):
    """Learnable goal-weighted cost ``1/2 sum_i w_i (x_i - g_i)^2 + 1/2 sum_j r_j u_j^2``.

    Weights are positive by construction (softplus of a free parameter), so the cost is convex;
    the goal ``g`` is learnable too unless ``learn_goal=False``.

    Args:
        goal: ``[n]`` goal state.
        state_weight: ``[n]`` initial weights ``w`` (> 0).
        ctrl_weight: ``[m]`` initial control weights ``r`` (> 0).
        learn_goal, learn_weights: which parts are parameters.
    """

    def __init__(
        self,
        goal: Tensor,
        state_weight: Tensor,
        ctrl_weight: Tensor,
        learn_goal: bool = True,
        learn_weights: bool = True,
    ) -> None:
        super().__init__()
        goal, state_weight, ctrl_weight = map(torch.as_tensor, (goal, state_weight, ctrl_weight))
        for name, w in (("state_weight", state_weight), ("ctrl_weight", ctrl_weight)):
            if w.dim() != 1 or not bool((w > 0).all()):
                raise ValueError(f"GoalCost: {name} must be a 1-D tensor of positive values, got {w}")
        if goal.shape != state_weight.shape:
            raise ValueError(
                f"GoalCost: goal must have the shape of state_weight {tuple(state_weight.shape)}, "
                f"got {tuple(goal.shape)}"
            )
        goal = goal.to(state_weight.dtype)
        self.goal = nn.Parameter(goal.clone(), requires_grad=learn_goal)
        self.raw_state_weight = nn.Parameter(_inv_softplus(state_weight), requires_grad=learn_weights)
        self.raw_ctrl_weight = nn.Parameter(_inv_softplus(ctrl_weight), requires_grad=learn_weights)

    @property
    def state_weight(self) -> Tensor:
        return nnf.softplus(self.raw_state_weight)

    @property
    def ctrl_weight(self) -> Tensor:
        return nnf.softplus(self.raw_ctrl_weight)

    def forward(self, x: Tensor, u: Tensor) -> Tensor:
        dx = x - self.goal
        return 0.5 * (self.state_weight * dx * dx).sum(-1) + 0.5 * (self.ctrl_weight * u * u).sum(-1)

    def quad_cost(self) -> QuadCost:
        """The same cost as ``QuadCost`` tensors ``C [p, p]``, ``c [p]`` (the LQR fast path)."""
        w, r = self.state_weight, self.ctrl_weight
        C = torch.diag(torch.cat([w, r]))
        c = torch.cat([-w * self.goal, torch.zeros_like(r)])
        return QuadCost(C, c)


class PSDQuadCost(nn.Module):
    """Learnable full quadratic cost with ``C = L L' + eps I`` (positive definite by construction).

    Args:
        n_state, n_ctrl: sizes.
        eps: the floor added to the diagonal.
        C_init: optional ``[p, p]`` symmetric positive definite initial C.
    """

    def __init__(self, n_state: int, n_ctrl: int, eps: float = 1e-4, C_init: Tensor | None = None):
        super().__init__()
        p = n_state + n_ctrl
        if C_init is None:
            C_init = torch.eye(p)
        C_init = torch.as_tensor(C_init)
        if C_init.shape != (p, p):
            raise ValueError(f"PSDQuadCost: C_init must have shape {(p, p)}, got {tuple(C_init.shape)}")
        L = torch.linalg.cholesky(C_init - eps * torch.eye(p, dtype=C_init.dtype))
        self.eps = float(eps)
        self.L = nn.Parameter(L)
        self.c = nn.Parameter(torch.zeros(p, dtype=C_init.dtype))

    @property
    def C(self) -> Tensor:
        L = torch.tril(self.L)
        return L @ L.mT + self.eps * torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)

    def forward(self, x: Tensor, u: Tensor) -> Tensor:
        return self.quad_cost()(x, u)

    def quad_cost(self) -> QuadCost:
        return QuadCost(self.C, self.c)


def _inv_softplus(y: Tensor) -> Tensor:
    y = y.to(torch.get_default_dtype()) if not y.is_floating_point() else y
    return y + torch.log(-torch.expm1(-y))
