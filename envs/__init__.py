"""Gymnasium environments for diffmpc; importing this module registers "diffmpc/<Name>-v0"."""

from diffmpc.envs.gym_models import gym_pendulum_model, pendulum_v1_cost
from diffmpc.envs.model import EnvModel
from diffmpc.envs.registration import register_envs

register_envs()

__all__ = ["EnvModel", "register_envs", "gym_pendulum_model", "pendulum_v1_cost"]
