"""gc.sweep: grids, measurements, executors, results and bad input."""

from __future__ import annotations

import importlib.util
import json
import math
import multiprocessing as mp
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import gradchain as gc
import numpy as np
import pytest
from checks import assert_close, ticks_while

MLP_FIXED = {"depth": 12, "width": 16, "activation": "tanh", "init": "normal"}
DIMS = {"sigma_w": [0.6, 1.0, 1.8], "bias_std": [0.0, 0.4]}


def small_sweep(**kw):
    args = {"dims": DIMS, "fixed": MLP_FIXED, "seeds": 2, "batch": 4}
    args.update(kw)
    return gc.sweep(gc.MLP, **args)


def point_inputs(root, point, seed, draws="common"):
    """The chain seed and generator of a point, as gc.sweep documents them."""
    key = (seed,) if draws == "common" else (point, seed)
    ss = np.random.SeedSequence(root, spawn_key=key)
    return int(ss.generate_state(1, np.uint64)[0]), np.random.default_rng(ss.spawn(1)[0])


def slope_from_output(log10_norms):
    y = np.asarray(log10_norms)[::-1]
    return np.polyfit(np.arange(y.size), y, 1)[0]


def same_values(a, b):
    assert list(a.values) == list(b.values)
    for k in a.values:
        np.testing.assert_array_equal(a.values[k], b.values[k], err_msg=k)


@pytest.fixture(scope="module")
def reference():
    return small_sweep()


def test_dims_coords_and_shapes(reference):
    g = reference
    assert list(g.dims) == ["sigma_w", "bias_std", "seed"]
    np.testing.assert_array_equal(g.dims["seed"], [0, 1])
    assert g.shape == (3, 2, 2)
    assert set(g.values) == {"growth", "growth_stderr", "log10_first", "log10_last"}
    for a in g.values.values():
        assert a.shape == (3, 2, 2) and a.dtype == np.float64 and np.isfinite(a).all()
    assert g.fixed == {**MLP_FIXED, "batch": 4}
    assert g.measure == "growth" and g.errors == {}
    assert g.mean("growth").shape == (3, 2)
    assert_close(g.mean("growth"), g.values["growth"].mean(axis=-1), what="mean")
    assert_close(
        g.stderr("growth"), g.values["growth"].std(axis=-1, ddof=1) / math.sqrt(2), what="stderr"
    )
    assert "sigma_w=3 x bias_std=2 x seed=2" in repr(g)
    assert "<table>" in g._repr_html_()


def check_direct_calls(grid, draws):
    """Every point recomputed with the public API from the documented seeds: the values
    are bit for bit those of a fresh chain (the sweep's kept chain, redrawn or only
    rescaled from point to point, holds the same weights)."""
    for i, j, s in np.ndindex(grid.shape):
        chain_seed, rng = point_inputs(0, i * 2 + j, s, draws)
        net = gc.MLP(
            **MLP_FIXED, sigma_w=DIMS["sigma_w"][i], bias_std=DIMS["bias_std"][j], seed=chain_seed
        )
        rep = net.backward(rng.standard_normal((4, 16)))
        la = rep.log10_activation_grad_norms
        assert grid.values["log10_first"][i, j, s] == la[0]
        assert grid.values["log10_last"][i, j, s] == la[-1]
        assert_close(grid.values["growth"][i, j, s], slope_from_output(la), rtol=1e-9)


def test_values_equal_direct_calls(reference):
    check_direct_calls(reference, "common")


def test_independent_draws_equal_direct_calls(reference):
    grid = small_sweep(draws="independent")
    check_direct_calls(grid, "independent")
    assert not np.array_equal(grid.values["growth"], reference.values["growth"])
    # The seed label, not its position, picks the draws.
    relabelled = small_sweep(seeds=[1, 0])
    np.testing.assert_array_equal(
        relabelled.values["growth"][..., 0], reference.values["growth"][..., 1]
    )


def test_growth_sign_follows_the_phase(reference):
    """Vanishing (ordered) chains shrink gradients on the way back: growth < 0; the
    mean-field prediction is 0.5 log10(chi_1) per layer."""
    g = reference.mean("growth")
    assert g[0, 0] < -0.15 and g[2, 0] > 0
    th = reference.theory()
    assert th["chi_1"].shape == (3, 2)
    assert_close(th["chi_1"][1, 1], gc.theory.mean_field("tanh", 1.0, 0.4).chi_1, rtol=1e-12)
    assert abs(g[0, 0] - th["log10_chi_1_half"][0, 0]) < 0.05


def test_reproducible_and_seeded(reference):
    same_values(small_sweep(), reference)
    # The chains the threads kept from point to point are gone with the sweep.
    assert not sys.modules["gradchain.sweep"]._held
    same_values(small_sweep(workers=1), reference)
    other = small_sweep(seed=1)
    assert not np.array_equal(other.values["growth"], reference.values["growth"])
    # Seed labels pick the children: labels (1,) give the second seed of `seeds=2`.
    one = small_sweep(seeds=[1])
    np.testing.assert_array_equal(one.values["growth"][..., 0], reference.values["growth"][..., 1])
    via_dim = small_sweep(dims={**DIMS, "seed": [1]}, seeds=1)
    same_values(via_dim, one)


def test_thread_pool_executor(reference):
    with ThreadPoolExecutor(2) as ex:
        same_values(small_sweep(executor=ex), reference)


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_process_pools_every_start_method(reference, method):
    if method not in mp.get_all_start_methods():
        pytest.skip(f"no {method} start method here")
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork in a process with threads; the core's fork guard
        # runs the child single-threaded.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        with ProcessPoolExecutor(2, mp_context=mp.get_context(method)) as ex:
            same_values(small_sweep(executor=ex), reference)


def test_dask_local_cluster(reference):
    distributed = pytest.importorskip("distributed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the cluster's own start-up chatter
        with (
            distributed.LocalCluster(
                n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
            ) as cluster,
            distributed.Client(cluster) as client,
        ):
            same_values(small_sweep(executor=client), reference)
            with client.get_executor() as ex:
                same_values(small_sweep(executor=ex), reference)


def test_measure_and_constructor_dims():
    g = gc.sweep(
        gc.MLP,
        dims={"batch": [2, 6], "activation": ["tanh", "relu"]},
        fixed={"depth": 10, "width": 8},
        measure="backward",
    )
    assert g.shape == (2, 2, 1)
    np.testing.assert_array_equal(g.dims["activation"], ["tanh", "relu"])
    chain_seed, rng = point_inputs(0, 3, 0)
    rep = gc.MLP(depth=10, width=8, activation="relu", seed=chain_seed).backward(
        rng.standard_normal((6, 8))
    )
    assert g.values["loss"][1, 1, 0] == rep.loss
    assert g.values["log10_total_norm"][1, 1, 0] == rep.log10_total_norm
    assert_close(g.values["total_norm"][1, 1, 0], rep.total_norm, rtol=1e-15)
    assert g.values["log10_first_weight_grad_norm"][1, 1, 0] == rep.log10_weight_grad_norms[0]
    assert g.values["log10_ratio"][1, 1, 0] == (
        rep.log10_weight_grad_norms[0] - rep.log10_weight_grad_norms[-1]
    )


def test_spectrum_and_train_measures():
    sp = gc.sweep(
        gc.MLP,
        dims={"sigma_w": [0.5, 2.0]},
        fixed={"depth": 8, "width": 8, "init": "normal"},
        measure="spectrum",
    )
    chain_seed, rng = point_inputs(0, 1, 0)
    net = gc.MLP(depth=8, width=8, init="normal", sigma_w=2.0, seed=chain_seed)
    spec = gc.jacobian_spectrum(net, rng.standard_normal((1, 8)), seed=0)
    assert sp.values["max_lyapunov"][1, 0] == np.max(spec.lyapunov_exponents_mean)
    assert sp.values["min_lyapunov"][1, 0] == np.min(spec.lyapunov_exponents_mean)
    tr = gc.sweep(
        gc.MLP,
        dims={"sigma_w": [0.5, 1.0]},
        fixed={"depth": 4, "width": 8, "init": "normal"},
        measure="train",
        measure_kwargs={"steps": 4, "n": 32, "optimizer": gc.optim.SGD(lr=0.05)},
        batch=8,
    )
    assert tr.attrs["diagnosis_kinds"][0] == "healthy"
    assert np.isfinite(tr.values["final_loss"]).all()
    assert set(np.unique(tr.values["diagnosis_code"])) <= set(range(5))


def test_rnn_growth_over_time():
    g = gc.sweep(
        gc.RNN,
        dims={"recurrent_gain": [0.5, 3.0]},
        fixed={"hidden_size": 8, "input_size": 2, "init": "normal"},
        measure_kwargs={"steps": 15},
        batch=3,
    )
    chain_seed, rng = point_inputs(0, 0, 0)
    net = gc.RNN(hidden_size=8, input_size=2, init="normal", recurrent_gain=0.5, seed=chain_seed)
    rep = net.backward(rng.standard_normal((15, 3, 2)))
    assert_close(g.values["growth"][0, 0], slope_from_output(rep.log10_state_grad_norms), rtol=1e-9)
    assert g.values["growth"][0, 0] < 0


def user_measure(net, rng, *, scale=1.0):
    x = rng.standard_normal((2, net.widths[0]))
    if scale < 0:
        raise ValueError("scale must be >= 0")
    return {"out": scale * float(np.abs(net.forward(x)).mean()), "depth": net.depth}


def test_user_callable_and_error_records():
    g = gc.sweep(
        gc.MLP,
        dims={"scale": [1.0, -1.0, 2.0]},
        fixed={"depth": 3, "width": 4},
        measure=user_measure,
    )
    assert g.measure == "user_measure"
    assert set(g.values) == {"out", "depth"}
    assert np.isnan(g.values["out"][1, 0]) and np.isfinite(g.values["out"][[0, 2], 0]).all()
    assert g.errors == {(1, 0): "ValueError: scale must be >= 0"}
    assert_close(g.values["out"][2, 0], 2 * g.values["out"][0, 0], rtol=0.5)  # other seeds
    with pytest.raises(
        RuntimeError, match=r"point \(1, 0\) \(scale=-1.0, seed=0\) failed: ValueError"
    ):
        gc.sweep(
            gc.MLP,
            dims={"scale": [1.0, -1.0]},
            fixed={"depth": 3, "width": 4},
            measure=user_measure,
            on_error="raise",
        )
    # A point the core refuses (a weight beyond float32) is recorded, the rest runs.
    g = gc.sweep(
        gc.MLP, dims={"gain": [1.0, 1e300]}, fixed={"depth": 3, "width": 4, "dtype": "float32"}
    )
    assert list(g.errors) == [(1, 0)] and "gain must be at most" in g.errors[1, 0]
    assert np.isfinite(g.values["growth"][0, 0])
    if importlib.util.find_spec("pandas") is not None:
        assert g.to_pandas()["error"].tolist()[1].startswith("ValueError")


def test_save_load_round_trip(tmp_path, reference):
    path = tmp_path / "grid.npz"
    reference.save(path)
    back = gc.SweepResult.load(path)
    assert list(back.dims) == list(reference.dims)
    for k in reference.dims:
        np.testing.assert_array_equal(back.dims[k], reference.dims[k])
    same_values(back, reference)
    assert back.fixed == reference.fixed and back.measure == reference.measure
    assert back.attrs == reference.attrs
    g = gc.sweep(
        gc.MLP,
        dims={"scale": [-1.0], "activation": ["relu"]},
        fixed={"depth": 2, "width": 3},
        measure=user_measure,
    )
    g.save(tmp_path / "e.npz")
    e = gc.SweepResult.load(tmp_path / "e.npz")
    assert e.errors == g.errors and e.dims["activation"].tolist() == ["relu"]
    json.dumps(reference.to_dict())


def test_xarray_and_pandas(reference):
    xr = pytest.importorskip("xarray")
    ds = reference.data
    assert isinstance(ds, xr.Dataset)
    assert dict(ds.sizes) == {"sigma_w": 3, "bias_std": 2, "seed": 2}
    np.testing.assert_array_equal(ds["growth"].values, reference.values["growth"])
    pytest.importorskip("pandas")
    df = reference.to_pandas()
    assert len(df) == 12 and df["growth"].tolist() == reference.values["growth"].ravel().tolist()


def test_progress_bar(capsys):
    pytest.importorskip("tqdm")
    gc.sweep(gc.MLP, dims={"sigma_w": [1.0, 2.0]}, fixed={"depth": 2, "width": 3}, progress=True)
    assert "2/2" in capsys.readouterr().err


def test_progress_without_tqdm(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_tqdm(name, *a, **k):
        if name.startswith("tqdm"):
            raise ImportError("no tqdm")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    with pytest.raises(ImportError, match=r"gradchain\[progress\]"):
        gc.sweep(gc.MLP, dims={"sigma_w": [1.0]}, fixed={"depth": 2, "width": 3}, progress=True)


def test_bad_input():
    fx = {"depth": 2, "width": 3}
    with pytest.raises(
        ValueError, match=r"unknown dimension or argument 'sigmaw'.*valid names: .*sigma_w"
    ):
        gc.sweep(gc.MLP, dims={"sigmaw": [1.0]}, fixed=fx)
    with pytest.raises(ValueError, match=r"'widht'.*valid names: .*batch.*width"):
        gc.sweep(gc.MLP, dims={"sigma_w": [1.0]}, fixed={**fx, "widht": 3})
    with pytest.raises(ValueError, match=r"dims\['sigma_w'\] is empty"):
        gc.sweep(gc.MLP, dims={"sigma_w": []}, fixed=fx)
    with pytest.raises(ValueError, match="dims is empty"):
        gc.sweep(gc.MLP, dims={}, fixed=fx)
    with pytest.raises(TypeError, match=r"executor must be None.*; got builtins\.range"):
        gc.sweep(gc.MLP, dims={"sigma_w": [1.0]}, fixed=fx, executor=range(2))
    with pytest.raises(ValueError, match="measure must be one of 'growth'"):
        gc.sweep(gc.MLP, dims={"sigma_w": [1.0]}, fixed=fx, measure="grow")
    with pytest.raises(ValueError, match="on_error must be one of"):
        gc.sweep(gc.MLP, dims={"sigma_w": [1.0]}, fixed=fx, on_error="skip")
    with pytest.raises(ValueError, match="seeds must be a positive integer"):
        gc.sweep(gc.MLP, dims={"sigma_w": [1.0]}, fixed=fx, seeds=0)
    with pytest.raises(ValueError, match="seed is set per point"):
        gc.sweep(gc.MLP, dims={"sigma_w": [1.0]}, fixed={**fx, "seed": 3})
    with pytest.raises(ValueError, match="not both"):
        gc.sweep(gc.MLP, dims={"seed": [1, 2]}, fixed=fx, seeds=2)
    # 4 points at once of a 4 GB chain each: refused before anything is built.
    with pytest.raises(MemoryError, match=r"needs \d+ bytes .*4 points at once of \d+ bytes each"):
        gc.sweep(
            gc.MLP,
            dims={"sigma_w": [1.0, 2.0, 3.0, 4.0]},
            fixed={"depth": 10**6, "width": 10**3},
            workers=4,
        )


def test_theory_of_a_sweep_needs_its_setting():
    with pytest.raises(ValueError, match="init='normal'"):
        gc.sweep(gc.MLP, dims={"sigma_w": [1.0]}, fixed={"depth": 2, "width": 3}).theory()
    with pytest.raises(ValueError, match=r"sigma_w and bias_std only; got also \['width'\]"):
        gc.sweep(gc.MLP, dims={"width": [3]}, fixed={"depth": 2, "init": "normal"}).theory()
    with pytest.raises(ValueError, match=r"needs a sweep of gc\.MLP"):
        gc.sweep(residual_chain, dims={"scale": [0.5]}).theory()


def test_theory_broadcasts_and_keeps_scalars():
    sw = np.linspace(0.5, 3.0, 4)
    sb = np.array([0.0, 0.5])
    c1 = gc.theory.chi_1("tanh", sw[:, None], sb[None, :])
    assert isinstance(c1, np.ndarray) and c1.shape == (4, 2)
    for i in range(4):
        for j in range(2):
            assert c1[i, j] == gc.theory.mean_field("tanh", sw[i], sb[j], correlation=False).chi_1
    assert isinstance(gc.theory.chi_1("tanh", 1.5, 0.3), float)
    assert isinstance(gc.theory.chi(1.0, "relu", 1.0), float)
    q = np.array([0.5, 2.0])
    np.testing.assert_array_equal(
        gc.theory.chi(q, "tanh", 1.2), [gc.theory.chi(x, "tanh", 1.2) for x in q]
    )
    np.testing.assert_array_equal(
        gc.theory.length_map(1.0, "tanh", sw, 0.3),
        [gc.theory.length_map(1.0, "tanh", s, 0.3) for s in sw],
    )
    with pytest.raises(ValueError, match=r"sigma_w must be .*\(at index \(1,\)\)"):
        gc.theory.chi_1("tanh", [1.0, -1.0])
    with pytest.raises(TypeError, match="sigma_b must hold real numbers"):
        gc.theory.chi_1("tanh", [1.0], ["a"])


def residual_chain(scale, width=8, seed=0):
    """A factory a sweep may take: a residual chain of blocks, built from its arguments."""
    blocks = [gc.Residual([gc.Activation("relu"), gc.Linear(width, width)], scale=scale)] * 6
    return gc.Chain(blocks, init="he_normal", seed=seed)


def test_chain_targets():
    g = gc.sweep(residual_chain, dims={"scale": [0.1, 1.0]}, measure="backward", batch=4)
    chain_seed, rng = point_inputs(0, 1, 0)
    rep = residual_chain(1.0, seed=chain_seed).backward(rng.standard_normal((4, 8)))
    assert g.values["log10_total_norm"][1, 0] == rep.log10_total_norm
    assert_close(
        g.values["growth"][1, 0], slope_from_output(rep.log10_activation_grad_norms), rtol=1e-9
    )
    assert (
        g.values["log10_first_weight_grad_norm"][1, 0]
        == rep.log10_param_grad_norms["0.block.1.weight"]
    )
    blocks = [gc.Linear(8, 8), gc.Activation("tanh")] * 4
    c = gc.sweep(gc.Chain, dims={"gain": [0.5, 2.0]}, fixed={"blocks": blocks}, batch=4)
    chain_seed, rng = point_inputs(0, 0, 0)
    rep = gc.Chain(blocks, gain=0.5, seed=chain_seed).backward(rng.standard_normal((4, 8)))
    assert c.values["log10_first"][0, 0] == rep.log10_activation_grad_norms[0]


def test_points_release_the_gil():
    """The default executor's threads run points side by side: drawing a chain's weights
    (and redrawing them into a kept chain) leaves the GIL free, as its passes do."""
    net = gc.MLP(depth=50, width=512, init="normal")
    # 13 million normal draws: tens of milliseconds, each 2 ms a tick when the GIL is free.
    assert ticks_while(lambda: gc.MLP(depth=50, width=512, init="normal", seed=1)) >= 5
    assert ticks_while(lambda: net._reinit(gain=1.0, sigma_w=2.0, bias_std=0.1, seed=2)) >= 5
    fresh = gc.MLP(depth=50, width=512, init="normal", sigma_w=2.0, bias_std=0.1, seed=2)
    for a, b in zip(net.weights + net.biases, fresh.weights + fresh.biases):
        np.testing.assert_array_equal(a, b)


def test_concurrent_points_leave_the_blas_threads_as_they_were():
    """OpenBLAS's thread count is one setting per process: the points running at once on
    the sweep's threads share one guard that sets it to 1 and restores it once the last
    pass is over (two guards each restoring what it found would leave it at 1)."""
    before = gc._core.blas_threads()
    for _ in range(3):
        gc.sweep(gc.MLP, dims={"sigma_w": np.linspace(0.5, 2, 12)}, workers=2, batch=64,
                 fixed={"depth": 30, "width": 192, "init": "normal"}, draws="independent")  # fmt: skip
        assert gc._core.blas_threads() == before
