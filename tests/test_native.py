"""The compiled Riccati pass (diffmpc.native) against the same pass in PyTorch operations.

The solutions of both paths are checked against cvxpy in test_lqr.py (its ``recursion``
fixture runs every test with each); here the gains themselves are compared on the cases the
kernel reads differently: batch sizes that do not fill its vector lanes, free sets, strided,
broadcast and homogeneous operands, float32, and control blocks that are not positive definite.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch

from diffmpc import lqr, native

needs_native = pytest.mark.skipif(not native.available(),
                                  reason=f"native kernels: {native.status()}")


def _spy(name: str, fn):
    """``fn()`` and how many times it called ``native.<name>``."""
    calls = []
    real = getattr(native, name)

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    try:
        setattr(native, name, spy)
        out = fn()
    finally:
        setattr(native, name, real)
    return out, len(calls)


def _both(*args, **kw):
    """``lqr.riccati`` compiled and in PyTorch operations, asserting that the first was
    compiled (the PyTorch pass stacks its steps, the compiled one fills one block)."""
    fast, calls = _spy("riccati", lambda: lqr.riccati(*args, **kw))
    assert calls, "the compiled pass was not used"
    with native.enabled(False):
        ref = lqr.riccati(*args, **kw)
    return fast, ref


def _assert_same(fast, ref, rtol=1e-10, atol=1e-12):
    assert torch.equal(fast.ok, ref.ok)
    assert torch.equal(fast.free, ref.free)
    ok = fast.ok
    for name in ("K", "k", "L", "dV"):
        a, b = getattr(fast, name), getattr(ref, name)
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a[ok], b[ok], rtol=rtol, atol=atol, msg=name)
    assert fast.Fh is ref.Fh or torch.equal(fast.Fh, ref.Fh)


@pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")
def test_native_is_available_where_a_compiler_is():
    """Where a compiler is found the kernels build (a broken build would otherwise only show as
    skipped tests here and as PyTorch operations everywhere else)."""
    if os.environ.get("DIFFMPC_NATIVE", "1") in ("0", "false", "no", "off"):
        pytest.skip("switched off by DIFFMPC_NATIVE")
    assert native.status() == "available"


@needs_native
@pytest.mark.parametrize("B,T,n,m", [(1, 1, 3, 2), (3, 6, 4, 2), (7, 9, 5, 3), (9, 4, 2, 5)])
@pytest.mark.parametrize("expected", [False, True])
def test_unconstrained_gains_equal_pytorch(make_problem, B, T, n, m, expected):
    """B = 1, 3, 7, 9: partly filled groups of 4 lanes (the padding lanes must not leak)."""
    prob = make_problem(B, T, n, m, seed=B + T)
    with torch.inference_mode():
        fast, ref = _both(prob.C, prob.c, prob.F, prob.f, expected=expected)
    _assert_same(fast, ref)


@needs_native
@pytest.mark.parametrize("seed", [0, 1])
def test_fixed_set_gains_equal_pytorch(make_problem, seed):
    """Random free sets, with steps where every control is held and samples where none is."""
    prob = make_problem(6, 8, 4, 3, seed=seed)
    g = torch.Generator().manual_seed(seed)
    free = torch.rand(6, 8, 3, generator=g) > 0.4
    free[0, 2] = False
    free[1] = True
    with torch.inference_mode():
        fast, ref = _both(prob.C, prob.c, prob.F, prob.f, free=free, expected=True)
    _assert_same(fast, ref)
    # a held control has a zero row in [k | K] and an identity row in L
    held = ~free
    assert bool((fast.k[held] == 0).all()) and bool((fast.K[held] == 0).all())
    eye = torch.eye(3, dtype=torch.float64).expand(6, 8, 3, 3)
    assert bool((fast.L[0, 2] == eye[0, 2]).all())


@needs_native
@pytest.mark.parametrize("B,T,n,m,dtype", [(6, 8, 4, 3, torch.float64), (11, 5, 3, 2, torch.float64),
                                           (9, 7, 5, 4, torch.float32)])
def test_held_values_and_multipliers_equal_pytorch(make_problem, B, T, n, m, dtype):
    """``lqr.held_pass`` (held controls at given values, not zero) against PyTorch: the same
    problem with the held values moved into c and f (``c + C[:, :, n:] val``, ``f + F[:, :, n:]
    val``) by the PyTorch pass; and ``lqr.multipliers`` against the Lagrangian's gradient in u
    from the PyTorch costate, ``C_u tau + c_u + F_u' lam``: zero on the free controls, the
    bounds' multipliers on the held ones. Partly filled lane groups, a step where every control
    is held and a sample where none is."""
    prob = make_problem(B, T, n, m, seed=B)
    C, c, F, f = (t.to(dtype) for t in (prob.C, prob.c, prob.F, prob.f))
    x0 = prob.x_init.to(dtype)
    g = torch.Generator().manual_seed(B)
    free = torch.rand(B, T, m, generator=g) > 0.5
    free[0, 2] = False
    free[1] = True
    held = torch.where(free, 0.0, torch.randn(B, T, m, generator=g, dtype=torch.float64)).to(dtype)
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        Fh = lqr.homogeneous_dynamics(F, f)
        fast, Qu = lqr.held_pass(C, c, Fh, free, held)
        x, u = lqr.rollout_affine(fast, x0)
        with native.enabled(False):
            c_eff = c + (C[..., n:] @ held.unsqueeze(-1)).squeeze(-1)
            f_eff = f + (F[..., n:] @ held[:, :-1].unsqueeze(-1)).squeeze(-1)
            ref = lqr.riccati(C, c_eff, F, f_eff, free=free, expected=False)
            xr, ur = lqr.rollout_affine(ref, x0)
            ur = torch.where(free, ur, held)
            gx_gu = (C @ torch.cat([xr, ur], -1).unsqueeze(-1)).squeeze(-1) + c
            lam = lqr.costate(gx_gu[..., :n], lqr.time_major(F[..., :n]))
            gu = gx_gu[..., n:].clone()
            gu[:, :-1] += (F[..., n:].mT @ lam[:, 1:].unsqueeze(-1)).squeeze(-1)
        gu_fast = lqr.multipliers(Qu, x, u)
    assert torch.equal(fast.ok, ref.ok) and bool(fast.ok.all())
    torch.testing.assert_close(fast.K, ref.K, **tol)
    torch.testing.assert_close(fast.L, ref.L, **tol)
    torch.testing.assert_close(fast.k[free], ref.k[free], **tol)
    assert torch.equal(fast.k[~free], held[~free])  # the held rows carry the values
    assert torch.equal(u[~free], held[~free])
    torch.testing.assert_close(x, xr, **tol)
    torch.testing.assert_close(u, ur, **tol)
    scale = 1.0 + gx_gu.abs().amax()
    torch.testing.assert_close(gu_fast / scale, gu / scale, **tol)
    assert float(gu[free].abs().amax() / scale) < (1e-12 if dtype == torch.float64 else 1e-5)
    assert float(gu[~free].abs().amax() / scale) > 1e-3  # multipliers, not zeros


@needs_native
def test_strided_broadcast_and_homogeneous_operands(make_problem):
    """A cost shared by every sample and step (stride 0), non-contiguous linear terms, free
    sets given as a view, and the homogeneous cost and dynamics that the active-set passes
    keep (``Ch``, ``Fh``): the kernel reads all of them in place."""
    prob = make_problem(5, 6, 4, 2, seed=7)
    C = prob.C[0, 0].expand(5, 6, 6, 6)
    c = torch.randn(6, 5, 6, dtype=torch.float64).transpose(0, 1)
    free = (torch.rand(5, 6, 2, 2) > 0.3)[..., 0]
    with torch.inference_mode():
        fast, ref = _both(C, c, prob.F, prob.f, free=free, expected=True)
        _assert_same(fast, ref)
        Ch = lqr.homogeneous_cost(prob.C, prob.c)
        Fh = lqr.homogeneous_dynamics(prob.F, prob.f)
        fast, ref = _both(prob.C, prob.c, prob.F, None, free=free, Ch=Ch, Fh=Fh)
        _assert_same(fast, ref)
        plain = lqr.riccati(prob.C, prob.c, prob.F, prob.f, free=free)
    _assert_same(fast, plain)


@needs_native
def test_float32_gains_equal_pytorch(make_problem):
    prob = make_problem(6, 7, 4, 3, seed=5)
    args = [t.float() for t in (prob.C, prob.c, prob.F, prob.f)]
    with torch.inference_mode():
        fast, ref = _both(*args, expected=True)
    assert fast.K.dtype == torch.float32
    _assert_same(fast, ref, rtol=1e-4, atol=1e-5)


@needs_native
def test_indefinite_control_block_is_flagged_like_pytorch(make_problem):
    """A control Hessian that is not positive definite at some step makes ``ok`` False for its
    sample only, as LAPACK's factorization does in the PyTorch pass."""
    prob = make_problem(5, 6, 3, 2, seed=2)
    C = prob.C.clone()
    C[1, 3, 3:, 3:] = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)  # indefinite
    C[3, 5, 4, 4] = -1.0
    with torch.inference_mode():
        fast, ref = _both(C, prob.c, prob.F, prob.f)
    assert fast.ok.tolist() == [True, False, True, False, True]
    _assert_same(fast, ref)


def test_not_used_where_grad_is_recorded(make_problem):
    """Operands that require grad (unrolled differentiation) take the PyTorch pass, which
    autograd can follow."""
    prob = make_problem(3, 4, 3, 2, seed=1)
    c = prob.c.clone().requires_grad_(True)
    g = lqr.riccati(prob.C, c, prob.F, prob.f)
    assert g.k.requires_grad
    g.k.sum().backward()
    assert c.grad is not None and bool(c.grad.abs().sum() > 0)


def _python(code: str, **env) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter with ``env`` over this one's environment, less the
    switches of the native build (a test run with DIFFMPC_NATIVE=0 must not leak into these)."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("DIFFMPC_NATIVE", "DIFFMPC_NATIVE_OPENMP", "DIFFMPC_NATIVE_MARCH")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**base, **env})


_SOLVE = """
import torch, diffmpc as dm
from diffmpc import native
torch.manual_seed(0)
n, m, T, B = 3, 2, 5, 2
C = torch.eye(n + m, dtype=torch.float64).expand(B, T, n + m, n + m)
F = torch.cat([torch.eye(n), torch.ones(n, m)], 1).double().expand(B, T - 1, n, n + m)
sol = dm.MPC(n, m, T)(torch.ones(B, n, dtype=torch.float64), dm.QuadCost(C, torch.zeros(B, T, n + m,
    dtype=torch.float64)), dm.LinearDynamics(F, torch.zeros(B, T - 1, n, dtype=torch.float64)))
print(native.status()); print(float(sol.u.abs().sum()))
"""


def test_disabled_by_environment_and_without_a_compiler(tmp_path):
    """``DIFFMPC_NATIVE=0`` and a compiler that fails both leave the PyTorch pass, with the same
    solution and the reason in ``native.status()``, and print nothing else."""
    runs = {
        "off": _python(_SOLVE, DIFFMPC_NATIVE="0", DIFFMPC_CACHE_DIR=str(tmp_path / "a")),
        "broken": _python(_SOLVE, CC="false", DIFFMPC_CACHE_DIR=str(tmp_path / "b")),
        "missing": _python(_SOLVE, CC="no-such-compiler-xyz", DIFFMPC_CACHE_DIR=str(tmp_path / "c")),
    }
    for name, r in runs.items():
        assert r.returncode == 0, (name, r.stderr)
        assert r.stderr == "", (name, r.stderr)
    status = {k: r.stdout.splitlines()[0] for k, r in runs.items()}
    assert status["off"] == "unavailable: disabled by DIFFMPC_NATIVE"
    assert status["broken"].startswith("unavailable: false failed to compile")
    assert status["missing"].startswith("unavailable: no C compiler found")
    values = {float(r.stdout.splitlines()[1]) for r in runs.values()}
    assert len(values) == 1
    if native.available():  # the compiled pass in a fresh cache: the same solution to rounding
        r = _python(_SOLVE, DIFFMPC_CACHE_DIR=str(tmp_path / "d"))
        assert r.returncode == 0 and r.stdout.splitlines()[0] == "available", r.stderr
        assert abs(float(r.stdout.splitlines()[1]) - values.pop()) <= 1e-12
        assert len(list((tmp_path / "d").glob("lq-*.so"))) == 1
        blocked = tmp_path / "a-file"  # a cache "directory" that cannot be created
        blocked.write_text("")
        r = _python(_SOLVE, DIFFMPC_CACHE_DIR=str(blocked / "cache"))
        assert r.returncode == 0 and r.stdout.splitlines()[0] == "available", r.stderr


def _spied(name, fn, *args, **kw):
    """``fn(*args, **kw)`` asserting that it called ``native.<name>``."""
    out, calls = _spy(name, lambda: fn(*args, **kw))
    assert calls, f"native.{name} was not used"
    return out


@needs_native
@pytest.mark.parametrize("B,T,n,m", [(1, 1, 3, 2), (5, 7, 4, 3), (6, 5, 3, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rollout_costate_and_feedforward_equal_pytorch(make_problem, B, T, n, m, dtype):
    """The vector recursions that reuse a pass (closed-loop rollout with and without offsets,
    the costate along its dynamics, new feedforward terms on a free set) compiled and in
    PyTorch operations, on gains whose k is a separate tensor and K a strided view."""
    prob = make_problem(B, T, n, m, seed=T)
    C, c, F, f = (t.to(dtype) for t in (prob.C, prob.c, prob.F, prob.f))
    x0 = prob.x_init.to(dtype)
    free = torch.rand(B, T, m, generator=torch.Generator().manual_seed(1)) > 0.3
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4,
                                                                          "atol": 1e-5}
    c2 = torch.randn(B, T, n + m, dtype=dtype)
    gx = torch.randn(B, T + 1, n, dtype=dtype)[:, 1:]  # a view with an offset
    with torch.inference_mode():
        with native.enabled(False):
            gains = lqr.riccati(C, c, F, f, free=free)
        Fx = None if gains.Fh is None else gains.Fh[:, :, 1:, 1:n + 1]
        new = _spied("feedforward", lqr.feedforward, gains, c2)
        with native.enabled(False):
            ref = lqr.feedforward(gains, c2)
        torch.testing.assert_close(new.k, ref.k, **tol)
        for offsets in (True, False):
            out = _spied("rollout", lqr.rollout_affine, new, x0, offsets)
            with native.enabled(False):
                exp = lqr.rollout_affine(ref, x0, offsets)
            for a, b in zip(out, exp, strict=True):
                torch.testing.assert_close(a, b, **tol)
        lam = _spied("costate", lqr.costate, gx, Fx)
        with native.enabled(False):
            torch.testing.assert_close(lam, lqr.costate(gx, Fx), **tol)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cost_checks_raise_the_same_errors(make_problem, dtype):
    """``_check_cost`` in one compiled pass and in PyTorch operations: the same ValueError (NaN
    and inf counts, asymmetry, the number of indefinite control blocks) or none."""
    from diffmpc import mpc as mpc_mod
    from diffmpc.cost import QuadCost

    prob = make_problem(3, 4, 3, 2, seed=0)
    good = prob.C.to(dtype)
    cases = {"good": good.clone(), "shared": good[0, 0].expand(3, 4, 5, 5)}
    C = good.clone()
    C[0, 1, 2, 3] = float("nan")
    C[2, 3, 4, 4] = float("inf")
    C[1, 0, 0, 1] = float("-inf")
    cases["nonfinite"] = C
    C = good.clone()
    C[1, 2, 0, 4] += 1e-3
    cases["asymmetric"] = C
    C = good.clone()
    C[0, 0, 3:, 3:] = torch.tensor([[1.0, 3.0], [3.0, 1.0]])
    C[2, 1, 4, 4] = -2.0
    C[2, 2, 3, 3] = 0.0
    cases["indefinite"] = C
    cases["tiny asymmetry"] = good + 1e-9 * torch.randn_like(good).tril(-1)
    messages = {}
    for name, C in cases.items():
        got = []
        for on in (True, False):
            with native.enabled(on):
                try:
                    mpc_mod._check_cost(QuadCost(C, prob.c.to(dtype)), 3, 4, 3, 2,
                                        prob.x_init.to(dtype))
                    got.append(None)
                except ValueError as err:
                    got.append(str(err))
        assert got[0] == got[1], (name, got)
        messages[name] = got[0]
    assert messages["good"] is None and messages["shared"] is None
    assert messages["nonfinite"] == "cost.C: expected finite values, got 3 NaN or inf entries"
    assert messages["asymmetric"].startswith("cost.C: expected symmetric matrices")
    assert messages["indefinite"].endswith("got 3 blocks that are not")
    assert messages["tiny asymmetry"] is None  # within the tolerance 1e-6 (1 + max |C|)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batched_products_equal_pytorch(dtype):
    """matvec, matvec_pair, the gradient outer products and the quadratic stage costs, compiled,
    against the same formulas in PyTorch operations, on broadcast and non-contiguous operands."""
    g = torch.Generator().manual_seed(3)
    B, T, r, c = 5, 3, 4, 6
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5,
                                                                          "atol": 1e-6}
    A = torch.randn(T, B, c, r, generator=g, dtype=dtype).permute(1, 0, 3, 2)  # strided
    As = torch.randn(r, c, generator=g, dtype=dtype).expand(B, T, r, c)  # stride 0
    x = torch.randn(B, T, c + 1, generator=g, dtype=dtype)[..., 1:]  # offset view
    y = torch.randn(B, T, r, generator=g, dtype=dtype)
    for M in (A, As):
        with torch.no_grad():
            torch.testing.assert_close(native.matvec(M, x), (M @ x.unsqueeze(-1)).squeeze(-1),
                                       **tol)
            torch.testing.assert_close(native.matvec(M, y, trans=True),
                                       (M.mT @ y.unsqueeze(-1)).squeeze(-1), **tol)
            ax, aty = native.matvec_pair(M, x, y)
            torch.testing.assert_close(ax, (M @ x.unsqueeze(-1)).squeeze(-1), **tol)
            torch.testing.assert_close(aty, (M.mT @ y.unsqueeze(-1)).squeeze(-1), **tol)
    z = torch.randn(B, T, c, generator=g, dtype=dtype)
    torch.testing.assert_close(native.outer(y, x), y.unsqueeze(-1) * x.unsqueeze(-2), **tol)
    torch.testing.assert_close(native.outer(y, x, y, z, 0.5),
                               0.5 * (y.unsqueeze(-1) * x.unsqueeze(-2)
                                      + y.unsqueeze(-1) * z.unsqueeze(-2)), **tol)
    S = A[..., :4, :4] + A[..., :4, :4].mT
    tau, lin = x[..., :4], torch.randn(4, generator=g, dtype=dtype).expand(B, T, 4)
    quad = 0.5 * (tau * (S @ tau.unsqueeze(-1)).squeeze(-1)).sum(-1) + (lin * tau).sum(-1)
    torch.testing.assert_close(native.quad_value(S, lin, tau), quad, **tol)


@needs_native
@pytest.mark.parametrize("sym,trans", [(False, False), (False, True), (True, False)])
def test_matvec_gradients_with_native_products(sym, trans):
    """``expand.matvec`` with the compiled products in its forward and backward: gradcheck
    (and gradgradcheck, where the backward's own products are recorded by autograd)."""
    from torch.autograd import gradcheck, gradgradcheck

    from diffmpc.expand import matvec

    g = torch.Generator().manual_seed(5)
    A = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    if sym:
        A = A + A.mT
    A.requires_grad_(True)
    x = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)

    def f(A, x):
        return matvec(A, x, sym=sym, trans=trans)

    assert _spied("matvec", f, A.detach(), x.detach()).shape == (2, 3, 4)
    if sym:  # the symmetrized gradient is the gradient along symmetric directions only
        def f(A, x):  # noqa: F811
            return matvec(0.5 * (A + A.mT), x, sym=True)
    assert gradcheck(f, (A, x))
    assert gradgradcheck(f, (A, x))


_LANES4 = """
import torch
from diffmpc import lqr, native
g = torch.Generator().manual_seed(0)
B, T, n, m = 7, 6, 4, 3
p = n + m
L = torch.randn(B, T, p, p, generator=g, dtype=torch.float64)
C = L @ L.mT / p + 0.1 * torch.eye(p, dtype=torch.float64)
c = torch.randn(B, T, p, generator=g, dtype=torch.float64)
F = 0.5 * torch.randn(B, T - 1, n, p, generator=g, dtype=torch.float64)
f = torch.randn(B, T - 1, n, generator=g, dtype=torch.float64)
free = torch.rand(B, T, m, generator=g) > 0.3
with torch.inference_mode():
    a = lqr.riccati(C, c, F, f, free=free, expected=True)
    with native.enabled(False):
        b = lqr.riccati(C, c, F, f, free=free, expected=True)
print(native.status())
print(max(float((x - y).abs().max()) for x, y in ((a.K, b.K), (a.k, b.k), (a.L, b.L), (a.dV, b.dV))))
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not native.available(),
                    reason="an x86-64 machine with the native kernels")
def test_four_lane_build_for_avx2_machines(tmp_path):
    """Built for any AVX2 machine (no 512-bit vectors: four samples per vector, the layout of
    most CPUs), the kernels give the same gains as PyTorch."""
    r = _python(_LANES4, DIFFMPC_NATIVE_MARCH="x86-64-v3", DIFFMPC_CACHE_DIR=str(tmp_path))
    assert r.returncode == 0, r.stderr
    status, diff = r.stdout.split()
    assert status == "available"
    assert float(diff) <= 1e-12


@needs_native
def test_quadratic_stage_cost_gradients(make_problem):
    """``TrajCost.value`` with grad recorded runs ``_QuadValue`` (one compiled pass, ``C tau``
    kept): its value and its gradients into C, c, x and u equal the PyTorch formula's, and its
    backward is itself differentiable (gradcheck and gradgradcheck)."""
    from torch.autograd import gradcheck, gradgradcheck

    from diffmpc import expand
    from diffmpc.cost import QuadCost

    prob = make_problem(3, 4, 3, 2, seed=4)
    B, T, n, m = prob.sizes
    leaves = [t.clone().requires_grad_(True) for t in (prob.C, prob.c)]
    x = torch.randn(B, T, n, dtype=torch.float64, requires_grad=True)
    u = torch.randn(B, T, m, dtype=torch.float64, requires_grad=True)

    def value(C, c, x, u):
        return expand.TrajCost(QuadCost(C, c), B, T, n, m).value(x, u)

    got = _spied("quad_value", value, *leaves, x, u)
    w = torch.randn(B, T, dtype=torch.float64)
    grads = torch.autograd.grad((got * w).sum(), [*leaves, x, u])
    with native.enabled(False):
        ref = value(*leaves, x, u)
        ref_grads = torch.autograd.grad((ref * w).sum(), [*leaves, x, u])
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    def sym_value(C, c, x, u):  # C enters symmetrized: gradients along symmetric directions
        return value(0.5 * (C + C.mT), c, x, u)

    small = [t[:1, :2].detach().clone().requires_grad_(True) for t in (*leaves, x, u)]
    B, T = 1, 2
    assert gradcheck(sym_value, small)
    assert gradgradcheck(sym_value, small)


@needs_native
@pytest.mark.parametrize("batch_last", [False, True])
def test_homogeneous_dynamics_and_cost_equal_pytorch(make_problem, batch_last):
    """Both storages (time-major, and the one-control pass's batch-last), from time-major,
    broadcast and transposed operands: the same numbers as the PyTorch builders, to the bit."""
    prob = make_problem(5, 6, 3, 2, seed=6)
    F = prob.F.transpose(0, 1).contiguous().transpose(0, 1)  # time-major storage
    for d in (prob.f, None, prob.f[0].expand(5, 5, 3)):
        got = _spied("homogeneous", lqr.homogeneous_dynamics, F, d, batch_last)
        with native.enabled(False):
            assert torch.equal(got, lqr.homogeneous_dynamics(F, d, batch_last))
    C_shared = prob.C[0, 0].expand(5, 6, 5, 5)
    c_t = prob.c.transpose(0, 1).contiguous().transpose(0, 1)
    for C, c in ((prob.C, prob.c), (C_shared, c_t), (prob.C.mT, prob.c[:1].expand(5, 6, 5))):
        got = _spied("homogeneous_cost", lqr.homogeneous_cost, C, c, batch_last)
        with native.enabled(False):
            assert torch.equal(got, lqr.homogeneous_cost(C, c, batch_last))


@needs_native
@pytest.mark.parametrize("storage", ["batch-first", "batch-last"])
@pytest.mark.parametrize("mode", ["plain", "box", "fixed", "box+reg", "reg+floor", "box+floor"])
def test_one_control_pass_equals_pytorch(one_control_case, monkeypatch, mode, storage):
    """The compiled one-control pass (nonlinear solves of one-control systems run it every
    iteration) against the same pass in PyTorch operations, in each of its modes, on a batch of
    9 (a full vector group and a partial one) stored batch-first or batch-last, with an
    indefinite control block."""
    monkeypatch.setattr(lqr, "_SOA_MIN_BATCH", 1 if storage == "batch-last" else 10**9)
    prob, C, kw = one_control_case(mode, B=9, seed=8, bad=2)
    with torch.inference_mode():
        fast = _spied("scalar_riccati", lqr.riccati, C, prob.c, prob.F, prob.f, **kw)
        with native.enabled(False):
            ref = lqr.riccati(C, prob.c, prob.F, prob.f, **kw)
    _assert_same(fast, ref)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("operands", ["dense", "shared C", "blocks", "blocks for some"])
@pytest.mark.parametrize("mode", ["plain", "box", "box+reg", "reg+floor", "box+floor"])
def test_one_control_pass_on_raw_operands_equals_pytorch(one_control_case, mode, operands,
                                                         dtype):
    """``lqr.raw_scalar_pass`` (the compiled pass reading C, c and F themselves, as iLQR
    iterations call it) against ``lqr.riccati`` in PyTorch operations on the homogeneous costs
    and dynamics, on 9 samples (a partial vector group) with an indefinite control block: a C
    shared by every sample (broadcast strides), curvature blocks added at a coordinate that is
    not the first for every sample or for some (``newton``), float32."""
    prob, C, kw = one_control_case(mode, B=9, seed=5, bad=3)
    B, T, p = prob.c.shape
    cast = (lambda z: None if z is None else z.to(dtype))  # noqa: E731
    c, F = cast(prob.c), cast(prob.F)
    C = cast(C[0, 0].expand(B, T, p, p) if operands == "shared C" else C)
    kw = {k: cast(v) for k, v in kw.items()}
    blocks = newton = None
    C_ref = C
    if operands.startswith("blocks"):
        g = torch.Generator().manual_seed(11)
        Hb = torch.randn(T - 1, 4, 4, B, generator=g, dtype=torch.float64).to(dtype)
        Hb = 0.5 * (Hb + Hb.transpose(1, 2))
        newton = (torch.arange(B) % 3 != 1) if operands == "blocks for some" else None
        blocks = (Hb, 1)
        add = torch.zeros(B, T, p, p, dtype=dtype)
        add[:, :-1, 1:5, 1:5] = Hb.permute(3, 0, 1, 2)
        if newton is not None:
            add[~newton] = 0
        C_ref = C + add
    with torch.inference_mode():
        fast, calls = _spy("scalar_riccati_raw", lambda: lqr.raw_scalar_pass(
            C, c, F, kw.get("lower"), kw.get("upper"), kw.get("reg"), kw.get("uu_floor"),
            blocks, newton))
        assert calls == 1
        with native.enabled(False):
            ref = lqr.riccati(C_ref, c, F, None, **kw)
    assert fast.Fh is None
    close = {} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 2e-5}
    assert torch.equal(fast.ok, ref.ok) and torch.equal(fast.free, ref.free)
    if operands == "dense" and "floor" not in mode:
        assert not bool(fast.ok.all())  # the indefinite block is seen
    ok = fast.ok
    for name in ("K", "k", "L", "dV"):
        a, b = getattr(fast, name), getattr(ref, name)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a[ok], b[ok], msg=name,
                                   **(close or {"rtol": 1e-10, "atol": 1e-12}))


@needs_native
def test_box_ddp_on_a_one_control_lq_problem_checks_kkt_with_its_dynamics(make_problem):
    """Box-DDP iterations on a box-constrained one-control LQ problem (``ilqr`` with
    ``create_graph``, which skips the active-set passes): after a full step the KKT check, whose
    costate needs the pass's homogeneous dynamics, ends each sample; the compiled pass takes the
    same iterations as PyTorch operations (it took an extra one per sample where the compiled
    Gauss-Newton pass left the gains without Fh and the check saw no costate)."""
    import diffmpc as dm
    from diffmpc.expand import TrajCost, TrajDynamics
    from diffmpc.ilqr import SolverOptions, ilqr

    prob = make_problem(64, 12, 3, 1, seed=2)
    B, T, p = prob.c.shape
    lo = torch.full((B, T, 1), -0.3, dtype=torch.float64)
    out = []
    for on in (True, False):
        with native.enabled(on), torch.no_grad():
            cost = TrajCost(dm.QuadCost(prob.C, 3 * prob.c), B, T, 3, 1)
            dyn = TrajDynamics(dm.LinearDynamics(prob.F, prob.f), B, T, 3, 1)
            out.append(ilqr(prob.x_init, cost, dyn, torch.zeros_like(lo), lo, -lo,
                            SolverOptions(max_iter=100), create_graph=True))
    fast, ref = out
    assert bool(ref.converged.all()) and bool((ref.u.abs() >= 0.3 - 1e-12).any())
    assert torch.equal(fast.iterations, ref.iterations)
    torch.testing.assert_close(fast.u, ref.u, rtol=0, atol=1e-12)


def test_one_control_pass_on_raw_operands_refuses_what_it_cannot_take(one_control_case):
    """None (the caller takes the homogeneous pass) for several controls and for operands that
    record a graph; a misshapen block raises."""
    prob, C, _ = one_control_case("plain", B=3, seed=1, bad=0)
    several = torch.randn(3, 7, 6, 6, dtype=torch.float64)
    assert lqr.raw_scalar_pass(several, torch.zeros(3, 7, 6), torch.zeros(3, 6, 4, 6),
                               None, None) is None
    assert lqr.raw_scalar_pass(C.requires_grad_(True), prob.c, prob.F, None, None) is None
    if native.available():
        with torch.no_grad(), pytest.raises(ValueError, match="Hb"):
            lqr.raw_scalar_pass(C, prob.c, prob.F, None, None,
                                blocks=(torch.zeros(6, 4, 4, 2, dtype=torch.float64), 0))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", range(12))
def test_public_solve_and_gradients_equal_pytorch_on_random_shapes(make_problem, seed, dtype):
    """Through dm.MPC on random sizes (B 1-9, T 1-6, n 1-5, m 1-4, with and without bounds):
    the solution, the objective and the implicit gradients into every input are those of the
    PyTorch path (float32: to its precision)."""
    import diffmpc as dm

    g = torch.Generator().manual_seed(100 + seed)
    B, T, n, m = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in
                  ((1, 10), (1, 7), (1, 6), (1, 5)))
    box = seed % 2 == 1
    prob = make_problem(B, T, n, m, seed=seed)
    W = torch.randn(B, T, m, generator=g, dtype=torch.float64).to(dtype)
    out = []
    for on in (True, False):
        with native.enabled(on):
            leaves = [t.to(dtype).clone().requires_grad_(True)
                      for t in (prob.x_init, prob.C, prob.c, prob.F, prob.f)]
            x0, C, c, F, f = leaves
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            mpc = dm.MPC(n, m, T, -0.3 if box else None, 0.3 if box else None, tol=tol,
                         max_iter=100)
            sol = mpc(x0, dm.QuadCost(C, c), dm.LinearDynamics(F, f))
            ((sol.u * W).sum() + sol.objective.sum()).backward()
            out.append([sol.u.detach(), sol.objective.detach(), sol.converged]
                       + [t.grad for t in leaves])
    assert bool(out[0][2].all()) and torch.equal(out[0][2], out[1][2])
    close = ({"rtol": 1e-9, "atol": 1e-10} if dtype == torch.float64
             else {"rtol": 2e-4, "atol": 2e-4})
    for a, b in zip(out[0][:2] + out[0][3:], out[1][:2] + out[1][3:], strict=True):
        torch.testing.assert_close(a, b, **close)


def _every_kernel(prob, n: int):
    """Every kernel's outputs on ``prob`` (held controls, one-control pass included)."""
    C, c, F, f = prob.C, prob.c, prob.F, prob.f
    B, T, m = c.shape[0], c.shape[1], c.shape[-1] - n
    g = torch.Generator().manual_seed(1)
    free = torch.rand(B, T, m, generator=g) > 0.4
    held = torch.where(free, 0.0, torch.randn(B, T, m, generator=g, dtype=C.dtype))
    tau = torch.randn(B, T, n + m, generator=g, dtype=C.dtype)
    Fh = native.homogeneous(F, f)
    Fb = Fh.transpose(0, 1)
    blocks = [native.homogeneous(F, f, batch_last=True), native.homogeneous_cost(C, c),
              native.homogeneous_cost(C, c, batch_last=True)]
    ric = list(native.riccati(C, c, Fb, free, n, True, held=held, rows=True))
    Kh = ric[0].transpose(0, 1)
    x, u = native.rollout(Kh[..., 1:], Kh[..., 0], Fb, prob.x_init, True)
    out = blocks + ric + [Fh, x, u, native.multipliers(ric[4], x, u),
                          native.costate(c[..., :n], Fb[:, :, 1:, 1:n + 1]),
                          native.feedforward(c, Fb, Kh[..., 1:], free, ric[1].transpose(0, 1)),
                          native.matvec(C, tau), native.matvec(C, tau, trans=True),
                          *native.matvec_pair(F, tau, c[:, :-1, :n]),
                          native.outer(tau, tau, c, c, 0.5),
                          *native.quad_value(C, c, tau, with_product=True),
                          torch.tensor(native.check_cost(C.flatten(0, 1), n))]
    Ch = lqr.homogeneous_cost(C[..., :n + 1, :n + 1], c[..., :n + 1]).transpose(0, 1)
    Fh1 = native.homogeneous(F[..., :n + 1], f).transpose(0, 1)
    lo = torch.full((B, T), -0.3, dtype=C.dtype)
    out += native.scalar_riccati(Ch, Fh1, n, lo, -lo, None, None, None)
    Hb = torch.randn(T - 1, 4, 4, B, generator=g, dtype=C.dtype)
    out += native.scalar_riccati_raw(C[..., :n + 1, :n + 1], c[..., :n + 1], F[..., :n + 1], lo,
                                     -lo, None, None, Hb, 0, free[:, 0, 0])
    return out


@needs_native
def test_threads_split_the_batch_without_changing_a_digit(make_problem):
    """Every kernel at 1 thread and at 2 and 3 (the batch split into ranges of lane groups, 203
    samples: a partial group at the end, ranges of unequal length): identical outputs, to the
    bit. PyTorch's OpenMP threads run them where the build has OpenMP."""
    if not native.threaded():
        pytest.skip("the kernels were built without OpenMP")
    prob = make_problem(203, 6, 4, 3, seed=3)
    before = torch.get_num_threads()
    try:
        with torch.inference_mode():
            torch.set_num_threads(1)
            ref = _every_kernel(prob, 4)
            for threads in (2, 3):
                torch.set_num_threads(threads)
                assert native._threads(203, native._GRAIN) == min(threads, 3)
                got = _every_kernel(prob, 4)
                for i, (a, b) in enumerate(zip(got, ref, strict=True)):
                    assert torch.equal(a, b), (threads, i)
    finally:
        torch.set_num_threads(before)


_THREADED = """
import torch
from diffmpc import native
print(native.status(), native.threaded())
"""


def test_openmp_build_can_be_switched_off(tmp_path):
    """``DIFFMPC_NATIVE_OPENMP=0`` builds the kernels without OpenMP (each runs on the calling
    thread); a compiler without OpenMP gets the same build (its failed attempt is remembered)."""
    r = _python(_THREADED, DIFFMPC_NATIVE_OPENMP="0", DIFFMPC_CACHE_DIR=str(tmp_path))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    if native.available():
        assert r.stdout.split() == ["available", "False"]
        assert len(list(tmp_path.glob("lq-*.so"))) == 1
        r = _python(_THREADED, DIFFMPC_CACHE_DIR=str(tmp_path))
        assert r.stdout.split() == ["available", str(native.threaded())]


_FORKED = """
import os, torch
from diffmpc import native
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
A = torch.rand(256, 10, 15, 15, generator=g, dtype=torch.float64)
x = torch.rand(256, 10, 15, generator=g, dtype=torch.float64)
assert native._threads(256, native._GRAIN) == 2
y = native.matvec(A, x).numpy().tobytes()  # two threads: OpenMP's pool is made here
r, w = os.pipe()
pid = os.fork()
if pid == 0:  # compared with numpy: PyTorch's own parallel operations hang in a forked child
    same = native.matvec(A, x).numpy().tobytes() == y and native._threads(256, 64) == 1
    os.write(w, b"1" if same else b"0")
    os._exit(0)
os.waitpid(pid, 0)
print(os.read(r, 1).decode())
"""


@needs_native
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_kernels_run_on_one_thread_in_a_forked_child(tmp_path):
    """After a fork, the child's copy of OpenMP's thread pool has no threads behind it (GNU
    OpenMP hangs in the next parallel region): there the kernels run on the calling thread, with
    the same results."""
    if not native.threaded():
        pytest.skip("the kernels were built without OpenMP")
    r = _python(_FORKED)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"


@pytest.mark.skipif(os.name != "posix", reason="a shell script stands in for the compiler")
def test_a_failed_build_is_remembered(tmp_path):
    """A compiler that fails leaves a marker per build in the cache: the next process reports
    the earlier failure (and how to retry) without compiling again, and falls back as before."""
    cc = tmp_path / "fakecc"
    log = tmp_path / "calls"
    cc.write_text(f'#!/bin/sh\necho "$@" >> {log}\n'
                  'if [ "$1" = "--version" ]; then echo fakecc 1.0; exit 0; fi\n'
                  'echo "fakecc: cannot compile" >&2\nexit 1\n')
    cc.chmod(0o755)
    env = {"CC": str(cc), "DIFFMPC_CACHE_DIR": str(tmp_path / "cache")}
    first = _python(_SOLVE, **env)
    compiles = [line for line in log.read_text().splitlines() if "-o" in line.split()]
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[0].startswith("unavailable: ")
    assert "fakecc: cannot compile" in first.stdout
    assert len(compiles) == 2  # with OpenMP, then without
    assert len(list((tmp_path / "cache").glob("lq-*.failed"))) == 2
    second = _python(_SOLVE, **env)
    assert second.returncode == 0, second.stderr
    status = second.stdout.splitlines()[0]
    assert "an earlier build; delete" in status and "to retry" in status
    again = [line for line in log.read_text().splitlines() if "-o" in line.split()]
    assert len(again) == 2  # no new compile
    assert second.stdout.splitlines()[1] == first.stdout.splitlines()[1]  # the same solution


def _model_case(cls, dtype, B=37, T=12, A=5, seed=0):
    """A built-in model, its TrajDynamics and a line search's inputs: states off the unit circle
    (|(cos, sin)| from 0.5 to 3), one sample at cos = sin = 0, gains with non-contiguous K and
    bounds broadcast over the batch."""
    from diffmpc.expand import TrajDynamics

    g = torch.Generator().manual_seed(seed)
    model = cls(dtype=dtype)
    n = model.n_state
    x_init = torch.randn(B, n, generator=g, dtype=dtype)
    x_init[0, -3:-1] = 0.0  # the angle's (cos, sin): atan2(0, 0)
    x = torch.randn(B, T, n, generator=g, dtype=dtype)
    u = 3 * torch.randn(B, T, 1, generator=g, dtype=dtype)
    K = (0.3 * torch.randn(B, T, n, 1, generator=g, dtype=dtype)).transpose(-1, -2)
    k = torch.randn(B, T, 1, generator=g, dtype=dtype)
    alphas = 0.5 ** torch.arange(A, dtype=dtype)
    one = torch.ones((), dtype=dtype)
    lo, hi = (-one).expand(B, T, 1), one.expand(B, T, 1)  # most controls at a bound
    gains = lqr.Gains(K, k, None, None, None)
    return model, TrajDynamics(model, B, T, n, 1), x_init, x, u, gains, alphas, lo, hi


@needs_native
@pytest.mark.parametrize("name", ["Pendulum", "Cartpole"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_built_in_model_rollouts_equal_the_models_steps(name, dtype):
    """The compiled Euler steps of Pendulum and Cartpole (open loop, and the line search's closed
    loop for several step sizes, clamped to a box most controls hit, with the rollouts' costs)
    against the models' PyTorch steps and ``TrajCost.value``: the same states, controls and
    costs to rounding (float32: the kernel computes in double), NaN where the start is NaN, in
    that sample only."""
    from diffmpc import ilqr, systems
    from diffmpc.expand import TrajCost

    model, dyn, x_init, x, u, gains, alphas, lo, hi = _model_case(getattr(systems, name), dtype)
    B, T, n = x.shape
    x_init[1, -3] = float("nan")  # the angle's cosine
    cost = TrajCost(model.default_cost().quad_cost(), B, T, n, 1)
    C = cost.C + 0.1 * torch.randn(B, T, n + 1, n + 1, dtype=dtype)  # per sample and step
    C = 0.5 * (C + C.mT)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    spec = model._native_model()
    with torch.no_grad():
        X0, U0, J0 = native.model_rollout(*spec, x_init, u)
        X1, U1, J1 = native.model_rollout(*spec, x_init, u, x, gains.K, gains.k, alphas, lo, hi,
                                          cost.C, cost.c)
        _, _, J2 = native.model_rollout(*spec, x_init, u, x, gains.K, gains.k, alphas, lo, hi,
                                        C, cost.c)
        with native.enabled(False):
            R0 = ilqr.rollout(dyn, x_init, u)
            S1, V1 = ilqr._closed_loop(dyn, x_init, x, u, gains, alphas, lo, hi)
            Q1 = cost.value(S1, V1).sum(-1)
            cost.C = C
            Q2 = cost.value(S1, V1).sum(-1)
    assert J0 is None and torch.equal(U0[0], u)
    assert X0.shape == (1, B, T, n) and X1.shape == S1.shape and U1.shape == V1.shape
    assert X0.dtype == dtype and X1.dtype == dtype and J1.shape == (alphas.shape[0], B)
    torch.testing.assert_close(X0[0], R0, equal_nan=True, **tol)
    torch.testing.assert_close(X1, S1, equal_nan=True, **tol)
    torch.testing.assert_close(U1, V1, equal_nan=True, **tol)
    torch.testing.assert_close(J1, Q1, equal_nan=True, **tol)
    torch.testing.assert_close(J2, Q2, equal_nan=True, **tol)
    assert bool(X1[:, 1, 3:].isnan().all()) and not bool(X1[:, 2:].isnan().any())
    clamped = (U1[:, 2:] == hi[2:]) | (U1[:, 2:] == lo[2:])
    assert 0.3 < clamped.double().mean() < 1.0
    # the sample at cos = sin = 0 stepped as atan2 does (angle 0), not into NaN
    assert bool(X0[0, 0].isfinite().all())


@needs_native
@pytest.mark.parametrize("name", ["Pendulum", "Cartpole"])
def test_compiled_line_search_takes_the_steps_the_pytorch_search_takes(name):
    """``native.model_search`` (each sample tries the step sizes in turn, stopping at the first
    it takes) against ``ilqr._search`` in PyTorch operations (every size at once, then the
    largest accepted): the same step index and found flag per sample, the same trajectory and
    cost. The current costs J0 are set so that samples take different sizes, none, or the full
    step only by the rounding-floor rule."""
    from diffmpc import ilqr, systems
    from diffmpc.expand import TrajCost

    model, dyn, x_init, x, u, gains, alphas, lo, hi = _model_case(getattr(systems, name),
                                                                  torch.float64, B=40, A=6)
    B, T, n = x.shape
    cost = TrajCost(model.default_cost().quad_cost(), B, T, n, 1)
    with torch.no_grad(), native.enabled(False):
        S, V = ilqr._closed_loop(dyn, x_init, x, u, gains, alphas, lo, hi)
        Jc = cost.value(S, V).sum(-1)  # [A, B]
    g = torch.Generator().manual_seed(5)
    pick = torch.randint(0, alphas.shape[0], (B,), generator=g)
    J0 = Jc[pick, torch.arange(B)] * (1 + 1e-6) + 1e-6
    J0[:4] = -float("inf")  # no step lowers it
    floor = torch.full((B,), 1e-3, dtype=torch.float64)
    near = torch.zeros(B, dtype=torch.bool)
    J0[4:8] = Jc[0, 4:8] - 5e-4  # the full step within the floor: taken where near
    near[4:6] = True
    args = (x_init, cost, dyn, x, u, J0, gains, lo, hi, alphas, floor, near)
    with torch.no_grad():
        fast, calls = _spy("model_search", lambda: ilqr._search(*args))
        assert calls, "the compiled search was not used"
        with native.enabled(False):
            ref = ilqr._search(*args)
    assert torch.equal(fast[4], ref[4]) and torch.equal(fast[3], ref[3])
    assert not bool(fast[4][:4].any()) and bool(fast[4][4:6].all())
    assert bool(fast[2][:4].isinf().all())  # stopped by the bound on the stages left
    assert torch.equal(fast[3][4:6], torch.zeros(2, dtype=torch.long))
    assert len(set(fast[3][fast[4]].tolist())) >= 3
    ok = fast[4]
    for a, b in zip(fast[:3], ref[:3], strict=True):
        torch.testing.assert_close(a[ok], b[ok], rtol=1e-12, atol=1e-12)


@needs_native
def test_built_in_model_rollouts_do_not_depend_on_threads():
    """203 samples times 3 step sizes split over 1, 2 and 3 threads, rollouts and line search:
    the same bits."""
    if not native.threaded():
        pytest.skip("the kernels were built without OpenMP")
    from diffmpc.systems import Cartpole

    model, _, x_init, x, u, gains, alphas, lo, hi = _model_case(Cartpole, torch.float64, B=203,
                                                                A=3)
    quad = model.default_cost().quad_cost()
    C, c = quad.C.expand(203, 12, 6, 6), quad.c.expand(203, 12, 6)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            spec = model._native_model()
            out = native.model_rollout(*spec, x_init, u, x, gains.K, gains.k, alphas, lo, hi, C, c)
            J0 = out[2][1] + 1e-9  # the second size is taken where the first is not lower
            out += native.model_search(*spec, x_init, u, x, gains.K, gains.k, alphas, lo, hi, C,
                                       c, J0, torch.zeros_like(J0), J0 < 0)
            outs.append(out)
    finally:
        torch.set_num_threads(before)
    for out in outs[1:]:
        for a, b in zip(out, outs[0], strict=True):
            assert torch.equal(a, b)


def test_changed_or_rk4_models_keep_their_pytorch_steps():
    """A subclass that changes the physics or its derivatives, and RK4, have no compiled step: a
    solve then follows the model it was given (every transition of the solution is the model's
    step)."""
    import diffmpc as dm
    from diffmpc.systems import Cartpole, Pendulum

    class Damped(Pendulum):
        def _step(self, x, u, consts):
            nxt = super()._step(x, u, consts)
            return torch.cat([nxt[..., :2], 0.5 * nxt[..., 2:]], -1)

    class Heavy(Cartpole):
        def accel(self, *args, **kw):
            pdd, thdd = super().accel(*args, **kw)
            return 2 * pdd, thdd

    class OwnJacobian(Pendulum):  # derivatives by autograd, say
        def jacobian(self, x, u):
            return None

    assert Pendulum()._native_model()[0] == 1 and Cartpole()._native_model()[0] == 2
    assert OwnJacobian()._native_model() is None
    for model in (Damped(dtype=torch.float64), Heavy(dtype=torch.float64),
                  Pendulum(method="rk4", dtype=torch.float64),
                  Cartpole(method="rk4", dtype=torch.float64)):
        assert model._native_model() is None, model
        n, T = model.n_state, 8
        x_init = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        if n == 3:
            x_init[:, :2] = torch.nn.functional.normalize(x_init[:, :2], dim=-1)
        cost = model.default_cost().quad_cost()
        mpc = dm.MPC(n, 1, T, model.u_lower, model.u_upper, max_iter=5, unconverged="keep")
        with torch.no_grad():
            sol = mpc(x_init, cost, model)
            torch.testing.assert_close(sol.x[:, 1:], model(sol.x[:, :-1].reshape(-1, n),
                                       sol.u[:, :-1].reshape(-1, 1)).view(4, T - 1, n),
                                       rtol=1e-12, atol=1e-12)


@needs_native
def test_model_rollouts_stay_in_pytorch_where_grad_is_recorded():
    """Unrolled gradients go through the rollouts: with grad recording and parameters that
    require it, the rollout is PyTorch's (it has a graph to the model's parameters)."""
    from diffmpc import ilqr
    from diffmpc.expand import TrajDynamics
    from diffmpc.systems import Pendulum

    model = Pendulum(dtype=torch.float64)
    dyn = TrajDynamics(model, 2, 5, 3, 1)
    x_init = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.5]], dtype=torch.float64)
    u = torch.ones(2, 5, 1, dtype=torch.float64)
    with torch.no_grad():  # compiled (and the constants cached for no-grad calls)
        _, calls = _spy("model_rollout", lambda: ilqr.rollout(dyn, x_init, u))
    assert calls == 1
    x, calls = _spy("model_rollout", lambda: ilqr.rollout(dyn, x_init, u))
    assert not calls and x.requires_grad
    x[:, -1].sum().backward()
    assert model.log_m.grad is not None and model.log_m.grad.abs() > 0
    with pytest.raises(ValueError, match="model: expected 1"):
        native.model_rollout(3, torch.ones(3, dtype=torch.float64), x_init, u)


@needs_native
@pytest.mark.parametrize("name", ["Pendulum", "Cartpole"])
def test_swing_up_solves_with_compiled_rollouts_equal_pytorch(name):
    """A whole swing-up solve (T = 20, 12 random starts) and its gradients, with the models'
    compiled steps and without: the same solution, iterations and gradients to rounding."""
    import math

    import diffmpc as dm
    from diffmpc import systems

    model = getattr(systems, name)(dtype=torch.float64)
    n, T, B = model.n_state, 20, 12
    g = torch.Generator().manual_seed(2)
    th = (2 * torch.rand(B, generator=g, dtype=torch.float64) - 1) * math.pi
    x0 = 0.5 * torch.randn(B, n, generator=g, dtype=torch.float64)
    x0[:, -3], x0[:, -2] = th.cos(), th.sin()
    W = torch.randn(B, T, 1, generator=g, dtype=torch.float64)
    mpc = dm.MPC(n, 1, T, model.u_lower, model.u_upper, unconverged="keep")
    out = []
    for on in (True, False):
        x_init = x0.clone().requires_grad_(True)
        model.zero_grad()
        with native.enabled(on):
            sol, calls = _spy("model_search",
                              lambda: mpc(x_init, model.default_cost().quad_cost(), model))  # noqa: B023
            (sol.u * W).sum().backward()
        assert bool(calls) == on
        out.append((sol, x_init.grad, [p.grad.clone() for p in model.parameters()]))
    (a, ga, pa), (b, gb, pb) = out
    assert bool(a.converged.all()) and torch.equal(a.iterations, b.iterations)
    torch.testing.assert_close(a.u, b.u, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ga, gb, rtol=1e-7, atol=1e-9)
    for x, y in zip(pa, pb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-7, atol=1e-9)


@needs_native
@pytest.mark.parametrize("name", ["Pendulum", "Cartpole"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_built_in_model_derivatives_equal_autograd(name, dtype):
    """The compiled Jacobian and costate-weighted curvature of the built-in Euler steps
    (``TrajDynamics.jacobian`` and ``curvature_blocks`` on CPU tensors) against autograd of the
    models' PyTorch steps, at states off the unit circle and with strided operands."""
    from diffmpc import systems
    from diffmpc.expand import TrajDynamics

    g = torch.Generator().manual_seed(4)
    model = getattr(systems, name)(dtype=torch.float64)
    n, B, T = model.n_state, 6, 7
    x = torch.randn(B, T, n, generator=g, dtype=torch.float64)
    u = 3 * torch.randn(B, T, 1, generator=g, dtype=torch.float64)
    lam = torch.randn(B, n, T, generator=g, dtype=torch.float64).transpose(1, 2)  # strided

    def step(z, w):  # sum_i w_i f_i(z) for one row
        return (model(z[None, :n], z[None, n:])[0] * w).sum()

    z = torch.cat([x[:, :-1], u[:, :-1]], -1).reshape(-1, n + 1)
    w = lam[:, 1:].reshape(-1, n)
    J_ref = torch.stack([torch.autograd.functional.jacobian(
        lambda zz: model(zz[None, :n], zz[None, n:])[0], zi) for zi in z]).view(B, T - 1, n, n + 1)
    H_ref = torch.stack([torch.autograd.functional.hessian(lambda zz, wi=wi: step(zz, wi), zi)
                         for zi, wi in zip(z, w, strict=True)]).view(B, T - 1, n + 1, n + 1)
    cast = (lambda t: t.to(dtype))  # noqa: E731
    if dtype == torch.float32:
        model = model.float()
    dyn = TrajDynamics(model, B, T, n, 1)
    with torch.no_grad():
        (J, blocks), calls = _spy("model_expansion", lambda: (
            dyn.jacobian(cast(x)[:, :-1], cast(u)[:, :-1]),
            dyn.curvature_blocks(cast(x), cast(u), cast(lam))))
    assert calls == 2
    Hb, first = blocks
    H = torch.zeros(B, T - 1, n + 1, n + 1, dtype=dtype)
    H[..., first:first + 4, first:first + 4] = Hb.permute(3, 0, 1, 2)
    tol = dict(rtol=1e-11, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(J, J_ref.to(dtype), **tol)
    torch.testing.assert_close(H, H_ref.to(dtype), **tol)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [2, 7])
@pytest.mark.parametrize("name", ["Pendulum", "Cartpole"])
def test_newton_expansion_is_its_three_parts_in_one_pass(name, T, dtype):
    """``TrajDynamics.newton_expansion`` (``native.model_newton``: the Jacobians, the costate and
    the curvature blocks in one backward pass per sample) gives, to the bit, what ``jacobian``,
    ``lqr.costate`` and ``curvature_blocks`` give one after the other; strided operands, 9
    samples. An RK4 model (no compiled step) gets None."""
    from diffmpc import systems
    from diffmpc.expand import TrajDynamics

    g = torch.Generator().manual_seed(9)
    model = getattr(systems, name)(dtype=dtype)
    n, B = model.n_state, 9
    x = torch.randn(B, n, T, generator=g, dtype=torch.float64).transpose(1, 2).to(dtype)
    u = 3 * torch.randn(B, T, 1, generator=g, dtype=torch.float64).to(dtype)
    gx = torch.randn(T, B, n, generator=g, dtype=torch.float64).transpose(0, 1).to(dtype)
    dyn = TrajDynamics(model, B, T, n, 1)
    with torch.no_grad():
        (F, lam, (Hb, first)), calls = _spy("model_newton",
                                            lambda: dyn.newton_expansion(x, u, gx))
        assert calls == 1
        F_ref = dyn.jacobian(x[:, :-1], u[:, :-1])
        lam_ref = lqr.costate(gx, F_ref[..., :n].transpose(0, 1))
        Hb_ref, first_ref = dyn.curvature_blocks(x, u, lam_ref)
    assert torch.equal(F, F_ref) and torch.equal(lam, lam_ref)
    assert torch.equal(Hb, Hb_ref) and first == first_ref
    rk4 = TrajDynamics(getattr(systems, name)(dtype=dtype, method="rk4"), B, T, n, 1)
    with torch.no_grad():
        assert rk4.newton_expansion(x, u, gx) is None


def test_stage_cost_bounds_of_the_line_search():
    """``TrajCost.rest_minima``: the least the stages after each step can cost, from numpy's
    solves of each stage's minimum (``-c' C^-1 c / 2``), per sample and step; -inf where a C is
    not positive definite; a subset's rows are the batch's."""
    import numpy as np

    from diffmpc import QuadCost
    from diffmpc.expand import TrajCost

    g = torch.Generator().manual_seed(7)
    B, T, p = 3, 5, 4
    M = torch.randn(B, T, p, p, generator=g, dtype=torch.float64)
    C = M @ M.mT + 0.5 * torch.eye(p, dtype=torch.float64)
    c = torch.randn(B, T, p, generator=g, dtype=torch.float64)
    cost = TrajCost(QuadCost(C, c), B, T, 3, 1)
    Cn, cn = C.numpy(), c.numpy()
    low = np.array([[-0.5 * cn[b, t] @ np.linalg.solve(Cn[b, t], cn[b, t]) for t in range(T)]
                    for b in range(B)])
    ref = np.array([[low[b, t + 1:].sum() for t in range(T)] for b in range(B)])
    np.testing.assert_allclose(cost.rest_minima().numpy(), ref, rtol=1e-12, atol=1e-12)
    idx = torch.tensor([2, 0])
    torch.testing.assert_close(cost.subset(idx).subset(torch.tensor([1])).rest_minima(),
                               torch.from_numpy(ref[[0]]))
    # one C for every sample and step (broadcast), and one that is not positive definite
    shared = TrajCost(QuadCost(C[0, 0], c[0, 0]), B, T, 3, 1).rest_minima()
    low0 = -0.5 * cn[0, 0] @ np.linalg.solve(Cn[0, 0], cn[0, 0])
    np.testing.assert_allclose(shared.numpy(), np.tile(low0 * np.arange(T - 1, -1, -1), (B, 1)),
                               rtol=1e-12)
    C2 = C.clone()
    C2[1, 3] = -torch.eye(p, dtype=torch.float64)
    rest = TrajCost(QuadCost(C2, c), B, T, 3, 1).rest_minima()
    assert bool(rest[1, :3].isneginf().all()) and bool(rest[1, 3:].isfinite().all())
    assert bool(rest[[0, 2]].isfinite().all())


_FIRST_SOLVE = """
import sys
import torch
import diffmpc as dm
from diffmpc.systems import Cartpole, Pendulum
heavy = "sympy" in sys.modules
for model in (Pendulum(dtype=torch.float64), Cartpole(dtype=torch.float64)):
    x0 = torch.zeros(4, model.n_state, dtype=torch.float64)
    x0[:, -3] = -1.0
    mpc = dm.MPC(model.n_state, 1, 10, model.u_lower, model.u_upper, max_iter=3,
                 unconverged="keep")
    mpc(x0, model.default_cost(), model)
print(heavy, "sympy" in sys.modules)
"""


def test_a_first_solve_imports_nothing_heavy():
    """A process's first swing-up solve (a policy's first step) must not pull in sympy through a
    PyTorch helper (``torch.broadcast_shapes`` does: 0.3 s of imports on first use)."""
    out = subprocess.run([sys.executable, "-c", _FIRST_SOLVE], capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    if out[0] == "True":
        pytest.skip("this PyTorch imports sympy by itself")
    assert out == ["False", "False"]
