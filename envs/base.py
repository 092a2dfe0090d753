"""Base class of the analytic envs: a Gymnasium env stepping a ``diffmpc.systems`` model.

The env holds the state as a ``[1, n]`` float64 tensor and steps it with the same torch code the
MPC differentiates, so ``env.unwrapped.model()`` is exact: its dynamics reproduce the env's
transitions to float precision and its cost is minus the env's reward. Subclasses set the
system and the observation bounds, and implement ``_sample_state`` and ``_draw``.

Conventions shared by the subclasses:

- actions are normalized: ``u = u_lower + (a + 1) / 2 (u_upper - u_lower)`` after clipping
  ``a`` to [-1, 1] (for symmetric bounds ``u = a * u_upper``);
- the observation is the model's state, cast to float32; unbounded components have the bound
  ``UNBOUNDED`` (float32's largest value, as in Gymnasium's CartPole-v1: infinite bounds make
  Gymnasium's env checker warn);
- the reward of a step is ``-cost(x_t, u_t)`` at the state before the step;
- no termination: episodes end by truncation (the ``TimeLimit`` of the registration).
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor, nn

from diffmpc.envs.model import EnvModel

__all__ = ["AnalyticEnv", "UNBOUNDED", "action_to_ctrl", "ctrl_to_action", "identity"]

UNBOUNDED = float(np.finfo(np.float32).max)


def action_to_ctrl(action: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """Affine map of ``action [..., m]`` from [-1, 1] to ``[lower, upper]`` (``[m]`` each)."""
    lower, upper = lower.to(action), upper.to(action)
    return lower + 0.5 * (action + 1.0) * (upper - lower)


def ctrl_to_action(u: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """Inverse of ``action_to_ctrl``: ``u [..., m]`` in ``[lower, upper]`` -> [-1, 1]."""
    lower, upper = lower.to(u), upper.to(u)
    return 2.0 * (u - lower) / (upper - lower) - 1.0


def identity(obs: Tensor) -> Tensor:
    """``obs_to_state`` of envs whose observation is the model's state."""
    return obs


class AnalyticEnv(gym.Env[np.ndarray, np.ndarray]):
    """A Gymnasium env whose transition is a differentiable ``diffmpc.systems`` model.

    Args:
        system: the model, ``system(x [1, n], u [1, m]) -> [1, n]`` with ``u_lower``,
            ``u_upper`` and ``default_cost()``; it is cast to float64.
        cost: the cost whose negative is the reward (default ``system.default_cost()``).
        obs_high: ``[n]`` observation bounds (``UNBOUNDED`` where the state is unbounded).
        render_mode: None or ``"rgb_array"``.
        horizon: the default MPC horizon reported by ``model()``.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"], "render_fps": 20}
    frame_size: ClassVar[tuple[int, int]] = (256, 256)  # (width, height)

    def __init__(
        self,
        system: nn.Module,
        obs_high: np.ndarray,
        render_mode: str | None = None,
        horizon: int = 30,
        cost: nn.Module | None = None,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"{type(self).__name__}: render_mode must be None or one of "
                             f"{self.metadata['render_modes']}, got {render_mode!r}")
        self.system = system.to(torch.float64)
        cost = system.default_cost() if cost is None else cost
        self.cost = cost.to(torch.float64)
        self.render_mode, self.horizon = render_mode, horizon
        high = np.asarray(obs_high, dtype=np.float32)
        self.observation_space = spaces.Box(-high, high, dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(system.n_ctrl,), dtype=np.float32)
        self._x: Tensor | None = None  # [1, n] float64 state
        self._last_u: np.ndarray | None = None

    @property
    def dt(self) -> float:
        """Seconds per step."""
        return self.system.dt

    @property
    def state(self) -> np.ndarray:
        """The current state ``[n]`` (float64 copy)."""
        if self._x is None:
            raise RuntimeError(f"{type(self).__name__}: call reset() before reading the state")
        return self._x[0].numpy().copy()

    # ----------------------------------------------------------------------------- gym API
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset to a random state drawn from ``self.np_random`` (seeded by ``seed``).

        Options:
            ``"state"``: an ``[n]`` array, the exact initial state (no sampling).
        """
        super().reset(seed=seed)
        options = options or {}
        if "state" in options:
            x = np.asarray(options["state"], dtype=np.float64)
            n = self.system.n_state
            if x.shape != (n,) or not np.all(np.isfinite(x)):
                raise ValueError(f"{type(self).__name__}: options['state'] must be a finite "
                                 f"array of shape ({n},), got {options['state']!r}")
        else:
            x = self._sample_state(options)
        self._x = torch.as_tensor(x, dtype=torch.float64).reshape(1, -1).clone()
        self._last_u = None
        return self._obs(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Advance one ``dt`` with the normalized action clipped to [-1, 1]."""
        if self._x is None:
            raise RuntimeError(f"{type(self).__name__}: call reset() before step()")
        a = np.asarray(action, dtype=np.float64)
        m = self.system.n_ctrl
        if a.shape != (m,) or not np.all(np.isfinite(a)):
            raise ValueError(f"{type(self).__name__}: action must be a finite array of shape "
                             f"({m},), got {action!r}")
        a = torch.as_tensor(np.clip(a, -1.0, 1.0)).reshape(1, m)
        u = action_to_ctrl(a, self.system.u_lower, self.system.u_upper)
        with torch.no_grad():
            reward = -float(self.cost(self._x, u)[0])
            self._x = self.system(self._x, u)
        self._last_u = u[0].numpy()
        return self._obs(), reward, False, False, {}

    def render(self) -> np.ndarray | None:
        """An ``[height, width, 3]`` uint8 frame when ``render_mode == "rgb_array"``."""
        if self.render_mode != "rgb_array" or self._x is None:
            return None
        return self._draw(self.state)

    def model(self) -> EnvModel:
        """The exact model of this env (fresh float64 copies of its dynamics and cost)."""
        dynamics, cost = copy.deepcopy((self.system, self.cost))
        lower = self.system.u_lower.clone()
        upper = self.system.u_upper.clone()
        return EnvModel(
            dynamics=dynamics,
            cost=cost,
            n_state=self.system.n_state,
            n_ctrl=self.system.n_ctrl,
            horizon=self.horizon,
            u_lower=lower,
            u_upper=upper,
            obs_to_state=identity,
            ctrl_to_action=partial(ctrl_to_action, lower=lower.clone(), upper=upper.clone()),
            action_to_ctrl=partial(action_to_ctrl, lower=lower.clone(), upper=upper.clone()),
            dt=self.dt,
        )

    # ----------------------------------------------------------------------------- hooks
    def _obs(self) -> np.ndarray:
        return self._x[0].numpy().astype(np.float32)

    def _sample_state(self, options: dict[str, Any]) -> np.ndarray:  # pragma: no cover
        """An initial state ``[n]`` from ``self.np_random``."""
        raise NotImplementedError

    def _draw(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover
        """A frame of state ``x [n]``."""
        raise NotImplementedError
