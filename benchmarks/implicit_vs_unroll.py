"""Backward cost of implicit differentiation against unrolling the solver's iterations.

Amos's thesis measured a constant ~15 ms for the fixed-point (implicit) backward of the MPC layer,
against unrolled backward passes that grew to 385x slower at 128 iterations. This script
repeats the comparison for diffmpc: a swing-up batch (pendulum or cartpole, random pole angles,
float64), the solver forced to run k iterations (``max_iter=k``, ``tol=1e-300``,
``unconverged="keep"``), and for each k:

- time of the forward solve and of the backward pass of ``sum(u * W)`` into the dynamics'
  parameters, the cost's parameters and x_init, for ``backward="implicit"`` and ``"unroll"``
  (median over repetitions);
- memory: the bytes of the tensors the autograd graph holds for the backward pass at the end of
  the forward (distinct storages of the saved tensors still alive, tracked with
  ``torch.autograd.graph.saved_tensors_hooks``). That is the memory held between forward and
  backward, the part that grows with unrolling; it leaves out the solver's temporaries, the
  outputs themselves and the allocator's peak inside the forward (CPU tensors bypass
  tracemalloc, and torch reports no CPU peak). The implicit backward's H ``[B, T, p, p]``,
  F ``[B, T-1, n, p]`` and free set are saved with ``save_for_backward``, so the hooks see them;
- with ``--device cuda``, also the peak: the most memory CUDA's allocator held for tensors
  during the forward and backward, above what was allocated before the forward;
- the iterations the solver actually ran (a sample that reaches the rounding floor stops even
  with the tiny tol) and the relative difference between the two gradients.

Usage:
    python benchmarks/implicit_vs_unroll.py                       # k = 1, 4, 16, 64
    python benchmarks/implicit_vs_unroll.py --iters 1,4,16,64,128 --system pendulum --out t.md
    python benchmarks/implicit_vs_unroll.py --quick
    python benchmarks/implicit_vs_unroll.py --device cuda --iters 1,4,16,64,128
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import warnings
import weakref
from pathlib import Path

import torch

import diffmpc as dm
from diffmpc.systems import Cartpole, Pendulum

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _report lies beside this script
import _report  # noqa: E402

DT = torch.float64


def make_problem(system_name: str, B: int, T: int, seed: int = 0,
                 device: torch.device = _report.CPU):
    """A system, its default (learnable) cost, swing-up starts ``[B, n]``, weights ``[B, T, 1]``,
    drawn on the CPU and moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    th = (2 * torch.rand(B, generator=g, dtype=DT) - 1) * math.pi
    r = lambda s: s * torch.randn(B, generator=g, dtype=DT)  # noqa: E731
    if system_name == "pendulum":
        system = Pendulum(dtype=DT)
        x_init = torch.stack([th.cos(), th.sin(), r(1.0)], -1)
    else:
        system = Cartpole(dtype=DT)
        x_init = torch.stack([r(0.5), r(0.5), th.cos(), th.sin(), r(0.5)], -1)
    W = torch.randn(B, T, 1, generator=g, dtype=DT)
    return (system.to(device), system.default_cost().to(device), x_init.to(device),
            W.to(device))


class _Held:
    """A tensor saved for backward, as the autograd graph holds it (weakly referenced here)."""

    __slots__ = ("t", "__weakref__")

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


class SavedBytes:
    """Context manager over a forward pass; ``held()`` is the total size of the distinct storages
    that autograd graphs still hold for backward (tensors saved by graphs that were already
    freed, e.g. the solver's internal derivative computations, are not counted)."""

    def __init__(self) -> None:
        self.alive: weakref.WeakSet[_Held] = weakref.WeakSet()

    def _pack(self, t: torch.Tensor) -> _Held:
        held = _Held(t)
        self.alive.add(held)
        return held

    def __enter__(self) -> SavedBytes:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda h: h.t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def held(self) -> int:
        storages = {}
        for h in list(self.alive):
            s = h.t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return sum(storages.values())


def run(problem, T: int, k: int, backward: str) -> dict:
    """One forced-k solve and backward; times in ms, graph bytes, gradients, iterations."""
    system, cost, x_init, W = problem
    x_init = x_init.clone().requires_grad_(True)
    leaves = [x_init, *system.parameters(), *cost.parameters()]
    mpc = dm.MPC(system.n_state, system.n_ctrl, T, system.u_lower, system.u_upper,
                 backward=backward, max_iter=k, tol=1e-300, unconverged="keep")
    dev = x_init.device
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unconverged samples: not positive definite, etc.
        with SavedBytes() as saved:
            t0 = _report.clock(dev)
            sol = mpc(x_init, cost, system)
            t1 = _report.clock(dev)
        held = saved.held()  # what the graph keeps until backward
        loss = (sol.u * W).sum()
        t2 = _report.clock(dev)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
        t3 = _report.clock(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base if cuda else float("nan")
    return {"fwd": 1e3 * (t1 - t0), "bwd": 1e3 * (t3 - t2), "bytes": held, "peak": peak,
            "grads": torch.cat([g.reshape(-1) for g in grads]),
            "iters": int(sol.iterations.max())}


def bench(problem, T: int, k: int, reps: int) -> dict:
    row = {"k": k}
    for mode, key in (("implicit", "imp"), ("unroll", "unr")):
        runs = [run(problem, T, k, mode) for _ in range(reps)]
        row[f"{key}_fwd"] = statistics.median(r["fwd"] for r in runs)
        row[f"{key}_bwd"] = statistics.median(r["bwd"] for r in runs)
        row[f"{key}_mb"] = runs[-1]["bytes"] / 2**20
        row[f"{key}_peak"] = runs[-1]["peak"] / 2**20
        row[f"{key}_grads"] = runs[-1]["grads"]
        row["iters"] = runs[-1]["iters"]
    a, b = row.pop("imp_grads"), row.pop("unr_grads")
    row["grad_rel"] = float((b - a).norm() / a.norm().clamp_min(1e-300))
    return row


COLUMNS = ["k (max_iter)", "iters run (max)", "implicit fwd ms", "implicit bwd ms",
           "unroll fwd ms", "unroll bwd ms", "bwd ratio unroll/implicit", "implicit graph MB",
           "unroll graph MB", "implicit peak MB", "unroll peak MB", "grad rel diff"]


def _fmt(row: dict) -> list[str]:
    return [str(row["k"]), str(row["iters"]), f"{row['imp_fwd']:.1f}", f"{row['imp_bwd']:.1f}",
            f"{row['unr_fwd']:.1f}", f"{row['unr_bwd']:.1f}",
            f"{row['unr_bwd'] / row['imp_bwd']:.1f}x", f"{row['imp_mb']:.2f}",
            f"{row['unr_mb']:.2f}", _mb(row["imp_peak"]), _mb(row["unr_peak"]),
            f"{row['grad_rel']:.1e}"]


def _mb(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.2f}"


def markdown(rows: list[dict], header: str) -> str:
    return _report.markdown(header, COLUMNS, [_fmt(r) for r in rows])


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="k = 1, 4; B = 4; 1 repetition")
    ap.add_argument("--system", choices=["pendulum", "cartpole"], default="cartpole")
    ap.add_argument("--iters", type=_report.ints, default=None, help="k values (default 1,4,16,64)")
    ap.add_argument("-B", "--batch", type=int, default=None, help="batch size (default 16)")
    ap.add_argument("-T", "--horizon", type=int, default=20)
    ap.add_argument("--reps", type=int, default=None, help="repetitions (median; default 3)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", type=_report.device, default=_report.CPU,
                    help="cpu (default) or cuda[:N]; on CUDA the peak memory is reported too")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the markdown table to this file")
    args = ap.parse_args(argv)
    args.iters = args.iters or ([1, 4] if args.quick else [1, 4, 16, 64])
    args.batch = args.batch or (4 if args.quick else 16)
    args.reps = args.reps or (1 if args.quick else 3)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    problem = make_problem(args.system, args.batch, args.horizon, args.seed, args.device)
    print(f"implicit_vs_unroll: {args.system}, B={args.batch}, T={args.horizon}, float64, "
          f"{_report.device_name(args.device)}, reps={args.reps}", flush=True)
    rows = []
    for k in args.iters:
        row = bench(problem, args.horizon, k, args.reps)
        rows.append(row)
        print(_report.progress(COLUMNS, _fmt(row)), flush=True)
    header = (f"Implicit vs unrolled backward ({args.system} swing-up, B={args.batch}, "
              f"T={args.horizon}, float64, {_report.device_name(args.device)}, median of "
              f"{args.reps}; graph MB: tensors the graph holds for backward after the forward, "
              f"via saved_tensors_hooks; peak MB (CUDA only): allocator peak during forward and "
              f"backward)")
    _report.publish(markdown(rows, header), args.out)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
