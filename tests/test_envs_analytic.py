"""Tests of the analytic envs (diffmpc.envs.{pendulum,cartpole,arm}) and Pendulum-v1's model."""

from __future__ import annotations

import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from gymnasium.wrappers import RescaleAction

import diffmpc.envs  # noqa: F401  (registers the ids)
from diffmpc.envs import EnvModel, gym_pendulum_model
from diffmpc.systems import Cartpole, Pendulum, TwoLinkArm

IDS = ["diffmpc/PendulumSwingup-v0", "diffmpc/CartpoleSwingup-v0", "diffmpc/ArmReach-v0"]
SYSTEM_OF = {IDS[0]: Pendulum, IDS[1]: Cartpole, IDS[2]: TwoLinkArm}


def _rollout(env: gym.Env, seed: int, steps: int, action_seed: int = 0):
    """Observations, actions, rewards of ``steps`` random actions after ``reset(seed)``."""
    rng = np.random.default_rng(action_seed)
    obs, _ = env.reset(seed=seed)
    traj = [obs]
    actions = rng.uniform(-1, 1, size=(steps, *env.action_space.shape)).astype(np.float32)
    rewards = []
    for a in actions:
        obs, r, *_ = env.step(a)
        traj.append(obs)
        rewards.append(r)
    return np.stack(traj), actions, np.array(rewards)


@pytest.mark.parametrize("env_id", IDS)
def test_gymnasium_check_env_without_warnings(env_id):
    env = gym.make(env_id, render_mode="rgb_array")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gym_check_env(env.unwrapped)
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("env_id", IDS)
def test_sb3_check_env_without_warnings(env_id):
    sb3_checker = pytest.importorskip("stable_baselines3.common.env_checker")
    env = gym.make(env_id)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sb3_checker.check_env(env, warn=True)
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("env_id", IDS)
def test_spaces_and_registration(env_id):
    env = gym.make(env_id)
    system = SYSTEM_OF[env_id]
    assert env.spec.max_episode_steps > 0 and env.spec.reward_threshold is not None
    assert env.action_space == gym.spaces.Box(-1.0, 1.0, (system.n_ctrl,), np.float32)
    assert env.observation_space.shape == (system.n_state,)
    assert env.observation_space.dtype == np.float32


@pytest.mark.parametrize("env_id", IDS)
def test_same_seed_same_trajectory(env_id):
    env_a, env_b = gym.make(env_id), gym.make(env_id)
    obs_a, act_a, rew_a = _rollout(env_a, seed=7, steps=30)
    obs_b, act_b, rew_b = _rollout(env_b, seed=7, steps=30)
    np.testing.assert_array_equal(obs_a, obs_b)
    np.testing.assert_array_equal(rew_a, rew_b)
    obs_c, _, _ = _rollout(env_a, seed=8, steps=30)
    assert not np.array_equal(obs_a[0], obs_c[0])


@pytest.mark.parametrize("env_id", IDS)
def test_observations_and_actions_stay_in_spaces(env_id):
    env = gym.make(env_id)
    env.action_space.seed(0)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    steps, truncated = 0, False
    while not truncated:
        action = env.action_space.sample()
        assert env.action_space.contains(action)
        obs, reward, terminated, truncated, _ = env.step(action)
        assert env.observation_space.contains(obs) and np.isfinite(reward) and not terminated
        steps += 1
    assert steps == env.spec.max_episode_steps


@pytest.mark.parametrize("env_id", IDS)
def test_rgb_array_frames(env_id):
    env = gym.make(env_id, render_mode="rgb_array")
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (256, 256, 3) and frame.dtype == np.uint8
    assert len(np.unique(frame.reshape(-1, 3), axis=0)) >= 3  # background and two bodies
    env.unwrapped.reset(options={"state": -env.unwrapped.state})  # a different pose
    assert not np.array_equal(env.render(), frame)
    assert gym.make(env_id).unwrapped.render() is None  # no render_mode: no frame


@pytest.mark.parametrize("env_id", IDS)
def test_transition_and_reward_equal_the_model(env_id):
    env = gym.make(env_id).unwrapped
    model = env.model()
    assert isinstance(model, EnvModel) and model.dt == env.dt
    assert (model.n_state, model.n_ctrl) == (SYSTEM_OF[env_id].n_state, SYSTEM_OF[env_id].n_ctrl)
    rng = np.random.default_rng(1)
    obs, _ = env.reset(seed=3)
    for _ in range(40):
        x = torch.as_tensor(env.state)[None]
        torch.testing.assert_close(model.obs_to_state(torch.as_tensor(obs)[None]),
                                   x.float(), rtol=0, atol=0)
        a = rng.uniform(-1, 1, size=model.n_ctrl)
        u = model.action_to_ctrl(torch.as_tensor(a)[None])
        obs, reward, *_ = env.step(a.astype(np.float32))
        with torch.no_grad():
            x_next = model.dynamics(x, u)
            cost = model.cost(x, u)
        # float32 actions: the env steps the float32-rounded action, as the model does here
        u32 = model.action_to_ctrl(torch.as_tensor(a.astype(np.float32), dtype=torch.float64))
        with torch.no_grad():
            x_next = model.dynamics(x, u32[None])
            cost = model.cost(x, u32[None])
        torch.testing.assert_close(torch.as_tensor(env.state)[None], x_next, rtol=1e-12,
                                   atol=1e-12)
        assert reward == pytest.approx(-float(cost), rel=1e-12, abs=1e-12)
    assert model.horizon == env.horizon


@pytest.mark.parametrize("env_id", IDS)
def test_model_maps_and_bounds(env_id):
    env = gym.make(env_id).unwrapped
    model = env.model()
    a = torch.tensor([[-1.0] * model.n_ctrl, [1.0] * model.n_ctrl, [0.3] * model.n_ctrl],
                     dtype=torch.float64)
    u = model.action_to_ctrl(a)
    torch.testing.assert_close(u[0], model.u_lower)
    torch.testing.assert_close(u[1], model.u_upper)
    torch.testing.assert_close(model.ctrl_to_action(u), a)
    assert model.u_lower.dtype == torch.float64 and bool((model.u_lower < model.u_upper).all())
    # the model is a copy: training it leaves the env unchanged
    with torch.no_grad():
        next(model.dynamics.parameters()).add_(1.0)
    assert not torch.equal(next(model.dynamics.parameters()),
                           next(env.system.parameters()))
    if env_id == "diffmpc/ArmReach-v0":  # the copied cost reads the copied arm's kinematics
        assert model.cost.end_effector.__self__ is model.dynamics


def test_actions_are_clipped_and_bad_input_raises():
    env = gym.make(IDS[0]).unwrapped
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(1, dtype=np.float32))
    env.reset(seed=0, options={"state": np.array([-1.0, 0.0, 0.0])})
    obs_big, r_big, *_ = env.step(np.array([5.0], dtype=np.float32))
    env.reset(seed=0, options={"state": np.array([-1.0, 0.0, 0.0])})
    obs_one, r_one, *_ = env.step(np.array([1.0], dtype=np.float32))
    np.testing.assert_array_equal(obs_big, obs_one)
    assert r_big == r_one
    with pytest.raises(ValueError, match="action"):
        env.step(np.zeros(2, dtype=np.float32))
    with pytest.raises(ValueError, match="state"):
        env.reset(options={"state": np.zeros(5)})
    with pytest.raises(ValueError, match="render_mode"):
        type(env)(render_mode="human")
    with pytest.raises(ValueError, match="target"):
        gym.make(IDS[2], target=(2.0, 0.0))


def test_pendulum_env_reward_formula_and_physics():
    env = gym.make(IDS[0]).unwrapped
    th, w, a = 0.7, -1.5, 0.4
    env.reset(options={"state": np.array([math.cos(th), math.sin(th), w])})
    obs, reward, *_ = env.step(np.array([a], dtype=np.float32))
    u = 2.0 * float(np.float32(a))
    want_r = -(0.5 * ((math.cos(th) - 1) ** 2 + math.sin(th) ** 2 + 0.1 * w**2) + 0.0005 * u**2)
    assert reward == pytest.approx(want_r, rel=1e-12)
    w_next = w + 0.05 * (15.0 * math.sin(th) + 3.0 * u)  # semi-implicit Euler, g=10, m=l=1
    th_next = th + 0.05 * w_next
    np.testing.assert_allclose(env.state, [math.cos(th_next), math.sin(th_next), w_next],
                               rtol=1e-12)


# ------------------------------------------------------------------------------ Pendulum-v1


def test_gym_pendulum_model_matches_pendulum_v1():
    env = gym.make("Pendulum-v1")
    model = gym_pendulum_model(env)
    assert (model.n_state, model.n_ctrl, model.dt) == (3, 1, 0.05)
    torch.testing.assert_close(model.u_upper, torch.tensor([2.0], dtype=torch.float64))
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=0)
    checked = 0
    for _ in range(100):
        th, thdot = env.unwrapped.state
        action = rng.uniform(-2, 2, size=1).astype(np.float32)
        nxt, reward, *_ = env.step(action)
        x = torch.tensor([[math.cos(th), math.sin(th), thdot]], dtype=torch.float64)
        u = model.action_to_ctrl(torch.as_tensor(action, dtype=torch.float64)[None])
        with torch.no_grad():
            pred = model.dynamics(x, u)[0].numpy()
            cost = float(model.cost(x, u)[0])
        th_wrapped = (th + math.pi) % (2 * math.pi) - math.pi
        # the documented gap between the quadratic cost and the reward
        gap = th_wrapped**2 - 2 * (1 - math.cos(th))
        assert -reward - cost == pytest.approx(gap, abs=1e-5)
        if abs(pred[2]) <= 8.0:  # Pendulum-v1 clips thdot at 8; the model does not
            np.testing.assert_allclose(pred, nxt, atol=2e-6)
            checked += 1

    assert checked > 50


def test_gym_pendulum_model_action_maps_follow_wrappers():
    plain = gym_pendulum_model(gym.make("Pendulum-v1"))
    u = torch.tensor([[-2.0], [0.5], [2.0]], dtype=torch.float64)
    torch.testing.assert_close(plain.ctrl_to_action(u), u)
    one = np.ones(1, dtype=np.float32)
    scaled = gym_pendulum_model(RescaleAction(gym.make("Pendulum-v1"), -one, one))
    torch.testing.assert_close(scaled.ctrl_to_action(u), u / 2.0)
    torch.testing.assert_close(scaled.action_to_ctrl(scaled.ctrl_to_action(u)), u)
    with pytest.raises(ValueError, match="Pendulum-v1"):
        gym_pendulum_model(gym.make(IDS[0]))


def test_pendulum_v1_cost_matches_reward_near_the_goal():
    model = gym_pendulum_model(gym.make("Pendulum-v1"))
    th = torch.tensor([1e-3, -0.05, 0.1], dtype=torch.float64)
    w = torch.tensor([0.3, -2.0, 1.0], dtype=torch.float64)
    x = torch.stack([th.cos(), th.sin(), w], -1)
    u = torch.tensor([[0.5], [-1.0], [2.0]], dtype=torch.float64)
    reward_cost = th**2 + 0.1 * w**2 + 0.001 * u[:, 0] ** 2
    with torch.no_grad():
        torch.testing.assert_close(model.cost(x, u), reward_cost, rtol=0, atol=th.pow(4).max())
