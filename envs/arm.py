"""ArmReach-v0: a two-link arm in a vertical plane reaching a point, exactly modelled."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from diffmpc.envs.base import UNBOUNDED, AnalyticEnv
from diffmpc.envs.canvas import Canvas
from diffmpc.systems import TwoLinkArm

__all__ = ["ArmReachEnv"]


class ArmReachEnv(AnalyticEnv):
    """Move the tip of a two-link arm hanging under gravity to a target point and hold it there.

    ## Description
    ``diffmpc.systems.TwoLinkArm`` with its defaults: two uniform 1 kg, 0.5 m links in a
    vertical plane (gravity 9.81 m/s^2 along -y), joint damping 0.7 N m s, RK4 with
    ``dt = 0.05`` s. ``q1`` is link 1's angle from the +x axis, ``q2`` link 2's relative to link 1.

    ## Action Space
    ``Box(-1, 1, (2,), float32)``: normalized joint torques; the torques applied are
    ``u = max_torque * clip(a, -1, 1)`` N m (``max_torque = 15``, enough to hold the arm
    stretched horizontally, which takes 9.8 N m at the shoulder).

    ## Observation Space
    ``Box((4,), float32)``, the full state ``[q1, q2, dq1, dq2]`` (rad, rad/s; angles are not
    wrapped), each unbounded (bounds ``UNBOUNDED``, float32's largest value).

    ## Rewards
    Minus the model's default cost (``diffmpc.systems.ReachCost``) at the state before the step:
    ``r = -1/2 [10 |e(q) - target|^2 + 0.1 |dq|^2 + 0.001 |u|^2]`` with ``e(q)`` the tip
    position; zero only at rest on the target with no torque (never exactly: holding the arm
    against gravity takes torque).

    ## Starting State
    Hanging near rest: ``q1 ~ -pi/2 + U(-0.3, 0.3)``, ``q2 ~ U(-0.3, 0.3)``,
    ``dq ~ U(-0.3, 0.3)``; ``reset(options={"state": x})`` starts at the given ``x`` instead.

    ## Episode End
    Truncation after 100 steps (5 s); no termination.

    ## Arguments
    ``gymnasium.make("diffmpc/ArmReach-v0", render_mode=None, target=(0.6, 0.4))``:
    ``render_mode`` None or ``"rgb_array"``; ``target`` the point to reach (m, within the
    1 m reach of the arm); ``horizon`` the MPC horizon ``model()`` reports (default 20).

    ## Version History
    * v0: initial version.
    """

    def __init__(
        self,
        render_mode: str | None = None,
        target: tuple[float, float] = (0.6, 0.4),
        horizon: int = 20,
    ) -> None:
        arm = TwoLinkArm(dtype=torch.float64)
        target = tuple(float(v) for v in target)
        if len(target) != 2 or np.hypot(*target) > 1.0:
            raise ValueError(f"ArmReachEnv: target must be a point (x, y) within 1 m of the "
                             f"shoulder, got {target!r}")
        cost = arm.default_cost(target=target)
        super().__init__(arm, np.full(4, UNBOUNDED), render_mode, horizon, cost=cost)
        self.target = target

    def _sample_state(self, options: dict[str, Any]) -> np.ndarray:
        x = self.np_random.uniform(-0.3, 0.3, size=4)
        x[0] -= 0.5 * np.pi
        return x

    def _draw(self, x: np.ndarray) -> np.ndarray:
        l1, l2 = float(self.system.l1.detach()), float(self.system.l2.detach())
        r = 1.2 * (l1 + l2)
        w, h = self.frame_size
        canvas = Canvas(w, h, (-r, r, -r, r))
        elbow = (l1 * np.cos(x[0]), l1 * np.sin(x[0]))
        tip = (elbow[0] + l2 * np.cos(x[0] + x[1]), elbow[1] + l2 * np.sin(x[0] + x[1]))
        canvas.disk(self.target, 0.05 * r, (60, 170, 60))
        canvas.segment((0.0, 0.0), elbow, 0.06 * r, (60, 60, 160))
        canvas.segment(elbow, tip, 0.05 * r, (204, 77, 77))
        canvas.disk((0.0, 0.0), 0.04 * r, (40, 40, 40))
        return canvas.image
