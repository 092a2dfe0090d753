"""The active-set passes of one box-LQR solve (``ilqr._active_set_lq``), pass by pass.

For the box-LQR problems of ``solver_speed.py`` (n = 10, m = 5, |u| <= 0.3), prints for each
fixed-set Riccati pass its samples, its time, and, for the passes over the whole batch, how far
into the horizon the held set changed since the pass before: per sample the last step whose
held controls changed, its mean over the batch, and the mean over groups of 8 samples of the
group's latest such step (a compiled pass runs up to 8 samples in the lanes of a vector, so a
pass that reused the previous one's steps after the last change could skip only the steps
after a whole group's latest change). It shows what bounds a box solve's time: the number of
passes, each as long as an unconstrained solve's.

    python benchmarks/box_passes.py                  # B = 256, T = 50
    python benchmarks/box_passes.py --batch 32 --horizon 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import solver_speed as ss  # noqa: E402

from diffmpc import ilqr, native  # noqa: E402

LANE_GROUP = 8


def record_passes(B: int, T: int, seed: int = 0) -> list[dict]:
    """One box-LQR solve (forward only) with every ``held_pass`` recorded: its free set ``[b, T,
    m]`` (a copy) and its time in ms."""
    prob = ss.make_problem(B, T, seed)
    passes: list[dict] = []
    original = ilqr.held_pass

    def recorded(C, c, Fh, free, val):
        t0 = time.perf_counter()
        out = original(C, c, Fh, free, val)
        passes.append({"free": free.clone(), "ms": 1e3 * (time.perf_counter() - t0)})
        return out

    ilqr.held_pass = recorded
    try:
        ss.run_diffmpc(prob, T, True, False)
    finally:
        ilqr.held_pass = original
    return passes


def table(passes: list[dict], B: int) -> str:
    rows = ["| pass | samples | ms | samples changed | mean last changed step | "
            "mean of the 8-sample groups' latest |", "|---:|---:|---:|---:|---:|---:|"]
    prev = None
    for i, rec in enumerate(passes, 1):
        free = rec["free"]
        cells = [str(i), str(free.shape[0]), f"{rec['ms']:.1f}", "-", "-", "-"]
        if prev is not None and free.shape[0] == B and prev.shape[0] == B:
            changed = (free != prev).any(-1)  # [B, T]
            steps = torch.arange(changed.shape[1]).expand_as(changed)
            last = torch.where(changed, steps, -1).amax(1)  # -1: no change
            pad = (-B) % LANE_GROUP
            groups = torch.cat([last, last.new_full((pad,), -1)]).view(-1, LANE_GROUP).amax(1)
            cells[3:] = [str(int((last >= 0).sum())), f"{last.float().mean():.1f}",
                         f"{groups.float().mean():.1f}"]
        rows.append("| " + " | ".join(cells) + " |")
        prev = free
    return "\n".join(rows)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--horizon", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not native.available():
        sys.exit(f"box_passes.py times the compiled passes; native kernels: {native.status()}")
    record_passes(args.batch, args.horizon, args.seed)  # warm-up: builds, first-call costs
    passes = record_passes(args.batch, args.horizon, args.seed)
    out = (f"Active-set passes of one box-LQR solve (B = {args.batch}, T = {args.horizon}, "
           f"steps 0-{args.horizon - 1}, {args.threads} thread(s))\n\n"
           + table(passes, args.batch))
    print(out)
    return out


if __name__ == "__main__":
    main()
