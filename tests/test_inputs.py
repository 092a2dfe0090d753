"""Input checking of dm.MPC (every error is a ValueError naming the argument) and the handling of
samples that did not converge."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch

import diffmpc as dm

B, T, n, m = 2, 4, 3, 2
p = n + m
f64 = torch.float64


@pytest.fixture
def prob(make_problem):
    return make_problem(B, T, n, m, seed=21)


def call(prob, *, mpc_kw=None, u_init=None, **over):
    """Solve ``prob`` with some of its tensors replaced (keys: x_init, C, c, F, f)."""
    t = {k: getattr(prob, k) for k in ("x_init", "C", "c", "F", "f")}
    t.update(over)
    mpc = dm.MPC(n, m, T, **(mpc_kw or {}))
    return mpc(t["x_init"], dm.QuadCost(t["C"], t["c"]), dm.LinearDynamics(t["F"], t["f"]),
               u_init=u_init)


def raises_naming(name: str):
    """ValueError whose message names the argument; ``cost.C`` is also named ``QuadCost: C``
    when QuadCost's constructor rejects it (likewise c, and F, f of LinearDynamics)."""
    owner = {"cost": "QuadCost", "dynamics": "LinearDynamics"}
    alts = [re.escape(name)]
    if "." in name:
        obj, arg = name.split(".")
        alts.append(re.escape(f"{owner[obj]}: {arg}") + r"\b")
    return pytest.raises(ValueError, match="|".join(alts))


# ------------------------------------------------------------------------- shapes and ranks

BAD_SHAPES = [
    ("x_init", "x_init", lambda P: P.x_init[0]),  # rank 1
    ("x_init", "x_init", lambda P: torch.zeros(B, n + 1, dtype=f64)),
    ("x_init", "x_init", lambda P: torch.zeros(0, n, dtype=f64)),  # empty batch
    ("C", "cost.C", lambda P: torch.eye(p + 1, dtype=f64)),
    ("C", "cost.C", lambda P: P.C[:, :-1]),  # T - 1 steps
    ("C", "cost.C", lambda P: P.C[..., :-1]),  # not square
    ("C", "cost.C", lambda P: P.C[None]),  # rank 5
    ("c", "cost.c", lambda P: P.c[..., :-1]),
    ("c", "cost.c", lambda P: P.c[:, :2]),
    ("F", "dynamics.F", lambda P: P.F[..., :-1]),
    ("F", "dynamics.F", lambda P: torch.cat([P.F, P.F[:, :1]], 1)),  # T steps instead of T-1
    ("F", "dynamics.F", lambda P: P.F[:, :, :-1]),
    ("f", "dynamics.f", lambda P: P.f[..., :-1]),
    ("f", "dynamics.f", lambda P: P.f[:, :1].expand(B, 2, n)),
]


@pytest.mark.parametrize("key,name,make", BAD_SHAPES)
def test_wrong_shape_raises(prob, key, name, make):
    with raises_naming(name):
        call(prob, **{key: make(prob)})


@pytest.mark.parametrize("key,name", [("C", "cost.C"), ("c", "cost.c"), ("F", "dynamics.F"),
                                      ("f", "dynamics.f")])
def test_mismatched_batch_raises(prob, key, name):
    t = getattr(prob, key)
    bigger = torch.cat([t, t[:1]], 0)  # B + 1 samples
    with raises_naming(name):
        call(prob, **{key: bigger})


def test_non_tensor_inputs_raise(prob):
    with raises_naming("x_init"):
        call(prob, x_init=prob.x_init.tolist())
    with raises_naming("cost"):
        dm.MPC(n, m, T)(prob.x_init, "quadratic", dm.LinearDynamics(prob.F, prob.f))
    with raises_naming("dynamics"):
        dm.MPC(n, m, T)(prob.x_init, dm.QuadCost(prob.C, prob.c), 3.0)


def test_callable_with_wrong_output_shape_raises(prob):
    with raises_naming("dynamics"):
        dm.MPC(n, m, T)(prob.x_init, dm.QuadCost(prob.C, prob.c), lambda x, u: x[:, :-1])
    with raises_naming("cost"):
        dm.MPC(n, m, T)(prob.x_init, lambda x, u: x, dm.LinearDynamics(prob.F, prob.f))


@pytest.mark.parametrize("bound", [torch.zeros(B + 1, T, m, dtype=f64),
                                   torch.zeros(T, m + 1, dtype=f64),
                                   torch.zeros(T + 1, 1, dtype=f64)])
@pytest.mark.parametrize("side", ["u_lower", "u_upper"])
def test_wrong_bound_shape_raises(prob, bound, side):
    kw = {"u_lower": -1.0, "u_upper": 1.0, side: bound + (1.0 if side == "u_upper" else -1.0)}
    with raises_naming(side):
        call(prob, mpc_kw=kw)


def test_wrong_u_init_raises(prob):
    with raises_naming("u_init"):
        call(prob, u_init=torch.zeros(B, T, m + 1, dtype=f64))
    with raises_naming("u_init"):
        call(prob, u_init=torch.zeros(B, T, m, dtype=torch.float32))


# --------------------------------------------------------------------------- dtype, device


@pytest.mark.parametrize("key,name", [("C", "cost.C"), ("c", "cost.c"), ("F", "dynamics.F"),
                                      ("f", "dynamics.f")])
def test_dtype_mismatch_raises(prob, key, name):
    with raises_naming(name):
        call(prob, **{key: getattr(prob, key).float()})


def test_bad_x_init_dtype_raises(prob):
    with raises_naming("x_init"):
        call(prob, x_init=prob.x_init.long())


@pytest.mark.parametrize("side", ["u_lower", "u_upper"])
def test_bound_dtype_mismatch_raises(prob, side):
    kw = {"u_lower": -1.0, "u_upper": 1.0, side: torch.zeros(T, m, dtype=torch.float32)}
    with raises_naming(side):
        call(prob, mpc_kw=kw)


@pytest.mark.parametrize("key,name", [("C", "cost.C"), ("F", "dynamics.F")])
def test_device_mismatch_raises(prob, key, name):
    """A tensor on another device ("meta" stands in for a GPU on CPU-only machines)."""
    with raises_naming(name):
        call(prob, **{key: getattr(prob, key).to("meta")})


def test_bound_device_mismatch_raises(prob):
    with raises_naming("u_upper"):
        call(prob, mpc_kw={"u_lower": -1.0, "u_upper": torch.ones(m, dtype=f64, device="meta")})


# ------------------------------------------------------------------------------ values


@pytest.mark.parametrize("key,name", [("x_init", "x_init"), ("C", "cost.C"), ("c", "cost.c"),
                                      ("F", "dynamics.F"), ("f", "dynamics.f")])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_raise(prob, key, name, value):
    t = getattr(prob, key).clone()
    t.view(-1)[-1] = value
    if key == "C":  # keep it symmetric, so the finiteness check is what fires
        t[-1, -1, 0, -1] = t[-1, -1, -1, 0] = value
    with raises_naming(name):
        call(prob, **{key: t})


def test_finite_values_whose_sum_overflows_pass_the_check():
    """The finiteness check decides from one sum; a sum that overflows must not be mistaken for
    an infinite value."""
    from diffmpc.checks import check_finite

    big = torch.full((4,), 1e308, dtype=f64)
    assert not torch.isfinite(big.sum())
    check_finite("x", big)  # no error
    big[2] = float("inf")
    with raises_naming("x"):
        check_finite("x", big)


@pytest.mark.parametrize("side", ["u_lower", "u_upper"])
def test_nan_bound_raises(prob, side):
    nan_t = torch.zeros(B, T, m, dtype=f64)
    nan_t[0, 1, 1] = float("nan")
    for bad in (float("nan"), nan_t):
        kw = {"u_lower": -1.0, "u_upper": 1.0, side: bad}
        with raises_naming(side):
            call(prob, mpc_kw=kw)


def test_lower_above_upper_raises(prob):
    with raises_naming("u_lower"):
        call(prob, mpc_kw={"u_lower": 1.0, "u_upper": -1.0})
    lower = -torch.ones(B, T, m, dtype=f64)
    lower[1, 2, 0] = 2.0
    with raises_naming("u_upper"):
        call(prob, mpc_kw={"u_lower": lower, "u_upper": 1.0})


def test_infinite_bounds_are_allowed(prob, reference):
    lower = torch.full((T, m), -float("inf"), dtype=f64)
    sol = call(prob, mpc_kw={"u_lower": lower, "u_upper": float("inf"), "tol": 1e-12})
    assert (sol.u - reference(prob).u).abs().max() <= 1e-6


def test_control_block_not_positive_definite_raises(prob):
    C = prob.C.clone()
    C[1, 2, n:, n:] = -torch.eye(m, dtype=f64)  # symmetric, negative definite control block
    with raises_naming("cost.C"):
        call(prob, C=C)
    C = prob.C.clone()
    C[0, 0, n:, n:] = 0.0  # singular
    with raises_naming("cost.C"):
        call(prob, C=C)
    C = prob.C.clone()
    C[1, 3, n:, n:] = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=f64)  # indefinite, positive
    with raises_naming("cost.C"):                                        # diagonal
        call(prob, C=C)


@pytest.mark.parametrize("k", [1, 2, 5, 8, 9])
def test_positive_definite_matches_eigenvalues(k):
    """``checks.positive_definite`` (vectorized elimination for many blocks of up to 8 rows,
    Cholesky otherwise) against numpy's eigenvalues, on symmetric blocks whose eigenvalues are at
    least 0.05 from zero, with 0 to k of them negative (one negative eigenvalue may hide behind a
    positive diagonal)."""
    from diffmpc.checks import _PD_VECTOR_MIN, positive_definite

    g = torch.Generator().manual_seed(k)
    N = 2400
    assert N >= _PD_VECTOR_MIN
    Q = torch.linalg.qr(torch.randn(N, k, k, generator=g, dtype=f64))[0]
    mag = 0.05 + 2 * torch.rand(N, k, generator=g, dtype=f64)
    neg = torch.rand(N, k, generator=g, dtype=f64) < torch.rand(N, 1, generator=g, dtype=f64) ** 3
    A = Q @ torch.diag_embed(torch.where(neg, -mag, mag)) @ Q.mT
    A = 0.5 * (A + A.mT)
    want = torch.from_numpy(np.linalg.eigvalsh(A.numpy()).min(-1) > 0)
    assert 0.2 < want.float().mean() < 0.9  # both kinds are there
    got = positive_definite(A.view(40, 60, k, k))
    assert got.shape == (40, 60)
    assert torch.equal(got.flatten(), want)
    assert torch.equal(positive_definite(A[:20]), want[:20])  # a few blocks: Cholesky
    # semi-definite (a zero pivot) is not positive definite
    assert not bool(positive_definite(torch.ones(1, k, k, dtype=f64) + (k == 1) * -1.0)[0])


def test_asymmetric_C_raises(prob):
    C = prob.C.clone()
    C[0, 1, 0, n] += 0.1
    with raises_naming("cost.C"):
        call(prob, C=C)


# ------------------------------------------------------------------ constructor arguments


@pytest.mark.parametrize("kw,name", [
    ({"max_iters": 10}, "max_iters"),  # a misspelt option
    ({"eps": 1e-6}, "eps"),
    ({"backward": "adjoint"}, "backward"),
    ({"backward": "IMPLICIT"}, "backward"),
    ({"unconverged": "ignore"}, "unconverged"),
    ({"max_iter": 0}, "max_iter"),
    ({"max_iter": 2.5}, "max_iter"),
    ({"tol": -1.0}, "tol"),
    ({"line_search_steps": 0}, "line_search_steps"),
    ({"line_search_decay": 1.5}, "line_search_decay"),
    ({"gauss_newton_iters": -1}, "gauss_newton_iters"),
    ({"gauss_newton_iters": 2.0}, "gauss_newton_iters"),
    ({"gauss_newton_decay": 0.0}, "gauss_newton_decay"),
    ({"gauss_newton_decay": 1.0}, "gauss_newton_decay"),
])
def test_bad_constructor_arguments_raise(kw, name):
    with raises_naming(name):
        dm.MPC(n, m, T, **kw)


@pytest.mark.parametrize("args,name", [((0, m, T), "n_state"), ((n, 0, T), "n_ctrl"),
                                       ((n, m, 0), "horizon"), ((n, 1.5, T), "n_ctrl"),
                                       ((n, m, True), "horizon")])
def test_bad_sizes_raise(args, name):
    with raises_naming(name):
        dm.MPC(*args)


def test_enum_values_are_accepted():
    for mode in ("implicit", "gauss_newton", "unroll", dm.BackwardMode.UNROLL):
        dm.MPC(n, m, T, backward=mode)
    for what in ("warn", "keep", "zero", "raise", dm.Unconverged.ZERO):
        dm.MPC(n, m, T, unconverged=what)


# ---------------------------------------------------------------------- unconverged samples


HALF_BOX = 0.5  # |u| <= 0.5: from zero, sample 1's first iteration has the wrong active set


def _half_converged(prob, unconverged: str):
    """Box problem, max_iter=1: sample 0 is warm-started at its own converged solution (so it
    converges in its one iteration), sample 1 starts at zero (and does not: it needs two)."""
    lo, hi = -HALF_BOX, HALF_BOX
    with torch.no_grad():
        u_init = call(prob, mpc_kw={"u_lower": lo, "u_upper": hi}).u.clone()
    u_init[1] = 0.0
    leaves = {k: getattr(prob, k).clone().requires_grad_(True) for k in ("x_init", "C", "c",
                                                                        "F", "f")}
    sol = call(prob, mpc_kw={"u_lower": lo, "u_upper": hi, "max_iter": 1,
                             "unconverged": unconverged}, u_init=u_init, **leaves)
    return sol, leaves


def test_unconverged_raise(prob):
    with pytest.raises(RuntimeError, match="1 of 2"):
        _half_converged(prob, "raise")


def test_unconverged_warn(prob):
    with pytest.warns(RuntimeWarning, match="did not converge"):
        sol, _ = _half_converged(prob, "warn")
    assert sol.converged.tolist() == [True, False]


def test_unconverged_keep_is_silent(prob):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol, leaves = _half_converged(prob, "keep")
    grad = torch.autograd.grad(sol.x.sum() + sol.u.sum(), leaves["x_init"])[0]
    assert bool((grad[1] != 0).all())


def test_unconverged_zero_gradient(prob):
    sol, leaves = _half_converged(prob, "zero")
    assert sol.converged.tolist() == [True, False]
    assert sol.iterations.tolist() == [1, 1]
    loss = sol.u.square().sum() + sol.x.sum() + sol.objective.sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    # the converged sample's gradients are those of a full solve of it alone
    one = {k: getattr(prob.sample(0), k).clone().requires_grad_(True) for k in leaves}
    s1 = dm.MPC(n, m, T, -HALF_BOX, HALF_BOX)(one["x_init"], dm.QuadCost(one["C"], one["c"]),
                                     dm.LinearDynamics(one["F"], one["f"]))
    loss1 = s1.u.square().sum() + s1.x.sum() + s1.objective.sum()
    grads1 = torch.autograd.grad(loss1, list(one.values()))
    for name, g, g1 in zip(leaves, grads, grads1, strict=True):
        assert bool((g[1] == 0).all()), f"{name}: gradient of the unconverged sample"
        torch.testing.assert_close(g[0], g1[0], rtol=1e-6, atol=1e-8, msg=name)
