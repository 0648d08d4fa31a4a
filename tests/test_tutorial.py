"""docs/tutorial.ipynb runs top to bottom, and prints what its stored outputs show (the
narrative quotes those numbers).

With GRADCHAIN_TUTORIAL_IMAGES set to a directory (an absolute path), the run also writes
the tutorial's figures there: ``GRADCHAIN_TUTORIAL_IMAGES=$PWD/docs/images python -m
pytest tests/test_tutorial.py`` renews the README's."""

from __future__ import annotations

import os
import pathlib
import time

import pytest
from checks import assert_same_output

TUTORIAL = pathlib.Path(__file__).resolve().parents[1] / "docs" / "tutorial.ipynb"


def _stream_text(cell) -> str:
    return "".join(o["text"] for o in cell.get("outputs", []) if o["output_type"] == "stream")


def test_tutorial_runs_and_prints_what_it_shows(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    stored = nbformat.read(TUTORIAL, as_version=4)
    nb = nbformat.read(TUTORIAL, as_version=4)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    start = time.perf_counter()
    nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    elapsed = time.perf_counter() - start
    assert elapsed < 180, f"the tutorial took {elapsed:.0f} s; it must run in under 3 minutes"
    compared = 0
    for i, (got, want) in enumerate(zip(nb.cells, stored.cells)):
        if got.cell_type != "code":
            continue
        assert not [o for o in got.outputs if o["output_type"] == "error"]
        shown = _stream_text(want)
        if shown:
            assert_same_output(_stream_text(got), shown, f"tutorial cell {i}")
            compared += 1
    assert compared >= 6
    assert os.listdir(tmp_path) == []  # nothing lands where the notebook runs
