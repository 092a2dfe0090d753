"""Tests of MPCPolicy: the receding-horizon logic (against a recording stub), gradients (against
finite differences) and the expert on the analytic envs and Pendulum-v1 (slow)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch

import diffmpc.envs  # noqa: F401  (registers the ids)
from diffmpc.envs.analytic_eval import expert_policy, lockstep_returns
from diffmpc.policy import MPCPolicy


def _model(env_id: str = "diffmpc/PendulumSwingup-v0"):
    return gym.make(env_id).unwrapped.model()


class RecordingMPC(torch.nn.Module):
    """Stands in for diffmpc.MPC: records u_init, returns controls ``0.5 * t`` + call index."""

    def __init__(self, policy: MPCPolicy) -> None:
        super().__init__()
        self.u_lower, self.u_upper = policy.u_lower, policy.u_upper
        self.calls: list = []

    def forward(self, x, cost, dynamics, u_init=None):
        self.calls.append(None if u_init is None else u_init.clone())
        B, T = x.shape[0], 4
        u = (0.5 * torch.arange(T, dtype=x.dtype) + len(self.calls)).expand(B, T)[..., None]
        return SimpleNamespace(u=u, converged=torch.ones(B, dtype=torch.bool))


def test_warm_start_shifts_previous_controls_and_resets():
    policy = MPCPolicy(_model(), horizon=4)
    stub = policy.mpc = RecordingMPC(policy)
    obs = torch.zeros(2, 3)
    a1 = policy(obs)
    torch.testing.assert_close(a1, torch.full((2, 1), 1.0 / 2.0, dtype=torch.float64))  # u=1 -> 0.5
    policy(obs)
    assert stub.calls[0] is None
    expected = torch.tensor([1.5, 2.0, 2.5, 2.5], dtype=torch.float64)  # shifted, last repeated
    torch.testing.assert_close(stub.calls[1][0, :, 0], expected)
    policy(torch.zeros(3, 3))  # batch size changed: no warm start
    assert stub.calls[2] is None
    policy.reset()
    policy(torch.zeros(3, 3))
    assert stub.calls[3] is None
    cold = MPCPolicy(_model(), horizon=4, warm_start=False)
    cold_stub = cold.mpc = RecordingMPC(cold)
    cold(obs)
    cold(obs)
    assert cold_stub.calls == [None, None]


def test_actions_shapes_bounds_and_numpy_act():
    policy = MPCPolicy(_model(), horizon=10, max_iter=10)
    th = torch.tensor([0.3, 2.0, -2.5], dtype=torch.float64)
    obs = torch.stack([th.cos(), th.sin(), torch.zeros(3, dtype=torch.float64)], -1)
    actions = policy(obs.float())
    assert actions.shape == (3, 1) and actions.dtype == torch.float64
    assert bool((actions.abs() <= 1 + 1e-9).all())
    assert policy.last_converged.shape == (3,)
    single = policy.act(obs[0].numpy())
    assert single.shape == (1,) and single.dtype == np.float32
    assert policy.act(obs.numpy()).shape == (3, 1)
    # a pendulum leaning right (th > 0) is pushed back: the torque is negative
    assert float(actions[0].detach()) < 0


def test_warm_start_is_detached_and_gradients_reach_the_model():
    policy = MPCPolicy(_model(), horizon=8, max_iter=20)
    obs = torch.tensor([[math.cos(0.05), math.sin(0.05), 0.0]], dtype=torch.float64)
    action = policy(obs)
    assert float(action.detach().abs()) < 0.99  # not at a bound, where the gradient vanishes
    action.sum().backward()
    assert not policy._u_prev.requires_grad
    policy.zero_grad()
    policy(obs).sum().backward()  # a second call: no graph kept from the first
    grads = {n: p.grad for n, p in policy.named_parameters()}
    assert grads["dynamics.log_m"] is not None and grads["dynamics.log_m"].abs() > 0
    assert grads["cost.raw_state_weight"] is not None


def test_action_gradient_matches_finite_differences():
    torch.manual_seed(0)
    policy = MPCPolicy(_model(), horizon=10, warm_start=False, max_iter=100, tol=1e-12)
    obs = torch.tensor([[math.cos(0.05), math.sin(0.05), -0.1]], dtype=torch.float64)
    param = policy.dynamics.log_l
    action = policy(obs)
    assert float(action.detach().abs()) < 0.99  # not at a bound
    (grad,) = torch.autograd.grad(action.sum(), param)
    h = 1e-5
    with torch.no_grad():
        param += h
        plus = policy(obs).sum()
        param -= 2 * h
        minus = policy(obs).sum()
        param += h
    fd = (plus - minus) / (2 * h)
    assert abs(float(fd)) > 1e-3
    assert float(grad) == pytest.approx(float(fd), rel=1e-4, abs=1e-7)


def test_dtype_follows_the_module():
    policy = MPCPolicy(_model(), horizon=5, max_iter=5).float()
    obs = torch.tensor([[1.0, 0.0, 0.5]])
    assert policy(obs).dtype == torch.float32


def test_bad_input_raises_value_error():
    policy = MPCPolicy(_model(), horizon=5)
    with pytest.raises(ValueError, match="obs"):
        policy(torch.zeros(3))
    with pytest.raises(ValueError, match="obs"):
        policy(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="EnvModel"):
        MPCPolicy(object())
    with pytest.raises(ValueError, match="horizon"):
        MPCPolicy(_model(), horizon=0)
    with pytest.raises(ValueError):
        MPCPolicy(_model(), not_an_option=1)


@pytest.mark.slow
@pytest.mark.parametrize("env_id", ["diffmpc/PendulumSwingup-v0", "diffmpc/CartpoleSwingup-v0",
                                    "diffmpc/ArmReach-v0", "Pendulum-v1"])
def test_expert_solves_the_env(env_id):
    torch.set_num_threads(1)
    env = gym.make(env_id)
    expert = lockstep_returns(env_id, expert_policy(env), episodes=2, seed=100)
    random = lockstep_returns(env_id, None, episodes=2, seed=100)
    threshold = env.spec.reward_threshold
    if threshold is None:  # Pendulum-v1 has none: a swing-up from hanging scores about -240
        threshold = -400.0  # there (docs/envs.md); random actions about -1200
    assert bool((expert >= threshold).all()), expert
    assert bool((random < threshold).all()), random
