"""Differentiable physical models: ``forward(x [B, n], u [B, m]) -> [B, n]``, learnable parameters.

Each model has ``n_state``, ``n_ctrl``, ``dt``, ``method`` ("euler" or "rk4"), buffers
``u_lower``/``u_upper`` ``[m]`` (default control bounds) and ``default_cost()``. The analytic
envs in ``diffmpc.envs`` step the same code.
"""

from diffmpc.systems.arm import ReachCost, TwoLinkArm
from diffmpc.systems.cartpole import Cartpole
from diffmpc.systems.pendulum import Pendulum

__all__ = ["Pendulum", "Cartpole", "TwoLinkArm", "ReachCost"]
