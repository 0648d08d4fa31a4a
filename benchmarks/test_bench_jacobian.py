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
# The recurrent case: a tanh RNN driven by standard normal inputs (seed 2), the spectrum of
# dh_t / dh_0; its peers get J_t = diag(1 - h_t**2) W_hh. No target.
STEPS, HIDDEN, RNN_INPUT = 500, 128, 16
RNN_GROUP = f"qr-rnn-tanh-T{STEPS}-h{HIDDEN}-k{HIDDEN}-f64"


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
    group: str
    targets: dict  # peer -> speedup target (absent: none)


_case: dict[str, Case] = {}


def jacobians_of(net, x):
    """J_l = diag(tanh'(z_l)) W_l along the forward pass of one input, in NumPy."""
    h, out = x, []
    for W, b in zip(net.weights, net.biases):
        z = W @ h + b
        h = np.tanh(z)
        out.append((1.0 - h * h)[:, None] * W)
    return out


def recurrent_jacobians_of(net, x):
    """J_t = diag(1 - h_t**2) W_hh along one sequence of a tanh RNN, in NumPy."""
    out, _, _ = net.forward(x)
    W = np.asarray(net.state_dict()["weight_hh_l0"], dtype=np.float64)
    return [(1.0 - h * h)[:, None] * W for h in out[:, 0, :]]


def get_case(name: str = "mlp") -> Case:
    if name not in _case:
        gc = pytest.importorskip("gradchain")
        from gradchain.jacobian import jacobian_spectrum

        if name == "mlp":
            net = gc.MLP(depth=DEPTH, width=WIDTH, activation="tanh", init="xavier_normal", seed=0)
            x = np.random.default_rng(1).standard_normal(WIDTH)
            jac, group, targets = jacobians_of(net, x), GROUP, TARGETS
        else:
            net = gc.RNN("tanh", input_size=RNN_INPUT, hidden_size=HIDDEN, init="orthogonal", seed=0)
            x = np.random.default_rng(2).standard_normal((STEPS, 1, RNN_INPUT))
            jac, group, targets = recurrent_jacobians_of(net, x), RNN_GROUP, {}
        ref = jacobian_spectrum(net, x).log_singular_values[0]
        assert ref.shape == (len(jac), jac[0].shape[0]) and np.isfinite(ref).all()
        _case[name] = Case(net, x, jac, ref, group, targets)
    return _case[name]


def check(got, case: Case, who: str) -> None:
    """The cumulative log|R_ii| at every layer (step), against gradchain's first run."""
    got = np.asarray(got)
    assert got.shape == case.ref.shape, f"{who}: shape {got.shape}"
    np.testing.assert_allclose(got, case.ref, rtol=1e-9, atol=1e-9, err_msg=f"{who} vs gradchain")


def tag(benchmark, impl: str, group: str = GROUP, **extra) -> None:
    benchmark.group = group
    benchmark.extra_info.update(impl=impl, config=group, **extra)


def peer_tag(benchmark, case: Case, impl: str, **extra) -> None:
    if impl in case.targets:
        extra["target_speedup"] = case.targets[impl]
    tag(benchmark, impl, group=case.group, **extra)


CHAINS = ("mlp", "rnn")


# --------------------------------------------------------------------------- headline


@pytest.mark.parametrize("chain", CHAINS)
def test_gradchain(benchmark, chain):
    case = get_case(chain)
    from gradchain.jacobian import jacobian_spectrum

    tag(benchmark, "gradchain", group=case.group)
    s = benchmark(jacobian_spectrum, case.net, case.x)
    check(s.log_singular_values[0], case, "gradchain (timed run)")


@pytest.mark.parametrize("chain", CHAINS)
def test_numpy(benchmark, chain):
    case = get_case(chain)
    peer = NumpyQRLoop(case.jacobians)
    check(peer(), case, "numpy")  # validation (and warm-up), not timed
    peer_tag(benchmark, case, "numpy")
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


@pytest.mark.parametrize("chain", CHAINS)
def test_torch(benchmark, torch_peer, chain):
    case = get_case(chain)
    try:
        info = torch_peer.build("test_bench_jacobian", "TorchQRLoop", case.jacobians)
    except ImportError as exc:
        pytest.skip(str(exc))
    check(torch_peer.run(case.x), case, "torch")  # validation (and warm-up), not timed
    peer_tag(benchmark, case, "torch", torch_threads=info["threads"], torch_version=info["torch"])
    got = benchmark.pedantic(torch_peer.run, args=(case.x,), rounds=5, iterations=1,
                             warmup_rounds=0)
    check(got, case, "torch (timed run)")
