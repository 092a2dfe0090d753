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

from diffmpc.boxqp import box_qp, masked_cholesky

__all__ = ["Gains", "riccati", "feedforward", "rollout_affine", "costate"]


@dataclass
class Gains:
    """Result of the Riccati pass.

    Attributes:
        K: ``[B, T, m, n]`` feedback gains.
        k: ``[B, T, m]`` feedforward terms.
        free: ``[B, T, m]`` bool, controls not held at a bound (all True if unconstrained).
        dV: ``[B, 2]`` expected cost change coefficients: a step alpha changes the cost by
            ``alpha * dV[:, 0] + alpha**2 * dV[:, 1]``.
        ok: ``[B]`` bool, every control Hessian was positive definite.
        L: ``[B, T, m, m]`` Cholesky factors of the control Hessians restricted to the free
            controls (identity elsewhere), or None.
    """

    K: Tensor
    k: Tensor
    free: Tensor
    dV: Tensor
    ok: Tensor
    L: Tensor | None = None


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


def _control_step(Quu, Qux, qu, t, lower, upper, free, reg):
    """Gains at one step: K [B, m, n], k [B, m], free [B, m], info [B], Cholesky factor L."""
    if reg is not None:
        Quu = Quu + reg[:, None, None] * torch.eye(Quu.shape[-1], dtype=Quu.dtype, device=Quu.device)
    if Quu.shape[-1] == 1:
        return _scalar_control_step(Quu, Qux, qu, t, lower, upper, free)
    if lower is not None:
        qp = box_qp(Quu, qu, lower[:, t], upper[:, t])
        f = qp.free
        L, info = masked_cholesky(Quu, f)
        K = -torch.cholesky_solve(Qux * f.unsqueeze(-1), L)
        return K, qp.x, f, info, L
    if free is not None:
        f = free[:, t]
        L, info = masked_cholesky(Quu, f)
        rhs = torch.cat([Qux, qu.unsqueeze(-1)], -1) * f.unsqueeze(-1)
    else:
        f = torch.ones_like(qu, dtype=torch.bool)
        L, info = torch.linalg.cholesky_ex(Quu)
        rhs = torch.cat([Qux, qu.unsqueeze(-1)], -1)
    sol = -torch.cholesky_solve(rhs, L)  # [B, m, n+1]
    return sol[..., :-1], sol[..., -1], f, info, L


def _scalar_control_step(Quu, Qux, qu, t, lower, upper, free):
    """``_control_step`` for one control: divisions instead of factorizations."""
    h = Quu[..., 0]  # [B, 1]
    if lower is not None:
        qp = box_qp(Quu, qu, lower[:, t], upper[:, t])
        f, k = qp.free, qp.x
    else:
        f = torch.ones_like(qu, dtype=torch.bool) if free is None else free[:, t]
    hf = torch.where(f, h, torch.ones_like(h))  # held controls: no division by their curvature
    if lower is None:
        k = -qu * f / hf
    K = -(Qux * f.unsqueeze(-1)) / hf.unsqueeze(-1)
    L = torch.where(f, h.clamp_min(0).sqrt(), torch.ones_like(h)).unsqueeze(-1)  # [B, 1, 1]
    info = (f & (h <= 0)).squeeze(-1).to(torch.int32)
    return K, k, f, info, L


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

    Returns:
        Gains.
    """
    B, T, p, _ = C.shape
    n = F.shape[-2]
    Ks, ks, frees, infos, qus, Quus, Ls = ([None] * T for _ in range(7))
    # Without regularization K and k minimize the step's model on the free controls, so the value
    # update has the short form V = Qxx + Qxu K, v = qx + Qxu k; with it the general form is used.
    short = reg is None or not bool(reg.any())
    V = v = None
    for t in range(T - 1, -1, -1):
        Q, q = C[:, t], c[:, t]
        if V is not None:
            Ft = F[:, t]
            FtV = Ft.mT @ V  # [B, p, n]
            Q = Q + FtV @ Ft
            w = v if d is None else v + (V @ d[:, t].unsqueeze(-1)).squeeze(-1)
            q = q + (Ft.mT @ w.unsqueeze(-1)).squeeze(-1)
        Qxx, Qxu, Qux, Quu = Q[:, :n, :n], Q[:, :n, n:], Q[:, n:, :n], Q[:, n:, n:]
        qx, qu = q[:, :n], q[:, n:]
        if uu_floor is not None:
            Quu = _floor_pd(Quu, uu_floor)
        K, k, f, info, L = _control_step(Quu, Qux, qu, t, lower, upper, free, reg)
        QxuKk = Qxu @ torch.cat([K, k.unsqueeze(-1)], -1)  # [B, n, n+1]
        V, v = Qxx + QxuKk[..., :-1], qx + QxuKk[..., -1]
        if not short:
            V = V + K.mT @ (Qux + Quu @ K)
            v = v + (K.mT @ ((Quu @ k.unsqueeze(-1)).squeeze(-1) + qu).unsqueeze(-1)).squeeze(-1)
        V = 0.5 * (V + V.mT)
        Ks[t], ks[t], frees[t], infos[t], qus[t], Quus[t], Ls[t] = K, k, f, info, qu, Quu, L
    k, qu, Quu = torch.stack(ks, 1), torch.stack(qus, 1), torch.stack(Quus, 1)  # [B, T, ...]
    Quu_k = (Quu @ k.unsqueeze(-1)).squeeze(-1)
    dV = torch.stack([(k * qu).flatten(1).sum(-1), 0.5 * (k * Quu_k).flatten(1).sum(-1)], -1)
    ok = (torch.stack(infos, 1) == 0).all(1)
    return Gains(torch.stack(Ks, 1), k, torch.stack(frees, 1), dV, ok, torch.stack(Ls, 1))


def feedforward(gains: Gains, c: Tensor, F: Tensor) -> Gains:
    """Gains for a new linear term ``c [B, T, p]``, reusing the matrices of an earlier pass.

    Valid when the earlier ``riccati`` pass had the same C and F, no regularization and no
    bounds (fixed-set or unconstrained mode with ``gains.free``): the matrix recursion does not
    depend on c, and with ``Q_uu k = -q_u`` on the free controls the value update is
    ``v = q_x + K' q_u``. Only vector operations remain.
    """
    T, n = c.shape[1], F.shape[-2]
    ks = [None] * T
    v = None
    for t in range(T - 1, -1, -1):
        q = c[:, t] if v is None else c[:, t] + (F[:, t].mT @ v.unsqueeze(-1)).squeeze(-1)
        qx, qu = q[:, :n], q[:, n:] * gains.free[:, t]
        ks[t] = -torch.cholesky_solve(qu.unsqueeze(-1), gains.L[:, t]).squeeze(-1)
        v = qx + (gains.K[:, t].mT @ qu.unsqueeze(-1)).squeeze(-1)
    return Gains(gains.K, torch.stack(ks, 1), gains.free, torch.zeros_like(gains.dV), gains.ok,
                 gains.L)


def rollout_affine(gains: Gains, F: Tensor, d: Tensor | None, dx0: Tensor) -> tuple[Tensor, Tensor]:
    """Roll the linear dynamics forward under ``du_t = K_t dx_t + k_t``.

    Args:
        gains: from ``riccati``.
        F: ``[B, T-1, n, p]``.
        d: ``[B, T-1, n]`` or None.
        dx0: ``[B, n]``.

    Returns:
        dx ``[B, T, n]``, du ``[B, T, m]``.
    """
    T = gains.k.shape[1]
    xs, us = [], []
    x = dx0
    for t in range(T):
        u = (gains.K[:, t] @ x.unsqueeze(-1)).squeeze(-1) + gains.k[:, t]
        xs.append(x)
        us.append(u)
        if t < T - 1:
            x = (F[:, t] @ torch.cat([x, u], -1).unsqueeze(-1)).squeeze(-1)
            if d is not None:
                x = x + d[:, t]
    return torch.stack(xs, 1), torch.stack(us, 1)


def costate(gx: Tensor, Fx: Tensor) -> Tensor:
    """Multipliers of the dynamics constraints from stationarity in x.

    ``lam_{T-1} = gx_{T-1}``, ``lam_t = gx_t + Fx_t' lam_{t+1}``: with the Lagrangian
    ``cost + lam_0'(x_init - x_0) + sum_t lam_{t+1}'(f(x_t, u_t) - x_{t+1})``.

    Args:
        gx: ``[B, T, n]`` gradient of the (Lagrangian's) cost terms w.r.t. x_t.
        Fx: ``[B, T-1, n, n]`` state Jacobians of the dynamics.

    Returns:
        lam ``[B, T, n]``.
    """
    T = gx.shape[1]
    lam = [None] * T
    lam[T - 1] = gx[:, T - 1]
    for t in range(T - 2, -1, -1):
        lam[t] = gx[:, t] + (Fx[:, t].mT @ lam[t + 1].unsqueeze(-1)).squeeze(-1)
    return torch.stack(lam, 1)
