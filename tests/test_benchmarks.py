"""A tiny-budget run of the solver speed benchmark (the script runs; its table is well formed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "solver_speed.py"


def _load():
    spec = importlib.util.spec_from_file_location("solver_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_solver_speed_quick(tmp_path, capsys):
    pytest.importorskip("mpc")
    bench = _load()
    out = tmp_path / "table.md"
    rows = bench.main(["--quick", "--sizes", "1x5", "--reps", "1", "--no-cvxpy",
                       "--out", str(out)])
    assert [(r["B"], r["T"], r["box"]) for r in rows] == [(1, 5, False), (1, 5, True)]
    for r in rows:
        assert r["d_conv"] == 1.0 and r["p_conv"] == 1.0
        assert r["du"] < 1e-6
    table = out.read_text().splitlines()
    assert len(table) == 6 and table[2].startswith("| B | T | box |")
    assert all(line.count("|") == table[2].count("|") for line in table[2:])
    assert "B=1  T=5  box=yes" in capsys.readouterr().out  # one progress line per configuration
