"""PendulumSwingup-v0: the pendulum of mpc.pytorch and Gymnasium's Pendulum-v1, exactly modelled."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from diffmpc.envs.base import UNBOUNDED, AnalyticEnv
from diffmpc.envs.canvas import Canvas
from diffmpc.systems import Pendulum

__all__ = ["PendulumSwingupEnv"]


class PendulumSwingupEnv(AnalyticEnv):
    """Swing a torque-limited pendulum up and balance it.

    ## Description
    A uniform rod on a frictionless pivot, ``thddot = 3 g / (2 l) sin th + 3 u / (m l^2)``, with
    ``th = 0`` upright (counter-clockwise positive), stepped by ``diffmpc.systems.Pendulum``
    (semi-implicit Euler, ``dt = 0.05`` s): the physics of mpc.pytorch's ``PendulumDx`` and of
    Gymnasium's Pendulum-v1 without its clip of the angular velocity.

    ## Action Space
    ``Box(-1, 1, (1,), float32)``: the normalized torque; the torque applied is
    ``u = max_torque * clip(a, -1, 1)`` N m (``max_torque = 2``).

    ## Observation Space
    ``Box((3,), float32)``, the full state (3.4e38: float32's largest value, i.e. unbounded):

    | Num | Observation       | Min     | Max    |
    |-----|-------------------|---------|--------|
    | 0   | cos(th)           | -1      | 1      |
    | 1   | sin(th)           | -1      | 1      |
    | 2   | thdot (rad/s)     | -3.4e38 | 3.4e38 |

    ## Rewards
    Minus the model's default cost (that of ``PendulumDx``) at the state before the step,
    ``1/2 [(cos th - 1)^2 + sin^2 th + 0.1 thdot^2 + 0.001 u^2]``, that is
    ``r = -(1 - cos th + 0.05 thdot^2 + 0.0005 u^2)``: 0 upright at rest with no torque, -2
    hanging at rest.

    ## Starting State
    ``th ~ U(-pi, pi)``, ``thdot ~ U(-1, 1)``; ``reset(options={"state": x})`` starts at the
    given ``x = [cos th, sin th, thdot]`` instead.

    ## Episode End
    Truncation after 200 steps (10 s); no termination.

    ## Arguments
    ``gymnasium.make("diffmpc/PendulumSwingup-v0", render_mode=None, g=10.0, m=1.0, l=1.0)``:
    ``render_mode`` None or ``"rgb_array"``; ``g``, ``m``, ``l`` the physical parameters (the
    model returned by ``model()`` uses the same ones); ``horizon`` the MPC horizon ``model()``
    reports (default 40: with
    |u| <= 2 shorter horizons can settle for holding the pendulum off the bottom).

    ## Version History
    * v0: initial version.
    """

    def __init__(
        self,
        render_mode: str | None = None,
        g: float = 10.0,
        m: float = 1.0,
        l: float = 1.0,
        horizon: int = 40,
    ) -> None:
        obs_high = np.array([1.0, 1.0, UNBOUNDED])
        system = Pendulum(g=g, m=m, l=l, dtype=torch.float64)
        super().__init__(system, obs_high, render_mode, horizon)

    def _sample_state(self, options: dict[str, Any]) -> np.ndarray:
        th = self.np_random.uniform(-np.pi, np.pi)
        thdot = self.np_random.uniform(-1.0, 1.0)
        return np.array([np.cos(th), np.sin(th), thdot])

    def _draw(self, x: np.ndarray) -> np.ndarray:
        length = float(self.system.l.detach())
        r = 1.25 * length
        w, h = self.frame_size
        canvas = Canvas(w, h, (-r, r, -r, r))
        tip = (-length * x[1], length * x[0])  # th counter-clockwise from upright
        canvas.segment((0.0, 0.0), tip, 0.12 * length, (204, 77, 77))
        canvas.disk((0.0, 0.0), 0.05 * length, (40, 40, 40))
        return canvas.image
