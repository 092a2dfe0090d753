"""Gymnasium environments for diffmpc; importing this module registers "diffmpc/<Name>-v0"."""

from diffmpc.envs.model import EnvModel
from diffmpc.envs.registration import register_envs

register_envs()

__all__ = ["EnvModel", "register_envs"]
