"""Run-time behaviour: Ctrl-C, the GIL, thread-count independence, the command line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from checks import run_python, ticks_while


def test_ctrl_c_stops_a_long_backward_promptly():
    code = """
        import os, signal, threading, time
        import numpy as np, gradchain as gc
        net = gc.MLP(depth=4000, width=128, activation="tanh", seed=0)
        x = np.ones((64, 128))
        net.backward(x[:1])
        t0 = time.perf_counter(); net.backward(x); one = time.perf_counter() - t0
        threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        t0 = time.perf_counter()
        try:
            for _ in range(10_000):
                net.backward(x)
            print("not interrupted")
        except KeyboardInterrupt:
            print("interrupted", time.perf_counter() - t0, one)
        print("after", np.isfinite(net.backward(x[:2]).log10_total_norm))
    """
    out = run_python(code).split()
    assert out[0] == "interrupted", out
    elapsed, one_pass = float(out[1]), float(out[2])
    # Stopped within the pass that was running when the signal came (plus slack).
    assert elapsed < 0.3 + one_pass + 1.0
    assert out[-2:] == ["after", "True"]


def test_ctrl_c_stops_drawing_a_deep_chain():
    code = """
        import os, signal, threading, time
        import gradchain as gc
        t0 = time.perf_counter(); gc.MLP(depth=2000, width=128, seed=0)
        per_layer = (time.perf_counter() - t0) / 2000
        threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        t0 = time.perf_counter()
        try:
            gc.MLP(depth=60_000, width=128, seed=0)
            print("not interrupted")
        except KeyboardInterrupt:
            print("interrupted", time.perf_counter() - t0, 60_000 * per_layer)
    """
    out = run_python(code).split()
    assert out[0] == "interrupted", out
    elapsed, full = float(out[1]), float(out[2])
    assert elapsed < min(1.5, 0.5 * full), (elapsed, full)


def test_backward_releases_the_gil(gc):
    net = gc.MLP(depth=3000, width=64, activation="tanh", seed=0)
    x = np.ones((32, 64))

    def work():
        for _ in range(3):
            net.backward(x)

    # With the GIL held for the whole pass the main thread could not tick in between.
    n = ticks_while(work)
    assert n >= 10, n


def test_jacobian_tools_release_the_gil(gc):
    net = gc.MLP(depth=400, width=128, activation="tanh", seed=0)
    rnn = gc.RNN("lstm", 4, 64, seed=0)
    xs = np.ones((300, 2, 4))

    def work():
        gc.jacobian_spectrum(net, np.ones(128))
        gc.jacobian_spectrum(rnn, xs)
        gc.jacobian_norms(rnn, xs)

    n = ticks_while(work)
    assert n >= 10, n


def test_results_do_not_depend_on_the_thread_count():
    code = """
        import numpy as np, gradchain as gc
        for width, batch in ((48, 16), (600, 128)):
            net = gc.MLP(depth=30, width=width, activation="tanh", init="orthogonal", seed=3)
            rep = net.backward(np.random.default_rng(0).standard_normal((batch, width)))
            w = np.concatenate([a.ravel() for a in net.weights])
            print(repr(float(w.sum())), repr(float(np.abs(w).max())), repr(rep.log10_total_norm),
                  repr(float(rep.log10_weight_grad_norms.sum())))
    """
    one = run_python(code, env={"OMP_NUM_THREADS": "1"})
    two = run_python(code, env={"OMP_NUM_THREADS": "2"})
    lines1, lines2 = one.splitlines(), two.splitlines()
    # Weights are drawn per layer from a counter-based generator: bit-identical.
    for a, b in zip(lines1, lines2):
        assert a.split()[:2] == b.split()[:2]
        # The norms may differ in the last bits only (BLAS summation order with threads).
        np.testing.assert_allclose(
            [float(v) for v in a.split()[2:]], [float(v) for v in b.split()[2:]], rtol=1e-12
        )


def test_cli_demo_prints_a_table():
    out = subprocess.run(
        [sys.executable, "-m", "gradchain", "demo", "--depth", "30", "--rows", "5"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    assert "sigmoid / xavier_normal" in out and "relu / he_normal" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    layers = [int(r[0]) for r in rows]
    assert layers[0] == 1 and layers[-1] == 30
    sigmoid = [float(r[1]) for r in rows]
    # The sigmoid chain's gradient vanishes towards the input.
    assert sigmoid[0] < sigmoid[-1] - 10


def test_cli_run_json_and_errors():
    out = subprocess.run(
        [sys.executable, "-m", "gradchain", "run", "--depth", "7", "--width", "5", "--json"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    d = json.loads(out)
    assert len(d["log10_weight_grad_norms"]) == 7
    bad = subprocess.run(
        [sys.executable, "-m", "gradchain", "run", "--depth", "0"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert bad.returncode == 2 and "depth must be a positive integer" in bad.stderr


def test_cli_theory_table_json_and_errors():
    out = subprocess.run(
        [sys.executable, "-m", "gradchain", "theory", "--depth", "12", "--width", "64",
         "--activation", "relu", "--sigma-w", "1.3", "--json"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    d = json.loads(out)
    assert d["sigma_w"] == 1.3 and len(d["measured"]) == 13
    # relu: chi_1 = sigma_w^2 / 2 exactly
    assert abs(d["chi_1"] - 1.3**2 / 2) < 1e-12
    text = subprocess.run(
        [sys.executable, "-m", "gradchain", "theory", "--depth", "12", "--width", "64", "--no-spectrum"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    assert "predicted" in text and "chi_1" in text
    bad = subprocess.run(
        [sys.executable, "-m", "gradchain", "theory", "--sigma-w", "-1"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert bad.returncode == 2 and "sigma_w" in bad.stderr


def test_cli_demo_with_every_relu_gradient_zero(capsys):
    """A width-4 relu chain whose gradients all vanish exactly: no RuntimeWarning (errors
    here) and no "10^+nan"; the ratio says both norms are 0."""
    from gradchain.cli import main

    assert main(["demo", "--depth", "100", "--width", "4", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out
    assert "relu / he_normal: |dL/dW_1| / |dL/dW_100| = undefined: both are exactly 0" in out


@pytest.mark.parametrize(
    "argv, words",
    [
        (["demo", "--rows", "0"], "argument --rows: rows must be a positive integer; got '0'"),
        (["demo", "--batch", "-2"], "batch must be a positive integer; got '-2'"),
        (["demo", "--depth", "x"], "depth must be a positive integer; got 'x'"),
        (["demo", "--seed", "-1"], "seed must be a non-negative integer below 2**64"),
        (["demo", "--nonesuch"], "unrecognized arguments: --nonesuch"),
        (["bogus"], "invalid choice: 'bogus'"),
        (["run", "--activation", "swish"], "argument --activation: invalid choice: 'swish'"),
        (["run", "--dtype", "float32", "--gain", "1e40"], "gain must be at most"),
        (["run", "--max-norm", "-1"], "max_norm must be a non-negative number"),
        (["run", "--depth", "2000", "--width", "1000000"], "bytes"),
        (["run", "--depth", "3", "--width", "4", "--activation", "linear", "--gain", "1e300",
          "--bias-std", "1"], "the forward pass"),
        (["theory", "--depth", "3", "--width", "4", "--sigma-w", "1e300"],
         "sigma_w must be between 0 and 1e+150"),
        (["theory", "--depth", "3", "--width", "4", "--sigma-w", "nan"], "sigma_w must be finite"),
    ],
)  # fmt: skip
def test_cli_bad_input_is_one_line_and_status_2(argv, words, capsys):
    """Bad options and what the library refuses for them (ValueError, MemoryError,
    NonFiniteError): "gradchain: error: ..." on one line of stderr, exit status 2, no
    traceback."""
    from gradchain.cli import main

    try:
        status = main(argv)
    except SystemExit as exc:  # argparse exits itself
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("gradchain: error: ") and err.count("\n") == 1, err
    assert words in err, err


def test_cpp_is_formatted():
    """Every C++ file as clang-format (the version the test extra pins) writes it."""
    exe = shutil.which("clang-format", path=os.path.dirname(sys.executable)) or shutil.which(
        "clang-format"
    )
    if exe is None:
        pytest.skip("clang-format is not installed (pip install clang-format)")
    root = Path(__file__).resolve().parents[1] / "cpp"
    if not root.is_dir():
        pytest.skip("no source tree next to the tests")
    files = sorted(str(p) for p in root.rglob("*") if p.suffix in (".cpp", ".hpp"))
    assert files
    out = subprocess.run(
        [exe, "--dry-run", "--Werror", *files], capture_output=True, text=True, timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[:3000]
