"""gradchain.plot: each plot renders headless, and what it draws is the data it was given.

Lines and heat maps are compared with the log10 arrays of the reports exactly (not to a
tolerance): the plots draw those arrays, so a norm below the float range (a 5000-layer
sigmoid chain's first-layer gradient, about 1e-3200) sits at its true height.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import gradchain as gc
import numpy as np
import pytest

mpl = pytest.importorskip("matplotlib")
mpl.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.collections import QuadMesh


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def ydata(line) -> np.ndarray:
    return np.asarray(line.get_ydata(), dtype=np.float64)


def tick_texts(axis, fig) -> list[str]:
    fig.canvas.draw()
    return [t.get_text() for t in axis.get_ticklabels() if t.get_text()]


def mesh_of(ax) -> QuadMesh:
    meshes = [c for c in ax.collections if isinstance(c, QuadMesh)]
    assert len(meshes) == 1
    return meshes[0]


def mesh_values(mesh: QuadMesh, shape: tuple[int, ...]) -> np.ndarray:
    return np.ma.filled(np.asarray(mesh.get_array()).reshape(shape).astype(np.float64), np.nan)


# --------------------------------------------------------------------------------------
# layer_norms
# --------------------------------------------------------------------------------------


def test_layer_norms_draws_each_reports_log10_norms():
    x = np.random.default_rng(0).standard_normal((4, 16))
    sig = gc.MLP(depth=20, width=16, activation="sigmoid", seed=0).backward(x)
    relu = gc.MLP(depth=20, width=16, activation="relu", init="he_normal", seed=0).backward(x)
    ax = gc.plot.layer_norms([sig, relu], labels=["sigmoid", "relu"])
    lines = ax.get_lines()
    assert len(lines) == 2
    for line, rep in zip(lines, (sig, relu)):
        np.testing.assert_array_equal(ydata(line), rep.log10_activation_grad_norms)
        np.testing.assert_array_equal(line.get_xdata(), np.arange(21))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["sigmoid", "relu"]
    assert ax.get_xlabel() == "layer l"


def test_layer_norms_is_exact_below_the_float_range():
    net = gc.MLP(depth=5000, width=8, activation="sigmoid", seed=0)
    rep = net.backward(np.random.default_rng(0).standard_normal((2, 8)))
    first = rep.log10_activation_grad_norms[0]
    assert -3500 < first < -3000 and rep.activation_grad_norms[0] == 0.0  # 0 as a float
    ax = gc.plot.layer_norms(rep)
    y = ydata(ax.get_lines()[0])
    np.testing.assert_array_equal(y, rep.log10_activation_grad_norms)
    lo, hi = ax.get_ylim()
    assert lo <= first and hi >= rep.log10_activation_grad_norms[-1]
    labels = tick_texts(ax.yaxis, ax.figure)
    # powers of ten far below float64's smallest subnormal (1e-324)
    exponents = [int(t.removeprefix("$10^{").removesuffix("}$").replace("\N{MINUS SIGN}", "-"))
                 for t in labels]  # fmt: skip
    assert min(exponents) <= -3000 and all(t.startswith("$10^{") for t in labels)


def test_layer_norms_of_weights_biases_and_arrays():
    rep = gc.MLP(depth=6, width=8, bias_std=0.1, seed=1).backward(np.ones((2, 8)))
    ax = gc.plot.layer_norms(rep, quantity="weight")
    np.testing.assert_array_equal(ydata(ax.get_lines()[0]), rep.log10_weight_grad_norms)
    np.testing.assert_array_equal(ax.get_lines()[0].get_xdata(), np.arange(1, 7))
    ax = gc.plot.layer_norms(rep, quantity="bias")
    np.testing.assert_array_equal(ydata(ax.get_lines()[0]), rep.log10_bias_grad_norms)
    pred = gc.theory.predicted_grad_norms(6, "tanh", 1.0, 0.0)
    ax = gc.plot.layer_norms([rep, pred, [0.0, -1.0, -2.0]])
    np.testing.assert_array_equal(ydata(ax.get_lines()[1]), pred.log10_activation_grad_norms)
    np.testing.assert_array_equal(ydata(ax.get_lines()[2]), [0.0, -1.0, -2.0])
    assert ax.get_legend() is None


def test_layer_norms_of_recurrent_reports_over_time():
    x = np.random.default_rng(0).standard_normal((30, 2, 3))
    rnn = gc.RNN("tanh", 3, 8, seed=0).backward(x)
    lstm = gc.RNN("lstm", 3, 8, seed=0).backward(x)
    ax = gc.plot.layer_norms([rnn, lstm], labels=["rnn", "lstm"])
    np.testing.assert_array_equal(ydata(ax.get_lines()[0]), rnn.log10_state_grad_norms)
    np.testing.assert_array_equal(ydata(ax.get_lines()[1]), lstm.log10_state_grad_norms)
    np.testing.assert_array_equal(ax.get_lines()[0].get_xdata(), np.arange(31))
    assert ax.get_xlabel() == "time step t" and "h_t" in ax.get_ylabel()
    ax = gc.plot.layer_norms(lstm, quantity="cell")
    np.testing.assert_array_equal(ydata(ax.get_lines()[0]), lstm.log10_cell_grad_norms)
    with pytest.raises(ValueError, match="LSTM"):
        gc.plot.layer_norms(rnn, quantity="cell")


def test_layer_norms_draws_on_the_axes_given():
    rep = gc.MLP(depth=3, width=4, seed=0).backward(np.ones((1, 4)))
    _fig, ax = plt.subplots()
    assert gc.plot.layer_norms(rep, ax=ax) is ax
    assert len(ax.get_lines()) == 1


def test_layer_norms_refuses_what_it_cannot_draw():
    rep = gc.MLP(depth=3, width=4, seed=0).backward(np.ones((1, 4)))
    with pytest.raises(ValueError, match="labels must have one entry per report"):
        gc.plot.layer_norms([rep, rep], labels=["one"])
    with pytest.raises(ValueError, match="quantity must be one of"):
        gc.plot.layer_norms(rep, quantity="gradient")
    with pytest.raises(TypeError, match="layer_norms takes"):
        gc.plot.layer_norms(object())
    with pytest.raises(ValueError, match="1-d"):
        gc.plot.layer_norms(np.zeros((2, 2)))


# --------------------------------------------------------------------------------------
# scalar_chain
# --------------------------------------------------------------------------------------


def test_scalar_chain_draws_abs_w_to_the_L():
    ax = gc.plot.scalar_chain(w=[0.9, 1.0, -1.1], depth=50)
    lines = ax.get_lines()
    assert len(lines) == 3
    L = np.arange(51)
    for line, w in zip(lines, (0.9, 1.0, -1.1)):
        np.testing.assert_array_equal(line.get_xdata(), L)
        np.testing.assert_allclose(ydata(line), L * np.log10(abs(w)), rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(10 ** ydata(lines[2])[-1], 1.1**50, rtol=1e-12)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["w = 0.9", "w = 1", "w = -1.1"]


def test_scalar_chain_beyond_the_float_range():
    ax = gc.plot.scalar_chain(w=1e-5, depth=100)  # 1e-500 at the bottom
    assert ydata(ax.get_lines()[0])[-1] == pytest.approx(-500, rel=1e-12)
    assert "$10^{" in "".join(tick_texts(ax.yaxis, ax.figure))


# --------------------------------------------------------------------------------------
# phase_diagram
# --------------------------------------------------------------------------------------


@dataclass
class GridLike:
    """What phase_diagram reads of a sweep result (dims, fixed, mean(var))."""

    dims: dict[str, np.ndarray]
    fixed: dict[str, Any]
    values: dict[str, np.ndarray] = field(default_factory=dict)

    def mean(self, var: str) -> np.ndarray:
        a = self.values[var]
        if "seed" in self.dims:
            return np.nanmean(a, axis=list(self.dims).index("seed"))
        return a


def growth_grid(order=("sigma_w", "bias_std", "seed")) -> GridLike:
    """A hand-built tanh sweep: the mean-field growth 0.5 log10 chi_1 plus seed noise."""
    dims = {"sigma_w": np.linspace(0.5, 3.0, 6), "bias_std": np.linspace(0.0, 1.0, 4),
            "seed": np.arange(2)}  # fmt: skip
    sw, sb, seed = np.meshgrid(*dims.values(), indexing="ij")
    chi = np.vectorize(lambda w, b: gc.theory.mean_field("tanh", w, b, correlation=False).chi_1)
    g = 0.5 * np.log10(chi(sw, sb)) + 0.01 * (seed - 0.5)
    perm = [list(dims).index(d) for d in order]
    return GridLike(
        dims={d: dims[d] for d in order},
        fixed={"activation": "tanh", "init": "normal", "depth": 50, "width": 64},
        values={"growth": np.transpose(g, perm)},
    )


@pytest.mark.parametrize(
    "order", [("sigma_w", "bias_std", "seed"), ("seed", "bias_std", "sigma_w")]
)
def test_phase_diagram_heat_map_is_the_seed_mean(order):
    grid = growth_grid(order)
    ax = gc.plot.phase_diagram(grid, theory=True)
    want = grid.mean("growth")
    if [d for d in order if d != "seed"] == ["sigma_w", "bias_std"]:
        want = want.T  # rows follow bias_std
    mesh = mesh_of(ax)
    np.testing.assert_array_equal(mesh_values(mesh, (4, 6)), want)
    assert ax.get_xlabel() == "sigma_w" and ax.get_ylabel() == "bias_std"
    assert mesh.get_clim() == (want.min(), want.max())
    assert mesh.norm(0.0) == 0.5  # white at 0: vanishing against exploding
    assert mesh.colorbar is not None


def test_phase_diagram_draws_the_mean_field_boundary():
    grid = growth_grid()
    ax = gc.plot.phase_diagram(grid, theory=True)
    (line,) = ax.get_lines()
    sb = np.asarray(line.get_ydata())
    want = gc.theory.order_chaos_boundary("tanh", sb)
    np.testing.assert_array_equal(line.get_xdata(), want.sigma_w)
    assert sb[0] == 0.0 and sb[-1] == 1.0
    assert line.get_xdata()[0] == pytest.approx(1.0, rel=1e-8)  # tanh, sigma_b = 0
    # where the boundary passes, the measured growth changes sign
    z = grid.mean("growth")
    for j, b in enumerate(grid.dims["bias_std"]):
        crit = gc.theory.order_chaos_boundary("tanh", [b]).sigma_w[0]
        assert np.all((z[:, j] < 0) == (grid.dims["sigma_w"] < crit))
    assert gc.plot.phase_diagram(grid, theory=False).get_lines() == []


def test_phase_diagram_of_a_real_sweep():
    grid = gc.sweep(
        gc.MLP,
        dims={"sigma_w": [0.5, 1.0, 2.0, 3.0], "bias_std": [0.0, 0.5, 1.0]},
        fixed={"depth": 12, "width": 16, "activation": "tanh", "init": "normal"},
        seeds=2,
        batch=4,
    )
    ax = gc.plot.phase_diagram(grid, theory=True)
    np.testing.assert_array_equal(mesh_values(mesh_of(ax), (3, 4)), grid.mean("growth").T)
    (line,) = ax.get_lines()
    assert line.get_xdata()[0] == pytest.approx(1.0, rel=1e-8)  # tanh at sigma_b = 0
    assert ax.get_title() == "activation=tanh, depth=12, width=16"


def test_phase_diagram_theory_needs_sigma_w_and_bias_dims():
    grid = growth_grid()
    grid.dims = {"width": grid.dims["sigma_w"], "bias_std": grid.dims["bias_std"],
                 "seed": grid.dims["seed"]}  # fmt: skip
    ax = gc.plot.phase_diagram(grid)  # theory=None: drawn where it is determined
    assert ax.get_lines() == [] and ax.get_xlabel() == "width"
    with pytest.raises(ValueError, match="cannot draw the chi_1 = 1 boundary"):
        gc.plot.phase_diagram(grid, theory=True)
    grid = growth_grid()
    grid.fixed["init"] = "xavier_normal"
    with pytest.raises(ValueError, match="init='normal'"):
        gc.plot.phase_diagram(grid, theory=True)


def test_phase_diagram_needs_two_dims():
    grid = growth_grid()
    grid.dims = {"sigma_w": grid.dims["sigma_w"]}
    with pytest.raises(ValueError, match="exactly two dimensions"):
        gc.plot.phase_diagram(grid)


def test_phase_diagram_one_signed_values_use_a_sequential_map():
    grid = growth_grid()
    grid.values["log10_first"] = np.abs(grid.values["growth"]) + 1.0
    mesh = mesh_of(gc.plot.phase_diagram(grid, var="log10_first"))
    assert mesh.get_cmap().name == "viridis"


# --------------------------------------------------------------------------------------
# spectrum, history, theory
# --------------------------------------------------------------------------------------


def test_spectrum_convergence_and_exponents():
    net = gc.MLP(depth=40, width=8, activation="linear", init="orthogonal", gain=1.5, seed=0)
    spec = gc.jacobian_spectrum(net, np.ones((2, 8)), k=3, interval=4)
    ax = gc.plot.spectrum(spec)
    lines = ax.get_lines()[:3]
    for i, line in enumerate(lines):
        np.testing.assert_array_equal(line.get_xdata(), spec.depths)
        np.testing.assert_array_equal(ydata(line), spec.convergence.mean(axis=0)[:, i])
        np.testing.assert_allclose(ydata(line), np.log(1.5), rtol=1e-10)  # orthogonal: ln gain
    ax = gc.plot.spectrum(spec, kind="exponents", label="orthogonal")
    np.testing.assert_array_equal(ydata(ax.get_lines()[0]), spec.lyapunov_exponents_mean)
    np.testing.assert_array_equal(ax.get_lines()[0].get_xdata(), [1, 2, 3])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["orthogonal"]
    assert len(gc.plot.spectrum(spec, directions=1).get_lines()) == 2  # one direction, zero line
    with pytest.raises(ValueError, match="kind must be"):
        gc.plot.spectrum(spec, kind="volume")


def _history(**kw):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4))
    y = np.tanh(x @ rng.standard_normal((4, 2)))
    net = gc.MLP(width=[4, 8, 8, 2], activation="tanh", seed=0)
    return gc.train(net, (x, y), optimizer=gc.optim.SGD(lr=0.5), steps=12, batch_size=8,
                    record_every=3, **kw)  # fmt: skip


def test_history_panels_hold_the_recorded_arrays():
    hist = _history(max_norm=0.05, record_activation_grads=True)
    assert np.any(hist.log10_clip_coef < 0)  # the run did clip
    fig = gc.plot.history(hist)
    ax_loss, ax_norm, ax_map = fig.axes[:3]
    np.testing.assert_array_equal(ydata(ax_loss.get_lines()[0]), hist.log10_loss)
    np.testing.assert_array_equal(ax_loss.get_lines()[0].get_xdata(), hist.steps)
    before, after = ax_norm.get_lines()[:2]
    np.testing.assert_array_equal(ydata(before), hist.log10_total_norm)
    np.testing.assert_array_equal(ydata(after), hist.log10_clipped_total_norm)
    assert np.all(ydata(after) <= np.log10(0.05) + 1e-12)
    grid = hist.log10_param_grad_norms
    np.testing.assert_array_equal(mesh_values(mesh_of(ax_map), grid.T.shape), grid.T)
    assert [t.get_text() for t in ax_map.get_yticklabels()] == list(hist.param_names)
    fig = gc.plot.history(hist, heatmap="activations")
    acts = hist.log10_activation_grad_norms
    np.testing.assert_array_equal(mesh_values(mesh_of(fig.axes[2]), acts.T.shape), acts.T)


def test_history_draws_on_the_figure_given():
    hist = _history()
    fig = plt.figure()
    assert gc.plot.history(hist, fig=fig) is fig
    assert len(fig.axes[1].get_lines()) == 1  # nothing clipped: one line
    with pytest.raises(ValueError, match="record_activation_grads=True"):
        gc.plot.history(hist, heatmap="activations")
    with pytest.raises(ValueError, match="heatmap must be"):
        gc.plot.history(hist, heatmap="weights")


def test_theory_draws_the_comparison_and_plot_delegates():
    cmp = gc.compare_theory(gc.MLP(depth=10, width=16, seed=0), batch=2, spectrum=False)
    ax = gc.plot.theory(cmp)
    measured, predicted = ax.get_lines()
    np.testing.assert_array_equal(ydata(measured), cmp.measured)
    np.testing.assert_array_equal(ydata(predicted), cmp.predicted)
    np.testing.assert_array_equal(measured.get_xdata(), cmp.index)
    ax2 = cmp.plot()
    np.testing.assert_array_equal(ydata(ax2.get_lines()[0]), cmp.measured)


# --------------------------------------------------------------------------------------
# without matplotlib
# --------------------------------------------------------------------------------------


def test_without_matplotlib_each_function_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    rep = gc.MLP(depth=2, width=4, seed=0).backward(np.ones((1, 4)))
    with pytest.raises(ImportError, match=r'layer_norms needs matplotlib.*"gradchain\[plot\]"'):
        gc.plot.layer_norms(rep)
    with pytest.raises(ImportError, match=r"scalar_chain needs matplotlib"):
        gc.plot.scalar_chain()


def test_gradchain_imports_without_matplotlib():
    from checks import run_python

    out = run_python(
        """
        import sys
        sys.modules["matplotlib"] = None
        import gradchain as gc
        import gradchain.plot
        print(callable(gc.plot.layer_norms), sys.modules["matplotlib"] is None)
        """
    )
    assert out.split() == ["True", "True"]  # importing it would have raised ImportError
