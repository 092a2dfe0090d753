"""Registration of every diffmpc env with Gymnasium (idempotent)."""

from __future__ import annotations

import gymnasium as gym

# (id, entry_point, max_episode_steps, reward_threshold, kwargs)
_ANALYTIC: list[tuple[str, str, int, float, dict]] = [
    # analytic envs (stepping diffmpc.systems); thresholds and scores: docs/envs.md
    ("diffmpc/PendulumSwingup-v0", "diffmpc.envs.pendulum:PendulumSwingupEnv", 200, -100.0, {}),
    ("diffmpc/CartpoleSwingup-v0", "diffmpc.envs.cartpole:CartpoleSwingupEnv", 100, -100.0, {}),
    ("diffmpc/ArmReach-v0", "diffmpc.envs.arm:ArmReachEnv", 100, -100.0, {}),
]

_BULLET: list[tuple[str, str, int, float, dict]] = [
    # pybullet envs (need the `pybullet` extra); thresholds: docs/envs_bullet.md
    ("diffmpc/BulletCartpoleBalance-v0", "diffmpc.envs.bullet_cartpole:BulletCartpoleEnv",
     200, -5.0, {"task": "balance"}),
    ("diffmpc/BulletCartpoleSwingup-v0", "diffmpc.envs.bullet_cartpole:BulletCartpoleEnv",
     200, -70.0, {"task": "swingup"}),
    ("diffmpc/BulletReacher-v0", "diffmpc.envs.bullet_reacher:BulletReacherEnv",
     100, -75.0, {}),
]


def register_envs() -> None:
    """Register all envs; calling it again is a no-op."""
    for env_id, entry, steps, threshold, kwargs in _ANALYTIC + _BULLET:
        if env_id in gym.registry:
            continue
        gym.register(
            id=env_id,
            entry_point=entry,
            max_episode_steps=steps,
            reward_threshold=threshold,
            kwargs=kwargs,
        )
