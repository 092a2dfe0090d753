"""What the benchmark scripts share: the ``--sizes`` and ``--device`` arguments, timing that waits
for the device, progress lines and the markdown table they print and write with ``--out``."""

from __future__ import annotations

import argparse
import time

import torch

CPU = torch.device("cpu")


def sizes(text: str) -> list[tuple[int, int]]:
    """argparse type of ``--sizes``: ``"1x10,256x50"`` -> ``[(1, 10), (256, 50)]`` (B x T)."""
    try:
        out = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",")]
    except ValueError:
        out = []
    if not out or any(len(s) != 2 for s in out):
        raise argparse.ArgumentTypeError(f"--sizes: expected BxT[,BxT...], got {text!r}")
    return out


def device(text: str) -> torch.device:
    """argparse type of ``--device``: ``cpu``, ``cuda`` or ``cuda:N``, which must be available."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"--device: expected cpu or cuda[:N], got {text!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"--device: {text!r} requested, but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"--device: expected cpu or cuda[:N], got {text!r}")
    return dev


def clock(dev: torch.device) -> float:
    """``time.perf_counter()`` after the work queued on ``dev`` has finished (CUDA runs
    asynchronously: without the wait a timer would measure kernel launches only)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


def device_name(dev: torch.device) -> str:
    """``"CPU, N thread(s), native kernels on|off"`` (``diffmpc.native``; "on (one thread)" if
    they were built without OpenMP) or the GPU's name, for table headers."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    from diffmpc import native

    kernels = "off" if not native.available() else "on" if native.threaded() else "on (one thread)"
    return f"CPU, {torch.get_num_threads()} thread(s), native kernels {kernels}"


def ints(text: str) -> list[int]:
    """argparse type of a comma-separated list of ints."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--option``: the value as an int, a float, True/False/None or text."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--option: expected KEY=VALUE, got {text!r}")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    lowered = {"true": True, "false": False, "none": None}
    return key, lowered.get(value.lower(), value)


def progress(columns: list[str], cells: list[str]) -> str:
    """One ``column=value`` line per configuration, printed while a benchmark runs."""
    return "  ".join(f"{c}={v}" for c, v in zip(columns, cells, strict=True))


def markdown(header: str, columns: list[str], rows: list[list[str]],
             notes: list[str] | None = None) -> str:
    """A header line, a right-aligned markdown table and optional notes below it."""
    lines = [header, "", "| " + " | ".join(columns) + " |",
             "|" + "|".join("---:" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def publish(table: str, out: str | None) -> None:
    """Print the table after the progress lines, and write it to ``out`` if given."""
    print()
    print(table)
    if out:
        with open(out, "w") as fh:
            fh.write(table)
