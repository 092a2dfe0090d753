"""The nonlinear loop: box-DDP (control-limited iLQR) over a batch, one sample at a time in effect.

One iteration, for the samples that have not converged yet:
  1. quadratize the cost and linearize the dynamics along the current trajectory (one call each);
  2. Riccati pass with the box QP in every step (``lqr.riccati``), with a per-sample
     Levenberg-Marquardt term that is zero unless a factorization or a line search failed;
  3. line search: the closed-loop rollouts for every step size of the ladder at once; each sample
     takes the largest step whose cost is strictly lower, or keeps its trajectory.
A sample has converged when its Newton step (or its accepted step) is below ``tol``, or when no
step lowers its cost and the predicted decrease is at the rounding floor. Converged samples are
not touched again; the current iterate of a sample is always its best one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffmpc.expand import TrajCost, TrajDynamics
from diffmpc.lqr import Gains, costate, riccati

__all__ = ["SolverOptions", "IterResult", "ilqr", "rollout"]


@dataclass
class SolverOptions:
    """Options of the forward solve.

    Attributes:
        max_iter: iterations at most (per sample).
        tol: convergence tolerance on the control step, relative to ``1 + max|u|``;
            None picks 1e-7 (float64) or 1e-4 (float32).
        line_search_steps: step sizes ``decay**0 .. decay**(steps-1)`` tried at once.
        line_search_decay: ratio between consecutive step sizes.
        reg_init, reg_factor, reg_max: Levenberg-Marquardt term on the control Hessian, used only
            after a failed factorization or line search; a sample whose term exceeds reg_max stops.
        second_order: add the dynamics' curvature (costate times the Hessian of f) to the
            Riccati pass, i.e. Newton steps on the controls (quadratic convergence), falling back
            to Gauss-Newton (iLQR) for a sample whose control Hessian is not positive definite.
        psd_floor: eigenvalue floor that makes non-convex cost Hessians positive definite in the
            forward solve (eigenvalues below it are raised to it).
    """

    max_iter: int = 50
    tol: float | None = None
    line_search_steps: int = 10
    line_search_decay: float = 0.5
    reg_init: float = 1e-6
    reg_factor: float = 10.0
    reg_max: float = 1e8
    psd_floor: float = 1e-8
    second_order: bool = True


@dataclass
class IterResult:
    """Per-sample output of ``ilqr``; every tensor has the batch first."""

    x: Tensor  # [B, T, n]
    u: Tensor  # [B, T, m]
    objective: Tensor  # [B]
    converged: Tensor  # [B] bool
    iterations: Tensor  # [B] long
    step_norm: Tensor  # [B] last step's inf-norm


def rollout(dyn: TrajDynamics, x_init: Tensor, u: Tensor) -> Tensor:
    """Open-loop states ``[B, T, n]`` from x_init ``[B, n]`` and controls ``[B, T, m]``."""
    xs = [x_init]
    for t in range(u.shape[1] - 1):
        xs.append(dyn.step(t, xs[-1], u[:, t]))
    return torch.stack(xs, 1)


def _closed_loop(dyn, x_init, x, u, gains: Gains, alphas, lower, upper):
    """Rollouts for every step size: ``[A, B, T, n]``, ``[A, B, T, m]``."""
    A = alphas.shape[0]
    xt = x_init.expand(A, *x_init.shape)
    xs, us = [], []
    for t in range(u.shape[1]):
        dx = (xt - x[:, t]).unsqueeze(-1)
        ut = u[:, t] + alphas[:, None, None] * gains.k[:, t] + (gains.K[:, t] @ dx).squeeze(-1)
        if lower is not None:
            ut = torch.maximum(torch.minimum(ut, upper[:, t]), lower[:, t])
        xs.append(xt)
        us.append(ut)
        if t < u.shape[1] - 1:
            xt = dyn.step(t, xt, ut)
    return torch.stack(xs, 2), torch.stack(us, 2)


def _pick(J0, Jc, floor, near):
    """Index of the largest step with lower cost per sample, and whether one exists.

    A step must lower the cost strictly, except where the predicted decrease is already at the
    rounding floor (``near``): there a full step that does not raise the cost beyond ``floor`` is
    taken, so that the last digits of the solution are not left to rounding noise.
    """
    better = Jc < J0.unsqueeze(0)  # [A, B]
    better[0] |= near & (Jc[0] <= J0 + floor)
    found = better.any(0)
    first = better.to(torch.int8).argmax(0)
    return first, found


def _gains(x, u, C, c, F, dyn, lo, hi, reg, second_order, create_graph) -> Gains:
    """Riccati pass with the Lagrangian's Hessian (Newton) where it is positive definite on the
    controls, and with the cost's Hessian alone (Gauss-Newton) elsewhere."""
    if not second_order or dyn.linear:
        return riccati(C, c, F, None, lo, hi, None, reg)
    n = x.shape[-1]
    lam = costate(c[..., :n], F[..., :n])
    curv = dyn.curvature(x[:, :-1], u[:, :-1], lam[:, 1:], create_graph)
    newton = riccati(torch.cat([C[:, :-1] + curv, C[:, -1:]], 1), c, F, None, lo, hi, None, reg)
    if bool(newton.ok.all()):
        return newton
    gn = riccati(C, c, F, None, lo, hi, None, reg)
    ok = newton.ok
    pick = lambda a, b: torch.where(ok.view(-1, *([1] * (a.dim() - 1))), a, b)  # noqa: E731
    return Gains(pick(newton.K, gn.K), pick(newton.k, gn.k), pick(newton.free, gn.free),
                 pick(newton.dV, gn.dV), ok | gn.ok)


def _iterate(x_init, cost, dyn, x, u, J, lower, upper, reg, opts, tol, create_graph, exact):
    """One box-DDP iteration on a sub-batch. Returns new x, u, J, reg, step, converged.

    ``exact``: the problem is an unconstrained LQR, so the full step is the solution.
    """
    B = x.shape[0]
    C, c = cost.quadratize(x, u, psd_floor=opts.psd_floor, create_graph=create_graph)
    F = dyn.jacobian(x[:, :-1], u[:, :-1], create_graph=create_graph)
    lo = None if lower is None else lower - u
    hi = None if upper is None else upper - u
    gains = _gains(x, u, C, c, F, dyn, lo, hi, reg, opts.second_order, create_graph)
    scale = 1.0 + u.detach().abs().flatten(1).amax(-1)
    newton = gains.k.detach().abs().flatten(1).amax(-1)
    expected = -(gains.dV[:, 0] + gains.dV[:, 1]).detach()
    n_alpha = 1 if exact else opts.line_search_steps
    alphas = opts.line_search_decay ** torch.arange(n_alpha, dtype=x.dtype, device=x.device)
    Xc, Uc = _closed_loop(dyn, x_init, x, u, gains, alphas, lower, upper)
    Jc = cost.value(Xc, Uc).sum(-1)  # [A, B]
    floor = 100 * torch.finfo(x.dtype).eps * (1.0 + J.detach().abs())
    first, found = _pick(J.detach(), Jc.detach(), floor, expected <= floor)
    found = found & gains.ok
    ar = torch.arange(B, device=x.device)
    keep = ~found
    x_new = torch.where(keep[:, None, None], x, Xc[first, ar])
    u_new = torch.where(keep[:, None, None], u, Uc[first, ar])
    J_new = torch.where(keep, J, Jc[first, ar])
    step = torch.where(found, (u_new - u).detach().abs().flatten(1).amax(-1), torch.zeros_like(scale))
    stationary = gains.ok & ((newton <= tol * scale) | (~found & (expected <= floor)))
    converged = stationary | (found & ((step <= tol * scale) | exact))
    reg = torch.where(found, reg / opts.reg_factor, torch.clamp(reg * opts.reg_factor,
                                                              min=opts.reg_init))
    reg = torch.where(reg < opts.reg_init, torch.zeros_like(reg), reg)
    return x_new, u_new, J_new, reg, step, converged


def ilqr(
    x_init: Tensor,
    cost: TrajCost,
    dyn: TrajDynamics,
    u_init: Tensor,
    lower: Tensor | None,
    upper: Tensor | None,
    opts: SolverOptions,
    create_graph: bool = False,
) -> IterResult:
    """Solve a batch of (box-constrained) optimal control problems.

    Args:
        x_init: ``[B, n]``.
        cost, dyn: trajectory views of the cost and the dynamics.
        u_init: ``[B, T, m]`` initial controls (projected onto the box).
        lower, upper: ``[B, T, m]`` bounds, or None for none.
        opts: SolverOptions.
        create_graph: keep the autograd graph through the iterations (unrolled gradients).

    Returns:
        IterResult.
    """
    B = x_init.shape[0]
    exact = dyn.linear and cost.quadratic and lower is None
    tol = opts.tol if opts.tol is not None else (1e-7 if x_init.dtype == torch.float64 else 1e-4)
    u = u_init if lower is None else torch.maximum(torch.minimum(u_init, upper), lower)
    x = rollout(dyn, x_init, u)
    J = cost.value(x, u).sum(-1)
    dev = x_init.device
    conv = torch.zeros(B, dtype=torch.bool, device=dev)
    iters = torch.zeros(B, dtype=torch.long, device=dev)
    step = torch.full((B,), float("inf"), dtype=x.dtype, device=dev)
    reg = torch.zeros(B, dtype=x.dtype, device=dev)
    for _ in range(opts.max_iter):
        act = (~conv & (reg <= opts.reg_max)).nonzero().squeeze(1)
        if act.numel() == 0:
            break
        whole = act.numel() == B
        sub = _take(None if whole else act)
        cs, ds = (cost, dyn) if whole else (cost.subset(act), dyn.subset(act))
        out = _iterate(sub(x_init), cs, ds, sub(x), sub(u), sub(J), sub(lower), sub(upper),
                       sub(reg), opts, tol, create_graph, exact)
        x, u, J, reg, step, conv = (_scatter(whole, act, a, b) for a, b in
                                     zip((x, u, J, reg, step, conv), out, strict=True))
        iters = iters.index_add(0, act, torch.ones_like(act))
    return IterResult(x=x, u=u, objective=J, converged=conv, iterations=iters, step_norm=step)


def _take(idx: Tensor | None):
    """A function selecting the samples ``idx`` of a tensor (or everything when idx is None)."""
    return lambda z: z if idx is None or z is None else z[idx]


def _scatter(whole: bool, act: Tensor, full: Tensor, part: Tensor) -> Tensor:
    return part if whole else full.index_put((act,), part)
