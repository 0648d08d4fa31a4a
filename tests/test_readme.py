"""The README's Python examples run as written (those that need PyTorch are left out)."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    runnable = [b for b in blocks if "model" not in b]  # that one needs a torch model
    assert len(runnable) >= 3
    namespace: dict = {}
    clipped = 0
    for block in runnable:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
        if "net.backward(x, max_norm=1.0" in block:  # the block that clips a chain's gradients
            rep = namespace["rep"]
            assert rep.max_norm == 1.0 and rep.clipped_total_norm <= 1.0 + 1e-12
            clipped += 1
    assert clipped == 1
