"""PyTorch peers for the chains-of-blocks benchmarks (run in peers.TorchProcess).

Each peer builds the torch model gradchain's chain corresponds to, loads the chain's
``state_dict`` (torch names), and on a call runs a forward pass that keeps every top-level
block output (``retain_grad``), the probe loss ``0.5 * ||h_L||^2``, ``loss.backward()`` and
``torch._foreach_norm`` over every parameter gradient and every block-boundary gradient:
the same numbers gradchain's ``backward`` reports.
"""

from __future__ import annotations

import numpy as np


def _modules():
    import torch
    from torch import nn

    class PreNormBlock(nn.Module):
        """x + scale * Linear(ReLU(Linear(LayerNorm(x)))), named as gradchain's
        ``Residual([LayerNorm, Linear, Activation, Linear])``: ``block.0`` ... ``block.3``."""

        def __init__(self, width, hidden, scale):
            super().__init__()
            self.block = nn.Sequential(
                nn.LayerNorm(width), nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width)
            )
            self.scale = scale

        def forward(self, x):
            return x + self.scale * self.block(x)

    return torch, nn, PreNormBlock


class TorchBlockChain:
    """A top-level ``nn.Sequential`` whose outputs are kept; ``kind`` names the model:

    * ``"prenorm"``: ``blocks`` pre-norm residual blocks (LayerNorm, Linear width->hidden,
      ReLU, Linear hidden->width), residual scale ``scale``;
    * ``"batchnorm"``: ``depth`` layers of Linear(width, width), BatchNorm1d(width) in train
      mode, Tanh.
    """

    def __init__(self, kind, state_dict, dtype, **kw):
        torch, nn, PreNormBlock = _modules()
        self.torch = torch
        tdtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
        if kind == "prenorm":
            mods = [PreNormBlock(kw["width"], kw["hidden"], kw["scale"]) for _ in range(kw["blocks"])]
        elif kind == "batchnorm":
            mods = []
            for _ in range(kw["depth"]):
                mods += [nn.Linear(kw["width"], kw["width"]), nn.BatchNorm1d(kw["width"]), nn.Tanh()]
        else:
            raise ValueError(f"unknown kind {kind!r}")
        self.model = nn.Sequential(*mods).to(tdtype)
        self.model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state_dict.items()})
        self.model.train()
        self.params = [p for _, p in self.model.named_parameters()]
        self.dtype = tdtype

    def __call__(self, x):
        torch = self.torch
        for p in self.params:
            p.grad = None
        h = torch.tensor(np.asarray(x), dtype=self.dtype).requires_grad_()
        hs = [h]
        for m in self.model:
            h = m(h)
            h.retain_grad()
            hs.append(h)
        loss = 0.5 * (h * h).sum()
        loss.backward()
        with torch.no_grad():
            pn = torch.stack(torch._foreach_norm([p.grad for p in self.params]))
            an = torch.stack(torch._foreach_norm([t.grad for t in hs]))
        return pn.double().numpy(), an.double().numpy()
