"""PyTorch and JAX peers for the training benchmarks (run in peers.TorchProcess and
peers.JaxProcess).

A peer is built once from gradchain's ``state_dict`` (torch names), the training data and
the run's settings; a call takes the batch order (``gc.tasks.batch_order``: steps x batch
indices), restores the initial weights, makes a fresh ``torch.optim`` optimizer and runs
the plain training loop that ``gc.train`` runs: per step the batch, the forward pass, the
loss, ``loss.backward()``, the loss, every parameter's gradient norm
(``torch._foreach_norm``) and the total norm recorded, ``clip_grad_norm_`` and
``optimizer.step()``. It returns the recorded losses, total norms and per-parameter
gradient norms.

* ``kind="mlp"``: ``nn.Sequential`` of ``depth`` x (``nn.Linear``, ``nn.Tanh``), mse loss.
* ``kind="lstm"``: ``nn.LSTM`` and a ``nn.Linear`` read-out of the last step, mse loss,
  truncated backpropagation through time: the states are detached after every
  ``truncate`` steps (as ``gc.train(..., truncate=k)``).

:class:`JaxTrainLoop` runs the same loop compiled: one ``jax.jit`` of a ``lax.scan`` over
the steps, each step ``jax.value_and_grad`` of the loss (a ``lax.scan`` over the layers, or
over the timesteps with ``lax.stop_gradient`` on the states every ``truncate`` steps),
the per-parameter norms, the clipping and the optimizer's update (torch's formulas for
Adam and SGD with momentum, written out).
"""

from __future__ import annotations

import numpy as np


class TorchTrainLoop:
    def __init__(self, kind, state_dict, dtype, x, y, optimizer, opt_kw, max_norm, truncate=None,
                 depth=None, width=None, hidden=None, input_size=None, output_size=None):  # fmt: skip
        import torch
        from torch import nn

        self.torch = torch
        tdt = {"float32": torch.float32, "float64": torch.float64}[dtype]
        if kind == "mlp":
            mods = []
            for _ in range(depth):
                mods += [nn.Linear(width, width, dtype=tdt), nn.Tanh()]
            self.model = nn.Sequential(*mods)
            self.readout = None
        elif kind == "lstm":
            self.model = nn.LSTM(input_size, hidden, dtype=tdt)
            self.readout = nn.Linear(hidden, output_size, dtype=tdt)
        else:
            raise ValueError(f"unknown kind {kind!r}")
        self.kind = kind
        self.state = {k: torch.as_tensor(np.array(v)) for k, v in state_dict.items()}
        self.params = list(self.model.parameters())
        if self.readout is not None:
            self.params += list(self.readout.parameters())
        self.x = torch.as_tensor(np.asarray(x))
        self.y = torch.as_tensor(np.asarray(y))
        self.optimizer, self.opt_kw = optimizer, opt_kw
        self.max_norm, self.truncate = max_norm, truncate
        self.load()

    def load(self):
        with self.torch.no_grad():
            self.model.load_state_dict(
                {k: v for k, v in self.state.items() if not k.startswith("readout.")}
            )
            if self.readout is not None:
                self.readout.load_state_dict(
                    {k[8:]: v for k, v in self.state.items() if k.startswith("readout.")}
                )

    def loss(self, idx):
        F = self.torch.nn.functional
        if self.kind == "mlp":
            return F.mse_loss(self.model(self.x[idx]), self.y[idx])
        xb, state = self.x[:, idx], None
        for t0 in range(0, xb.shape[0], self.truncate):
            out, state = self.model(xb[t0 : t0 + self.truncate], state)
            state = tuple(s.detach() for s in state)
        return F.mse_loss(self.readout(out[-1]), self.y[idx])

    def __call__(self, order):
        torch = self.torch
        self.load()
        opt = getattr(torch.optim, self.optimizer)(self.params, **self.opt_kw)
        steps = len(order)
        losses = torch.empty(steps, dtype=torch.float64)
        totals = torch.empty(steps, dtype=torch.float64)
        norms = torch.empty(steps, len(self.params), dtype=torch.float64)
        order = torch.as_tensor(np.asarray(order))
        for k in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = self.loss(order[k])
            loss.backward()
            with torch.no_grad():
                norms[k] = torch.stack(torch._foreach_norm([p.grad for p in self.params]))
                losses[k] = loss.detach()
            totals[k] = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
            opt.step()
        return losses.numpy(), totals.numpy(), norms.numpy()


class JaxTrainLoop:
    """The training loop of :class:`TorchTrainLoop` as one compiled JAX function (compiled
    on the first call for a number of steps; ``compile_s`` keeps that time). Same arguments,
    same results: the losses, total norms and per-parameter gradient norms of every step."""

    def __init__(self, kind, state_dict, dtype, x, y, optimizer, opt_kw, max_norm, truncate=None,
                 depth=None, width=None, hidden=None, input_size=None, output_size=None):  # fmt: skip
        import jax
        import jax.numpy as jnp

        if kind not in ("mlp", "lstm"):
            raise ValueError(f"unknown kind {kind!r}")
        if optimizer not in ("Adam", "SGD"):
            raise ValueError(f"JaxTrainLoop has Adam and SGD, not {optimizer!r}")
        self.jax, self.jnp = jax, jnp
        sd = {k: np.asarray(v, dtype=dtype) for k, v in state_dict.items()}
        names = list(sd)
        lax = jax.lax
        if kind == "mlp":
            ws = [n for n in names if n.endswith("weight")]
            self.init = (
                jnp.asarray(np.stack([sd[n] for n in ws])),
                jnp.asarray(np.stack([sd[n[:-6] + "bias"] for n in ws])),
            )

            def loss(p, xb, yb):
                def layer(h, wb):
                    return jnp.tanh(h @ wb[0].T + wb[1]), None

                h, _ = lax.scan(layer, xb, p)
                return jnp.mean((h - yb) ** 2)

            def norms(g):  # torch's order: weight and bias of each layer in turn
                n = [jnp.sqrt(jnp.sum(a.reshape(a.shape[0], -1) ** 2, axis=1)) for a in g]
                return jnp.stack(n, axis=1).reshape(-1)
        else:
            H, k = hidden, truncate
            self.init = tuple(jnp.asarray(sd[n]) for n in names)

            def step(carry, a, w_hh):
                h, c = carry
                g = a + h @ w_hh.T
                i, f = jax.nn.sigmoid(g[:, :H]), jax.nn.sigmoid(g[:, H : 2 * H])
                gg, o = jnp.tanh(g[:, 2 * H : 3 * H]), jax.nn.sigmoid(g[:, 3 * H :])
                c = f * c + i * gg
                return (o * jnp.tanh(c), c), None

            def loss(p, xb, yb):
                w_ih, w_hh, b_ih, b_hh, w_o, b_o = p
                a = xb @ w_ih.T + b_ih + b_hh
                zero = jnp.zeros((xb.shape[1], H), xb.dtype)
                carry = (zero, zero)
                for t0 in range(0, xb.shape[0], k):
                    carry = lax.stop_gradient(carry)
                    carry, _ = lax.scan(lambda s, at: step(s, at, w_hh), carry, a[t0 : t0 + k])
                return jnp.mean((carry[0] @ w_o.T + b_o - yb) ** 2)

            def norms(g):
                return jnp.stack([jnp.sqrt(jnp.sum(a * a)) for a in g])

        lr = opt_kw.get("lr", 1e-3)
        b1, b2 = opt_kw.get("betas", (0.9, 0.999))
        eps, mom = opt_kw.get("eps", 1e-8), opt_kw.get("momentum", 0.0)
        tree = jax.tree_util.tree_map
        X, Y = jnp.asarray(np.asarray(x)), jnp.asarray(np.asarray(y))
        seq = kind == "lstm"

        def update(p, s, g, t):
            if optimizer == "SGD":  # torch: buf = g at the first step, then mom * buf + g
                (buf,) = s
                buf = tree(lambda b_, g_: mom * b_ + g_, buf, g)
                return tree(lambda p_, b_: p_ - lr * b_, p, buf), (buf,)
            m, v = s
            m = tree(lambda m_, g_: b1 * m_ + (1 - b1) * g_, m, g)
            v = tree(lambda v_, g_: b2 * v_ + (1 - b2) * g_ * g_, v, g)
            tf = t.astype(X.dtype)
            c1, c2 = 1 - b1**tf, 1 - b2**tf
            p = tree(lambda p_, m_, v_: p_ - (lr / c1) * m_ / (jnp.sqrt(v_) / jnp.sqrt(c2) + eps),
                     p, m, v)  # fmt: skip
            return p, (m, v)

        def train(p0, order):
            zeros = tree(jnp.zeros_like, p0)
            s0 = (zeros,) if optimizer == "SGD" else (zeros, zeros)

            def one(carry, it):
                p, s = carry
                idx, t = it
                xb = X[:, idx] if seq else X[idx]
                value, g = jax.value_and_grad(loss)(p, xb, Y[idx])
                n = norms(g)
                total = jnp.sqrt(jnp.sum(n * n))
                coef = jnp.minimum(max_norm / (total + 1e-6), 1.0).astype(X.dtype)
                g = tree(lambda a: a * coef, g)
                p, s = update(p, s, g, t)
                return (p, s), (value, total, n)

            steps = jnp.arange(1, order.shape[0] + 1)
            _, out = lax.scan(one, (p0, s0), (order, steps))
            return out

        self.fn = jax.jit(train)
        self.compiled, self.compile_s = {}, None

    def __call__(self, order):
        import time

        order = self.jnp.asarray(np.asarray(order))
        key = order.shape
        if key not in self.compiled:
            t0 = time.perf_counter()
            self.compiled[key] = self.fn.lower(self.init, order).compile()
            self.compile_s = time.perf_counter() - t0
        out = self.jax.block_until_ready(self.compiled[key](self.init, order))
        return tuple(np.asarray(a, dtype=np.float64) for a in out)
