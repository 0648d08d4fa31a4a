"""Plots of gradient norms, spectra, sweeps and training runs (matplotlib).

Every function draws on the Axes (or Figure) it is given, or on a new one, and returns
it. Norms are plotted as their exact log10 arrays on a linear axis whose ticks read as
powers of ten (``10^-3000``), so a norm far below or above the float range plots where it
belongs instead of at 0 or inf; ``-inf`` (a gradient that is exactly zero) and NaN leave a
gap. matplotlib is optional: ``import gradchain.plot`` works without it, and calling a
function raises an ImportError that says how to install it
(``pip install "gradchain[plot]"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import theory as _theory

__all__ = ["history", "layer_norms", "phase_diagram", "scalar_chain", "spectrum", "theory"]

_INSTALL = 'pip install "gradchain[plot]" (or pip install matplotlib)'
_QUANTITIES = ("activation", "weight", "bias", "cell")
# Dimension names that mean the bias std in a sweep of gc.MLP (its argument) or of the theory.
_BIAS_DIMS = ("bias_std", "sigma_b")


def _pyplot(what: str) -> Any:
    """matplotlib.pyplot, imported on first use so that gradchain never needs it."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            f"gradchain.plot.{what} needs matplotlib, an optional dependency: {_INSTALL}"
        ) from exc
    return plt


def _axes(plt: Any, ax: Any) -> Any:
    if ax is None:
        _, ax = plt.subplots()
    return ax


def _power_label(value: float, _pos: Any = None) -> str:
    """Tick label of a log10 value: ``10^k``, or ``m x 10^k`` between whole powers."""
    if not math.isfinite(value):
        return ""
    k = math.floor(value + 1e-9)
    if abs(value - k) < 1e-9:
        return f"$10^{{{k}}}$"
    m = 10.0 ** (value - k)
    return f"${m:.2g}\\times10^{{{k}}}$"


def _power_ticks(vmin: float, vmax: float) -> np.ndarray:
    """log10 tick positions: whole powers of ten where the range holds at least three,
    else the 1-2-5 (or 1-9) mantissas of each decade, as a log axis would place them."""
    from matplotlib.ticker import MaxNLocator

    lo, hi = min(vmin, vmax), max(vmin, vmax)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return np.array([])
    if hi - lo >= 2:
        locator = MaxNLocator(nbins="auto", steps=[1, 2, 2.5, 5, 10], integer=True)
        return np.asarray(locator.tick_values(lo, hi))
    decades = range(math.floor(lo) - 1, math.ceil(hi) + 1)
    for mantissas in ((1, 2, 5), range(1, 10)):
        ticks = np.array([k + math.log10(m) for k in decades for m in mantissas])
        ticks = ticks[(ticks >= lo - 1e-9) & (ticks <= hi + 1e-9)]
        if ticks.size >= 3:
            return ticks
    return np.asarray(MaxNLocator(nbins=4).tick_values(lo, hi))


def _powers_of_ten(axis: Any) -> None:
    """Ticks of an axis that holds log10 values, labelled as powers of ten."""
    from matplotlib.ticker import FuncFormatter, Locator

    class PowerLocator(Locator):
        def __call__(self) -> Any:
            assert self.axis is not None  # set by set_major_locator
            return self.tick_values(*self.axis.get_view_interval())

        def tick_values(self, vmin: float, vmax: float) -> Any:
            return _power_ticks(vmin, vmax)

    axis.set_major_locator(PowerLocator())
    axis.set_major_formatter(FuncFormatter(_power_label))


def _log10_of(report: Any, quantity: str) -> tuple[np.ndarray, np.ndarray, str, str]:
    """(index, log10 norms, x label, y label) of one report's per-layer or per-step norms."""
    if quantity not in _QUANTITIES:
        raise ValueError(
            f"quantity must be one of {', '.join(map(repr, _QUANTITIES))}; got {quantity!r}"
        )
    if hasattr(report, "log10_layer_state_grad_norms"):  # RecurrentReport
        if quantity == "activation":
            y, sym = report.log10_state_grad_norms, "h"
        elif quantity == "cell":
            y, sym = report.log10_cell_grad_norms, "c"
            if y is None:
                raise ValueError(
                    f"quantity='cell' needs an LSTM report (cell states); got a {report.cell!r} report"
                )
        else:
            raise ValueError(
                f"a RecurrentReport has per-step norms of quantity 'activation' (the states "
                f"h_t) or 'cell' (an LSTM's c_t); got {quantity!r}"
            )
        y = np.asarray(y, dtype=np.float64)
        return np.arange(y.size), y, "time step t", f"||dL/d{sym}_t||"
    if quantity == "cell":
        raise ValueError("quantity='cell' needs a RecurrentReport of an LSTM")
    if quantity in ("weight", "bias"):
        y = getattr(report, f"log10_{quantity}_grad_norms", None)
        if not isinstance(y, np.ndarray):
            raise ValueError(
                f"quantity={quantity!r} needs per-layer {quantity} norms (a BackwardReport of "
                f"gc.MLP); got {type(report).__name__}"
            )
        y = np.asarray(y, dtype=np.float64)
        sym = "W" if quantity == "weight" else "b"
        return np.arange(1, y.size + 1), y, "layer l", f"||dL/d{sym}_l||"
    y = getattr(report, "log10_activation_grad_norms", None)
    if y is None:
        if isinstance(report, (np.ndarray, Sequence)):
            y = report  # log10 values given directly
        else:
            raise TypeError(
                "layer_norms takes BackwardReport, ChainReport, RecurrentReport, "
                "theory.GradNormPrediction, theory.ScalarChain or a 1-d array of log10 norms; "
                f"got {type(report).__name__}"
            )
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError(f"log10 norms must be 1-d; got shape {y.shape}")
    return np.arange(y.size), y, "layer l", "||dL/dh_l||"


def layer_norms(
    reports: Any,
    labels: Sequence[str] | None = None,
    quantity: str = "activation",
    ax: Any = None,
) -> Any:
    """Per-layer (or per-timestep) gradient norms on a log axis, one line per report.

    The lines are the reports' exact log10 arrays, so a norm of ``1e-3200`` (0 as a float)
    plots at ``10^-3200``.

    Parameters
    ----------
    reports : report or sequence of reports
        :class:`~gradchain.BackwardReport` or :class:`~gradchain.ChainReport`
        (``log10_activation_grad_norms`` against l = 0..L), :class:`~gradchain.RecurrentReport`
        (the top layer's ``log10_state_grad_norms`` against t = 0..T), anything else with
        ``log10_activation_grad_norms`` (:class:`gradchain.theory.GradNormPrediction`,
        :class:`gradchain.theory.ScalarChain`), or a 1-d array of log10 norms.
    labels : sequence of str, optional
        Legend entries, one per report.
    quantity : {"activation", "weight", "bias", "cell"}
        ``||dL/dh||`` (an RNN's states), an MLP's per-layer weight or bias gradients
        (l = 1..L), or an LSTM's cell states ``||dL/dc_t||``.
    ax : matplotlib Axes, optional
        Axes to draw on; a new figure's by default.

    Returns
    -------
    matplotlib Axes

    Raises
    ------
    ImportError
        Without matplotlib.
    ValueError
        A quantity the report does not have, or as many labels as reports.
    """
    plt = _pyplot("layer_norms")
    if not isinstance(reports, (list, tuple)):
        reports = [reports]
    if labels is not None and len(labels) != len(reports):
        raise ValueError(
            f"labels must have one entry per report ({len(reports)}); got {len(labels)}"
        )
    ax = _axes(plt, ax)
    xlabel = ylabel = ""
    for i, rep in enumerate(reports):
        x, y, xlabel, ylabel = _log10_of(rep, quantity)
        ax.plot(x, y, label=None if labels is None else labels[i])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _powers_of_ten(ax.yaxis)
    if labels is not None:
        ax.legend()
    return ax


def scalar_chain(
    w: Sequence[float] | float = (0.9, 1.0, 1.1), depth: int = 50, ax: Any = None
) -> Any:
    """``|w|^L`` against the depth L = 0..depth, one line per w, on a log axis.

    The lines are ``L log10 |w|`` (:func:`gradchain.theory.scalar_chain`), the gain of the
    scalar chain ``h_L = w^L h_0``: the one-line model of vanishing (``|w| < 1``) and
    exploding (``|w| > 1``) gradients.

    Parameters
    ----------
    w : float or sequence of float
    depth : int
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib Axes
    """
    plt = _pyplot("scalar_chain")
    ws = np.atleast_1d(np.asarray(w, dtype=np.float64))
    chains = [_theory.scalar_chain(float(wi), depth) for wi in ws]
    ax = _axes(plt, ax)
    for c in chains:
        # log10 |dh_L/dh_l| = (L - l) log10|w|, read from the top: the gain of L - l layers.
        ax.plot(np.arange(c.depth + 1), c.log10_activation_grad_norms[::-1], label=f"w = {c.w:g}")
    ax.set_xlabel("depth L")
    ax.set_ylabel("|w|^L")
    _powers_of_ten(ax.yaxis)
    ax.legend()
    return ax


def _grid_axes(grid: Any) -> tuple[str, str, bool]:
    """(x dim, y dim, transpose): sigma_w across and the bias std up where both are swept."""
    dims = [d for d in grid.dims if d != "seed"]
    if len(dims) != 2:
        raise ValueError(
            f"phase_diagram needs a sweep over exactly two dimensions besides 'seed'; got {dims}"
        )
    a, b = dims
    if b == "sigma_w" or (a in _BIAS_DIMS and b not in _BIAS_DIMS):
        return b, a, True
    return a, b, False


def _boundary_activation(grid: Any, xdim: str, ydim: str) -> tuple[str, dict[str, float]] | str:
    """The activation and its parameters for the chi_1 = 1 boundary, or why there is none."""
    fixed = dict(getattr(grid, "fixed", {}) or {})
    if xdim != "sigma_w" or ydim not in _BIAS_DIMS:
        return f"the swept dimensions must be 'sigma_w' and one of {_BIAS_DIMS}; got {xdim!r}, {ydim!r}"
    if fixed.get("init", "normal") != "normal":
        return (
            f"sigma_w is the weight std of init='normal'; the sweep's fixed init is "
            f"{fixed['init']!r}"
        )
    if fixed.get("norm") is not None or fixed.get("residual"):
        return "the mean-field boundary is that of a plain MLP (no norm, no residual)"
    act = fixed.get("activation", "tanh")
    if not isinstance(act, str):
        return f"the activation must be fixed to one name; got {act!r}"
    kw = {k: float(fixed[k]) for k in ("negative_slope", "alpha") if k in fixed}
    return act, kw


def phase_diagram(
    grid: Any,
    var: str = "growth",
    theory: bool | None = None,
    ax: Any = None,
    cmap: str | None = None,
) -> Any:
    """A heat map of a sweep over two dimensions, with the order-to-chaos boundary.

    The colours are ``grid.mean(var)`` (the seed mean) on the sweep's grid, with
    ``sigma_w`` across and the bias std up; for values of both signs (``var="growth"``,
    log10 of the per-layer gradient factor) a diverging map, white at 0, blue where
    gradients vanish and red where they explode. The mean-field boundary ``chi_1 = 1``
    (:func:`gradchain.theory.order_chaos_boundary`, for the activation in ``grid.fixed``)
    is drawn over it as a black line.

    Parameters
    ----------
    grid : gradchain.SweepResult
        A sweep with two dimensions besides ``"seed"``.
    var : str
        One of ``grid.values``.
    theory : bool, optional
        Draw the boundary: True requires it (a ValueError says why it cannot be drawn),
        False leaves it out, None (default) draws it where the sweep determines it (an
        MLP sweep over ``sigma_w`` and ``bias_std`` or ``sigma_b`` with ``init="normal"``
        and one activation).
    ax : matplotlib Axes, optional
    cmap : str, optional
        Colour map; ``"RdBu_r"`` for a variable of both signs, else ``"viridis"``.

    Returns
    -------
    matplotlib Axes
        Its first collection is the heat map (a QuadMesh whose array is ``grid.mean(var)``
        with the y dimension first), and ``ax.collections[0].colorbar`` its colour bar.
    """
    plt = _pyplot("phase_diagram")
    xdim, ydim, transpose = _grid_axes(grid)
    z = np.asarray(grid.mean(var), dtype=np.float64)
    img = z if transpose else z.T  # rows follow y
    x = np.asarray(grid.dims[xdim], dtype=np.float64)
    y = np.asarray(grid.dims[ydim], dtype=np.float64)
    boundary = _boundary_activation(grid, xdim, ydim) if theory is not False else None
    if theory is True and isinstance(boundary, str):
        raise ValueError(f"phase_diagram cannot draw the chi_1 = 1 boundary: {boundary}")
    ax = _axes(plt, ax)
    finite = img[np.isfinite(img)]
    both_signs = finite.size > 0 and finite.min() < 0 < finite.max()
    kw: dict[str, Any] = {"cmap": cmap or ("RdBu_r" if both_signs else "viridis")}
    if both_signs:  # white at 0, full colour at either extreme: the sign is the phase
        from matplotlib.colors import TwoSlopeNorm

        kw["norm"] = TwoSlopeNorm(0.0, float(finite.min()), float(finite.max()))
    mesh = ax.pcolormesh(x, y, img, shading="nearest", **kw)
    label = "growth: log10 of the gradient factor per layer" if var == "growth" else var
    ax.figure.colorbar(mesh, ax=ax, label=label)
    if isinstance(boundary, tuple):
        act, akw = boundary
        b = _theory.order_chaos_boundary(act, np.linspace(y.min(), y.max(), 101), **akw)
        ax.plot(b.sigma_w, b.sigma_b, color="black", label="mean field: chi_1 = 1")
        ax.set_xlim(x.min() - _half_step(x), x.max() + _half_step(x))
        ax.legend(loc="best", framealpha=0.8)
    ax.set_xlabel(xdim)
    ax.set_ylabel(ydim)
    fixed = getattr(grid, "fixed", {}) or {}
    shown = ", ".join(f"{k}={fixed[k]}" for k in ("activation", "depth", "width") if k in fixed)
    if shown:
        ax.set_title(shown)
    return ax


def _half_step(a: np.ndarray) -> float:
    return float(np.diff(a).min()) / 2 if a.size > 1 else 0.5


def spectrum(
    spec: Any,
    kind: str = "convergence",
    directions: int | None = None,
    label: str | None = None,
    ax: Any = None,
) -> Any:
    """Lyapunov exponents of a :class:`~gradchain.JacobianSpectrum`, or their convergence.

    Parameters
    ----------
    spec : gradchain.JacobianSpectrum
    kind : {"convergence", "exponents"}
        ``"convergence"``: the running estimates ``log|R_ii| / l`` (batch mean,
        :attr:`~gradchain.JacobianSpectrum.convergence`) against the depths l where a QR
        happened, one line per direction i; ``"exponents"``: the exponents at the last
        depth (batch mean) against i = 1..k.
    directions : int, optional
        Draw the first this many directions (convergence only); all k by default.
    label : str, optional
        Legend entry (convergence: prefixed to ``i = 1``, ...), e.g. to draw two spectra on
        one Axes.
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib Axes
    """
    plt = _pyplot("spectrum")
    if kind not in ("convergence", "exponents"):
        raise ValueError(f"kind must be 'convergence' or 'exponents'; got {kind!r}")
    ax = _axes(plt, ax)
    if kind == "exponents":
        lam = np.asarray(spec.lyapunov_exponents_mean, dtype=np.float64)
        ax.plot(np.arange(1, lam.size + 1), lam, marker=".", linestyle="none", label=label)
        ax.axhline(0.0, color="gray", linewidth=0.8)
        ax.set_xlabel("direction i")
        ax.set_ylabel(f"Lyapunov exponent (ln per layer, depth {spec.depth})")
        if label is not None:
            ax.legend()
        return ax
    with np.errstate(invalid="ignore"):
        conv = np.asarray(spec.convergence, dtype=np.float64).mean(axis=0)
    n = conv.shape[1] if directions is None else min(int(directions), conv.shape[1])
    depths = np.asarray(spec.depths)
    prefix = "" if label is None else f"{label}, "
    for i in range(n):
        ax.plot(depths, conv[:, i], label=f"{prefix}i = {i + 1}" if n <= 8 else None)
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.set_xlabel("depth l")
    ax.set_ylabel("log|R_ii| / l (ln per layer)")
    if n <= 8:
        ax.legend()
    return ax


def history(hist: Any, fig: Any = None, heatmap: str = "params") -> Any:
    """A training run in three panels: loss, total gradient norm, per-layer norms.

    Panel 1: the training loss (and the validation loss where recorded). Panel 2: the
    total gradient norm before and after clipping (one line where nothing was clipped).
    Panel 3: a heat map of the gradient norms over the recorded steps (across) and the
    parameters or layers (up). All norms are the exact log10 arrays on powers-of-ten axes.

    Parameters
    ----------
    hist : gradchain.History
    fig : matplotlib Figure, optional
        Figure to draw on (its three new axes share the step axis); a new one by default.
    heatmap : {"params", "activations"}
        ``log10_param_grad_norms`` (rows: ``param_names``), or
        ``log10_activation_grad_norms`` (rows: ``activation_names``; needs
        ``record_activation_grads=True``).

    Returns
    -------
    matplotlib Figure
        Its axes are ``fig.axes[:3]``; the heat map is ``fig.axes[2].collections[0]``.
    """
    plt = _pyplot("history")
    if heatmap == "params":
        grid, names = hist.log10_param_grad_norms, hist.param_names
        what = "||dL/dp||"
    elif heatmap == "activations":
        grid, names = hist.log10_activation_grad_norms, hist.activation_names
        what = "||dL/dh||"
        if grid is None:
            raise ValueError(
                "heatmap='activations' needs a history recorded with record_activation_grads=True"
            )
    else:
        raise ValueError(f"heatmap must be 'params' or 'activations'; got {heatmap!r}")
    if fig is None:
        fig = plt.figure(figsize=(7, 8))
    ax_loss, ax_norm, ax_map = fig.subplots(3, 1, sharex=True)
    steps = np.asarray(hist.steps, dtype=np.float64)

    ax_loss.plot(steps, hist.log10_loss, label="train")
    if hist.val_loss is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            ax_loss.plot(steps, np.log10(hist.val_loss), label="validation")
        ax_loss.legend()
    ax_loss.set_ylabel("loss")
    _powers_of_ten(ax_loss.yaxis)

    ax_norm.plot(steps, hist.log10_total_norm, label="before clipping")
    clipped = bool(np.any(hist.log10_clip_coef < 0))
    if clipped or hist.max_norm is not None or hist.clip_value is not None:
        ax_norm.plot(steps, hist.log10_clipped_total_norm, linestyle="--", label="after clipping")
        if hist.max_norm is not None:
            ax_norm.axhline(math.log10(hist.max_norm), color="gray", linewidth=0.8)
        ax_norm.legend()
    ax_norm.set_ylabel("total gradient norm")
    _powers_of_ten(ax_norm.yaxis)

    values = np.asarray(grid, dtype=np.float64).T  # rows: parameters or layers
    finite = values[np.isfinite(values)]
    kw = {} if finite.size == 0 else {"vmin": float(finite.min()), "vmax": float(finite.max())}
    mesh = ax_map.pcolormesh(steps, np.arange(len(names)), values, shading="nearest", **kw)
    bar = fig.colorbar(mesh, ax=ax_map, label=what)
    _powers_of_ten(bar.ax.yaxis)
    every = max(1, math.ceil(len(names) / 12))
    ticks = np.arange(0, len(names), every)
    ax_map.set_yticks(ticks, [names[i] for i in ticks])
    ax_map.set_ylabel("parameter" if heatmap == "params" else "layer output")
    ax_map.set_xlabel("step")
    return fig


def theory(cmp: Any, ax: Any = None) -> Any:
    """A :class:`~gradchain.TheoryComparison`: measured and mean-field gradient norms
    against the layer (step, block), relative to the top, on a log axis.

    ``compare_theory(...).plot()`` draws this.

    Parameters
    ----------
    cmp : gradchain.TheoryComparison
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib Axes
        Its two lines are ``cmp.measured`` and ``cmp.predicted`` against ``cmp.index``.
    """
    plt = _pyplot("theory")
    ax = _axes(plt, ax)
    name = cmp._labels()[0]
    top = {"rnn": "T", "mlp": "L"}.get(cmp.kind, "y")
    sub = "t" if cmp.kind == "rnn" else "l"
    ax.plot(cmp.index, cmp.measured, label="measured")
    ax.plot(cmp.index, cmp.predicted, linestyle="--", label="mean field")
    ax.set_xlabel(name)
    ax.set_ylabel(f"||dL/dh_{sub}|| / ||dL/dh_{top}||")
    _powers_of_ten(ax.yaxis)
    if cmp.kind in ("mlp", "rnn"):
        title = (
            f"{cmp.activation}, sigma_w={cmp.sigma_w:.3g}, "
            f"sigma_b={cmp.effective_sigma_b:.3g} ({cmp.phase})"
        )
    else:
        title = f"{cmp.kind.replace('_', ' ')}, {cmp.activation}, sigma_w={cmp.sigma_w:.3g}"
        title += "" if cmp.scale is None else f", scale={cmp.scale:.3g}"
    ax.set_title(title)
    ax.legend()
    return ax
