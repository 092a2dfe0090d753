"""Helpers shared by the physical models: input checks, positive parameters, integrators."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from diffmpc.dynamics import euler_step, rk4_step

METHODS = ("euler", "rk4")


def check_method(owner: str, method: str) -> str:
    """Return ``method`` if it is one of ``METHODS``; raise ValueError otherwise."""
    if method not in METHODS:
        raise ValueError(f"{owner}: method must be one of {list(METHODS)}, got {method!r}")
    return method


def check_positive(owner: str, name: str, value: float) -> float:
    """Return ``value`` as a float if it is a finite number > 0; raise ValueError otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def log_param(owner: str, name: str, value: float, dtype: torch.dtype | None) -> nn.Parameter:
    """A learnable ``log(value)`` (``dtype``, None: the default), so that its ``exp`` is
    positive by construction.

    Raises:
        ValueError: if ``value`` is not a finite number > 0.
    """
    value = check_positive(owner, name, value)
    return nn.Parameter(torch.tensor(math.log(value), dtype=dtype or torch.get_default_dtype()))


def init_step_and_bounds(module: nn.Module, owner: str, dt: float, method: str,
                         bound_name: str, bound: float, dtype: torch.dtype | None) -> None:
    """Set ``module.dt``, ``module.method`` and the buffers ``u_lower``/``u_upper`` ``[m]`` =
    ``-bound``/``bound`` (m = ``module.n_ctrl``), checking each argument."""
    module.dt = check_positive(owner, "dt", dt)
    module.method = check_method(owner, method)
    b = check_positive(owner, bound_name, bound)
    module.register_buffer("u_lower", torch.full((module.n_ctrl,), -b, dtype=dtype))
    module.register_buffer("u_upper", torch.full((module.n_ctrl,), b, dtype=dtype))


def check_xu(owner: str, x: Tensor, u: Tensor, n: int, m: int) -> None:
    """Check ``x [..., n]`` and ``u [..., m]`` are float tensors with the same leading dims.

    Raises:
        ValueError: naming the argument, the expected and the given shape or type.
    """
    for name, t, size in (("x", x, n), ("u", u, m)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{owner}: {name} must be a floating-point torch.Tensor, got {got}")
        if t.dim() < 1 or t.shape[-1] != size:
            raise ValueError(f"{owner}: {name} must have shape [B, {size}], got {tuple(t.shape)}")
    if x.shape[:-1] != u.shape[:-1]:
        raise ValueError(
            f"{owner}: x and u must have the same batch dims, got x {tuple(x.shape)} "
            f"and u {tuple(u.shape)}"
        )


def explicit_step(xdot, q: Tensor, u: Tensor, dt: float, method: str) -> Tensor:
    """One explicit Euler or RK4 step of ``qdot = xdot(q, u)`` (control held constant)."""
    step = euler_step if method == "euler" else rk4_step
    return step(xdot, q, u, dt)


def angle_derivatives(c: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Derivatives of ``atan2(s, c)`` in ``(c, s)`` ``[N]``: the gradient ``(d_c, d_s)`` and the
    Hessian's entries ``(h_cc, h_cs, h_ss)``."""
    inv_r2 = (c * c + s * s).reciprocal()
    d_c, d_s = -s * inv_r2, c * inv_r2
    inv_r4 = inv_r2 * inv_r2
    return d_c, d_s, 2 * c * s * inv_r4, (s * s - c * c) * inv_r4, -2 * c * s * inv_r4


def angle_output_curvature(cos_n: Tensor, sin_n: Tensor, lam_c: Tensor, lam_s: Tensor,
                           phi: Tensor, h_cc: Tensor, h_cs: Tensor, h_ss: Tensor,
                           ic: int, is_: int) -> Tensor:
    """``lam_c Hess(cos th') + lam_s Hess(sin th')`` ``[k, k, N]`` (rows last) for an angle ``th'``
    with gradient ``phi [k, N]`` and Hessian ``[[h_cc, h_cs], [h_cs, h_ss]]`` in the coordinates
    ``ic, is_`` (zero elsewhere); ``cos_n``, ``sin_n``: ``cos th'``, ``sin th'`` ``[N]``.

    The closed-form derivatives keep their N rows last: each entry is then a contiguous block of
    N numbers, where ``[N, k]`` layouts made every stack and outer product interleave rows of k
    (six stacks of four columns took 2 ms of a cartpole curvature at N = 12544)."""
    a = -(lam_c * cos_n + lam_s * sin_n)  # factor of phi phi'
    b = lam_s * cos_n - lam_c * sin_n  # factor of Hess(th')
    H = (a * phi[:, None]) * phi[None, :]
    H[ic, ic] += b * h_cc
    H[ic, is_] += b * h_cs
    H[is_, ic] += b * h_cs
    H[is_, is_] += b * h_ss
    return H


def rows_first(z: Tensor, pad: int = 0, pad_cols: int | None = None) -> Tensor:
    """A rows-last block ``[a, b, N]`` as a contiguous ``[N, pad + a, pad_cols + b]`` tensor, the
    ``pad`` leading rows and ``pad_cols`` (default ``pad``) leading columns zero (coordinates the
    block does not involve)."""
    a, b, N = z.shape
    pc = pad if pad_cols is None else pad_cols
    out = z.new_zeros(N, pad + a, pc + b) if pad or pc else z.new_empty(N, a, b)
    out[:, pad:, pc:] = z.permute(2, 0, 1)
    return out


def euler_closed_form(model: nn.Module, x: Tensor, u: Tensor) -> bool:
    """Whether ``model``'s closed-form derivatives apply (its Euler step; RK4 is left to
    autograd), after checking ``x`` and ``u`` as ``forward`` does."""
    if model.method != "euler":
        return False
    check_xu(type(model).__name__, x, u, model.n_state, model.n_ctrl)
    return True


class StepModel(nn.Module):
    """Base of the physical models: ``forward`` checks its inputs and takes one step,
    ``_step(x, u, self._constants())``; ``rollout_step()`` gives the same step with the
    parameter-dependent constants formed once, for the many steps of one rollout (the solver's
    ``TrajDynamics.stepper``). Subclasses set ``n_state``, ``n_ctrl`` and define both methods."""

    n_state: int
    n_ctrl: int

    def _constants(self) -> tuple[Tensor, ...]:  # pragma: no cover - interface
        raise NotImplementedError

    def _step(self, x: Tensor, u: Tensor, consts: tuple[Tensor, ...]) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: Tensor, u: Tensor) -> Tensor:
        """One step: ``x [B, n]``, ``u [B, m]`` -> next state ``[B, n]``."""
        check_xu(type(self).__name__, x, u, self.n_state, self.n_ctrl)
        return self._step(x, u, self._constants())

    def rollout_step(self):
        """``forward`` for the many steps of one rollout: a function ``(x, u) -> x'`` with the
        constants (``_constants``, from the log-parameters) formed once, not at every step.
        Its inputs are not checked."""
        consts = self._constants()
        return lambda x, u: self._step(x, u, consts)

    def _native_model(self) -> tuple[int, Tensor] | None:
        """``(model, constants)`` of ``diffmpc.native``'s model kernels, the compiled copy of
        this model's step and its derivatives that the solver runs on CPU tensors, or None
        where there is none (the default)."""
        return None

    def _own_step(self, base: type, *names: str) -> bool:
        """Whether this model takes ``base``'s Euler step: the method is Euler and the class
        overrides none of ``base``'s step and derivative methods, nor ``names`` (a subclass
        that changes the physics does not get ``base``'s compiled step)."""
        own = ("forward", "rollout_step", "_step", "_constants", "jacobian", "curvature",
               "curvature_block", "_euler_expansion", *names)
        return self.method == "euler" and all(
            getattr(type(self), name, None) is getattr(base, name, None) for name in own)
