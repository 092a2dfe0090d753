"""Time-parallel LQR: the Riccati recursion, rollouts and costates as associative scans.

The sequential recursions of ``lqr`` take T dependent steps of a few small batched operations
each: on a GPU a pass costs about T times a dozen kernel launches, whatever the batch. Here each
recursion is a scan over time with an associative operation, computed in ``ceil(log2 T)``
levels of batched operations on all steps at once (Hillis-Steele): far fewer operations, about
``log2 T`` times the arithmetic. Worth it where operations cost their dispatch (GPUs, small
batches); the sequential recursions stay the default elsewhere.

The value function (Särkkä and García-Fernández, "Temporal parallelization of dynamic
programming and linear quadratic control", IEEE TAC 2023): the control of step t is eliminated
in closed form (``U = C_uu`` restricted to the free controls must be positive definite), which
leaves the conditional value of going from x_t to x_{t+1},

    V_t(x, y) = 1/2 x' J x + r' x + 1/2 e' C^+ e,    e = y - A x - b   (C: reachable directions),

and two such functions combine by minimizing over the state between them. The suffix
combinations are the value functions ``V_t(x) = 1/2 x' J_t x + r_t' x`` of the Riccati
recursion; the gains of all steps then follow at once from ``Q_t = C_t + F_t' V_{t+1} F_t``.

Shapes are time-major, as in ``lqr``: ``[T, B, ...]``; B batch, n state, m control, p = n + m.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diffmpc.boxqp import free_masks, masked_cholesky

__all__ = ["suffix_scan", "prefix_products", "affine_suffix", "value_scan", "gains_from_values"]


def suffix_scan(x: Tensor, combine: Callable[[Tensor, Tensor, bool], Tensor]) -> Tensor:
    """All suffix combinations ``e_t * e_{t+1} * ... * e_{T-1}`` of an associative ``combine``.

    Args:
        x: ``[T, ...]``, one element per step.
        combine: ``combine(earlier, later, last)`` of two ``[k, ...]`` tensors (k elements each),
            a tensor like them; ``last``: this is the final level, whose results no later level
            combines again (a combine may skip what only those would read).

    Returns:
        ``[T, ...]``: at t, the combination of steps t to T-1.
    """
    T = x.shape[0]
    s = 1
    while s < T:  # x[t] covers steps t .. t+s-1 (clipped at T)
        x = torch.cat([combine(x[:T - s], x[s:], 2 * s >= T), x[T - s:]])
        s *= 2
    return x


def prefix_products(M: Tensor) -> Tensor:
    """``P_t = M_t M_{t-1} ... M_0`` for ``M [T, B, k, k]``; returns ``[T, B, k, k]``."""
    T = M.shape[0]
    s = 1
    while s < T:  # M[t] holds the product of steps t-s+1 .. t (clipped at 0)
        M = torch.cat([M[:s], M[s:] @ M[:T - s]])
        s *= 2
    return M


def affine_suffix(a: Tensor, M: Tensor | None) -> Tensor:
    """``y_{T-1} = a_{T-1}``, ``y_t = a_t + M_t y_{t+1}``: the backward affine recursion.

    Args:
        a: ``[T, B, n]``.
        M: ``[T-1, B, n, n]``, or None if T = 1.

    Returns:
        y ``[T, B, n]``.

    The steps are the homogeneous maps ``[1; y_t] = [[1, 0], [a_t, M_t]] [1; y_{t+1}]``; their
    suffix products hold y in the first column.
    """
    T, B, n = a.shape
    if T == 1:
        return a
    H = a.new_zeros(T, B, n + 1, n + 1)
    H[..., 0, 0] = 1.0
    H[..., 1:, 0] = a
    H[:-1, :, 1:, 1:] = M
    S = suffix_scan(H, lambda first, then, last: first @ then)
    return S[..., 1:, 0]


def _elements(Ch: Tensor, Fh: Tensor | None, free: Tensor, mask, n: int):
    """The conditional value of each step, with its control eliminated.

    Args:
        Ch: ``[T, B, p+1, p+1]`` homogeneous costs (``lqr.homogeneous_cost``).
        Fh: ``[T-1, B, n+1, p+1]`` homogeneous dynamics (``lqr.homogeneous_dynamics``).
        free: ``[T, B, m]`` bool; mask: its ``boxqp.free_masks``.

    Returns:
        P = ``[A | b | C | J | r]`` ``[T, B, n, 3n+2]`` (A, b, C zero at the last step), and
        ``[B]`` bool: every ``U = C_uu`` positive definite on the free controls.

    With ``W = U^-1 [c_u | C_ux | F_u']`` (held controls removed): ``J = C_xx - C_xu U^-1 C_ux``,
    ``r = c_x - C_xu U^-1 c_u``, ``A = F_x - F_u U^-1 C_ux``, ``b = d - F_u U^-1 c_u``,
    ``C = F_u U^-1 F_u'``.
    """
    T, B = Ch.shape[:2]
    f = free.unsqueeze(-1).to(Ch.dtype)
    Rc = Ch[..., n + 1:, :n + 1] * f  # [c_u | C_ux], held rows zero
    L, info = masked_cholesky(Ch[..., n + 1:, n + 1:], free, mask)
    if T > 1:
        Fu_t = torch.nn.functional.pad(Fh[..., 1:, n + 1:].mT * f[:-1], (0, 0, 0, 0, 0, 0, 0, 1))
        W = torch.cholesky_solve(torch.cat([Rc, Fu_t], -1), L)  # [T, B, m, 2n+1]
    else:
        W = torch.cholesky_solve(Rc, L)
    P = Ch.new_zeros(T, B, n, 3 * n + 2)
    # [[., r'], [r, J]] = Ch_xx - Rc' U^-1 Rc, in homogeneous coordinates
    Sh = torch.baddbmm(Ch[..., :n + 1, :n + 1].flatten(0, 1), Rc.mT.flatten(0, 1),
                       W[..., :n + 1].flatten(0, 1), alpha=-1.0).unflatten(0, (T, B))
    P[..., 2 * n + 1:3 * n + 1] = Sh[..., 1:, 1:]
    P[..., 3 * n + 1] = Sh[..., 1:, 0]
    if T > 1:
        Fu = Fh[..., 1:, n + 1:]
        # [b | A] = [d | F_x] - F_u U^-1 [c_u | C_ux]
        Ah = torch.baddbmm(Fh[..., 1:, :n + 1].flatten(0, 1), Fu.flatten(0, 1),
                           W[:-1, ..., :n + 1].flatten(0, 1), alpha=-1.0).unflatten(0, (T - 1, B))
        P[:-1, ..., :n] = Ah[..., 1:]
        P[:-1, ..., n] = Ah[..., 0]
        P[:-1, ..., n + 1:2 * n + 1] = Fu @ W[:-1, ..., n + 1:]
    return P, (info == 0).all(0)


def _combine(Pi: Tensor, Pj: Tensor, last: bool = False) -> Tensor:
    """The conditional value over steps i..j from those over i..k and k..j (one each).

    ``Pi``, ``Pj``: ``[A | b | C | J | r]`` (``_elements``); with ``M = I + C_i J_j``:

        A = A_j M^-1 A_i,    b = A_j M^-1 (b_i - C_i r_j) + b_j,    C = A_j M^-1 C_i A_j' + C_j,
        J = A_i' M^-T J_j A_i + J_i,    r = A_i' M^-T (r_j + J_j b_i) + r_i.

    ``A_i' M^-T = (M^-1 A_i)'`` comes from the same solve as A, so there is one solve with M.
    ``last``: only J and r are needed (the last level of the scan); A, b, C are left as Pi's.
    """
    n = Pi.shape[-2]
    Ai, Ci, Gi = Pi[..., :n], Pi[..., n + 1:2 * n + 1], Pi[..., 2 * n + 1:]
    Aj, Gj = Pj[..., :n], Pj[..., 2 * n + 1:]
    CG = Ci @ Gj  # [C_i J_j | C_i r_j]
    M = CG[..., :n]
    M.diagonal(dim1=-2, dim2=-1).add_(1.0)
    rhs = Ai if last else torch.cat([Ai, Pi[..., n:n + 1] - CG[..., n:], Ci], -1)
    X = torch.linalg.solve_ex(M, rhs)[0]  # M^-1 [A_i | b_i - C_i r_j | C_i]
    JA = Gj[..., :n] @ Pi[..., :n + 1]  # [J_j A_i | J_j b_i]
    JA[..., n].add_(Gj[..., n])
    G = torch.baddbmm(Gi.flatten(0, 1), X[..., :n].mT.flatten(0, 1), JA.flatten(0, 1))
    G = G.unflatten(0, Gi.shape[:2])
    if last:
        return torch.cat([Pi[..., :2 * n + 1], G], -1)
    AX = Aj @ X
    out = torch.cat([AX[..., :n + 1], AX[..., n + 1:] @ Aj.mT, G], -1)
    out[..., n:2 * n + 1].add_(Pj[..., n:2 * n + 1])
    return out


def value_scan(Ch: Tensor, Fh: Tensor | None, free: Tensor, n: int,
               mask=None) -> tuple[Tensor, Tensor]:
    """The value functions ``V_t(x) = 1/2 x' J_t x + r_t' x`` (up to constants) of the
    fixed-set LQR, by a suffix scan of the steps' conditional values.

    Args:
        Ch: ``[T, B, p+1, p+1]`` homogeneous costs.
        Fh: ``[T-1, B, n+1, p+1]`` homogeneous dynamics, None if T = 1.
        free: ``[T, B, m]`` bool, the controls not held.
        mask: ``boxqp.free_masks(free)``, if the caller has it.

    Returns:
        G = ``[J | r]`` ``[T, B, n, n+1]``, and ``[B]`` bool: the elimination worked (each
        ``C_uu`` positive definite on the free controls, every value finite). Samples where it
        did not have meaningless values.
    """
    mask = free_masks(free, Ch.dtype) if mask is None else mask
    P, ok = _elements(Ch, Fh, free, mask, n)
    if not bool(ok.all()):  # the caller falls back to the sequential recursion: no scan
        return P[..., 2 * n + 1:], ok
    G = suffix_scan(P, _combine)[..., 2 * n + 1:]
    return G, ok & torch.isfinite(G).flatten(2).all(-1).all(0)


def gains_from_values(Ch: Tensor, Fh: Tensor | None, G: Tensor, free: Tensor, n: int,
                      mask=None):
    """The gains of every step at once from the value functions of the next ones.

    ``Qh_t = Ch_t + Fh_t' Vh_{t+1} Fh_t`` (``Vh = [[0, r'], [r, J]]``; ``Qh_{T-1} = Ch_{T-1}``),
    then ``[k | K] = -Q_uu^-1 [q_u | Q_ux]`` on the free controls, as in ``lqr.riccati``.
    ``mask``: ``boxqp.free_masks(free)``, if the caller has it.

    Returns:
        Kh ``[T, B, m, n+1]``, L ``[T, B, m, m]`` (masked Cholesky factors of Q_uu), info
        ``[T, B]`` (0 where Q_uu was positive definite on the free controls), Q_uu and q_u.
    """
    T = Ch.shape[0]
    Q = Ch
    if T > 1:
        J, r = G[1:, ..., :n], G[1:, ..., n:]
        Vh = torch.cat([torch.cat([torch.zeros_like(r[..., :1, :]), r.mT], -1),
                        torch.cat([r, J], -1)], -2)  # [T-1, B, n+1, n+1]
        Fh2 = Fh.flatten(0, 1)
        Q = torch.cat([torch.baddbmm(Ch[:-1].flatten(0, 1), Fh2.mT @ Vh.flatten(0, 1), Fh2)
                       .unflatten(0, (T - 1, -1)), Ch[-1:]])
    Quu, R = Q[..., n + 1:, n + 1:], Q[..., n + 1:, :n + 1]
    L, info = masked_cholesky(Quu, free, mask)
    Kh = torch.cholesky_solve(R * free.unsqueeze(-1).to(R.dtype), L).neg()
    return Kh, L, info, Quu, R[..., 0]
