"""MPC: the layer users call, and its implicit backward pass.

Forward: ``ilqr.ilqr`` solves the batch without building a graph (in inference mode, ``_solve``).
Backward (default): implicit differentiation of the KKT conditions at the solution with the
active controls held at their bounds. With ``z = (tau, lam)`` and the Lagrangian

    L(z; theta) = sum_t cost_t(tau_t) + lam_0'(x_init - x_0) + sum_t lam_{t+1}'(f(tau_t) - x_{t+1}),

the solution satisfies ``G(z*, theta) = grad_z L = 0``, so ``dz*/dtheta = -K^{-1} dG/dtheta`` with
``K = dG/dz = [[H, J'], [J, 0]]`` (H: Hessian of L in tau, which holds the dynamics' curvature
``sum_i lam_i Hess f_i``; J: Jacobian of the constraints). The layer returns
``tau_out = tau* + S(G(z*, theta))`` where S is zero in the forward pass and has the adjoint
``-K^{-1}`` in the backward pass (``_AdjointSolve``): autograd then carries ``-K^{-1} dl/dtau``
through ``dG/dtheta`` into every tensor and parameter that G depends on (cost, dynamics, x_init,
bounds). ``K^{-1}`` applied to ``[g; 0]`` is one more LQR solve: ``min 1/2 w'Hw + g'w`` subject
to the linearized dynamics from ``w_x0 = 0`` with the active controls fixed, and its costate.

Second derivatives: autograd differentiates that first-derivative expression again, which needs
``z*``'s own dependence on theta inside G. The layer evaluates G at ``z_s = z* + S(G(z*, theta))``
(``_AtSolution``: z* in value, and z* to first order in theta), i.e. two chord steps of Newton's
method with the solution's K, exact to second order. A first-order backward skips the inner step:
the gradient reaching ``z_s`` cancels there (``g + K' w = 0``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from enum import Enum

import torch
from torch import Tensor, nn

from diffmpc import native
from diffmpc.checks import as_bound, check_finite, check_tensor, nonfinite, positive_definite
from diffmpc.cost import QuadCost
from diffmpc.dynamics import LinearDynamics
from diffmpc.expand import TrajCost, TrajDynamics, clip_eigenvalues, matvec, matvec_pair
from diffmpc.ilqr import IterResult, SolverOptions, ilqr
from diffmpc.lqr import costate, feedforward, riccati, rollout_affine, time_major

__all__ = ["MPC", "MPCSolution", "BackwardMode", "Unconverged"]


class BackwardMode(str, Enum):
    """How gradients are computed.

    IMPLICIT: exact implicit differentiation of the KKT conditions (default). Second derivatives
        (a backward with ``create_graph=True``, then another) are exact too, w.r.t. every tensor
        and module parameter the problem reads directly (not tensors an opaque cost or dynamics
        callable closes over); they cost two more adjoint solves, first derivatives one. Third
        and higher derivatives are not exact.
    GAUSS_NEWTON: the same without the dynamics' second-order terms (Amos et al. 2018, as in
        mpc.pytorch): exact for linear dynamics, approximate otherwise.
    UNROLL: autograd through every solver iteration (for checking; memory grows with iterations).
    """

    IMPLICIT = "implicit"
    GAUSS_NEWTON = "gauss_newton"
    UNROLL = "unroll"


class Unconverged(str, Enum):
    """What happens to samples that did not converge within ``max_iter``.

    WARN: keep their gradients and warn (default). KEEP: keep silently. ZERO: their outputs carry
    no gradient. RAISE: raise RuntimeError.
    """

    WARN = "warn"
    KEEP = "keep"
    ZERO = "zero"
    RAISE = "raise"


@dataclass
class MPCSolution:
    """Solution of a batch of MPC problems.

    Attributes:
        x: ``[B, T, n]`` states.
        u: ``[B, T, m]`` controls.
        objective: ``[B]`` total cost.
        converged: ``[B]`` bool.
        iterations: ``[B]`` iterations taken.
        step_norm: ``[B]`` inf-norm of the last control step.
    """

    x: Tensor
    u: Tensor
    objective: Tensor
    converged: Tensor
    iterations: Tensor
    step_norm: Tensor


def _enum(cls, name: str, value):
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(repr(c.value) for c in cls)
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}") from None


class MPC(nn.Module):
    """Differentiable box-constrained MPC (iLQR / box-DDP) over a batch.

    Solves, for each of B problems, ``min sum_t cost_t(x_t, u_t)`` subject to ``x_0 = x_init``,
    ``x_{t+1} = f(x_t, u_t)`` and ``u_lower <= u_t <= u_upper``, with T states and T controls.
    A ``QuadCost`` with ``LinearDynamics`` is solved in one Riccati pass without bounds, and with
    bounds by primal-dual active-set passes (one Riccati pass each, box-DDP for the samples
    whose active set has not settled within ``min(max_iter, max(10, max_iter // 2))`` of them);
    anything else by box-DDP. Tensors on a CUDA device are solved there.

    Args:
        n_state: n. n_ctrl: m. horizon: T (>= 1).
        u_lower, u_upper: None, floats or tensors broadcastable to ``[B, T, m]``; tensors may
            require grad.
        backward: "implicit" (default), "gauss_newton" or "unroll" (see BackwardMode).
        unconverged: "warn" (default), "keep", "zero" or "raise" (see Unconverged).
        **solver_options: fields of ``SolverOptions`` (max_iter, tol, line_search_steps, ...).

    Example:
        >>> import torch, diffmpc as dm
        >>> n, m, T, B = 2, 1, 5, 3
        >>> mpc = dm.MPC(n, m, T, u_lower=-1.0, u_upper=1.0)
        >>> F = torch.tensor([[1.0, 0.1, 0.0], [0.0, 1.0, 0.1]], dtype=torch.float64)
        >>> cost = dm.QuadCost(torch.eye(n + m, dtype=torch.float64))
        >>> sol = mpc(torch.ones(B, n, dtype=torch.float64), cost, dm.LinearDynamics(F))
        >>> sol.u.shape, bool(sol.converged.all())
        (torch.Size([3, 5, 1]), True)
    """

    def __init__(self, n_state: int, n_ctrl: int, horizon: int, u_lower=None, u_upper=None, *,
                 backward: str = "implicit", unconverged: str = "warn", **solver_options) -> None:
        super().__init__()
        for name, v in (("n_state", n_state), ("n_ctrl", n_ctrl), ("horizon", horizon)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        valid = {f.name for f in fields(SolverOptions)}
        unknown = sorted(set(solver_options) - valid)
        if unknown:
            raise ValueError(f"solver_options: expected keywords among {sorted(valid)}, "
                             f"got {unknown}")
        self.n_state, self.n_ctrl, self.horizon = n_state, n_ctrl, horizon
        for name, b in (("u_lower", u_lower), ("u_upper", u_upper)):
            if isinstance(b, Tensor) and not isinstance(b, nn.Parameter) and not b.requires_grad:
                self.register_buffer(name, b)  # follows .to(); learnable bounds stay references
            else:
                setattr(self, name, b)
        self.backward_mode = _enum(BackwardMode, "backward", backward)
        self.unconverged = _enum(Unconverged, "unconverged", unconverged)
        self.options = SolverOptions(**solver_options)
        _check_options(self.options)

    def forward(self, x_init: Tensor, cost, dynamics, u_init: Tensor | None = None) -> MPCSolution:
        """Solve the batch.

        Args:
            x_init: ``[B, n]`` initial states (float32 or float64).
            cost: ``QuadCost`` or a cost module ``(x [..., n], u [..., m]) -> [...]``.
            dynamics: ``LinearDynamics`` or a module ``(x [B, n], u [B, m]) -> [B, n]``.
            u_init: ``[B, T, m]`` warm start (broadcastable), default zeros. If the default
                guess is stationary, it gets a second-order check and a saddle is left (a
                pendulum hanging at rest with u = 0 is one). From the default guess the first
                ``gauss_newton_iters`` iterations take Gauss-Newton steps (``SolverOptions``);
                a warm start takes Newton steps at once.

        Returns:
            MPCSolution.
        """
        n, m, T = self.n_state, self.n_ctrl, self.horizon
        x_init = _check_x_init(x_init, n)
        B = x_init.shape[0]
        if hasattr(cost, "quad_cost") and not isinstance(cost, QuadCost):
            cost = cost.quad_cost()
        _check_cost(cost, B, T, n, m, x_init)
        _check_dynamics(dynamics, B, T, n, m, x_init)
        lower, upper = self._bounds(B, T, m, x_init)
        u0 = self._u_init(u_init, B, T, m, x_init)
        mode = self.backward_mode
        cost_a = TrajCost(cost, B, T, n, m, symmetrize=mode == BackwardMode.UNROLL)
        dyn_a = TrajDynamics(dynamics, B, T, n, m)
        if lower is not None:
            lower_c, upper_c = lower.detach(), upper.detach()
        else:
            lower_c = upper_c = None
        if mode == BackwardMode.UNROLL and torch.is_grad_enabled():
            res = ilqr(x_init, cost_a, dyn_a, u0, lower, upper, self.options, create_graph=True,
                       cold_start=u_init is None)
            sol = _solution(res, res.x, res.u, res.objective)
        else:
            grad = torch.is_grad_enabled() and _needs_grad(x_init, cost_a, dyn_a, lower, upper)
            # with grad, _implicit forms the objective from its outputs
            res = _solve(x_init, cost_a, dyn_a, u0, lower_c, upper_c, self.options,
                         cold_start=u_init is None, objective=not grad)
            if grad:
                x, u, obj = _implicit(x_init, cost_a, dyn_a, res, lower, upper,
                                      mode == BackwardMode.IMPLICIT, self.options)
                sol = _solution(res, x, u, obj)
            else:
                sol = _solution(res, res.x, res.u, res.objective)
        return self._handle_unconverged(sol)

    def _bounds(self, B, T, m, ref):
        if self.u_lower is None and self.u_upper is None:
            return None, None
        lower = as_bound("u_lower", self.u_lower, B, T, m, ref, -1.0)
        upper = as_bound("u_upper", self.u_upper, B, T, m, ref, 1.0)
        if bool((lower > upper).any()):
            bad = int((lower > upper).sum())
            raise ValueError(f"u_lower, u_upper: expected u_lower <= u_upper elementwise, got "
                             f"{bad} entries with u_lower > u_upper")
        return lower, upper

    def _u_init(self, u_init, B, T, m, ref):
        if u_init is None:
            return ref.new_zeros(B, T, m)
        check_tensor("u_init", u_init, (B, T), (m,), ref)
        return u_init.detach().expand(B, T, m)

    def _handle_unconverged(self, sol: MPCSolution) -> MPCSolution:
        bad = ~sol.converged
        if not bool(bad.any()):
            return sol
        k, B = int(bad.sum()), bad.numel()
        msg = (f"MPC: {k} of {B} samples did not converge in max_iter={self.options.max_iter} "
               f"iterations (see MPCSolution.converged)")
        if self.unconverged == Unconverged.RAISE:
            raise RuntimeError(msg)
        if self.unconverged == Unconverged.WARN:
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
        if self.unconverged == Unconverged.ZERO:
            keep = sol.converged
            sol.x = torch.where(keep[:, None, None], sol.x, sol.x.detach())
            sol.u = torch.where(keep[:, None, None], sol.u, sol.u.detach())
            sol.objective = torch.where(keep, sol.objective, sol.objective.detach())
        return sol

    def extra_repr(self) -> str:
        return (f"n_state={self.n_state}, n_ctrl={self.n_ctrl}, horizon={self.horizon}, "
                f"backward={self.backward_mode.value}, max_iter={self.options.max_iter}")


def _solve(x_init, cost: TrajCost, dyn: TrajDynamics, *args, **kwargs) -> IterResult:
    """``ilqr`` without a graph, in inference mode, which saves bookkeeping on each of the
    solve's many small operations (15-25 % of a cartpole solve at B = 1 or 256). The results
    come out as ordinary tensors, which autograd may save, unless the caller is in inference
    mode itself; the factorization an LQ solve hands to the backward pass stays as it is (only
    read there, except under double backward, which copies it: ``_ordinary``)."""
    with torch.inference_mode():
        res = ilqr(x_init, cost, dyn, *args, **kwargs)
    if torch.is_inference_mode_enabled():  # the caller's own inference mode: leave them
        return res
    return _ordinary(res, skip=("gains",))


def _ordinary(obj, skip: tuple = ()):
    """A copy of the dataclass ``obj`` whose inference tensors are cloned into ordinary ones."""
    out = {f.name: getattr(obj, f.name) for f in fields(obj)}
    for k, v in out.items():
        if k not in skip and isinstance(v, Tensor) and v.is_inference():
            out[k] = v.clone()
    return type(obj)(**out)


def _solution(res: IterResult, x, u, obj) -> MPCSolution:
    return MPCSolution(x=x, u=u, objective=obj, converged=res.converged,
                       iterations=res.iterations, step_norm=res.step_norm)


class _AdjointSolve(torch.autograd.Function):
    """Zero in the forward pass; ``-K^{-1}`` in the backward pass.

    Inputs: data = (H [B, T, p, p], F [B, T-1, n, p], free [B, T, m], gains or None: the
    forward's factorization of the same H, F and free set, if it has one; parallel: the LQ
    solve by scans over time, ``SolverOptions.time_parallel``) and the KKT residual
    blocks Gx [B, T, n], Gu [B, T, m], Glam [B, T, n]. Outputs: dx [B, T, n], du [B, T, m],
    dlam [B, T, n] (the costate's change; only double backward reads it, ``_implicit``).
    """

    @staticmethod
    def forward(data, Gx, Gu, Glam):
        return torch.zeros_like(Gx), torch.zeros_like(Gu), torch.zeros_like(Glam)

    @staticmethod
    def setup_context(ctx, inputs, output):
        H, F, free, gains, parallel = inputs[0]
        ctx.save_for_backward(H, F, free)
        ctx.gains, ctx.parallel = gains, parallel
        ctx.set_materialize_grads(False)

    # Backward: (w, nu) solves K [w; nu] = -[g; h], i.e. H w + J' nu = -g and J w = -h. For
    # h = 0 that is the LQR of linear term +g (below): its solution w and costate nu satisfy
    # H w + g + J' nu = 0 and J w = 0. A nonzero h (double backward only) is carried by w_h, the
    # linearized dynamics driven by h with zero controls (J w_h = -h): then w - w_h solves the
    # same LQR with the linear term g + H w_h. This is the vector-Jacobian product of S.
    @staticmethod
    def backward(ctx, gx, gu, glam):
        if gx is None and gu is None and glam is None:
            return None, None, None, None
        H, F, free = ctx.saved_tensors
        n = F.shape[-2]
        gx = torch.zeros_like(H[..., :n, 0]) if gx is None else gx
        gu = torch.zeros_like(H[..., n:, 0]) if gu is None else gu
        def unheld(v):  # zero on the held controls, whose rows the bounds replace
            return torch.cat([v[..., :n], v[..., n:] * free], -1)

        g = unheld(torch.cat([gx, gu], -1))
        g_solve, wh = g, None
        if glam is not None:
            Fx = None if F.shape[1] == 0 else time_major(F[..., :n])
            wh = torch.cat([_drive(Fx, glam), torch.zeros_like(gu)], -1)
            g_solve = unheld(matvec(H, wh) + g)
        if ctx.gains is not None:  # the forward's factorization of the same H, F and free set
            gains = ctx.gains
            if torch.is_grad_enabled():  # double backward: autograd may save them, so no
                gains = _ordinary(gains)  # inference tensors (the forward's solve made them)
            gains = feedforward(gains, g_solve)
        else:
            gains = riccati(H, g_solve, F, None, free=free, expected=False, parallel=ctx.parallel)
        wx, wu = rollout_affine(gains, torch.zeros_like(gx[:, 0]), offsets=False)
        w = torch.cat([wx, wu], -1)
        if wh is not None:
            w = w + wh
        r = matvec(H, w) + g
        nu = costate(r[..., :n], None if gains.Fh is None else gains.Fh[:, :, 1:, 1:n + 1],
                     ctx.parallel)
        wx, wu = w[..., :n], w[..., n:]
        if not bool(gains.ok.all()):
            warnings.warn("MPC backward: the Hessian of the Lagrangian is not positive definite on "
                          "the free controls for some samples; their gradients are set to zero",
                          RuntimeWarning, stacklevel=2)
            ok = gains.ok[:, None, None]
            wx, wu, nu = (torch.where(ok, a, torch.zeros_like(a)) for a in (wx, wu, nu))
        return None, wx, wu, nu


def _drive(Fx: Tensor | None, h: Tensor) -> Tensor:
    """States ``[B, T, n]`` of ``w_0 = h_0``, ``w_{t+1} = Fx_t w_t + h_{t+1}`` (``Fx``
    time-major ``[T-1, B, n, n]``, None if T = 1)."""
    ws = [h[:, 0]]
    for t in range(h.shape[1] - 1):
        ws.append(torch.baddbmm(h[:, t + 1].unsqueeze(-1), Fx[t],
                                ws[-1].unsqueeze(-1)).squeeze(-1))
    return torch.stack(ws, 1)


class _AtSolution(torch.autograd.Function):
    """A copy of one block of the solution ``z* = (x*, u*, lam*)`` whose dependence on the
    problem's tensors ``thetas`` is evaluated only under double backward.

    Inputs: point (a ``_Point``), k (which block), value, *thetas. In a first-order backward
    (no create_graph, and none before it: ``_Point.live``) it passes nothing on: the solution's
    change reaches the layer's outputs through
    ``tau_out = tau* + S(G(z*, theta))`` alone, and the gradient arriving here sums to zero (up
    to rounding: the output's direct share cancels the share through G, as ``K' w = -g``).
    Otherwise it returns the vector-Jacobian product of ``z*(theta)`` to first order,
    ``z* + S(G(z*, theta))`` (with a graph under create_graph): the layer's outputs are then
    ``z_s + S(G(z_s, theta))`` with ``z_s`` that first-order solution, two chord steps of
    Newton's method with the solution's ``K``, exact to second order in theta.
    """

    @staticmethod
    def forward(point, k, value, *thetas):
        return value.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.point, ctx.k, ctx.n = inputs[0], inputs[1], len(inputs) - 3
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, g):
        graph = torch.is_grad_enabled()  # a backward with create_graph: derivatives to follow
        ctx.point.live |= graph
        if g is None or not ctx.point.live:
            return (None,) * (3 + ctx.n)
        with torch.enable_grad():
            dz = ctx.point.first()[ctx.k]
            grads = torch.autograd.grad(dz, ctx.point.thetas, g, create_graph=graph,
                                        allow_unused=True)
        return (None, None, None, *grads)


@dataclass
class _Point:
    """``first()``: the solution's first-order change ``S(G(z*, theta))`` as (dx, du, dlam);
    ``thetas``: the tensors requiring grad that G reads; ``live``: a backward with create_graph
    has run through the layer, so the derivatives of its result (the next backward, which runs
    without a graph itself) need the solution's dependence on theta too."""

    first: object
    thetas: tuple
    live: bool = False

    def at(self, k: int, value: Tensor) -> Tensor:
        return _AtSolution.apply(self, k, value, *self.thetas)

    def needed(self) -> bool:
        """In a backward: whether gradients w.r.t. the solution point will be used (a backward
        with create_graph, or one after it)."""
        return self.live or torch.is_grad_enabled()


def _active(u: Tensor, lower: Tensor | None, upper: Tensor | None):
    if lower is None:
        none = torch.zeros_like(u, dtype=torch.bool)
        return none, none
    eps = 10 * torch.finfo(u.dtype).eps
    lo, hi = lower.detach(), upper.detach()
    return u <= lo + eps * (1 + lo.abs()), u >= hi - eps * (1 + hi.abs())


def _implicit(x_init, cost, dyn, res: IterResult, lower, upper, exact: bool, opts):
    """Outputs carrying implicit gradients: x ``[B, T, n]``, u ``[B, T, m]``, objective ``[B]``."""
    n = x_init.shape[-1]
    x, u = res.x.detach(), res.u.detach()
    lo_act, hi_act = _active(u, lower, upper)
    held = lo_act | hi_act
    lq = cost.quadratic and dyn.linear
    Fx = None  # state Jacobians, time-major: from the forward's factorization if it has one
    if res.gains is not None and res.gains.Fh is not None:
        Fx = res.gains.Fh[:, :, 1:, 1:n + 1]
    lam = None  # the costate at the solution (for LQ problems ``_lq_residual`` forms it)
    par = opts.parallel_for(x_init, x.shape[1])
    with torch.no_grad():
        F = dyn.jacobian(x[:, :-1], u[:, :-1])
        Fx = time_major(F[..., :n]) if Fx is None else Fx
        if lq:
            H = cost.C
        else:
            H, g = cost.quadratize(x, u)
            if not (exact or cost.quadratic):  # Gauss-Newton: the forward's convexified Hessian
                H = clip_eigenvalues(H, opts.psd_floor)
            lam = costate(g[..., :n], Fx, par)
            if exact:
                H = dyn.lagrangian_hessian(H, x, u, lam)
    free = ~held
    reuse = res.gains if (lq and res.gains is not None
                          and torch.equal(res.gains.free, free)) else None
    data = (H, F, free, reuse, par)

    def residual(xs, us, lam_of, need_tau=None):
        """The KKT residual ``(Gx, Gu, Glam)`` at (xs, us) with the costate ``lam_of(lam*)``."""
        u_eff = us if lower is None else torch.where(lo_act, lower, torch.where(hi_act, upper, us))
        if lq:  # the same gradient in closed form (no double backward)
            Gx, Gu, nxt = _lq_residual(cost, dyn, xs, u_eff, held, Fx, lam_of, need_tau, par)
        else:
            nxt = dyn.all(xs[:, :-1], u_eff[:, :-1])
        Glam = torch.cat([(x_init - xs[:, 0]).unsqueeze(1), nxt - xs[:, 1:]], 1)
        if not lq:
            lagr = cost.value(xs, u_eff).sum() + (lam_of(lam) * Glam).sum()
            Gx, Gu = torch.autograd.grad(lagr, (xs, us), create_graph=True,
                                         materialize_grads=True)
        return Gx, Gu, Glam

    def leaves():
        return x.clone().requires_grad_(True), u.clone().requires_grad_(True)

    with torch.enable_grad():
        thetas = _thetas(x_init, cost, dyn, lower, upper) if exact else ()
        need_tau = None
        if thetas:  # z* as a function of theta, evaluated under double backward only
            point = _Point(lambda: _AdjointSolve.apply(data, *residual(*leaves(), _same)),
                           thetas)
            xs, us = point.at(0, x), point.at(1, u)
            lam_of = lambda l: point.at(2, l)  # noqa: E731
            # (x, u)'s gradient ends at the solution point, which a first-order backward drops;
            # with bounds requiring grad it reaches them too (through the held controls)
            if not any(b is not None and b.requires_grad for b in (lower, upper)):
                need_tau = point.needed
        else:
            (xs, us), lam_of = leaves(), _same
        dx, du, _ = _AdjointSolve.apply(data, *residual(xs, us, lam_of, need_tau))
        x_out = xs + dx
        u_out = us + du
        if lower is not None:
            u_out = torch.where(lo_act, lower, torch.where(hi_act, upper, u_out))
        obj = cost.value(x_out, u_out).sum(-1)
    return x_out, u_out, obj


def _same(t):
    return t


def _problem_tensors(x_init, cost: TrajCost, dyn: TrajDynamics, lower, upper):
    """The tensors the problem reads, as the KKT residual reads them (the cost's and the
    dynamics' broadcast views, the modules' parameters), and whether the cost or the dynamics is
    an opaque callable (which may close over more)."""
    ts, opaque = [x_init, lower, upper], False
    for obj in (cost, dyn):
        if isinstance(obj, TrajCost) and obj.quadratic:
            ts += [obj.C, obj.c]
        elif isinstance(obj, TrajDynamics) and obj.linear:
            ts += [obj.F, obj.f]
        elif isinstance(obj.raw, nn.Module):
            ts += list(obj.raw.parameters())
        else:
            opaque = True
    return [t for t in ts if isinstance(t, Tensor)], opaque


def _thetas(x_init, cost: TrajCost, dyn: TrajDynamics, lower, upper) -> tuple:
    """The tensors requiring grad that the KKT residual reads (``_problem_tensors``). A tensor
    that an opaque callable closes over is not among them: first derivatives w.r.t. it are
    exact, second ones lack the solution's own dependence on it."""
    seen = set()  # a parameter that the cost and the dynamics share counts once
    return tuple(t for t in _problem_tensors(x_init, cost, dyn, lower, upper)[0]
                 if t.requires_grad and not (id(t) in seen or seen.add(id(t))))


def _lq_residual(cost, dyn, x, u, held, Fx, lam_of=_same, need_tau=None, parallel=False):
    """Stationarity residual of a linear-quadratic problem and its transitions at (x, u):
    ``Gx [B, T, n]``, ``Gu [B, T, m]`` and ``F_t tau_t + f_t`` ``[B, T-1, n]``.

    ``d/dtau_t`` of ``cost + lam' (constraints)``: ``C_t tau_t + c_t + F_t' lam_{t+1} - [lam_t; 0]``
    (no ``F'`` term at the last step), zero on the controls held at a bound. The costate
    ``lam_of(lam)`` comes from the same cost gradient, with the state Jacobians ``Fx``
    (time-major): ``lam`` is that gradient's costate, a constant. ``F tau`` and ``F' lam`` are
    one ``matvec_pair``: one gradient block for F. ``need_tau``: see ``matvec``; ``parallel``:
    the costate by a scan over time (``costate``).
    """
    n = x.shape[-1]
    tau = torch.cat([x, u], -1)
    g = matvec(cost.C, tau, sym=True, need_x=need_tau) + cost.c
    lam = lam_of(costate(g.detach()[..., :n], Fx, parallel))
    if x.shape[1] > 1:
        Ftau, Fl = matvec_pair(dyn.F, tau[:, :-1], lam[:, 1:], need_tau)
        nxt = Ftau + dyn.f
        g = g + torch.cat([Fl, torch.zeros_like(g[:, :1])], 1)
    else:  # T = 1: no transition
        nxt = x[:, :0]
    return g[..., :n] - lam, g[..., n:].masked_fill(held, 0.0), nxt


def _check_x_init(x_init, n: int) -> Tensor:
    if not isinstance(x_init, Tensor):
        raise ValueError(f"x_init: expected a torch.Tensor of shape [B, {n}], "
                         f"got {type(x_init).__name__}")
    if x_init.dim() != 2 or x_init.shape[1] != n:
        raise ValueError(f"x_init: expected shape [B, {n}], got shape {tuple(x_init.shape)}")
    if x_init.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"x_init: expected dtype float32 or float64, got {x_init.dtype}")
    if x_init.shape[0] < 1:
        raise ValueError("x_init: expected a batch of at least one sample, got B = 0")
    check_tensor("x_init", x_init, (), (x_init.shape[0], n))
    return x_init


def _check_cost(cost, B, T, n, m, ref) -> None:
    p = n + m
    if isinstance(cost, QuadCost):
        C = check_tensor("cost.C", cost.C, (B, T), (p, p), ref, finite=False).detach()
        if cost.c is not None:
            check_tensor("cost.c", cost.c, (B, T), (p,), ref)
        blocks = _blocks(C, p)
        if blocks is not None and native.handles(blocks):  # all four checks in one pass
            bad, scale, asym, indefinite = native.check_cost(blocks, n)
            nonfinite("cost.C", bad)
            _check_symmetric(asym, scale)
            if indefinite:
                _not_pd(indefinite)
            return
        lo, hi = torch.aminmax(C)
        check_finite("cost.C", C, torch.stack([lo, hi]))
        asym, scale = 0.0, max(-float(lo), float(hi))
        for part in C.reshape(-1, p, p).split(8192):  # temporaries below glibc's mmap threshold
            dlo, dhi = torch.aminmax(part - part.mT)
            asym = max(asym, -float(dlo), float(dhi))
        _check_symmetric(asym, scale)
        bad = ~positive_definite(C[..., n:, n:])
        if bool(bad.any()):
            _not_pd(int(bad.sum()))
    elif not callable(cost):
        raise ValueError(f"cost: expected a QuadCost or a callable cost(x, u), "
                         f"got {type(cost).__name__}")
    else:
        with torch.no_grad():
            out = cost(ref[:1, None].expand(1, 1, n), ref.new_zeros(1, 1, m))
        if not isinstance(out, Tensor) or tuple(out.shape) != (1, 1):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"cost: expected cost(x [..., {n}], u [..., {m}]) to return shape "
                             f"[...] (here [1, 1]), got {shape}")


def _blocks(C: Tensor, p: int) -> Tensor | None:
    """C's ``[p, p]`` blocks as one ``[N, p, p]`` view, or None if its strides do not allow
    one."""
    try:
        return C.view(-1, p, p)
    except RuntimeError:
        return None


def _check_symmetric(asym: float, scale: float) -> None:
    if asym > 1e-6 * (1 + scale):
        raise ValueError(f"cost.C: expected symmetric matrices, got max |C - C^T| = {asym:.3g}")


def _not_pd(count: int) -> None:
    raise ValueError("cost.C: expected a positive definite control block C[..., n:, n:], "
                     f"got {count} blocks that are not")


def _check_dynamics(dyn, B, T, n, m, ref) -> None:
    p = n + m
    if isinstance(dyn, LinearDynamics):
        check_tensor("dynamics.F", dyn.F, (B, T - 1), (n, p), ref)
        if dyn.f is not None:
            check_tensor("dynamics.f", dyn.f, (B, T - 1), (n,), ref)
    elif not callable(dyn):
        raise ValueError(f"dynamics: expected a LinearDynamics or a callable dynamics(x, u), "
                         f"got {type(dyn).__name__}")
    else:
        with torch.no_grad():
            out = dyn(ref[:1], ref.new_zeros(1, m))
        if not isinstance(out, Tensor) or tuple(out.shape) != (1, n):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"dynamics: expected dynamics(x [B, {n}], u [B, {m}]) to return "
                             f"shape [B, {n}], got {shape} for B = 1")


def _check_options(o: SolverOptions) -> None:
    if not isinstance(o.max_iter, int) or o.max_iter < 1:
        raise ValueError(f"max_iter: expected a positive int, got {o.max_iter!r}")
    if o.tol is not None and not o.tol > 0:
        raise ValueError(f"tol: expected None or a positive float, got {o.tol!r}")
    if not isinstance(o.line_search_steps, int) or o.line_search_steps < 1:
        raise ValueError(f"line_search_steps: expected a positive int, got {o.line_search_steps!r}")
    if not 0 < o.line_search_decay < 1:
        raise ValueError(f"line_search_decay: expected a float in (0, 1), "
                         f"got {o.line_search_decay!r}")
    if not isinstance(o.gauss_newton_iters, int) or o.gauss_newton_iters < 0:
        raise ValueError(f"gauss_newton_iters: expected a non-negative int, "
                         f"got {o.gauss_newton_iters!r}")
    if not 0 < o.gauss_newton_decay < 1:
        raise ValueError(f"gauss_newton_decay: expected a float in (0, 1), "
                         f"got {o.gauss_newton_decay!r}")
    if o.time_parallel is not None and not isinstance(o.time_parallel, bool):
        raise ValueError(f"time_parallel: expected None, True or False, got {o.time_parallel!r}")


def _needs_grad(x_init, cost: TrajCost, dyn: TrajDynamics, lower, upper) -> bool:
    tensors, opaque = _problem_tensors(x_init, cost, dyn, lower, upper)
    # an opaque callable may close over tensors that require grad
    return opaque or any(t.requires_grad for t in tensors)
