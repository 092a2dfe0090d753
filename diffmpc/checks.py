"""Input validation for the public API: every error names the argument, the expected, the given."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_tensor", "check_finite", "nonfinite", "positive_definite", "as_bound"]


def _fail(name: str, expected: str, got: str) -> None:
    raise ValueError(f"{name}: expected {expected}, got {got}")


def check_tensor(name: str, t, lead: tuple, core: tuple, ref: Tensor | None = None,
                 finite: bool = True) -> Tensor:
    """Check type, shape ``[*lead, *core]``, dtype and device, and that values are finite.

    Leading dims may be left out or be 1 (they broadcast); core dims must match exactly.

    Args:
        lead: expected leading sizes, e.g. ``(B, T)``.
        core: expected trailing sizes, e.g. ``(n + m, n + m)``.
        ref: tensor whose dtype and device ``t`` must share.
        finite: also check that every value is finite.
    """
    want = _fmt(lead + core) + " (leading dims may be left out or 1)"
    if not isinstance(t, Tensor):
        _fail(name, f"a torch.Tensor of shape {want}", type(t).__name__)
    k = t.dim() - len(core)
    if k < 0 or k > len(lead) or tuple(t.shape[k:]) != tuple(core):
        _fail(name, f"shape {want}", f"shape {tuple(t.shape)}")
    for got, size in zip(t.shape[:k], lead[len(lead) - k:], strict=True):
        if got not in (1, size):
            _fail(name, f"shape {want}", f"shape {tuple(t.shape)}")
    if ref is not None:
        if t.dtype != ref.dtype:
            _fail(name, f"dtype {ref.dtype} (that of x_init)", f"dtype {t.dtype}")
        if t.device != ref.device:
            _fail(name, f"device {ref.device} (that of x_init)", f"device {t.device}")
    if finite:
        check_finite(name, t)
    return t


def check_finite(name: str, t: Tensor, summary: Tensor | None = None) -> None:
    """Raise unless every value of ``t`` is finite.

    One reduction decides in the common case: a sum (or the given ``summary`` of t, such as its
    min and max) is finite when every value is, and only a non-finite one costs an exact count
    (a finite sum may overflow).
    """
    s = t.detach().sum() if summary is None else summary
    if bool(torch.isfinite(s).all()):
        return
    nonfinite(name, int((~torch.isfinite(t.detach())).sum()))


def nonfinite(name: str, count: int) -> None:
    """Raise the error of ``check_finite`` if ``count`` (NaN or infinite entries of ``name``)
    is not zero."""
    if count:
        _fail(name, "finite values", f"{count} NaN or inf entries")


# blocks of up to _PD_VECTOR_MAX rows, at least _PD_VECTOR_MIN of them, are tested by a
# vectorized elimination on the CPU. LAPACK's per-matrix Cholesky calls cost about 0.1-0.3 us
# each there (12800 5x5 blocks of C [256, 50, 15, 15]: 3.8 ms, against 1.5 ms vectorized, most
# of it the batch-last copy); the elimination's k steps cost their dispatch, about 80-130 us
# whatever the count (4x4 and 6x6 blocks: even with LAPACK at about 1500)
_PD_VECTOR_MAX = 8
_PD_VECTOR_MIN = 2048


def positive_definite(A: Tensor) -> Tensor:
    """``[...]`` bool: whether each symmetric block of ``A [..., k, k]`` is positive definite.

    Symmetric Gaussian elimination without pivoting: a symmetric matrix is positive definite iff
    every pivot is positive (they are the squares of its Cholesky factor's diagonal). Small
    blocks, many of them, on the CPU are eliminated all at once, batch-last (``k`` steps of
    vector operations); otherwise ``torch.linalg.cholesky_ex`` decides. A NaN pivot counts as
    not positive definite.
    """
    A, k = A.detach(), A.shape[-1]
    if A.is_cuda or k > _PD_VECTOR_MAX or A.numel() < _PD_VECTOR_MIN * k * k:
        return torch.linalg.cholesky_ex(A)[1] == 0
    W = A.reshape(-1, k, k).permute(1, 2, 0).contiguous()  # [k, k, N]: rows of N numbers
    ok = W[0, 0] > 0
    for i in range(1, k):
        # the Schur complement of the pivot W[i-1, i-1] (a failed pivot leaves garbage below it,
        # but its sample is decided already)
        row = W[i - 1, i:] / W[i - 1, i - 1]
        W[i:, i:].sub_(W[i:, i - 1].unsqueeze(1) * row.unsqueeze(0))
        ok &= W[i, i] > 0
    return ok.view(A.shape[:-2])


def _fmt(shape: tuple) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def as_bound(name: str, b, B: int, T: int, m: int, ref: Tensor, sign: float) -> Tensor:
    """A bound given as None, a float or a tensor broadcastable to ``[B, T, m]`` -> ``[B, T, m]``."""
    if b is None:
        return torch.full((B, T, m), sign * float("inf"), dtype=ref.dtype, device=ref.device)
    if isinstance(b, (int, float)):
        if b != b:
            _fail(name, "a number or tensor without NaN", "nan")
        return torch.full((B, T, m), float(b), dtype=ref.dtype, device=ref.device)
    if not isinstance(b, Tensor):
        _fail(name, "None, a float or a tensor broadcastable to [B, T, m]", type(b).__name__)
    if b.dtype != ref.dtype or b.device != ref.device:
        _fail(name, f"dtype {ref.dtype} on {ref.device} (that of x_init)",
              f"dtype {b.dtype} on {b.device}")
    if bool(torch.isnan(b).any()):
        _fail(name, "no NaN values", "NaN entries")
    try:
        return b.expand(B, T, m)
    except RuntimeError:
        _fail(name, f"a tensor broadcastable to [B, T, m] = [{B}, {T}, {m}]",
              f"shape {tuple(b.shape)}")
