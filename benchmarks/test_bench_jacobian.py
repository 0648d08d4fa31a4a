"""gradchain.jacobian.jacobian_spectrum against QR loops in PyTorch and NumPy, and the cost
of the top-k spectrum as n^2 k.

The chain is ``gc.MLP(depth=500, width=128, activation="tanh", init="xavier_normal",
seed=0)`` with one standard normal input (seed 1). Every peer gets the 500 Jacobians
``J_l = diag(phi'(z_l)) W_l`` of that input as float64 matrices, built outside the timed
part, and runs the textbook loop::

    Q = I;  for each layer: Q, R = qr(J_l @ Q);  acc += log|diag R|

returning ``acc`` after every layer; gradchain computes the same from the net and the
input (``jacobian_spectrum(net, x)``: k = 128 directions, a QR at every layer). Results
are compared before and after timing.

gradchain is imported only inside the tests: the PyTorch peer (:class:`TorchQRLoop`)
lives in this module and runs in the worker process of ``peers.TorchProcess``, which
imports this file but must never load gradchain (see its docstring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

DEPTH, WIDTH = 500, 128
# Speedup targets: peer median / gradchain median.
TARGETS = {"torch": 3.0, "numpy": 3.0}
GROUP = f"qr-d{DEPTH}-w{WIDTH}-k{WIDTH}-f64"


# --------------------------------------------------------------------------- peers


class NumpyQRLoop:
    """``np.linalg.qr`` (LAPACK dgeqrf + dorgqr through NumPy's OpenBLAS) per layer."""

    def __init__(self, jacobians):
        self.J = [np.ascontiguousarray(j, dtype=np.float64) for j in jacobians]

    def __call__(self, _x=None):
        n = self.J[0].shape[1]
        Q = np.eye(n)
        acc = np.zeros(n)
        out = np.empty((len(self.J), n))
        for l, J in enumerate(self.J):
            Q, R = np.linalg.qr(J @ Q)
            acc += np.log(np.abs(np.diagonal(R)))
            out[l] = acc
        return out


class TorchQRLoop:
    """``torch.linalg.qr`` per layer on float64 tensors made once from the Jacobians."""

    def __init__(self, jacobians):
        import torch

        self.torch = torch
        self.J = [torch.tensor(np.asarray(j, dtype=np.float64)) for j in jacobians]

    def __call__(self, _x=None):
        torch = self.torch
        n = self.J[0].shape[1]
        Q = torch.eye(n, dtype=torch.float64)
        acc = torch.zeros(n, dtype=torch.float64)
        out = torch.empty((len(self.J), n), dtype=torch.float64)
        for l, J in enumerate(self.J):
            Q, R = torch.linalg.qr(J @ Q)
            acc += torch.log(torch.abs(torch.diagonal(R)))
            out[l] = acc
        return out.numpy()


# --------------------------------------------------------------------------- the chain


@dataclass
class Case:
    net: object
    x: np.ndarray
    jacobians: list
    ref: np.ndarray  # gradchain's (depth, k) spectrum, computed once


_case: dict[str, Case] = {}


def jacobians_of(net, x):
    """J_l = diag(tanh'(z_l)) W_l along the forward pass of one input, in NumPy."""
    h, out = x, []
    for W, b in zip(net.weights, net.biases):
        z = W @ h + b
        h = np.tanh(z)
        out.append((1.0 - h * h)[:, None] * W)
    return out


def get_case() -> Case:
    if "case" not in _case:
        gc = pytest.importorskip("gradchain")
        from gradchain.jacobian import jacobian_spectrum

        net = gc.MLP(depth=DEPTH, width=WIDTH, activation="tanh", init="xavier_normal", seed=0)
        x = np.random.default_rng(1).standard_normal(WIDTH)
        ref = jacobian_spectrum(net, x).log_singular_values[0]
        assert ref.shape == (DEPTH, WIDTH) and np.isfinite(ref).all()
        _case["case"] = Case(net, x, jacobians_of(net, x), ref)
    return _case["case"]


def check(got, case: Case, who: str) -> None:
    """The cumulative log|R_ii| at every layer, against gradchain's first run."""
    got = np.asarray(got)
    assert got.shape == (DEPTH, WIDTH), f"{who}: shape {got.shape}"
    np.testing.assert_allclose(got, case.ref, rtol=1e-9, atol=1e-9, err_msg=f"{who} vs gradchain")


def tag(benchmark, impl: str, group: str = GROUP, **extra) -> None:
    benchmark.group = group
    benchmark.extra_info.update(impl=impl, config=group, **extra)


# --------------------------------------------------------------------------- headline


def test_gradchain(benchmark):
    case = get_case()
    from gradchain.jacobian import jacobian_spectrum

    tag(benchmark, "gradchain")
    s = benchmark(jacobian_spectrum, case.net, case.x)
    check(s.log_singular_values[0], case, "gradchain (timed run)")


def test_numpy(benchmark):
    case = get_case()
    peer = NumpyQRLoop(case.jacobians)
    check(peer(), case, "numpy")  # validation (and warm-up), not timed
    tag(benchmark, "numpy", target_speedup=TARGETS["numpy"])
    got = benchmark.pedantic(peer, rounds=5, iterations=1, warmup_rounds=0)
    check(got, case, "numpy (timed run)")


# --------------------------------------------------------------------------- top-k cost
# Flops per layer and example: the reflectors of the last QR applied to the n rows of W_l
# (4 n^2 k), the QR of the n x k product (2 n k^2), and O(n^2) for the forward pass and
# copies. Two examples, one per core, so that nothing but the
# arithmetic is measured; the exponents of time ~ n^a k^b come from least squares on
# log-log medians of the sweeps (k at n = 256, n at k = 16).

SCALING_DEPTH = 100
K_SWEEP = (8, 16, 32, 64, 128)
N_SWEEP = (64, 128, 256, 512)
_times: dict[tuple[int, int], float] = {}


def _scaling(benchmark, n, k):
    gc = pytest.importorskip("gradchain")
    from gradchain.jacobian import jacobian_spectrum

    net = gc.MLP(depth=SCALING_DEPTH, width=n, activation="tanh", seed=0)
    x = np.random.default_rng(1).standard_normal((2, n))
    tag(benchmark, "gradchain", group=f"topk-d{SCALING_DEPTH}-n{n}-k{k}", n=n, k=k,
        flops_per_layer=2 * (4 * n * n * k + 2 * n * k * k))
    s = benchmark(jacobian_spectrum, net, x, k=k)
    assert s.log_singular_values.shape == (2, SCALING_DEPTH, k)
    assert np.isfinite(s.log_singular_values).all()
    _times[(n, k)] = benchmark.stats.stats.median if benchmark.stats else math.nan


@pytest.mark.parametrize("k", K_SWEEP)
def test_topk_k(benchmark, k):
    _scaling(benchmark, 256, k)


@pytest.mark.parametrize("n", N_SWEEP)
def test_topk_n(benchmark, n):
    _scaling(benchmark, n, 16)


def _slope(xs, ts):
    lx, lt = np.log(np.asarray(xs, float)), np.log(np.asarray(ts, float))
    return float(np.polyfit(lx, lt, 1)[0])


def test_topk_exponents(capsys):
    """Fitted exponents of the two sweeps and the time per n^2 k unit, printed; checked
    only loosely (a cost of n^3 or k^2 would fail), as timings are reported, not asserted."""
    ks = [k for k in K_SWEEP if math.isfinite(_times.get((256, k), math.nan))]
    ns = [n for n in N_SWEEP if math.isfinite(_times.get((n, 16), math.nan))]
    if len(ks) < 3 or len(ns) < 3:
        pytest.skip("the top-k sweeps did not run")
    tk = [_times[(256, k)] for k in ks]
    tn = [_times[(n, 16)] for n in ns]
    bk, an = _slope(ks, tk), _slope(ns, tn)
    bk_top, an_top = _slope(ks[-3:], tk[-3:]), _slope(ns[-3:], tn[-3:])
    units = 2 * SCALING_DEPTH  # examples x layers

    def per_unit(n, k, t):
        return f"{1e12 * t / (units * n * n * k):.0f}"

    head = f"top-k cost, depth {SCALING_DEPTH}, batch 2 (medians; ps: per n^2 k, layer, example):"
    lines = [
        head,
        "  k at n=256: " + ", ".join(f"k={k} {1e3 * t:.1f} ms ({per_unit(256, k, t)} ps)"
                                     for k, t in zip(ks, tk)),
        f"    time ~ k^{bk:.2f} (last three: k^{bk_top:.2f}); ratio per doubling {2**bk:.2f}",
        "  n at k=16:  " + ", ".join(f"n={n} {1e3 * t:.1f} ms ({per_unit(n, 16, t)} ps)"
                                     for n, t in zip(ns, tn)),
        f"    time ~ n^{an:.2f} (last three: n^{an_top:.2f}); ratio per doubling {2**an:.2f}",
    ]
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    # O(n^2) terms (forward pass, copies) flatten the k sweep at small k, and small widths
    # run from the L1/L2 caches, which flattens the n sweep.
    assert 0.5 <= bk_top <= 1.5, lines
    assert 1.3 <= an_top <= 2.7, lines


# --------------------------------------------------------------------------- PyTorch
# (in the worker process of conftest.torch_peer; conftest runs these after the others)


def test_torch(benchmark, torch_peer):
    case = get_case()
    try:
        info = torch_peer.build("test_bench_jacobian", "TorchQRLoop", case.jacobians)
    except ImportError as exc:
        pytest.skip(str(exc))
    check(torch_peer.run(case.x), case, "torch")  # validation (and warm-up), not timed
    tag(benchmark, "torch", target_speedup=TARGETS["torch"], torch_threads=info["threads"],
        torch_version=info["torch"])
    got = benchmark.pedantic(torch_peer.run, args=(case.x,), rounds=5, iterations=1,
                             warmup_rounds=0)
    check(got, case, "torch (timed run)")


# --------------------------------------------------------------------------- recurrent
# The same loop over the time steps of a tanh RNN, ``gc.RNN("tanh", input_size=16,
# hidden_size=128, init="orthogonal", seed=0)`` driven by 500 standard normal inputs
# (seed 2): J_t = diag(1 - h_t**2) W_hh, the spectrum of dh_t / dh_0.

STEPS, HIDDEN, RNN_INPUT = 500, 128, 16
RNN_GROUP = f"qr-rnn-tanh-T{STEPS}-h{HIDDEN}-k{HIDDEN}-f64"


def get_rnn_case() -> Case:
    if "rnn" not in _case:
        gc = pytest.importorskip("gradchain")
        from gradchain.jacobian import jacobian_spectrum

        net = gc.RNN("tanh", input_size=RNN_INPUT, hidden_size=HIDDEN, init="orthogonal", seed=0)
        x = np.random.default_rng(2).standard_normal((STEPS, 1, RNN_INPUT))
        ref = jacobian_spectrum(net, x).log_singular_values[0]
        assert ref.shape == (STEPS, HIDDEN) and np.isfinite(ref).all()
        out, _, _ = net.forward(x)
        W = np.asarray(net.state_dict()["weight_hh_l0"], dtype=np.float64)
        jac = [(1.0 - h * h)[:, None] * W for h in out[:, 0, :]]
        _case["rnn"] = Case(net, x, jac, ref)
    return _case["rnn"]


def check_rnn(got, case: Case, who: str) -> None:
    got = np.asarray(got)
    assert got.shape == (STEPS, HIDDEN), f"{who}: shape {got.shape}"
    np.testing.assert_allclose(got, case.ref, rtol=1e-9, atol=1e-9, err_msg=f"{who} vs gradchain")


def test_rnn_gradchain(benchmark):
    case = get_rnn_case()
    from gradchain.jacobian import jacobian_spectrum

    tag(benchmark, "gradchain", group=RNN_GROUP)
    s = benchmark(jacobian_spectrum, case.net, case.x)
    check_rnn(s.log_singular_values[0], case, "gradchain (timed run)")


def test_rnn_numpy(benchmark):
    case = get_rnn_case()
    peer = NumpyQRLoop(case.jacobians)
    check_rnn(peer(), case, "numpy")
    tag(benchmark, "numpy", group=RNN_GROUP)
    got = benchmark.pedantic(peer, rounds=5, iterations=1, warmup_rounds=0)
    check_rnn(got, case, "numpy (timed run)")


def test_rnn_torch(benchmark, torch_peer):
    case = get_rnn_case()
    try:
        info = torch_peer.build("test_bench_jacobian", "TorchQRLoop", case.jacobians)
    except ImportError as exc:
        pytest.skip(str(exc))
    check_rnn(torch_peer.run(case.x), case, "torch")
    tag(benchmark, "torch", group=RNN_GROUP, torch_threads=info["threads"], torch_version=info["torch"])
    got = benchmark.pedantic(torch_peer.run, args=(case.x,), rounds=5, iterations=1, warmup_rounds=0)
    check_rnn(got, case, "torch (timed run)")
