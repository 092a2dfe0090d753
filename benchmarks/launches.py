"""Operations of LQ solves with and without the scans over time (``time_parallel``).

For each problem of ``solver_speed.py`` (n = 10, m = 5, float64) and each recursion, one fwd+bwd
(solve plus the backward of ``sum(u * W)``) is timed (min and median of ``--reps``) and then
counted: on CUDA the kernel launches and the GPU's busy time (torch.profiler), on the CPU the
dispatched operations other than views (a proxy for launches). Prints a markdown table. Both
recursions run in PyTorch operations: the compiled CPU pass (``diffmpc.native``) is switched off,
as it never runs on a GPU and would hide the sequential pass's operations on the CPU.

    python benchmarks/launches.py --device cuda --sizes 256x50,1024x50,4096x50
    python benchmarks/launches.py --sizes 1x50,256x50      # CPU: dispatched operations
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402
import solver_speed as ss  # noqa: E402

from diffmpc import native  # noqa: E402

COLUMNS = ["problem", "B", "T", "time_parallel", "fwd+bwd ms (min)", "fwd+bwd ms (median)",
           "operations", "GPU busy ms", "conv"]
_VIEWS = {"select", "slice", "unsqueeze", "squeeze", "expand", "view", "_unsafe_view",
          "transpose", "t", "unbind", "detach", "alias", "permute", "as_strided", "split",
          "diagonal", "_reshape_alias", "reshape", "unflatten", "flatten", "lift_fresh", "narrow"}


class _CountOps(TorchDispatchMode):
    """Counts the dispatched operations other than views."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in _VIEWS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _count(fn, dev: torch.device) -> tuple[int, float]:
    """(operations, GPU busy ms) of one call: launches and busy time on CUDA, else dispatched
    operations and nan."""
    if dev.type != "cuda":
        with _CountOps() as c:
            fn()
        return c.count, float("nan")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        fn()
        torch.cuda.synchronize(dev)
    events = p.key_averages()
    launches = sum(e.count for e in events if "LaunchKernel" in e.key)
    busy = sum(e.self_device_time_total for e in events
               if e.device_type == torch.autograd.DeviceType.CUDA)
    return launches, busy / 1e3


def bench(B: int, T: int, box: bool, parallel: bool, reps: int, dev: torch.device) -> dict:
    prob = ss.make_problem(B, T, device=dev)
    out = {}

    def fn():
        with native.enabled(False):
            out["run"] = ss.run_diffmpc(prob, T, box, True, time_parallel=parallel)

    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = _report.clock(dev)
        fn()
        times.append(1e3 * (_report.clock(dev) - t0))
    ops, busy = _count(fn, dev)
    return {"problem": "box-LQR" if box else "LQR", "B": B, "T": T, "par": parallel,
            "min": min(times), "median": statistics.median(times), "ops": ops, "busy": busy,
            "conv": float(out["run"][1].double().mean())}


def _fmt(r: dict) -> list[str]:
    return [r["problem"], str(r["B"]), str(r["T"]), "yes" if r["par"] else "no",
            f"{r['min']:.1f}", f"{r['median']:.1f}", str(r["ops"]),
            "-" if r["busy"] != r["busy"] else f"{r['busy']:.1f}", f"{100 * r['conv']:.0f}%"]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=_report.sizes, default=[(256, 50)],
                    help="comma-separated BxT (default 256x50)")
    ap.add_argument("--box", choices=["both", "on", "off"], default="both")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--device", type=_report.device, default=_report.CPU)
    ap.add_argument("--out", help="write the markdown table to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    boxes = {"both": [False, True], "on": [True], "off": [False]}[args.box]
    rows = []
    for B, T in args.sizes:
        for box in boxes:
            for parallel in (False, True):
                rows.append(bench(B, T, box, parallel, args.reps, args.device))
                print(_report.progress(COLUMNS, _fmt(rows[-1])), flush=True)
    what = "kernel launches" if args.device.type == "cuda" else "dispatched operations (no views)"
    header = (f"LQ solves, fwd+bwd, sequential vs scans over time (n=10, m=5, float64, "
              f"{_report.device_name(args.device)}; operations: {what})")
    _report.publish(_report.markdown(header, COLUMNS, [_fmt(r) for r in rows]), args.out)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
