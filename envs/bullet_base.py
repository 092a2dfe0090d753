"""Base class of the pybullet envs: owns one headless Bullet client per env.

Every env here steps a URDF multibody with fixed base in its own ``BulletClient(DIRECT)`` (never
the implicit client 0, so envs in one process do not share a world). The known pitfalls are
handled once, here:

- URDFs are loaded with ``URDF_USE_INERTIA_FROM_FILE`` (otherwise Bullet recomputes inertias from
  the collision shapes and the model's parameters no longer describe the simulation);
- the velocity motors Bullet attaches to every joint are disabled (``VELOCITY_CONTROL`` with
  ``force=0``), and the default link damping (0.04) is set to zero, so joints move freely under
  the applied torques and the joint damping the env asks for (set by ``changeDynamics``, which
  overrides the URDF's ``<dynamics damping>``);
- gravity and the physics time step are set explicitly; one env step is ``substeps`` physics
  steps of ``dt / substeps`` seconds, and the joint torques/forces are applied again before every
  physics step (``TORQUE_CONTROL`` forces are cleared by ``stepSimulation``);
- continuous joint angles are reported wrapped (as cosine and sine) by the subclasses.

Subclasses load their URDF through ``_load_urdf`` and implement ``reset_model`` (set the
initial joint state from ``self.np_random``), ``_get_obs``, ``step`` (with ``action_to_ctrl``
and ``_simulate``), ``model`` and the class attributes of ``BulletEnv``.
"""

from __future__ import annotations

from functools import partial
from importlib import resources
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import pybullet
import torch
from gymnasium import spaces
from pybullet_utils.bullet_client import BulletClient
from torch import Tensor

from diffmpc.envs.model import EnvModel

__all__ = [
    "BulletEnv", "UNBOUNDED", "asset_path", "scaled_action_to_ctrl", "scaled_ctrl_to_action",
]

# Bound of physically unbounded observation components (velocities): float32's largest value,
# as in envs/base.py and Gymnasium's CartPole-v1 (infinite bounds make Gymnasium's checker warn).
UNBOUNDED = float(np.finfo(np.float32).max)


def asset_path(name: str) -> str:
    """Absolute path of a file in ``diffmpc/envs/assets`` (e.g. ``"cartpole.urdf"``)."""
    return str(resources.files("diffmpc.envs").joinpath("assets", name))


def scaled_action_to_ctrl(action: Tensor, scale: Tensor) -> Tensor:
    """Normalized actions ``[..., m]`` -> controls ``scale * clip(action, -1, 1)`` ``[..., m]``."""
    return action.clamp(-1.0, 1.0) * scale.to(action.dtype)


def scaled_ctrl_to_action(u: Tensor, scale: Tensor) -> Tensor:
    """Controls ``[..., m]`` in ``[-scale, scale]`` -> normalized actions ``u / scale``."""
    return u / scale.to(u.dtype)


class BulletEnv(gym.Env[np.ndarray, np.ndarray]):
    """A Gymnasium env stepping a pybullet multibody with torque-controlled joints.

    Class attributes set by subclasses:
        dt: seconds per env step.
        substeps: physics steps per env step.
        gravity: gravitational acceleration (m/s^2) along -z.
        ctrl_scale: ``[m]`` joint force/torque (N or N m) of a normalized action of 1; the
            force applied to the actuated joint ``i`` is ``ctrl_scale[i] * clip(action[i], -1, 1)``.
        camera: ``dict(target=(x, y, z), distance=..., yaw=..., pitch=...)`` for ``render``.
        angle_state_dims: components of the model's MPC state that are angles (model errors
            in them are taken modulo 2 pi).

    Args:
        render_mode: None or ``"rgb_array"``.
        width, height: size in pixels of the rendered frames.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"], "render_fps": 20}
    dt: ClassVar[float] = 0.05
    substeps: ClassVar[int] = 10
    gravity: ClassVar[float] = 9.81
    ctrl_scale: ClassVar[tuple[float, ...]] = (1.0,)
    camera: ClassVar[dict[str, Any]] = {}
    angle_state_dims: ClassVar[tuple[int, ...]] = ()

    def __init__(self, render_mode: str | None = None, width: int = 320, height: int = 240):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"{type(self).__name__}: render_mode must be None or one of "
                f"{self.metadata['render_modes']}, got {render_mode!r}"
            )
        for name, size in (("width", width), ("height", height)):
            if not isinstance(size, int) or not 16 <= size <= 2048:
                raise ValueError(
                    f"{type(self).__name__}: {name} must be an int in [16, 2048], got {size!r}"
                )
        self.render_mode, self.width, self.height = render_mode, width, height
        self._bullet: BulletClient | None = BulletClient(connection_mode=pybullet.DIRECT)
        self.client_id: int = self._bullet._client  # the id every call of this env goes to
        self._configure_physics()
        m = len(self.ctrl_scale)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(m,), dtype=np.float32)

    # ----------------------------------------------------------------------------- simulator
    @property
    def bullet(self) -> BulletClient:
        """The env's Bullet client; raises RuntimeError after ``close()``."""
        if self._bullet is None:
            raise RuntimeError(f"{type(self).__name__} is closed: its Bullet client is disconnected")
        return self._bullet

    def _configure_physics(self) -> None:
        self._bullet.setGravity(0.0, 0.0, -self.gravity)
        self._bullet.setTimeStep(self.dt / self.substeps)
        self._bullet.setPhysicsEngineParameter(numSubSteps=0, deterministicOverlappingPairs=1)

    def _load_urdf(
        self, name: str, joint_names: tuple[str, ...], joint_damping: float = 0.0
    ) -> tuple[int, list[int]]:
        """Load ``assets/<name>`` with fixed base; return its body id and the joint indices.

        The joints' default velocity motors are disabled, the links' linear and angular
        damping removed, and every joint gets viscous damping ``joint_damping`` (N m s or N s/m).
        """
        bc = self.bullet
        body = bc.loadURDF(
            asset_path(name), useFixedBase=True, flags=pybullet.URDF_USE_INERTIA_FROM_FILE
        )
        by_name = {
            bc.getJointInfo(body, j)[1].decode(): j for j in range(bc.getNumJoints(body))
        }
        joints = [by_name[n] for n in joint_names]
        for link in [-1, *range(bc.getNumJoints(body))]:
            # two calls: pybullet 3.2.7 drops jointDamping when maxJointVelocity comes with it
            bc.changeDynamics(
                body, link, linearDamping=0.0, angularDamping=0.0, jointDamping=joint_damping
            )
            bc.changeDynamics(body, link, maxJointVelocity=1e3)  # default 100 would clamp
        bc.setJointMotorControlArray(
            body, joints, pybullet.VELOCITY_CONTROL, forces=[0.0] * len(joints)
        )
        return body, joints

    def _ctrl_maps(self) -> dict[str, Any]:
        """``ctrl_to_action`` and ``action_to_ctrl`` of ``EnvModel`` (picklable partials)."""
        scale = torch.tensor(self.ctrl_scale)
        return {"ctrl_to_action": partial(scaled_ctrl_to_action, scale=scale),
                "action_to_ctrl": partial(scaled_action_to_ctrl, scale=scale)}

    def _set_joint_state(self, body: int, joints: list[int], q: np.ndarray, dq: np.ndarray) -> None:
        for j, qj, dqj in zip(joints, q, dq, strict=True):
            self.bullet.resetJointState(body, j, float(qj), float(dqj))

    def _joint_state(self, body: int, joints: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Joint positions and velocities, each ``[len(joints)]`` float64."""
        states = self.bullet.getJointStates(body, joints)
        q = np.array([s[0] for s in states], dtype=np.float64)
        dq = np.array([s[1] for s in states], dtype=np.float64)
        return q, dq

    def _simulate(self, body: int, joints: list[int], ctrl: np.ndarray) -> None:
        """Advance ``dt`` seconds holding joint forces ``ctrl [len(joints)]`` (N or N m)."""
        bc, forces = self.bullet, [float(f) for f in ctrl]
        for _ in range(self.substeps):
            bc.setJointMotorControlArray(body, joints, pybullet.TORQUE_CONTROL, forces=forces)
            bc.stepSimulation()

    # ----------------------------------------------------------------------------- actions
    def action_to_ctrl(self, action: np.ndarray) -> np.ndarray:
        """Normalized ``action [m]`` (clipped to [-1, 1]) -> joint forces ``[m]`` (N or N m).

        Raises:
            ValueError: if the action does not have shape ``[m]`` or is not finite.
        """
        a = np.asarray(action, dtype=np.float64)
        m = len(self.ctrl_scale)
        if a.shape != (m,) or not np.all(np.isfinite(a)):
            raise ValueError(
                f"{type(self).__name__}: action must be a finite array of shape ({m},), "
                f"got {action!r}"
            )
        return np.clip(a, -1.0, 1.0) * np.asarray(self.ctrl_scale)

    # ----------------------------------------------------------------------------- gym API
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset the simulator state via ``reset_model`` (seeded by ``seed``)."""
        super().reset(seed=seed)
        self.reset_model(options or {})
        return self._get_obs(), {}

    def reset_model(self, options: dict[str, Any]) -> None:  # pragma: no cover - interface
        """Set the initial simulator state from ``self.np_random`` (and ``options``)."""
        raise NotImplementedError

    def _get_obs(self) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def model(self) -> EnvModel:  # pragma: no cover - interface
        """The nominal differentiable model of this env (see ``EnvModel``)."""
        raise NotImplementedError

    def in_model_domain(self, obs: np.ndarray) -> np.ndarray:
        """``[N]`` bool: which observations ``[N, obs_dim]`` lie where the nominal model applies.

        All of them unless a subclass has contacts its model leaves out (the cart-pole's stops).
        """
        return np.ones(obs.shape[0], dtype=bool)

    def render(self) -> np.ndarray | None:
        """An ``[height, width, 3]`` uint8 frame from TinyRenderer when render_mode is rgb_array."""
        if self.render_mode != "rgb_array":
            return None
        bc, cam = self.bullet, self.camera
        view = bc.computeViewMatrixFromYawPitchRoll(
            cameraTargetPosition=cam["target"], distance=cam["distance"],
            yaw=cam["yaw"], pitch=cam["pitch"], roll=0.0, upAxisIndex=2,
        )
        proj = bc.computeProjectionMatrixFOV(
            fov=60.0, aspect=self.width / self.height, nearVal=0.05, farVal=50.0
        )
        _, _, rgba, _, _ = bc.getCameraImage(
            self.width, self.height, viewMatrix=view, projectionMatrix=proj,
            renderer=pybullet.ER_TINY_RENDERER,
        )
        frame = np.asarray(rgba, dtype=np.uint8).reshape(self.height, self.width, 4)
        return np.ascontiguousarray(frame[:, :, :3])

    def close(self) -> None:
        """Disconnect the Bullet client; safe to call more than once."""
        if self._bullet is not None:
            self._bullet.disconnect()
            self._bullet = None
