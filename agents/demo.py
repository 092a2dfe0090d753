"""A short solver demo: random LQR and box-LQR batches and pendulum swing-up, as a table."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

import diffmpc as dm
from diffmpc.systems import Pendulum

__all__ = ["random_lqr", "demo_rows", "format_table"]


def random_lqr(B: int, T: int, n: int, m: int, seed: int = 0, dtype=torch.float64):
    """A random problem: stable time-varying dynamics, positive definite costs.

    Returns:
        x_init ``[B, n]``, QuadCost (C ``[B, T, p, p]``, c ``[B, T, p]``),
        LinearDynamics (F ``[B, T-1, n, p]``, f ``[B, T-1, n]``).
    """
    g = torch.Generator().manual_seed(seed)
    p = n + m
    A = torch.randn(B, T, p, p, generator=g, dtype=dtype)
    C = A @ A.mT / p + 0.1 * torch.eye(p, dtype=dtype)
    c = torch.randn(B, T, p, generator=g, dtype=dtype)
    Fx = torch.randn(B, T - 1, n, n, generator=g, dtype=dtype)
    Fx = 0.9 * Fx / torch.linalg.matrix_norm(Fx, ord=2).unsqueeze(-1).unsqueeze(-1)
    Fu = torch.randn(B, T - 1, n, m, generator=g, dtype=dtype) / math.sqrt(m)
    f = 0.1 * torch.randn(B, T - 1, n, generator=g, dtype=dtype)
    x_init = torch.randn(B, n, generator=g, dtype=dtype)
    return x_init, dm.QuadCost(C, c), dm.LinearDynamics(torch.cat([Fx, Fu], -1), f)


def _pendulum(B: int, T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    th = (2 * torch.rand(B, generator=g, dtype=torch.float64) - 1) * math.pi
    dth = torch.randn(B, generator=g, dtype=torch.float64)
    x_init = torch.stack([th.cos(), th.sin(), dth], -1)
    pend = Pendulum(dtype=torch.float64)
    return x_init, pend.default_cost(), pend


def _timed(fn: Callable[[], dm.MPCSolution]) -> tuple[dm.MPCSolution, float]:
    t0 = time.perf_counter()
    sol = fn()
    return sol, 1e3 * (time.perf_counter() - t0)


def demo_rows(B: int = 64, T: int = 20) -> list[dict]:
    """Solve three problem families and return one summary row each."""
    rows = []
    x0, cost, dyn = random_lqr(B, T, 10, 5)
    for name, kw in (("LQR n=10 m=5", {}), ("box-LQR, abs(u) <= 0.3", dict(u_lower=-0.3, u_upper=0.3))):
        sol, ms = _timed(lambda kw=kw: dm.MPC(10, 5, T, **kw)(x0, cost, dyn))
        rows.append(_row(name, B, T, sol, ms))
    x0, cost, pend = _pendulum(B, T)
    mpc = dm.MPC(3, 1, T, u_lower=pend.u_lower, u_upper=pend.u_upper)
    sol, ms = _timed(lambda: mpc(x0, cost, pend))
    rows.append(_row("pendulum swing-up", B, T, sol, ms))
    return rows


def _row(name: str, B: int, T: int, sol: dm.MPCSolution, ms: float) -> dict:
    return {
        "problem": name,
        "B": B,
        "T": T,
        "converged": f"{int(sol.converged.sum())}/{B}",
        "iterations (max)": int(sol.iterations.max()),
        "mean objective": f"{float(sol.objective.detach().mean()):.4f}",
        "forward ms": f"{ms:.1f}",
    }


def format_table(rows: list[dict]) -> str:
    """A markdown table of equal-keyed rows."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
