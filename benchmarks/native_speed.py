"""The native kernels against PyTorch operations, in one process (``diffmpc.native``).

For each problem, one solve plus its backward is timed with the compiled kernels and with
``diffmpc.native.enabled(False)``, alternating, and the medians are compared. Problems: the LQR
and box-LQR problems of ``solver_speed.py`` (n = 10, m = 5) and the swing-ups of
``nonlinear_speed.py``. Prints a markdown table.

    python benchmarks/native_speed.py                            # B = 256, T = 50
    python benchmarks/native_speed.py --sizes 32x50 --problems lqr,box --reps 9
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402
import nonlinear_speed as ns  # noqa: E402
import solver_speed as ss  # noqa: E402

from diffmpc import native  # noqa: E402

COLUMNS = ["problem", "B", "T", "native fwd+bwd ms", "PyTorch fwd+bwd ms", "speedup"]
PROBLEMS = ("lqr", "box", "pendulum", "cartpole")


def _runner(problem: str, B: int, T: int):
    """A function running one fwd+bwd of the problem (its inputs made outside the clock)."""
    if problem in ("lqr", "box"):
        prob = ss.make_problem(B, T)

        def run():
            leaves = ss._leaves(prob, False, True)
            t0 = time.perf_counter()
            ss.run_diffmpc(prob, T, problem == "box", True, leaves)
            return 1e3 * (time.perf_counter() - t0)
        return run
    prob = ns.make_problem(problem, B, T)
    return lambda: ns.run_diffmpc(prob, T, {}).fb


def bench(problem: str, B: int, T: int, reps: int) -> dict:
    run = _runner(problem, B, T)
    times = {True: [], False: []}
    for on in (True, False):  # warm-up (and the kernels' build)
        with native.enabled(on):
            run()
    for _ in range(reps):
        for on in (True, False):
            with native.enabled(on):
                times[on].append(run())
    fast, slow = statistics.median(times[True]), statistics.median(times[False])
    return {"problem": problem, "B": B, "T": T, "fast": fast, "slow": slow}


def _fmt(r: dict) -> list[str]:
    return [r["problem"], str(r["B"]), str(r["T"]), f"{r['fast']:.1f}", f"{r['slow']:.1f}",
            f"{r['slow'] / r['fast']:.2f}x"]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=_report.sizes, default=[(256, 50)],
                    help="comma-separated BxT (default 256x50)")
    ap.add_argument("--problems", default=",".join(PROBLEMS),
                    help=f"comma-separated, from {', '.join(PROBLEMS)} (default: all)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions (default 5)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", help="write the markdown table to this file")
    args = ap.parse_args(argv)
    problems = [p.strip() for p in args.problems.split(",") if p.strip()]
    bad = [p for p in problems if p not in PROBLEMS]
    if bad:
        ap.error(f"--problems: expected names from {PROBLEMS}, got {bad}")
    if not native.available():
        ap.error(f"the native kernels are not available here: {native.status()}")
    torch.set_num_threads(args.threads)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unconverged swing-up samples warn
        for B, T in args.sizes:
            for problem in problems:
                rows.append(bench(problem, B, T, args.reps))
                print(_report.progress(COLUMNS, _fmt(rows[-1])), flush=True)
    header = (f"Native kernels against PyTorch operations, fwd+bwd, one process, median of "
              f"{args.reps} (float64, {_report.device_name(_report.CPU)})")
    _report.publish(_report.markdown(header, COLUMNS, [_fmt(r) for r in rows]), args.out)
    return rows


if __name__ == "__main__":
    main()
