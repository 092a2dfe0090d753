"""Measurements behind docs/envs.md: expert (MPC) and random scores, env speed.

``python -m diffmpc.envs.analytic_eval`` prints the table of that page. Episodes run in lockstep
(one env per episode, one batched ``MPCPolicy`` call per step), with seeds ``seed + i``.
"""

from __future__ import annotations

import time
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from diffmpc.policy import MPCPolicy

__all__ = ["ANALYTIC_IDS", "EXPERT_OPTIONS", "expert_policy", "lockstep_returns",
           "steps_per_second"]

ANALYTIC_IDS = ("diffmpc/PendulumSwingup-v0", "diffmpc/CartpoleSwingup-v0", "diffmpc/ArmReach-v0")

# MPC options of the expert per env id (Pendulum-v1's model comes from gym_pendulum_model)
EXPERT_OPTIONS: dict[str, dict[str, Any]] = {
    "diffmpc/PendulumSwingup-v0": {"max_iter": 30},
    "diffmpc/CartpoleSwingup-v0": {"max_iter": 30},
    "diffmpc/ArmReach-v0": {"max_iter": 30},
    "Pendulum-v1": {"max_iter": 30},
}


def expert_policy(env: gym.Env, **mpc_options: Any) -> MPCPolicy:
    """The MPC expert of ``env``: ``MPCPolicy`` on its exact model (Pendulum-v1: the model of
    ``gym_pendulum_model``), with ``EXPERT_OPTIONS`` updated by ``mpc_options``."""
    from diffmpc.envs.gym_models import gym_pendulum_model

    env_id = env.spec.id if env.spec is not None else ""
    model = gym_pendulum_model(env) if env_id == "Pendulum-v1" else env.unwrapped.model()
    return MPCPolicy(model, **{**EXPERT_OPTIONS.get(env_id, {}), **mpc_options})


def lockstep_returns(env_id: str, policy: MPCPolicy | None, episodes: int = 20,
                     seed: int = 0, **make_kwargs: Any) -> np.ndarray:
    """Undiscounted returns ``[episodes]``, episode ``i`` reset with seed ``seed + i``.

    Args:
        env_id: a registered id.
        policy: an ``MPCPolicy`` called on the stacked observations ``[episodes, obs_dim]``
            (an env that has ended keeps its last observation and is not stepped), or None for
            uniform random actions (each env's action space seeded with ``seed + i``).
        episodes, seed: how many episodes, the first seed.
        **make_kwargs: passed to ``gymnasium.make``.
    """
    envs = [gym.make(env_id, **make_kwargs) for _ in range(episodes)]
    obs = np.stack([e.reset(seed=seed + i)[0] for i, e in enumerate(envs)])
    for i, e in enumerate(envs):
        e.action_space.seed(seed + i)
    if policy is not None:
        policy.reset()
    returns, done = np.zeros(episodes), np.zeros(episodes, dtype=bool)
    while not done.all():
        if policy is None:
            actions = np.stack([e.action_space.sample() for e in envs])
        else:
            actions = policy.act(obs)
        for i in np.flatnonzero(~done):
            obs[i], reward, term, trunc, _ = envs[i].step(actions[i])
            returns[i] += reward
            done[i] = term or trunc
    for e in envs:
        e.close()
    return returns


def steps_per_second(env: gym.Env | str, steps: int = 4000, seed: int = 0) -> float:
    """Env steps per second under random actions (resets included, not timed apart).

    Args:
        env: an env, or an id to make (and close afterwards).
    """
    owned = isinstance(env, str)
    env = gym.make(env) if owned else env
    env.action_space.seed(seed)
    env.reset(seed=seed)
    actions = [env.action_space.sample() for _ in range(steps)]
    start = time.perf_counter()
    for a in actions:
        _, _, term, trunc, _ = env.step(a)
        if term or trunc:
            env.reset()
    rate = steps / (time.perf_counter() - start)
    if owned:
        env.close()
    return rate


def _row(env_id: str, episodes: int) -> str:
    env = gym.make(env_id)
    start = time.perf_counter()
    expert_ret = lockstep_returns(env_id, expert_policy(env), episodes)
    expert_rate = episodes * env.spec.max_episode_steps / (time.perf_counter() - start)
    random_ret = lockstep_returns(env_id, None, episodes)
    spec = env.spec
    return (f"| {env_id} | {spec.max_episode_steps} | {spec.reward_threshold} | "
            f"{expert_ret.mean():.1f} ± {expert_ret.std():.1f} | {expert_ret.min():.1f} | "
            f"{random_ret.mean():.1f} ± {random_ret.std():.1f} | "
            f"{steps_per_second(env_id):.0f} | {expert_rate:.0f} |")


def _main() -> None:  # pragma: no cover - a report script
    import diffmpc.envs  # noqa: F401  (registers the ids)

    torch.set_num_threads(1)
    episodes = 20
    lines = [f"| id | steps | threshold | MPC expert ({episodes} eps) | expert worst "
             f"| random ({episodes} eps) | env steps/s | expert steps/s (batch {episodes}) |",
             "|---|---|---|---|---|---|---|---|"]
    for env_id in (*ANALYTIC_IDS, "Pendulum-v1"):
        lines.append(_row(env_id, episodes))
    print("\n".join(lines))


if __name__ == "__main__":  # pragma: no cover
    _main()
