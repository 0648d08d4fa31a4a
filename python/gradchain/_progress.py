"""Progress bars (tqdm, an optional dependency) for sweeps and long runs."""

from __future__ import annotations

from typing import Any


def progress_bar(total: int, desc: str, unit: str) -> Any:
    """A tqdm bar of `total` units; ImportError naming the extra when tqdm is missing."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError(
            "progress=True needs tqdm: pip install 'gradchain[progress]' (or tqdm)"
        ) from None
    return tqdm(total=total, desc=desc, unit=unit)
