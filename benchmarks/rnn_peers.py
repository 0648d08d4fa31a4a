"""Peer implementations that gradchain's recurrent benchmarks are measured against.

Each peer runs the computation of ``gradchain.RNN.backward`` with the probe loss
``0.5 * ||h_T||^2`` (top layer, zero initial states): a forward pass over ``T`` timesteps,
then backpropagation through time, returning the parameter gradient norms and (except for
the fused PyTorch modules) the per-timestep state gradient norms ``||dL/dh_t||``,
``t = 0..T``.  Weights are a state dict in PyTorch's layout and names
(``weight_ih_l0`` ``(G*H, in)``, ``weight_hh_l0`` ``(G*H, H)``, ``bias_ih_l0``,
``bias_hh_l0``; gates ``i, f, g, o`` for the LSTM and ``r, z, n`` for the GRU), as
``gradchain.RNN.state_dict()`` returns it.

Peers are built once from a state dict (tensors and buffers are set up in the
constructor, outside the timed part) and then called with the input ``x`` of shape
``(T, batch, input_size)``; a call returns :class:`RecurrentNorms`.

* :class:`TorchCellLoop` - ``torch.nn.RNNCell`` / ``LSTMCell`` / ``GRUCell`` unrolled in a
  Python loop, ``retain_grad()`` on every state, ``loss.backward()``, then the norms.
* :class:`TorchFused` - ``torch.nn.RNN`` / ``LSTM`` / ``GRU`` forward + backward (parameter
  gradients only: the module does not expose the intermediate states to autograd).
* :class:`NumpyRecurrent` - explicit forward / backward formulas in NumPy.
* :class:`JaxRecurrent` - ``jax.jit`` of ``jax.grad`` over a ``lax.scan`` of the cell,
  per-timestep state gradient norms from the same call (runs in ``peers.JaxProcess``).

PyTorch peers run in a worker process in the benchmarks (``peers.TorchProcess``, see its
docstring).  Run ``python benchmarks/rnn_peers.py`` to check that the peers agree with
each other (no gradchain needed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import peers

__all__ = [
    "CELLS",
    "JaxRecurrent",
    "NumpyRecurrent",
    "RecurrentNorms",
    "TorchCellLoop",
    "TorchFused",
    "compare_state_norms",
    "default_state_dict",
    "gates",
    "norm_floor",
]

CELLS = ("tanh", "relu", "lstm", "gru")


@dataclass
class RecurrentNorms:
    """Gradient norms of one backward pass, laid out as gradchain's RecurrentReport."""

    loss: float
    # (T + 1,) ||dL/dh_t|| of the top layer, t = 0..T (None: fused module).  Exact above
    # norm_floor(dtype) only: 0 where the gradient or its squares underflow.
    state_grad_norms: np.ndarray | None
    weight_grad_norms: dict  # state-dict name -> Frobenius norm of its gradient


def norm_floor(dtype) -> float:
    """Below this a peer's state gradient norm is not exact.  Norms are square roots of
    sums of squares accumulated in float64 without rescaling, as ``torch.linalg.vector_norm``
    computes them: squares underflow once the elements drop below ~1e-154, so a float64 norm
    reads 0 from about 1e-152 down (kept 1e10 above that, where the lost squares are far
    below the compared precision); float32 gradients themselves flush to zero near 1e-38
    (kept 1e6 above their smallest normal value)."""
    return max(1e6 * float(np.finfo(dtype).tiny), 1e10 * float(np.sqrt(np.finfo(np.float64).tiny)))


def gates(cell: str) -> int:
    return {"tanh": 1, "relu": 1, "lstm": 4, "gru": 3}[cell]


def default_state_dict(cell, input_size, hidden_size, num_layers=1, dtype=np.float64, seed=0):
    """PyTorch's default initialization, U(-1/sqrt(H), 1/sqrt(H)) for every tensor, drawn
    with NumPy.  Used by the self-check, and by the benchmarks while ``gradchain.RNN`` is
    not available."""
    rng = np.random.default_rng(seed)
    k = 1.0 / np.sqrt(hidden_size)
    gh = gates(cell) * hidden_size
    sd = {}
    for layer in range(num_layers):
        n_in = input_size if layer == 0 else hidden_size
        for name, shape in (("weight_ih", (gh, n_in)), ("weight_hh", (gh, hidden_size)),
                            ("bias_ih", (gh,)), ("bias_hh", (gh,))):
            sd[f"{name}_l{layer}"] = rng.uniform(-k, k, shape).astype(dtype)
    return sd


def _layers(state_dict):
    names = [k for k in state_dict if re.fullmatch(r"weight_ih_l\d+", k)]
    return len(names)


def _check_state_dict(cell, state_dict):
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {CELLS}, not {cell!r}")
    extra = [k for k in state_dict if k.startswith("readout.")]
    if extra:
        raise ValueError(f"recurrent peers do not take a readout ({extra}); the probe loss "
                         "uses the top layer's final state")
    sd = {k: np.ascontiguousarray(np.asarray(v)) for k, v in state_dict.items()}
    num_layers = _layers(sd)
    hidden_size = sd["weight_hh_l0"].shape[1]
    input_size = sd["weight_ih_l0"].shape[1]
    bias = "bias_ih_l0" in sd
    if sd["weight_hh_l0"].shape[0] != gates(cell) * hidden_size:
        raise ValueError(f"weight_hh_l0 has shape {sd['weight_hh_l0'].shape}, not "
                         f"({gates(cell)} * H, H) as a {cell!r} cell needs")
    return sd, num_layers, input_size, hidden_size, bias


# --------------------------------------------------------------------------- PyTorch


def _torch_params(torch, sd, names, dtype):
    return [torch.tensor(sd[n], dtype=dtype) for n in names]


class TorchCellLoop:
    """``torch.nn.RNNCell`` / ``LSTMCell`` / ``GRUCell`` (one per layer, holding the given
    weights) unrolled over the timesteps in Python.  The initial states are zero leaves that
    require grad; every top-layer state ``h_t`` gets ``retain_grad()``.  After
    ``loss.backward()`` the state gradients are stacked to ``(T + 1, batch, H)`` and reduced
    with ``torch.linalg.vector_norm`` (accumulated in float64, so float32 gradients far
    below 1e-19 do not square to zero); parameter gradient norms use
    ``torch._foreach_norm``."""

    def __init__(self, cell, state_dict):
        import torch

        sd, num_layers, input_size, hidden_size, bias = _check_state_dict(cell, state_dict)
        self.torch = torch
        self.cell = cell
        self.np_dtype = sd["weight_ih_l0"].dtype
        self.dtype = torch.from_numpy(np.zeros(0, self.np_dtype)).dtype
        self.hidden_size = hidden_size
        self.cells = []
        self.names = []  # state-dict names, in the order of self.params
        self.params = []
        for layer in range(num_layers):
            n_in = input_size if layer == 0 else hidden_size
            if cell in ("tanh", "relu"):
                m = torch.nn.RNNCell(n_in, hidden_size, bias=bias, nonlinearity=cell)
            elif cell == "lstm":
                m = torch.nn.LSTMCell(n_in, hidden_size, bias=bias)
            else:
                m = torch.nn.GRUCell(n_in, hidden_size, bias=bias)
            m = m.to(self.dtype)
            with torch.no_grad():
                for pname, p in m.named_parameters():  # weight_ih, weight_hh, bias_ih, bias_hh
                    name = f"{pname}_l{layer}"
                    p.copy_(torch.from_numpy(sd[name]))
                    self.names.append(name)
                    self.params.append(p)
            self.cells.append(m)

    def __call__(self, x):
        torch = self.torch
        for p in self.params:
            p.grad = None
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=self.np_dtype))
        T, B = x.shape[0], x.shape[1]
        L, H, lstm = len(self.cells), self.hidden_size, self.cell == "lstm"
        h = [torch.zeros(B, H, dtype=self.dtype, requires_grad=True) for _ in range(L)]
        c = [torch.zeros(B, H, dtype=self.dtype) for _ in range(L)] if lstm else None
        hs = [h[-1]]
        for t in range(T):
            inp = x[t]
            for layer, m in enumerate(self.cells):
                if lstm:
                    h[layer], c[layer] = m(inp, (h[layer], c[layer]))
                else:
                    h[layer] = m(inp, h[layer])
                inp = h[layer]
            inp.retain_grad()
            hs.append(inp)
        top = hs[-1]
        loss = 0.5 * (top * top).sum()
        loss.backward()
        with torch.no_grad():
            sn = torch.linalg.vector_norm(torch.stack([s.grad for s in hs]), dim=(1, 2),
                                          dtype=torch.float64)
            pn = torch.stack(torch._foreach_norm([p.grad for p in self.params]))
        return RecurrentNorms(loss.detach().item(), sn.numpy(),
                              dict(zip(self.names, pn.double().tolist())))


class TorchFused:
    """``torch.nn.RNN`` / ``LSTM`` / ``GRU`` holding the given state dict: forward over the
    whole sequence, the probe loss on the top layer's ``h_T``, ``loss.backward()``, then
    ``torch._foreach_norm`` over the parameter gradients.  No per-timestep state norms
    (``state_grad_norms`` is None)."""

    def __init__(self, cell, state_dict):
        import torch

        sd, num_layers, input_size, hidden_size, bias = _check_state_dict(cell, state_dict)
        self.torch = torch
        self.np_dtype = sd["weight_ih_l0"].dtype
        self.dtype = torch.from_numpy(np.zeros(0, self.np_dtype)).dtype
        kw = {"num_layers": num_layers, "bias": bias}
        if cell in ("tanh", "relu"):
            m = torch.nn.RNN(input_size, hidden_size, nonlinearity=cell, **kw)
        elif cell == "lstm":
            m = torch.nn.LSTM(input_size, hidden_size, **kw)
        else:
            m = torch.nn.GRU(input_size, hidden_size, **kw)
        self.module = m.to(self.dtype)
        self.module.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
        self.names, self.params = zip(*self.module.named_parameters())

    def __call__(self, x):
        torch = self.torch
        for p in self.params:
            p.grad = None
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=self.np_dtype))
        out, _ = self.module(x)
        top = out[-1]  # h_T of the top layer
        loss = 0.5 * (top * top).sum()
        loss.backward()
        with torch.no_grad():
            pn = torch.stack(torch._foreach_norm([p.grad for p in self.params]))
        return RecurrentNorms(loss.detach().item(), None, dict(zip(self.names, pn.double().tolist())))


# --------------------------------------------------------------------------- JAX


class JaxRecurrent:
    """``jax.jit`` of ``jax.grad`` over a ``lax.scan`` of the cell (one layer), compiled once
    per input shape (the first call; its compile time is kept in ``compile_s``).

    The input projections of all steps are one product before the scan. The per-timestep
    state gradients come from the same call: a zero array ``e`` of shape ``(T + 1, batch,
    H)`` enters the loss as ``h_t + e_t`` wherever ``h_t`` is used, so ``dL/de_t =
    dL/dh_t``. All norms (states in float64, as the PyTorch cell loop's) are taken inside
    the compiled function.
    """

    def __init__(self, cell, state_dict):
        import jax
        import jax.numpy as jnp

        sd, num_layers, _, hidden_size, bias = _check_state_dict(cell, state_dict)
        if num_layers != 1:
            raise ValueError("JaxRecurrent supports one layer")
        self.jax, self.jnp = jax, jnp
        self.names = [
            n for n in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0") if n in sd
        ]
        self.params = tuple(jnp.asarray(sd[n]) for n in self.names)
        self.dtype = sd["weight_ih_l0"].dtype
        H = hidden_size

        def step(p, carry, a, e):
            w_hh = p[1]
            b_hh = p[3] if bias else 0
            if cell == "lstm":
                h, c = carry
                g = a + (h + e) @ w_hh.T + b_hh
                i, f = jax.nn.sigmoid(g[:, :H]), jax.nn.sigmoid(g[:, H : 2 * H])
                gg, o = jnp.tanh(g[:, 2 * H : 3 * H]), jax.nn.sigmoid(g[:, 3 * H :])
                c = f * c + i * gg
                return (o * jnp.tanh(c), c)
            (h,) = carry
            hh = h + e
            if cell == "gru":
                gh = hh @ w_hh.T + b_hh
                r = jax.nn.sigmoid(a[:, :H] + gh[:, :H])
                z = jax.nn.sigmoid(a[:, H : 2 * H] + gh[:, H : 2 * H])
                n = jnp.tanh(a[:, 2 * H :] + r * gh[:, 2 * H :])
                return ((1 - z) * n + z * hh,)
            pre = a + hh @ w_hh.T + b_hh
            return (jnp.tanh(pre) if cell == "tanh" else jax.nn.relu(pre),)

        def loss(p, e, x):
            a = x @ p[0].T + (p[2] if bias else 0)
            zero = jnp.zeros((x.shape[1], H), x.dtype)
            carry0 = (zero, zero) if cell == "lstm" else (zero,)

            def body(carry, ae):
                carry = step(p, carry, *ae)
                return carry, None

            carry, _ = jax.lax.scan(body, carry0, (a, e[:-1]))
            h = carry[0] + e[-1]
            return 0.5 * jnp.sum(h * h)

        def norms(p, x):
            e = jnp.zeros((x.shape[0] + 1, x.shape[1], H), x.dtype)
            value, (gp, ge) = jax.value_and_grad(loss, argnums=(0, 1))(p, e, x)
            ge = ge.astype(jnp.float64)
            sn = jnp.sqrt(jnp.sum(ge * ge, axis=(1, 2)))
            pn = jnp.stack([jnp.sqrt(jnp.sum(g.astype(jnp.float64) ** 2)) for g in gp])
            return value, sn, pn

        self.fn = jax.jit(norms)
        self.compiled, self.compile_s = {}, None

    def __call__(self, x):
        import time

        x = self.jnp.asarray(np.ascontiguousarray(x, dtype=self.dtype))
        key = (x.shape, x.dtype.str)
        if key not in self.compiled:
            t0 = time.perf_counter()
            self.compiled[key] = self.fn.lower(self.params, x).compile()
            self.compile_s = time.perf_counter() - t0
        value, sn, pn = self.jax.block_until_ready(self.compiled[key](self.params, x))
        return RecurrentNorms(
            float(value),
            np.asarray(sn, dtype=np.float64),
            dict(zip(self.names, np.asarray(pn, dtype=np.float64).tolist())),
        )


# --------------------------------------------------------------------------- NumPy


def _sigmoid(a, out):
    """out = sigmoid(a) = (1 + tanh(a / 2)) / 2, without exp overflow."""
    np.multiply(a, 0.5, out=out)
    np.tanh(out, out=out)
    out += 1
    out *= 0.5
    return out


class NumpyRecurrent:
    """A hand-written NumPy forward + backward through time (one layer).

    The input projections of all timesteps are one GEMM before the loop; the forward loop
    keeps every state and gate activation; the backward loop forms the pre-activation
    gradients of every step into one ``(T, batch, G*H)`` buffer, so ``dW_ih``,
    ``dW_hh`` and the biases are again one GEMM / reduction each after the loop.  State
    gradients are kept and their norms taken at the end in float64.  All buffers are
    allocated once per input shape.
    """

    def __init__(self, cell, state_dict):
        sd, num_layers, _, hidden_size, bias = _check_state_dict(cell, state_dict)
        if num_layers != 1:
            raise ValueError("NumpyRecurrent supports one layer")
        self.cell = cell
        self.H = hidden_size
        self.dtype = sd["weight_ih_l0"].dtype
        self.W_ih = sd["weight_ih_l0"]
        self.W_hh = sd["weight_hh_l0"]
        gh = gates(cell) * hidden_size
        self.b_ih = sd["bias_ih_l0"] if bias else np.zeros(gh, self.dtype)
        self.b_hh = sd["bias_hh_l0"] if bias else np.zeros(gh, self.dtype)
        self.bias = bias
        self._shape = None

    def _allocate(self, T, B):
        dt, H, G = self.dtype, self.H, gates(self.cell)
        self.hs = np.zeros((T + 1, B, H), dt)  # hs[0] = h_0 = 0
        self.acts = np.empty((T, B, G * H), dt)  # gate pre-activations, then activations
        self.pre = np.empty((T, B, G * H), dt)  # pre-activation gradients (ih side)
        self.dhs = np.empty((T + 1, B, H), dt)
        self.gbuf = np.empty((B, G * H), dt)
        self.tmp = np.empty((B, H), dt)
        if self.cell == "lstm":
            self.cs = np.zeros((T + 1, B, H), dt)
            self.tc = np.empty((T, B, H), dt)  # tanh(c_t)
            self.dc = np.empty((B, H), dt)
        if self.cell == "gru":
            self.ghn = np.empty((T, B, H), dt)  # W_hn h_{t-1} + b_hn
            self.dpre_hh = np.empty((T, B, G * H), dt)
        self._shape = (T, B)

    def __call__(self, x):
        x = np.ascontiguousarray(x, dtype=self.dtype)
        T, B, n_in = x.shape
        if (T, B) != self._shape:
            self._allocate(T, B)
        H = self.H
        hs, acts = self.hs, self.acts
        xf = x.reshape(T * B, n_in)
        # Input projections of every step: acts[t] = x_t W_ih^T + b_ih (+ b_hh except GRU).
        np.matmul(xf, self.W_ih.T, out=acts.reshape(T * B, -1))
        acts += self.b_ih
        if self.cell != "gru":
            acts += self.b_hh
        self._forward(T)
        loss = 0.5 * float(np.dot(hs[T].ravel(), hs[T].ravel()))
        dpre = self._backward(T)
        # Parameter gradients, one GEMM each over all timesteps.
        dpre_ih = dpre.reshape(T * B, -1)
        dpre_hh = (self.dpre_hh if self.cell == "gru" else dpre).reshape(T * B, -1)
        g = {
            "weight_ih_l0": dpre_ih.T @ xf,
            "weight_hh_l0": dpre_hh.T @ hs[:T].reshape(T * B, H),
        }
        if self.bias:
            g["bias_ih_l0"] = dpre_ih.sum(axis=0)
            g["bias_hh_l0"] = dpre_hh.sum(axis=0)
        wn = {k: float(np.linalg.norm(v.astype(np.float64))) for k, v in g.items()}
        d = self.dhs.reshape(T + 1, -1).astype(np.float64)
        sn = np.sqrt(np.einsum("ij,ij->i", d, d))
        return RecurrentNorms(loss, sn, wn)

    def _forward(self, T):
        hs, acts, W_hh, H, gb, tmp = self.hs, self.acts, self.W_hh, self.H, self.gbuf, self.tmp
        cell = self.cell
        for t in range(T):
            a = acts[t]
            h = hs[t]
            if cell in ("tanh", "relu"):
                np.matmul(h, W_hh.T, out=gb)
                a += gb
                if cell == "tanh":
                    np.tanh(a, out=hs[t + 1])
                else:
                    np.maximum(a, 0, out=hs[t + 1])
            elif cell == "lstm":
                np.matmul(h, W_hh.T, out=gb)
                a += gb
                i, f, gg, o = a[:, :H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:]
                _sigmoid(a[:, :2 * H], a[:, :2 * H])  # i and f
                np.tanh(gg, out=gg)
                _sigmoid(o, o)
                c = self.cs[t + 1]
                np.multiply(f, self.cs[t], out=c)
                np.multiply(i, gg, out=tmp)
                c += tmp
                tc = self.tc[t]
                np.tanh(c, out=tc)
                np.multiply(o, tc, out=hs[t + 1])
            else:  # gru: r, z, n
                np.matmul(h, W_hh.T, out=gb)
                gb += self.b_hh
                r, z, n = a[:, :H], a[:, H:2 * H], a[:, 2 * H:]
                rz = a[:, :2 * H]
                rz += gb[:, :2 * H]
                _sigmoid(rz, rz)
                ghn = self.ghn[t]
                ghn[...] = gb[:, 2 * H:]
                np.multiply(r, ghn, out=tmp)
                n += tmp
                np.tanh(n, out=n)
                hn = hs[t + 1]  # h' = n + z * (h - n)
                np.subtract(h, n, out=hn)
                hn *= z
                hn += n

    def _backward(self, T):
        hs, acts, W_hh, H = self.hs, self.acts, self.W_hh, self.H
        dhs, dpre, tmp, cell = self.dhs, self.pre, self.tmp, self.cell
        dhs[T] = hs[T]  # dL/dh_T = h_T for the probe loss
        if cell == "lstm":
            dc = self.dc
            dc[...] = 0
        for t in range(T - 1, -1, -1):
            g = dhs[t + 1]
            a = acts[t]
            d = dpre[t]
            if cell in ("tanh", "relu"):
                hn = hs[t + 1]
                if cell == "tanh":  # d = g * (1 - h^2)
                    np.multiply(hn, hn, out=d)
                    np.subtract(1, d, out=d)
                else:
                    np.greater(hn, 0, out=d)
                d *= g
                np.matmul(d, W_hh, out=dhs[t])
            elif cell == "lstm":
                i, f, gg, o = a[:, :H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:]
                di, df, dg, do = d[:, :H], d[:, H:2 * H], d[:, 2 * H:3 * H], d[:, 3 * H:]
                tc = self.tc[t]
                np.multiply(g, tc, out=do)  # do = g * tanh(c)
                np.multiply(tc, tc, out=tmp)  # dc += g * o * (1 - tanh(c)^2)
                np.subtract(1, tmp, out=tmp)
                tmp *= o
                tmp *= g
                dc += tmp
                np.multiply(dc, gg, out=di)
                np.multiply(dc, self.cs[t], out=df)
                np.multiply(dc, i, out=dg)
                dc *= f  # dL/dc_{t-1}
                for v, dv in ((i, di), (f, df), (o, do)):  # sigmoid' = s (1 - s)
                    dv *= v
                    np.subtract(1, v, out=tmp)
                    dv *= tmp
                np.multiply(gg, gg, out=tmp)  # tanh' = 1 - g^2
                np.subtract(1, tmp, out=tmp)
                dg *= tmp
                np.matmul(d, W_hh, out=dhs[t])
            else:  # gru
                r, z, n = a[:, :H], a[:, H:2 * H], a[:, 2 * H:]
                dr, dz, dn = d[:, :H], d[:, H:2 * H], d[:, 2 * H:]
                dh = self.dpre_hh[t]
                h = hs[t]
                np.subtract(h, n, out=dz)  # dz = g * (h - n) * z (1 - z)
                dz *= g
                dz *= z
                np.subtract(1, z, out=tmp)
                dz *= tmp
                np.multiply(g, tmp, out=dn)  # dn = g (1 - z) (1 - n^2)
                np.multiply(n, n, out=tmp)
                np.subtract(1, tmp, out=tmp)
                dn *= tmp
                np.multiply(dn, self.ghn[t], out=dr)  # dr = dn * ghn * r (1 - r)
                dr *= r
                np.subtract(1, r, out=tmp)
                dr *= tmp
                dh[:, :2 * H] = d[:, :2 * H]
                np.multiply(dn, r, out=dh[:, 2 * H:])
                np.matmul(dh, W_hh, out=dhs[t])
                np.multiply(g, z, out=tmp)
                dhs[t] += tmp
        return dpre


# --------------------------------------------------------------------------- self-check


def _assert_param_norms(got, want, rtol, who):
    assert set(got) == set(want), f"{who}: parameter names {sorted(got)} != {sorted(want)}"
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, err_msg=f"{who}: {k}")


def compare_state_norms(got, want, rtol, floor):
    """Relative comparison of per-timestep norms where both are above ``floor`` (see
    :func:`norm_floor`).  Returns the number of timesteps compared."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"shapes {got.shape} != {want.shape}"
    mask = (got > floor) & (want > floor)
    np.testing.assert_allclose(got[mask], want[mask], rtol=rtol)
    return int(mask.sum())


def _self_check():
    import time

    peers.set_torch_threads()
    for cell, T, H, B, dtype, rtol in [
        ("tanh", 50, 16, 4, np.float64, 1e-10),
        ("relu", 50, 16, 4, np.float64, 1e-10),
        ("lstm", 50, 16, 4, np.float64, 1e-10),
        ("gru", 50, 16, 4, np.float64, 1e-10),
        ("tanh", 1000, 128, 32, np.float64, 1e-8),
        ("lstm", 1000, 128, 32, np.float32, 1e-3),
        ("gru", 1000, 128, 32, np.float32, 1e-3),
    ]:
        sd = default_state_dict(cell, 8, H, dtype=dtype, seed=0)
        x = np.random.default_rng(1).standard_normal((T, B, 8)).astype(dtype)
        t0 = time.perf_counter()
        loop = TorchCellLoop(cell, sd)(x)
        t1 = time.perf_counter()
        fused = TorchFused(cell, sd)(x)
        t2 = time.perf_counter()
        ref = NumpyRecurrent(cell, sd)(x)
        t3 = time.perf_counter()
        _assert_param_norms(loop.weight_grad_norms, fused.weight_grad_norms, rtol,
                            f"{cell}: cell loop vs fused")
        _assert_param_norms(ref.weight_grad_norms, fused.weight_grad_norms, rtol,
                            f"{cell}: numpy vs fused")
        np.testing.assert_allclose(loop.loss, fused.loss, rtol=rtol)
        np.testing.assert_allclose(ref.loss, fused.loss, rtol=rtol)
        assert loop.state_grad_norms.shape == (T + 1,)
        floor = norm_floor(dtype)
        n = compare_state_norms(loop.state_grad_norms, ref.state_grad_norms, 10 * rtol, floor)
        print(f"{cell:4s} T {T:4d} H {H:3d} B {B:2d} {np.dtype(dtype).name}: agree "
              f"({n} timesteps compared; cell loop {1e3 * (t1 - t0):.0f} ms, fused "
              f"{1e3 * (t2 - t1):.0f} ms, numpy {1e3 * (t3 - t2):.0f} ms)")
    with peers.TorchProcess() as worker:
        worker.build("rnn_peers", "TorchFused", cell, sd)
        got = worker.run(x)
        _assert_param_norms(got.weight_grad_norms, fused.weight_grad_norms, 1e-6,
                            "TorchProcess")
        print(f"TorchProcess agrees ({worker.info})")


if __name__ == "__main__":
    _self_check()
