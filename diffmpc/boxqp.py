"""Batched box-constrained QP by projected Newton (Bertsekas 1982), the control step of box-DDP.

Solves, for every sample b independently,

    minimize    1/2 x' H x + q' x
    subject to  lower <= x <= upper

with H ``[B, m, m]`` positive definite. An index is *clamped* when it sits at a bound and the
gradient pushes outward; Newton steps are taken in the free subspace and projected back onto the
box, with an Armijo line search over a fixed ladder of step sizes evaluated all at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BoxQPResult", "box_qp", "free_masks", "masked_cholesky"]


@dataclass
class BoxQPResult:
    """Per-sample result of ``box_qp``.

    Attributes:
        x: ``[B, m]`` solution.
        free: ``[B, m]`` bool, True where the bound is not active at the solution.
        converged: ``[B]`` bool, the projected gradient is below tolerance.
        iterations: ``[B]`` Newton iterations taken.
    """

    x: Tensor
    free: Tensor
    converged: Tensor
    iterations: Tensor


def free_masks(free: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``free [..., m]`` bool -> (``free_i & free_j`` bool, ``diag(~free)`` as ``dtype``), both
    ``[..., m, m]``: what ``masked_cholesky`` needs, formed once for several factors."""
    return free.unsqueeze(-1) & free.unsqueeze(-2), torch.diag_embed((~free).to(dtype))


def masked_cholesky(H: Tensor, free: Tensor,
                    masks: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Cholesky factor of H restricted to the free indices (identity on the others).

    Args:
        H: ``[..., m, m]`` symmetric.
        free: ``[..., m]`` bool.
        masks: ``free_masks(free, H.dtype)``, if the caller has it.

    Returns:
        L ``[..., m, m]`` and info ``[...]`` (0 where the factorization succeeded).
    """
    both, held_eye = free_masks(free, H.dtype) if masks is None else masks
    return torch.linalg.cholesky_ex(torch.where(both, H, 0.0) + held_eye)


def _clamped(x: Tensor, g: Tensor, lower: Tensor, upper: Tensor, eps: Tensor | float = 0.0):
    """Indices within ``eps`` of a bound with the gradient pushing outward."""
    return ((x <= lower + eps) & (g > 0)) | ((x >= upper - eps) & (g < 0))


def box_qp(
    H: Tensor,
    q: Tensor,
    lower: Tensor,
    upper: Tensor,
    x0: Tensor | None = None,
    max_iter: int = 30,
    tol: float | None = None,
    n_steps: int = 8,
    eps_active: float = 1e-3,
) -> BoxQPResult:
    """Solve a batch of box-constrained QPs.

    Args:
        H: ``[B, m, m]`` symmetric positive definite.
        q: ``[B, m]``.
        lower, upper: ``[B, m]`` bounds (``-inf``/``inf`` allowed), lower <= upper.
        x0: ``[B, m]`` warm start (projected onto the box); default: the unconstrained minimizer.
        max_iter: Newton iterations at most.
        tol: stop when the free gradient's inf-norm <= tol * (1 + |q|_inf); default from dtype.
        n_steps: step sizes ``1, 1/2, ..., 2^-(n_steps-1)`` tried per iteration.
        eps_active: cap on the width of the epsilon-active set.

    Returns:
        BoxQPResult.
    """
    if tol is None:
        tol = 1e3 * torch.finfo(H.dtype).eps
    B = H.shape[0]
    if H.shape[-1] == 1:  # one control: the projection of the minimizer is the solution
        x = torch.maximum(torch.minimum(-q / H[..., 0], upper), lower)
        free = ~_clamped(x, H[..., 0] * x + q, lower, upper)
        ones = torch.ones(B, dtype=torch.bool, device=H.device)
        return BoxQPResult(x, free, ones & (H[:, 0, 0] > 0), ones.long())
    if x0 is None:  # start from the unconstrained minimizer; done if it is feasible
        L, info = torch.linalg.cholesky_ex(H)
        x0 = -torch.cholesky_solve(q.unsqueeze(-1), L).squeeze(-1)
        inside = (x0 >= lower) & (x0 <= upper)
        if bool(inside.all()) and not bool(info.any()):
            ones = torch.ones(B, dtype=torch.bool, device=H.device)
            return BoxQPResult(x0, inside, ones, torch.ones(B, dtype=torch.long, device=H.device))
        x0 = torch.where(torch.isfinite(x0), x0, torch.zeros_like(x0))
    x = torch.maximum(torch.minimum(x0, upper), lower)
    alphas = 0.5 ** torch.arange(n_steps, dtype=H.dtype, device=H.device)  # [A]
    scale = tol * (1.0 + q.abs().amax(-1))
    iters = torch.zeros(B, dtype=torch.long, device=H.device)
    stopped = torch.zeros(B, dtype=torch.bool, device=H.device)
    diag = H.diagonal(dim1=-2, dim2=-1)
    for it in range(max_iter + 1):
        g = torch.baddbmm(q.unsqueeze(-1), H, x.unsqueeze(-1)).squeeze(-1)
        clamped = _clamped(x, g, lower, upper)
        conv = torch.where(clamped, 0.0, g).abs().amax(-1) <= scale
        done = conv | stopped
        if it == max_iter or bool(done.all()):
            break
        # epsilon-active set (Bertsekas 1982): indices closer to an outward bound than the
        # projected-gradient norm are clamped too, else a Newton step can stall against them
        proj_g = (x - torch.clamp(x - g, lower, upper)).abs().amax(-1, keepdim=True)
        free = ~_clamped(x, g, lower, upper, proj_g.clamp_max(eps_active))
        L, _ = masked_cholesky(H, free)
        dx = -torch.cholesky_solve((g * free).unsqueeze(-1), L).squeeze(-1)
        dx = torch.where(free, dx, -g / diag)  # clamped: toward the bound
        cand = torch.clamp(torch.addcmul(x.unsqueeze(1), alphas[:, None], dx.unsqueeze(1)),
                           lower.unsqueeze(1), upper.unsqueeze(1))  # [B, A, m]
        d = cand - x.unsqueeze(1)  # [B, A, m]
        slope = (g.unsqueeze(1) * d).sum(-1)  # [B, A]
        change = slope + 0.5 * ((d @ H.mT) * d).sum(-1)  # f(cand) - f(x), without cancellation
        ok = (change <= 1e-4 * slope) & (slope < 0)
        found = ok.any(-1)
        first = ok.to(torch.int8).argmax(-1)
        new = cand[torch.arange(B, device=H.device), first]
        x = torch.where((done | ~found).unsqueeze(-1), x, new)
        iters = iters + (~done).long()
        stopped = stopped | ~found
    return BoxQPResult(x=x, free=~clamped, converged=conv, iterations=iters)
