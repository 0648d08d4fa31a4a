"""Assertions shared by the parity tests: arrays, log10 norms and scalars against an
oracle, each with a message naming what was compared."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np

RTOL = 1e-10  # the project's parity tolerance in float64
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def assert_close(actual, expected, rtol=RTOL, what=""):
    """Normwise within rtol, and elementwise within rtol * max|expected|."""
    assert actual is not None, f"{what}: None"
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    ne = np.linalg.norm(e)
    assert np.linalg.norm(a - e) <= rtol * ne, (
        f"{what}: |a - e| = {np.linalg.norm(a - e):.3e}, |e| = {ne:.3e}"
    )
    np.testing.assert_allclose(
        a, e, rtol=rtol, atol=rtol * np.max(np.abs(e), initial=0), err_msg=what
    )


def assert_arrays(actual, expected, rtol=RTOL, what=""):
    """assert_close for each array of two equally long sequences."""
    assert actual is not None, f"{what}: None"
    assert len(actual) == len(expected), f"{what}: {len(actual)} arrays != {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e, rtol, f"{what}[{i}]")


def assert_log10(actual, expected_norms, rtol=RTOL, what=""):
    """log10 norms against the log10 of oracle norms: |d log10| <= rtol / ln 10 (+ the
    rounding of the log10 itself); an exactly zero oracle norm must give -inf."""
    with np.errstate(divide="ignore"):
        exp = np.log10(np.asarray(expected_norms, dtype=np.float64))
    act = np.asarray(actual, dtype=np.float64)
    assert act.shape == exp.shape, f"{what}: shape {act.shape} != {exp.shape}"
    assert np.array_equal(np.isneginf(act), np.isneginf(exp)), (
        f"{what}: exact zeros differ: got -inf at {np.argwhere(np.isneginf(act)).tolist()}, "
        f"expected at {np.argwhere(np.isneginf(exp)).tolist()}"
    )
    atol = rtol / math.log(10) + 4e-16 * np.max(np.abs(exp[np.isfinite(exp)]), initial=1.0)
    np.testing.assert_allclose(act, exp, rtol=0, atol=atol, err_msg=what)


def assert_scalar(actual, expected, rtol=RTOL, what=""):
    if math.isnan(expected):
        assert math.isnan(actual), f"{what}: {actual} should be nan"
    else:
        assert abs(actual - expected) <= rtol * abs(expected), f"{what}: {actual!r} vs {expected!r}"


def ticks_while(work):
    """How often the main thread ticks (every 2 ms) while `work()` runs in another thread:
    with the GIL held for the whole call it cannot tick in between."""
    ticks = 0
    done = threading.Event()
    failure = []

    def run():
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - re-raised below, in the test's thread
            failure.append(exc)
        finally:
            done.set()

    t = threading.Thread(target=run)
    t.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0.002)
    t.join()
    if failure:
        raise failure[0]
    return ticks


def run_python(code: str, env: dict | None = None, timeout: float = 120) -> str:
    """Runs `code` (dedented) in a fresh interpreter with `env` added; returns its stdout.

    The interpreter gets a process group of its own: on a timeout the whole group is
    killed, so that processes it started (a pool's workers stuck in a hang under test)
    do not outlive the test."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, f"the child exited with {proc.returncode}:\n{err[-3000:]}"
    return out


def assert_same_output(printed: str, shown: str, where: str) -> None:
    """`printed` against the text `shown` for it (a README block, a notebook's stored
    output): the words must match exactly; each number to within one unit of the last
    digit shown (so that a rounding flip or a last-bit BLAS difference does not fail)."""
    words = [NUMBER.sub("#", t).strip("[](),") for t in shown.split()]
    assert [NUMBER.sub("#", t).strip("[](),") for t in printed.split()] == words, (
        f"{where}: printed\n{printed}\nshown\n{shown}"
    )
    got, want = NUMBER.findall(printed), NUMBER.findall(shown)
    assert len(got) == len(want), f"{where}: printed\n{printed}\nshown\n{shown}"
    for g, w in zip(got, want):
        mantissa, _, exp = w.lower().partition("e")
        decimals = len(mantissa.partition(".")[2])
        tol = 10.0 ** (int(exp or 0) - decimals) * 1.01
        assert abs(float(g) - float(w)) <= tol, f"{where}: printed {g}, shown {w}"
