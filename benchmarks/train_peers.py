"""PyTorch peers for the training benchmarks (run in peers.TorchProcess).

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
