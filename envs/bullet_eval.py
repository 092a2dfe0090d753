"""Measurements behind docs/envs_bullet.md: model error, episode scores, simulation speed.

``python -m diffmpc.envs.bullet_eval`` prints the tables of that page (the numbers it reports
come from seeded runs, so they are reproducible on one machine up to the speed column).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch

from diffmpc.envs.analytic_eval import steps_per_second
from diffmpc.envs.bullet_base import BulletEnv
from diffmpc.policy import MPCPolicy

__all__ = [
    "ModelError", "model_error", "episode_returns", "expert_returns", "mpc_expert",
    "steps_per_second", "BULLET_IDS",
]

BULLET_IDS = (
    "diffmpc/BulletCartpoleBalance-v0",
    "diffmpc/BulletCartpoleSwingup-v0",
    "diffmpc/BulletReacher-v0",
)

Policy = Callable[[np.ndarray], np.ndarray]


@dataclass
class ModelError:
    """One-step prediction error of a nominal model, per MPC state component.

    Attributes:
        mean: ``[n]`` mean absolute error.
        max: ``[n]`` largest absolute error.
        transitions: how many transitions were measured.
    """

    mean: np.ndarray
    max: np.ndarray
    transitions: int


def _random_transitions(env: gym.Env, episodes: int, seed: int):
    """Yield ``(obs, action, next_obs)`` along random-action episodes, seeded."""
    env.action_space.seed(seed)
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        done = False
        while not done:
            action = env.action_space.sample()
            nxt, _, term, trunc, _ = env.step(action)
            yield obs, action, nxt
            obs, done = nxt, term or trunc


def model_error(
    env: gym.Env, episodes: int = 5, seed: int = 0, domain_only: bool = False, **model_kwargs
) -> ModelError:
    """One-step error of ``env.unwrapped.model()`` on the states random actions visit.

    For every transition ``(o, a, o')`` the model predicts ``f(obs_to_state(o),
    action_to_ctrl(a))`` and is compared with ``obs_to_state(o')`` in float64; components
    listed in the env's ``angle_state_dims`` are compared modulo 2 pi.

    Args:
        env: a (wrapped) bullet env with a time limit.
        episodes: random-action episodes, reset with seeds ``seed, seed + 1, ...``.
        seed: the first seed (also seeds the action sampler).
        domain_only: keep only transitions whose both ends satisfy the env's
            ``in_model_domain`` (e.g. the cart clear of the stops).
        **model_kwargs: passed to ``model()`` (e.g. ``method="rk4"``).
    """
    base: BulletEnv = env.unwrapped  # type: ignore[assignment]
    model = base.model(**model_kwargs).to(torch.float64)
    transitions = list(_random_transitions(env, episodes, seed))
    obs, act, nxt = (np.stack([t[i] for t in transitions]) for i in range(3))
    if domain_only:
        keep = base.in_model_domain(obs) & base.in_model_domain(nxt)
        obs, act, nxt = obs[keep], act[keep], nxt[keep]
    as_t = lambda z: torch.as_tensor(z, dtype=torch.float64)  # noqa: E731
    with torch.no_grad():
        x = model.obs_to_state(as_t(obs))
        pred = model.dynamics(x, model.action_to_ctrl(as_t(act)))
        err = pred - model.obs_to_state(as_t(nxt))  # [N, n]
    dims = list(base.angle_state_dims)
    err[:, dims] = torch.remainder(err[:, dims] + math.pi, 2 * math.pi) - math.pi
    err = err.abs().numpy()
    return ModelError(mean=err.mean(0), max=err.max(0), transitions=err.shape[0])


def episode_returns(
    env: gym.Env, policy: Policy | None, episodes: int = 20, seed: int = 0,
    on_reset: Callable[[], None] | None = None,
) -> np.ndarray:
    """Undiscounted returns ``[episodes]`` of ``policy`` (None: uniform random actions).

    Episode ``i`` is reset with seed ``seed + i``; the random policy's sampler is seeded too.
    ``on_reset`` is called at every episode start (e.g. ``MPCPolicy.reset``).
    """
    env.action_space.seed(seed)
    returns = np.zeros(episodes)
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        if on_reset is not None:
            on_reset()
        done = False
        while not done:
            action = env.action_space.sample() if policy is None else policy(obs)
            obs, reward, term, trunc, _ = env.step(action)
            returns[ep] += reward
            done = term or trunc
    return returns


def mpc_expert(env: gym.Env, **mpc_options) -> MPCPolicy:
    """An ``MPCPolicy`` on the env's nominal model in float64 (``act(obs) -> action``)."""
    model = env.unwrapped.model().to(torch.float64)
    return MPCPolicy(model, **mpc_options)


def expert_returns(env_id: str, episodes: int = 20, seed: int = 0, **mpc_options) -> np.ndarray:
    """Returns ``[episodes]`` of the MPC expert, all episodes in lockstep (one batched solve).

    Episode ``i`` runs in its own env instance reset with seed ``seed + i``; the episodes of
    these envs never terminate, so they all end together at the time limit.
    """
    envs = [gym.make(env_id) for _ in range(episodes)]
    policy = mpc_expert(envs[0], **mpc_options)
    obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)])
    returns, done = np.zeros(episodes), False
    while not done:
        actions = policy.act(obs)
        steps = [env.step(a) for env, a in zip(envs, actions, strict=True)]
        obs = np.stack([s[0] for s in steps])
        returns += [s[1] for s in steps]
        done = all(s[2] or s[3] for s in steps)
    for env in envs:
        env.close()
    return returns



def _space(space: gym.Space) -> str:
    return f"Box{tuple(space.shape)}"


def _score(returns: np.ndarray) -> str:
    return f"{returns.mean():.2f} ± {returns.std():.2f}"


def _report(env_id: str, expert_episodes: int) -> list[str]:  # pragma: no cover
    """The table row and the model-error lines of one env."""
    env = gym.make(env_id)
    random = episode_returns(env, None, 20)
    start = time.perf_counter()
    expert = expert_returns(env_id, expert_episodes, max_iter=10)
    expert_speed = expert_episodes * env.spec.max_episode_steps / (time.perf_counter() - start)
    lines = [
        f"| {env_id} | {_space(env.observation_space)} | {_space(env.action_space)} | "
        f"{env.spec.max_episode_steps} | {env.spec.reward_threshold} | {_score(random)} | "
        f"{_score(expert)} | {expert.min():.2f} | {steps_per_second(env):.0f} | "
        f"{expert_speed:.0f} |"
    ]
    for method, domain in (("euler", False), ("euler", True), ("rk4", False), ("rk4", True)):
        e = model_error(env, 5, 0, domain, method=method)
        lines.append(f"{env_id} ({method}, domain_only={domain}, {e.transitions} transitions)\n"
                     f"  mean {np.array2string(e.mean, precision=4)}\n"
                     f"  max  {np.array2string(e.max, precision=4)}")
    env.close()
    return lines


def _main(env_ids: list[str], expert_episodes: int) -> None:  # pragma: no cover
    import diffmpc.envs  # noqa: F401  (registers the ids)
    import diffmpc.envs.bullet_cartpole  # noqa: F401  (import every env now, not mid-run)
    import diffmpc.envs.bullet_reacher  # noqa: F401

    torch.set_num_threads(1)  # tiny batched solves: one thread is ~100x faster on a busy CPU
    print(f"| id | obs | action | steps | threshold | random (20 eps) | MPC expert "
          f"({expert_episodes} eps) | expert worst | env steps/s | expert steps/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for env_id in env_ids:
        print("\n".join(_report(env_id, expert_episodes)), flush=True)


if __name__ == "__main__":  # pragma: no cover
    import argparse

    parser = argparse.ArgumentParser(description="Measure the pybullet envs (docs/envs_bullet.md)")
    parser.add_argument("--expert-episodes", type=int, default=20)
    parser.add_argument("--ids", nargs="*", default=list(BULLET_IDS))
    args = parser.parse_args()
    _main(args.ids, args.expert_episodes)
