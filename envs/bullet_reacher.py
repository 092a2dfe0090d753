"""Pybullet two-link arm reaching a random target ("diffmpc/BulletReacher-v0")."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import pybullet
import torch
from gymnasium import spaces
from torch import Tensor, nn

from diffmpc.envs.bullet_base import UNBOUNDED, BulletEnv
from diffmpc.envs.model import EnvModel
from diffmpc.systems import TwoLinkArm

__all__ = ["BulletReacherEnv", "TargetArm", "TargetReachCost", "REACHER_PARAMS"]

# Parameters of assets/reacher.urdf (the nominal model uses the same numbers).
REACHER_PARAMS: dict[str, float] = {
    "m1": 1.0, "m2": 1.0,  # kg, uniform rods
    "l1": 0.5, "l2": 0.5,  # m
    "damping": 0.25,  # N m s, viscous, both joints
}


class BulletReacherEnv(BulletEnv):
    """A planar two-link arm that must bring its fingertip to a random target.

    ## Description

    Two uniform links (1 kg, 0.5 m each) turn on continuous joints about the vertical axis, so
    the arm moves in the horizontal plane (gravity does no work) with viscous joint damping of
    0.25 N m s. Torques at both joints are the controls. A target is drawn anywhere in the
    annulus 0.25 m <= |t| <= 0.9 m around the shoulder at every reset; the arm reaches 1 m.
    The nominal model is ``diffmpc.systems.TwoLinkArm`` with these parameters and ``g = 0``,
    extended by the target as a constant part of the state.

    ## Action Space

    ``Box(-1, 1, (2,), float32)``: the joint torques are ``2 * clip(a, -1, 1)`` N m (shoulder,
    elbow), held for one env step of 0.05 s.

    ## Observation Space

    ``Box((10,), float32)``; joint angles are wrapped as cosine and sine (q1 from the +x axis,
    q2 relative to link 1, counter-clockwise positive):

    | idx | observation                               | min  | max |
    |-----|-------------------------------------------|------|-----|
    | 0-1 | cos q1, sin q1                            | -1   | 1   |
    | 2-3 | cos q2, sin q2                            | -1   | 1   |
    | 4-5 | joint velocities dq1, dq2 (rad/s)         | -3.4e38 | 3.4e38 |
    | 6-7 | target position (m)                       | -1   | 1   |
    | 8-9 | fingertip minus target (m)                | -2   | 2   |

    ## Rewards

    ``r = -(1/2) (w_p |e(q) - t|^2 + w_v |dq|^2 + r_u |tau|^2)`` at the state before the step,
    with the fingertip position ``e(q)``, ``w_p = 10``, ``w_v = 0.1``, ``r_u = 1e-3`` and the
    applied torques ``tau`` in N m: the ``TargetReachCost`` that ``model().cost`` returns.
    The best reward is 0.

    ## Starting State

    q1, q2 uniform in [-pi, pi], dq1, dq2 uniform in [-0.1, 0.1], the target uniform over the
    annulus. ``reset(options={"state": [q1, q2, dq1, dq2], "target": [tx, ty]})`` sets either.

    ## Episode End

    No termination; truncation after 100 steps (5 s) through the registered
    ``max_episode_steps``.

    ## Arguments

    ``gymnasium.make("diffmpc/BulletReacher-v0", render_mode="rgb_array")``, or
    ``BulletReacherEnv(render_mode=None | "rgb_array", width=320, height=240)``.

    ## Version History

    * v0: initial version (pybullet 3.2.7; 0.05 s steps of 10 physics substeps).
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"], "render_fps": 20}
    dt = 0.05
    substeps = 10
    gravity = 9.81
    ctrl_scale = (2.0, 2.0)
    camera: ClassVar[dict[str, Any]] = {"target": (0.0, 0.0, 0.0), "distance": 2.4,
                                        "yaw": 0.0, "pitch": -89.0}
    angle_state_dims = (0, 1)
    target_radius: ClassVar[tuple[float, float]] = (0.25, 0.9)
    pos_weight: ClassVar[float] = 10.0
    vel_weight: ClassVar[float] = 0.1
    ctrl_weight: ClassVar[float] = 1e-3
    horizon: ClassVar[int] = 20

    def __init__(
        self, render_mode: str | None = None, width: int = 320, height: int = 240
    ) -> None:
        super().__init__(render_mode=render_mode, width=width, height=height)
        self._body, self._joints = self._load_urdf(
            "reacher.urdf", ("shoulder", "elbow"), joint_damping=REACHER_PARAMS["damping"]
        )
        self._target_body = self._make_target_marker()
        self._target = np.zeros(2)
        high = np.array([1, 1, 1, 1, UNBOUNDED, UNBOUNDED, 1, 1, 2, 2], dtype=np.float32)
        self.observation_space = spaces.Box(low=-high, high=high, dtype=np.float32)

    def _make_target_marker(self) -> int:
        """A red sphere without collision shape or mass, drawn at the target."""
        bc = self.bullet
        shape = bc.createVisualShape(pybullet.GEOM_SPHERE, radius=0.04, rgbaColor=[0.9, 0.1, 0.1, 1])
        return bc.createMultiBody(baseMass=0.0, baseVisualShapeIndex=shape)

    def reset_model(self, options: dict[str, Any]) -> None:
        """Random arm state and target, or those given in ``options``."""
        rng = self.np_random
        if "state" in options:
            q1, q2, dq1, dq2 = _check_vector(options["state"], 4, "state", None)
        else:
            q1, q2 = rng.uniform(-math.pi, math.pi, size=2)
            dq1, dq2 = rng.uniform(-0.1, 0.1, size=2)
        if "target" in options:
            self._target = _check_vector(options["target"], 2, "target", self.reach)
        else:
            lo, hi = self.target_radius
            radius = math.sqrt(rng.uniform(lo**2, hi**2))  # uniform over the annulus
            angle = rng.uniform(-math.pi, math.pi)
            self._target = radius * np.array([math.cos(angle), math.sin(angle)])
        self._set_joint_state(self._body, self._joints, np.array([q1, q2]), np.array([dq1, dq2]))
        tx, ty = self._target
        self.bullet.resetBasePositionAndOrientation(self._target_body, [tx, ty, 0.0], [0, 0, 0, 1])

    @property
    def reach(self) -> float:
        """Largest fingertip distance from the shoulder (m)."""
        return REACHER_PARAMS["l1"] + REACHER_PARAMS["l2"]

    def fingertip(self, q: np.ndarray) -> np.ndarray:
        """Fingertip position ``[2]`` (m) from joint angles ``q [2]``."""
        l1, l2 = REACHER_PARAMS["l1"], REACHER_PARAMS["l2"]
        return np.array([
            l1 * math.cos(q[0]) + l2 * math.cos(q[0] + q[1]),
            l1 * math.sin(q[0]) + l2 * math.sin(q[0] + q[1]),
        ])

    def _get_obs(self) -> np.ndarray:
        q, dq = self._joint_state(self._body, self._joints)
        trig = [math.cos(q[0]), math.sin(q[0]), math.cos(q[1]), math.sin(q[1])]
        err = self.fingertip(q) - self._target
        return np.concatenate([trig, dq, self._target, err]).astype(np.float32)

    def _cost(self, tau: np.ndarray) -> float:
        q, dq = self._joint_state(self._body, self._joints)
        err = self.fingertip(q) - self._target
        return 0.5 * (
            self.pos_weight * float(err @ err) + self.vel_weight * float(dq @ dq)
            + self.ctrl_weight * float(tau @ tau)
        )

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Apply ``action [2]`` for ``dt``; the reward is minus the cost at the pre-step state."""
        tau = self.action_to_ctrl(action)
        reward = -self._cost(tau)
        self._simulate(self._body, self._joints, tau)
        return self._get_obs(), reward, False, False, {}

    def model(self, method: str = "rk4") -> EnvModel:
        """Nominal model: ``TargetArm`` around ``diffmpc.systems.TwoLinkArm`` (``g = 0``)."""
        tau_max = self.ctrl_scale[0]
        arm = TwoLinkArm(
            m1=REACHER_PARAMS["m1"], m2=REACHER_PARAMS["m2"], l1=REACHER_PARAMS["l1"],
            l2=REACHER_PARAMS["l2"], damping=REACHER_PARAMS["damping"], g=0.0, dt=self.dt,
            method=method, max_torque=tau_max,
        )
        cost = TargetReachCost(arm.end_effector, self.pos_weight, self.vel_weight, self.ctrl_weight)
        return EnvModel(
            dynamics=TargetArm(arm), cost=cost, n_state=6, n_ctrl=2, horizon=self.horizon,
            u_lower=torch.full((2,), -tau_max), u_upper=torch.full((2,), tau_max),
            obs_to_state=reacher_obs_to_state, dt=self.dt, **self._ctrl_maps(),
        )


def reacher_obs_to_state(obs: Tensor) -> Tensor:
    """Reacher observation ``[B, 10]`` -> MPC state ``[q1, q2, dq1, dq2, tx, ty] [B, 6]``.

    Angles come back in (-pi, pi].
    """
    q1 = torch.atan2(obs[..., 1], obs[..., 0])
    q2 = torch.atan2(obs[..., 3], obs[..., 2])
    return torch.cat([torch.stack([q1, q2], -1), obs[..., 4:8]], -1)


class TargetArm(nn.Module):
    """An arm model whose state carries a constant target: ``[x_arm, t] -> [f(x_arm, u), t]``.

    With the target in the state, one cost module (``TargetReachCost``) and one MPC serve a
    batch of different targets.

    Args:
        arm: dynamics ``(x [B, 4], u [B, 2]) -> [B, 4]`` (e.g. ``diffmpc.systems.TwoLinkArm``).
    """

    def __init__(self, arm: nn.Module) -> None:
        super().__init__()
        self.arm = arm

    def forward(self, x: Tensor, u: Tensor) -> Tensor:
        """``x [B, 6]`` (arm state, target), ``u [B, 2]`` -> ``[B, 6]``."""
        if x.shape[-1] != 6:
            raise ValueError(f"TargetArm: x must have shape [B, 6], got {tuple(x.shape)}")
        return torch.cat([self.arm(x[..., :4], u), x[..., 4:]], -1)


class TargetReachCost(nn.Module):
    """``1/2 (w_p |e(q) - t|^2 + w_v |dq|^2 + r_u |u|^2)`` with the target t read from the state.

    State ``x = [q1, q2, dq1, dq2, tx, ty]``; weights are learnable and positive (stored as
    logs), scalar for each term.

    Args:
        end_effector: ``q [..., 2] -> position [..., 2]`` (e.g. ``TwoLinkArm.end_effector``).
        pos_weight, vel_weight, ctrl_weight: ``w_p``, ``w_v``, ``r_u`` (> 0).
    """

    def __init__(self, end_effector, pos_weight: float, vel_weight: float, ctrl_weight: float):
        super().__init__()
        weights = torch.tensor([pos_weight, vel_weight, ctrl_weight])
        if not bool((weights > 0).all()):
            raise ValueError(f"TargetReachCost: weights must be > 0, got {weights.tolist()}")
        self.end_effector = end_effector
        self.log_weights = nn.Parameter(weights.log())

    def forward(self, x: Tensor, u: Tensor) -> Tensor:
        """Cost ``[...]`` of states ``x [..., 6]`` and controls ``u [..., 2]``."""
        w_p, w_v, r_u = self.log_weights.exp().unbind()
        e = self.end_effector(x[..., :2]) - x[..., 4:6]
        dq = x[..., 2:4]
        return 0.5 * (w_p * (e * e).sum(-1) + w_v * (dq * dq).sum(-1) + r_u * (u * u).sum(-1))


def _check_vector(value: Any, size: int, name: str, max_norm: float | None) -> np.ndarray:
    v = np.asarray(value, dtype=np.float64)
    ok = v.shape == (size,) and bool(np.all(np.isfinite(v)))
    if not ok or (max_norm is not None and float(np.linalg.norm(v)) > max_norm):
        limit = "" if max_norm is None else f" with norm <= {max_norm}"
        raise ValueError(
            f"BulletReacherEnv: options[{name!r}] must be a finite array of shape ({size},)"
            f"{limit}, got {value!r}"
        )
    return v
