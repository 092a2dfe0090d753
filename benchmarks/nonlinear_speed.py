"""Nonlinear MPC speed: diffmpc against mpc.pytorch on pendulum and cartpole swing-up.

Both solvers run in this process, with the same thread count, on identical problems: the
systems of ``diffmpc.systems`` and mpc.pytorch's ``PendulumDx`` / ``CartpoleDx`` (the same
physics), their default quadratic costs and control bounds, random swing-up starts (pole angle
uniform in [-pi, pi]), zero initial controls, float64. mpc.pytorch runs with the settings of
its examples: ``lqr_iter=50``, ``GradMethods.AUTO_DIFF``, the env's ``mpc_eps``,
``linesearch_decay`` and ``max_linesearch_iter``, ``exit_unconverged=False``. diffmpc runs with
its default options (``--option KEY=VALUE`` changes them) and the models' closed-form Jacobian
and curvature (``--autograd``: derivatives by autograd, as for a learned model).

For every (system, T, B) it times the forward solve, and the forward solve plus the backward
pass of ``sum(u * W)`` into the cost tensors C, c, the dynamics' parameters and x_init (median
over repetitions; mpc.pytorch's repetitions stop once ``--ref-budget`` seconds are spent), and
reports iterations, the fraction of samples converged and the objectives. Both objectives are
evaluated the same way: a rollout of the controls through diffmpc's model and the quadratic
cost. Convergence: diffmpc reports it per sample; for mpc.pytorch a sample counts as converged
when its best iterate's full control step is below ``mpc_eps`` (its own criterion, read by
wrapping its ``solve_lqr_subproblem``), and its iteration count is the number of iterations it ran.
One compatibility fix is applied to mpc.pytorch (``_patch_mpc_pytorch``): without it, its backward
pass crashes on current PyTorch whenever a control is at a bound.

Targets (issue 3): at B=256, forward+backward >= 20x faster with every sample converged and
no objective worse; at B=1, >= 10x faster.

Usage:
    python benchmarks/nonlinear_speed.py                    # the full table (many minutes)
    python benchmarks/nonlinear_speed.py --quick            # a small subset
    python benchmarks/nonlinear_speed.py --systems cartpole --sizes 256x50 --out table.md
    python benchmarks/nonlinear_speed.py --device cuda --sizes 1x20,256x20,256x50
    python benchmarks/nonlinear_speed.py --autograd --sizes 1x20,256x20
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

import diffmpc as dm
from diffmpc.systems import Cartpole, Pendulum

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _report lies beside this script
import _report  # noqa: E402

DT = torch.float64
CPU = _report.CPU
FULL_SIZES = [(B, T) for T in (20, 50) for B in (1, 32, 256)]
QUICK_SIZES = [(1, 20), (32, 20)]
PARAMS = {"pendulum": (10.0, 1.0, 1.0), "cartpole": (9.8, 1.0, 0.1, 0.5)}


@dataclass
class Problem:
    """x_init ``[B, n]``, the cost's ``q [p]`` (diagonal of C) and ``c [p]``, loss weights
    ``W [B, T, 1]``."""

    name: str
    device: torch.device
    x_init: torch.Tensor
    q: torch.Tensor
    c: torch.Tensor
    W: torch.Tensor


def make_system(name: str, device: torch.device = CPU):
    return (Pendulum(dtype=DT) if name == "pendulum" else Cartpole(dtype=DT)).to(device)


def make_problem(name: str, B: int, T: int, seed: int = 0, device: torch.device = CPU) -> Problem:
    """Drawn on the CPU (the same numbers whatever the device), then moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    th = (2 * torch.rand(B, generator=g, dtype=DT) - 1) * math.pi
    r = lambda s: s * torch.randn(B, generator=g, dtype=DT)  # noqa: E731
    if name == "pendulum":
        x_init = torch.stack([th.cos(), th.sin(), r(1.0)], -1)
    else:
        x_init = torch.stack([r(0.5), r(0.5), th.cos(), th.sin(), r(0.5)], -1)
    quad = make_system(name).default_cost().quad_cost()  # 1/2 tau' C tau + c' tau, C diagonal
    tensors = (x_init, torch.diagonal(quad.C).detach().clone(), quad.c.detach().clone(),
               torch.randn(B, T, 1, generator=g, dtype=DT))
    return Problem(name, device, *(t.to(device) for t in tensors))


def objective(prob: Problem, u: torch.Tensor) -> torch.Tensor:
    """``[B]`` cost of controls ``u [B, T, 1]``: a rollout through diffmpc's model."""
    system = make_system(prob.name, prob.device)
    with torch.no_grad():
        xs = [prob.x_init]
        for t in range(u.shape[1] - 1):
            xs.append(system(xs[-1], u[:, t]))
        tau = torch.cat([torch.stack(xs, 1), u], -1)
        return (0.5 * prob.q * tau * tau + prob.c * tau).sum((-1, -2))


# ------------------------------------------------------------------------------- solvers


@dataclass
class Run:
    """One solve: wall times in ms (fwd, fwd+bwd), controls ``[B, T, 1]``, per-sample
    convergence ``[B]`` and iterations ``[B]``."""

    fwd: float
    fb: float
    u: torch.Tensor
    converged: torch.Tensor
    iterations: torch.Tensor


class AutogradOnly(torch.nn.Module):
    """A model without closed-form derivatives: the solver forms them with autograd, as for
    any learned model (``--autograd``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.model(x, u)


def run_diffmpc(prob: Problem, T: int, options: dict, autograd: bool = False) -> Run:
    system = make_system(prob.name, prob.device)
    n = system.n_state
    mpc = dm.MPC(n, 1, T, system.u_lower, system.u_upper, unconverged="keep", **options)
    x_init, q, c = (t.clone().requires_grad_(True) for t in (prob.x_init, prob.q, prob.c))
    dynamics = AutogradOnly(system) if autograd else system
    t0 = _report.clock(prob.device)
    sol = mpc(x_init, dm.QuadCost(torch.diag(q), c), dynamics)
    t1 = _report.clock(prob.device)
    (sol.u * prob.W).sum().backward()
    t2 = _report.clock(prob.device)
    return Run(1e3 * (t1 - t0), 1e3 * (t2 - t0), sol.u.detach(), sol.converged,
               sol.iterations)


def _patch_mpc_pytorch() -> None:
    """mpc.pytorch's ``util.bdiag`` indexes with a uint8 mask, which current PyTorch rejects: its
    backward pass crashes as soon as a control is at a bound. ``torch.diag_embed`` builds the
    same batch of diagonal matrices; nothing else is changed."""
    from mpc import util

    util.bdiag = torch.diag_embed


def run_mpcpytorch(prob: Problem, T: int) -> Run:
    from mpc import mpc as mpcpt
    from mpc.env_dx.cartpole import CartpoleDx
    from mpc.env_dx.pendulum import PendulumDx

    params = torch.tensor(PARAMS[prob.name], dtype=DT, device=prob.device, requires_grad=True)
    dx = PendulumDx(params=params) if prob.name == "pendulum" else CartpoleDx(params=params)
    B, n = prob.x_init.shape
    ctrl = mpcpt.MPC(n, 1, T, u_lower=dx.lower, u_upper=dx.upper, lqr_iter=50, verbose=-1,
                     exit_unconverged=False, detach_unconverged=False,
                     linesearch_decay=dx.linesearch_decay,
                     max_linesearch_iter=dx.max_linesearch_iter,
                     grad_method=mpcpt.GradMethods.AUTO_DIFF, eps=dx.mpc_eps, n_batch=B)
    trace = _trace(ctrl, B, prob.device)
    x_init, q, c = (t.clone().requires_grad_(True) for t in (prob.x_init, prob.q, prob.c))
    C = torch.diag(q).expand(T, B, n + 1, n + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecated calls
        t0 = _report.clock(prob.device)
        _, u, _ = ctrl(x_init, mpcpt.QuadCost(C, c.expand(T, B, n + 1)), dx)
        t1 = _report.clock(prob.device)
        (u * prob.W.transpose(0, 1)).sum().backward()
        t2 = _report.clock(prob.device)
    conv = trace["best_du"] < dx.mpc_eps
    iters = torch.full((B,), trace["iters"], dtype=torch.long, device=prob.device)
    return Run(1e3 * (t1 - t0), 1e3 * (t2 - t0), u.detach().transpose(0, 1), conv, iters)


def _trace(ctrl, B: int, device: torch.device) -> dict:
    """Record mpc.pytorch's iterations and, per sample, the full step of its best iterate (it
    keeps an iterate whose cost is within ``best_cost_eps`` of the best so far)."""
    inf = torch.full((B,), math.inf, dtype=DT, device=device)
    trace = {"iters": 0, "best_cost": inf, "best_du": inf}
    solve = ctrl.solve_lqr_subproblem

    def wrapped(*args, **kwargs):
        out = solve(*args, **kwargs)
        if not kwargs.get("no_op_forward", False):
            costs, du = out[3].detach().to(DT), out[4].detach().to(DT)
            better = costs <= trace["best_cost"] + (ctrl.best_cost_eps if trace["iters"] else 0)
            trace["best_cost"] = torch.where(better, costs, trace["best_cost"])
            trace["best_du"] = torch.where(better, du, trace["best_du"])
            trace["iters"] += 1
        return out

    ctrl.solve_lqr_subproblem = wrapped
    return trace


def _timed(fn, reps: int, budget: float) -> tuple[float, float, Run]:
    """Median fwd and fwd+bwd ms over up to ``reps`` runs (fewer once ``budget`` s are spent)."""
    runs, start = [], time.perf_counter()
    for _ in range(reps):
        runs.append(fn())
        if time.perf_counter() - start > budget:
            break
    return (statistics.median(r.fwd for r in runs), statistics.median(r.fb for r in runs),
            runs[-1])


# ------------------------------------------------------------------------------- a config


_WARM: set = set()  # non-empty once mpc.pytorch has run on the GPU in this process


def bench_config(name: str, B: int, T: int, args) -> dict:
    prob = make_problem(name, B, T, seed=args.seed, device=args.device)
    row = {"system": name, "B": B, "T": T}
    run_diffmpc(prob, T, args.options, args.autograd)  # warm-up
    row["d_fwd"], row["d_fb"], d = _timed(
        lambda: run_diffmpc(prob, T, args.options, args.autograd), args.reps, 1e9)
    J_d = objective(prob, d.u)
    row.update(d_iter=float(d.iterations.double().mean()), d_iter_max=int(d.iterations.max()),
               d_conv=float(d.converged.double().mean()), d_obj=float(J_d.mean()))
    if args.no_reference:
        return row
    try:
        if args.device.type == "cuda" and not _WARM:  # untimed, once: CUDA's libraries warm up
            run_mpcpytorch(make_problem(name, 1, T, device=args.device), T)
            _WARM.add(True)
        row["p_fwd"], row["p_fb"], p = _timed(lambda: run_mpcpytorch(prob, T), args.reps,
                                              args.ref_budget)
    except Exception as exc:  # noqa: BLE001 - its code predates current PyTorch: report, go on
        row["target"] = f"mpc.pytorch failed: {type(exc).__name__}: {str(exc)[:100]}"
        return row
    J_p = objective(prob, p.u)
    row.update(p_iter=int(p.iterations.max()), p_conv=float(p.converged.double().mean()),
               p_obj=float(J_p.mean()), no_worse=float((J_d <= J_p + 1e-6).double().mean()))
    row["target"] = _target(row)
    return row


def _target(row: dict) -> str:
    speed = row["p_fb"] / row["d_fb"]
    if row["B"] == 256:
        ok = speed >= 20 and row["d_conv"] == 1.0 and row["no_worse"] == 1.0
        return f"{'met' if ok else 'MISSED'} (20x, all conv, no worse)"
    if row["B"] == 1:
        return f"{'met' if speed >= 10 else 'MISSED'} (10x)"
    return "-"


# ---------------------------------------------------------------------------------- table

COLUMNS = ["system", "T", "B", "diffmpc fwd ms", "diffmpc fwd+bwd ms", "mpc.pytorch fwd ms",
           "mpc.pytorch fwd+bwd ms", "fwd speedup", "fwd+bwd speedup", "diffmpc iters mean/max",
           "mpc.pytorch iters", "diffmpc conv", "mpc.pytorch conv", "diffmpc obj",
           "mpc.pytorch obj", "ours <= theirs", "target"]


def _fmt(row: dict) -> list[str]:
    def num(key, spec):
        return format(row[key], spec) if key in row else "-"

    def ratio(a, b):
        return f"{row[b] / row[a]:.1f}x" if a in row and b in row else "-"

    def share(key):  # a fraction in percent to 0.1, rounded down: 255 of 256 is not 100 %
        return f"{math.floor(row[key] * 1000 + 1e-9) / 10:g}%" if key in row else "-"

    return [row["system"], str(row["T"]), str(row["B"]), num("d_fwd", ".1f"), num("d_fb", ".1f"),
            num("p_fwd", ".0f"), num("p_fb", ".0f"), ratio("d_fwd", "p_fwd"),
            ratio("d_fb", "p_fb"), f"{row['d_iter']:.1f}/{row['d_iter_max']}", num("p_iter", "d"),
            share("d_conv"), share("p_conv"), num("d_obj", ".4f"), num("p_obj", ".4f"),
            share("no_worse"), row.get("target", "-")]


def markdown(rows: list[dict], header: str) -> str:
    return _report.markdown(header, COLUMNS, [_fmt(r) for r in rows])


# ------------------------------------------------------------------------------------ CLI


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, 2 repetitions")
    ap.add_argument("--systems", default="pendulum,cartpole",
                    help="comma-separated among pendulum, cartpole")
    ap.add_argument("--sizes", type=_report.sizes, help="comma-separated BxT, e.g. 1x20,256x50")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (median; default 5)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--device", type=_report.device, default=CPU,
                    help="cpu (default) or cuda[:N]: both solvers run there")
    ap.add_argument("--ref-budget", type=float, default=60.0,
                    help="seconds per configuration for mpc.pytorch; fewer repetitions past it")
    ap.add_argument("--option", type=_report.option, action="append", default=[],
                    help="a diffmpc solver option KEY=VALUE (repeatable), e.g. max_iter=100")
    ap.add_argument("--autograd", action="store_true",
                    help="diffmpc differentiates the model with autograd instead of using its "
                         "closed-form Jacobian and curvature (as for a learned model)")
    ap.add_argument("--no-reference", action="store_true", help="time diffmpc only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the markdown table to this file")
    args = ap.parse_args(argv)
    if args.reps is None:
        args.reps = 2 if args.quick else 5
    if args.sizes is None:
        args.sizes = QUICK_SIZES if args.quick else FULL_SIZES
    args.systems = [s.strip() for s in args.systems.split(",")]
    bad = sorted(set(args.systems) - set(PARAMS))
    if bad:
        ap.error(f"--systems: expected names among {sorted(PARAMS)}, got {bad}")
    args.options = dict(args.option)
    return args


def _options(args) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in args.options.items()) or "defaults"
    return opts + ("; model derivatives by autograd" if args.autograd else "")


def header(args) -> str:
    """The table's title line for these arguments."""
    return (f"Nonlinear MPC speed (swing-up, float64, {_report.device_name(args.device)}, "
            f"median of up to {args.reps}; mpc.pytorch: lqr_iter=50, AUTO_DIFF, its env's "
            f"settings; diffmpc options: {_options(args)})")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.no_reference:
        _patch_mpc_pytorch()
    print(f"nonlinear_speed: float64, {_report.device_name(args.device)}, reps={args.reps}, "
          f"diffmpc options: {_options(args)}", flush=True)
    rows = []
    for name in args.systems:
        for B, T in args.sizes:
            row = bench_config(name, B, T, args)
            rows.append(row)
            print(_report.progress(COLUMNS, _fmt(row)), flush=True)
    _report.publish(markdown(rows, header(args)), args.out)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
