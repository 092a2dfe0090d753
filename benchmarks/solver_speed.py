"""Solver speed: diffmpc against mpc.pytorch on the same LQR and box-LQR problems.

Both solvers run in this process with the same thread count on identical problems: n = 10,
m = 5, random stable time-varying dynamics, random positive definite costs, float64; "box" adds
|u| <= 0.3. For every (B, T, box) configuration it times the forward solve, and the forward solve
plus the backward pass of a fixed loss ``sum(u * W)`` into C, c, F, f and x_init, and reports
the medians over repetitions, their ratios, the largest control difference between the two
solvers, and the fraction of samples each one solved.

Convergence: diffmpc reports it per sample (``sol.converged``). mpc.pytorch does not return it,
so a sample counts as solved when its controls are within ``--conv-tol`` of a reference solution
(diffmpc with tol=1e-10, itself checked against cvxpy on the first samples, column "ref err").

Then the nonlinear problems: pendulum and cartpole swing-up against mpc.pytorch, T in {20, 50},
B in {1, 32, 256} (``nonlinear_speed.py``'s table, run in this process; ``--no-swing-ups``
skips it, ``--swing-up-sizes`` picks its sizes, ``--quick`` takes its small subset).

Usage:
    python benchmarks/solver_speed.py                      # both tables (about 15 minutes)
    python benchmarks/solver_speed.py --quick              # a small subset of each
    python benchmarks/solver_speed.py --sizes 256x50 --box on --no-swing-ups --out results.md
    python benchmarks/solver_speed.py --device cuda --sizes 256x50,1024x50 --no-cvxpy
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import diffmpc as dm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _report lies beside this script
import _report  # noqa: E402

N_STATE, N_CTRL, BOUND = 10, 5, 0.3
FULL_SIZES = [(B, T) for T in (10, 50) for B in (1, 32, 256, 1024)]
QUICK_SIZES = [(1, 10), (32, 10)]


@dataclass
class Problem:
    """Batch-first tensors: x_init [B, n], C [B, T, p, p], c [B, T, p], F [B, T-1, n, p],
    f [B, T-1, n]; W [B, T, m] weights of the loss."""

    x_init: torch.Tensor
    C: torch.Tensor
    c: torch.Tensor
    F: torch.Tensor
    f: torch.Tensor
    W: torch.Tensor


def make_problem(B: int, T: int, seed: int = 0, device: str | torch.device = "cpu") -> Problem:
    """Random stable time-varying dynamics (spectral norm of A_t = 0.95) and PD costs, drawn on
    the CPU (the same numbers whatever the device) and moved to ``device``."""
    n, m = N_STATE, N_CTRL
    p = n + m
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    M = randn(B, T - 1, n, n)
    A = 0.95 * M / torch.linalg.matrix_norm(M, ord=2)[..., None, None]
    L = randn(B, T, p, p)
    C = L @ L.mT / p + 0.1 * torch.eye(p, dtype=torch.float64)
    tensors = dict(x_init=randn(B, n), C=0.5 * (C + C.mT), c=randn(B, T, p),
                   F=torch.cat([A, randn(B, T - 1, n, m) / m ** 0.5], -1),
                   f=0.5 * randn(B, T - 1, n), W=randn(B, T, m))
    return Problem(**{k: v.to(device) for k, v in tensors.items()})


# ------------------------------------------------------------------------------- solvers


def _leaves(prob: Problem, time_first: bool, grad: bool):
    """(x_init, C, c, F, f), fresh leaves; time-first ([T, B, ...]) for mpc.pytorch."""
    out = [prob.x_init.clone()]
    for t in (prob.C, prob.c, prob.F, prob.f):
        out.append(t.transpose(0, 1).contiguous() if time_first else t.clone())
    return [t.requires_grad_(grad) for t in out]


def run_diffmpc(prob: Problem, T: int, box: bool, grad: bool, leaves=None, **options):
    """One solve (and backward if grad) on ``leaves`` (default: fresh ones from ``_leaves``).
    Returns u [B, T, m], converged [B], grads or None."""
    bounds = (-BOUND, BOUND) if box else (None, None)
    mpc = dm.MPC(N_STATE, N_CTRL, T, *bounds, unconverged="keep", **options)
    x0, C, c, F, f = leaves = leaves if leaves is not None else _leaves(prob, False, grad)
    sol = mpc(x0, dm.QuadCost(C, c), dm.LinearDynamics(F, f))
    grads = None
    if grad:
        (sol.u * prob.W).sum().backward()
        grads = [t.grad for t in leaves]
    return sol.u.detach(), sol.converged, grads


def run_mpcpytorch(prob: Problem, T: int, box: bool, grad: bool, lqr_iter: int, leaves=None):
    """The same with mpc.pytorch; its tensors are time-first. Returns u [B, T, m], grads."""
    from mpc import mpc as mpcpt

    bounds = {"u_lower": -BOUND, "u_upper": BOUND} if box else {}
    ctrl = mpcpt.MPC(N_STATE, N_CTRL, T, lqr_iter=lqr_iter, verbose=-1, exit_unconverged=False,
                     **bounds)
    x0, C, c, F, f = leaves = leaves if leaves is not None else _leaves(prob, True, grad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecated torch.lu / uint8 masks
        _, u, _ = ctrl(x0, mpcpt.QuadCost(C, c), mpcpt.LinDx(F, f))
        grads = None
        if grad:
            (u * prob.W.transpose(0, 1)).sum().backward()
            grads = [leaves[0].grad] + [t.grad.transpose(0, 1) for t in leaves[1:]]
    return u.detach().transpose(0, 1), grads


def _timed(fns: dict, reps: int, budget: dict, dev: torch.device) -> tuple[dict, dict]:
    """Median wall time (ms) of each ``(prepare, solve)`` pair over ``reps`` consecutive calls of
    ``solve(prepare())``, one pair after the other; only ``solve`` is timed (``prepare`` makes
    the input leaves, copies of the problem's tensors). A pair whose total time exceeds
    ``budget[name]`` seconds is not called again. Returns medians and last outputs.

    Consecutive calls, not interleaved rounds: interleaved, the first solve after the other
    library's turn page-faulted the memory that turn had handed back to the system, which made
    diffmpc's B = 256, T = 50 LQR fwd+bwd 2.2x slower than in a run of its own (263 ms against
    117) while mpc.pytorch's times did not move. The median drops each block's first call.
    Each call's outputs (solution and gradients) are released before the next call, as in a
    training loop: held, they made every call allocate fresh memory for its gradients (C's and
    F's, 38 MB at B = 256, T = 50) and fault it in.
    """
    times = {k: [] for k in fns}
    outs = {}
    for name, (prepare, solve) in fns.items():
        for _ in range(reps):
            if sum(times[name]) / 1e3 > budget.get(name, float("inf")):
                break
            outs.pop(name, None)
            args = prepare()
            t0 = _report.clock(dev)
            outs[name] = solve(args)
            times[name].append(1e3 * (_report.clock(dev) - t0))
    return {k: statistics.median(v) for k, v in times.items()}, outs


# ----------------------------------------------------------------------------- reference


def cvxpy_error(prob: Problem, u_ref: torch.Tensor, box: bool, k: int = 2) -> float:
    """max |u_ref - u_cvxpy| over the first k samples (nan if cvxpy is missing).

    With bounds, the interior-point answer (accurate to ~1e-7) is polished: the controls it puts
    at a bound are fixed there and the remaining equality-constrained QP is solved again.
    """
    try:
        import cvxpy as cp
    except ImportError:
        return float("nan")
    err = 0.0
    prob = Problem(*(t.cpu() for t in (prob.x_init, prob.C, prob.c, prob.F, prob.f, prob.W)))
    u_ref = u_ref.cpu()
    for b in range(min(k, prob.C.shape[0])):
        u = _cvxpy_solve(cp, prob, b, box, None)
        if box:
            at = (u.abs() >= BOUND - 1e-6).numpy()
            u = _cvxpy_solve(cp, prob, b, False, (at, np.sign(u.numpy()) * BOUND))
        err = max(err, float((u_ref[b] - u).abs().max()))
    return err


def _cvxpy_solve(cp, prob: Problem, b: int, box: bool, fixed) -> torch.Tensor:
    n, m, T = N_STATE, N_CTRL, prob.C.shape[1]
    x, u = cp.Variable((T, n)), cp.Variable((T, m))
    C, c = prob.C[b].numpy(), prob.c[b].numpy()
    F, f = prob.F[b].numpy(), prob.f[b].numpy()
    obj = sum(0.5 * cp.quad_form(cp.hstack([x[t], u[t]]), cp.psd_wrap(C[t]))
              + c[t] @ cp.hstack([x[t], u[t]]) for t in range(T))
    cons = [x[0] == prob.x_init[b].numpy()]
    cons += [x[t + 1] == F[t] @ cp.hstack([x[t], u[t]]) + f[t] for t in range(T - 1)]
    if box:
        cons += [u >= -BOUND, u <= BOUND]
    if fixed is not None and fixed[0].any():
        cons.append(u[fixed[0]] == fixed[1][fixed[0]])
    cp.Problem(cp.Minimize(obj), cons).solve(solver=cp.CLARABEL, tol_gap_abs=1e-12,
                                             tol_gap_rel=1e-12, tol_feas=1e-12)
    return torch.as_tensor(u.value)


# ------------------------------------------------------------------------------- a config


def bench_config(B: int, T: int, box: bool, args, ref_time_hint: float | None) -> dict:
    prob = make_problem(B, T, seed=args.seed, device=args.device)
    row = {"B": B, "T": T, "box": box}
    opts = args.options
    run_diffmpc(prob, T, box, True, **opts)  # warm-up
    def leaves(time_first: bool, grad: bool):
        return lambda: _leaves(prob, time_first, grad)

    fns = {"d_fwd": (leaves(False, False), lambda lv: run_diffmpc(prob, T, box, False, lv, **opts)),
           "d_fb": (leaves(False, True), lambda lv: run_diffmpc(prob, T, box, True, lv, **opts))}
    if args.no_reference:
        pass
    elif ref_time_hint is not None and ref_time_hint > args.ref_budget:
        row["skipped"] = f"mpc.pytorch skipped: predicted {ref_time_hint:.0f} s per solve"
    elif (failure := _reference_fails(prob, T, box, args)) is not None:
        row["skipped"] = failure
    else:
        fns["p_fwd"] = (leaves(True, False),
                        lambda lv: run_mpcpytorch(prob, T, box, False, args.lqr_iter, lv))
        fns["p_fb"] = (leaves(True, True),
                       lambda lv: run_mpcpytorch(prob, T, box, True, args.lqr_iter, lv))
    half = args.ref_budget / 2
    medians, outs = _timed(fns, args.reps, {"p_fwd": half, "p_fb": half}, args.device)
    row.update(medians)
    u_d, conv_d, g_d = outs["d_fb"]
    u_ref, _, _ = run_diffmpc(prob, T, box, False, tol=1e-10, max_iter=200)
    row["ref_err"] = cvxpy_error(prob, u_ref, box) if args.cvxpy else float("nan")
    row["d_conv"] = float(conv_d.double().mean())
    row["d_err"] = float((u_d - u_ref).abs().max())
    if "p_fb" not in outs:
        return row
    u_p, g_p = outs["p_fb"]
    solved_p = (u_p - u_ref).abs().flatten(1).amax(1) <= args.conv_tol
    row["p_conv"] = float(solved_p.double().mean())
    row["du"] = float((u_d - u_p).abs().max())
    both = solved_p & conv_d
    if bool(both.any()):
        rel = [float((a[both] - b[both]).norm() / a[both].norm().clamp_min(1e-300))
               for a, b in zip(g_d, g_p, strict=True)]
        row["grad_rel"] = max(rel)
    return row


def _reference_fails(prob: Problem, T: int, box: bool, args) -> str | None:
    """On CUDA, one untimed mpc.pytorch solve: it warms up CUDA's libraries for it as diffmpc's
    warm-up does for diffmpc, and an error there (its code predates current PyTorch) becomes a
    note in the table instead of ending the run. None if it ran (or on the CPU)."""
    if args.device.type != "cuda":
        return None
    try:
        run_mpcpytorch(prob, T, box, True, args.lqr_iter)
    except Exception as exc:  # noqa: BLE001 - any failure of the reference is reported
        return f"mpc.pytorch failed on {args.device}: {type(exc).__name__}: {str(exc)[:120]}"
    return None


# ---------------------------------------------------------------------------------- table

COLUMNS = ["B", "T", "box", "diffmpc fwd ms", "diffmpc fwd+bwd ms", "mpc.pytorch fwd ms",
           "mpc.pytorch fwd+bwd ms", "fwd ratio", "fwd+bwd ratio", "max abs du", "diffmpc conv",
           "mpc.pytorch conv", "diffmpc err", "ref err", "grad rel diff"]


def _fmt(row: dict) -> list[str]:
    def num(key, spec):
        return format(row[key], spec) if key in row else "-"

    def ratio(a, b):
        return f"{row[b] / row[a]:.1f}x" if a in row and b in row else "-"

    return [str(row["B"]), str(row["T"]), "yes" if row["box"] else "no",
            num("d_fwd", ".1f"), num("d_fb", ".1f"), num("p_fwd", ".1f"), num("p_fb", ".1f"),
            ratio("d_fwd", "p_fwd"), ratio("d_fb", "p_fb"), num("du", ".1e"),
            num("d_conv", ".0%"), num("p_conv", ".0%"), num("d_err", ".1e"),
            num("ref_err", ".1e"), num("grad_rel", ".1e")]


def markdown(rows: list[dict], header: str) -> str:
    notes = [r["skipped"] + f" (B={r['B']}, T={r['T']}, box={r['box']})" for r in rows
             if "skipped" in r]
    return _report.markdown(header, COLUMNS, [_fmt(r) for r in rows], notes)


# ------------------------------------------------------------------------------------ CLI


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, 2 repetitions")
    ap.add_argument("--sizes", type=_report.sizes, help="comma-separated BxT, e.g. 1x10,256x50")
    ap.add_argument("--box", choices=["both", "on", "off"], default="both")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (median; default 5)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--device", type=_report.device, default=_report.CPU,
                    help="cpu (default) or cuda[:N]: both solvers run there")
    ap.add_argument("--lqr-iter", type=int, default=20, help="mpc.pytorch lqr_iter (default 20)")
    ap.add_argument("--ref-budget", type=float, default=60.0,
                    help="seconds per configuration for mpc.pytorch (fwd and fwd+bwd half each): "
                         "fewer repetitions past it; a configuration whose fwd+bwd is predicted "
                         "(linearly in B) to take longer than this is skipped")
    ap.add_argument("--conv-tol", type=float, default=1e-5,
                    help="a mpc.pytorch sample is solved if max |u - u_ref| <= this")
    ap.add_argument("--option", type=_report.option, action="append", default=[],
                    help="a diffmpc solver option KEY=VALUE (repeatable), e.g. time_parallel=true")
    ap.add_argument("--no-reference", action="store_true", help="time diffmpc only")
    ap.add_argument("--no-cvxpy", dest="cvxpy", action="store_false",
                    help="skip checking the reference solution against cvxpy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-swing-ups", dest="swing_ups", action="store_false",
                    help="skip the pendulum and cartpole swing-up table")
    ap.add_argument("--swing-up-sizes", help="its sizes, comma-separated BxT (default: T in "
                    "{20, 50}, B in {1, 32, 256}; with --quick 1x20,32x20)")
    ap.add_argument("--out", help="write the markdown table(s) to this file")
    args = ap.parse_args(argv)
    if args.reps is None:
        args.reps = 2 if args.quick else 5
    if args.sizes is None:
        args.sizes = QUICK_SIZES if args.quick else FULL_SIZES
    args.options = dict(args.option)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    boxes = {"both": [False, True], "on": [True], "off": [False]}[args.box]
    print(f"solver_speed: n={N_STATE}, m={N_CTRL}, float64, {_report.device_name(args.device)}, "
          f"reps={args.reps}, mpc.pytorch lqr_iter={args.lqr_iter}, "
          f"diffmpc options: {args.options or 'defaults'}", flush=True)
    rows, last_fb = [], {}
    for B, T in args.sizes:
        for box in boxes:
            prev = last_fb.get((T, box))
            hint = None if prev is None else prev[1] / 1e3 * B / prev[0]  # linear in B
            row = bench_config(B, T, box, args, hint)
            if "p_fb" in row:
                last_fb[(T, box)] = (B, row["p_fb"])
            rows.append(row)
            print(_report.progress(COLUMNS, _fmt(row)), flush=True)
    header = (f"Solver speed (n={N_STATE}, m={N_CTRL}, float64, {_report.device_name(args.device)}, "
              f"median of {args.reps}; mpc.pytorch lqr_iter={args.lqr_iter}; "
              f"box: |u| <= {BOUND}; diffmpc options: {args.options or 'defaults'})")
    _report.publish(markdown(rows, header), args.out)
    if args.swing_ups:
        rows += _swing_ups(args)
    return rows


def _swing_ups(args) -> list[dict]:
    """``nonlinear_speed.py``'s table with this run's settings; appended to ``--out``."""
    import nonlinear_speed

    argv = ["--reps", str(args.reps), "--threads", str(args.threads), "--device",
            str(args.device), "--seed", str(args.seed)]
    argv += ["--quick"] if args.quick else []
    argv += ["--sizes", args.swing_up_sizes] if args.swing_up_sizes else []
    argv += ["--no-reference"] if args.no_reference else []
    for key, value in args.options.items():
        argv += ["--option", f"{key}={value}"]
    print(flush=True)
    rows = nonlinear_speed.main(argv)
    if args.out:
        title = nonlinear_speed.header(nonlinear_speed.parse_args(argv))
        with open(args.out, "a") as fh:
            fh.write("\n\n" + nonlinear_speed.markdown(rows, title))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
