"""Trajectory-level views of dynamics and costs: evaluation, Jacobians and Hessians.

The solver talks to ``TrajDynamics`` and ``TrajCost`` only. They wrap ``LinearDynamics`` /
``QuadCost`` (closed forms) or arbitrary row-wise modules, whose derivatives along the whole
trajectory are taken in one batched autograd call: the ``N`` points are replicated once per
output row, so one backward pass returns every row of every Jacobian (no loop over states,
time steps or samples).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import Tensor

from diffmpc import native
from diffmpc.cost import QuadCost
from diffmpc.dynamics import LinearDynamics

__all__ = ["batch_jacobian", "batch_hessian", "matvec", "matvec_pair", "TrajDynamics", "TrajCost"]


class _MatVec(torch.autograd.Function):
    """``A x`` or ``A' x`` for ``A [..., r, c]``; see ``matvec``."""

    @staticmethod
    def forward(A, x, sym, trans, need_x):
        if native.blocks(A, x):
            return native.matvec(A, x, trans)
        return ((A.mT if trans else A) @ x.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        A, x, sym, trans, need_x = inputs
        ctx.save_for_backward(A, x)
        ctx.sym, ctx.trans, ctx.need_x = sym, trans, need_x

    @staticmethod
    def backward(ctx, g):
        A, x = ctx.saved_tensors
        gA = gx = None
        if ctx.needs_input_grad[0] and native.blocks(A, g, x):  # one pass
            gA = (native.outer(g, x, x, g, 0.5) if ctx.sym else
                  native.outer(x, g) if ctx.trans else native.outer(g, x))
        elif ctx.needs_input_grad[0]:
            if ctx.sym:  # (g x' + x g') / 2, in two passes
                h = 0.5 * g
                gA = (h.unsqueeze(-1) * x.unsqueeze(-2)).addcmul_(x.unsqueeze(-1), h.unsqueeze(-2))
            elif ctx.trans:
                gA = x.unsqueeze(-1) * g.unsqueeze(-2)
            else:
                gA = g.unsqueeze(-1) * x.unsqueeze(-2)
        if ctx.needs_input_grad[1] and (ctx.need_x is None or ctx.need_x()):
            gx = matvec(A, g, trans=not ctx.trans)
        return gA, gx, None, None, None


class _QuadValue(torch.autograd.Function):
    """Stage costs ``1/2 tau' C tau + c' tau`` ``[B, T]`` of a symmetric C ``[B, T, p, p]`` in one
    compiled pass, which keeps ``C tau`` for the backward: ``w tau`` for c, ``w (C tau + c)``
    for tau and ``w tau tau' / 2`` for C (the symmetric gradient, as ``matvec(sym=True)``'s).
    Only where ``native.blocks`` holds; a backward that records a graph (double backward) uses
    PyTorch operations on the saved inputs."""

    @staticmethod
    def forward(C, c, tau):
        return native.quad_value(C, c, tau, with_product=True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        C, c, tau = inputs
        ctx.save_for_backward(C, c, tau, output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, w, _):
        C, c, tau, Ct = ctx.saved_tensors
        wt = w.unsqueeze(-1) * tau
        gC = gc = gtau = None
        recording = torch.is_grad_enabled()
        if ctx.needs_input_grad[0]:
            gC = (0.5 * wt.unsqueeze(-1) * tau.unsqueeze(-2) if recording
                  else native.outer(wt, tau, alpha=0.5))
        if ctx.needs_input_grad[1]:
            gc = wt
        if ctx.needs_input_grad[2]:
            if recording:
                Ct = matvec(C, tau, sym=True)
            gtau = w.unsqueeze(-1) * (Ct + c)
        return gC, gc, gtau


def matvec(A: Tensor, x: Tensor, sym: bool = False, trans: bool = False,
           need_x=None) -> Tensor:
    """Batched ``A x`` (or ``A' x`` if ``trans``) for ``A [..., r, c]`` and x with the same
    leading dims.

    The gradient w.r.t. A is formed as an outer product by broadcasting, in A's own layout:
    autograd's batched-matmul backward forms it with one tiny GEMM per matrix, several times
    slower. ``sym=True`` declares A symmetric: its gradient is then symmetrized,
    ``(g x' + x g') / 2``, the gradient of a function of a symmetric matrix. ``need_x``: None,
    or a function that the backward asks whether x's gradient is needed at all (the implicit
    backward's solution point, whose gradient a first-order backward drops).
    """
    if A.shape[:-2] != x.shape[:-1]:
        return ((A.mT if trans else A) @ x.unsqueeze(-1)).squeeze(-1)
    if not (torch.is_grad_enabled() and (A.requires_grad or x.requires_grad)):
        return _MatVec.forward(A, x, sym, trans, need_x)  # no graph: not through Function.apply
    return _MatVec.apply(A, x, sym, trans, need_x)


class _MatVecPair(torch.autograd.Function):
    """``(A x, A' y)`` for ``A [..., r, c]``; see ``matvec_pair``."""

    @staticmethod
    def forward(A, x, y, need_x):
        if native.blocks(A, x, y):
            return native.matvec_pair(A, x, y)
        return (A @ x.unsqueeze(-1)).squeeze(-1), (A.mT @ y.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:3])
        ctx.need_x = inputs[3]
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, gAx, gAty):
        A, x, y = ctx.saved_tensors
        gA = gx = gy = None
        if ctx.needs_input_grad[0] and (gAx is not None or gAty is not None):
            # gAx x' + y gAty', one fresh block of A's size (compiled: in one pass)
            if native.blocks(A, gAx, x, y, gAty):
                gA = (native.outer(gAx, x, y, gAty) if gAx is not None and gAty is not None
                      else native.outer(gAx, x) if gAx is not None else native.outer(y, gAty))
            else:
                if gAx is not None:
                    gA = gAx.unsqueeze(-1) * x.unsqueeze(-2)
                if gAty is not None:
                    gA = (y.unsqueeze(-1) * gAty.unsqueeze(-2) if gA is None
                          else gA.addcmul_(y.unsqueeze(-1), gAty.unsqueeze(-2)))
        if ctx.needs_input_grad[1] and gAx is not None and (ctx.need_x is None or ctx.need_x()):
            gx = matvec(A, gAx, trans=True)
        if ctx.needs_input_grad[2] and gAty is not None:
            gy = matvec(A, gAty)
        return gA, gx, gy, None


def matvec_pair(A: Tensor, x: Tensor, y: Tensor, need_x=None) -> tuple[Tensor, Tensor]:
    """``(A x, A' y)`` for ``A [..., r, c]``, ``x [..., c]``, ``y [..., r]`` with A's leading
    dims. As two ``matvec`` calls, except that the gradient w.r.t. A is one tensor formed in
    place (``gAx x' + y gAty'``) instead of two that autograd then adds: A may be large (the
    dynamics Jacobians of a whole batch of trajectories). ``need_x``: as in ``matvec``."""
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (A, x, y))):
        return _MatVecPair.forward(A, x, y, need_x)
    return _MatVecPair.apply(A, x, y, need_x)


def _replicate(z: Tensor, r: int) -> Tensor:
    """``z [N, p]`` -> ``[r * N, p]`` requiring grad (keeps z's graph if it has one); an
    inference tensor (the solver's iterations run in inference mode) is copied out of it."""
    zr = z.unsqueeze(0).expand(r, *z.shape).reshape(r * z.shape[0], z.shape[1])
    if zr.requires_grad:
        return zr
    return (zr.clone() if zr.is_inference() else zr.detach()).requires_grad_(True)


@contextmanager
def _autograd():
    """Autograd on, also inside the solver's inference mode (whose tensors may be read, and
    copied, but not saved for backward)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def batch_jacobian(fn: Callable[[Tensor], Tensor], z: Tensor, q: int, create_graph: bool = False):
    """Jacobians of a row-wise map ``fn: [N, p] -> [N, q]`` at every row.

    Returns:
        value ``[N, q]`` and J ``[N, q, p]``.
    """
    N, p = z.shape
    with _autograd():
        zr = _replicate(z, q)
        y = fn(zr).reshape(q, N, q)
        s = y.diagonal(dim1=0, dim2=2).sum()  # sum_i y[i, :, i]
        (g,) = torch.autograd.grad(s, zr, create_graph=create_graph, materialize_grads=True)
    return y[0], g.reshape(q, N, p).transpose(0, 1)


def batch_hessian(fn: Callable[[Tensor], Tensor], z: Tensor, create_graph: bool = False):
    """Gradients and Hessians of a row-wise scalar map ``fn: [N, p] -> [N]``.

    Returns:
        value ``[N]``, gradient ``[N, p]``, Hessian ``[N, p, p]``.
    """
    N, p = z.shape
    with _autograd():
        zr = _replicate(z, p)
        val = fn(zr)
        (g,) = torch.autograd.grad(val.sum(), zr, create_graph=True, materialize_grads=True)
        s = g.reshape(p, N, p).diagonal(dim1=0, dim2=2).sum()
        if s.requires_grad:
            (h,) = torch.autograd.grad(s, zr, create_graph=create_graph, materialize_grads=True)
        else:  # linear in z
            h = torch.zeros_like(zr)
    grad = g.reshape(p, N, p)[0]
    if not create_graph:
        grad = grad.detach()
    return val.reshape(p, N)[0], grad, h.reshape(p, N, p).transpose(0, 1)


def _rows(fn, *args):
    """Call a row-wise fn on ``[..., k]`` arguments flattened to ``[N, k]``; restore the shape."""
    lead = args[0].shape[:-1]
    out = fn(*(a.reshape(-1, a.shape[-1]) for a in args))
    return out.reshape(*lead, *out.shape[1:])


class TrajDynamics:
    """Dynamics over a batch of trajectories.

    Args:
        dynamics: ``LinearDynamics`` or a row-wise callable ``(x [N, n], u [N, m]) -> [N, n]``.
        B, T, n, m: problem sizes.
    """

    def __init__(self, dynamics, B: int, T: int, n: int, m: int) -> None:
        self.raw, self.B, self.T, self.n, self.m = dynamics, B, T, n, m
        self.linear = isinstance(dynamics, LinearDynamics)
        self._native: dict = {}  # native_model's constants, per grad mode
        if self.linear:
            self.F = dynamics.F.expand(B, T - 1, n, n + m)
            f = dynamics.f if dynamics.f is not None else self.F.new_zeros(())
            self.f = f.expand(B, T - 1, n)

    def subset(self, idx: Tensor) -> TrajDynamics:
        """The same dynamics restricted to the samples ``idx``."""
        out = TrajDynamics.__new__(TrajDynamics)
        out.__dict__.update(self.__dict__)
        out.B = idx.numel()
        if self.linear:
            out.F, out.f = _take_rows(self.F, idx), _take_rows(self.f, idx)
        return out

    def step(self, t: int, x: Tensor, u: Tensor, reps: int = 1) -> Tensor:
        """x ``[reps * B, n]``, u ``[reps * B, m]`` (``reps`` copies of the batch, stacked, e.g.
        one per line-search step) at time t -> ``[reps * B, n]``; a row-wise model is called on
        them as they are."""
        if self.linear:
            tau = torch.cat([x, u], -1).reshape(reps, self.B, -1).permute(1, 2, 0)  # [B, p, reps]
            nxt = (self.F[:, t] @ tau).permute(2, 0, 1) + self.f[:, t]  # [reps, B, n]
            return nxt.reshape(reps * self.B, self.n)
        return self.raw(x, u)

    def stepper(self):
        """``step`` for the T steps of one rollout: a model with a ``rollout_step()`` method
        (``diffmpc.systems``' models) gives a one-step function with its parameter-dependent
        constants formed once, instead of at every step (each is an operation, and at small
        batches and on GPUs each operation costs its dispatch)."""
        make = None if self.linear else getattr(self.raw, "rollout_step", None)
        if make is None:
            return self.step
        fn = make()
        return lambda t, x, u, reps=1: fn(x, u)

    def native_model(self, *tensors: Tensor) -> tuple[int, Tensor] | None:
        """The model's compiled step ``(model, constants)`` (``diffmpc.systems``' Euler steps;
        ``native.model_rollout``, ``model_search``, ``model_expansion``) where the kernels can
        take the ``tensors`` with it (CPU, one dtype, no grad recorded), else None."""
        get = None if self.linear else getattr(self.raw, "_native_model", None)
        if get is None or tensors[0].device.type != "cpu" or not native.available():
            return None
        # the constants once per solve (the parameters do not change during one), per grad mode
        # (with grad recorded they carry the parameters' graph, and the kernels refuse them)
        key = torch.is_grad_enabled()
        if key not in self._native:
            self._native[key] = get()
        model = self._native[key]
        return model if model is not None and native.handles(*tensors, model[1]) else None

    def all(self, x: Tensor, u: Tensor) -> Tensor:
        """Next states for every step: x ``[B, T-1, n]``, u ``[B, T-1, m]`` -> ``[B, T-1, n]``."""
        if x.shape[-2] == 0:  # T = 1: no transition
            return x
        if self.linear:
            return matvec(self.F, torch.cat([x, u], -1)) + self.f
        return _rows(self.raw, x, u)

    def jacobian(self, x: Tensor, u: Tensor, create_graph: bool = False) -> Tensor:
        """F ``[B, T-1, n, p]`` at x ``[B, T-1, n]``, u ``[B, T-1, m]``."""
        if self.linear:
            return self.F
        n, lead = self.n, x.shape[:-1]
        if x.shape[-2] == 0:  # T = 1: no transition
            return x.new_zeros(*lead, n, n + self.m)
        model = None if create_graph or x.dim() != 3 else self.native_model(x, u)
        if model is not None:  # a built-in model's closed form, compiled
            return native.model_expansion(*model, x, u)[0]
        z = torch.cat([x, u], -1).reshape(-1, n + self.m)
        jac = getattr(self.raw, "jacobian", None)
        J = None if jac is None else jac(z[:, :n], z[:, n:])
        if J is None:
            _, J = batch_jacobian(lambda zz: self.raw(zz[:, :n], zz[:, n:]), z, n, create_graph)
        return J.reshape(*lead, n, n + self.m)

    def curvature(self, x: Tensor, u: Tensor, lam: Tensor,
                  create_graph: bool = False) -> Tensor | None:
        """``sum_i lam_i * Hessian(f_i)`` ``[B, T-1, p, p]``, or None for linear dynamics."""
        if self.linear:
            return None
        n, lead = self.n, x.shape[:-1]
        if x.shape[-2] == 0:  # T = 1: no transition
            return x.new_zeros(*lead, n + self.m, n + self.m)
        model = None if create_graph or x.dim() != 3 else self.native_model(x, u, lam)
        if model is not None:  # a built-in model's closed form, compiled: its block in place
            _, Hb, first = native.model_expansion(*model, x, u, lam, jacobian=False)
            H = x.new_zeros(*lead, n + self.m, n + self.m)
            k = Hb.shape[1]
            H[..., first:first + k, first:first + k] = Hb.permute(3, 0, 1, 2)
            return H
        z = torch.cat([x, u], -1).reshape(-1, n + self.m)
        lam = lam.reshape(-1, n)
        closed = getattr(self.raw, "curvature", None)
        H = None if closed is None else closed(z[:, :n], z[:, n:], lam)
        if H is not None:
            return H.reshape(*lead, n + self.m, n + self.m)

        def weighted(zz: Tensor) -> Tensor:
            r = zz.shape[0] // lam.shape[0]
            return (self.raw(zz[:, :n], zz[:, n:]) * lam.repeat(r, 1)).sum(-1)

        _, _, H = batch_hessian(weighted, z, create_graph)
        return H.reshape(*lead, n + self.m, n + self.m)

    def curvature_blocks(self, x: Tensor, u: Tensor, lam: Tensor) -> tuple[Tensor, int] | None:
        """``curvature`` as the nonzero block of each step, time-major and batch-last: ``[T-1, k,
        k, B]`` and the block's first coordinate in tau, where the model computes its curvature
        rows-last (a ``curvature_block(x, u, lam)`` method, as ``Pendulum`` and ``Cartpole``
        have); None otherwise. ``riccati``'s one-control passes store their costs so, and the
        Newton pass adds these blocks there (``ilqr._gains``, where it records no graph) without
        forming ``[B, T, p, p]`` Hessians."""
        block = None if self.linear else getattr(self.raw, "curvature_block", None)
        if block is None or x.shape[-2] < 2:
            return None
        model = self.native_model(x, u, lam)
        if model is not None:  # compiled
            _, Hb, first = native.model_expansion(*model, x[:, :-1], u[:, :-1], lam[:, 1:],
                                                  jacobian=False)
            return Hb, first
        B = x.shape[0]
        rows = lambda z: z.transpose(0, 1).reshape(-1, z.shape[-1])  # noqa: E731  time-major
        out = block(rows(x[:, :-1]), rows(u[:, :-1]), rows(lam[:, 1:]))
        if out is None:
            return None
        Hb, first = out
        k = Hb.shape[0]
        return Hb.view(k, k, -1, B).permute(2, 0, 1, 3), first

    def newton_expansion(self, x: Tensor, u: Tensor, gx: Tensor
                         ) -> tuple[Tensor, Tensor, tuple[Tensor, int]] | None:
        """``jacobian``, ``lqr.costate`` and ``curvature_blocks`` along x ``[B, T, n]``, u ``[B,
        T, m]`` with the cost gradient ``gx [B, T, n]``, in one compiled pass where the model
        has one (``native_model``: the built-in Euler steps): F ``[B, T-1, n, p]``, lam ``[B,
        T, n]``, ``(Hb, first)``; else None."""
        if (self.linear or x.dim() != 3 or x.shape[-2] < 2
                or getattr(self.raw, "curvature_block", None) is None):
            return None
        model = self.native_model(x, u, gx)
        if model is None:
            return None
        J, lam, Hb, first = native.model_newton(*model, x, u, gx)
        return J, lam, (Hb, first)

    def lagrangian_hessian(self, H: Tensor, x: Tensor, u: Tensor, lam: Tensor,
                           create_graph: bool = False) -> Tensor:
        """The cost Hessians ``H [B, T, p, p]`` plus the dynamics' curvature weighted by the
        costate ``lam [B, T, n]`` (``curvature``) on the steps with a transition: the Hessian of
        the Lagrangian in tau along the trajectory x ``[B, T, n]``, u ``[B, T, m]``."""
        curv = self.curvature(x[:, :-1], u[:, :-1], lam[:, 1:], create_graph)
        return H if curv is None else torch.cat([H[:, :-1] + curv, H[:, -1:]], 1)


def _shared(z: Tensor) -> bool:
    """Whether ``z [B, T, ...]`` is one tensor broadcast over the batch and the steps."""
    return z.stride(0) == 0 and z.stride(1) == 0


def _take_rows(z: Tensor, idx: Tensor) -> Tensor:
    """``z[idx]`` along the batch dim; a batch broadcast (stride 0) stays one."""
    if z.stride(0) == 0:
        return z[:1].expand(idx.numel(), *z.shape[1:])
    return z[idx]


class TrajCost:
    """Cost over a batch of trajectories.

    Args:
        cost: ``QuadCost`` or a row-wise module ``(x [..., n], u [..., m]) -> [...]``.
        B, T, n, m: problem sizes.
    """

    def __init__(self, cost, B: int, T: int, n: int, m: int, symmetrize: bool = False) -> None:
        self.raw, self.B, self.T, self.n, self.m = cost, B, T, n, m
        self.quadratic = isinstance(cost, QuadCost)
        self._rest: Tensor | None = None  # rest_minima
        self._parent: tuple[TrajCost, Tensor] | None = None  # (the batch, idx) of a subset
        if self.quadratic:
            p = n + m
            # C is checked to be symmetric and its products (``matvec(sym=True)``) have symmetric
            # gradients; gradients unrolled through the Riccati pass, which reads both triangles,
            # are symmetric only if C is symmetrized explicitly (``symmetrize``)
            C = 0.5 * (cost.C + cost.C.mT) if symmetrize else cost.C
            self.C = C.expand(B, T, p, p)
            c = cost.c if cost.c is not None else self.C.new_zeros(())
            self.c = c.expand(B, T, p)

    def subset(self, idx: Tensor) -> TrajCost:
        """The same cost restricted to the samples ``idx``."""
        out = TrajCost.__new__(TrajCost)
        out.__dict__.update(self.__dict__)
        out.B = idx.numel()
        if self.quadratic:
            out.C, out.c = _take_rows(self.C, idx), _take_rows(self.c, idx)
            out._rest, out._parent = None, (self, idx)
        return out

    def rest_minima(self) -> Tensor:
        """``[B, T]``: for a QuadCost, the least the stages after each step can cost,
        ``sum_{s > t} min_tau (tau' C_s tau / 2 + c_s' tau)`` with each minimum ``-c_s' C_s^-1
        c_s / 2`` (-inf where a C_s is not positive definite: no bound). Formed once per solve,
        on the whole batch (the compiled line search stops rollouts whose cost can no longer
        come out low enough)."""
        if self._rest is None and self._parent is not None:
            parent, idx = self._parent
            self._rest = _take_rows(parent.rest_minima(), idx)
        if self._rest is None:
            C = self.raw.C.detach()
            c = C.new_zeros(C.shape[-1]) if self.raw.c is None else self.raw.c.detach()
            L, info = torch.linalg.cholesky_ex(C)
            # (the batch dimensions broadcast in the solve; torch.broadcast_shapes would import
            # sympy on first use, 0.3 s)
            low = -0.5 * (c * torch.cholesky_solve(c.unsqueeze(-1), L).squeeze(-1)).sum(-1)
            low = torch.where(info == 0, low, -torch.inf)
            low = low.expand(self.B, self.T).contiguous()
            after = low[:, 1:].flip(-1).cumsum(-1).flip(-1)  # sum over s >= t + 1
            self._rest = torch.cat([after, low.new_zeros(self.B, 1)], -1)
        return self._rest

    def value(self, x: Tensor, u: Tensor) -> Tensor:
        """Stage costs: x ``[..., B, T, n]``, u ``[..., B, T, m]`` -> ``[..., B, T]``."""
        if self.quadratic:
            tau = torch.cat([x, u], -1)
            if _shared(self.C):  # one C for every sample and step
                # one matrix product over all rows (not C copied B T times), and on the line
                # search's large trajectories one fresh block: (C tau / 2 + c) formed in place
                C, c = self.C[0, 0], self.c
                if _shared(c):
                    z = torch.addmm(c[0, 0], tau.reshape(-1, tau.shape[-1]), C, alpha=0.5)
                    z = z.view(tau.shape)
                else:
                    z = torch.add(c, tau @ C, alpha=0.5)
                return (z * tau if z.requires_grad else z.mul_(tau)).sum(-1)
            if tau.dim() == 3:
                if native.blocks(self.C.detach(), self.c.detach(), tau.detach()):  # one pass
                    if torch.is_grad_enabled() and any(
                            t.requires_grad for t in (self.C, self.c, tau)):
                        return _QuadValue.apply(self.C, self.c, tau)[0]
                    return native.quad_value(self.C, self.c, tau)
                return (0.5 * matvec(self.C, tau, sym=True) + self.c).mul(tau).sum(-1)
            extra = tau.shape[:-3]  # leading dims beyond [B, T] (e.g. line-search steps)
            t = tau.reshape(-1, *tau.shape[-3:]).permute(1, 2, 0, 3)  # [B, T, k, p]
            quad = ((t @ self.C) * t).sum(-1).permute(2, 0, 1)  # [k, B, T]; C symmetric
            lin = (tau * self.c).sum(-1)
            return 0.5 * quad.reshape(*extra, *quad.shape[1:]) + lin
        return _rows(self.raw, x, u)

    def quadratize(self, x: Tensor, u: Tensor,
                   create_graph: bool = False) -> tuple[Tensor, Tensor]:
        """Exact Hessian ``[B, T, p, p]`` and gradient ``[B, T, p]`` of the stage costs at (x, u).

        A non-convex Hessian is returned as is; ``clip_eigenvalues`` makes it positive definite.
        """
        tau = torch.cat([x, u], -1)
        if self.quadratic:
            return self.C, matvec(self.C, tau, sym=True) + self.c
        n, p, lead = self.n, self.n + self.m, tau.shape[:-1]
        _, g, H = batch_hessian(lambda z: self.raw(z[:, :n], z[:, n:]), tau.reshape(-1, p),
                                create_graph)
        H = 0.5 * (H + H.mT)
        return H.reshape(*lead, p, p), g.reshape(*lead, p)


def clip_eigenvalues(H: Tensor, floor: float) -> Tensor:
    """Symmetric ``H [..., p, p]`` with eigenvalues below ``floor`` raised to ``floor``.

    Only matrices that need it are decomposed.
    """
    L, info = torch.linalg.cholesky_ex(H - floor * torch.eye(H.shape[-1], dtype=H.dtype,
                                                             device=H.device))
    bad = info != 0
    if not bool(bad.any()):
        return H
    w, Q = torch.linalg.eigh(H[bad])
    fixed = (Q * w.clamp_min(floor).unsqueeze(-2)) @ Q.mT
    return H.index_put((bad,), fixed)
