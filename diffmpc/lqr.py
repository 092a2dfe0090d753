"""Batched time-varying LQR: the Riccati recursion and rollouts, in deviation coordinates.

Notation (the package's): B batch, T horizon, n state, m control, p = n + m.
The problem solved by ``riccati`` + ``rollout_affine`` is

    minimize    sum_t 1/2 dtau_t' C_t dtau_t + c_t' dtau_t,        dtau_t = [dx_t; du_t]
    subject to  dx_{t+1} = F_t dtau_t + d_t,   dx_0 given,
                lower_t <= du_t <= upper_t   (box mode) or du_t[~free_t] = 0 (fixed-set mode)

Box mode is one backward pass of control-limited DDP (Tassa et al. 2014): the control QP of each
step is solved by ``boxqp.box_qp`` and the feedback acts on the free controls only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffmpc import native
from diffmpc.boxqp import box_qp, free_masks, masked_cholesky
from diffmpc.parallel import affine_suffix, gains_from_values, prefix_products, value_scan

__all__ = ["Gains", "compiled_pass", "riccati", "raw_scalar_pass", "held_pass", "multipliers",
           "feedforward", "rollout_affine", "costate", "time_major"]

_CH_MAX_BYTES = 2**24  # riccati materializes Ch up to this size (16 MB)
_SOA_MIN_BATCH = 16  # one-control passes on a CPU store their steps batch-last from this batch


@dataclass
class Gains:
    """Result of the Riccati pass.

    Attributes:
        K: ``[B, T, m, n]`` feedback gains.
        k: ``[B, T, m]`` feedforward terms.
        free: ``[B, T, m]`` bool, controls not held at a bound (all True if unconstrained).
        dV: ``[B, 2]`` expected cost change coefficients: a step alpha changes the cost by
            ``alpha * dV[:, 0] + alpha**2 * dV[:, 1]``; None unless the pass was asked for it.
        ok: ``[B]`` bool, every control Hessian was positive definite.
        L: ``[B, T, m, m]`` Cholesky factors of the control Hessians restricted to the free
            controls (identity elsewhere), or None.
        Fh: ``[T-1, B, n+1, p+1]`` the pass's dynamics in homogeneous, time-major form
            (``homogeneous_dynamics``), or None; the rollout and costate passes reuse it.
        parallel: made by the time-parallel pass; ``rollout_affine`` and ``feedforward`` then
            scan over time too.
        V: ``[T, B, n, n+1]`` the value functions ``[J_t | r_t]`` of a time-parallel pass
            (``V_t(x) = 1/2 x' J_t x + r_t' x``), or None: along the pass's own solution the
            costate is their gradient, ``lam_t = J_t x_t + r_t``.
    """

    K: Tensor
    k: Tensor
    free: Tensor
    dV: Tensor | None
    ok: Tensor
    L: Tensor | None = None
    Fh: Tensor | None = None
    parallel: bool = False
    V: Tensor | None = None


def _floor_pd(Quu: Tensor, floor: Tensor) -> Tensor:
    """``Quu [B, m, m]`` with eigenvalues below ``floor [B]`` raised to it (only where needed)."""
    if Quu.shape[-1] == 1:
        return torch.maximum(Quu, floor[:, None, None])
    eye = torch.eye(Quu.shape[-1], dtype=Quu.dtype, device=Quu.device)
    _, info = torch.linalg.cholesky_ex(Quu - floor[:, None, None] * eye)
    bad = info != 0
    if not bool(bad.any()):
        return Quu
    w, Q = torch.linalg.eigh(Quu[bad])
    fixed = (Q * torch.maximum(w, floor[bad, None]).unsqueeze(-2)) @ Q.mT
    return Quu.index_put((bad,), fixed)


def _control_step(Quu, R, t, lower, upper, free):
    """Gains at one step from ``Quu [B, m, m]`` and ``R = [qu | Qux] [B, m, n+1]``.

    Returns ``Kh = [k | K] [B, m, n+1]``, free ``[B, m]``, info ``[B]`` and the Cholesky factor.
    """
    if lower is not None:
        # start at du = 0, the current controls (feasible): their active set is a good guess,
        # exact once the iterations settle
        qp = box_qp(Quu, R[..., 0], lower[:, t], upper[:, t], x0=torch.zeros_like(R[..., 0]))
        f = qp.free
        L, info = masked_cholesky(Quu, f)
        K = torch.cholesky_solve(R[..., 1:] * f.unsqueeze(-1), L)
        return torch.cat([qp.x.unsqueeze(-1), K.neg()], -1), f, info, L
    if free is not None:
        f = free[:, t]
        L, info = masked_cholesky(Quu, f)
        R = R * f.unsqueeze(-1)
    else:
        f = torch.ones_like(R[..., 0], dtype=torch.bool)
        L, info = torch.linalg.cholesky_ex(Quu)
    return torch.cholesky_solve(R, L).neg(), f, info, L


def _ch_bytes(C: Tensor) -> int:
    """Bytes of ``homogeneous_cost`` for ``C [B, T, p, p]``: ``B T (p+1)^2`` numbers."""
    B, T, p = C.shape[0], C.shape[1], C.shape[-1]
    return B * T * (p + 1) ** 2 * C.element_size()


def reusable_cost(C: Tensor) -> bool:
    """Whether ``homogeneous_cost`` of ``C [B, T, p, p]`` may be kept for several passes: up to
    ``_CH_MAX_BYTES`` or twice what C's own storage holds (a C broadcast from one matrix holds
    little)."""
    return _ch_bytes(C) <= max(_CH_MAX_BYTES, 2 * C.untyped_storage().nbytes())


def stores_batch_last(C: Tensor, n: int, parallel: bool = False, small: bool | None = None
                      ) -> bool:
    """Whether ``riccati`` stores ``Ch`` and ``Fh`` batch-last for ``C [B, T, p, p]``: one
    control (p = n + 1) on a CPU batch of at least ``_SOA_MIN_BATCH``, in a sequential pass with
    Ch materialized (``small``: Ch given, or at most ``_CH_MAX_BYTES``; None: the latter)."""
    if small is None:
        small = _ch_bytes(C) < _CH_MAX_BYTES
    return (C.shape[-1] - n == 1 and not C.is_cuda and C.shape[0] >= _SOA_MIN_BATCH
            and not parallel and small)


def _fresh(ref: Tensor, T: int, B: int, rows: int, cols: int, batch_last: bool):
    """Uninitialized storage for ``T`` steps of ``B`` blocks ``[rows, cols]``: ``[T, B, rows,
    cols]``, or ``[T, rows, cols, B]`` if ``batch_last``; and its time-major view ``[T, B, rows,
    cols]`` (the storage itself in the first case)."""
    if batch_last:
        store = ref.new_empty(T, rows, cols, B)
        return store, store.permute(0, 3, 1, 2)
    store = ref.new_empty(T, B, rows, cols)
    return store, store


def homogeneous_cost(C: Tensor, c: Tensor, batch_last: bool = False) -> Tensor:
    """``[[0, c'], [c, C]]``, time-major ``[T, B, p+1, p+1]``: the cost ``1/2 tau' C tau + c' tau``
    as the quadratic form ``1/2 [1; tau]' Ch [1; tau]``. ``batch_last``: stored ``[T, p+1, p+1,
    B]`` instead (``_scalar_riccati``'s storage on CPU batches)."""
    B, T, p = C.shape[0], C.shape[1], C.shape[-1]
    if native.handles(C, c) and c.shape == C.shape[:3]:
        return native.homogeneous_cost(C, c, batch_last)
    store, out = _fresh(C, T, B, p + 1, p + 1, batch_last)
    out[..., 1:, 1:] = C.transpose(0, 1)
    ct = c.transpose(0, 1)
    out[..., 0, 1:] = ct
    out[..., 1:, 0] = ct
    out[..., 0, 0] = 0.0
    return store


def homogeneous_dynamics(F: Tensor, d: Tensor | None, batch_last: bool = False) -> Tensor:
    """``[[1, 0], [d, F]]``, time-major ``[T-1, B, n+1, p+1]``: ``[1; x'] = Fh [1; x; u]``.
    ``batch_last``: stored ``[T-1, n+1, p+1, B]`` instead (as ``homogeneous_cost``)."""
    B, T1, n, p = F.shape
    if native.handles(F, d) and (d is None or d.shape == F.shape[:3]):
        return native.homogeneous(F, d, batch_last)
    store, out = _fresh(F, T1, B, n + 1, p + 1, batch_last)
    out[..., 1:, 1:] = F.transpose(0, 1)
    out[..., 0, :] = 0.0
    out[..., 0, 0] = 1.0
    out[..., 1:, 0] = 0.0 if d is None else d.transpose(0, 1)
    return store


def compiled_pass(C: Tensor, c: Tensor, n: int, parallel: bool = False) -> bool:
    """Whether ``riccati``'s fixed-set and unconstrained passes on the cost ``(C, c)`` run compiled
    (``diffmpc.native.riccati``): several controls, a sequential pass, and tensors the kernels
    take. Such a pass reads C and c in place; a homogeneous cost would be a wasted copy."""
    return C.shape[-1] - n > 1 and not parallel and native.handles(C, c)


def riccati(
    C: Tensor,
    c: Tensor,
    F: Tensor,
    d: Tensor | None = None,
    lower: Tensor | None = None,
    upper: Tensor | None = None,
    free: Tensor | None = None,
    reg: Tensor | None = None,
    uu_floor: Tensor | None = None,
    expected: bool = True,
    Fh: Tensor | None = None,
    Ch: Tensor | None = None,
    parallel: bool = False,
    batch_last: bool = False,
) -> Gains:
    """Backward Riccati recursion.

    Args:
        C: ``[B, T, p, p]`` cost Hessians.
        c: ``[B, T, p]`` cost gradients (linear terms).
        F: ``[B, T-1, n, p]`` dynamics Jacobians.
        d: ``[B, T-1, n]`` dynamics offsets (defects), or None for zero.
        lower, upper: ``[B, T, m]`` bounds on du (box mode), or None.
        free: ``[B, T, m]`` bool, fixed free set (fixed-set mode), or None.
        reg: ``[B]`` Levenberg-Marquardt term added to each control Hessian, or None.
        uu_floor: ``[B]``: if given, every control Hessian ``Q_uu`` has its eigenvalues raised to
            at least this floor, and the recursion goes on with the modified (convex) model.
        expected: compute ``dV``, the step's predicted cost change (line searches need it; a
            solve that takes the full step does not, and its per-step blocks of ``Q_uu`` and
            ``q_u`` are then not gathered).
        Fh: ``homogeneous_dynamics(F, d)``, if the caller has it already (repeated passes on the
            same dynamics); F then gives only the sizes, and d is ignored.
        Ch: ``homogeneous_cost(C, c)``, if the caller has it (C and c are then ignored); else it
            is formed here when small enough.
        batch_last: the given ``Fh`` and ``Ch`` are stored batch-last (``homogeneous_cost(...,
            batch_last=True)``); only where the pass stores them so (``stores_batch_last``), which
            saves it a copy of each.
        parallel: in fixed-set or unconstrained mode without ``reg`` and ``uu_floor``, compute
            the recursion as a scan over time (``diffmpc.parallel``: about log2 T levels of
            operations instead of T steps); it needs each ``C_uu`` positive definite on the free
            controls and falls back to the sequential recursion where one is not.

    Returns:
        Gains (K, k, L are batch-first views of time-major storage).

    The recursion runs in homogeneous coordinates ``[1; x]`` (``homogeneous_cost``,
    ``homogeneous_dynamics``): ``Qh = Ch_t + Fh_t' Vh Fh_t`` (two products; on large problems
    C_t and c_t are added in place instead of materializing Ch) gives Q and q together, one
    solve gives ``[k | K]``, and one product the value ``Vh = [[., v'], [v, V]]``.

    On a CPU the sequential pass runs compiled where ``diffmpc.native`` handles the tensors:
    fixed-set and unconstrained passes of several controls (``native.riccati``) and every
    one-control pass (``native.scalar_riccati``); box mode, regularization and floors with
    several controls, and passes that autograd records, use PyTorch operations.
    """
    B, T, p, _ = C.shape
    n = F.shape[-2]
    # small problems: Ch for all steps at once (one fused product per step); large ones: C_t and
    # c_t added per step (Ch would be a fresh, page-faulted block of memory at every call)
    parallel = parallel and lower is None and reg is None and uu_floor is None
    small = Ch is not None or _ch_bytes(C) < _CH_MAX_BYTES
    # one control on a CPU batch: the scalar pass stores its steps batch-last (_scalar_step_q),
    # Ch and Fh built so (or copied so, if the caller has them)
    soa = stores_batch_last(C, n, parallel, small)
    if batch_last and not soa:
        raise ValueError("riccati: batch_last=True needs a pass that stores its steps batch-last "
                         "(stores_batch_last), got one that does not")
    use_native = (compiled_pass(C, c, n, parallel) and lower is None and uu_floor is None
                  and (reg is None or not bool(reg.any())) and native.handles(C, F, d, Fh, Ch))
    if Fh is None and T > 1:
        Fh = homogeneous_dynamics(F, d, batch_last=soa)
    elif soa and Fh is not None and not batch_last:
        Fh = Fh.permute(0, 2, 3, 1).contiguous()
    if use_native:
        return _native_riccati(C, c, Ch, Fh, free, n, expected)
    if Ch is None and (parallel or small):
        Ch = homogeneous_cost(C, c, batch_last=soa)
    elif soa and not batch_last:
        Ch = Ch.permute(0, 2, 3, 1).contiguous()
    if parallel:
        gains = _parallel_riccati(Ch, Fh, n, free, expected)
        if gains is not None:
            return gains
    Khs, frees, infos, qus, Quus, Ls = ([None] * T for _ in range(6))
    # Without regularization K and k minimize the step's model on the free controls, so the value
    # update has the short form Vh = Qh_xx + Qh_xu Kh (whose first column is [.; v]); with it the
    # general form is used.
    short = reg is None or not bool(reg.any())
    if p - n == 1 and Ch is not None:  # one control: a shortcut in vector operations
        return _scalar_riccati(Ch, Fh, n, lower, upper, free, None if short else reg, uu_floor,
                               expected, soa)
    eye = None if reg is None else torch.eye(p - n, dtype=C.dtype, device=C.device)
    Vh = None
    for t in range(T - 1, -1, -1):
        if Ch is not None:
            Q = Ch[t] if Vh is None else torch.baddbmm(Ch[t], Fh[t].mT @ Vh, Fh[t])
        elif Vh is None:
            Q = homogeneous_cost(C[:, t:], c[:, t:])[0]
        else:
            Q = (Fh[t].mT @ Vh) @ Fh[t]
            Q[:, 1:, 1:].add_(C[:, t])
            Q[:, 1:, 0].add_(c[:, t])
        Quu, R = Q[:, n + 1:, n + 1:], Q[:, n + 1:, :n + 1]  # R = [qu | Qux]
        if uu_floor is not None:
            Quu = _floor_pd(Quu, uu_floor)
        if reg is None:
            Quu_r = Quu
        else:
            Quu_r = Quu + reg[:, None, None] * eye
        Kh, f, info, L = _control_step(Quu_r, R, t, lower, upper, free)
        Vh = torch.baddbmm(Q[:, :n + 1, :n + 1], Q[:, :n + 1, n + 1:], Kh)
        if not short:
            Vh = Vh + Kh.mT @ torch.baddbmm(R, Quu, Kh)
        Khs[t], frees[t], qus[t], Quus[t] = Kh, f, R[..., 0], Quu
        infos[t], Ls[t] = info, L
    Kh = torch.stack(Khs).transpose(0, 1)  # [B, T, m, n+1], time-major in memory
    K, k = Kh[..., 1:], Kh[..., 0]
    free = torch.stack(frees, 1)
    dV = None
    if expected:
        qu, Quu = torch.stack(qus, 1), torch.stack(Quus, 1)
        Quu_k = (Quu @ k.unsqueeze(-1)).squeeze(-1)
        dV = torch.stack([(k * qu).flatten(1).sum(-1), 0.5 * (k * Quu_k).flatten(1).sum(-1)], -1)
    L = torch.stack(Ls).transpose(0, 1)
    ok = (torch.stack(infos, 1) == 0).all(1)
    return Gains(K, k, free, dV, ok, L, Fh)


def _native_riccati(C, c, Ch, Fh, free, n, expected) -> Gains:
    """``riccati`` by the compiled pass (``diffmpc.native.riccati``), reading C and c (or Ch) and
    Fh in place; the same results as the sequential pass to rounding."""
    if Ch is not None:
        Cb = Ch.transpose(0, 1)
        C, c = Cb[..., 1:, 1:], Cb[..., 1:, 0]
    gains = _compiled_gains(C, c, Fh, free, n, expected)[0]
    if free is None:  # all free (the kernel was told None: no masks to apply)
        gains.free = torch.ones(gains.k.shape, dtype=torch.bool, device=C.device)
    return gains


def _compiled_gains(C, c, Fh, free, n, expected, held=None) -> tuple[Gains, Tensor | None]:
    """The compiled pass's gains (batch-first views of its time-major outputs) and, where
    ``held`` is given, its control rows of ``[Q | q]`` (``native.riccati(..., rows=True)``)."""
    Kh, L, info, dV, Qu = native.riccati(C, c, None if Fh is None else Fh.transpose(0, 1), free,
                                         n, expected, held=held, rows=held is not None)
    Kh, L = Kh.transpose(0, 1), L.transpose(0, 1)
    return Gains(Kh[..., 1:], Kh[..., 0], free, dV, (info == 0).all(0), L, Fh), Qu


def held_pass(C: Tensor, c: Tensor, Fh: Tensor | None, free: Tensor, held: Tensor
              ) -> tuple[Gains, Tensor]:
    """A compiled fixed-set pass (``compiled_pass`` must hold) whose held controls sit at the
    values ``held [B, T, m]`` (``~free``; the free entries, multiplied by zero, must be finite)
    rather than at zero.

    Args:
        C, c: the cost ``[B, T, p, p]``, ``[B, T, p]`` (absolute coordinates, tau = 0).
        Fh: ``[T-1, B, n+1, p+1]`` homogeneous dynamics with their offsets, or None if T = 1.
        free: ``[B, T, m]`` bool.
        held: ``[B, T, m]``.

    Returns:
        The gains, whose ``k`` rows of the held controls are their values (``rollout_affine``
        gives every control), and the control rows of each step's ``[Q | q]`` (in the kernel's
        storage), for ``multipliers``.
    """
    return _compiled_gains(C, c, Fh, free, C.shape[-1] - free.shape[-1], False, held)


def multipliers(Qu: Tensor, x: Tensor, u: Tensor) -> Tensor:
    """``[B, T, m]``: the gradient of the Lagrangian in u along ``held_pass``'s solution (x, u),
    ``Q_u,t [x_t; u_t] + q_u,t`` with the pass's rows ``Qu`` (the costate is the gradient of
    the value function): zero on the free controls up to rounding, the bounds' multipliers on
    the held ones."""
    return native.multipliers(Qu, x, u)


def _parallel_riccati(Ch, Fh, n, free, expected) -> Gains | None:
    """``riccati`` in fixed-set or unconstrained mode as a scan over time; None if the
    elimination of some step's controls failed (``value_scan``)."""
    T, B = Ch.shape[:2]
    free = (torch.ones(T, B, Ch.shape[-1] - n - 1, dtype=torch.bool, device=Ch.device)
            if free is None else free.transpose(0, 1))
    mask = free_masks(free, Ch.dtype)
    G, ok = value_scan(Ch, Fh, free, n, mask)
    if not bool(ok.all()):
        return None
    Kh, L, info, Quu, qu = gains_from_values(Ch, Fh, G, free, n, mask)
    Kh, free = Kh.transpose(0, 1), free.transpose(0, 1)
    K, k = Kh[..., 1:], Kh[..., 0]
    dV = None
    if expected:
        Quu_k = (Quu @ k.transpose(0, 1).unsqueeze(-1)).squeeze(-1).transpose(0, 1)
        dV = torch.stack([(k * qu.transpose(0, 1)).flatten(1).sum(-1),
                          0.5 * (k * Quu_k).flatten(1).sum(-1)], -1)
    return Gains(K, k, free, dV, (info == 0).all(0), L.transpose(0, 1), Fh, True, G)


def _scalar_step_q(Ct: Tensor, Ft: Tensor | None, Vh: Tensor | None, soa: bool,
                   work: tuple[Tensor, ...] = ()) -> Tensor:
    """A step's ``Qh = Ch_t + Fh_t' Vh Fh_t`` as ``[p+1, p+1, B]`` (batch last), from the step's
    ``Ct``, ``Ft`` and the next value ``Vh [n+1, n+1, B]``.

    ``soa``: the operands are stored batch-last, and the products are broadcast multiplications
    and sums over contiguous rows of B numbers. On a CPU that is several times faster than
    ``bmm`` on matrices of a few rows (which runs a scalar loop per matrix there). Otherwise they
    are batch-first (``[B, ., .]``): one ``baddbmm`` pair, returned as a batch-last view.
    ``work``: the batch-last products' buffers ``[n+1, p+1, n+1, B]``, ``[p+1, n+1, B]`` and
    ``[p+1, n+1, p+1, B]``, or none where autograd records the pass.
    """
    if Vh is None:
        return Ct if soa else Ct.permute(1, 2, 0)
    if soa:
        # the products' terms go to the pass's workspace (fresh blocks of this size would be
        # page-faulted memory at every step)
        if not work:  # recorded for autograd (unrolled gradients): no out= buffers
            FV = (Ft.unsqueeze(2) * Vh.unsqueeze(1)).sum(0)
            return (FV.unsqueeze(2) * Ft.unsqueeze(0)).sum(1) + Ct
        t1, FV, t2 = work
        torch.sum(torch.mul(Ft.unsqueeze(2), Vh.unsqueeze(1), out=t1), 0, out=FV)  # Fh' Vh
        return torch.mul(FV.unsqueeze(2), Ft.unsqueeze(0), out=t2).sum(1).add_(Ct)
    return torch.baddbmm(Ct, Ft.mT @ Vh.permute(2, 0, 1), Ft).permute(1, 2, 0)


def _scalar_riccati(Ch, Fh, n, lower, upper, free, reg, uu_floor, expected, soa) -> Gains:
    """``riccati`` for one control, with ``Ch`` materialized: each step's control Hessian is a
    number per sample, so the step works on ``[B]`` and ``[n+1, B]`` vectors in about half the
    operations of the general step (at small batches each costs its dispatch, and nonlinear
    solves of one-control systems run this recursion every iteration). Same results.

    The step's vectors and matrices are indexed batch-last. ``soa``: they are also stored so
    (``_scalar_step_q``): ``Ch [T, p+1, p+1, B]``, ``Fh [T-1, n+1, p+1, B]``; the gains then
    carry Fh as a time-major view of that storage.
    """
    T, B = Ch.shape[0], Ch.shape[-1] if soa else Ch.shape[1]
    if native.handles(Ch, Fh, lower, upper, reg, uu_floor):
        return _native_scalar_riccati(Ch, Fh, n, lower, upper, free, reg, uu_floor, expected,
                                      soa)
    Chs, Fhs, work = Ch.unbind(0), None, ()
    if Fh is not None:
        Fhs = Fh.unbind(0)
        taped = torch.is_grad_enabled() and any(z.requires_grad for z in (Ch, Fh, lower, upper,
                                                                           reg, uu_floor)
                                                 if z is not None)
        if soa and not taped:
            q, v = Fh.shape[2], n + 1  # p+1, n+1 (Fh stored [T-1, n+1, p+1, B])
            work = (Fh.new_empty(v, q, v, B), Fh.new_empty(q, v, B), Fh.new_empty(q, v, q, B))
    los = his = None
    if lower is not None:
        los, his = lower[..., 0].unbind(1), upper[..., 0].unbind(1)
    frees_in = free[..., 0].unbind(1) if free is not None and lower is None else None
    every = torch.ones(B, dtype=torch.bool, device=Ch.device)
    khs, frees, qus, hs, h_rs = ([None] * T for _ in range(5))
    Vh = None
    for t in range(T - 1, -1, -1):
        Q = _scalar_step_q(Chs[t], None if Vh is None else Fhs[t], Vh, soa, work)
        h, r = Q[-1, -1], Q[-1, :-1]  # Quu [B]; [qu; Qux] [n+1, B]
        if uu_floor is not None:
            h = torch.maximum(h, uu_floor)
        h_r = h if reg is None else h + reg
        kh = r / h_r.neg()  # [k; K] where the control is free
        if los is not None:  # the box QP in one variable: clip the unconstrained minimizer
            k_free = kh[0]
            k = torch.clamp(k_free, los[t], his[t])
            f = k == k_free
        else:
            f = None if frees_in is None else frees_in[t]
        if f is not None:  # held controls: no feedback (and no division by their curvature)
            kh = torch.where(f, kh, 0.0)
            if los is not None:
                kh[0] = k
        Vh = torch.addcmul(Q[:n + 1, :n + 1], Q[:n + 1, -1:], kh.unsqueeze(0))
        if reg is not None:  # the general value update: + Kh' (R + Quu Kh)
            Vh.addcmul_(kh.unsqueeze(1), torch.addcmul(r, h, kh).unsqueeze(0))
        khs[t], frees[t], qus[t], hs[t], h_rs[t] = kh.T, every if f is None else f, r[0], h, h_r
    qu, h, h_r = (torch.stack(v, 1) for v in (qus, hs, h_rs))  # [B, T]
    # [B, T, n+1], time-major in memory
    return _scalar_gains(torch.stack(khs).transpose(0, 1), torch.stack(frees, 1), qu, h, h_r,
                         los is not None, expected, soa, Fh)


def _scalar_gains(Kh, free, qu, h, h_r, box, expected, soa, Fh) -> Gains:
    """Gains of a one-control pass from its per-step ``Kh = [k | K] [B, T, n+1]``, free set,
    ``q_u``, floored and regularized curvatures ``[B, T]`` (``box``: the pass clipped)."""
    Kh = Kh.unsqueeze(2)  # [B, T, 1, n+1]
    K, k = Kh[..., 1:], Kh[..., 0]
    kk = k[..., 0]
    dV = torch.stack([(kk * qu).sum(-1), 0.5 * (kk * h * kk).sum(-1)], -1) if expected else None
    L = torch.where(free, h_r.clamp_min(0).sqrt(), 1.0)[..., None, None]
    # a held control needs no curvature, unless the box held it: clipping the stationary point
    # of a concave step model does not minimize it
    need = torch.ones_like(free) if box else free
    ok = ~(need & (h_r <= 0)).any(-1)
    if soa and Fh is not None:
        Fh = Fh.permute(0, 3, 1, 2)
    return Gains(K, k, free.unsqueeze(-1), dV, ok, L, Fh)


def _native_scalar_riccati(Ch, Fh, n, lower, upper, free, reg, uu_floor, expected, soa
                           ) -> Gains:
    """``_scalar_riccati`` by the compiled pass (``diffmpc.native.scalar_riccati``), reading Ch
    and Fh in place in either storage; the same gains and flags to rounding."""
    # [b, t, row, column] views of batch-first [T, B, r, c] or batch-last [T, r, c, B] storage
    bt = (lambda z: z.permute(3, 0, 1, 2)) if soa else (lambda z: z.transpose(0, 1))  # noqa: E731
    first = (lambda z: None if z is None else z[..., 0])  # noqa: E731
    Kh, f, qu, h, h_r = native.scalar_riccati(
        bt(Ch), None if Fh is None else bt(Fh), n, first(lower), first(upper),
        None if lower is not None else first(free), reg, uu_floor)
    Kh, f, qu, h, h_r = (z.transpose(0, 1) for z in (Kh, f, qu, h, h_r))  # batch-first views
    return _scalar_gains(Kh, f, qu, h, h_r, lower is not None, expected, soa, Fh)


def raw_scalar_pass(C: Tensor, c: Tensor, F: Tensor, lower: Tensor | None,
                    upper: Tensor | None, reg: Tensor | None = None,
                    uu_floor: Tensor | None = None, blocks: tuple[Tensor, int] | None = None,
                    newton: Tensor | None = None) -> Gains | None:
    """``riccati(C, c, F, None, lower, upper, None, reg, uu_floor)`` for one control, compiled on
    the raw operands (``native.scalar_riccati_raw``: no homogeneous copies of C, c and F, which
    an iLQR iteration would otherwise make for every pass), or None where the kernels cannot
    take them. ``blocks``: curvature blocks ``(Hb [T-1, 4, 4, B], first)``
    (``TrajDynamics.curvature_blocks``) added to C for the samples flagged in ``newton [B]``
    (all if None). The gains carry no Fh."""
    B, T, p = c.shape
    n = F.shape[-2]
    Hb, first = blocks if blocks is not None else (None, 0)
    if p - n != 1 or not native.handles(C, c, F, lower, upper, reg, uu_floor, Hb, newton):
        return None
    reg = None if reg is None or not bool(reg.any()) else reg  # as riccati's short form
    last = (lambda z: None if z is None else z[..., 0])  # noqa: E731
    out = native.scalar_riccati_raw(C, c, F if T > 1 else None, last(lower), last(upper), reg,
                                    uu_floor, Hb, first, newton)
    Kh, f, qu, h, h_r = (z.transpose(0, 1) for z in out)  # batch-first views
    return _scalar_gains(Kh, f, qu, h, h_r, lower is not None, True, False, None)


def feedforward(gains: Gains, c: Tensor) -> Gains:
    """Gains for a new linear term ``c [B, T, p]``, reusing the matrices of an earlier pass.

    Valid when the earlier ``riccati`` pass had the same C and F, no regularization and no
    bounds (fixed-set or unconstrained mode with ``gains.free``): the matrix recursion does not
    depend on c, and with ``Q_uu k = -q_u`` on the free controls the value update is
    ``v = q_x + K' q_u``. Only vector operations remain, and the solves for k are batched.
    Gains of a time-parallel pass give gains of the same kind (a scan over time).
    """
    if gains.parallel:
        return _parallel_feedforward(gains, c)
    T, n = c.shape[1], gains.K.shape[-1]
    if (gains.Fh is not None or T == 1) and native.handles(c, gains.K, gains.L, gains.Fh):
        Fh = None if gains.Fh is None else gains.Fh.transpose(0, 1)
        k = native.feedforward(c, Fh, gains.K, gains.free, gains.L)
        return Gains(gains.K, k, gains.free, None, gains.ok, gains.L, gains.Fh)
    qus = [None] * T
    v = None
    for t in range(T - 1, -1, -1):
        q = c[:, t] if v is None else torch.baddbmm(
            c[:, t].unsqueeze(-1), gains.Fh[t, :, 1:, 1:].mT, v.unsqueeze(-1)).squeeze(-1)
        qus[t] = qu = q[:, n:] * gains.free[:, t]
        v = torch.baddbmm(q[:, :n].unsqueeze(-1), gains.K[:, t].mT, qu.unsqueeze(-1)).squeeze(-1)
    k = -torch.cholesky_solve(torch.stack(qus, 1).unsqueeze(-1), gains.L).squeeze(-1)
    return Gains(gains.K, k, gains.free, None, gains.ok, gains.L, gains.Fh)


def _parallel_feedforward(gains: Gains, c: Tensor) -> Gains:
    """``feedforward`` as a scan: ``v_t = c_x + K' c_u + (F_x + F_u K)' v_{t+1}``, the same
    recursion with the closed-loop dynamics, then ``q_u`` and k of every step at once."""
    n = gains.K.shape[-1]
    ct, Kt = c.transpose(0, 1), gains.K.transpose(0, 1)  # [T, B, p], [T, B, m, n]
    cx, cu = ct[..., :n], ct[..., n:]
    qu = cu
    if ct.shape[0] > 1:
        Fu = gains.Fh[..., 1:, n + 1:]
        Mcl = torch.baddbmm(gains.Fh[..., 1:, 1:n + 1].flatten(0, 1), Fu.flatten(0, 1),
                            Kt[:-1].flatten(0, 1)).unflatten(0, Fu.shape[:2])
        v = affine_suffix(cx + (Kt.mT @ cu.unsqueeze(-1)).squeeze(-1), Mcl.mT)
        qu = qu + torch.nn.functional.pad((Fu.mT @ v[1:].unsqueeze(-1)).squeeze(-1),
                                          (0, 0, 0, 0, 0, 1))
    qu = qu.transpose(0, 1) * gains.free
    k = -torch.cholesky_solve(qu.unsqueeze(-1), gains.L).squeeze(-1)
    return Gains(gains.K, k, gains.free, None, gains.ok, gains.L, gains.Fh, True)


def _parallel_rollout(gains: Gains, dx0: Tensor, offsets: bool) -> tuple[Tensor, Tensor]:
    """``rollout_affine`` as a scan: the closed-loop maps ``[1; x_{t+1}] = Acl_t [1; x_t]``,
    ``Acl_t = Fh_t [I; Kh_t]``, and their prefix products applied to ``[1; dx0]``."""
    n = dx0.shape[-1]
    Kh = torch.cat([gains.k.unsqueeze(-1), gains.K], -1).transpose(0, 1)  # [T, B, m, n+1]
    xh0 = torch.cat([torch.ones_like(dx0[:, :1]), dx0], -1)
    xh = xh0.unsqueeze(0)
    if Kh.shape[0] > 1:
        Fh = gains.Fh
        Acl = torch.baddbmm(Fh[..., :n + 1].flatten(0, 1), Fh[..., n + 1:].flatten(0, 1),
                            Kh[:-1].flatten(0, 1)).unflatten(0, Fh.shape[:2])
        if not offsets:
            Acl[..., 1:, 0].sub_(Fh[..., 1:, 0])
        X = (prefix_products(Acl) @ xh0.unsqueeze(-1)).squeeze(-1)
        xh = torch.cat([xh, X])  # [T, B, n+1]
    us = (Kh @ xh.unsqueeze(-1)).squeeze(-1)
    return xh[..., 1:].transpose(0, 1), us.transpose(0, 1)


def rollout_affine(gains: Gains, dx0: Tensor, offsets: bool = True) -> tuple[Tensor, Tensor]:
    """Roll the Riccati pass's linear dynamics forward under ``du_t = K_t dx_t + k_t``.

    Args:
        gains: from ``riccati`` (its ``Fh``: the dynamics ``F`` and offsets ``d``).
        dx0: ``[B, n]``.
        offsets: add the offsets d (False: ``dx_{t+1} = F_t [dx_t; du_t]``).

    Returns:
        dx ``[B, T, n]``, du ``[B, T, m]``.
    """
    if gains.parallel:
        return _parallel_rollout(gains, dx0, offsets)
    T = gains.k.shape[1]
    if (gains.Fh is not None or T == 1) and native.handles(dx0, gains.K, gains.k, gains.Fh):
        Fh = None if gains.Fh is None else gains.Fh.transpose(0, 1)
        return native.rollout(gains.K, gains.k, Fh, dx0, offsets)
    one = dx0.new_ones(dx0.shape[0], 1) if offsets else dx0.new_zeros(dx0.shape[0], 1)
    xs, us = [], []
    x = dx0
    for t in range(T):
        u = torch.baddbmm(gains.k[:, t].unsqueeze(-1), gains.K[:, t], x.unsqueeze(-1)).squeeze(-1)
        xs.append(x)
        us.append(u)
        if t < T - 1:
            x = (gains.Fh[t, :, 1:] @ torch.cat([one, x, u], -1).unsqueeze(-1)).squeeze(-1)
    return torch.stack(xs, 1), torch.stack(us, 1)


def time_major(A: Tensor) -> Tensor:
    """``[B, T, ...]`` -> contiguous ``[T, B, ...]``, so that ``A[t]`` is one block of memory."""
    return A.transpose(0, 1).contiguous()


def costate(gx: Tensor, Fx: Tensor | None, parallel: bool = False) -> Tensor:
    """Multipliers of the dynamics constraints from stationarity in x.

    ``lam_{T-1} = gx_{T-1}``, ``lam_t = gx_t + Fx_t' lam_{t+1}``: with the Lagrangian
    ``cost + lam_0'(x_init - x_0) + sum_t lam_{t+1}'(f(x_t, u_t) - x_{t+1})``.

    Args:
        gx: ``[B, T, n]`` gradient of the (Lagrangian's) cost terms w.r.t. x_t.
        Fx: ``[T-1, B, n, n]`` state Jacobians of the dynamics, time-major (``time_major``,
            ``gains.Fh[:, :, 1:, 1:n+1]``, or a view such as ``F[..., :n].transpose(0, 1)``,
            which the compiled pass reads in place and the others copy); None if T = 1.
        parallel: as a scan over time (``affine_suffix``).

    Returns:
        lam ``[B, T, n]``.
    """
    T = gx.shape[1]
    if not parallel and native.handles(gx, Fx) and (Fx is not None or T == 1):
        return native.costate(gx, None if Fx is None else Fx.transpose(0, 1))
    Fx = None if Fx is None else Fx.contiguous()
    if parallel and Fx is not None:
        return _parallel_costate(gx, Fx)
    # the steps' operands as views made in one call each (a view per step and operand costs its
    # dispatch, as much as the product at small sizes); lam kept as [B, n, 1] columns
    gxs = gx.unsqueeze(-1).unbind(1)
    lam = [None] * T
    lam[T - 1] = gxs[T - 1]
    if T > 1:
        FxT = Fx.mT.unbind(0)
        for t in range(T - 2, -1, -1):
            lam[t] = torch.baddbmm(gxs[t], FxT[t], lam[t + 1])
    return torch.stack(lam, 1).squeeze(-1)


def _parallel_costate(gx: Tensor, Fx: Tensor) -> Tensor:
    """``costate`` as a scan over time (``affine_suffix`` of the maps ``lam -> gx + Fx' lam``)."""
    return affine_suffix(gx.transpose(0, 1), Fx.mT).transpose(0, 1)
