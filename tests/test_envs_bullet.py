"""Tests of the pybullet envs: API checks, seeding, spaces, rendering, cleanup, model fidelity."""

from __future__ import annotations

import math
import pickle
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch

pybullet = pytest.importorskip("pybullet")

import diffmpc.envs  # noqa: E402,F401  (registers the ids)
from diffmpc.envs.bullet_cartpole import CARTPOLE_PARAMS, BulletCartpoleEnv  # noqa: E402
from diffmpc.envs.bullet_eval import BULLET_IDS, episode_returns, model_error  # noqa: E402
from diffmpc.envs.bullet_reacher import REACHER_PARAMS, BulletReacherEnv  # noqa: E402


def _rollout(env: gym.Env, seed: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Observations ``[steps + 1, obs_dim]`` and rewards ``[steps]`` under seeded random actions."""
    obs, _ = env.reset(seed=seed)
    env.action_space.seed(seed)
    observations, rewards = [obs], []
    for _ in range(steps):
        obs, reward, _, _, _ = env.step(env.action_space.sample())
        observations.append(obs)
        rewards.append(reward)
    return np.stack(observations), np.array(rewards)


def test_every_bullet_id_is_registered_with_limits():
    for env_id in BULLET_IDS:
        spec = gym.spec(env_id)
        assert spec.max_episode_steps is not None and spec.max_episode_steps > 0
        assert spec.reward_threshold is not None


@pytest.mark.parametrize("env_id", BULLET_IDS)
def test_gymnasium_and_sb3_check_env(env_id):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = gym.make(env_id, render_mode="rgb_array")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped, skip_render_check=False)
        sb3_check_env(env)
    env.close()
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("env_id", BULLET_IDS)
def test_same_seed_same_trajectory(env_id):
    env_a, env_b = gym.make(env_id), gym.make(env_id)
    obs_a, rew_a = _rollout(env_a, seed=3, steps=60)
    obs_b, rew_b = _rollout(env_b, seed=3, steps=60)
    obs_c, rew_c = _rollout(env_a, seed=3, steps=60)  # the same env again, after 60 steps
    obs_d, _ = _rollout(env_b, seed=4, steps=60)
    env_a.close()
    env_b.close()
    np.testing.assert_array_equal(obs_a, obs_b)
    np.testing.assert_array_equal(rew_a, rew_b)
    np.testing.assert_array_equal(obs_a, obs_c)
    np.testing.assert_array_equal(rew_a, rew_c)
    assert not np.array_equal(obs_a, obs_d)


@pytest.mark.parametrize("env_id", BULLET_IDS)
def test_observations_and_actions_stay_in_their_spaces(env_id):
    env = gym.make(env_id)
    env.action_space.seed(0)
    for episode in range(2):
        obs, _ = env.reset(seed=episode)
        assert env.observation_space.contains(obs)
        done = False
        while not done:
            action = env.action_space.sample()
            assert env.action_space.contains(action)
            obs, reward, term, trunc, _ = env.step(action)
            assert env.observation_space.contains(obs), obs
            assert reward <= 0.0
            done = term or trunc
    assert trunc and not term
    env.close()


def test_actions_are_normalized_and_clipped():
    env = BulletCartpoleEnv()
    assert env.action_space.low.tolist() == [-1.0] and env.action_space.high.tolist() == [1.0]
    np.testing.assert_allclose(env.action_to_ctrl(np.array([0.5])), [0.5 * env.ctrl_scale[0]])
    np.testing.assert_allclose(env.action_to_ctrl(np.array([3.0])), [env.ctrl_scale[0]])
    env.close()


@pytest.mark.parametrize("env_id", BULLET_IDS)
def test_rgb_array_frames(env_id):
    env = gym.make(env_id, render_mode="rgb_array", width=64, height=48)
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (48, 64, 3) and frame.dtype == np.uint8
    assert frame.min() < frame.max()  # something is drawn
    env.step(env.action_space.sample())
    assert env.render().shape == (48, 64, 3)
    env.close()
    plain = gym.make(env_id).unwrapped
    plain.reset(seed=0)
    assert plain.render() is None  # no render_mode: no frame
    plain.close()


@pytest.mark.parametrize("env_id", BULLET_IDS)
def test_close_releases_the_bullet_client(env_id):
    env = gym.make(env_id)
    env.reset(seed=0)
    client = env.unwrapped.client_id
    assert pybullet.isConnected(physicsClientId=client)
    env.close()
    assert not pybullet.isConnected(physicsClientId=client)
    env.close()  # a second close is harmless
    with pytest.raises(RuntimeError, match="closed"):
        env.unwrapped.step(np.zeros(env.action_space.shape, dtype=np.float32))


def test_each_env_has_its_own_client():
    env_a, env_b = BulletCartpoleEnv(), BulletCartpoleEnv()
    assert env_a.client_id != env_b.client_id
    obs_b, _ = env_b.reset(options={"state": [0.0, 0.0, 0.3, 0.0]})
    env_a.reset(options={"state": [0.0, 0.0, -0.3, 0.0]})
    for _ in range(10):
        env_a.step(np.ones(1, dtype=np.float32))
    np.testing.assert_array_equal(env_b._get_obs(), obs_b)  # env_b did not move
    env_a.close()
    env_b.close()


def test_cartpole_urdf_matches_its_parameters():
    env = BulletCartpoleEnv()
    bc, body = env.bullet, env._body
    cart, pole = (bc.getDynamicsInfo(body, j) for j in env._joints)
    assert cart[0] == pytest.approx(CARTPOLE_PARAMS["mass_cart"])
    assert pole[0] == pytest.approx(CARTPOLE_PARAMS["mass_pole"])
    half = CARTPOLE_PARAMS["half_length"]
    assert pole[3] == pytest.approx((0.0, 0.0, half))  # centre of mass above the hinge
    rod = CARTPOLE_PARAMS["mass_pole"] * (2 * half) ** 2 / 12  # uniform rod about its centre
    assert pole[2][1] == pytest.approx(rod, rel=1e-4)  # inertia about the hinge axis (y)
    assert env.rail_limit == pytest.approx(2.4)
    env.close()


def test_reacher_urdf_matches_its_parameters():
    env = BulletReacherEnv()
    bc, body = env.bullet, env._body
    for j, (m, l) in zip(env._joints, [("m1", "l1"), ("m2", "l2")], strict=True):
        mass, _, inertia, com = bc.getDynamicsInfo(body, j)[:4]
        assert mass == pytest.approx(REACHER_PARAMS[m])
        assert com == pytest.approx((REACHER_PARAMS[l] / 2, 0.0, 0.0))
        rod = REACHER_PARAMS[m] * REACHER_PARAMS[l] ** 2 / 12
        assert inertia[2] == pytest.approx(rod, rel=1e-4)  # about the joint axis (z)
        assert bc.getJointInfo(body, j)[6] == pytest.approx(REACHER_PARAMS["damping"])
    elbow_offset = bc.getJointInfo(body, env._joints[1])[14]  # from link 1's centre of mass
    assert elbow_offset == pytest.approx((REACHER_PARAMS["l1"] / 2, 0.0, 0.0))
    env.close()


def test_reacher_fingertip_matches_bullet_kinematics():
    env = BulletReacherEnv()
    env.reset(options={"state": [0.7, -1.2, 0.0, 0.0], "target": [0.3, 0.3]})
    link2 = env.bullet.getLinkState(env._body, env._joints[1], computeForwardKinematics=True)
    pos, orn = link2[4], link2[5]  # link frame = elbow joint frame
    tip, _ = env.bullet.multiplyTransforms(pos, orn, [REACHER_PARAMS["l2"], 0, 0], [0, 0, 0, 1])
    np.testing.assert_allclose(env.fingertip(np.array([0.7, -1.2])), tip[:2], atol=1e-9)
    obs = env._get_obs()
    np.testing.assert_allclose(obs[8:10], np.array(tip[:2]) - [0.3, 0.3], atol=1e-6)
    env.close()


@pytest.mark.parametrize("env_id", BULLET_IDS)
def test_reward_is_minus_the_model_cost(env_id):
    env = gym.make(env_id)
    model = env.unwrapped.model().to(torch.float64)
    obs, _ = env.reset(seed=1)
    env.action_space.seed(1)
    for _ in range(20):
        action = env.action_space.sample()
        x = model.obs_to_state(torch.as_tensor(obs, dtype=torch.float64)[None])
        u = model.action_to_ctrl(torch.as_tensor(action, dtype=torch.float64)[None])
        with torch.no_grad():
            expected = -float(model.cost(x, u))
        obs, reward, _, _, _ = env.step(action)
        assert reward == pytest.approx(expected, rel=1e-5, abs=1e-5)
    env.close()


@pytest.mark.parametrize("env_id", BULLET_IDS)
def test_model_maps_are_consistent(env_id):
    env = gym.make(env_id)
    model = env.unwrapped.model()
    a = torch.tensor([[0.3] * env.action_space.shape[0]])
    torch.testing.assert_close(model.ctrl_to_action(model.action_to_ctrl(a)), a)
    torch.testing.assert_close(model.action_to_ctrl(torch.ones_like(a))[0], model.u_upper)
    torch.testing.assert_close(model.action_to_ctrl(5 * a)[0], model.u_upper)  # 1.5 is clipped
    restored = pickle.loads(pickle.dumps(model.action_to_ctrl))  # SB3 pickles policies
    torch.testing.assert_close(restored(a), model.action_to_ctrl(a))
    obs, _ = env.reset(seed=0)
    x = model.obs_to_state(torch.as_tensor(obs)[None])
    assert x.shape == (1, model.n_state)
    assert model.dynamics(x, torch.zeros(1, model.n_ctrl)).shape == (1, model.n_state)
    assert model.dt == env.unwrapped.dt
    env.close()


def test_reacher_state_carries_the_target_unchanged():
    env = BulletReacherEnv()
    model = env.model().to(torch.float64)
    obs, _ = env.reset(options={"target": [-0.4, 0.5]})
    x = model.obs_to_state(torch.as_tensor(obs, dtype=torch.float64)[None])
    torch.testing.assert_close(x[0, 4:], torch.tensor([-0.4, 0.5], dtype=torch.float64))
    nxt = model.dynamics(x, torch.ones(1, 2, dtype=torch.float64))
    torch.testing.assert_close(nxt[0, 4:], x[0, 4:])
    env.close()


# One-step model error. Bullet integrates with semi-implicit Euler in N = 10 substeps of
# h = dt / N; over one env step its result differs from the exact flow by about (dt h / 2) |a|
# in positions/angles (a: acceleration), while the RK4 model is exact to O(dt^5). With the
# accelerations these systems reach under full actuation (cart-pole |a| <= ~60 m/s^2 or
# rad/s^2 with the pole spinning at ~12 rad/s; arm |qddot2| <= ~200 rad/s^2 from
# (M^-1)_22 <= 55 kg^-1 m^-2 and 2 N m plus damping and Coriolis terms) that bounds the
# positions by 1.25e-4 * 60 = 0.0075 and 1.25e-4 * 200 = 0.025. Velocities have no such simple
# bound, so every component's mean error must stay below 5% of its mean one-step change (about
# 1/(2N) = 5% is the relative error of N semi-implicit substeps). A wrong mass, length, damping,
# sign or unit breaks these by far. The cart-pole excludes transitions touching the end stops,
# which the model leaves out on purpose.
_POSITION_BOUND = {"diffmpc/BulletCartpoleBalance-v0": ([0, 2, 3], 0.0075),
                   "diffmpc/BulletCartpoleSwingup-v0": ([0, 2, 3], 0.0075),
                   "diffmpc/BulletReacher-v0": ([0, 1], 0.025)}


def _mean_step(env: gym.Env) -> np.ndarray:
    """Mean |x' - x| per MPC state component over seeded random transitions (2 episodes)."""
    model = env.unwrapped.model().to(torch.float64)
    dims = list(env.unwrapped.angle_state_dims)
    steps = []
    for ep in range(2):
        obs, _ = _rollout(env, seed=ep, steps=env.spec.max_episode_steps)
        keep = env.unwrapped.in_model_domain(obs)
        x = model.obs_to_state(torch.as_tensor(obs, dtype=torch.float64)).numpy()
        d = np.diff(x, axis=0)[keep[:-1] & keep[1:]]
        d[:, dims] = np.remainder(d[:, dims] + math.pi, 2 * math.pi) - math.pi
        steps.append(np.abs(d))
    return np.concatenate(steps).mean(0)


@pytest.mark.parametrize("env_id", BULLET_IDS)
def test_one_step_model_error_is_small(env_id):
    env = gym.make(env_id)
    err = model_error(env, episodes=2, seed=0, domain_only=True, method="rk4")
    dims, bound = _POSITION_BOUND[env_id]
    assert err.transitions >= 150
    assert np.all(err.max[dims] < bound), err.max
    moving = _mean_step(env)
    changing = moving > 1e-9  # the reacher's target does not move: its error must be 0
    assert np.all(err.mean[changing] < 0.05 * moving[changing]), (err.mean, moving)
    assert np.all(err.max[~changing] == 0.0)
    env.close()


@pytest.mark.parametrize("env_id", BULLET_IDS[:2])
def test_cartpole_euler_model_error(env_id):
    # The default cart-pole model is mpc.pytorch's explicit Euler step: its local error is
    # dt^2 / 2 |a| <= 0.00125 * 60 = 0.075 in x and in the angle (hence in cos and sin).
    env = gym.make(env_id)
    err = model_error(env, episodes=2, seed=0, domain_only=True)
    assert np.all(err.max[[0, 2, 3]] < 0.075), err.max
    env.close()


def test_episode_returns_are_seeded_and_call_on_reset():
    env = gym.make("diffmpc/BulletReacher-v0")
    resets = []
    first = episode_returns(env, None, episodes=3, seed=5, on_reset=lambda: resets.append(1))
    again = episode_returns(env, None, episodes=3, seed=5)
    zero = episode_returns(env, lambda obs: np.zeros(2, dtype=np.float32), episodes=3, seed=5)
    env.close()
    np.testing.assert_array_equal(first, again)
    assert len(resets) == 3 and np.all(first < 0) and not np.array_equal(first, zero)


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="task"):
        BulletCartpoleEnv(task="spin")
    with pytest.raises(ValueError, match="render_mode"):
        BulletCartpoleEnv(render_mode="human")
    with pytest.raises(ValueError, match="width"):
        BulletReacherEnv(width=0)
    env = BulletCartpoleEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"action must be a finite array of shape \(1,\)"):
        env.step(np.zeros(2, dtype=np.float32))
    with pytest.raises(ValueError, match="action"):
        env.step(np.array([np.nan], dtype=np.float32))
    with pytest.raises(ValueError, match="options\\['state'\\]"):
        env.reset(options={"state": [5.0, 0.0, 0.0, 0.0]})  # beyond the end stop
    env.close()
    reacher = BulletReacherEnv()
    with pytest.raises(ValueError, match="options\\['target'\\]"):
        reacher.reset(options={"target": [2.0, 0.0]})  # out of reach
    with pytest.raises(ValueError, match="options\\['state'\\]"):
        reacher.reset(options={"state": [0.0, 0.0]})
    reacher.close()


def test_reset_options_set_the_state():
    env = BulletCartpoleEnv(task="swingup")
    obs, _ = env.reset(options={"state": [0.5, -0.2, math.pi / 2, 1.0]})
    np.testing.assert_allclose(obs, [0.5, -0.2, 0.0, 1.0, 1.0], atol=1e-6)
    hanging, _ = env.reset(seed=0)
    assert hanging[2] < -0.99  # swing-up starts with the pole down
    env.close()


@pytest.fixture
def one_torch_thread():
    """Tiny MPC solves run ~100x faster on one thread when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("env_id, steps", [("diffmpc/BulletCartpoleSwingup-v0", 120),
                                           ("diffmpc/BulletReacher-v0", 60)])
def test_mpc_on_the_nominal_model_solves_the_task(env_id, steps, one_torch_thread):
    from diffmpc.policy import MPCPolicy

    env = gym.make(env_id)
    policy = MPCPolicy(env.unwrapped.model().to(torch.float64), max_iter=10)
    obs, _ = env.reset(seed=0)
    for _ in range(steps):
        obs, _, _, _, _ = env.step(policy.act(obs))
    if "Cartpole" in env_id:
        assert obs[2] > 0.95  # the pole is up after 6 s
    else:
        assert np.linalg.norm(obs[8:10]) < 0.02  # the fingertip is on the target after 3 s
    env.close()
