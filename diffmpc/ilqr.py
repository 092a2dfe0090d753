"""The nonlinear loop: box-DDP (control-limited iLQR) over a batch, one sample at a time in effect.

One iteration, for the samples that have not converged yet:
  1. quadratize the cost and linearize the dynamics along the current trajectory (one call each);
  2. Riccati pass with the box QP in every step (``lqr.riccati``): Gauss-Newton (the cost's
     Hessian, made positive definite) in the first ``gauss_newton_iters`` iterations and until
     a sample's model is trusted (``_newton_next``: a full step accepted, or a shortened one
     that achieved most of its predicted decrease), then Newton (plus the dynamics' curvature
     weighted by the costate) while it stays so; a per-sample
     Levenberg-Marquardt term stays zero unless a factorization or a line search failed;
  3. line search: the full step's closed-loop rollout, then, for the samples where it did not
     lower the cost, the rest of the step-size ladder at once, or in two rollouts where the
     samples' earlier steps suggest that the first few sizes will do for most (on small batches
     and on a GPU, the whole ladder in one rollout); each sample takes the largest step whose
     cost is lower, or keeps its trajectory. A sample whose Newton step found no lower cost
     takes Gauss-Newton steps: in the same iteration (a second Riccati pass and line search on
     the same expansion) where such samples are more than half of the batch, else from the next
     iteration.
A sample has converged when its Newton step (or an accepted full step: a shortened one is small
because its step size is) is below ``tol``, or when no step lowers its cost and the predicted
decrease is at the rounding floor. Converged samples are not touched again; the current iterate
of a sample is always its best one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from diffmpc import native
from diffmpc.expand import TrajCost, TrajDynamics, clip_eigenvalues, matvec
from diffmpc.lqr import (
    Gains,
    compiled_pass,
    costate,
    held_pass,
    homogeneous_cost,
    homogeneous_dynamics,
    multipliers,
    raw_scalar_pass,
    reusable_cost,
    riccati,
    rollout_affine,
    stores_batch_last,
)

__all__ = ["SolverOptions", "IterResult", "ilqr", "rollout"]


@dataclass
class SolverOptions:
    """Options of the forward solve.

    Attributes:
        max_iter: iterations at most (per sample).
        tol: convergence tolerance on the control step, relative to ``1 + max|u|``;
            None picks 1e-7 (float64) or 1e-4 (float32).
        line_search_steps: step sizes ``decay**0 .. decay**(steps-1)`` tried at once (16 with
            decay 0.5: down to about 3e-5; on the cartpole swing-up at T = 50 a ladder to 2e-3
            (10 steps) ended about 9 % higher in cost after 50 iterations, its tiny steps refused).
        line_search_decay: ratio between consecutive step sizes.
        gauss_newton_iters, gauss_newton_decay: from the default guess (no ``u_init``), the
            first ``gauss_newton_iters`` iterations of a nonlinear or non-quadratic problem take
            Gauss-Newton steps only (a warm start takes Newton steps at once), on a step-size
            ladder decaying by ``gauss_newton_decay`` (Newton steps, with ``second_order``, only
            after them). From a generic guess such as u = 0 these short convex-model steps keep
            a sample near the basin its guess leads into, where early Newton steps jump further
            and often into a worse local minimum: pendulum swing-up, B = 256, T = 50, seeds
            0-4, samples ending above mpc.pytorch's objective 13/12/13/13/9 with 0 here, 0/0/0/
            2/1 with the defaults, for about 38 % more iterations; mean objective 37.3-38.8
            with 0, 42.2-44.1 with the defaults (mpc.pytorch's 47.2-47.9). 0 gives the lower
            means and fewer iterations, and a warm start near a solution has no use for them.
        reg_init, reg_factor, reg_max: Levenberg-Marquardt term on the control Hessian, used only
            after a failed factorization or line search; a sample whose term exceeds reg_max stops.
        second_order: once a sample's step model is trusted (its last step was accepted in
            full, or achieved at least ``_NEWTON_RATIO`` of its predicted decrease), add the
            dynamics' curvature (costate times the Hessian of f) to its Riccati pass, i.e. Newton
            steps on the controls (quadratic convergence); a sample whose Newton model is not
            positive definite, or whose Newton step fails the line search or falls short of
            that ratio when shortened, goes back to Gauss-Newton.
        psd_floor: eigenvalue floor that makes non-convex cost Hessians positive definite in the
            Gauss-Newton steps of the forward solve (eigenvalues below it are raised to it);
            Newton steps use the exact Hessian with the control blocks floored instead.
        time_parallel: compute the Riccati passes of linear-quadratic solves (unconstrained, the
            active-set passes, the implicit backward), their rollouts and the costates as scans
            over time (``diffmpc.parallel``): about ``log2 T`` levels of batched operations
            instead of T sequential steps, for about log2 T times the arithmetic and a few
            ``[T, B, n, 3n+2]`` tensors per level of memory. None: on CUDA tensors, where
            each operation costs a kernel launch, up to very large batches; on the CPU for one
            sample over 20 steps or more, and only where the sequential passes do not run
            compiled (``auto_time_parallel``). The box-DDP steps stay sequential.
    """

    max_iter: int = 50
    tol: float | None = None
    line_search_steps: int = 16
    line_search_decay: float = 0.5
    gauss_newton_iters: int = 8
    gauss_newton_decay: float = 0.2
    reg_init: float = 1e-4
    reg_factor: float = 10.0
    reg_max: float = 1e8
    psd_floor: float = 1e-8
    second_order: bool = True
    time_parallel: bool | None = None

    def parallel_for(self, x_init: Tensor, horizon: int) -> bool:
        """``time_parallel`` resolved for a batch ``x_init [B, n]`` over ``horizon`` steps."""
        if self.time_parallel is not None:
            return self.time_parallel
        compiled = (x_init.device.type == "cpu" and native.available()
                    and x_init.dtype in (torch.float32, torch.float64))
        return auto_time_parallel(x_init.is_cuda, x_init.shape[0], horizon, x_init.shape[-1],
                                  compiled)


# B T n^3 up to which scans over time beat the sequential recursions on a GPU: measured on an H200
# (n = 10, T = 50, float64): 2.6x faster at B = 256, 1.5x at B = 1024, 2.2x slower at B = 4096,
# where the scans' extra arithmetic (GPU busy 108 ms against 18 ms) outweighs the launches saved
_PARALLEL_WORK = 1e8


def auto_time_parallel(cuda: bool, B: int, T: int, n: int, compiled: bool = False) -> bool:
    """``time_parallel=None``'s choice. On CUDA tensors: the scans over time, unless the batch is
    so large (``B T n^3`` above ``_PARALLEL_WORK``) that their extra arithmetic costs more than
    the kernel launches they save. On the CPU, where the sequential passes run ``compiled``
    (``diffmpc.native``): never (B = 1, n = 10, T = 50, fwd+bwd: LQR 1.7 ms against 4.9 with
    scans, box-LQR 4.1 against 18.1). Without the kernels: only for one sample (B = 1) over T >=
    20 steps with n <= 16 states, where each operation's dispatch dominates (measured at n = 10:
    LQR fwd+bwd 5-25 % faster at T = 20-100, box-LQR 15-30 %; 10 % slower at T = 10, even at
    B = 2, and 5x slower at B = 32)."""
    if cuda:
        return B * T * n ** 3 <= _PARALLEL_WORK
    return not compiled and B == 1 and T >= 20 and n <= 16


@dataclass
class IterResult:
    """Per-sample output of ``ilqr``; every tensor has the batch first."""

    x: Tensor  # [B, T, n]
    u: Tensor  # [B, T, m]
    objective: Tensor | None  # [B]; None where the caller forms it itself (``ilqr``)
    converged: Tensor  # [B] bool
    iterations: Tensor  # [B] long
    step_norm: Tensor  # [B] last step's inf-norm
    gains: Gains | None = None  # an LQ solve's factorization at its final free set, if any


def rollout(dyn: TrajDynamics, x_init: Tensor, u: Tensor) -> Tensor:
    """Open-loop states ``[B, T, n]`` from x_init ``[B, n]`` and controls ``[B, T, m]``."""
    model = dyn.native_model(u, x_init)
    if model is not None:
        return native.model_rollout(*model, x_init, u)[0][0]
    xs = [x_init]
    step = dyn.stepper()
    for t in range(u.shape[1] - 1):
        xs.append(step(t, xs[-1], u[:, t]))
    return torch.stack(xs, 1)


def _closed_loop(dyn, x_init, x, u, gains: Gains, alphas, lower, upper):
    """Rollouts for every step size: ``[A, B, T, n]``, ``[A, B, T, m]``.

    ``u_t = u_t^0 + alpha k_t + K_t (x_t - x_t^0)``, clamped to the box. The A step sizes run as
    one batch of ``A * B`` rows, and what does not depend on the new states is formed for all
    steps at once: each step costs a few operations besides the model's (at small batches every
    operation costs its dispatch, and this loop runs T steps per line search).
    """
    A = alphas.shape[0]
    B, T, m = u.shape
    n = x.shape[-1]
    # u_t^0 + alpha k_t - K_t x_t^0 [A, B, m]: the feedback then needs only K_t x_t per step
    base = u - (gains.K * x.unsqueeze(2)).sum(-1)
    offs = (base + alphas[:, None, None, None] * gains.k).unbind(2)
    Ks = gains.K.unbind(1)
    los = his = None
    if lower is not None:
        los, his = lower.unbind(1), upper.unbind(1)
    xt = x_init if A == 1 else x_init.repeat(A, 1)  # [A * B, n]
    xs, us = [], []
    step = dyn.stepper()
    for t in range(T):
        ut = (Ks[t] * xt.view(A, B, 1, n)).sum(-1) + offs[t]
        if los is not None:
            ut = torch.clamp(ut, los[t], his[t])
        xs.append(xt)
        us.append(ut)
        if t < T - 1:
            xt = step(t, xt, ut.view(A * B, m), A)
    return torch.stack(xs, 1).view(A, B, T, n), torch.stack(us, 2)


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


def _compiled_search(x_init, cost, dyn, x, u, J, gains, lower, upper) -> tuple | None:
    """The built-in model's compiled step ``(model, constants)`` where the line search can run
    on it (``native.model_search``: a quadratic cost, CPU tensors, no grad recorded), else
    None."""
    if not cost.quadratic:
        return None
    return dyn.native_model(x, x_init, u, J, gains.K, gains.k, lower, upper, cost.C, cost.c)


def _search(x_init, cost, dyn, x, u, J, gains, lower, upper, alphas, floor, near):
    """Closed-loop rollouts for the step sizes ``alphas`` [A]; per sample the largest accepted.

    Returns x ``[B, T, n]``, u ``[B, T, m]``, cost ``[B]`` of that step, its index, and whether
    one was accepted.
    """
    model = _compiled_search(x_init, cost, dyn, x, u, J, gains, lower, upper)
    if model is not None:
        # a built-in model's compiled step: each sample tries the step sizes in turn and stops
        # at the first it takes, costs included, in one call (B = 256, T = 50, the line search
        # of one solve: pendulum 256 -> 47 ms, cartpole 685 -> 110-144 ms; half the rows of
        # rolling out the sizes at once, and none of the operations' dispatch)
        return native.model_search(*model, x_init, u, x, gains.K, gains.k, alphas, lower, upper,
                                   cost.C, cost.c, J, floor, near, cost.rest_minima())
    model = None if cost.quadratic else dyn.native_model(x, x_init, u, gains.K, gains.k, lower,
                                                         upper)
    if model is not None:  # another cost module: the rollouts compiled, the costs its own
        Xc, Uc, _ = native.model_rollout(*model, x_init, u, x, gains.K, gains.k, alphas, lower,
                                         upper)
    else:
        Xc, Uc = _closed_loop(dyn, x_init, x, u, gains, alphas, lower, upper)
    Jc = cost.value(Xc, Uc).sum(-1)  # [A, B]
    first, found = _pick(J.detach(), Jc.detach(), floor, near)
    ar = torch.arange(x.shape[0], device=x.device)
    return Xc[first, ar], Uc[first, ar], Jc[first, ar], first, found


# line searches of at most this many rollouts try every step size at once (on the CPU a rollout
# of more rows costs more; on a GPU it costs the same kernel launches: any batch there)
_LADDER_ROWS = 256
_LADDER_ROWS_CUDA = 2**16
# what one more rollout of the line search costs besides its rows, counted in rows: on this
# project's CPU a rollout takes about 1.5 ms plus 3.1 us per row (pendulum, T = 50), 2.6 ms plus
# 3.3 us (cartpole)
_STAGE_ROWS = 512


def _ladder_split(hints: Tensor, n_alpha: int) -> int:
    """Where the step sizes after the full one split into two rollouts, for the R samples whose
    full step failed: ``end``, the first rollout trying indices ``1 .. end-1`` and the second
    the rest for the samples that refused those; ``n_alpha``: one rollout.

    ``hints [R]``: each sample's step-size index when it last took a shortened step (0 if it
    has not). The hints stand for where the samples will accept now, and ``end`` minimizes the
    rows rolled out, a second rollout counting ``_STAGE_ROWS`` more. Which step each sample
    takes does not depend on the split: each takes the largest accepted either way.
    """
    R = hints.shape[0]
    counts = torch.bincount(hints.clamp(max=n_alpha - 1), minlength=n_alpha).tolist()
    best, end = (n_alpha - 1) * R, n_alpha
    past = R - counts[0] - counts[1]  # hints at index 2 and above
    for e in range(2, n_alpha):
        rows = (e - 1) * R + past * (n_alpha - e) + _STAGE_ROWS
        if rows < best:
            best, end = rows, e
        past -= counts[e]
    return end


def _take_gains(g: Gains, idx: Tensor) -> Gains:
    return Gains(g.K[idx], g.k[idx], g.free[idx], g.dV[idx], g.ok[idx])


def _gauss_newton(C, c, F, lo, hi, reg, fh: bool = False) -> Gains:
    """The Gauss-Newton pass of an iteration (box mode, ``reg``): for one control on the CPU
    compiled on C, c and F themselves (``raw_scalar_pass``: no homogeneous copies), else
    ``riccati``. The compiled pass's gains carry no Fh; ``fh``: the caller needs it (a
    linear-quadratic model's KKT check reads the costate from it), so ``riccati``."""
    g = None if fh else raw_scalar_pass(C, c, F, lo, hi, reg)
    return g if g is not None else riccati(C, c, F, None, lo, hi, None, reg)


def _gains(x, u, H, C, c, F, dyn, lo, hi, reg, newton, create_graph, pre=None
           ) -> tuple[Gains, Tensor]:
    """Riccati pass: Newton for the samples flagged in ``newton``, Gauss-Newton for the others and
    where the Newton pass fails.

    Newton uses the Lagrangian's Hessian: the cost's exact Hessian ``H`` plus the dynamics'
    curvature (costate times the Hessian of f), with each control block's eigenvalues floored at
    the smallest control-cost curvature. Gauss-Newton uses ``C``, the cost's Hessian with its
    eigenvalues raised to ``psd_floor`` (the same as H for a convex cost).

    ``pre``: the costate and curvature blocks (``TrajDynamics.newton_expansion``), or None.

    Returns the gains and the flags of the samples that did take a Newton step.
    """
    if (dyn.linear and H is C) or not bool(newton.any()):
        return _gauss_newton(C, c, F, lo, hi, reg, fh=dyn.linear), torch.zeros_like(newton)
    n = x.shape[-1]
    if pre is not None:
        lam, blocks = pre
    else:
        lam = costate(c[..., :n], F[..., :n].transpose(0, 1))  # a view: the kernel reads it
        blocks = None
    floor = C[..., n:, n:].diagonal(dim1=-2, dim2=-1).flatten(1).amin(-1)
    nw = newton[:, None, None, None]
    full = None
    soa = stores_batch_last(C, n, small=True)
    if blocks is None and not create_graph and (soa or H is C):
        blocks = dyn.curvature_blocks(x, u, lam)
    if blocks is not None and H is C:
        # the compiled one-control pass adds the blocks to C itself, for the Newton samples
        full = raw_scalar_pass(C, c, F, lo, hi, reg, floor, blocks,
                               None if bool(newton.all()) else newton)
    if full is None and blocks is not None and soa:
        # the pass's batch-last storage of the costs, with the curvature blocks added in place
        # (cartpole B = 256, T = 50: 2.5 ms instead of 6.1 for the Lagrangian's [B, T, p, p]
        # Hessians, the choice per sample, and their batch-last copy)
        Hb, first = blocks
        Ch = homogeneous_cost(H if H is C else torch.where(nw, H, C), c, batch_last=True)
        a = 1 + first
        Ch[:-1, a:, a:].add_(Hb if bool(newton.all()) else torch.where(newton, Hb, 0.0))
        full = riccati(C, c, F, None, lo, hi, None, reg, floor, Ch=Ch, batch_last=True)
    elif full is None:
        Hn = torch.where(nw, dyn.lagrangian_hessian(H, x, u, lam, create_graph), C)
        full = riccati(Hn, c, F, None, lo, hi, None, reg, floor)
    if bool(full.ok.all()):
        return full, newton
    gn = _gauss_newton(C, c, F, lo, hi, reg)
    ok = full.ok
    pick = lambda a, b: torch.where(ok.view(-1, *([1] * (a.dim() - 1))), a, b)  # noqa: E731
    gains = Gains(pick(full.K, gn.K), pick(full.k, gn.k), pick(full.free, gn.free),
                  pick(full.dV, gn.dV), ok | gn.ok)
    return gains, newton & ok


@dataclass
class _State:
    """Per-sample iterate: trajectory, cost, regularization, last step, flags."""

    x: Tensor  # [B, T, n]
    u: Tensor  # [B, T, m]
    J: Tensor  # [B]
    reg: Tensor  # [B] Levenberg-Marquardt term
    step: Tensor  # [B] inf-norm of the last accepted step
    conv: Tensor  # [B] converged
    newton: Tensor  # [B] use the Lagrangian's Hessian in the next iteration
    fresh: Tensor  # [B] first iteration, from a guess whose stationarity must be probed
    ladder: Tensor  # [B] long: the step-size index of the last shortened step taken (0: none yet)

    def take(self, idx: Tensor) -> _State:
        return _State(*(getattr(self, f.name)[idx] for f in fields(self)))

    def put(self, idx: Tensor, part: _State) -> _State:
        return _State(*(getattr(self, f.name).index_put((idx,), getattr(part, f.name))
                        for f in fields(self)))


def _iterate(x_init, cost, dyn, s: _State, lower, upper, opts, tol, create_graph, exact,
             parallel, early=False) -> _State:
    """One box-DDP iteration on a sub-batch.

    ``exact``: the problem is an unconstrained LQR, so the full step is the solution.
    ``parallel``: the solve's ``time_parallel`` choice (for the KKT check's costate).
    ``early``: one of the first ``gauss_newton_iters`` iterations (Gauss-Newton steps only, on
    the ``gauss_newton_decay`` ladder).
    """
    x, u, J, reg = s.x, s.u, s.J, s.reg
    H, c = cost.quadratize(x, u, create_graph=create_graph)
    C = H if cost.quadratic else clip_eigenvalues(H, opts.psd_floor)
    newton = torch.zeros_like(s.newton) if early else s.newton
    # a Newton pass needs the Jacobians, the costate and the curvature: one compiled pass where
    # the model has one
    pre = None
    if not create_graph and bool(newton.any()):
        pre = dyn.newton_expansion(x, u, c[..., :x.shape[-1]])
    F = pre[0] if pre is not None else dyn.jacobian(x[:, :-1], u[:, :-1],
                                                    create_graph=create_graph)
    lo = None if lower is None else lower - u
    hi = None if upper is None else upper - u
    gains, used_newton = _gains(x, u, H, C, c, F, dyn, lo, hi, reg, newton, create_graph,
                                None if pre is None else pre[1:])
    scale = 1.0 + u.detach().abs().flatten(1).amax(-1)
    newton_step = gains.k.detach().abs().flatten(1).amax(-1)
    expected = -(gains.dV[:, 0] + gains.dV[:, 1]).detach()
    n_alpha = 1 if exact else opts.line_search_steps
    decay = opts.gauss_newton_decay if early else opts.line_search_decay
    alphas = decay ** torch.arange(n_alpha, dtype=x.dtype, device=x.device)
    floor = 100 * torch.finfo(x.dtype).eps * (1.0 + J.detach().abs())
    small_step = newton_step <= tol * scale  # the model's minimizer is here already
    at_floor = expected <= floor  # the predicted decrease is at the rounding floor
    # the full step first and the rest of the ladder for the samples where it failed; on small
    # batches, where a rollout costs its operations' dispatch whatever its rows, all at once
    at_once = n_alpha * x.shape[0] <= (_LADDER_ROWS_CUDA if x.is_cuda else _LADDER_ROWS)
    # (a compiled search rolls out no step size past the one a sample takes: always at once)
    at_once = at_once or _compiled_search(x_init, cost, dyn, x, u, J, gains, lower,
                                          upper) is not None
    Xa, Ua, Ja, first, found = _search(x_init, cost, dyn, x, u, J, gains, lower, upper,
                                       alphas if at_once else alphas[:1], floor, at_floor)
    retry = (~found & gains.ok).nonzero().squeeze(1)
    start = 1
    while n_alpha > start and not at_once and retry.numel() > 0:
        # the next step sizes for the samples that refused the larger ones: the rest of the
        # ladder, or, where that is many rows, the first few of them if these samples' last
        # shortened steps suggest most will take one (pendulum B = 256, T = 50: 8-11 % faster)
        end = n_alpha
        if start == 1 and retry.numel() * (n_alpha - start) > _LADDER_ROWS:
            end = _ladder_split(s.ladder[retry], n_alpha)
        sub = _take(retry)
        part = _search(sub(x_init), cost.subset(retry), dyn.subset(retry), sub(x), sub(u), sub(J),
                       _take_gains(gains, retry), sub(lower), sub(upper), alphas[start:end],
                       sub(floor), torch.zeros_like(retry, dtype=torch.bool))
        Xa, Ua, Ja = (a.index_put((retry,), b) for a, b in zip((Xa, Ua, Ja), part[:3], strict=True))
        first = first.index_put((retry,), part[3] + start)
        found = found.index_put((retry,), part[4])
        retry = retry[~part[4]]
        start = end
    found = found & gains.ok
    dV_acc = gains.dV.detach()  # the predicted change of each sample's accepted step
    fb = (used_newton & ~found & ~small_step & ~at_floor).nonzero().squeeze(1)
    if n_alpha > 1 and 2 * fb.numel() > x.shape[0]:
        # failed Newton steps in most of the batch (at B = 1: a failed one): take the Gauss-Newton
        # steps in this iteration (the expansion is the same) rather than spend the next
        # iteration's expansion on them. Where they are a few of many, the next iteration runs
        # for the others anyway, and this pass and rollout for a few samples cost more than
        # those samples' wait (they take Gauss-Newton then; cartpole B = 256, T = 50: about 5
        # samples per iteration, and 15 % of the solve's time)
        sub = _take(fb)
        gn = _gauss_newton(sub(C), sub(c), sub(F), sub(lo), sub(hi), sub(reg))
        exp_gn = -(gn.dV[:, 0] + gn.dV[:, 1])
        part = _search(sub(x_init), cost.subset(fb), dyn.subset(fb), sub(x), sub(u), sub(J), gn,
                       sub(lower), sub(upper), alphas, sub(floor), exp_gn <= sub(floor))
        Xa, Ua, Ja = (a.index_put((fb,), b) for a, b in zip((Xa, Ua, Ja), part[:3], strict=True))
        first = first.index_put((fb,), part[3])
        dV_acc = dV_acc.index_put((fb,), gn.dV.detach())
        found = found.index_put((fb,), part[4] & gn.ok)
        used_newton = used_newton.index_put((fb,), torch.zeros_like(fb, dtype=torch.bool))
    keep = ~found
    x_new = torch.where(keep[:, None, None], x, Xa)
    u_new = torch.where(keep[:, None, None], u, Ua)
    J_new = torch.where(keep, J, Ja)
    step = torch.where(found, (u_new - u).detach().abs().flatten(1).amax(-1), torch.zeros_like(scale))
    stationary = gains.ok & (small_step | (~found & at_floor))
    # (by step size only a full step: a shortened one says nothing of the distance to a solution)
    conv = stationary | (found & (((step <= tol * scale) & (first == 0)) | exact))
    if dyn.linear and cost.quadratic and lower is not None:
        # a full step of an exact (linear-quadratic) model lands on the solution once it has the
        # right active set: the KKT conditions there decide, without another iteration
        cand = (found & ~conv & (first == 0)).nonzero().squeeze(1)
        if cand.numel() > 0:
            Fh = None if gains.Fh is None else gains.Fh.index_select(1, cand)
            ok = _kkt_satisfied(cost.subset(cand), Fh, x_new[cand], u_new[cand], lower[cand],
                                upper[cand], parallel)
            conv = conv.index_put((cand,), ok)
    if opts.second_order and not (dyn.linear and cost.quadratic):
        # a stationary initial iterate can be a saddle or a maximum (a pendulum hanging at rest
        # with u = 0: by symmetry no first-order step leaves it); probe it once
        probe = (stationary & s.fresh & (step <= tol * scale)).nonzero().squeeze(1)
        if probe.numel() > 0:
            x_new, u_new, J_new, left = _leave_saddle(x_init[probe], cost.subset(probe),
                                                      dyn.subset(probe), x_new, u_new, J_new,
                                                      probe, _take(probe)(lower),
                                                      _take(probe)(upper), scale[probe])
            conv = conv.index_put((probe,), conv[probe] & ~left)
    # a failed Newton step falls back to Gauss-Newton before the regularization grows
    failed_newton = used_newton & ~found
    grow = ~found & ~failed_newton
    reg = torch.where(grow, torch.clamp(reg * opts.reg_factor, min=opts.reg_init),
                      torch.where(found, reg / opts.reg_factor, reg))
    reg = torch.where(reg < opts.reg_init, torch.zeros_like(reg), reg)
    al = decay ** first.to(x.dtype)
    predicted = -(al * dV_acc[:, 0] + al * al * dV_acc[:, 1])
    # (after the early iterations, Newton once a step on the usual ladder is trusted)
    newton = (opts.second_order and not early) & _newton_next(found, first, (J - J_new).detach(),
                                                               predicted)
    ladder = torch.where(found & (first > 0), first, s.ladder)
    return _State(x_new, u_new, J_new, reg, step, conv, newton, torch.zeros_like(conv), ladder)


# a shortened step that achieved at least this fraction of its model's predicted decrease
# makes the model trusted (as a trust-region method would grow its radius). Measured at T = 50,
# B = 32 and 256, three seeds each: against "full steps only", 6-19 % fewer mean iterations for
# the pendulum and lower mean objectives in all 12 cases (0.5: about the same; 0.9: fewer gains)
_NEWTON_RATIO = 0.75


def _newton_next(found: Tensor, first: Tensor, decrease: Tensor, predicted: Tensor) -> Tensor:
    """``[B]`` bool: Newton steps in the next iteration. Where a step was accepted: in full
    (``first == 0``: the step-size ladder's index), or shortened with ``decrease >=
    _NEWTON_RATIO * predicted`` (the actual and the model's predicted decrease of that step)."""
    trusted = (first == 0) | ((predicted > 0) & (decrease >= _NEWTON_RATIO * predicted))
    return found & trusted


def _leave_saddle(x_init, cost, dyn, x, u, J, idx, lower, upper, scale):
    """Second-order check of stationary points ``idx`` of the batch (x ``[B, T, n]``, u, J):
    where the exact Newton model (the Lagrangian's Hessian, no floor, no regularization) is not
    positive definite on the free controls, the point is no local minimum; those samples move to
    ``u +- 1e-3 (1 + max|u|)`` (the lower cost of the two, if lower than J).

    Returns x, u, J (updated) and ``[len(idx)]`` bool: the samples that moved.
    """
    n = x.shape[-1]
    xs, us = x[idx], u[idx]
    H, c = cost.quadratize(xs, us)
    F = dyn.jacobian(xs[:, :-1], us[:, :-1])
    lam = costate(c[..., :n], F[..., :n].transpose(0, 1))  # a view: the kernel reads it
    Hn = dyn.lagrangian_hessian(H, xs, us, lam)
    lo = None if lower is None else lower - us
    hi = None if upper is None else upper - us
    saddle = ~riccati(Hn, c, F, None, lo, hi, expected=False).ok
    left = torch.zeros_like(saddle)
    if not bool(saddle.any()):
        return x, u, J, left
    k = saddle.nonzero().squeeze(1)
    sub = _take(k)
    best_J, best_x, best_u = J[idx][k], xs[k], us[k]
    for sign in (1.0, -1.0):
        up = us[k] + sign * 1e-3 * scale[k, None, None]
        if lower is not None:
            up = torch.clamp(up, sub(lower), sub(upper))
        xp = rollout(dyn.subset(k), sub(x_init), up)
        Jp = cost.subset(k).value(xp, up).sum(-1)
        better = Jp < best_J
        best_J = torch.where(better, Jp, best_J)
        best_x = torch.where(better[:, None, None], xp, best_x)
        best_u = torch.where(better[:, None, None], up, best_u)
    moved = best_J < J[idx][k]
    rows = idx[k]
    x = x.index_put((rows,), torch.where(moved[:, None, None], best_x, xs[k]))
    u = u.index_put((rows,), torch.where(moved[:, None, None], best_u, us[k]))
    J = J.index_put((rows,), torch.where(moved, best_J, J[rows]))
    return x, u, J, left.index_put((k,), moved)


def _grad_u(cost: TrajCost, Fh: Tensor | None, x: Tensor, u: Tensor,
            parallel: bool = False, V: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Gradient of the Lagrangian in u of a linear-quadratic problem at (x, u), where x follows
    the dynamics: ``C tau + c + F_u' lam`` with the costate ``lam``. ``Fh``: the homogeneous
    time-major dynamics of ``riccati``; ``parallel``: the costate by a scan (``costate``);
    ``V``: a time-parallel pass's value functions (``Gains.V``) when (x, u) is that pass's
    solution, whose costate is their gradient ``J_t x_t + r_t`` (no recursion).
    Returns ``gu [B, T, m]`` and the cost gradient ``g [B, T, p]``."""
    n = x.shape[-1]
    g = cost.quadratize(x, u)[1]  # [B, T, p]
    gu = g[..., n:]
    if Fh is not None:
        if V is not None:
            xt = x[:, 1:].transpose(0, 1).unsqueeze(-1)  # [T-1, B, n, 1]
            lam = torch.baddbmm(V[1:, ..., n:].flatten(0, 1), V[1:, ..., :n].flatten(0, 1),
                                xt.flatten(0, 1)).unflatten(0, xt.shape[:2]).mT  # [T-1, B, 1, n]
        else:
            lam = costate(g[..., :n], Fh[:, :, 1:, 1:n + 1], parallel)[:, 1:]
            Fu = Fh[:, :, 1:, n + 1:].transpose(0, 1)  # [B, T-1, n, m], a view
            if native.blocks(Fu, lam):
                Fu_lam = native.matvec(Fu, lam, trans=True)
                return gu + torch.cat([Fu_lam, torch.zeros_like(gu[:, :1])], 1), g
            lam = lam.transpose(0, 1).unsqueeze(-2)
        # time-major, as Fh is stored (an einsum here copied F_u into its batch-first order)
        Fu_lam = (lam @ Fh[:, :, 1:, n + 1:]).squeeze(-2)
        gu = gu + torch.cat([Fu_lam.transpose(0, 1), torch.zeros_like(gu[:, :1])], 1)
    return gu, g


def _dual_tol(g: Tensor, power: float = 0.5) -> Tensor:
    """``[B]`` tolerance on the Lagrangian's gradient: ``eps ** power`` relative to the largest
    cost gradient ``g [B, T, p]``."""
    return torch.finfo(g.dtype).eps ** power * (1.0 + g.abs().flatten(1).amax(-1))


def _kkt_satisfied(cost: TrajCost, Fh: Tensor | None, x: Tensor, u: Tensor, lower: Tensor,
                   upper: Tensor, parallel: bool = False) -> Tensor:
    """``[B]``: (x, u) satisfies the KKT conditions of a box-constrained linear-quadratic problem
    up to rounding (``_dual_tol``).

    The gradient of the Lagrangian in u (``_grad_u``) must vanish on the free controls and point
    outward at the bounds: ``>= 0`` at the lower bound, ``<= 0`` at the upper one.
    """
    gu, g = _grad_u(cost, Fh, x, u, parallel)
    at_lo, at_hi = u <= lower, u >= upper
    viol = torch.where(at_lo & at_hi, 0.0, torch.where(
        at_lo, (-gu).clamp_min(0), torch.where(at_hi, gu.clamp_min(0), gu.abs())))
    return viol.flatten(1).amax(-1) <= _dual_tol(g)


def _active_set_lq(x_init: Tensor, cost: TrajCost, dyn: TrajDynamics, u0: Tensor, lower: Tensor,
                   upper: Tensor, max_iter: int, parallel: bool = False
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Gains | None]:
    """A box-constrained linear-quadratic problem by a primal-dual active-set method.

    Each iteration holds the controls of the current active set at their bounds and solves the
    remaining equality-constrained LQR exactly (one Riccati pass in fixed-set mode and one
    rollout); the Lagrangian's gradient in u (``_grad_u``) then gives the bounds' multipliers.
    The next active set: a held control stays held while its multiplier has the right sign
    (within ``eps ** 0.75`` relative, well below the ``sqrt(eps)`` of ``_kkt_satisfied``, so
    that a control near a bound is not held there by a small wrong-signed multiplier) and is
    released otherwise; a free control that left the box is held at the bound it crossed. A
    sample whose active set repeats satisfies the KKT conditions: its free controls lie in the
    box and its multipliers have the right signs. Controls with equal bounds are always held.
    Samples still changing after ``max_iter`` passes (each counts as an iteration) are left to
    box-DDP.

    Where the pass runs compiled (``lqr.compiled_pass``), it holds the controls at their values
    itself (``lqr.held_pass``: no linear terms and offsets rewritten per pass) and the control
    rows of its Q give the multipliers (``lqr.multipliers``: no costate pass); the tolerance's
    scale is then the cost gradient at the first pass's solution.

    Args:
        u0: ``[B, T, m]`` initial controls in the box; the first active set is the controls at a
            bound.
        parallel: the passes as scans over time (``riccati``'s ``parallel``).

    Returns:
        x ``[B, T, n]``, u ``[B, T, m]`` (the last iterate, clamped to the box), converged ``[B]``,
        the passes run ``[B]``, the inf-norm of each sample's last change of u ``[B]``, and, if
        every sample converged, the gains of each sample's last pass (its final free set; the
        implicit backward reuses their factorization), else None.
    """
    B, T, m = u0.shape
    n = x_init.shape[-1]
    pinned = lower == upper
    held_lo, held_hi = (u0 <= lower) | pinned, (u0 >= upper) & (u0 > lower)
    x = u0.new_zeros(B, T, n)
    u = u0.clone()
    conv = torch.zeros(B, dtype=torch.bool, device=u0.device)
    iters = torch.zeros(B, dtype=torch.long, device=u0.device)
    step = u0.new_zeros(B)
    act = torch.arange(B, device=u0.device)
    K = L = free_all = None  # set by the first pass, which always covers the whole batch
    # the whole batch's homogeneous cost (unless it would be much larger than C: a broadcast C)
    # and dynamics: built once, the linear terms and offsets rewritten for each pass (no reader
    # of an earlier pass's Fh uses its offsets)
    Ch = Fh = None
    # compiled: each pass holds the controls at their values itself (no rewritten linear terms)
    # and returns the control rows of its Q, whose product with the solution gives the
    # multipliers (no costate pass); the tolerance's scale is the first pass's cost gradient
    compiled = compiled_pass(cost.C, cost.c, n, parallel)
    tol_all = None
    if compiled and T > 1:
        Fh = homogeneous_dynamics(dyn.F, dyn.f)
    keep_ch = reusable_cost(cost.C) and not compiled
    # stored as riccati stores them: batch-last for one control on a CPU batch (no copy per
    # pass); rewritten through their time-major views
    bl = keep_ch and stores_batch_last(cost.C, n, parallel, True)
    tm = (lambda z: z.permute(0, 3, 1, 2)) if bl else (lambda z: z)  # noqa: E731
    for _ in range(max_iter):
        # a pass covers the whole batch while more than half of it is active: the finished
        # samples' share of the pass (it reproduces their result) costs less than copying C and F
        # for the others
        whole = 2 * act.numel() > B
        sub = (lambda z: z) if whole else _take(act)
        c_sub = cost if whole else cost.subset(act)
        lo, hi, h_lo, h_hi = sub(lower), sub(upper), sub(held_lo), sub(held_hi)
        free = ~(h_lo | h_hi)
        val = torch.where(h_lo, lo, torch.where(h_hi, hi, torch.zeros_like(lo)))
        if compiled:
            # (index_select: advanced indexing on the batch dimension took 4x as long)
            Fs = Fh if whole or Fh is None else Fh.index_select(1, act)
            gains, Qu = held_pass(c_sub.C, c_sub.c, Fs, free, val)
            xs, us = rollout_affine(gains, sub(x_init))
            gu = multipliers(Qu, xs, us)
            if tol_all is None:  # the first pass covers the whole batch
                tol_all = _dual_tol(cost.quadratize(xs, us)[1], 0.75)
            tol = sub(tol_all)[:, None, None]
        else:
            # tau = tau' + [0; val]: the held controls move into the linear terms and offsets
            d_sub = dyn if whole else dyn.subset(act)
            c_eff = c_sub.c + matvec(c_sub.C[..., n:], val)
            d_eff = d_sub.f + matvec(d_sub.F[..., n:], val[:, :-1])
            if whole:
                if Ch is None and keep_ch:
                    Ch = homogeneous_cost(cost.C, c_eff, batch_last=bl)
                elif Ch is not None:
                    tm(Ch)[..., 0, 1:] = tm(Ch)[..., 1:, 0] = c_eff.transpose(0, 1)
                if Fh is None and T > 1:
                    Fh = homogeneous_dynamics(dyn.F, d_eff, batch_last=bl)
                elif Fh is not None:
                    tm(Fh)[..., 1:, 0] = d_eff.transpose(0, 1)
            gains = riccati(c_sub.C, c_eff, d_sub.F, d_eff, free=free, expected=False,
                            Fh=Fh if whole else None, Ch=Ch if whole else None,
                            parallel=parallel, batch_last=bl and whole)
            xs, us = rollout_affine(gains, sub(x_init))
            us = torch.where(free, us, val)
            gu, g = _grad_u(c_sub, gains.Fh, xs, us, parallel, gains.V)
            tol = _dual_tol(g, 0.75)[:, None, None]
        # (logical operations and a count: on bool tensors torch.where and any/all cost five to
        # ten times as much on a CPU)
        new_lo = (free & (us < lo)) | (h_lo & (gu >= -tol)) | sub(pinned)
        new_hi = ((free & (us > hi)) | (h_hi & (gu <= tol))) & ~new_lo
        done = ((new_lo ^ h_lo) | (new_hi ^ h_hi)).flatten(1).sum(-1).eq(0) & gains.ok
        # the active samples' part of the pass
        mine = _take(act) if whole and act.numel() < B else (lambda z: z)
        xs, us, new_lo, new_hi, done, ok = (mine(z) for z in (xs, us, new_lo, new_hi, done,
                                                               gains.ok))
        # in place: every one of these tensors is this function's own (out of place, each pass
        # copied all of them, K alone 5 MB at B = 256, T = 50)
        step.index_put_((act,), (us - mine(sub(u))).abs().flatten(1).amax(-1))
        x.index_put_((act,), xs)
        u.index_put_((act,), us)
        held_lo.index_put_((act,), new_lo)
        held_hi.index_put_((act,), new_hi)
        conv.index_put_((act,), done)
        if act.numel() == B:  # the first pass, and later ones while every sample is active
            K, L, free_all = gains.K, gains.L, gains.free
        else:
            fin = act[done]
            src = fin if whole else done.nonzero().squeeze(1)  # their rows in this pass
            K.index_put_((fin,), gains.K[src])
            L.index_put_((fin,), gains.L[src])
            free_all.index_put_((fin,), gains.free[src])
        iters.index_add_(0, act, torch.ones_like(act))
        act = act[~done & ok]
        if act.numel() == 0:
            break
    u = torch.maximum(torch.minimum(u, upper), lower)
    if not bool(conv.all()):  # the last iterate, clamped, and its trajectory
        rest = (~conv).nonzero().squeeze(1)
        x = x.index_put((rest,), rollout(dyn.subset(rest), x_init[rest], u[rest]))
        return x, u, conv, iters, step, None
    Fh = None if Fh is None else tm(Fh)  # the gains carry Fh time-major
    gains = Gains(K, torch.zeros_like(u), free_all, None, torch.ones_like(conv), L, Fh, parallel)
    return x, u, conv, iters, step, gains


def ilqr(
    x_init: Tensor,
    cost: TrajCost,
    dyn: TrajDynamics,
    u_init: Tensor,
    lower: Tensor | None,
    upper: Tensor | None,
    opts: SolverOptions,
    create_graph: bool = False,
    cold_start: bool = False,
    objective: bool = True,
) -> IterResult:
    """Solve a batch of (box-constrained) optimal control problems.

    Args:
        x_init: ``[B, n]``.
        cost, dyn: trajectory views of the cost and the dynamics.
        u_init: ``[B, T, m]`` initial controls (projected onto the box).
        lower, upper: ``[B, T, m]`` bounds, or None for none.
        opts: SolverOptions.
        create_graph: keep the autograd graph through the iterations (unrolled gradients).
        cold_start: ``u_init`` is a generic guess (``MPC``'s default u = 0), not a warm start.
            Then a sample that is stationary there (its first step is zero) gets a second-order
            check and leaves the point if it is no local minimum (a generic guess is often a
            symmetric point: a pendulum hanging at rest), and the first
            ``opts.gauss_newton_iters`` iterations take Gauss-Newton steps only. A warm start
            from an earlier solution rarely needs the check, and near a solution takes Newton
            steps at once (quadratic convergence).
        objective: False: a solve that needs no iterations (an unconstrained LQR) leaves
            ``IterResult.objective`` None (the implicit backward's outputs form it anew).

    Returns:
        IterResult.
    """
    B = x_init.shape[0]
    exact = dyn.linear and cost.quadratic and lower is None
    par = opts.parallel_for(x_init, u_init.shape[1])
    if exact and not create_graph:
        res = _lqr(x_init, cost, dyn, u_init, par, objective)
        if res is not None:
            return res
    tol = opts.tol if opts.tol is not None else (1e-7 if x_init.dtype == torch.float64 else 1e-4)
    u = u_init if lower is None else torch.maximum(torch.minimum(u_init, upper), lower)
    dev = x_init.device
    flags = torch.zeros(B, dtype=torch.bool, device=dev)
    iters = torch.zeros(B, dtype=torch.long, device=dev)
    lq_gains = None
    step = torch.full((B,), float("inf"), dtype=x_init.dtype, device=dev)
    if dyn.linear and cost.quadratic and lower is not None and not create_graph:
        # box-constrained LQ: active-set passes first; box-DDP only for samples they leave
        x, u, flags, iters, step, lq_gains = _active_set_lq(x_init, cost, dyn, u, lower, upper,
                                                            _lq_passes(opts.max_iter), par)
    else:
        x = rollout(dyn, x_init, u)
    s = _State(x, u, cost.value(x, u).sum(-1), torch.zeros(B, dtype=x.dtype, device=dev), step,
               flags, torch.zeros_like(flags), ~flags & cold_start, torch.zeros_like(iters))
    # (every sample iterating is at the same iteration: all start together and none resumes)
    phase = opts.gauss_newton_iters if cold_start and not (dyn.linear and cost.quadratic) else 0
    for i in range(opts.max_iter):
        act = (~s.conv & (s.reg <= opts.reg_max) & (iters < opts.max_iter)).nonzero().squeeze(1)
        if act.numel() == 0:
            break
        early = i < phase
        if i == phase > 0:
            # the line-search hints (ladder indices of the last shortened steps) to the same
            # step sizes on the line_search_decay ladder
            scale = math.log(opts.gauss_newton_decay) / math.log(opts.line_search_decay)
            hints = torch.round(s.ladder.to(torch.float64) * scale).long()
            s = replace(s, ladder=hints.clamp(max=opts.line_search_steps - 1))
        if act.numel() == B:
            s = _iterate(x_init, cost, dyn, s, lower, upper, opts, tol, create_graph, exact, par,
                         early)
        else:
            sub = _take(act)
            part = _iterate(sub(x_init), cost.subset(act), dyn.subset(act), s.take(act),
                            sub(lower), sub(upper), opts, tol, create_graph, exact, par, early)
            s = s.put(act, part)
        iters = iters.index_add(0, act, torch.ones_like(act))
    # a box-constrained LQ problem solved by the active-set passes: their factorization serves
    # the implicit backward too (same C, F and free set)
    return IterResult(x=s.x, u=s.u, objective=s.J, converged=s.conv, iterations=iters,
                      step_norm=s.step, gains=lq_gains)


def _lq_passes(max_iter: int) -> int:
    """Active-set passes allowed within ``max_iter`` iterations: at most half of them past ten
    (the rest is left to box-DDP for the samples whose active set still changes)."""
    return min(max_iter, max(10, max_iter // 2))


def _lqr(x_init: Tensor, cost: TrajCost, dyn: TrajDynamics, u_init: Tensor,
         parallel: bool = False, objective: bool = True) -> IterResult | None:
    """An unconstrained LQR in one Riccati pass and one rollout (scans over time if
    ``parallel``), or None if some control Hessian of the recursion is not positive definite
    (the iterations regularize those)."""
    # absolute coordinates: tau = 0 plus the step
    gains = riccati(cost.C, cost.c, dyn.F, dyn.f, expected=False, parallel=parallel)
    if not bool(gains.ok.all()):
        return None
    x, u = rollout_affine(gains, x_init)
    ones = torch.ones_like(gains.ok)
    obj = cost.value(x, u).sum(-1) if objective else None
    return IterResult(x=x, u=u, objective=obj, converged=ones,
                      iterations=ones.long(), step_norm=(u - u_init).abs().flatten(1).amax(-1),
                      gains=gains)


def _take(idx: Tensor):
    """A function selecting the samples ``idx`` of a tensor (None stays None)."""
    return lambda z: None if z is None else z[idx]
