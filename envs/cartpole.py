"""CartpoleSwingup-v0: the cart-pole of mpc.pytorch, exactly modelled."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from diffmpc.envs.base import UNBOUNDED, AnalyticEnv
from diffmpc.envs.canvas import Canvas
from diffmpc.systems import Cartpole

__all__ = ["CartpoleSwingupEnv"]


class CartpoleSwingupEnv(AnalyticEnv):
    """Swing a pole hinged on a cart up by pushing the cart, and balance it near the origin.

    ## Description
    The classic cart-pole (frictionless track, uniform pole of half-length ``l``) stepped by
    ``diffmpc.systems.Cartpole``: explicit Euler, ``dt = 0.05`` s, the physics and force range of
    mpc.pytorch's ``CartpoleDx``. The track is unbounded. The pole angle ``th`` is 0 upright and
    positive when the pole leans toward +p (a push toward +p turns it back toward 0).

    ## Action Space
    ``Box(-1, 1, (1,), float32)``: the normalized force; the force on the cart is
    ``u = max_force * clip(a, -1, 1)`` N (``max_force = 100``, CartpoleDx's ``force_mag``).

    ## Observation Space
    ``Box((5,), float32)``, the full state (3.4e38: float32's largest value, i.e. unbounded):

    | Num | Observation             | Min     | Max    |
    |-----|-------------------------|---------|--------|
    | 0   | cart position p (m)     | -3.4e38 | 3.4e38 |
    | 1   | cart velocity (m/s)     | -3.4e38 | 3.4e38 |
    | 2   | cos(th)                 | -1      | 1      |
    | 3   | sin(th)                 | -1      | 1      |
    | 4   | thdot (rad/s)           | -3.4e38 | 3.4e38 |

    ## Rewards
    Minus the model's default cost (that of ``CartpoleDx``) at the state before the step,
    ``1/2 [0.1 p^2 + 0.1 pdot^2 + (cos th - 1)^2 + sin^2 th + 0.1 thdot^2 + 0.001 u^2]``, that is
    ``r = -(0.05 p^2 + 0.05 pdot^2 + 1 - cos th + 0.05 thdot^2 + 0.0005 u^2)``: 0 only balanced
    at the origin, at rest, with no force.

    ## Starting State
    ``th ~ U(-pi, pi)``, ``p, pdot, thdot ~ U(-0.5, 0.5)``; ``reset(options={"state": x})``
    starts at the given ``x = [p, pdot, cos th, sin th, thdot]`` instead.

    ## Episode End
    Truncation after 100 steps (5 s); no termination.

    ## Arguments
    ``gymnasium.make("diffmpc/CartpoleSwingup-v0", render_mode=None, g=9.8, m_cart=1.0,
    m_pole=0.1, l=0.5)``: ``render_mode`` None or ``"rgb_array"``; the physical parameters (the
    model from ``model()`` uses the same ones); ``horizon`` the MPC horizon ``model()`` reports
    (default 30: with 20, the MPC can settle near the bottom from some starts).

    ## Version History
    * v0: initial version.
    """

    def __init__(
        self,
        render_mode: str | None = None,
        g: float = 9.8,
        m_cart: float = 1.0,
        m_pole: float = 0.1,
        l: float = 0.5,
        horizon: int = 30,
    ) -> None:
        system = Cartpole(g=g, m_cart=m_cart, m_pole=m_pole, l=l, dtype=torch.float64)
        obs_high = np.array([UNBOUNDED, UNBOUNDED, 1.0, 1.0, UNBOUNDED])
        super().__init__(system, obs_high, render_mode, horizon)

    def _sample_state(self, options: dict[str, Any]) -> np.ndarray:
        th = self.np_random.uniform(-np.pi, np.pi)
        p, v, w = self.np_random.uniform(-0.5, 0.5, size=3)
        return np.array([p, v, np.cos(th), np.sin(th), w])

    def _draw(self, x: np.ndarray) -> np.ndarray:
        pole = 2.0 * float(self.system.l.detach())  # the pole's full length
        w, h = self.frame_size
        half = 2.5 * pole
        cx = x[0]  # the view follows the cart
        canvas = Canvas(w, h, (cx - half, cx + half, -half, half))
        canvas.segment((cx - 2 * half, -0.05 * pole), (cx + 2 * half, -0.05 * pole),
                       0.02 * pole, (120, 120, 120))
        canvas.box((cx, 0.0), (0.25 * pole, 0.12 * pole), (60, 60, 160))
        tip = (cx + pole * x[3], pole * x[2])  # th > 0: the pole leans toward +p
        canvas.segment((cx, 0.0), tip, 0.08 * pole, (204, 77, 77))
        for mark in np.arange(np.floor(cx - half), np.ceil(cx + half) + 1):  # 1 m ticks
            canvas.box((mark, -0.05 * pole), (0.01 * pole, 0.05 * pole), (120, 120, 120))
        return canvas.image
