"""Registration of every diffmpc env with Gymnasium (idempotent)."""

from __future__ import annotations

import gymnasium as gym

# (id, entry_point, max_episode_steps, reward_threshold, kwargs)
_ANALYTIC: list[tuple[str, str, int, float, dict]] = [
    # analytic envs (stepping diffmpc.systems) go here
]

_BULLET: list[tuple[str, str, int, float, dict]] = [
    # pybullet envs go here
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
