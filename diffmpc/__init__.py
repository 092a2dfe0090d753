"""diffmpc: a differentiable box-constrained MPC (iLQR) layer for PyTorch."""

from diffmpc.cost import GoalCost, PSDQuadCost, QuadCost
from diffmpc.dynamics import ContinuousDynamics, Discretize, LinearDynamics
from diffmpc.ilqr import SolverOptions
from diffmpc.mpc import MPC, BackwardMode, MPCSolution, Unconverged
from diffmpc.policy import MPCPolicy

__all__ = [
    "MPC",
    "MPCSolution",
    "MPCPolicy",
    "BackwardMode",
    "Unconverged",
    "SolverOptions",
    "QuadCost",
    "GoalCost",
    "PSDQuadCost",
    "LinearDynamics",
    "ContinuousDynamics",
    "Discretize",
]

__version__ = "0.1.0"
