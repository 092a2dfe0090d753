"""MPC on LQR and box-LQR problems: solutions against cvxpy, gradients against finite differences.

Reference answers come from the ``reference`` fixture (cvxpy + Clarabel on the stacked QP) and
from central finite differences of the whole solve; never from diffmpc itself.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.autograd import gradcheck

import diffmpc as dm

MODES = ["implicit", "gauss_newton", "unroll"]
NAMES = ("x_init", "C", "c", "F", "f")

# every test here runs three times: with the sequential Riccati recursions, compiled and in PyTorch
# operations, and with their scans over time (the ``recursion`` fixture of conftest.py)
pytestmark = pytest.mark.usefixtures("recursion")


def solve(x_init, C, c, F, f, lower=None, upper=None, backward="implicit", T=None, u_init=None,
          **options):
    """One MPC solve of an LQR problem with tight tolerances; raises if a sample is unconverged."""
    n, p = x_init.shape[-1], C.shape[-1]
    kw = {"tol": 1e-12, "max_iter": 100, "unconverged": "raise", **options}
    mpc = dm.MPC(n, p - n, T or C.shape[-3], lower, upper, backward=backward, **kw)
    return mpc(x_init, dm.QuadCost(C, c), dm.LinearDynamics(F, f), u_init=u_init)


def tensors(prob, requires_grad: bool = False) -> list[torch.Tensor]:
    return [getattr(prob, k).clone().requires_grad_(requires_grad) for k in NAMES]


def sym(C):
    return 0.5 * (C + C.mT)


def box_tensors(b: float, prob, requires_grad: bool = False):
    B, T, _, m = prob.sizes
    lo = torch.full((B, T, m), -b, dtype=prob.C.dtype)
    return lo.requires_grad_(requires_grad), (-lo.detach()).requires_grad_(requires_grad)


# ----------------------------------------------------------------------------- forward vs cvxpy


@pytest.mark.parametrize("B,T,n,m,seed", [(4, 6, 4, 3, 0), (3, 12, 6, 2, 1), (2, 5, 3, 4, 2)])
def test_unconstrained_matches_cvxpy(make_problem, reference, B, T, n, m, seed):
    prob = make_problem(B, T, n, m, seed)
    ref = reference(prob)
    sol = solve(*tensors(prob))
    assert bool(sol.converged.all())
    assert (sol.u - ref.u).abs().max() <= 1e-6
    assert (sol.x - ref.x).abs().max() <= 1e-6
    torch.testing.assert_close(sol.objective, ref.objective, rtol=1e-8, atol=1e-6)


@pytest.mark.parametrize("B,T,n,m,seed", [(4, 6, 4, 3, 0), (3, 12, 6, 2, 1), (6, 8, 3, 3, 3)])
def test_box_matches_cvxpy(make_problem, box_for_fraction, fraction_active, B, T, n, m, seed):
    prob = make_problem(B, T, n, m, seed)
    b, ref = box_for_fraction(prob, 0.3, 0.4)
    assert 0.3 <= fraction_active(ref, -b, b) <= 0.4
    sol = solve(*tensors(prob), -b, b)
    assert bool(sol.converged.all())
    assert (sol.u - ref.u).abs().max() <= 1e-6
    assert (sol.x - ref.x).abs().max() <= 1e-6
    assert float(sol.u.abs().max()) <= b * (1 + 1e-12)
    torch.testing.assert_close(sol.objective, ref.objective, rtol=1e-8, atol=1e-6)
    assert 0.3 <= float(((sol.u.abs() - b).abs() <= 1e-9).double().mean()) <= 0.4


def test_box_tensor_bounds_with_infinities_match_cvxpy(make_problem, reference):
    """Per-entry bounds of random widths; some entries unbounded on one side or both."""
    B, T, n, m = 3, 7, 4, 3
    prob = make_problem(B, T, n, m, seed=4)
    g = torch.Generator().manual_seed(5)
    center = 0.3 * torch.randn(B, T, m, generator=g, dtype=torch.float64)
    width = 0.2 + torch.rand(B, T, m, generator=g, dtype=torch.float64)
    lower, upper = center - width, center + width
    lower[torch.rand(B, T, m, generator=g) < 0.2] = -float("inf")
    upper[torch.rand(B, T, m, generator=g) < 0.2] = float("inf")
    ref = reference(prob, lower, upper)
    sol = solve(*tensors(prob), lower, upper)
    assert (sol.u - ref.u).abs().max() <= 1e-6
    assert bool(((sol.u >= lower) & (sol.u <= upper)).all())


def test_fully_clamped_controls_match_cvxpy(make_problem, reference):
    """Bounds so tight that every control sits at a bound; a fixed control (lower == upper)."""
    prob = make_problem(2, 5, 3, 2, seed=6)
    lower = torch.full((2, 5, 2), -1e-3, dtype=torch.float64)
    upper = torch.full((2, 5, 2), 1e-3, dtype=torch.float64)
    lower[0, 2, 1] = upper[0, 2, 1] = 0.25
    ref = reference(prob, lower, upper)
    sol = solve(*tensors(prob), lower, upper)
    assert (sol.u - ref.u).abs().max() <= 1e-6
    assert float(sol.u[0, 2, 1]) == 0.25


# --------------------------------------------------------------------------------- gradcheck


def _gradcheck_fn(lower_upper_given: bool, backward: str):
    def fn(x_init, C_raw, c, F, f, *bounds):
        lo, hi = bounds if lower_upper_given else (None, None)
        sol = solve(x_init, sym(C_raw), c, F, f, lo, hi, backward=backward)
        return sol.x, sol.u, sol.objective

    return fn


@pytest.mark.parametrize("backward", MODES)
def test_gradcheck_unconstrained(make_problem, backward):
    prob = make_problem(2, 3, 2, 2, seed=7)
    assert gradcheck(_gradcheck_fn(False, backward), tuple(tensors(prob, True)),
                     eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("backward", MODES)
def test_gradcheck_box(make_problem, box_for_fraction, backward):
    """Box problem with margins: active bounds have multipliers >= 1e-2, inactive controls are
    >= 1e-2 from their bounds, so a 1e-6 perturbation changes no active set."""
    prob = make_problem(2, 3, 2, 2, seed=1)
    b, ref = box_for_fraction(prob, 0.25, 0.5)
    _assert_margins(ref, b, 1e-2)
    args = (*tensors(prob, True), *box_tensors(b, prob, True))
    assert gradcheck(_gradcheck_fn(True, backward), args, eps=1e-6, atol=1e-6, rtol=1e-5)


def _assert_margins(ref, b: float, margin: float):
    act = ref.u.abs() >= b - 1e-7
    mu = ref.mu_lower + ref.mu_upper
    assert bool(act.any()) and bool((~act).any())
    assert float(mu[act].min()) >= margin, "a tie at the bounds: pick another seed"
    assert float((b - ref.u.abs())[~act].min()) >= margin, "a tie at the bounds: pick another seed"


# --------------------------------------------------- whole-solve central finite differences


def _losses(prob):
    """Three fixed random linear losses, on sol.x, sol.u and sol.objective."""
    B, T, n, m = prob.sizes
    g = torch.Generator().manual_seed(11)
    Wx = torch.randn(B, T, n, generator=g, dtype=torch.float64)
    Wu = torch.randn(B, T, m, generator=g, dtype=torch.float64)
    wo = torch.randn(B, generator=g, dtype=torch.float64)
    return {"x": lambda s: (Wx * s.x).sum(), "u": lambda s: (Wu * s.u).sum(),
            "objective": lambda s: (wo * s.objective).sum()}


def _directions(args, seed=12):
    g = torch.Generator().manual_seed(seed)
    ds = [torch.randn(a.shape, generator=g, dtype=a.dtype) for a in args]
    ds[1] = sym(ds[1])  # C: symmetric perturbations
    return ds


def _fd_check(args, backward: str, losses, h=1e-5, rtol=1e-6):
    """Directional derivative of each loss along a random direction of each input: autograd
    (the given backward mode) against a central difference of the whole solve."""
    dirs = _directions(args)
    leaves = [a.detach().clone().requires_grad_(True) for a in args]
    sol = solve(*leaves[:5], *leaves[5:], backward=backward)
    analytic = {}
    for name, loss in losses.items():
        grads = torch.autograd.grad(loss(sol), leaves, retain_graph=True, allow_unused=True)
        analytic[name] = [0.0 if g is None else float((g * d).sum()) for g, d in zip(grads, dirs,
                                                                                      strict=True)]
    for i, d in enumerate(dirs):
        with torch.no_grad():
            plus = [x + h * d if j == i else x for j, x in enumerate(args)]
            minus = [x - h * d if j == i else x for j, x in enumerate(args)]
            s_plus, s_minus = solve(*plus[:5], *plus[5:]), solve(*minus[:5], *minus[5:])
        for name, loss in losses.items():
            fd = float(loss(s_plus) - loss(s_minus)) / (2 * h)
            label = (NAMES + ("u_lower", "u_upper"))[i]
            got = analytic[name][i]
            assert abs(got - fd) <= rtol * (1 + abs(fd)), (name, label, got, fd)


@pytest.mark.parametrize("backward", MODES)
def test_finite_differences_unconstrained(make_problem, backward):
    prob = make_problem(3, 8, 4, 3, seed=8)
    _fd_check(tensors(prob), backward, _losses(prob))


@pytest.mark.parametrize("backward", MODES)
def test_finite_differences_box(make_problem, box_for_fraction, backward):
    prob = make_problem(3, 8, 4, 3, seed=1)
    b, ref = box_for_fraction(prob, 0.3, 0.4)
    _assert_margins(ref, b, 1e-3)
    _fd_check(tensors(prob) + list(box_tensors(b, prob)), backward, _losses(prob))


@pytest.mark.parametrize("target", ["c", "C", "F"])
@pytest.mark.parametrize("box", [False, True])
def test_double_backward_matches_finite_differences(make_problem, box_for_fraction, box, target):
    """Second derivatives through the implicit backward (create_graph): the derivative in x_init
    of ``||dL/d target||^2`` against central differences of the first derivative. The forward's
    factorization, which the backward reuses, must serve a graph here as well. dL/dC and dL/dF
    depend on the solution itself (``dL/dC = sym(w tau')``), so their derivative needs the
    solution's own dependence on x_init inside the backward's graph, which a first-order
    backward leaves out."""
    prob = make_problem(3, 8, 4, 3, seed=1)
    bounds = ()
    if box:
        b, ref = box_for_fraction(prob, 0.3, 0.4)
        _assert_margins(ref, b, 1e-3)
        bounds = box_tensors(b, prob)
    B, T, _, m = prob.sizes
    W = torch.randn(B, T, m, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    d = torch.randn(prob.x_init.shape, generator=torch.Generator().manual_seed(14),
                    dtype=torch.float64)
    k = NAMES.index(target)

    def grad_norm(x_init, create_graph=False):
        leaves = tensors(prob)
        leaves[0] = x_init
        leaves[k].requires_grad_(True)
        sol = solve(*leaves, *bounds)
        (g,) = torch.autograd.grad((W * sol.u).sum() + sol.u.square().sum(), leaves[k],
                                   create_graph=create_graph)
        return g.square().sum()

    x0 = prob.x_init.clone().requires_grad_(True)
    (h,) = torch.autograd.grad(grad_norm(x0, create_graph=True), x0)
    eps = 1e-5
    fd = (grad_norm(prob.x_init + eps * d) - grad_norm(prob.x_init - eps * d)) / (2 * eps)
    got = float((h * d).sum())
    assert abs(got - float(fd)) <= 1e-6 * (1 + abs(float(fd))), (got, float(fd))
    assert abs(got) > 1e-3


def test_first_order_backward_runs_one_adjoint_solve(make_problem, monkeypatch):
    """The second-order machinery costs a first-order backward nothing: one adjoint solve.
    A backward with create_graph and the one after it solve more (and are checked above)."""
    import diffmpc.mpc as mpc_mod

    calls = []
    real = mpc_mod._AdjointSolve.backward

    def counted(ctx, *grads):
        calls.append(torch.is_grad_enabled())
        return real(ctx, *grads)

    monkeypatch.setattr(mpc_mod._AdjointSolve, "backward", staticmethod(counted))
    prob = make_problem(2, 5, 3, 2, seed=0)
    leaves = tensors(prob, True)
    sol = solve(*leaves)
    torch.autograd.grad(sol.u.square().sum(), leaves)
    assert calls == [False]
    calls.clear()
    sol = solve(*leaves)
    (gC,) = torch.autograd.grad(sol.u.square().sum(), leaves[1], create_graph=True)
    torch.autograd.grad(gC.square().sum(), leaves[0])
    assert len(calls) > 2


def _mode_grads(prob, bounds):
    losses = _losses(prob)
    grads = {}
    for mode in MODES:
        leaves = [a.requires_grad_(True) for a in tensors(prob) + [t.clone() for t in bounds]]
        sol = solve(*leaves[:5], *leaves[5:], backward=mode)
        loss = sum(fn(sol) for fn in losses.values())
        grads[mode] = torch.autograd.grad(loss, leaves)
    return grads


@pytest.mark.parametrize("box", [False, True])
def test_backward_modes_agree_for_linear_dynamics(make_problem, box_for_fraction, box):
    """The three modes agree on every gradient (on C: on its symmetric part, the only part a
    symmetric C can move along)."""
    prob = make_problem(3, 6, 4, 3, seed=1)
    bounds = box_tensors(box_for_fraction(prob)[0], prob) if box else ()
    grads = _mode_grads(prob, bounds)
    for mode in MODES[1:]:
        for name, a, b in zip(NAMES + ("u_lower", "u_upper"), grads["implicit"], grads[mode],
                              strict=False):
            if name == "C":
                a, b = sym(a), sym(b)
            torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-9, msg=f"{mode}, {name}")


@pytest.mark.parametrize("box", [False, True])
def test_gradient_wrt_C_is_symmetric_in_every_mode(make_problem, box):
    """C is required to be symmetric, and the solution depends on C only through it, so
    d loss / dC is symmetric; a non-symmetric gradient makes a gradient step on a leaf C
    asymmetric (and the next call rejects it). Fails for "unroll" (see the report)."""
    prob = make_problem(3, 6, 4, 3, seed=1)
    bounds = box_tensors(0.5, prob) if box else ()
    for mode, g in _mode_grads(prob, bounds).items():
        asym, size = float((g[1] - g[1].mT).abs().max()), float(g[1].abs().max())
        assert asym <= 1e-9 * (1 + size), f"{mode}: max |dC - dC^T| = {asym:.3g}, max |dC| = {size:.3g}"


# ------------------------------------------------------------------- batching, sizes, dtypes


@pytest.mark.parametrize("box", [False, True])
def test_batched_equals_one_by_one(make_problem, box):
    B, T, n, m = 5, 6, 3, 2
    prob = make_problem(B, T, n, m, seed=9)
    bound = 0.5 if box else None
    leaves = tensors(prob, True)
    sol = solve(*leaves, None if bound is None else -bound, bound)
    w = torch.randn(B, T, m, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = torch.autograd.grad((w * sol.u).sum() + sol.objective.sum(), leaves)
    for i in range(B):
        one = tensors(prob.sample(i), True)
        s1 = solve(*one, None if bound is None else -bound, bound)
        torch.testing.assert_close(s1.u[0], sol.u[i], rtol=0, atol=1e-10)
        torch.testing.assert_close(s1.x[0], sol.x[i], rtol=0, atol=1e-10)
        torch.testing.assert_close(s1.objective[0], sol.objective[i], rtol=1e-12, atol=1e-10)
        g1 = torch.autograd.grad((w[i:i + 1] * s1.u).sum() + s1.objective.sum(), one)
        for name, a, b in zip(NAMES, g1, grads, strict=True):
            torch.testing.assert_close(a[0], b[i], rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("B,m", [(1, 1), (1, 3), (3, 1)])
@pytest.mark.parametrize("box", [False, True])
def test_single_sample_and_single_control(make_problem, reference, B, m, box):
    prob = make_problem(B, 4, 3, m, seed=10)
    b = 0.3 if box else None
    lo, hi = (-b, b) if box else (None, None)
    ref = reference(prob, lo, hi)
    sol = solve(*tensors(prob), lo, hi)
    assert sol.u.shape == (B, 4, m) and sol.objective.shape == (B,)
    assert (sol.u - ref.u).abs().max() <= 1e-6
    if box:
        _assert_margins(ref, b, 1e-4)
    for mode in MODES:
        def fn(x_init, C_raw, c, F, f, _mode=mode):
            s = solve(x_init, sym(C_raw), c, F, f, lo, hi, backward=_mode)
            return s.x, s.u, s.objective

        assert gradcheck(fn, tuple(tensors(prob, True)), eps=1e-6, atol=1e-6, rtol=1e-5,
                         fast_mode=True)


def test_float32(make_problem, reference):
    prob = make_problem(4, 8, 4, 3, seed=13)
    for lo, hi in [(None, None), (-0.4, 0.4)]:
        ref = reference(prob, lo, hi)
        args32 = tensors(prob.to(torch.float32), True)
        sol = dm.MPC(4, 3, 8, lo, hi, unconverged="raise")(
            args32[0], dm.QuadCost(args32[1], args32[2]), dm.LinearDynamics(args32[3], args32[4]))
        assert sol.u.dtype == torch.float32
        assert (sol.u.double() - ref.u).abs().max() <= 1e-3
        g32 = torch.autograd.grad(sol.u.sum() + sol.objective.sum(), args32)
        args64 = tensors(prob, True)
        s64 = solve(*args64, lo, hi)
        g64 = torch.autograd.grad(s64.u.sum() + s64.objective.sum(), args64)
        for name, a, b in zip(NAMES, g32, g64, strict=True):
            assert a.dtype == torch.float32
            scale = float(b.abs().max())
            assert float((a.double() - b).abs().max()) <= 1e-3 * (1 + scale), name


@pytest.mark.parametrize("box", [False, True])
def test_broadcast_inputs_equal_expanded(make_problem, box):
    """C [p, p], c [p], F [n, p], f [n] (time-invariant, shared) and C [T, p, p] give the same
    solution and gradients as the same tensors expanded to full shape."""
    B, T, n, m = 3, 6, 3, 2
    full = make_problem(B, T, n, m, seed=14)
    small = [full.x_init, full.C[0, 0], full.c[0, 0], full.F[0, 0], full.f[0, 0]]
    mid = [full.x_init, full.C[0], full.c[0], full.F[0], full.f[0]]
    lo, hi = (-0.3, 0.3) if box else (None, None)
    shapes = [(B, n), (B, T, n + m, n + m), (B, T, n + m), (B, T - 1, n, n + m), (B, T - 1, n)]
    for parts in (small, mid):
        a = [t.clone().requires_grad_(True) for t in parts]
        e = [t.detach().expand(s).clone().requires_grad_(True) for t, s in zip(a, shapes,
                                                                             strict=True)]
        sa = solve(*a, lo, hi, T=T)
        se = solve(*e, lo, hi)
        torch.testing.assert_close(sa.u, se.u, rtol=0, atol=1e-11)
        torch.testing.assert_close(sa.objective, se.objective, rtol=1e-12, atol=1e-11)
        ga = torch.autograd.grad(sa.u.square().sum() + sa.objective.sum(), a)
        ge = torch.autograd.grad(se.u.square().sum() + se.objective.sum(), e)
        for name, x, y in zip(NAMES, ga, ge, strict=True):
            y = y.sum(tuple(range(y.dim() - x.dim()))) if y.dim() > x.dim() else y
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10, msg=name)


def test_horizon_one(make_problem, reference):
    """T = 1: one stage, no dynamics steps (F [B, 0, n, p])."""
    full = make_problem(2, 2, 3, 2, seed=15)
    prob = type(full)(full.x_init, full.C[:, :1], full.c[:, :1], full.F[:, :0], full.f[:, :0])
    for lo, hi in [(None, None), (-0.2, 0.2)]:
        ref = reference(prob, lo, hi)
        sol = solve(*tensors(prob), lo, hi)
        assert sol.u.shape == (2, 1, 2)
        assert (sol.u - ref.u).abs().max() <= 1e-6
        assert gradcheck(lambda x, C, c, _lo=lo, _hi=hi: solve(x, sym(C), c, prob.F, prob.f,
                                                                _lo, _hi).u,
                         (prob.x_init.clone().requires_grad_(True),
                          prob.C.clone().requires_grad_(True),
                          prob.c.clone().requires_grad_(True)), eps=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ warm starts


@pytest.mark.parametrize("inside", [1e-9, 1e-7])
def test_warm_start_just_inside_the_bounds(make_problem, box_for_fraction, inside):
    """A warm start within ``inside`` of the solution, with the active controls that far inside
    their bounds (as a solution from another solver, or in lower precision, would be), converges
    to the solution in a few iterations."""
    prob = make_problem(2, 4, 3, 2, seed=21)
    b, ref = box_for_fraction(prob, 0.3, 0.5)
    u_init = ref.u.clamp(-b + inside, b - inside)
    sol = solve(*tensors(prob), -b, b, u_init=u_init)
    assert (sol.u - ref.u).abs().max() <= 1e-9
    assert int(sol.iterations.max()) <= 3


def test_one_sided_bounds_match_cvxpy(make_problem, reference):
    prob = make_problem(3, 6, 3, 2, seed=16)
    for lo, hi in [(-0.3, None), (None, 0.3)]:
        ref = reference(prob, lo, hi)
        sol = solve(*tensors(prob), lo, hi)
        assert (sol.u - ref.u).abs().max() <= 1e-6


def test_broadcast_bounds_gradient(make_problem):
    """Bounds given as ``[m]`` tensors get the summed gradient of the same bounds expanded to
    ``[B, T, m]``."""
    B, T, n, m = 3, 5, 3, 2
    prob = make_problem(B, T, n, m, seed=17)
    small = [torch.full((m,), -0.3, dtype=torch.float64, requires_grad=True),
             torch.full((m,), 0.3, dtype=torch.float64, requires_grad=True)]
    full = [b.detach().expand(B, T, m).clone().requires_grad_(True) for b in small]
    grads = []
    for lo, hi in (small, full):
        sol = solve(*tensors(prob), lo, hi)
        grads.append(torch.autograd.grad(sol.u.sum() + sol.objective.sum(), [lo, hi]))
    for g_small, g_full in zip(*grads, strict=True):
        assert float(g_full.abs().max()) > 0
        torch.testing.assert_close(g_small, g_full.sum((0, 1)), rtol=1e-10, atol=1e-12)


def test_kkt_check_accepts_the_solution_and_rejects_other_points(make_problem, box_for_fraction):
    """The box-constrained LQ solve stops as soon as the KKT conditions hold (``_kkt_satisfied``):
    it must accept cvxpy's solution and reject a feasible point next to it."""
    from diffmpc.expand import TrajCost
    from diffmpc.ilqr import _kkt_satisfied
    from diffmpc.lqr import homogeneous_dynamics

    B, T, n, m = 3, 6, 4, 2
    prob = make_problem(B, T, n, m, seed=5)
    b, ref = box_for_fraction(prob)
    lower, upper = (torch.full((B, T, m), s * b, dtype=torch.float64) for s in (-1, 1))
    cost = TrajCost(dm.QuadCost(prob.C, prob.c), B, T, n, m)
    Fh = homogeneous_dynamics(prob.F, prob.f)  # time-major

    def rollout(u):
        xs = [prob.x_init]
        for t in range(T - 1):
            tau = torch.cat([xs[-1], u[:, t]], -1)
            xs.append((prob.F[:, t] @ tau.unsqueeze(-1)).squeeze(-1) + prob.f[:, t])
        return torch.stack(xs, 1)

    u = ref.u.clamp(-b, b)
    assert _kkt_satisfied(cost, Fh, rollout(u), u, lower, upper).all()
    # move one free control a little, keeping the point feasible: not a solution any more
    free = (u.abs() < b - 1e-3)
    idx = free.flatten(1).float().argmax(-1)
    shift = torch.zeros(B, T * m, dtype=torch.float64)
    shift[torch.arange(B), idx] = 1e-4
    u2 = u + shift.view(B, T, m)
    assert not _kkt_satisfied(cost, Fh, rollout(u2), u2, lower, upper).any()


# ---------------------------------------------------------------- active-set passes, fallback


@pytest.mark.parametrize("seed", [0, 1])
def test_mostly_clamped_box_is_solved_by_the_active_set_passes(make_problem, reference, seed):
    """About two thirds of the controls at a bound (the benchmark's regime): the active-set
    passes alone solve it (within their budget of ten), exactly as cvxpy does."""
    prob = make_problem(8, 20, 6, 3, seed=seed)
    b = 0.3 * float(reference(prob).u.abs().median())
    ref = reference(prob, -b, b)
    assert 0.5 <= float((ref.u.abs() >= b - 1e-7).double().mean()) <= 0.9
    sol = solve(*tensors(prob), -b, b)
    assert bool(sol.converged.all()) and int(sol.iterations.max()) <= 10
    assert (sol.u - ref.u).abs().max() <= 1e-6
    assert float(sol.u.abs().max()) <= b


@pytest.mark.parametrize("keep_cost", [True, False])
def test_active_set_passes_over_part_of_the_batch_equal_one_by_one(make_problem, reference,
                                                                   monkeypatch, keep_cost):
    """Samples finish their active-set passes after different counts. A pass covers the whole
    batch while more than half of it is active (the finished samples' rows are recomputed and
    dropped), then only the active rows; the homogeneous dynamics, and the cost unless it would
    be too large (``keep_cost``), are built once and their linear terms rewritten per pass.
    Each sample's solution, pass count, last step and gradients must be those of its own
    solve."""
    import diffmpc.ilqr as ilqr

    if not keep_cost:
        monkeypatch.setattr(ilqr, "reusable_cost", lambda C: False)
    prob = make_problem(12, 20, 6, 3, seed=0)
    B, T, n, m = prob.sizes
    b = 0.3 * float(reference(prob).u.abs().median())
    leaves = tensors(prob, True)
    sol = solve(*leaves, -b, b)
    its = sol.iterations
    # both kinds of pass occur: one with finished samples among more than half still active,
    # and one over at most half of the batch
    ks = range(int(its.max()))
    assert any(0 < int((its <= k).sum()) and 2 * int((its > k).sum()) > B for k in ks), its
    assert any(0 < 2 * int((its > k).sum()) <= B for k in ks), its
    w = torch.randn(B, T, m, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = torch.autograd.grad((w * sol.u).sum(), leaves)
    for i in range(B):
        one = tensors(prob.sample(i), True)
        s1 = solve(*one, -b, b)
        assert int(s1.iterations[0]) == int(its[i]) and bool(s1.converged[0])
        torch.testing.assert_close(s1.u[0], sol.u[i], rtol=0, atol=1e-10)
        torch.testing.assert_close(s1.x[0], sol.x[i], rtol=0, atol=1e-10)
        torch.testing.assert_close(s1.step_norm[0], sol.step_norm[i], rtol=1e-8, atol=1e-12)
        g1 = torch.autograd.grad((w[i:i + 1] * s1.u).sum(), one)
        for name, a, c in zip(NAMES, g1, grads, strict=True):
            torch.testing.assert_close(a[0], c[i], rtol=1e-8, atol=1e-10, msg=name)
    assert (sol.u - reference(prob, -b, b).u).abs().max() <= 1e-6


def test_box_ddp_finishes_what_the_active_set_passes_leave(make_problem, box_for_fraction,
                                                           monkeypatch):
    """With one active-set pass allowed (an unconstrained solve from u = 0), box-DDP must take
    over: same solution as cvxpy, gradients equal to central finite differences."""
    import diffmpc.ilqr as ilqr

    prob = make_problem(3, 8, 4, 3, seed=1)
    b, ref = box_for_fraction(prob, 0.3, 0.4)
    monkeypatch.setattr(ilqr, "_lq_passes", lambda max_iter: 1)
    sol = solve(*tensors(prob), -b, b)
    assert bool(sol.converged.all()) and int(sol.iterations.min()) >= 2
    assert (sol.u - ref.u).abs().max() <= 1e-6
    _assert_margins(ref, b, 1e-3)
    _fd_check(tensors(prob) + list(box_tensors(b, prob)), "implicit", _losses(prob))


def test_float32_does_not_hold_a_control_near_its_bound(make_problem, reference):
    """Sample 6 of this problem has a free control 7.7e-5 inside its bound; held at the bound its
    multiplier is small and wrong-signed, below float32's sqrt(eps) tolerance. The float32
    solve must release it (the active set decides the gradient) and find cvxpy's active set."""
    prob = make_problem(16, 10, 4, 3, seed=5)
    b = 0.4
    ref = reference(prob, -b, b)
    assert 1e-5 < float(b - ref.u[6, 0, 2].abs()) < 1e-4  # the near tie
    sol = solve(*tensors(prob.to(torch.float32)), -b, b, tol=1e-5)
    assert bool(sol.converged.all())
    held = sol.u.double().abs() >= b - 1e-6
    assert torch.equal(held, ref.u.abs() >= b - 1e-7)


def test_bounds_through_the_unconstrained_optimum_converge(make_problem, reference):
    """Degenerate ties: each bound passes exactly through the unconstrained solution's controls
    at some steps (there the control is at its bound with a zero multiplier), so the active-set
    passes must not cycle between holding and releasing them."""
    prob = make_problem(4, 8, 4, 2, seed=9)
    u_free = reference(prob).u
    upper = torch.full_like(u_free, 10.0)
    lower = torch.full_like(u_free, -10.0)
    tie = torch.rand(u_free.shape, generator=torch.Generator().manual_seed(3)) < 0.3
    upper = torch.where(tie & (u_free > 0), u_free, upper)
    lower = torch.where(tie & (u_free <= 0), u_free, lower)
    sol = solve(*tensors(prob), lower, upper)
    assert bool(sol.converged.all()) and int(sol.iterations.max()) <= 10
    assert (sol.u - u_free).abs().max() <= 1e-6  # the bounds change nothing


@pytest.mark.parametrize("m", [1, 3])
def test_riccati_without_expected_change_gives_the_same_gains(make_problem, m):
    """``expected=False`` skips only ``dV``; the gains are those of the full pass."""
    from diffmpc import lqr

    prob = make_problem(3, 6, 4, m, seed=2)
    B, T, n, m = prob.sizes
    lo = torch.full((B, T, m), -0.3, dtype=torch.float64)
    full = lqr.riccati(prob.C, prob.c, prob.F, prob.f, lo, -lo)
    lean = lqr.riccati(prob.C, prob.c, prob.F, prob.f, lo, -lo, expected=False)
    assert full.dV is not None and lean.dV is None
    for name in ("K", "k", "free", "ok", "L"):
        assert torch.equal(getattr(full, name), getattr(lean, name)), name


def test_matvec_pair_gradients_match_finite_differences():
    """``matvec_pair`` (A x, A' y) forms its gradient w.r.t. A in one block: first and second
    derivatives against finite differences (gradcheck, gradgradcheck), with either output
    unused as well."""
    from torch.autograd import gradgradcheck

    from diffmpc.expand import matvec_pair

    g = torch.Generator().manual_seed(0)
    A, x, y = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
               for s in ((2, 3, 4, 5), (2, 3, 5), (2, 3, 4)))
    assert gradcheck(matvec_pair, (A, x, y))
    assert gradgradcheck(matvec_pair, (A, x, y))
    assert gradcheck(lambda *a: matvec_pair(*a)[0], (A, x, y))
    assert gradcheck(lambda *a: matvec_pair(*a)[1], (A, x, y))


@pytest.mark.parametrize("storage", ["batch-first", "batch-last"])
@pytest.mark.parametrize("mode", ["plain", "box", "fixed", "box+reg", "reg+floor", "box+floor"])
def test_one_control_recursion_equals_the_general_one(one_control_case, monkeypatch, mode,
                                                      storage):
    """``riccati`` takes a vector shortcut for one control; the general recursion (Cholesky
    factorizations, forced by not materializing Ch) must give the same gains in every mode,
    regularized and floored ones included, and flag the same indefinite control block. The
    shortcut stores its steps batch-first (``bmm``) or, on larger CPU batches, batch-last
    (broadcast products): both are checked here on the same batch."""
    from diffmpc import lqr

    monkeypatch.setattr(lqr, "_SOA_MIN_BATCH", 1 if storage == "batch-last" else 10**9)
    prob, C, kw = one_control_case(mode, B=5, seed=3, bad=0)
    with warnings.catch_warnings():  # e.g. a workspace of the wrong shape, resized by torch
        warnings.simplefilter("error")
        fast = lqr.riccati(C, prob.c, prob.F, prob.f, **kw)
    monkeypatch.setattr(lqr, "_CH_MAX_BYTES", 0)
    general = lqr.riccati(C, prob.c, prob.F, prob.f, **kw)
    assert torch.equal(fast.ok, general.ok)
    ok = fast.ok  # a failed factorization leaves the rest of its sample undefined
    for name in ("K", "k", "free", "dV", "L"):
        a, b = getattr(fast, name), getattr(general, name)
        assert a.shape == b.shape, name
        if a.dtype == torch.bool:
            assert torch.equal(a[ok], b[ok]), name
        else:
            torch.testing.assert_close(a[ok], b[ok], rtol=1e-10, atol=1e-12, msg=name)
    if mode == "plain":  # the indefinite block is reported (a held control needs no curvature)
        assert not bool(fast.ok[0]) and bool(fast.ok[1:].all())


def test_riccati_refuses_batch_last_operands_where_it_stores_batch_first():
    """``riccati(..., batch_last=True)`` is only for passes that store their steps batch-last (one
    control, a CPU batch of at least ``_SOA_MIN_BATCH``); elsewhere it would misread them."""
    from diffmpc import lqr

    B, T, n = 2, 4, 3
    C = torch.eye(n + 1, dtype=torch.float64).expand(B, T, n + 1, n + 1)
    F = torch.zeros(B, T - 1, n, n + 1, dtype=torch.float64)
    c = torch.zeros(B, T, n + 1, dtype=torch.float64)
    assert not lqr.stores_batch_last(C, n)
    Ch = lqr.homogeneous_cost(C, c, batch_last=True)
    Fh = lqr.homogeneous_dynamics(F, None, batch_last=True)
    with pytest.raises(ValueError, match="batch_last"):
        lqr.riccati(C, c, F, Fh=Fh, Ch=Ch, batch_last=True)


@pytest.mark.parametrize("box", [False, True])
def test_one_control_batch_stored_batch_last_matches_cvxpy(make_problem, reference, box):
    """A one-control batch large enough for the batch-last recursion (``_SOA_MIN_BATCH``) on the
    CPU, against cvxpy sample by sample, with gradients against the same solve one sample at a
    time (the batch-first recursion)."""
    from diffmpc import lqr

    B = lqr._SOA_MIN_BATCH + 4
    prob = make_problem(B, 6, 3, 1, seed=21)
    lo, hi = (-0.3, 0.3) if box else (None, None)
    ref = reference(prob, lo, hi)
    leaves = tensors(prob, True)
    sol = solve(*leaves, lo, hi)
    assert bool(sol.converged.all())
    assert (sol.u - ref.u).abs().max() <= 1e-6
    if box:
        assert 0.1 <= float(((sol.u.abs() - 0.3).abs() <= 1e-9).double().mean()) <= 0.9
    W = torch.randn(sol.u.shape, generator=torch.Generator().manual_seed(5), dtype=sol.u.dtype)
    grads = torch.autograd.grad((sol.u * W).sum(), leaves)
    for i in (0, B - 1):
        one = [t[i:i + 1].detach().clone().requires_grad_(True) for t in leaves]
        s1 = solve(*one, lo, hi)
        g1 = torch.autograd.grad((s1.u * W[i:i + 1]).sum(), one)
        for name, a, b in zip(NAMES, g1, grads, strict=True):
            torch.testing.assert_close(a[0], b[i], rtol=1e-8, atol=1e-10, msg=name)
