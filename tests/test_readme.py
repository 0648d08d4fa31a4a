"""The README's Python examples run as written (those that need PyTorch are left out), and
where a ```text block follows one, the example prints what it shows."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

from checks import assert_same_output
from conftest import core_has

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"```(\w*)\n(.*?)```", flags=re.DOTALL)


def fenced_blocks(text: str) -> list[tuple[str, str, bool]]:
    """(language, body, follows_directly) for every fenced block; follows_directly when
    only whitespace separates it from the block before."""
    out, end = [], None
    for m in FENCE.finditer(text):
        direct = end is not None and not text[end : m.start()].strip()
        out.append((m.group(1), m.group(2), direct))
        end = m.end()
    return out


_NEEDS = {
    "layer_norm": ("LayerNorm(", 'norm="layer"'),
    "rms_norm": ("RMSNorm(", 'norm="rms"'),
    "batch_norm": ("BatchNorm(", 'norm="batch"'),
}


def _needs_missing_block(block: str) -> bool:
    """An example that builds a block kind this build's core does not have."""
    return any(
        any(t in block for t in texts) and not core_has(kind) for kind, texts in _NEEDS.items()
    )


def test_readme_python_examples_run():
    blocks = fenced_blocks(README.read_text())
    runnable = [b for lang, b, _ in blocks if lang == "python" and "model" not in b]
    assert len(runnable) >= 3  # the excluded one needs a torch model
    namespace: dict = {}
    clipped = compared = 0
    printed = None
    for i, (lang, block, direct) in enumerate(blocks):
        if lang == "text" and direct and printed is not None:
            assert_same_output(printed, block, f"README block {i}")
            compared += 1
        printed = None
        if lang != "python" or "model" in block:
            continue
        if _needs_missing_block(block):
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
        printed = out.getvalue()
        if "net.backward(x, max_norm=1.0" in block:  # the block that clips a chain's gradients
            rep = namespace["rep"]
            assert rep.max_norm == 1.0 and rep.clipped_total_norm <= 1.0 + 1e-12
            clipped += 1
    assert clipped == 1
    # the Jacobian norms, the QR spectrum and gc.theory show their output
    assert compared >= 3
