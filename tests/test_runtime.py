"""Run-time behaviour: Ctrl-C, the GIL, thread-count independence, formatting."""

from __future__ import annotations

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
        t0 = time.perf_counter(); gc.MLP(depth=2000, width=128, dtype="float32", seed=0)
        per_layer = (time.perf_counter() - t0) / 2000
        threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        t0 = time.perf_counter()
        try:
            # 2 GB of weights, of which the first 0.3 s write a few hundred MB
            gc.MLP(depth=30_000, width=128, dtype="float32", seed=0)
            print("not interrupted")
        except KeyboardInterrupt:
            print("interrupted", time.perf_counter() - t0, 30_000 * per_layer)
    """
    out = run_python(code).split()
    assert out[0] == "interrupted", out
    elapsed, full = float(out[1]), float(out[2])
    # Well before the end: most of what is left after the signal is allocating the
    # chain's weights (zeroed, before anything is drawn), which the vector generator now
    # outlasts by less.
    assert elapsed < min(1.5, 0.75 * full), (elapsed, full)


# Long calls, each sized to run for at least 3 s uninterrupted on two busy cores (measured
# by interrupting them after 3 s instead; the recurrent Jacobians of a batch of two used to
# ignore Ctrl-C for 97 s). A SIGINT 0.3 s in must stop each within 1.5 s. The deep MLP and
# recurrent backward passes and the drawing of a deep chain have tests of their own.
LONG_CALLS = {
    # one 4096-wide layer: its QR goes a panel of columns at a time
    "mlp_init_orthogonal": 'gc.MLP(depth=1, width=4096, init="orthogonal", seed=0)',
    "rnn_init_orthogonal": 'gc.RNN("lstm", 1, 2048, init="orthogonal", seed=0)',
    # 24 eigenvalue problems of 600 x 600, each one LAPACK call (about 0.3 s)
    "rnn_spectral_radius": 'gc.RNN("lstm", 1, 600, 6, spectral_radius=1.0, seed=0)',
    "rnn_forward": 'gc.RNN("lstm", 4, 512, seed=0).forward(np.ones((8000, 1, 4)))',
    "mlp_jacobian_norms": "gc.jacobian_norms(wide, np.ones((2, 1024)))",
    # the full spectrum of a 2048-wide chain: seconds per layer, polled within each
    "mlp_jacobian_spectrum": "gc.jacobian_spectrum(wider, np.ones(2048))",
    "rnn_jacobian_norms": "gc.jacobian_norms(lstm, sequences)",
    "rnn_jacobian_spectrum": "gc.jacobian_spectrum(lstm, sequences)",
    # a norm of order 3 over 6.7e9 numbers (one 64 MB array, listed 400 times)
    "clip_total_norm": "gc.get_total_norm([big] * 400, norm_type=3.0)",
}


@pytest.fixture(scope="module")
def interrupted_calls():
    """Runs every long call in one interpreter with a SIGINT 0.3 s after its start; then
    a short call of each kind, which must work as before."""
    # Lambdas, not eval(): CPython exits with SIGINT when a KeyboardInterrupt has passed
    # through eval(), even a caught one.
    calls = ", ".join(f"{name!r}: lambda: {call}" for name, call in LONG_CALLS.items())
    code = f"""
        import os, signal, threading, time
        import numpy as np, gradchain as gc
        wide = gc.MLP(depth=20, width=1024, init="xavier_uniform", seed=0)
        wider = gc.MLP(depth=4, width=2048, init="xavier_uniform", seed=0)
        lstm = gc.RNN("lstm", 4, 256, seed=0)
        sequences = np.ones((2000, 2, 4))
        big = np.ones(2**24, np.float32)
        calls = {{{calls}}}
        for name, call in calls.items():
            timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
            t0 = time.perf_counter()
            timer.start()
            try:
                call()
                timer.cancel()
                print(name, "finished", time.perf_counter() - t0)
                time.sleep(0.5)
            except KeyboardInterrupt:
                print(name, "interrupted", time.perf_counter() - t0 - 0.3)
        small = np.ones((30, 2, 4))
        ok = [np.isfinite(wide.backward(np.ones((2, 1024))).log10_total_norm),
              np.isfinite(lstm.backward(small).log10_total_norm),
              np.isfinite(gc.jacobian_norms(lstm, small[:3], spectral=False).log10_frobenius).all(),
              np.isfinite(gc.jacobian_spectrum(wide, np.ones(1024), k=4).log_singular_values).all()]
        print("after", all(ok))
    """
    out = run_python(code, timeout=300)
    return {line.split()[0]: line.split()[1:] for line in out.splitlines()}


@pytest.mark.parametrize("name", sorted(LONG_CALLS))
def test_ctrl_c_stops_long_calls(interrupted_calls, name):
    status, seconds = interrupted_calls[name]
    assert status == "interrupted", (name, status, seconds)
    assert float(seconds) < 1.5, f"{name} stopped {float(seconds):.2f} s after the signal"


def test_calls_work_after_an_interrupt(interrupted_calls):
    assert interrupted_calls["after"] == ["True"]


# Process pools: the parent runs every kind of call first, so that its OpenMP and OpenBLAS
# threads exist when the workers start (a forked worker used to wait forever for OpenMP's).
_POOL_CODE = """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    import numpy as np, gradchain as gc
    net = gc.MLP(depth=40, width=64, seed=0)
    rnn = gc.RNN("lstm", 3, 16, seed=0)
    x, xs = np.ones((16, 64)), np.ones((40, 4, 3))
    parent = [net.backward(x).log10_weight_grad_norms, rnn.backward(xs).log10_layer_state_grad_norms,
              gc.jacobian_norms(rnn, xs).log10_frobenius]
    threaded = gc._core.max_threads() > 1
    with ProcessPoolExecutor(2, mp_context=mp.get_context(METHOD)) as pool:
        jobs = [pool.submit(gc.MLP.backward, net, x), pool.submit(gc.RNN.backward, rnn, xs),
                pool.submit(gc.jacobian_norms, rnn, xs), pool.submit(gc._core.max_threads),
                pool.submit(gc._core.forked_single_threaded)]
        a, b, c, threads, single = (job.result(timeout=60) for job in jobs)
    child = [a.log10_weight_grad_norms, b.log10_layer_state_grad_norms, c.log10_frobenius]
    same = all(np.allclose(p, q, rtol=1e-12, atol=0) for p, q in zip(parent, child))
    print(same, threaded, threads, single)
"""


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_process_pool_workers_run_every_call(method):
    out = run_python(_POOL_CODE.replace("METHOD", repr(method)), timeout=90).split()
    same, threaded, threads, single = out
    assert same == "True"
    # A forked worker runs single-threaded once its parent has used threads; spawned and
    # forkserver workers start afresh.
    assert single == str(method == "fork" and threaded == "True")
    if single == "True":
        assert threads == "1"


@pytest.mark.parametrize(
    "call", ["net.backward(x)", "rnn.backward(xs)", "gc.jacobian_norms(net, x[:1])"]
)
def test_fork_after_one_kind_of_call(call):
    """Each of the core's parallel regions leaves a thread pool behind: after any one of
    them alone, a forked child must run (single-threaded) instead of waiting for it."""
    code = f"""
        import os, threading
        import numpy as np, gradchain as gc
        made = {{}}
        def build():  # on another thread, whose thread pool the main thread's fork leaves behind
            made["net"] = gc.MLP(depth=40, width=64, seed=0)
            made["rnn"] = gc.RNN("lstm", 3, 16, seed=0)
        builder = threading.Thread(target=build)
        builder.start()
        builder.join()
        net, rnn = made["net"], made["rnn"]
        x, xs = np.ones((16, 64)), np.ones((40, 4, 3))
        {call}
        pid = os.fork()
        if pid == 0:
            {call}
            os._exit(0 if gc._core.max_threads() == 1 or not gc._core.forked_single_threaded() else 3)
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    """
    assert run_python(code, timeout=60).split() == ["0"]


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
    """Chains give bit-identical results on one thread and on two: the batch is split by its
    size alone, and an unsplit batch's large products split their columns in fixed halves
    instead of using OpenBLAS's threads."""
    code = """
        import hashlib
        import numpy as np, gradchain as gc
        def digest(*arrays):
            h = hashlib.sha256()
            for a in arrays:
                h.update(np.ascontiguousarray(a).tobytes())
            return h.hexdigest()
        rng = np.random.default_rng(0)
        for depth, width, batch, act, dt in ((30, 48, 16, "tanh", "float64"),
                                             (30, 600, 128, "tanh", "float64"),
                                             (4, 1200, 1, "tanh", "float64"),
                                             (20, 200, 32, "tanh", "float64"),
                                             (30, 600, 2, "relu", "float32"),
                                             (200, 32, 8, "gelu", "float32")):
            net = gc.MLP(depth=depth, width=width, activation=act, init="orthogonal", dtype=dt,
                         seed=3)
            x = rng.standard_normal((batch, width)).astype(dt)
            rep = net.backward(x, return_grads=True)
            w = np.concatenate([a.ravel() for a in net.weights])
            print(digest(w), digest(rep.output, rep.log10_weight_grad_norms,
                                    rep.log10_activation_grad_norms, *rep.weight_grads))
        for bn in (False, True):
            norm = gc.BatchNorm(64) if bn else gc.LayerNorm(64)
            blocks = [gc.Residual([norm, gc.Linear(64, 256), gc.Activation("relu"),
                                   gc.Linear(256, 64)], scale=0.1) for _ in range(6)]
            ch = gc.Chain(blocks, seed=0, dtype="float32")
            r = ch.backward(rng.standard_normal((24, 64)).astype("float32"), return_grads=True)
            print(digest(r.output), digest(r.log10_activation_grad_norms,
                                           *r.param_grads.values()))
        # Slots of 300 KB: the pipelined pass's ring of dL/dy slots wraps around, and the
        # residual joins hand some of them over through a copy.
        blocks = [gc.Residual([gc.Linear(400, 400), gc.Activation("tanh"), gc.Linear(400, 400)],
                              scale=0.5) for _ in range(10)]
        ch = gc.Chain(blocks, seed=1, bias_std=0.1)
        r = ch.backward(rng.standard_normal((96, 400)), return_grads=True)
        print(digest(r.output), digest(r.log10_activation_grad_norms, *r.param_grads.values()))
    """
    one = run_python(code, env={"OMP_NUM_THREADS": "1"})
    two = run_python(code, env={"OMP_NUM_THREADS": "2"})
    assert one.splitlines() == two.splitlines()
    assert len(one.splitlines()) == 9


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
        [exe, "--dry-run", "--Werror", *files],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[:3000]


# ---- the small-product kernels -------------------------------------------------------------


@pytest.fixture
def kernel_isas(gc):
    """Every kernel variant this CPU runs (the widest first, 'blas' last); the variant in
    use is restored afterwards."""
    from gradchain import _core

    order = ["avx512", "avx2", "blas"]
    widest = _core.kernel_isa()
    yield order[order.index(widest) :]
    _core.set_kernel_isa(widest)


def _product_shapes(rng, n):
    """Random small shapes: odd sizes, batch 1, widths off the vector lengths."""
    fixed = [
        (1, 64, 64),
        (1, 1, 1),
        (31, 17, 33),
        (16, 64, 64),
        (7, 5, 129),
        (33, 31, 1),
        # float64 products above 2^19 multiply-adds: B^T transposed, then the A B form
        (32, 150, 150),
        (7, 301, 300),
        (33, 129, 131),
        (1, 1030, 1000),
    ]
    return fixed + [tuple(int(v) for v in rng.integers(1, 80, 3)) for _ in range(n)]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_kernels_match_blas_at_float_rounding(gc, kernel_isas, dtype):
    from gradchain import _core

    rng = np.random.default_rng(7)
    eps = np.finfo(dtype).eps
    for m, n, k in _product_shapes(rng, 40):
        for ta, tb in ((False, False), (True, False), (False, True)):
            a = rng.standard_normal((k, m) if ta else (m, k)).astype(dtype)
            b = rng.standard_normal((n, k) if tb else (k, n)).astype(dtype)
            a_, b_ = (a.T if ta else a).astype(np.float64), (b.T if tb else b).astype(np.float64)
            exact = 0.75 * (a_ @ b_)
            bound = (k + 2) * eps * 0.75 * (np.abs(a_) @ np.abs(b_))
            for isa in kernel_isas:
                _core.set_kernel_isa(isa)
                got = _core.gemm(a, b, ta, tb, 0.75)
                assert got.dtype == dtype and got.shape == (m, n)
                assert np.all(np.abs(got - exact) <= bound), (isa, m, n, k, ta, tb)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_transposed_products_sum_in_order(gc, kernel_isas, dtype):
    """A B^T runs as an A B product (but for float64 products of fewer than 8 rows or 2^15
    multiply-adds),
    either as C^T = B A^T between transposes of A and C (a batch narrower than the layer)
    or on a transposed B: either way each entry sums over k in order, bit for bit the A B
    product of B^T."""
    from gradchain import _core

    rng = np.random.default_rng(11)
    shapes = [(32, 150, 150), (16, 301, 300), (7, 301, 300), (40, 200, 90), (9, 260, 270),
              (16, 64, 64), (8, 64, 64), (9, 70, 60), (64, 64, 64), (12, 50, 70)]  # fmt: skip
    if dtype == "float32":
        shapes += [(3, 64, 64), (1, 17, 9), (8, 33, 40), (17, 100, 3)]
    for m, n, k in shapes:
        a = rng.standard_normal((m, k)).astype(dtype)
        b = rng.standard_normal((n, k)).astype(dtype)
        for isa in [i for i in kernel_isas if i != "blas"]:
            _core.set_kernel_isa(isa)
            got = _core.gemm(a, b, False, True, 0.75)
            ref = _core.gemm(a, np.ascontiguousarray(b.T), False, False, 0.75)
            assert np.array_equal(got, ref), (isa, m, n, k)


def test_kernel_variants_give_the_same_chain_results_within_rounding(gc, kernel_isas):
    """A whole pass on each variant: the same norms to ~1e-12 against BLAS (whose sums run
    in another order), and bit for bit between the AVX-512 and AVX2 kernels (every product
    sums in the same order at any vector width)."""
    from gradchain import _core

    rng = np.random.default_rng(3)
    for depth, width, batch, dt in ((40, 37, 5, "float64"), (20, 64, 1, "float64"),
                                    (30, 16, 9, "float32"), (6, 160, 40, "float64"),
                                    (8, 70, 33, "float32")):  # fmt: skip
        net = gc.MLP(depth=depth, width=width, activation="tanh", bias_std=0.1, dtype=dt, seed=1)
        x = rng.standard_normal((batch, width)).astype(dt)
        reps = {}
        for isa in kernel_isas:
            _core.set_kernel_isa(isa)
            reps[isa] = net.backward(x)
        tol = 1e-12 if dt == "float64" else 1e-4
        for isa, r in reps.items():
            for f in ("log10_weight_grad_norms", "log10_activation_grad_norms"):
                np.testing.assert_allclose(getattr(r, f), getattr(reps["blas"], f), rtol=tol,
                                           atol=tol, err_msg=f"{isa}: {f}")  # fmt: skip
        if "avx512" in reps:
            for f in ("output", "log10_weight_grad_norms", "log10_activation_grad_norms"):
                assert np.array_equal(getattr(reps["avx512"], f), getattr(reps["avx2"], f)), f


def test_set_kernel_isa_rejects_unknown_names(gc):
    from gradchain import _core

    with pytest.raises(ValueError, match="isa must be 'avx512', 'avx2' or 'blas'; got 'sse9'"):
        _core.set_kernel_isa("sse9")
