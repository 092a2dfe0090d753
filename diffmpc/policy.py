"""MPCPolicy: observations -> actions through a receding-horizon MPC, warm-started.

``obs [B, obs_dim] -> obs_to_state -> x_init [B, n] -> MPC -> u_0 [B, m] -> ctrl_to_action``.
The model (an ``EnvModel``: dynamics, cost, bounds and the maps between env and MPC units) is
duck-typed here, so the core does not import the envs package.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from diffmpc.mpc import MPC

__all__ = ["MPCPolicy"]


class MPCPolicy(nn.Module):
    """Receding-horizon MPC as a policy module (differentiable in the model's parameters).

    Each call solves the MPC from the current observations and returns the first control as an
    action. The controls of the previous solution, shifted by one step (the last one repeated),
    warm-start the next solve; they are detached, so no graph is kept between calls. The warm
    start is dropped when the batch size changes and by ``reset()`` (call it at episode starts).

    Args:
        model: an ``EnvModel`` (``env.unwrapped.model()``): its ``dynamics`` and ``cost``
            modules become submodules (their parameters are this module's parameters).
        horizon: MPC horizon T (default ``model.horizon``).
        warm_start: whether to warm-start from the previous solution.
        **mpc_options: passed to ``diffmpc.MPC`` (``max_iter``, ``backward``, ...); the default
            ``unconverged="keep"`` (read ``last_converged`` instead of a warning per step).

    Example:
        >>> import gymnasium as gym, diffmpc.envs
        >>> env = gym.make("diffmpc/PendulumSwingup-v0")
        >>> policy = MPCPolicy(env.unwrapped.model(), max_iter=20)
        >>> obs, _ = env.reset(seed=0)
        >>> action = policy.act(obs)                     # numpy [1] in [-1, 1]
    """

    def __init__(self, model: Any, horizon: int | None = None, warm_start: bool = True,
                 **mpc_options: Any) -> None:
        super().__init__()
        for name in ("dynamics", "cost", "n_state", "n_ctrl", "horizon", "u_lower", "u_upper",
                     "obs_to_state", "ctrl_to_action"):
            if not hasattr(model, name):
                raise ValueError(f"MPCPolicy: model must be an EnvModel, got "
                                 f"{type(model).__name__} without attribute {name!r}")
        self.horizon = int(model.horizon if horizon is None else horizon)
        if self.horizon < 1:
            raise ValueError(f"MPCPolicy: horizon must be a positive int, got {horizon!r}")
        self.dynamics, self.cost = model.dynamics, model.cost
        self.n_state, self.n_ctrl = int(model.n_state), int(model.n_ctrl)
        self.register_buffer("u_lower", model.u_lower.detach().clone())
        self.register_buffer("u_upper", model.u_upper.detach().clone())
        self.obs_to_state, self.ctrl_to_action = model.obs_to_state, model.ctrl_to_action
        self.warm_start = bool(warm_start)
        self.mpc_options = {"unconverged": "keep", **mpc_options}
        self.mpc = self._make_mpc()  # validates the options now
        self._u_prev: Tensor | None = None
        self.last_converged: Tensor | None = None

    def _make_mpc(self) -> MPC:
        return MPC(self.n_state, self.n_ctrl, self.horizon, u_lower=self.u_lower,
                   u_upper=self.u_upper, **self.mpc_options)

    def reset(self) -> None:
        """Forget the warm start (call at the start of an episode)."""
        self._u_prev = None
        self.last_converged = None

    def forward(self, obs: Tensor) -> Tensor:
        """Actions ``[B, act_dim]`` (env units, e.g. [-1, 1]) for observations ``[B, obs_dim]``.

        Gradients flow from the actions into the parameters of the dynamics and the cost (and
        into ``obs`` when it requires grad).
        """
        if not isinstance(obs, Tensor) or obs.dim() != 2:
            got = tuple(obs.shape) if isinstance(obs, Tensor) else type(obs).__name__
            raise ValueError(f"MPCPolicy: obs must be a torch.Tensor of shape [B, obs_dim], "
                             f"got {got}")
        x = self.obs_to_state(obs.to(self.u_lower.dtype))
        if self.mpc.u_lower is not self.u_lower:  # the buffers were replaced by .to()/.double()
            self.mpc = self._make_mpc()
        sol = self.mpc(x, self.cost, self.dynamics, u_init=self._shifted(x.shape[0]))
        self._u_prev = sol.u.detach() if self.warm_start else None
        self.last_converged = sol.converged.detach()
        return self.ctrl_to_action(sol.u[:, 0])

    def _shifted(self, B: int) -> Tensor | None:
        """The previous controls ``[B, T, m]`` shifted one step ahead, or None."""
        u = self._u_prev
        if u is None or u.shape[0] != B or u.dtype != self.u_lower.dtype:
            return None
        return torch.cat([u[:, 1:], u[:, -1:]], 1)

    def act(self, obs: np.ndarray) -> np.ndarray:
        """Numpy convenience: ``obs [obs_dim]`` or ``[B, obs_dim]`` -> float32 actions, no grad."""
        o = torch.as_tensor(np.asarray(obs), dtype=self.u_lower.dtype, device=self.u_lower.device)
        single = o.dim() == 1
        with torch.no_grad():
            a = self(o.unsqueeze(0) if single else o)
        a = a.cpu().numpy().astype(np.float32)
        return a[0] if single else a

    def extra_repr(self) -> str:
        return f"horizon={self.horizon}, warm_start={self.warm_start}"
