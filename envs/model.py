"""What an MPC needs to control an env: ``env.unwrapped.model()`` returns an ``EnvModel``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["EnvModel"]


@dataclass
class EnvModel:
    """The nominal model of an env, in the convention of ``diffmpc.MPC``.

    Attributes:
        dynamics: differentiable ``dynamics(x [B, n], u [B, m]) -> [B, n]`` (an ``nn.Module``).
        cost: cost module ``cost(x [..., n], u [..., m]) -> [...]`` consistent with the reward
            (a ``diffmpc.GoalCost`` or ``QuadCost`` where the reward is quadratic).
        n_state, n_ctrl: sizes of the MPC state and control.
        horizon: default MPC horizon T.
        u_lower, u_upper: ``[m]`` control bounds in MPC units.
        obs_to_state: ``obs [B, obs_dim] -> x [B, n]`` (torch).
        ctrl_to_action: ``u [B, m] -> action [B, act_dim]`` in the env's normalized [-1, 1] units.
        action_to_ctrl: the inverse map.
        dt: seconds per env step.
    """

    dynamics: nn.Module
    cost: nn.Module
    n_state: int
    n_ctrl: int
    horizon: int
    u_lower: Tensor
    u_upper: Tensor
    obs_to_state: Callable[[Tensor], Tensor]
    ctrl_to_action: Callable[[Tensor], Tensor]
    action_to_ctrl: Callable[[Tensor], Tensor]
    dt: float

    def to(self, dtype: torch.dtype) -> EnvModel:
        """Cast the modules and bounds to ``dtype`` (in place for the modules)."""
        self.dynamics.to(dtype)
        self.cost.to(dtype)
        self.u_lower, self.u_upper = self.u_lower.to(dtype), self.u_upper.to(dtype)
        return self
