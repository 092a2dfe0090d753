"""The README's quick start runs as written."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python block"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("True")  # every sample converged
    assert torch.isfinite(namespace["pend"].log_m.grad).all()
    assert namespace["pend"].log_m.grad.abs().sum() > 0
