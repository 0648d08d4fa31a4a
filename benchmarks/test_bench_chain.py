"""gradchain.Chain.backward on chains of blocks against PyTorch autograd and the GEMM floor.

Two chains, each with every parameter-gradient norm and every top-level block-boundary
gradient norm (the probe loss ``0.5 * ||h_L||^2``):

* ``prenorm48-w256-h1024-b64-f32``: 48 pre-norm residual blocks
  ``x + 0.1 * Linear(ReLU(Linear(LayerNorm(x))))`` (256 -> 1024 -> 256), batch 64, float32.
  Its floor is the six (64 x 256) @ (256 x 1024)-sized products of a block (two forward,
  four backward) at the best rate NumPy's GEMM reaches in the same run.
* ``bn1000-w64-b32-tanh-f64``: 1000 layers of Linear(64, 64), train-mode BatchNorm(64),
  Tanh, batch 32, float64.

PyTorch runs the same modules (``chain_peers.TorchBlockChain``) in its own process, with
``retain_grad`` on every block output and ``torch._foreach_norm``; its norms are checked
against gradchain's before and after timing. conftest.py prints the ratios.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest

gc = pytest.importorskip("gradchain")


@dataclass(frozen=True)
class Config:
    id: str
    kind: str
    dtype: str
    batch: int
    kw: dict
    speedup_targets: dict = field(default_factory=dict)
    floor_target: float | None = None
    rounds: int = 5

    @property
    def rtol(self) -> float:
        return 1e-8 if self.dtype == "float64" else 2e-3


CONFIGS = [
    Config(
        "prenorm48-w256-h1024-b64-f32", "prenorm", "float32", 64,
        {"blocks": 48, "width": 256, "hidden": 1024, "scale": 0.1},
        speedup_targets={"torch": 2.0}, floor_target=1.3,
    ),
    Config(
        "bn1000-w64-b32-tanh-f64", "batchnorm", "float64", 32, {"depth": 1000, "width": 64},
        speedup_targets={"torch": 5.0}, rounds=5,
    ),
]  # fmt: skip


def build(cfg: Config):
    if cfg.kind == "prenorm":
        w, h = cfg.kw["width"], cfg.kw["hidden"]
        blocks = [
            gc.Residual(
                [gc.LayerNorm(w), gc.Linear(w, h), gc.Activation("relu"), gc.Linear(h, w)],
                scale=cfg.kw["scale"],
            )
            for _ in range(cfg.kw["blocks"])
        ]
        width = w
    else:
        w = cfg.kw["width"]
        blocks = [
            b
            for _ in range(cfg.kw["depth"])
            for b in (gc.Linear(w, w), gc.BatchNorm(w), gc.Activation("tanh"))
        ]
        width = w
    net = gc.Chain(blocks, init="he_normal", seed=0, dtype=cfg.dtype)
    x = np.random.default_rng(1).standard_normal((cfg.batch, width)).astype(cfg.dtype)
    return net, x


@dataclass
class Case:
    cfg: Config
    net: object
    x: np.ndarray
    state: dict
    param: np.ndarray  # gradchain's parameter-gradient norms, in torch's order
    act: np.ndarray  # and its block-boundary ones


_cases: dict[str, Case] = {}


def get_case(cfg: Config) -> Case:
    if cfg.id not in _cases:
        net, x = build(cfg)
        state = net.state_dict()  # before the pass: running statistics as torch starts
        rep = net.backward(x)
        param = np.array([rep.param_grad_norms[n] for n in net.param_names])
        act = np.asarray(rep.activation_grad_norms, dtype=np.float64)
        assert np.all(np.isfinite(param)) and np.all(np.isfinite(act))
        net.load_state_dict(state)
        _cases[cfg.id] = Case(cfg, net, x, state, param, act)
    return _cases[cfg.id]


def check(got, case: Case, who: str) -> None:
    pn, an = got
    if case.cfg.kind == "batchnorm":
        # A deep train-mode BatchNorm chain is chaotic (Yang et al. 2019): two correct
        # float64 passes whose batch statistics round differently drift apart over 1000
        # layers, and so do their gradients (by a factor of 2 or so at 10^46). Their growth
        # rate, the quantity the chain is simulated for, agrees; the exact comparison runs
        # at depth 30 in the tests (tests/test_norm_blocks.py).
        def rate(a):
            la = np.log10(a)
            return np.polyfit(np.arange(la.size), la, 1)[0]

        assert np.all(np.isfinite(pn)) and np.all(np.isfinite(an)), who
        assert rate(an[::-1]) == pytest.approx(rate(case.act[::-1]), rel=0.02), who
        return
    np.testing.assert_allclose(pn, case.param, rtol=case.cfg.rtol, err_msg=f"{who}: parameters")
    np.testing.assert_allclose(an, case.act, rtol=case.cfg.rtol, err_msg=f"{who}: boundaries")


def tag(benchmark, cfg: Config, impl: str, **extra) -> None:
    benchmark.group = cfg.id
    benchmark.extra_info.update(impl=impl, config=cfg.id, **extra)


def by_id(configs):
    return pytest.mark.parametrize("cfg", configs, ids=[c.id for c in configs])


@by_id(CONFIGS)
def test_gradchain(benchmark, cfg):
    case = get_case(cfg)
    net, x = case.net, case.x

    # A train-mode pass updates BatchNorm's running statistics, which the gradients do not
    # read: no reset between calls (nor in torch's peer).
    tag(benchmark, cfg, "gradchain")
    rep = benchmark.pedantic(net.backward, args=(x,), rounds=max(cfg.rounds, 10), iterations=1,
                             warmup_rounds=1)  # fmt: skip
    got = (
        np.array([rep.param_grad_norms[n] for n in net.param_names]),
        np.asarray(rep.activation_grad_norms, dtype=np.float64),
    )
    check(got, case, "gradchain (timed run)")


FLOOR_CONFIGS = [c for c in CONFIGS if c.floor_target is not None]


@by_id(FLOOR_CONFIGS)
def test_gemm_floor(benchmark, cfg):
    """One (batch x width) @ (width x hidden) GEMM, timed many times; the floor is six of
    them per block at the best rate measured."""
    dt = np.dtype(cfg.dtype)
    rng = np.random.default_rng(2)
    w, h = cfg.kw["width"], cfg.kw["hidden"]
    a = rng.standard_normal((cfg.batch, w)).astype(dt)
    b = rng.standard_normal((w, h)).astype(dt)
    c = np.empty((cfg.batch, h), dt)
    gemm_flop = 2 * cfg.batch * w * h
    gemms = 6 * cfg.kw["blocks"]
    tag(benchmark, cfg, "gemm-floor", gemm_flop=gemm_flop, gemms_per_pass=gemms,
        target_ratio=cfg.floor_target)  # fmt: skip
    out = benchmark.pedantic(np.matmul, args=(a, b), kwargs={"out": c}, rounds=300,
                             iterations=1, warmup_rounds=20)  # fmt: skip
    np.testing.assert_allclose(out[:2], a[:2] @ b, rtol=1e-4, atol=1e-3)
    best = benchmark.stats.stats.min if benchmark.stats else math.nan
    benchmark.extra_info["gemm_gflops"] = gemm_flop / best / 1e9
    benchmark.extra_info["floor_s"] = gemms * best


@by_id(CONFIGS)
def test_torch(benchmark, cfg, torch_peer):
    case = get_case(cfg)
    try:  # PyTorch runs in a worker process: see peers.TorchProcess
        info = torch_peer.build(
            "chain_peers", "TorchBlockChain", cfg.kind, case.state, cfg.dtype, **cfg.kw
        )
    except ImportError as exc:
        pytest.skip(str(exc))
    check(torch_peer.run(case.x), case, "torch")  # validation (and warm-up), not timed
    tag(benchmark, cfg, "torch", target_speedup=cfg.speedup_targets.get("torch"),
        torch_threads=info["threads"], torch_version=info["torch"])  # fmt: skip
    got = benchmark.pedantic(torch_peer.run, args=(case.x,), rounds=cfg.rounds, iterations=1,
                             warmup_rounds=1)  # fmt: skip
    check(got, case, "torch (timed run)")
