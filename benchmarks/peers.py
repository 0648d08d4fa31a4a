"""Peer implementations that gradchain's MLP benchmarks are measured against.

Each peer runs the same computation as ``gradchain.MLP.backward`` with the probe loss
``0.5 * ||h_L||^2``: a forward pass through ``h_l = phi(h_{l-1} W_l^T + b_l)`` that keeps
every activation, then a backward pass that forms ``dW_l``, ``db_l`` and ``dh_l`` and
their Euclidean / Frobenius norms.  Weights are ``(out, in)`` as in gradchain and
``torch.nn.Linear``.

Peers are built once from a chain's weights and biases (buffers and tensors are set up in
the constructor, outside the timed part) and then called with the input ``x``; a call
returns :class:`Norms`.

Run ``python benchmarks/peers.py`` to check that the NumPy and PyTorch peers agree with
each other (no gradchain needed).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

__all__ = [
    "Norms",
    "NumpyChain",
    "TorchChain",
    "TorchProcess",
    "available_cores",
    "random_chain",
    "set_torch_threads",
]


@dataclass
class Norms:
    """Per-layer gradient norms, laid out as gradchain's BackwardReport."""

    weight_grad_norms: np.ndarray  # (depth,)
    bias_grad_norms: np.ndarray  # (depth,)
    activation_grad_norms: np.ndarray  # (depth + 1,), index 0 = the input h_0


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_torch_threads(n: int | None = None) -> int:
    """Limit PyTorch's intra-op pool to the cores this process may use."""
    import torch

    n = available_cores() if n is None else n
    torch.set_num_threads(n)
    return n


def random_chain(depth, width, dtype=np.float64, seed=0, bias_std=0.1):
    """Xavier-normal weights and small random biases (for self-checks)."""
    rng = np.random.default_rng(seed)
    std = np.sqrt(2.0 / (width + width))
    weights = [(rng.standard_normal((width, width)) * std).astype(dtype) for _ in range(depth)]
    biases = [(rng.standard_normal(width) * bias_std).astype(dtype) for _ in range(depth)]
    return weights, biases


# --------------------------------------------------------------------------- NumPy


class NumpyChain:
    """A hand-written NumPy forward + backward loop.

    Written to be reasonably fast: weights are stored contiguous, every buffer is
    allocated once per batch size and reused, matrix products go to BLAS through ``@``
    with ``out=`` (transposes are views, passed to BLAS as flags), ``tanh`` and the
    derivative are computed in place, and norms are BLAS dot products of the flattened
    gradients (square roots taken once at the end).
    """

    def __init__(self, weights, biases, activation="tanh"):
        if activation not in ("tanh", "relu"):
            raise ValueError(f"NumpyChain supports tanh and relu, not {activation!r}")
        self.activation = activation
        self.W = [np.ascontiguousarray(w) for w in weights]
        self.b = [np.ascontiguousarray(b) for b in biases]
        self.dtype = self.W[0].dtype
        self.depth = len(self.W)
        self.widths = [self.W[0].shape[1]] + [w.shape[0] for w in self.W]
        self._batch = None

    def _allocate(self, batch):
        dt = self.dtype
        # h_0 is the caller's x; h_1..h_L are kept for the backward pass.
        self.h = [None] + [np.empty((batch, n), dt) for n in self.widths[1:]]
        # Scratch shared between layers of equal shape.
        self.dz = {n: np.empty((batch, n), dt) for n in set(self.widths[1:])}
        self.g = {n: np.empty((batch, n), dt) for n in set(self.widths[:-1])}
        self.dW = {w.shape: np.empty(w.shape, dt) for w in self.W}
        self.db = {n: np.empty(n, dt) for n in set(self.widths[1:])}
        self._batch = batch

    def __call__(self, x):
        x = np.ascontiguousarray(x, dtype=self.dtype)
        if x.shape[0] != self._batch:
            self._allocate(x.shape[0])
        L, W, b, h = self.depth, self.W, self.b, self.h
        h[0] = x
        tanh = self.activation == "tanh"

        # Forward, keeping every activation.
        for l in range(L):
            hl = h[l + 1]
            np.matmul(h[l], W[l].T, out=hl)
            hl += b[l]
            if tanh:
                np.tanh(hl, out=hl)
            else:
                np.maximum(hl, 0, out=hl)

        wsq = np.empty(L)
        bsq = np.empty(L)
        asq = np.empty(L + 1)
        g = h[L]  # dL/dh_L = h_L for the probe loss
        gf = g.ravel()
        asq[L] = np.dot(gf, gf)
        for l in range(L - 1, -1, -1):
            hl = h[l + 1]
            n_out, n_in = W[l].shape
            dz = self.dz[n_out]
            if tanh:  # dz = g * (1 - h^2)
                np.multiply(hl, hl, out=dz)
                np.subtract(1, dz, out=dz)
                dz *= g
            else:  # dz = g * (h > 0)
                np.greater(hl, 0, out=dz)
                dz *= g
            dW = self.dW[W[l].shape]
            np.matmul(dz.T, h[l], out=dW)
            db = self.db[n_out]
            np.add.reduce(dz, axis=0, out=db)
            g = self.g[n_in]
            np.matmul(dz, W[l], out=g)
            f = dW.ravel()
            wsq[l] = np.dot(f, f)
            bsq[l] = np.dot(db, db)
            f = g.ravel()
            asq[l] = np.dot(f, f)
        return Norms(np.sqrt(wsq), np.sqrt(bsq), np.sqrt(asq))


# --------------------------------------------------------------------------- PyTorch


class TorchChain:
    """PyTorch autograd: a loop of ``F.linear`` + activation over leaf parameters that
    share the given weights, ``retain_grad()`` on every activation, ``loss.backward()``,
    then ``torch._foreach_norm`` over the weight, bias and activation gradients."""

    def __init__(self, weights, biases, activation="tanh"):
        import torch
        import torch.nn.functional as F

        self.torch = torch
        self.linear = F.linear
        self.act = {"tanh": torch.tanh, "relu": torch.relu}[activation]
        # Copies: parameters must be writable leaves (and from_numpy warns on read-only).
        self.W = [torch.tensor(np.array(w)).requires_grad_() for w in weights]
        self.b = [torch.tensor(np.array(bb)).requires_grad_() for bb in biases]
        self.dtype = self.W[0].dtype

    def __call__(self, x):
        torch = self.torch
        for p in self.W:
            p.grad = None
        for p in self.b:
            p.grad = None
        h = torch.tensor(np.asarray(x), dtype=self.dtype).requires_grad_()
        hs = [h]
        act, linear = self.act, self.linear
        for W, b in zip(self.W, self.b):
            h = act(linear(h, W, b))
            h.retain_grad()
            hs.append(h)
        loss = 0.5 * (h * h).sum()
        loss.backward()
        with torch.no_grad():
            wn = torch.stack(torch._foreach_norm([p.grad for p in self.W]))
            bn = torch.stack(torch._foreach_norm([p.grad for p in self.b]))
            an = torch.stack(torch._foreach_norm([t.grad for t in hs]))
        return Norms(wn.double().numpy(), bn.double().numpy(), an.double().numpy())


def _torch_worker(conn):
    """Child process: builds a peer on request (any callable class, named by module and
    attribute, e.g. ``peers.TorchChain``) and runs it; results go back pickled."""
    peer = None
    while True:
        msg = conn.recv()
        try:
            if msg[0] == "stop":
                break
            if msg[0] == "init":
                _, module, name, args, kwargs, threads = msg
                import importlib

                import torch

                peer = None
                n = set_torch_threads(threads)
                peer = getattr(importlib.import_module(module), name)(*args, **kwargs)
                conn.send(("ok", {"torch": torch.__version__, "threads": n}))
            else:
                conn.send(("ok", peer(msg[1])))
        except Exception as exc:  # noqa: BLE001 - sent back to the parent process
            kind = "import" if isinstance(exc, ImportError) else "error"
            conn.send((kind, traceback.format_exc()))
    conn.close()


def _serve(fd):
    _torch_worker(Connection(fd))


class TorchProcess:
    """A PyTorch peer in a child process; calls send ``x`` and get the norms back.

    The child is a fresh interpreter that imports this file and PyTorch, never gradchain. The
    two share the OpenMP runtime's soname (libgomp.so.1): in one process, whichever library
    loads it first fixes its settings for both (gradchain loads it with
    OMP_WAIT_POLICY=PASSIVE, which slows PyTorch's small ops about 2x; the other way round
    gradchain loses ~20%). A separate process gives each its own runtime. The pipe adds well
    under a millisecond per call (x out, the norm vectors back).

    ``load`` builds a :class:`TorchChain`; ``build`` any peer class importable in the child
    (a module next to this file, e.g. ``rnn_peers.TorchCellLoop``).  Either replaces the
    previous peer, so one process serves several configurations and benchmark files.
    """

    def __init__(self):
        parent, child = socket.socketpair()
        here = os.path.dirname(os.path.abspath(__file__))
        code = (f"import sys; sys.path.insert(0, {here!r}); import peers; "
                f"peers._serve({child.fileno()})")
        self._proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(child.fileno(),))
        child.close()
        self._conn = Connection(parent.detach())
        self.info = None

    def _call(self, *msg):
        self._conn.send(msg)
        kind, payload = self._conn.recv()
        if kind == "import":
            raise ImportError(f"torch could not be imported in the worker:\n{payload}")
        if kind == "error":
            raise RuntimeError(f"torch worker failed:\n{payload}")
        return payload

    def build(self, module, name, *args, threads=None, **kwargs):
        """Build ``module.name(*args, **kwargs)`` in the child, with PyTorch's intra-op
        threads set to ``threads`` (default: the cores available); returns
        {"torch": version, "threads": n}."""
        self.info = self._call("init", module, name, args, kwargs, threads)
        return self.info

    def run(self, x):
        """Call the peer on ``x``; returns what the peer returns."""
        return self._call("run", np.ascontiguousarray(x))

    def load(self, weights, biases, activation="tanh", threads=None):
        """Build a :class:`TorchChain` in the child."""
        return self.build("peers", "TorchChain", list(weights), list(biases), activation,
                          threads=threads)

    def __call__(self, x):
        return self.run(x)

    def close(self):
        if self._proc.poll() is None:
            try:
                self._conn.send(("stop",))
            except OSError:
                pass
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------- self-check


def _self_check():
    import time

    set_torch_threads()
    for depth, width, batch, dtype, rtol in [
        (50, 16, 8, np.float64, 1e-10),
        (1000, 64, 32, np.float64, 1e-10),
        (20, 256, 32, np.float32, 1e-3),
    ]:
        weights, biases = random_chain(depth, width, dtype)
        x = np.random.default_rng(1).standard_normal((batch, width)).astype(dtype)
        for act in ("tanh", "relu"):
            t0 = time.perf_counter()
            a = NumpyChain(weights, biases, act)(x)
            t1 = time.perf_counter()
            t = TorchChain(weights, biases, act)(x)
            t2 = time.perf_counter()
            for f in ("weight_grad_norms", "bias_grad_norms", "activation_grad_norms"):
                np.testing.assert_allclose(getattr(a, f), getattr(t, f), rtol=rtol, err_msg=f)
            assert a.activation_grad_norms.shape == (depth + 1,)
            print(
                f"depth {depth:5d} width {width:4d} {np.dtype(dtype).name} {act}: agree "
                f"(numpy {1e3 * (t1 - t0):.1f} ms, torch {1e3 * (t2 - t1):.1f} ms)"
            )
    with TorchProcess() as worker:
        worker.load(weights, biases, "tanh")
        got = worker(x)
        want = NumpyChain(weights, biases, "tanh")(x)
        np.testing.assert_allclose(got.weight_grad_norms, want.weight_grad_norms, rtol=1e-3)
        print(f"TorchProcess agrees ({worker.info})")


if __name__ == "__main__":
    _self_check()
