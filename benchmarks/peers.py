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
    "JaxProcess",
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


def _framework_info(framework, threads):
    """Imports the worker's framework (PyTorch or JAX) and sets it up; returns its version
    and thread count."""
    if framework == "jax":
        import jax

        # float64 arrays stay float64 (the float64 configurations); float32 ones stay float32.
        jax.config.update("jax_enable_x64", True)
        return {
            "jax": jax.__version__,
            "threads": available_cores(),
            "backend": jax.default_backend(),
        }
    import torch

    return {"torch": torch.__version__, "threads": set_torch_threads(threads)}


def _torch_worker(conn, framework="torch"):
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

                peer = None
                info = _framework_info(framework, threads)
                peer = getattr(importlib.import_module(module), name)(*args, **kwargs)
                conn.send(("ok", info))
            elif msg[0] == "attr":
                conn.send(("ok", getattr(peer, msg[1], None)))
            else:
                conn.send(("ok", peer(msg[1])))
        except Exception as exc:  # noqa: BLE001 - sent back to the parent process
            kind = "import" if isinstance(exc, ImportError) else "error"
            conn.send((kind, traceback.format_exc()))
    conn.close()


def _serve(fd, framework="torch"):
    _torch_worker(Connection(fd), framework)


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

    framework = "torch"

    def __init__(self):
        parent, child = socket.socketpair()
        here = os.path.dirname(os.path.abspath(__file__))
        code = (f"import sys; sys.path.insert(0, {here!r}); import peers; "
                f"peers._serve({child.fileno()}, {self.framework!r})")
        self._proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(child.fileno(),))
        child.close()
        self._conn = Connection(parent.detach())
        self.info = None

    def _call(self, *msg):
        self._conn.send(msg)
        kind, payload = self._conn.recv()
        if kind == "import":
            raise ImportError(f"{self.framework} could not be imported in the worker:\n{payload}")
        if kind == "error":
            raise RuntimeError(f"{self.framework} worker failed:\n{payload}")
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

    def attr(self, name):
        """An attribute of the peer (None if it has none), e.g. a JAX peer's ``compile_s``."""
        return self._call("attr", name)

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


class JaxProcess(TorchProcess):
    """A JAX peer in a child process (the same protocol as :class:`TorchProcess`).

    The child imports JAX (never gradchain nor PyTorch) with ``jax_enable_x64`` on, so
    float64 inputs stay float64; XLA's CPU backend uses the cores available. ``build``
    returns {"jax": version, "threads": n, "backend": "cpu"}. JAX peers compile on their
    first call for an input shape and keep the compiled function; that call is the
    untimed validation, and the peer's ``compile_s`` attribute (``attr("compile_s")``)
    holds the compile time, reported apart from the timed calls.
    """

    framework = "jax"


# --------------------------------------------------------------------------- JAX


class JaxChain:
    """``jax.jit`` of ``jax.grad`` over a ``lax.scan`` of the layers (``h = act(h W^T + b)``
    with the weights stacked ``(depth, out, in)``), probe loss ``0.5 * ||h_L||^2``. The
    activation gradients come from the same call: a zero array added to every ``h_l``
    (``l = 0..L``) is a third argument of the loss, and its gradient is ``dL/dh_l``. The
    weight, bias and activation gradient norms are taken inside the compiled function, each
    scaled by its largest entry."""

    def __init__(self, weights, biases, activation="tanh"):
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp = jax, jnp
        self.W = jnp.asarray(np.stack([np.asarray(w) for w in weights]))
        self.b = jnp.asarray(np.stack([np.asarray(b) for b in biases]))
        act = {"tanh": jnp.tanh, "relu": jax.nn.relu}[activation]

        def loss(W, b, eps, x):
            def layer(h, wbe):
                w, bb, e = wbe
                h = act(h @ w.T + bb) + e
                return h, None

            h, _ = jax.lax.scan(layer, x + eps[0], (W, b, eps[1:]))
            return 0.5 * jnp.sum(h * h)

        def norms(W, b, x):
            eps = jnp.zeros((W.shape[0] + 1, *x.shape), x.dtype)
            gW, gb, ge = jax.grad(loss, argnums=(0, 1, 2))(W, b, eps, x)
            # Scaled by the largest entry: the squares of entries below ~1e-154 (a deep
            # float64 chain's vanished gradients) would underflow.
            def flat(g):
                g = g.reshape(g.shape[0], -1)
                m = jnp.max(jnp.abs(g), axis=1, keepdims=True)
                m = jnp.where(m > 0, m, 1)
                return m[:, 0] * jnp.sqrt(jnp.sum((g / m) ** 2, axis=1))

            return flat(gW), flat(gb), flat(ge)

        self.fn = jax.jit(norms)
        self.compiled, self.compile_s = {}, None

    def _compiled(self, x):
        key = (x.shape, x.dtype.str)
        if key not in self.compiled:
            import time

            t0 = time.perf_counter()
            self.compiled[key] = self.fn.lower(self.W, self.b, x).compile()
            self.compile_s = time.perf_counter() - t0
        return self.compiled[key]

    def __call__(self, x):
        x = self.jnp.asarray(np.asarray(x, dtype=self.W.dtype))
        wn, bn, an = self.jax.block_until_ready(self._compiled(x)(self.W, self.b, x))
        f = lambda a: np.asarray(a, dtype=np.float64)
        return Norms(f(wn), f(bn), f(an))


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
