"""gradchain.train against a plain PyTorch training loop that records the same.

* ``mlp20-w64-b32-tanh-f32``: 1000 steps on a 20-layer width-64 tanh MLP (bias 0.1
  std), batch 32, float32, a teacher-student regression (mse), gradient clipping at
  max_norm 1, every parameter's gradient norm recorded at every step.
* ``lstm-h64-T100-b32-k50-f32``: 500 steps of an LSTM (hidden 64) with a linear read-out
  on the adding problem (T = 100), batch 32, float32, truncated backpropagation through
  time with window 50 (the states detached every 50 steps), clipping at max_norm 1, the
  norms recorded at every step.

The optimizer is Adam (lr 1e-3) where gradchain has it, else SGD with momentum 0.9
(lr 1e-2). PyTorch runs the same loop (``train_peers.TorchTrainLoop``: ``torch.optim``
with its defaults, ``clip_grad_norm_``, ``torch._foreach_norm`` for the per-parameter
norms) in its own process, on the same batches (``gc.tasks.batch_order``), with its
intra-op threads set to the cores available (``torch``) and to one (``torch-1thread``:
steadier on a shared machine, where the small ops of a thread pool wait for cores); its
first losses and norms are checked against gradchain's. gradchain records more than the peer
(weight norms and update ratios too). conftest.py prints the ratios.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

gc = pytest.importorskip("gradchain")

if hasattr(gc.optim, "Adam"):
    OPTIMIZER = ("Adam", {"lr": 1e-3})
else:
    OPTIMIZER = ("SGD", {"lr": 1e-2, "momentum": 0.9})


@dataclass(frozen=True)
class Config:
    id: str
    kind: str
    steps: int
    batch: int
    kw: dict
    speedup_targets: dict = field(default_factory=dict)
    rounds: int = 3


CONFIGS = [
    Config("mlp20-w64-b32-tanh-f32", "mlp", 1000, 32, {"depth": 20, "width": 64},
           speedup_targets={"torch": 10.0}),
    Config("lstm-h64-T100-b32-k50-f32", "lstm", 500, 32,
           {"hidden": 64, "T": 100, "truncate": 50}, speedup_targets={"torch": 3.0}),
]  # fmt: skip


@dataclass
class Case:
    cfg: Config
    net: object
    state: dict
    data: object  # what gc.train takes
    x: np.ndarray
    y: np.ndarray
    n: int


_cases: dict[str, Case] = {}


def get_case(cfg: Config) -> Case:
    if cfg.id not in _cases:
        if cfg.kind == "mlp":
            w = cfg.kw["width"]
            net = gc.MLP(depth=cfg.kw["depth"], width=w, activation="tanh", bias_std=0.1,
                         dtype="float32", seed=0)  # fmt: skip
            rng = np.random.default_rng(1)
            x = rng.standard_normal((4096, w)).astype("float32")
            y = np.tanh(x @ (rng.standard_normal((w, w)) / np.sqrt(w))).astype("float32")
            data, n = (x, y), x.shape[0]
        else:
            task = gc.tasks.adding_problem(cfg.kw["T"], batch=2048, seed=1, dtype="float32")
            net = gc.RNN("lstm", 2, cfg.kw["hidden"], output_size=1, dtype="float32", seed=0)
            data, x, y, n = task, task.x, task.target, task.batch
        _cases[cfg.id] = Case(cfg, net, net.state_dict(), data, x, y, n)
    return _cases[cfg.id]


def restore(case: Case) -> None:
    if case.cfg.kind == "mlp":
        case.net._net.load_state_dict(case.state)
    else:
        case.net = gc.RNN.from_state_dict(case.state, "lstm", dtype="float32")


def run_gradchain(case: Case):
    name, kw = OPTIMIZER
    return gc.train(case.net, case.data, optimizer=getattr(gc.optim, name)(**kw),
                    steps=case.cfg.steps, batch_size=case.cfg.batch, max_norm=1.0,
                    truncate=case.cfg.kw.get("truncate"), seed=0)  # fmt: skip


def check(got, hist, who: str) -> None:
    """The first steps agree (float32: the trajectories separate slowly afterwards)."""
    losses, totals, norms = got
    k = 5
    np.testing.assert_allclose(losses[:k], hist.loss[:k], rtol=2e-3, err_msg=f"{who}: loss")
    np.testing.assert_allclose(totals[:k], hist.total_norm[:k], rtol=2e-3, err_msg=f"{who}: total")
    np.testing.assert_allclose(
        norms[:k], hist.param_grad_norms[:k], rtol=2e-3, err_msg=f"{who}: norms"
    )
    assert losses.shape == hist.loss.shape and norms.shape == hist.param_grad_norms.shape


def tag(benchmark, cfg: Config, impl: str, **extra) -> None:
    benchmark.group = cfg.id
    benchmark.extra_info.update(impl=impl, config=cfg.id, optimizer=OPTIMIZER[0], **extra)


def by_id(configs):
    return pytest.mark.parametrize("cfg", configs, ids=[c.id for c in configs])


_histories: dict[str, object] = {}


@by_id(CONFIGS)
def test_gradchain(benchmark, cfg):
    case = get_case(cfg)
    tag(benchmark, cfg, "gradchain", steps=cfg.steps)
    hist = benchmark.pedantic(run_gradchain, args=(case,), setup=lambda: restore(case),
                              rounds=cfg.rounds, iterations=1, warmup_rounds=1)  # fmt: skip
    assert hist.stopped == "completed" and hist.steps_run == cfg.steps
    assert hist.log10_param_grad_norms.shape == (cfg.steps, len(hist.param_names))
    _histories[cfg.id] = hist


def _peer_args(case: Case, cfg: Config) -> tuple:
    kw = dict(cfg.kw)
    if cfg.kind == "lstm":
        kw = {"hidden": kw["hidden"], "truncate": kw["truncate"], "input_size": 2, "output_size": 1}
    args = (cfg.kind, case.state, "float32", case.x, case.y, OPTIMIZER[0], OPTIMIZER[1], 1.0)
    return args, kw


@by_id(CONFIGS)
@pytest.mark.parametrize("threads", [None, 1], ids=["torch", "torch-1thread"])
def test_torch(benchmark, cfg, threads, torch_peer):
    case = get_case(cfg)
    restore(case)
    hist = _histories[cfg.id] if cfg.id in _histories else run_gradchain(case)
    args, kw = _peer_args(case, cfg)
    try:  # PyTorch runs in a worker process: see peers.TorchProcess
        info = torch_peer.build("train_peers", "TorchTrainLoop", *args, threads=threads, **kw)
    except ImportError as exc:
        pytest.skip(str(exc))
    order = gc.tasks.batch_order(case.n, cfg.batch, cfg.steps, 0)
    impl = "torch" if threads is None else "torch-1thread"
    tag(benchmark, cfg, impl, target_speedup=cfg.speedup_targets.get(impl),
        torch_threads=info["threads"], torch_version=info["torch"])  # fmt: skip
    got = benchmark.pedantic(torch_peer.run, args=(order,), rounds=cfg.rounds, iterations=1)
    check(got, hist, "torch")


@by_id(CONFIGS)
def test_jax(benchmark, cfg, jax_peer):
    case = get_case(cfg)
    restore(case)
    hist = _histories[cfg.id] if cfg.id in _histories else run_gradchain(case)
    args, kw = _peer_args(case, cfg)
    try:  # JAX runs in a worker process: see peers.JaxProcess
        info = jax_peer.build("train_peers", "JaxTrainLoop", *args, **kw)
    except ImportError as exc:
        pytest.skip(str(exc))
    order = gc.tasks.batch_order(case.n, cfg.batch, cfg.steps, 0)
    check(jax_peer.run(order), hist, "jax")  # compiles; validation and warm-up, not timed
    compile_s = jax_peer.attr("compile_s")
    tag(benchmark, cfg, "jax", target_speedup=cfg.speedup_targets.get("jax"),
        jax_threads=info["threads"], jax_version=info["jax"], compile_s=compile_s,
        note=f"compile {compile_s:.2f} s, not timed")  # fmt: skip
    got = benchmark.pedantic(jax_peer.run, args=(order,), rounds=cfg.rounds, iterations=1)
    check(got, hist, "jax")
