"""Shared fixtures and randomly drawn chain configurations for the gradchain tests."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import numpy as np
import pytest

try:
    import torch
except ImportError:  # the NumPy-reference tests still run
    torch = None
needs_torch = pytest.mark.skipif(
    torch is None, reason="PyTorch is the oracle here: pip install torch==2.13.0"
)

sys.path.insert(0, os.path.dirname(__file__))  # make `import oracles` work everywhere

import oracles

ACTIVATIONS = oracles.ACTIVATIONS
INITS = oracles.INITS
LOSSES = oracles.LOSSES
SATURATING = ("tanh", "gelu", "gelu_tanh", "silu", "elu", "softplus")


@dataclass(frozen=True)
class ChainConfig:
    activation: str
    init: str
    widths: tuple
    batch: int
    loss: str
    gain: float = 1.0
    bias_std: float = 0.0
    sigma_w: float = 1.0
    negative_slope: float = 0.01
    alpha: float = 1.0
    input_scale: float = 1.0
    seed: int = 0
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def depth(self) -> int:
        return len(self.widths) - 1

    @property
    def id(self) -> str:
        w = ",".join(str(v) for v in self.widths)
        tag = f"-bias{self.bias_std:.2g}" if self.bias_std else ""
        return (
            f"{self.activation}-{self.init}-d{self.depth}-w[{w}]-b{self.batch}-{self.loss}"
            f"{tag}-s{self.seed}"
        )

    def act_kwargs(self) -> dict:
        return {"negative_slope": self.negative_slope, "alpha": self.alpha}

    def make_net(self, gc, dtype="float64"):
        return gc.MLP(
            depth=None,
            width=list(self.widths),
            activation=self.activation,
            init=self.init,
            gain=self.gain,
            bias_std=self.bias_std,
            sigma_w=self.sigma_w,
            negative_slope=self.negative_slope,
            alpha=self.alpha,
            dtype=dtype,
            seed=self.seed,
        )

    def make_data(self):
        """x and the loss arguments (target / grad_output) for this configuration, as the
        keyword arguments of ``MLP.backward`` and of the oracles."""
        rng = np.random.default_rng(10_000 + self.seed)
        x = rng.normal(size=(self.batch, self.widths[0])) * self.input_scale
        out = self.widths[-1]
        kw = {}
        if self.loss == "mse":
            kw["target"] = rng.normal(size=(self.batch, out))
        elif self.loss == "cross_entropy":
            kw["target"] = rng.integers(0, out, size=self.batch).astype(np.int64)
        elif self.loss == "grad_output":
            kw["grad_output"] = rng.normal(size=(self.batch, out))
        return x, kw


def _gain_for(rng, activation, init):
    """A gain that keeps the chain ordered / near-critical (no chaos), so rounding is not
    amplified over depth."""
    if activation == "sigmoid":
        return float(rng.uniform(1.0, 3.0))  # sigmoid' <= 1/4: needs larger weights
    if init in ("he_normal", "he_uniform"):
        if activation in ("relu", "leaky_relu"):
            return float(rng.uniform(0.8, 1.05))
        return float(rng.uniform(0.45, 0.7))  # He = sqrt(2) * LeCun
    return float(rng.uniform(0.6, 1.0))


def draw_configs(
    n: int = 52,
    seed: int = 20240611,
    depths: tuple[int, int] = (1, 13),
    widths_range: tuple[int, int] = (1, 21),
    batches: tuple[int, int] = (1, 10),
) -> list[ChainConfig]:
    """Seeded random configurations covering every activation x every loss (the first 40),
    every init several times, depth 1..12, widths 1..20, batch 1..9."""
    rng = np.random.default_rng(seed)
    pairs = [(a, lo) for a in ACTIVATIONS for lo in LOSSES]
    rng.shuffle(pairs)
    while len(pairs) < n:
        pairs.append((ACTIVATIONS[rng.integers(len(ACTIVATIONS))], LOSSES[rng.integers(4)]))
    inits = [INITS[i % len(INITS)] for i in range(n)]
    rng.shuffle(inits)
    out = []
    for k, ((act, loss), init) in enumerate(zip(pairs, inits)):
        depth = int(rng.integers(*depths))
        widths = [int(v) for v in rng.integers(*widths_range, size=depth + 1)]
        if loss == "cross_entropy" and k % 5:
            widths[-1] = max(widths[-1], 2)  # a few single-class (zero-gradient) cases stay
        out.append(
            ChainConfig(
                activation=act,
                init=init,
                widths=tuple(widths),
                batch=int(rng.integers(*batches)),
                loss=loss,
                gain=_gain_for(rng, act, init),
                bias_std=0.0 if rng.random() < 0.4 else float(rng.uniform(0.05, 0.6)),
                sigma_w=float(rng.uniform(0.6, 1.0)) if init == "normal" else 1.0,
                negative_slope=float(rng.choice([0.01, 0.2])),
                alpha=float(rng.choice([1.0, 0.6])),
                input_scale=float(rng.choice([1.0, 1.0, 3.0])),
                seed=int(rng.integers(0, 2**31)),
            )
        )
    return out


CONFIGS = draw_configs()
# Large enough (>= 2^16 multiply-adds a pass, batch >= 2) that the core splits the forward
# pass across two threads and pipelines the backward pass.
THREADED_CONFIGS = [
    c
    for c in draw_configs(n=40, seed=7_000_001, depths=(6, 13), widths_range=(30, 65), batches=(4, 17))
    if sum(c.batch * a * b for a, b in zip(c.widths[:-1], c.widths[1:])) >= 2**16
][:24]


@pytest.fixture(scope="session")
def gc():
    import gradchain

    return gradchain


@pytest.fixture(params=CONFIGS, ids=[c.id for c in CONFIGS])
def config(request) -> ChainConfig:
    return request.param


@pytest.fixture
def rng(request):
    """A generator seeded from the test's node id: reproducible, different per test."""
    import zlib

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
