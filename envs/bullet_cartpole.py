"""Pybullet cart-pole: balance and swing-up ("diffmpc/BulletCartpole{Balance,Swingup}-v0")."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

from diffmpc.cost import GoalCost
from diffmpc.envs.bullet_base import UNBOUNDED, BulletEnv
from diffmpc.envs.model import EnvModel
from diffmpc.systems import Cartpole

__all__ = ["BulletCartpoleEnv", "CARTPOLE_PARAMS"]

# Parameters of assets/cartpole.urdf (the nominal model uses the same numbers).
CARTPOLE_PARAMS: dict[str, float] = {
    "mass_cart": 1.0,  # kg
    "mass_pole": 0.1,  # kg, uniform rod
    "half_length": 0.5,  # m, pivot to the pole's centre of mass
}

_TASKS = ("balance", "swingup")


class BulletCartpoleEnv(BulletEnv):
    """A pole on a cart that moves along a frictionless rail, simulated by pybullet.

    ## Description

    The cart (1 kg) slides on a prismatic joint along x; the pole (a uniform 0.1 kg rod of
    length 1 m, half-length 0.5 m) turns freely on a continuous joint about y through the cart.
    A horizontal force on the cart is the only control. With ``task="balance"`` the pole starts
    near upright and must be kept there; with ``task="swingup"`` it starts hanging down and must
    be swung up and balanced. Both tasks also ask the cart to stay near x = 0. The rail ends in
    inelastic stops at x = +-2.4 m (the classic cart-pole's track), which the nominal model
    does not know about. Between the stops the physics are those of the classic cart-pole
    (Barto et al. 1983) and of ``mpc.pytorch``'s cartpole, so ``diffmpc.systems.Cartpole`` is a
    close nominal model.

    ## Action Space

    ``Box(-1, 1, (1,), float32)``: the force on the cart is ``force_mag * clip(a, -1, 1)``
    newtons, ``force_mag = 20``, held for one env step of 0.05 s.

    ## Observation Space

    ``Box((5,), float32)``, the full state with the pole angle wrapped as cosine and sine:

    | idx | observation                           | min  | max |
    |-----|---------------------------------------|------|-----|
    | 0   | cart position x (m)                   | -2.5 | 2.5 |
    | 1   | cart velocity (m/s)                   | -3.4e38 | 3.4e38 |
    | 2   | cos(theta), theta = 0 upright         | -1   | 1   |
    | 3   | sin(theta), theta > 0 leans to +x     | -1   | 1   |
    | 4   | pole angular velocity (rad/s)         | -3.4e38 | 3.4e38 |

    ## Rewards

    ``r = -(1/2) sum_i w_i (s_i - g_i)^2 - (1/2) r_u F^2`` with the state ``s`` before the step
    (the observation the action was chosen from), goal ``g = (0, 0, 1, 0, 0)``, weights
    ``w = (0.1, 0.1, 1, 1, 0.1)``, ``r_u = 1e-3`` and the applied force F in newtons: the
    ``GoalCost`` that ``model().cost`` returns. The best reward is 0; a hanging pole at rest
    at x = 0 costs 2 per step.

    ## Starting State

    x, dx, theta and dtheta uniform in [-0.05, 0.05], plus pi on theta for ``swingup``.
    ``reset(options={"state": [x, dx, theta, dtheta]})`` starts from a given state instead.

    The stops hold x in [-2.4, 2.4] up to a penetration of a few millimetres; the space
    allows 0.1 m.

    ## Episode End

    No termination (every reward is <= 0, so ending early must not pay, and the stops keep the
    cart on the rail). Truncation after 200 steps (10 s) through the registered
    ``max_episode_steps``.

    ## Arguments

    ``gymnasium.make("diffmpc/BulletCartpoleBalance-v0", render_mode="rgb_array")``, or
    ``BulletCartpoleEnv(task="balance" | "swingup", render_mode=None | "rgb_array",
    width=320, height=240)``.

    ## Version History

    * v0: initial version (pybullet 3.2.7; 0.05 s steps of 10 physics substeps).
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"], "render_fps": 20}
    dt = 0.05
    substeps = 10
    gravity = 9.81
    ctrl_scale = (20.0,)
    camera: ClassVar[dict[str, Any]] = {"target": (0.0, 0.0, 0.3), "distance": 4.0,
                                        "yaw": 0.0, "pitch": -10.0}
    goal: ClassVar[tuple[float, ...]] = (0.0, 0.0, 1.0, 0.0, 0.0)
    state_weight: ClassVar[tuple[float, ...]] = (0.1, 0.1, 1.0, 1.0, 0.1)
    ctrl_weight: ClassVar[tuple[float, ...]] = (1e-3,)
    horizon: ClassVar[int] = 30

    def __init__(
        self, task: str = "balance", render_mode: str | None = None,
        width: int = 320, height: int = 240,
    ) -> None:
        if task not in _TASKS:
            raise ValueError(f"BulletCartpoleEnv: task must be one of {_TASKS}, got {task!r}")
        super().__init__(render_mode=render_mode, width=width, height=height)
        self.task = task
        self._body, self._joints = self._load_urdf("cartpole.urdf", ("slider", "hinge"))
        self.rail_limit = float(self.bullet.getJointInfo(self._body, self._joints[0])[9])
        high = np.array([self.rail_limit + 0.1, UNBOUNDED, 1.0, 1.0, UNBOUNDED], dtype=np.float32)
        self.observation_space = spaces.Box(low=-high, high=high, dtype=np.float32)

    def reset_model(self, options: dict[str, Any]) -> None:
        """Pole near upright (balance) or hanging (swingup), or ``options["state"]``."""
        if "state" in options:
            x, dx, th, dth = _check_state(options["state"], self.rail_limit)
        else:
            x, dx, th, dth = self.np_random.uniform(-0.05, 0.05, size=4)
            th += math.pi if self.task == "swingup" else 0.0
        self._set_joint_state(self._body, self._joints, np.array([x, th]), np.array([dx, dth]))

    def in_model_domain(self, obs: np.ndarray) -> np.ndarray:
        """``[N]`` bool: observations ``[N, 5]`` with the cart clear of the stops (5 cm)."""
        return np.abs(obs[:, 0]) < self.rail_limit - 0.05

    def _state(self) -> np.ndarray:
        """``[x, dx, cos th, sin th, dth]`` float64."""
        (x, th), (dx, dth) = self._joint_state(self._body, self._joints)
        return np.array([x, dx, math.cos(th), math.sin(th), dth])

    def _get_obs(self) -> np.ndarray:
        return self._state().astype(np.float32)

    def _cost(self, s: np.ndarray, force: float) -> float:
        ds = s - np.asarray(self.goal)
        return 0.5 * float(np.dot(self.state_weight, ds * ds)) + 0.5 * self.ctrl_weight[0] * force**2

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Apply ``action [1]`` for ``dt``; the reward is minus the cost at the pre-step state."""
        force = float(self.action_to_ctrl(action)[0])
        reward = -self._cost(self._state(), force)
        self._simulate(self._body, self._joints, np.array([force, 0.0]))
        return self._get_obs(), reward, False, False, {}

    def model(self, method: str = "euler") -> EnvModel:
        """The nominal model: MPC state = observation, control = force in N.

        The dynamics are ``diffmpc.systems.Cartpole`` with the URDF's masses and half-length,
        the env's gravity and step, and no end stops; ``method="euler"`` (default) is
        mpc.pytorch's explicit Euler step, the model a practitioner would write first,
        ``"rk4"`` the accurate one (docs/envs_bullet.md has both one-step errors). The cost is
        the ``GoalCost`` whose negative is the reward.

        Args:
            method: ``"euler"`` or ``"rk4"``.
        """
        f = self.ctrl_scale[0]
        dyn = Cartpole(
            g=self.gravity, m_cart=CARTPOLE_PARAMS["mass_cart"],
            m_pole=CARTPOLE_PARAMS["mass_pole"], l=CARTPOLE_PARAMS["half_length"], dt=self.dt,
            method=method, max_force=f,
        )
        cost = GoalCost(
            torch.tensor(self.goal), torch.tensor(self.state_weight), torch.tensor(self.ctrl_weight)
        )
        return EnvModel(
            dynamics=dyn, cost=cost, n_state=5, n_ctrl=1, horizon=self.horizon,
            u_lower=torch.tensor([-f]), u_upper=torch.tensor([f]),
            obs_to_state=_identity, dt=self.dt, **self._ctrl_maps(),
        )


def _identity(obs: Tensor) -> Tensor:
    return obs


def _check_state(state: Any, rail_limit: float) -> np.ndarray:
    s = np.asarray(state, dtype=np.float64)
    if s.shape != (4,) or not np.all(np.isfinite(s)) or abs(s[0]) > rail_limit:
        raise ValueError(
            "BulletCartpoleEnv: options['state'] must be a finite [x, dx, theta, dtheta] with "
            f"|x| <= {rail_limit}, got {state!r}"
        )
    return s
