"""Shared fixtures and randomly drawn chain configurations for the gradchain tests."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings

try:
    import torch
except ImportError:  # the NumPy-reference tests still run
    torch = None
needs_torch = pytest.mark.skipif(
    torch is None, reason="PyTorch is the oracle here: pip install torch==2.13.0"
)

sys.path.insert(0, os.path.dirname(__file__))  # make `import oracles` work everywhere

import oracles

# Hypothesis profiles. "ci" (the default) is reproducible (a fixed seed, no example
# database) and reports a failing example as found, without minutes of shrinking; every
# example prints its reproducer anyway. "long" (`pytest --hypothesis-profile=long`) draws
# fresh examples on every run, 32 times as many (the fuzz suite then runs about 100,000: the
# bad-input tests exhaust their small spaces sooner), and shrinks each failure to a minimal one.
_PROFILE = {"deadline": None, "print_blob": True, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    max_examples=100,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    **_PROFILE,
)
settings.register_profile("long", max_examples=3200, **_PROFILE)
# Under AddressSanitizer (README, "Sanitizers"): a tenth of the ci profile's examples.
settings.register_profile("sanitize", parent=settings.get_profile("ci"), max_examples=10)
if settings.get_current_profile_name() == "default":  # no --hypothesis-profile given
    settings.load_profile("ci")


def fuzz_examples(n: int) -> int:
    """max_examples for a test that runs `n` examples under the ci profile, scaled with the
    loaded profile's max_examples."""
    return max(1, round(n * settings.default.max_examples / 100))


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
    for c in draw_configs(
        n=40, seed=7_000_001, depths=(6, 13), widths_range=(30, 65), batches=(4, 17)
    )
    if sum(c.batch * a * b for a, b in zip(c.widths[:-1], c.widths[1:])) >= 2**16
][:24]


# --------------------------------------------------------------------------------------
# chains of blocks: random descriptions (plain dicts, see oracles.py) with readable ids
# --------------------------------------------------------------------------------------
NORM_KINDS = ("layer_norm", "rms_norm", "batch_norm")


def core_has(kind: str) -> bool:
    """Whether this build's core has a block kind (the norm layers come with their own
    files in the core)."""
    spec = {
        "layer_norm": {"kind": "layer_norm", "width": 3, "eps": 1e-5, "elementwise_affine": True, "bias": True},
        "rms_norm": {"kind": "rms_norm", "width": 3, "eps": None, "elementwise_affine": True},
        "batch_norm": {
            "kind": "batch_norm", "width": 3, "eps": 1e-5, "momentum": 0.1, "affine": True,
            "track_running_stats": True,
        },
    }[kind]  # fmt: skip
    try:
        import gradchain as gc

        gc._core.Chain64([spec])
    except ValueError as exc:
        if "block kind must be one of" in str(exc):
            return False
        raise
    return True


HAS_NORMS = all(core_has(k) for k in NORM_KINDS)
needs_norms = pytest.mark.skipif(not HAS_NORMS, reason="this build's core has no norm blocks")


# --------------------------------------------------------------------------------------
# random chains: plain descriptions (see oracles.py), gc blocks built from them
# --------------------------------------------------------------------------------------
def gc_block(d):
    """The gradchain block of a description (see oracles.py)."""
    import gradchain as gc

    k = d["kind"]
    if k == "linear":
        return gc.Linear(d["in"], d["out"], bias=d["bias"])
    if k == "activation":
        return gc.Activation(d["name"], negative_slope=d["negative_slope"], alpha=d["alpha"])
    if k == "scale":
        return gc.Scale(d["value"])
    if k == "layer_norm":
        return gc.LayerNorm(d["n"], eps=d["eps"], elementwise_affine=d["affine"], bias=d["bias"])
    if k == "rms_norm":
        return gc.RMSNorm(d["n"], eps=d["eps"], elementwise_affine=d["affine"])
    if k == "batch_norm":
        return gc.BatchNorm(
            d["n"],
            eps=d["eps"],
            momentum=d["momentum"],
            affine=d["affine"],
            track_running_stats=d["track"],
        )
    if k == "residual":
        sc = False if d["shortcut"] is None else gc_block(d["shortcut"])
        return gc.Residual([gc_block(b) for b in d["body"]], scale=d["scale"], shortcut=sc)
    raise ValueError(k)


def block_kinds(descs):
    out = set()
    for d in descs:
        out.add(d["kind"])
        if d["kind"] == "residual":
            out |= block_kinds(d["body"])
            if d["shortcut"] is not None:
                out.add("linear")
    return out


def _linear(rng, n, m=None):
    return {
        "kind": "linear",
        "in": n,
        "out": int(m or rng.integers(3, 9)),
        "bias": bool(rng.random() < 0.7),
    }


def _activation(rng):
    return {
        "kind": "activation",
        "name": str(rng.choice(ACTIVATIONS)),
        "negative_slope": float(rng.choice([0.01, 0.2])),
        "alpha": float(rng.choice([1.0, 0.7])),
    }


def _norm(rng, kind, n):
    if kind == "layer_norm":
        return {
            "kind": kind,
            "n": n,
            "eps": float(rng.choice([1e-5, 0.1])),
            "affine": bool(rng.random() < 0.8),
            "bias": bool(rng.random() < 0.7),
        }
    if kind == "rms_norm":
        return {
            "kind": kind,
            "n": n,
            "eps": None if rng.random() < 0.5 else 1e-3,
            "affine": bool(rng.random() < 0.8),
        }
    return {
        "kind": kind, "n": n, "eps": float(rng.choice([1e-5, 0.01])),
        "momentum": None if rng.random() < 0.3 else float(rng.choice([0.1, 0.5])),
        "affine": bool(rng.random() < 0.8), "track": bool(rng.random() < 0.8),
    }  # fmt: skip


def draw_blocks(rng, n, count, norms, level=0):
    """`count` block descriptions taking width n; returns (descs, out width)."""
    out = []
    kinds = ["linear", "activation", "activation", "scale", "residual"] + (
        list(NORM_KINDS) if norms else []
    )
    for _ in range(count):
        k = str(rng.choice(kinds))
        if k == "residual" and level >= 2:
            k = "linear"
        if k in NORM_KINDS and n < 2:
            k = "linear"
        if k == "linear":
            d = _linear(rng, n)
            n = d["out"]
        elif k == "activation":
            d = _activation(rng)
        elif k == "scale":
            d = {"kind": "scale", "value": float(rng.choice([0.5, -1.5, 2.0]))}
        elif k == "residual":
            body, m = draw_blocks(rng, n, int(rng.integers(1, 4)), norms, level + 1)
            sc = _linear(rng, n, m) if (m != n or rng.random() < 0.2) else None
            d = {
                "kind": "residual",
                "body": body,
                "scale": float(rng.choice([1.0, 0.5, -0.3])),
                "shortcut": sc,
            }
            n = m
        else:
            d = _norm(rng, k, n)
        out.append(d)
    return out, n


def _templates(rng, n, norms):
    """Pre-norm and post-norm residual stacks and a batch-normalised MLP, as written in
    papers, besides the free-form draws."""
    if not norms:
        return None
    kind = str(rng.choice(["pre", "post", "bn"]))
    lin = _linear(rng, n, n)
    if kind == "pre":
        body = [
            _norm(rng, "layer_norm", n),
            _linear(rng, n, 2 * n),
            _activation(rng),
            _linear(rng, 2 * n, n),
        ]
        return [{"kind": "residual", "body": body, "scale": 0.5, "shortcut": None}] * 2 + [
            _norm(rng, "layer_norm", n),
            lin,
        ]
    if kind == "post":
        body = [_linear(rng, n, n), _activation(rng)]
        return [
            {"kind": "residual", "body": body, "scale": 1.0, "shortcut": None},
            _norm(rng, "rms_norm", n),
        ] * 2 + [lin]
    return [_linear(rng, n, n), _norm(rng, "batch_norm", n), _activation(rng)] * 2 + [lin]


class ChainCase:
    def __init__(self, seed, norms):
        rng = np.random.default_rng(seed)
        self.seed = seed
        n0 = int(rng.integers(3, 8))
        descs = _templates(rng, n0, norms) if rng.random() < 0.3 else None
        if descs is None:
            descs, _ = draw_blocks(rng, n0, int(rng.integers(2, 8)), norms)
            descs = [_linear(rng, n0, n0), *descs]  # a stated input width
        self.descs = descs
        self.n0 = n0
        self.batch = int(rng.integers(2, 7))
        self.loss = str(rng.choice(["probe", "mse", "cross_entropy", "grad_output"]))
        self.train = bool(rng.random() < 0.6)
        self.max_norm = None if rng.random() < 0.6 else float(rng.choice([0.01, 0.5, 1e3]))
        self.norm_type = float(rng.choice([2.0, 1.0, math.inf]))
        self.kinds = block_kinds(descs)
        self.id = (
            f"s{seed}-"
            + "-".join(sorted(k[:3] for k in self.kinds))
            + f"-{self.loss}-{'train' if self.train else 'eval'}"
        )

    def blocks(self):
        return [gc_block(d) for d in self.descs]

    def chain(self, dtype="float64"):
        import gradchain as gc

        net = gc.Chain(
            self.blocks(), init="he_normal", gain=0.9, bias_std=0.2, seed=self.seed, dtype=dtype
        )
        net.load_state_dict(random_state(net.state_dict(), self.seed))
        return net.train(self.train)

    def data(self, out):
        rng = np.random.default_rng(self.seed + 1)
        x = rng.normal(size=(self.batch, self.n0))
        kw = {}
        if self.loss == "mse":
            kw["target"] = rng.normal(size=(self.batch, out))
        elif self.loss == "cross_entropy":
            kw["target"] = rng.integers(0, out, size=self.batch)
        elif self.loss == "grad_output":
            kw["grad_output"] = rng.normal(size=(self.batch, out))
        return x, kw


def random_state(sd, seed):
    """Random values for every parameter and buffer (norm weights near 1, running
    variances positive), so that no parameter sits at a special value."""
    rng = np.random.default_rng(seed + 7)
    out = {}
    for k, a in sd.items():
        if k.endswith("num_batches_tracked"):
            out[k] = np.asarray(int(rng.integers(0, 5)), dtype=np.int64)
        elif k.endswith("running_var"):
            out[k] = rng.uniform(0.5, 2.0, size=a.shape)
        elif k.endswith("running_mean"):
            out[k] = 0.3 * rng.normal(size=a.shape)
        elif a.ndim == 2:
            out[k] = rng.normal(size=a.shape) * 0.8 / math.sqrt(a.shape[1])
        elif k.endswith("weight"):
            out[k] = 1.0 + 0.3 * rng.normal(size=a.shape)
        else:
            out[k] = 0.2 * rng.normal(size=a.shape)
    return out


def out_width(descs, n):
    """The output width of described blocks taking width n."""
    for d in descs:
        if d["kind"] == "linear":
            n = d["out"]
        elif d["kind"] == "residual":
            n = out_width(d["body"], n)
    return n


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
