"""gradchain.MLP.backward against a NumPy loop, PyTorch autograd and the GEMM floor.

Run with ``pytest benchmarks/`` (see benchmarks/README.md).  Every configuration is a
pytest-benchmark group; the ratio table printed at the end comes from conftest.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import peers
import pytest

gc = pytest.importorskip("gradchain")


@dataclass(frozen=True)
class Config:
    id: str
    depth: int
    width: int
    batch: int
    dtype: str
    activation: str = "tanh"
    # Targets: peer median / gradchain median must be >= target (None: no target).
    speedup_targets: dict = field(default_factory=dict)
    # gradchain median / GEMM floor must be <= this (None: no floor entry).
    floor_target: float | None = None
    # Rounds for the slow peers (benchmark.pedantic); None = pytest-benchmark's calibration.
    peer_rounds: dict = field(default_factory=dict)

    @property
    def rtol(self) -> float:
        return 1e-8 if self.dtype == "float64" else 1e-3


CONFIGS = [
    Config(
        "d1000-w64-b32-tanh-f64", 1000, 64, 32, "float64",
        speedup_targets={"numpy": 5.0, "torch": 50.0},
        floor_target=2.0,
        peer_rounds={"numpy": None, "torch": None, "jax": None},
    ),
    Config(
        "d10000-w32-b16-tanh-f64", 10_000, 32, 16, "float64",
        speedup_targets={"numpy": 5.0, "torch": 100.0},
        floor_target=2.5,
        peer_rounds={"numpy": 5, "torch": 3, "jax": 5},
    ),
    Config(
        "d100-w1024-b128-tanh-f32", 100, 1024, 128, "float32",
        speedup_targets={"numpy": None, "torch": 1.0},
        floor_target=1.3,
        peer_rounds={"numpy": 5, "torch": 5, "jax": 5},
    ),
]

NORM_FIELDS = ("weight_grad_norms", "bias_grad_norms", "activation_grad_norms")


def by_id(configs):
    return pytest.mark.parametrize("cfg", configs, ids=[c.id for c in configs])


@dataclass
class Case:
    cfg: Config
    net: object
    x: np.ndarray
    weights: list
    biases: list
    ref: dict  # gradchain's norms, computed once


_cases: dict[str, Case] = {}


def get_case(cfg: Config) -> Case:
    """The chain, input and gradchain's reference norms of a configuration (built once)."""
    if cfg.id not in _cases:
        net = gc.MLP(
            depth=cfg.depth, width=cfg.width, activation=cfg.activation,
            init="xavier_normal", dtype=cfg.dtype, seed=0,
        )
        x = np.random.default_rng(1).standard_normal((cfg.batch, cfg.width)).astype(cfg.dtype)
        rep = net.backward(x)
        ref = {f: np.asarray(getattr(rep, f), dtype=np.float64) for f in NORM_FIELDS}
        for f, a in ref.items():
            assert np.all(np.isfinite(a)) and np.all(a > 0), f"gradchain {f} not finite and > 0"
        weights = [np.array(w) for w in net.weights]
        biases = [np.array(b) for b in net.biases]
        _cases[cfg.id] = Case(cfg, net, x, weights, biases, ref)
    return _cases[cfg.id]


def check_norms(got, case: Case, who: str) -> None:
    cfg = case.cfg
    for f in NORM_FIELDS:
        a = np.asarray(getattr(got, f), dtype=np.float64)
        n = cfg.depth + 1 if f == "activation_grad_norms" else cfg.depth
        assert a.shape == (n,), f"{who}: {f} has shape {a.shape}"
        np.testing.assert_allclose(a, case.ref[f], rtol=cfg.rtol,
                                   err_msg=f"{who} vs gradchain: {f}")


def tag(benchmark, cfg: Config, impl: str, **extra) -> None:
    benchmark.group = cfg.id
    benchmark.extra_info.update(impl=impl, config=cfg.id, **extra)


def run(benchmark, fn, arg, rounds):
    if rounds is None:
        return benchmark(fn, arg)
    return benchmark.pedantic(fn, args=(arg,), rounds=rounds, iterations=1, warmup_rounds=0)


# --------------------------------------------------------------------------- gradchain


@by_id(CONFIGS)
def test_gradchain(benchmark, cfg):
    case = get_case(cfg)
    tag(benchmark, cfg, "gradchain")
    rep = benchmark(case.net.backward, case.x)
    check_norms(rep, case, "gradchain (timed run)")


# --------------------------------------------------------------------------- NumPy


@by_id(CONFIGS)
def test_numpy(benchmark, cfg):
    case = get_case(cfg)
    peer = peers.NumpyChain(case.weights, case.biases, cfg.activation)
    check_norms(peer(case.x), case, "numpy")  # validation (and warm-up), not timed
    tag(benchmark, cfg, "numpy", target_speedup=cfg.speedup_targets.get("numpy"))
    got = run(benchmark, peer, case.x, cfg.peer_rounds.get("numpy"))
    check_norms(got, case, "numpy (timed run)")


# --------------------------------------------------------------------------- GEMM floor

FLOOR_CONFIGS = [c for c in CONFIGS if c.floor_target is not None]


# The GEMM whose rate sets the floor: large enough to run at the BLAS's peak.
FLOOR_GEMM_N = 1024


@by_id(FLOOR_CONFIGS)
def test_gemm_floor(benchmark, cfg):
    """One large (1024 x 1024) @ (1024 x 1024) GEMM of the configuration's dtype in NumPy.

    The floor of a forward + backward pass is its products' FLOPs, 3 per layer (h W^T,
    dz^T h, dz W): 6 * batch * n^2 * depth, at the best rate this large GEMM reached in the
    same run (NumPy's OpenBLAS on all cores). conftest.py turns this entry into the floor
    and the ratio.
    """
    dt = np.dtype(cfg.dtype)
    rng = np.random.default_rng(2)
    n = FLOOR_GEMM_N
    a = rng.standard_normal((n, n)).astype(dt)
    b = rng.standard_normal((n, n)).astype(dt)
    c = np.empty((n, n), dt)
    pass_flop = 6 * cfg.batch * cfg.width * cfg.width * cfg.depth
    tag(benchmark, cfg, "gemm-floor", gemm_flop=2 * n**3, pass_flop=pass_flop,
        target_ratio=cfg.floor_target)
    out = benchmark.pedantic(np.matmul, args=(a, b), kwargs={"out": c},
                             rounds=20, iterations=1, warmup_rounds=3)
    np.testing.assert_allclose(out[:2, :8], a[:2] @ b[:, :8], rtol=1e-3, atol=1e-2)
    best = benchmark.stats.stats.min if benchmark.stats else math.nan
    rate = 2 * n**3 / best
    benchmark.extra_info["gemm_gflops"] = rate / 1e9
    benchmark.extra_info["floor_s"] = pass_flop / rate


# --------------------------------------------------------------------------- PyTorch
# (last: its worker process starts with the first of these)


@by_id(CONFIGS)
def test_torch(benchmark, cfg, torch_peer):
    case = get_case(cfg)
    try:  # PyTorch runs in a worker process: see peers.TorchProcess
        info = torch_peer.load(case.weights, case.biases, cfg.activation)
    except ImportError as exc:
        pytest.skip(str(exc))
    check_norms(torch_peer(case.x), case, "torch")  # validation (and warm-up), not timed
    tag(benchmark, cfg, "torch", target_speedup=cfg.speedup_targets.get("torch"),
        torch_threads=info["threads"], torch_version=info["torch"])
    got = run(benchmark, torch_peer, case.x, cfg.peer_rounds.get("torch"))
    check_norms(got, case, "torch (timed run)")


# --------------------------------------------------------------------------- JAX
# (after PyTorch, in the worker process of conftest.jax_peer)


@by_id(CONFIGS)
def test_jax(benchmark, cfg, jax_peer):
    case = get_case(cfg)
    try:  # JAX runs in a worker process: see peers.JaxProcess
        info = jax_peer.build("peers", "JaxChain", case.weights, case.biases, cfg.activation)
    except ImportError as exc:
        pytest.skip(str(exc))
    check_norms(jax_peer(case.x), case, "jax")  # compiles; validation and warm-up, not timed
    compile_s = jax_peer.attr("compile_s")
    tag(
        benchmark,
        cfg,
        "jax",
        target_speedup=cfg.speedup_targets.get("jax"),
        jax_threads=info["threads"],
        jax_version=info["jax"],
        compile_s=compile_s,
        note=f"compile {compile_s:.2f} s, not timed",
    )
    got = run(benchmark, jax_peer, case.x, cfg.peer_rounds.get("jax"))
    check_norms(got, case, "jax (timed run)")
