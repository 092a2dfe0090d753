"""The diffmpc command line: ``diffmpc demo`` (or ``python -m diffmpc.agents.cli demo``)."""

from __future__ import annotations

import argparse
import sys

import torch

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from diffmpc import native
    from diffmpc.agents.demo import demo_rows, format_table

    torch.set_num_threads(args.threads)
    print(f"diffmpc solver demo: batch {args.batch}, horizon {args.horizon}, float64, "
          f"{args.threads} thread(s), native kernels: {native.status()}"
          f"{' (OpenMP)' if native.threaded() else ''}", flush=True)
    print(format_table(demo_rows(args.batch, args.horizon)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffmpc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="solve LQR, box-LQR and pendulum batches; print a table")
    demo.add_argument("--batch", type=int, default=64)
    demo.add_argument("--horizon", type=int, default=20)
    demo.add_argument("--threads", type=int, default=1)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
