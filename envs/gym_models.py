"""Models of Gymnasium's own envs, in the convention of ``diffmpc.MPC`` (``EnvModel``)."""

from __future__ import annotations

from functools import partial

import gymnasium as gym
import numpy as np
import torch
from gymnasium.envs.classic_control.pendulum import PendulumEnv

from diffmpc.cost import GoalCost
from diffmpc.envs.base import action_to_ctrl, ctrl_to_action, identity
from diffmpc.envs.model import EnvModel
from diffmpc.systems import Pendulum

__all__ = ["gym_pendulum_model", "pendulum_v1_cost"]


def pendulum_v1_cost(dtype: torch.dtype = torch.float64) -> GoalCost:
    """The quadratic cost in ``[cos th, sin th, thdot, u]`` closest to Pendulum-v1's reward.

    Pendulum-v1 pays ``-(th^2 + 0.1 thdot^2 + 0.001 u^2)`` with ``th`` wrapped to [-pi, pi].
    ``th^2`` is not a quadratic in ``(cos th, sin th)``; ``(cos th - 1)^2 + sin^2 th =
    2 (1 - cos th)`` is, and it has the same value, slope and curvature at the goal
    (``th^2 - 2 (1 - cos th) = O(th^4)``) and the same ordering of angles (both grow with
    ``|th|``). So the cost is ``GoalCost(goal=[1, 0, 0], weights=[2, 2, 0.2], ctrl=[0.002])``::

        cost = (1 - cos th) * 2 + 0.1 thdot^2 + 0.001 u^2     (its 1/2 w (x - g)^2 form)

    The gap to ``-reward`` is ``th^2 - 2 (1 - cos th)``: 0 at the top, 0.08 at ``|th| = 1``,
    1.17 at ``|th| = 2``, ``pi^2 - 4 = 5.87`` hanging down. This cost is exactly twice the
    default cost of ``diffmpc.systems.Pendulum`` (PendulumDx's), so the two have the same
    minimizers.
    """
    return GoalCost(
        torch.tensor([1.0, 0.0, 0.0], dtype=dtype),
        torch.tensor([2.0, 2.0, 0.2], dtype=dtype),
        torch.tensor([0.002], dtype=dtype),
    )


def gym_pendulum_model(env: gym.Env, horizon: int = 40) -> EnvModel:
    """The ``EnvModel`` of Gymnasium's Pendulum-v1 (its physics read from ``env.unwrapped``).

    Dynamics: ``diffmpc.systems.Pendulum(g, m, l, dt, max_torque)`` (float64), identical to
    Pendulum-v1's step while ``|thdot| <= 8``; Pendulum-v1 clips the new ``thdot`` to [-8, 8]
    and the model does not (it stays smooth). Cost: ``pendulum_v1_cost()`` (see there for its
    gap to the reward). The observation ``[cos th, sin th, thdot]`` is the state.

    Actions: ``ctrl_to_action`` maps the torque range ``[-max_torque, max_torque]`` affinely
    onto ``env.action_space`` (the outermost one): the identity for the plain env, whose
    actions are torques in N m, and the right scaling under an affine action wrapper such as
    ``RescaleAction(env, -1, 1)``.

    Args:
        env: a Pendulum-v1 env, possibly wrapped.
        horizon: the default MPC horizon of the model (40: with |u| <= 2, shorter horizons can
            settle for holding the pendulum off the bottom instead of swinging it up).

    Raises:
        ValueError: if ``env.unwrapped`` is not Gymnasium's ``PendulumEnv``.
    """
    base = getattr(env, "unwrapped", None)
    if not isinstance(base, PendulumEnv):
        raise ValueError(f"gym_pendulum_model: env must be a (wrapped) Gymnasium Pendulum-v1, "
                         f"got {type(base if base is not None else env).__name__}")
    system = Pendulum(g=float(base.g), m=float(base.m), l=float(base.l), dt=float(base.dt),
                      max_torque=float(base.max_torque), dtype=torch.float64)
    lower, upper = system.u_lower.clone(), system.u_upper.clone()
    space = env.action_space
    a_lo = torch.as_tensor(np.asarray(space.low, dtype=np.float64))
    a_hi = torch.as_tensor(np.asarray(space.high, dtype=np.float64))

    to_action = partial(_rescale, src=(lower, upper), dst=(a_lo, a_hi))
    to_ctrl = partial(_rescale, src=(a_lo, a_hi), dst=(lower, upper))
    return EnvModel(
        dynamics=system,
        cost=pendulum_v1_cost(),
        n_state=3,
        n_ctrl=1,
        horizon=horizon,
        u_lower=lower,
        u_upper=upper,
        obs_to_state=identity,
        ctrl_to_action=to_action,
        action_to_ctrl=to_ctrl,
        dt=system.dt,
    )


def _rescale(v: torch.Tensor, src: tuple, dst: tuple) -> torch.Tensor:
    """Affine map of ``v [..., m]`` from the box ``src = (lo, hi)`` onto ``dst`` (``[m]`` each)."""
    return action_to_ctrl(ctrl_to_action(v, *src), *dst)
