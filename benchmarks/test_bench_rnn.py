"""gradchain.RNN.backward against PyTorch (cells unrolled in Python, and the fused
``torch.nn.RNN`` / ``LSTM`` / ``GRU`` modules) and a NumPy loop.

Run with ``pytest benchmarks/`` (see benchmarks/README.md).  Every configuration is a
pytest-benchmark group; the ratio table printed at the end comes from conftest.py.
Without ``gradchain.RNN`` the gradchain entries are skipped and the peers run on weights
drawn with PyTorch's default initialization (``rnn_peers.default_state_dict``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import rnn_peers

try:
    import gradchain as gc
except ImportError:  # the peers still run (without the comparison with gradchain)
    gc = None

HAS_RNN = gc is not None and hasattr(gc, "RNN")
needs_rnn = pytest.mark.skipif(not HAS_RNN, reason="gradchain.RNN is not available")


@dataclass(frozen=True)
class Config:
    id: str
    cell: str
    dtype: str
    T: int = 1000
    hidden_size: int = 128
    batch: int = 32
    input_size: int = 8
    # Targets: peer median / gradchain median must be >= target (None: no target).
    speedup_targets: dict = field(default_factory=dict)
    # Rounds for the slow peers (benchmark.pedantic); None = pytest-benchmark's calibration.
    peer_rounds: dict = field(default_factory=dict)

    @property
    def rtol(self) -> float:
        """Parameter gradient norms, peer vs gradchain."""
        return 1e-7 if self.dtype == "float64" else 1e-3

    @property
    def log_atol(self) -> float:
        """Per-timestep state gradient norms, |log10(peer) - log10(gradchain)|."""
        return 1e-7 if self.dtype == "float64" else 1e-3

    @property
    def floor(self) -> float:
        """Peer state norms at or below this are not compared (float underflow)."""
        return rnn_peers.norm_floor(self.dtype)


ROUNDS = {"numpy": 5, "torch-cells": 7, "torch-fused": 7, "jax": 7}

CONFIGS = [
    Config(
        "T1000-h128-b32-tanh-f64", "tanh", "float64",
        speedup_targets={"numpy": None, "torch-cells": 3.0, "torch-fused": 1.0},
        peer_rounds=ROUNDS,
    ),
    Config(
        "T1000-h128-b32-lstm-f32", "lstm", "float32",
        speedup_targets={"numpy": None, "torch-cells": 3.0, "torch-fused": 1.0},
        peer_rounds=ROUNDS,
    ),
    Config(
        "T1000-h128-b32-gru-f32", "gru", "float32",
        speedup_targets={"numpy": None, "torch-cells": 3.0, "torch-fused": 1.0},
        peer_rounds=ROUNDS,
    ),
]


def by_id(configs):
    return pytest.mark.parametrize("cfg", configs, ids=[c.id for c in configs])


@dataclass
class Case:
    cfg: Config
    rnn: object  # gradchain.RNN, or None without it
    x: np.ndarray
    weights: dict  # state dict (numpy arrays) shared by every peer
    weights_from: str
    ref: dict | None  # gradchain's log10 norms, computed once (None without gradchain.RNN)


_cases: dict[str, Case] = {}


def get_case(cfg: Config) -> Case:
    """The chain, input and gradchain's reference norms of a configuration (built once)."""
    if cfg.id not in _cases:
        x = np.random.default_rng(1).standard_normal(
            (cfg.T, cfg.batch, cfg.input_size)).astype(cfg.dtype)
        if HAS_RNN:
            rnn = gc.RNN(cfg.cell, cfg.input_size, cfg.hidden_size, init="default",
                         dtype=cfg.dtype, seed=0)
            weights = {k: np.array(v) for k, v in rnn.state_dict().items()}
            ref = gradchain_norms(rnn.backward(x), cfg, "gradchain")
            src = "gradchain.RNN(init='default', seed=0)"
        else:
            rnn, ref = None, None
            weights = rnn_peers.default_state_dict(cfg.cell, cfg.input_size, cfg.hidden_size,
                                                   dtype=np.dtype(cfg.dtype), seed=0)
            src = "rnn_peers.default_state_dict(seed=0)"
        _cases[cfg.id] = Case(cfg, rnn, x, weights, src, ref)
    return _cases[cfg.id]


def gradchain_norms(rep, cfg: Config, who: str) -> dict:
    states = np.asarray(rep.log10_state_grad_norms, dtype=np.float64)
    assert states.shape == (cfg.T + 1,), f"{who}: state norms have shape {states.shape}"
    assert np.all(np.isfinite(states)), f"{who}: log10 state norms not finite"
    params = {k: float(v) for k, v in rep.log10_param_grad_norms.items()}
    assert all(np.isfinite(v) for v in params.values()), f"{who}: log10 param norms {params}"
    assert np.isfinite(rep.loss) and rep.loss > 0, f"{who}: loss {rep.loss}"
    return {"states": states, "params": params, "loss": float(rep.loss)}


def check_gradchain(rep, case: Case, who: str) -> None:
    got = gradchain_norms(rep, case.cfg, who)
    atol = case.cfg.log_atol
    np.testing.assert_allclose(got["states"], case.ref["states"], rtol=0, atol=atol,
                               err_msg=f"{who}: log10 state norms")
    for k, v in case.ref["params"].items():
        np.testing.assert_allclose(got["params"][k], v, rtol=0, atol=atol, err_msg=f"{who}: {k}")


def check_peer(got, case: Case, who: str, per_step: bool = True) -> int:
    """Sanity checks of a peer's result, and (with gradchain.RNN) agreement with gradchain:
    loss and parameter gradient norms at ``cfg.rtol``, per-timestep norms in log10 at
    ``cfg.log_atol`` wherever the peer's float norm is above ``cfg.floor`` (and gradchain's
    below about that floor where the peer's is not).  Returns the timesteps compared."""
    cfg = case.cfg
    names = set(case.weights)
    assert set(got.weight_grad_norms) == names, f"{who}: parameters {sorted(got.weight_grad_norms)}"
    for k, v in got.weight_grad_norms.items():
        assert np.isfinite(v) and v > 0, f"{who}: ||grad {k}|| = {v}"
    assert np.isfinite(got.loss) and got.loss > 0, f"{who}: loss {got.loss}"
    if per_step:
        s = np.asarray(got.state_grad_norms, dtype=np.float64)
        assert s.shape == (cfg.T + 1,), f"{who}: state norms have shape {s.shape}"
        assert np.all(np.isfinite(s)) and np.all(s >= 0), f"{who}: state norms not finite, >= 0"
        np.testing.assert_allclose(s[-1], np.sqrt(2 * got.loss), rtol=cfg.rtol,
                                   err_msg=f"{who}: ||dL/dh_T|| != ||h_T||")
    else:
        assert got.state_grad_norms is None
    if case.ref is None:
        return 0
    ref = case.ref
    np.testing.assert_allclose(got.loss, ref["loss"], rtol=cfg.rtol, err_msg=f"{who}: loss")
    for k, v in ref["params"].items():
        np.testing.assert_allclose(got.weight_grad_norms[k], 10.0 ** v, rtol=cfg.rtol,
                                   err_msg=f"{who} vs gradchain: ||grad {k}||")
    if not per_step:
        return 0
    above = s > cfg.floor
    assert above.sum() >= 50, f"{who}: only {above.sum()} timesteps above {cfg.floor:g}"
    np.testing.assert_allclose(np.log10(s[above]), ref["states"][above], rtol=0,
                               atol=cfg.log_atol, err_msg=f"{who} vs gradchain: log10 state norms")
    below = ref["states"][~above]
    assert np.all(below < np.log10(cfg.floor) + 1), (
        f"{who}: underflows where gradchain's log10 norm is {below.max():.2f}")
    return int(above.sum())


def tag(benchmark, cfg: Config, case: Case, impl: str, **extra) -> None:
    benchmark.group = cfg.id
    benchmark.extra_info.update(impl=impl, config=cfg.id, weights=case.weights_from, **extra)


def run(benchmark, fn, arg, rounds):
    if rounds is None:
        return benchmark(fn, arg)
    return benchmark.pedantic(fn, args=(arg,), rounds=rounds, iterations=1, warmup_rounds=0)


# --------------------------------------------------------------------------- gradchain


@needs_rnn
@by_id(CONFIGS)
def test_gradchain(benchmark, cfg):
    case = get_case(cfg)
    tag(benchmark, cfg, case, "gradchain")
    rep = benchmark(case.rnn.backward, case.x)
    check_gradchain(rep, case, "gradchain (timed run)")


# --------------------------------------------------------------------------- NumPy


@by_id(CONFIGS)
def test_numpy(benchmark, cfg):
    case = get_case(cfg)
    peer = rnn_peers.NumpyRecurrent(cfg.cell, case.weights)
    n = check_peer(peer(case.x), case, "numpy")  # validation (and warm-up), not timed
    tag(benchmark, cfg, case, "numpy", target_speedup=cfg.speedup_targets.get("numpy"),
        timesteps_compared=n)
    got = run(benchmark, peer, case.x, cfg.peer_rounds.get("numpy"))
    check_peer(got, case, "numpy (timed run)")


# --------------------------------------------------------------------------- PyTorch
# (in the worker process of conftest.torch_peer; conftest runs these after the others)


def _torch(benchmark, cfg, torch_peer, impl, factory, per_step, note=""):
    case = get_case(cfg)
    try:  # PyTorch runs in a worker process: see peers.TorchProcess
        info = torch_peer.build("rnn_peers", factory, cfg.cell, case.weights)
    except ImportError as exc:
        pytest.skip(str(exc))
    n = check_peer(torch_peer.run(case.x), case, impl, per_step)  # validation + warm-up
    tag(benchmark, cfg, case, impl, target_speedup=cfg.speedup_targets.get(impl),
        torch_threads=info["threads"], torch_version=info["torch"], timesteps_compared=n,
        note=note)
    got = run(benchmark, torch_peer.run, case.x, cfg.peer_rounds.get(impl))
    check_peer(got, case, f"{impl} (timed run)", per_step)


@by_id(CONFIGS)
def test_torch_cells(benchmark, cfg, torch_peer):
    _torch(benchmark, cfg, torch_peer, "torch-cells", "TorchCellLoop", per_step=True)


@by_id(CONFIGS)
def test_torch_fused(benchmark, cfg, torch_peer):
    _torch(benchmark, cfg, torch_peer, "torch-fused", "TorchFused", per_step=False,
           note="parameter grads only, no per-timestep norms")


# --------------------------------------------------------------------------- JAX
# (after PyTorch, in the worker process of conftest.jax_peer)


@by_id(CONFIGS)
def test_jax(benchmark, cfg, jax_peer):
    case = get_case(cfg)
    try:  # JAX runs in a worker process: see peers.JaxProcess
        info = jax_peer.build("rnn_peers", "JaxRecurrent", cfg.cell, case.weights)
    except ImportError as exc:
        pytest.skip(str(exc))
    n = check_peer(jax_peer.run(case.x), case, "jax")  # compiles; validation + warm-up
    compile_s = jax_peer.attr("compile_s")
    tag(
        benchmark,
        cfg,
        case,
        "jax",
        target_speedup=cfg.speedup_targets.get("jax"),
        jax_threads=info["threads"],
        jax_version=info["jax"],
        timesteps_compared=n,
        compile_s=compile_s,
        note=f"compile {compile_s:.2f} s, not timed",
    )
    got = run(benchmark, jax_peer.run, case.x, cfg.peer_rounds.get("jax"))
    check_peer(got, case, "jax (timed run)")
