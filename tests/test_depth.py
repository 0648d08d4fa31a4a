"""Deep chains: weights drawn for each pass (store_weights=False) and activation
checkpointing, both bit-identical to the stored, fully kept pass."""

from __future__ import annotations

import numpy as np
import pytest
from checks import run_python
from conftest import ChainCase
from gradchain import INITS


def report_arrays(rep):
    """Every array and number of a report's to_dict(), flattened to (key, array) pairs."""
    out = []

    def walk(key, v):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{key}.{k}", x)
        elif isinstance(v, (list, tuple)) and v and not isinstance(v[0], str):
            for i, x in enumerate(v):
                walk(f"{key}[{i}]", x)
        elif not isinstance(v, str) and v is not None:
            out.append((key, np.asarray(v)))

    walk("", rep.to_dict())
    return out


def assert_identical(a, b, what=""):
    ka, kb = report_arrays(a), report_arrays(b)
    assert [k for k, _ in ka] == [k for k, _ in kb], what
    for (k, x), (_, y) in zip(ka, kb):
        nan = x.dtype.kind == "f" and y.dtype.kind == "f"
        assert np.array_equal(x, y, equal_nan=nan), f"{what}: {k} differs"


def mlp_case(seed):
    """A random small MLP configuration: depths 1..50, odd widths, batch 1 to 40."""
    rng = np.random.default_rng(seed)
    depth = int(rng.integers(1, 51))
    width = int(rng.choice([1, 3, 5, 7, 17, 33]))
    batch = int(rng.choice([1, 2, 5, 40]))
    kw = {
        "depth": depth,
        "width": width,
        "activation": str(rng.choice(["tanh", "relu", "gelu", "sigmoid", "elu"])),
        "init": str(rng.choice(INITS)),
        "bias_std": float(rng.choice([0.0, 0.1])),
        "dtype": str(rng.choice(["float64", "float32"])),
        "seed": int(rng.integers(0, 2**31)),
    }
    shape = rng.integers(0, 4)
    if shape == 1:
        kw["norm"] = str(rng.choice(["layer", "rms", "batch"]))
    elif shape == 2:
        kw.update(residual=True, residual_scale=0.5)
    elif shape == 3:
        kw.update(residual=True, norm="layer", norm_position=str(rng.choice(["pre", "post"])))
    x = np.random.default_rng(seed + 1).standard_normal((batch, width))
    return kw, x


MLP_SEEDS = list(range(16))


@pytest.mark.parametrize("seed", MLP_SEEDS)
def test_drawn_and_checkpointed_mlp_match_the_stored_one_bit_for_bit(gc, seed):
    kw, x = mlp_case(seed)
    stored = gc.MLP(**kw, store_weights=True)
    drawn = gc.MLP(**kw, store_weights=False)
    assert stored.store_weights and not drawn.store_weights
    ref = stored.backward(x, checkpoint=None, return_grads=seed % 2 == 0)
    for net in (stored, drawn):
        for ck in (None, 2, 7, "sqrt"):
            rep = net.backward(x, checkpoint=ck, return_grads=seed % 2 == 0)
            assert_identical(rep, ref, f"{kw} store={net.store_weights} checkpoint={ck}")
    assert all(np.array_equal(a, b) for a, b in zip(stored.weights, drawn.weights))
    assert all(np.array_equal(a, b) for a, b in zip(stored.biases, drawn.biases))
    assert np.array_equal(stored.forward(x), drawn.forward(x))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_two_threads_split_batches_and_pipelines_the_same(gc, dtype):
    """Large enough for the split batch and the pipelined backward pass."""
    kw = {
        "depth": 24,
        "width": 48,
        "activation": "tanh",
        "dtype": dtype,
        "seed": 5,
        "bias_std": 0.05,
    }
    x = np.random.default_rng(0).standard_normal((32, 48))
    ref = gc.MLP(**kw, store_weights=True).backward(x, checkpoint=None, max_norm=1.0)
    drawn = gc.MLP(**kw, store_weights=False)
    for ck in (None, 1, 5, "sqrt"):
        assert_identical(drawn.backward(x, checkpoint=ck, max_norm=1.0), ref, str(ck))


@pytest.mark.parametrize("seed", range(12))
def test_checkpointed_chain_of_any_blocks_matches(gc, seed):
    case = ChainCase(seed, norms=True)
    net = case.chain()
    x, kw = case.data(net.out_features)
    kw.update(max_norm=case.max_norm, norm_type=case.norm_type, return_grads=True)
    state = net.state_dict()
    runs = []
    for ck in (None, 1, 2, "sqrt"):
        # BatchNorm's running statistics move with each train-mode pass: start each the same
        net.load_state_dict(state)
        runs.append(net.backward(x, checkpoint=ck, **kw))
    for rep in runs[1:]:
        assert_identical(rep, runs[0], case.id)


@pytest.mark.parametrize("seed", range(6))
def test_drawn_chain_of_any_blocks_matches(gc, seed):
    case = ChainCase(seed, norms=True)
    args = {"init": "he_normal", "gain": 0.9, "bias_std": 0.2, "seed": seed}
    stored = gc.Chain(case.blocks(), **args, store_weights=True).train(case.train)
    drawn = gc.Chain(case.blocks(), **args, store_weights=False).train(case.train)
    x, kw = case.data(stored.out_features)
    for ck in (None, 1, "sqrt"):
        assert_identical(
            drawn.backward(x, checkpoint=ck, **kw), stored.backward(x, checkpoint=ck, **kw), case.id
        )
    for (n, a), (m, b) in zip(stored.named_parameters(), drawn.named_parameters()):
        assert n == m and np.array_equal(a, b), n


def test_memory_grows_slower_than_depth(gc):
    x = np.ones((8, 16))
    mem = {}
    for depth in (400, 1600):
        net = gc.MLP(depth=depth, width=16, store_weights=False)
        mem[depth] = (
            net.backward_memory(8, checkpoint=None),
            net.backward_memory(8, checkpoint="sqrt"),
        )
    # Without checkpointing the kept outputs grow with depth (beside a ring of gradient
    # slots of fixed size); with it they grow as sqrt(depth), and only a few numbers per
    # layer (exponents, maxima) with depth.
    assert 3.2 < mem[1600][0] / mem[400][0] < 4.5, mem
    assert mem[1600][1] / mem[400][1] < 3.2, mem
    assert mem[1600][1] < mem[1600][0] / 5, mem
    net = gc.MLP(depth=400, width=16, store_weights=False)
    # A segment length between the extremes needs more than sqrt's, less than none.
    assert mem[400][1] <= net.backward_memory(8, checkpoint=2) <= mem[400][0]
    # The budget: no checkpointing when the pass fits, sqrt when only that fits.
    assert net.backward_memory(8, checkpoint=f"{mem[400][0]}B") == mem[400][0]
    assert net.backward_memory(8, checkpoint=f"{mem[400][1]}B") == mem[400][1]
    with pytest.raises(MemoryError, match="even with checkpointing"):
        net.backward(x, checkpoint=f"{mem[400][1] - 1}B")
    # "auto": a chain that keeps its weights is never checkpointed unasked.
    kept = gc.MLP(depth=400, width=16, store_weights=True)
    assert kept.backward_memory(8) == kept.backward_memory(8, checkpoint=None)


def test_a_drawn_chain_keeps_no_weights(gc):
    """Its Linear weights are not held anywhere: a chain whose weights would take 8 GB is
    built in a child capped at 2 GiB of address space, and draws one layer on request."""
    code = """
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))
        import numpy as np, gradchain as gc
        net = gc.MLP(depth=2000, width=724, store_weights=False, seed=0)
        print(net.store_weights, net._net._core.param(2 * 1999).shape == (724, 724))
    """
    assert run_python(code).split() == ["False", "True"]


def test_checkpoint_and_store_weights_are_checked(gc):
    net = gc.MLP(depth=3, width=4, store_weights=False)
    x = np.ones((2, 4))
    bad_values = [
        (0, ValueError),
        (-2, ValueError),
        ("half", ValueError),
        (1.5, TypeError),
        (True, TypeError),
        ("0GB", ValueError),
    ]
    for bad, err in bad_values:
        with pytest.raises(err, match="checkpoint must be"):
            net.backward(x, checkpoint=bad)
    with pytest.raises(TypeError, match="store_weights must be"):
        gc.MLP(depth=3, width=4, store_weights="no")
    chain = gc.Chain(list(net.blocks), store_weights=False)
    with pytest.raises(ValueError, match="drawn for each pass"):
        chain.load_state_dict(chain.state_dict())
    with pytest.raises(ValueError, match="store_weights"):
        gc.train(
            net,
            (np.ones((4, 4)), np.ones((4, 4))),
            optimizer=gc.optim.SGD(lr=0.1),
            steps=1,
            batch_size=2,
        )
    with pytest.raises(ValueError, match="store_weights"):
        gc.jacobian_spectrum(net, np.ones((1, 4)))
    w = net.weights
    assert not w[0].flags.writeable and np.array_equal(w[0], net.weights[0])


def test_ctrl_c_stops_a_drawn_checkpointed_backward(gc):
    code = """
        import os, signal, threading, time
        import numpy as np, gradchain as gc
        net = gc.MLP(depth=200_000, width=64, store_weights=False, seed=0)  # seconds of work
        x = np.ones((8, 64))
        threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        t0 = time.perf_counter()
        try:
            net.backward(x, checkpoint="sqrt")
            print("not interrupted")
        except KeyboardInterrupt:
            print("interrupted", time.perf_counter() - t0)
        small = gc.MLP(depth=50, width=64, store_weights=False, seed=0)
        print("after", np.isfinite(small.backward(x[:1], checkpoint="sqrt").log10_total_norm))
    """
    out = run_python(code).split()
    assert out[0] == "interrupted", out
    assert float(out[1]) < 2.0, out
    assert out[-2:] == ["after", "True"]
