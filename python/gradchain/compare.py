"""Measured gradient norms beside their mean-field prediction, aligned layer by layer.

:func:`compare_theory` runs one backward pass through a chain with a seeded Gaussian
upstream gradient, reads the exact log10 norms ``||dL/dh_l||`` and sets them beside
:func:`gradchain.theory.predicted_grad_norms` (an :class:`~gradchain.MLP`) or the
mean-field Lyapunov exponent :func:`gradchain.theory.rnn_max_lyapunov_meanfield` (a
vanilla :class:`~gradchain.RNN`), with the weight and bias scales read from the chain's
initializer. Optionally it also measures the QR spectrum of the forward Jacobian products
(:func:`gradchain.jacobian_spectrum`) and sets the finite-depth Lyapunov exponents beside
their predictions.

Conventions
-----------
Curves are log10 ratios to the top: ``measured[l] = log10 ||dL/dh_l|| - log10
||dL/dh_L||`` for ``l = 0..L`` (``t = 0..T`` for an RNN, ``h_0`` the input or the initial
state), so both curves end at 0. Slopes are least-squares fits over the half of the chain
nearest the loss and are quoted *per layer going back towards the input*: the mean-field
value is ``0.5 log10 chi_1``, negative where gradients vanish and positive where they
explode. Exponents are natural logs per layer (or per time step).

Mean field predicts the *mean squared* growth: ``E||dL/dh_{l-1}||**2 = chi ||dL/dh_l||**2``.
The log of a mean exceeds the mean of a log, so measured log-norm slopes and Lyapunov
exponents sit below ``0.5 ln chi`` by O(1/width) per layer. For a linear chain with
Gaussian weights this is exact: a vector's log-norm grows by Newman's
``lambda_1 = 0.5 (ln sigma_w**2 + ln(2/n) + psi(n/2)) = 0.5 ln sigma_w**2 - 1/(2n) + O(n**-2)``
per layer (:func:`gradchain.theory.gaussian_lyapunov_spectrum`), not by
``0.5 ln sigma_w**2``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from . import _validate as v
from . import theory
from .jacobian import jacobian_spectrum
from .mlp import MLP
from .report import _jsonable
from .rnn import RNN

__all__ = ["TheoryComparison", "compare_theory"]

_LN10 = math.log(10.0)
_GAUSSIAN_INITS = ("normal", "xavier_normal", "he_normal", "lecun_normal")
_VANILLA = ("tanh", "relu")
_SAME = 1e-9  # relative: per-layer effective sigma_w counted as one value


# --------------------------------------------------------------------------- result


@dataclass(frozen=True, eq=False)
class TheoryComparison:
    """Measured per-layer (or per-step) gradient norms beside the mean-field prediction.

    Arrays are read-only. The spectrum fields are None when the spectrum was not asked for
    (``spectrum=False``) or is not available for the chain.

    Attributes
    ----------
    kind : {"mlp", "rnn"}
        The chain's type.
    activation : str
        The activation (an RNN's cell: ``tanh`` or ``relu``).
    net : str
        ``repr`` of the chain.
    depth : int
        Layers L (an RNN: time steps T).
    batch : int
        Examples in the backward pass.
    seed : int
        Seed of the upstream gradient (and of the default input).
    sigma_w : float
        Weight std of the theory: entries of ``W_l`` (an RNN's ``weight_hh``) have
        variance ``sigma_w**2 / fan_in``.
    sigma_b : float
        Bias std: of ``b_l``, or of ``b_ih + b_hh`` for an RNN.
    sigma_source, sigma_b_source : {"init", "given", "estimated"}
        Where ``sigma_w`` and ``sigma_b`` came from: the chain's initializer, the
        arguments, or the weights themselves (``fan_in * mean(W**2)`` averaged over
        layers, and ``mean(b**2)``).
    input_variance : float
        An RNN's input drive ``sigma_ih**2 * q_x``, the variance ``weight_ih @ x_t`` adds
        to every pre-activation (``sigma_ih**2 / input_size`` the variance of
        ``weight_ih`` entries, ``q_x`` the mean square entry of x); it acts as extra
        bias variance in mean field. 0 for an MLP.
    q0 : float
        Mean square entry of the input x (an MLP) or of the initial state h0 (an RNN).
    index : ndarray of int, shape (depth + 1,)
        ``l = 0..L`` (``t = 0..T``).
    measured : ndarray, shape (depth + 1,)
        ``log10 ||dL/dh_l|| - log10 ||dL/dh_L||`` from the exact log10 norms of one
        backward pass (Frobenius norms over the batch); ``-inf`` where a gradient is
        exactly zero.
    predicted : ndarray, shape (depth + 1,)
        The mean-field prediction of the same, index for index:
        ``0.5 * sum_{k > l} log10 chi(q_k)`` (:func:`gradchain.theory.predicted_grad_norms`),
        with ``q_k`` the pre-activation variance of layer (step) k, iterated from
        ``q_1 = sigma_w**2 q0 + effective_sigma_b**2``. Once ``q_k`` has settled this is
        ``(L - l) * 0.5 log10 chi_1``; for an RNN ``lambda * (T - t) / ln 10`` with
        ``lambda`` the mean-field maximal Lyapunov exponent, except over the first steps,
        where the state is still moving away from ``h_0`` (from ``h_0 = 0`` a tanh
        network starts with ``chi = sigma_w**2`` and gradients change faster there).
    q_star, chi_1, depth_scale : float
        Fixed point of the length map, ``chi`` there and ``xi = -1 / ln chi_1``
        (:func:`gradchain.theory.mean_field`).
    phase : str
        ``"ordered"``, ``"chaotic"`` or ``"critical"``.
    lyapunov_exponent : float
        ``0.5 ln chi_1`` (natural log per layer or step): for an RNN the predicted
        maximal Lyapunov exponent ``lambda``.
    fit_start : int
        Slopes are fitted over ``index >= fit_start`` (by default the half nearest the
        loss, where ``q_l`` has settled).
    measured_slope, predicted_slope : float
        Least-squares slopes of :attr:`measured` and :attr:`predicted` over the fit
        window, as the change of log10 ``||dL/dh||`` per layer going back (``-d/dl``); the
        mean-field value once ``q_l`` has settled is ``0.5 log10 chi_1``. NaN where the
        window holds a zero gradient.
    measured_slope_stderr : float
        Standard error of :attr:`measured_slope` for a log-norm that moves by independent
        increments of equal variance (estimated from the increments in the window). It
        does not cover the O(1/width) gap between mean log and log mean (see the module
        notes).
    spectrum_batch : int or None
        Examples whose Jacobian spectrum was measured (the first ones of x).
    spectrum_depths : ndarray of int or None, shape (n_depths,)
        Depths (layers or steps) ``1..L`` at which the spectrum was read.
    measured_log_growth : ndarray or None, shape (n_depths,)
        Batch mean of ``ln ||J_l ... J_1 e_1||``, the top QR direction's cumulative growth
        (natural log), for the forward product from the input (or from ``h_0``).
    predicted_log_growth : ndarray or None, shape (n_depths,)
        Its mean-field value ``0.5 * sum_{k <= l} ln chi(q_k)``, i.e.
        ``ln 10 * (predicted[0] - predicted[l])`` (``lambda * t`` for an RNN once ``q_t``
        has settled).
    measured_exponents : ndarray or None, shape (k,)
        Finite-depth Lyapunov exponents ``ln|R_ii| / L`` (QR order), batch mean.
    measured_exponents_std : ndarray or None, shape (k,)
        Their standard deviation over the spectrum batch (0 for a linear chain, whose
        Jacobians do not depend on the input).
    predicted_exponents : ndarray or None, shape (k,)
        Predicted exponents: a linear chain with a Gaussian initializer and equal widths
        has Newman's exact spectrum (:func:`gradchain.theory.gaussian_lyapunov_spectrum`);
        a linear orthogonal chain with equal widths has every exponent ``ln sigma_w``
        (``ln |gain|``); otherwise only the top exponent has a prediction, the mean-field
        ``predicted_log_growth[-1] / L`` (which includes the first layers' transient, as
        the measured value does; ``lambda`` for a settled RNN), and the others are NaN.
    predicted_exponents_stderr : ndarray or None, shape (k,)
        Standard error of a depth-L estimate of each exponent where it is known exactly:
        Newman's case (:func:`gradchain.theory.gaussian_lyapunov_stderr`), 0 for the
        orthogonal case, NaN otherwise.
    exponent_theory : str or None
        Which prediction the exponents have: ``"newman"``, ``"orthogonal"`` or
        ``"mean_field_top"``.
    """

    kind: str
    activation: str
    net: str
    depth: int
    batch: int
    seed: int
    sigma_w: float
    sigma_b: float
    sigma_source: str
    sigma_b_source: str
    input_variance: float
    q0: float
    index: np.ndarray
    measured: np.ndarray
    predicted: np.ndarray
    q_star: float
    chi_1: float
    depth_scale: float
    phase: str
    lyapunov_exponent: float
    fit_start: int
    measured_slope: float
    measured_slope_stderr: float
    predicted_slope: float
    spectrum_batch: int | None = None
    spectrum_depths: np.ndarray | None = None
    measured_log_growth: np.ndarray | None = None
    predicted_log_growth: np.ndarray | None = None
    measured_exponents: np.ndarray | None = None
    measured_exponents_std: np.ndarray | None = None
    predicted_exponents: np.ndarray | None = None
    predicted_exponents_stderr: np.ndarray | None = None
    exponent_theory: str | None = None

    # -- derived ------------------------------------------------------------------------
    @property
    def residual(self) -> np.ndarray:
        """``measured - predicted``, shape (depth + 1,); 0 where both are ``-inf`` (both
        say the gradient is exactly zero)."""
        with np.errstate(invalid="ignore"):
            res = self.measured - self.predicted
        res[self.measured == self.predicted] = 0.0
        return res

    @property
    def effective_sigma_b(self) -> float:
        """``sqrt(sigma_b**2 + input_variance)``: the bias std the theory was given (equal
        to :attr:`sigma_b` for an MLP)."""
        return math.hypot(self.sigma_b, math.sqrt(self.input_variance))

    @property
    def has_spectrum(self) -> bool:
        """Whether the spectrum fields are filled."""
        return self.spectrum_depths is not None

    # -- presentation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A dictionary of plain Python values that ``json.dumps`` accepts.

        Non-finite floats become ``"inf"``/``"-inf"`` (NaN becomes None).
        """
        out = {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}
        for name in ("residual", "effective_sigma_b"):
            out[name] = _jsonable(getattr(self, name))
        return out

    def _labels(self) -> tuple[str, str]:
        return ("t", "step") if self.kind == "rnn" else ("layer", "layer")

    def table(self, every: int | None = None) -> str:
        """A text table of both curves (every `every`-th index; about 20 rows by default).

        Columns: the index (l or t), ``measured`` and ``predicted`` log10 norm ratios to the
        top, their difference, and with the spectrum the measured and predicted top
        direction's cumulative log growth (natural log) up to that depth.
        """
        n = self.depth
        step = every or max(1, n // 20)
        if step < 1:
            raise ValueError(f"every must be a positive integer or None; got {every!r}")
        name = self._labels()[0]
        head = f"{name:>7}  {'measured':>12}  {'predicted':>12}  {'difference':>11}"
        growth: dict[int, tuple[float, float]] = {}
        if self.has_spectrum:
            assert self.spectrum_depths is not None
            assert self.measured_log_growth is not None and self.predicted_log_growth is not None
            head += f"  {'ln|R_11| meas':>13}  {'ln|R_11| pred':>13}"
            growth = {
                int(d): (float(a), float(b))
                for d, a, b in zip(
                    self.spectrum_depths, self.measured_log_growth, self.predicted_log_growth
                )
            }
        rows = [head]
        res = self.residual
        for i in sorted(set(range(0, n + 1, step)) | {n}):
            row = (
                f"{i:>7}  {_num(self.measured[i], '>12.5f')}  {_num(self.predicted[i], '>12.5f')}"
                f"  {_num(res[i], '>11.5f')}"
            )
            if self.has_spectrum:
                g = growth.get(i)
                row += f"  {_num(g[0], '>13.5g')}  {_num(g[1], '>13.5g')}" if g else " " * 30
            rows.append(row.rstrip())
        return "\n".join(rows)

    def _summary(self) -> str:
        unit = self._labels()[1]
        lines = [
            f"TheoryComparison({self.net})",
            f"  sigma_w = {self.sigma_w:.6g} ({self.sigma_source}), sigma_b = "
            f"{self.sigma_b:.6g} ({self.sigma_b_source})"
            + (f", input variance = {self.input_variance:.6g}" if self.kind == "rnn" else "")
            + f", q0 = {self.q0:.6g}",
            (
                f"  mean field: q* = {self.q_star:.6g}, chi_1 = {self.chi_1:.6g}, depth scale"
                f" = {self.depth_scale:.6g}, {self.phase}, exponent 0.5 ln chi_1 = "
                f"{self.lyapunov_exponent:.6g} per {unit}"
            ),
            (
                f"  log10 |dL/dh| per {unit} back ({self._labels()[0]} {self.fit_start}.."
                f"{self.depth}): measured {_num(self.measured_slope, '.5f')} +- "
                f"{_num(self.measured_slope_stderr, '.5f')}, predicted "
                f"{_num(self.predicted_slope, '.5f')}"
            ),
        ]
        if self.has_spectrum:
            assert self.measured_exponents is not None and self.predicted_exponents is not None
            assert self.predicted_exponents_stderr is not None
            lines.append(
                f"  Lyapunov exponents (ln per {unit}, {self.exponent_theory}): "
                + ", ".join(
                    f"{i + 1}: {_num(m, '.5g')} vs {_num(p, '.5g')}"
                    + (f" +- {s:.2g}" if math.isfinite(s) else "")
                    for i, (m, p, s) in enumerate(
                        zip(
                            self.measured_exponents[:4],
                            self.predicted_exponents[:4],
                            self.predicted_exponents_stderr[:4],
                        )
                    )
                )
                + (", ..." if self.measured_exponents.size > 4 else "")
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return f"{self._summary()}\n{self.table()}"

    def plot(self, ax: Any = None) -> Any:
        """Plot the measured and predicted curves against the index (matplotlib).

        Parameters
        ----------
        ax : matplotlib Axes, optional
            Axes to draw on; a new figure's by default.

        Returns
        -------
        matplotlib Axes

        Raises
        ------
        ImportError
            When matplotlib is not installed (``pip install matplotlib``).
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise ImportError(
                "TheoryComparison.plot needs matplotlib, an optional dependency: "
                "pip install matplotlib"
            ) from exc
        if ax is None:
            _, ax = plt.subplots()
        name = self._labels()[0]
        top = "T" if self.kind == "rnn" else "L"
        sub = "t" if self.kind == "rnn" else "l"
        ax.plot(self.index, self.measured, label="measured")
        ax.plot(self.index, self.predicted, linestyle="--", label="mean field")
        ax.set_xlabel(name)
        ax.set_ylabel(f"log10 ||dL/dh_{sub}|| / ||dL/dh_{top}||")
        ax.set_title(
            f"{self.activation}, sigma_w={self.sigma_w:.3g}, sigma_b={self.effective_sigma_b:.3g}"
            f" ({self.phase})"
        )
        ax.legend()
        return ax


# --------------------------------------------------------------------------- helpers


def _slope(y: np.ndarray, start: int) -> tuple[float, float]:
    """Least-squares slope of ``y[start:]`` against its index, per step *back* (``-d/di``),
    and its standard error when the increments of y are independent with a common
    variance: the slope is ``sum_j C_j d_j`` over the increments ``d_j`` with
    ``C_j = sum_{i >= j} c_i`` (``c_i`` the least-squares weights)."""
    seg = np.asarray(y[start:], dtype=np.float64)
    n = seg.size
    if n < 2 or not np.isfinite(seg).all():
        return math.nan, math.nan
    t = np.arange(n, dtype=np.float64)
    t -= t.mean()
    c = t / (t @ t)
    slope = -float(c @ seg)
    if n < 3:
        return slope, math.nan
    d = np.diff(seg)
    cum = np.cumsum(c[::-1])[::-1][1:]
    return slope, float(math.sqrt(float(np.var(d, ddof=1)) * float(cum @ cum)))


def _num(x: float, spec: str) -> str:
    """`x` formatted by `spec`; "undefined" (right-aligned alike) where it is NaN."""
    if math.isnan(x):
        width = spec.lstrip("<>^").split(".")[0]
        return f"{'undefined':>{width}}" if width.isdigit() else "undefined"
    return format(x, spec)


def _sigma(name: str, value: Any) -> float:
    return v.finite_float(name, value, minimum=0.0)


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def _rms(a: Any) -> float:
    """sqrt(mean(a**2)) in float64, without overflow or underflow of the squares."""
    a = np.asarray(a, dtype=np.float64)
    m = float(np.max(np.abs(a), initial=0.0))
    if m == 0.0 or not math.isfinite(m):
        return m
    return m * math.sqrt(float(np.mean(np.square(a / m))))


# --------------------------------------------------------------------------- MLP


def _mlp_init_sigma_w(net: MLP) -> float | None:
    """The effective sigma_w of the chain's initializer (None when not known), with a
    ValueError when it differs between layers."""
    cfg = net._config
    init = cfg.get("init")
    if init is None:
        return None
    g = abs(float(cfg["gain"]))  # not squared: a huge gain must not overflow here
    per_layer = []
    for fi, fo in zip(net.widths[:-1], net.widths[1:]):
        if init in ("xavier_normal", "xavier_uniform"):
            s = g * math.sqrt(2.0 * fi / (fi + fo))  # Var = gain**2 * 2 / (fan_in + fan_out)
        elif init in ("he_normal", "he_uniform"):
            s = g * math.sqrt(2.0)
        elif init == "lecun_normal":
            s = g
        elif init == "orthogonal":
            s = g * math.sqrt(min(fi, fo) / fo)  # gain * orthonormal rows or columns
        elif init == "normal":
            s = g * float(cfg["sigma_w"])
        else:  # pragma: no cover - an initializer this module does not know
            return None
        per_layer.append(s)
    lo, hi = min(per_layer), max(per_layer)
    if hi - lo > _SAME * hi:
        where = ", ".join(
            f"layer {i + 1}: {s:.6g}" for i, s in enumerate(per_layer[:4])
        ) + (", ..." if len(per_layer) > 4 else "")
        raise ValueError(
            f"init={init!r} with widths {list(net.widths)} gives the layers different "
            f"effective sigma_w = sqrt(fan_in * Var W_l) ({where}); mean-field theory needs "
            "one value: pass sigma_w= (and sigma_b=) explicitly"
        )
    return per_layer[0]


def _mlp_sigmas(net: MLP, sigma_w: Any, sigma_b: Any) -> tuple[float, float, str, str]:
    cfg = net._config
    if sigma_w is not None:
        sw, src_w = _sigma("sigma_w", sigma_w), "given"
    else:
        init_sw = _mlp_init_sigma_w(net)
        if init_sw is not None:
            sw, src_w = init_sw, "init"
        else:
            # sqrt of the layers' mean of fan_in * mean(W**2)
            sw = _rms([math.sqrt(w.shape[1]) * _rms(w) for w in net.weights])
            src_w = "estimated"
    if sigma_b is not None:
        sb, src_b = _sigma("sigma_b", sigma_b), "given"
    elif cfg.get("init") is not None:
        sb, src_b = float(cfg["bias_std"]), "init"
    else:
        sb, src_b = _rms([_rms(b) for b in net.biases]), "estimated"
    return sw, sb, src_w, src_b


def _spectrum_fields(
    spec: Any,
    pred: Any,
    predicted: np.ndarray,
    exact: tuple[np.ndarray, np.ndarray, str] | None = None,
) -> dict[str, Any]:
    """The spectrum fields of a TheoryComparison from a JacobianSpectrum: measured growth
    of the top direction and exponents (batch mean and spread) beside the prediction, which
    is the mean-field top exponent unless `exact` gives a whole predicted spectrum
    (exponents, standard errors, name)."""
    depths = np.asarray(spec.depths)
    depth, k = spec.depth, spec.k
    S = spec.log_singular_values
    with np.errstate(invalid="ignore"):
        growth = S[:, :, 0].mean(axis=0)
        exps = S[:, -1, :] / depth
        m_exp, s_exp = exps.mean(axis=0), exps.std(axis=0)
    # 0.5 sum_{k <= l} ln chi(q_k): the other end of the predicted gradient-norm curve;
    # where both ends are infinite (a chi of 0 or inf) the sum itself.
    with np.errstate(invalid="ignore"):
        pred_growth = _LN10 * (predicted[0] - predicted[depths])
    undefined = np.isnan(pred_growth)
    if undefined.any():
        cum = 0.5 * _LN10 * np.cumsum(np.asarray(pred.log10_chi, dtype=np.float64))
        pred_growth[undefined] = cum[depths[undefined] - 1]
    if exact is None:
        p_exp = np.full(k, math.nan)
        p_exp[0] = pred_growth[-1] / depth
        exact = (p_exp, np.full(k, math.nan), "mean_field_top")
    return {
        "spectrum_batch": spec.batch,
        "spectrum_depths": depths,
        "measured_log_growth": growth,
        "predicted_log_growth": pred_growth,
        "measured_exponents": m_exp,
        "measured_exponents_std": s_exp,
        "predicted_exponents": exact[0],
        "predicted_exponents_stderr": exact[1],
        "exponent_theory": exact[2],
    }


def _mlp_spectrum(
    net: MLP, x: np.ndarray, k: int, sw: float, pred: Any, predicted: np.ndarray
) -> dict[str, Any]:
    widths = net.widths
    square = len(set(widths)) == 1
    init = net._config.get("init")
    exact = None
    if net.activation == "linear" and square and sw > 0:
        n = widths[0]
        if init in _GAUSSIAN_INITS:
            exact = (
                theory.gaussian_lyapunov_spectrum(n, sw)[:k].copy(),
                theory.gaussian_lyapunov_stderr(n, net.depth)[:k].copy(),
                "newman",
            )
        elif init == "orthogonal":
            exact = (np.full(k, math.log(sw)), np.zeros(k), "orthogonal")
    return _spectrum_fields(jacobian_spectrum(net, x, k=k), pred, predicted, exact)


def _result(
    *,
    measured: np.ndarray,
    predicted: np.ndarray,
    mf: Any,
    fit_start: int,
    spec: dict[str, Any],
    **fields: Any,
) -> TheoryComparison:
    """Slopes over the fit window, read-only arrays and the result, for both chain kinds."""
    m_slope, m_se = _slope(measured, fit_start)
    p_slope, _ = _slope(predicted, fit_start)
    index = np.arange(measured.size)
    v.readonly(index, measured, predicted, *(a for a in spec.values() if isinstance(a, np.ndarray)))
    return TheoryComparison(
        index=index,
        measured=measured,
        predicted=predicted,
        q_star=mf.q_star,
        chi_1=mf.chi_1,
        depth_scale=mf.depth_scale,
        phase=mf.phase,
        lyapunov_exponent=mf.lyapunov_exponent,
        fit_start=fit_start,
        measured_slope=m_slope,
        measured_slope_stderr=m_se,
        predicted_slope=p_slope,
        **spec,
        **fields,
    )


# --------------------------------------------------------------------------- RNN


def _rnn_sigmas(
    net: RNN, sigma_w: Any, sigma_b: Any
) -> tuple[float, float, float, str, str]:
    """(sigma_w, sigma_b, sigma_ih, sources) of a vanilla single-layer RNN (stds, never
    squared here, so that a huge gain cannot overflow)."""
    cfg = net._config
    init = cfg.get("init")
    H, I = net.hidden_size, net.input_size
    sd: dict[str, np.ndarray] | None = None

    def params() -> dict[str, np.ndarray]:
        nonlocal sd
        if sd is None:
            sd = net.state_dict()
        return sd

    rg = abs(float(cfg["recurrent_gain"])) if init is not None else math.nan
    g = abs(float(cfg["gain"])) if init is not None else math.nan
    known = init in ("default", "xavier_uniform", "xavier_normal", "orthogonal", "normal")
    # weight_hh
    if sigma_w is not None:
        sw, src_w = _sigma("sigma_w", sigma_w), "given"
    elif known and cfg.get("spectral_radius") is None:
        sw = rg / math.sqrt(3.0) if init == "default" else rg  # U(-a, a): Var = a**2 / 3
        src_w = "init"
    else:
        sw = math.sqrt(H) * _rms(params()["weight_hh_l0"])
        src_w = "estimated"
    # weight_ih: sigma_ih**2 = input_size * Var(entry)
    if init == "default":
        sih = g * math.sqrt(I / (3.0 * H))
    elif init in ("xavier_uniform", "xavier_normal", "orthogonal"):
        sih = g * math.sqrt(2.0 * I / (I + H))
    elif init == "normal":
        sih = g
    else:
        sih = math.sqrt(I) * _rms(params()["weight_ih_l0"])
    # b_ih + b_hh
    if sigma_b is not None:
        sb, src_b = _sigma("sigma_b", sigma_b), "given"
    elif not net.bias:
        sb, src_b = 0.0, ("init" if known else "estimated")
    elif known:
        sb = math.sqrt(2.0 / (3.0 * H)) if init == "default" else 0.0  # two U(-1/sqrt(H), ..)
        src_b = "init"
    else:
        p = params()
        total = p["bias_ih_l0"].astype(np.float64) + p["bias_hh_l0"]
        sb, src_b = _rms(total), "estimated"
    return sw, sb, sih, src_w, src_b


# --------------------------------------------------------------------------- entry point


def compare_theory(
    net: MLP | RNN,
    x: Any = None,
    *,
    sigma_w: float | None = None,
    sigma_b: float | None = None,
    h0: Any = None,
    batch: int = 32,
    steps: int = 200,
    seed: int = 0,
    fit_start: int | None = None,
    spectrum: bool = True,
    k: int | None = None,
    spectrum_batch: int = 4,
) -> TheoryComparison:
    """Measured gradient norms of a chain beside the mean-field prediction, aligned.

    One backward pass with a seeded standard Gaussian upstream gradient on the output
    (an RNN: on the last state ``h_T`` only) gives the exact log10 norms ``||dL/dh_l||``;
    mean-field theory with the chain's ``sigma_w``, ``sigma_b`` and input scale predicts
    the same curve (:func:`gradchain.theory.predicted_grad_norms`; for an RNN its slope
    is the maximal Lyapunov exponent :func:`gradchain.theory.rnn_max_lyapunov_meanfield`,
    with the input drive counted as bias variance). Both are log10 ratios to the top,
    index for index. See :class:`TheoryComparison` for every field.

    Parameters
    ----------
    net : MLP or RNN
        The chain. An RNN must have one layer and a vanilla cell (``tanh`` or ``relu``),
        the cells the theory covers.
    x : array_like, optional
        Inputs: shape (batch, widths[0]) for an MLP, (steps, batch, input_size) for an RNN.
        By default a standard Gaussian drawn from `seed`. For the autonomous recurrent
        network pass ``x=np.zeros((steps, batch, input_size))`` (with a nonzero `h0`, or
        biases, so that the state moves).
    sigma_w, sigma_b : float, optional
        Weight and bias standard deviations for the theory (``W_l`` entries of variance
        ``sigma_w**2 / fan_in``; for an RNN ``weight_hh`` and ``b_ih + b_hh``). By default
        they follow from the chain's initializer (``gain``, ``sigma_w``, ``bias_std``,
        ``recurrent_gain``), or, for chains built from arrays (``MLP.from_weights``,
        ``RNN.from_state_dict``) or with ``spectral_radius``, are estimated from the
        weights. An MLP whose initializer gives the layers different effective values
        (e.g. ``xavier_normal`` with unequal widths) needs `sigma_w` here. An RNN's input
        drive is added to ``sigma_b**2`` in any case (see
        :attr:`TheoryComparison.input_variance`).
    h0 : array_like, optional
        RNN only: initial state, shape (1, batch, hidden_size); zero by default.
    batch : int
        Examples of the default x (ignored when x is given).
    steps : int
        RNN only: time steps of the default x (ignored when x is given).
    seed : int
        Seed of the upstream gradient and of the default x.
    fit_start : int, optional
        First index (l or t) of the window the slopes are fitted over; by default
        ``depth // 2``, the half nearest the loss.
    spectrum : bool
        Also measure the QR spectrum of the forward Jacobian products on the first
        `spectrum_batch` examples (:func:`gradchain.jacobian_spectrum`); it costs about
        ``4 n**2 k`` flops per layer and example.
    k : int, optional
        Directions of the spectrum: 1..min(widths) (an RNN: 1..hidden_size); by default
        ``min(min(widths), 16)``.
    spectrum_batch : int
        Examples whose spectrum is measured (at most the batch).

    Returns
    -------
    TheoryComparison

    Raises
    ------
    TypeError
        `net` is not an MLP or RNN, or an argument has the wrong type.
    ValueError
        An RNN that is not a single-layer vanilla one, inputs of the wrong shape or not
        finite, `k` or `fit_start` out of range, or an MLP whose initializer gives the
        layers different effective sigma_w (pass `sigma_w`).
    NonFiniteError
        When the forward pass overflows.

    Notes
    -----
    Mean field predicts the growth of the *mean squared* norm; measured log-norm slopes
    lie below it by O(1/width) per layer (see the module notes), and fluctuate by about
    :attr:`TheoryComparison.measured_slope_stderr`.

    A recurrent chain applies one ``weight_hh`` at every step, which the theory treats as
    if it were redrawn. For tanh cells at hidden sizes of a few hundred the measured rates
    agree with the theory to about the standard error; for relu cells they also vary from
    one draw of ``weight_hh`` to another, by about 10% of the rate at hidden size 400,
    well beyond the standard error of one draw.

    Examples
    --------
    >>> import gradchain as gc
    >>> net = gc.MLP(depth=30, width=64, activation="relu", init="he_normal", seed=0)
    >>> cmp = gc.compare_theory(net, spectrum=False)
    >>> cmp.sigma_source, round(cmp.chi_1, 12), cmp.measured.shape
    ('init', 1.0, (31,))
    """
    if not isinstance(spectrum, (bool, np.bool_)):
        raise TypeError(f"spectrum must be a bool; got {spectrum!r}")
    sd = v.seed(seed)
    sbatch = v.positive_int("spectrum_batch", spectrum_batch)
    if isinstance(net, MLP):
        if h0 is not None:
            raise ValueError("h0 is the initial state of a gradchain.RNN; an MLP has none")
        return _compare_mlp(net, x, sigma_w, sigma_b, batch, sd, fit_start, bool(spectrum), k, sbatch)
    if isinstance(net, RNN):
        return _compare_rnn(
            net, x, sigma_w, sigma_b, h0, batch, steps, sd, fit_start, bool(spectrum), k, sbatch
        )
    raise TypeError(f"net must be a gradchain.MLP or gradchain.RNN; got {type(net).__name__}")


def _check_draws(rows: int, n_in: int, n_out: int, dtype: Any) -> None:
    """Memory for the default inputs (rows x n_in, drawn in float64 and cast) and the
    upstream gradient (rows x n_out), before they are drawn."""
    per_row = n_in * (8 + np.dtype(dtype).itemsize) + n_out * 8
    v.check_memory(float(rows) * per_row, "compare_theory's random inputs and gradient")


@contextlib.contextmanager
def _theory_inputs(
    sw: float, src_w: str, sb: float, src_b: str, q0: float, q0_from: str
) -> Iterator[None]:
    """Says where the theory's arguments came from when it refuses them."""
    try:
        yield
    except ValueError as exc:
        raise ValueError(
            f"{exc} (compare_theory passed sigma_w={sw:.6g} ({src_w}), sigma_b={sb:.6g} "
            f"({src_b}) and q0={q0:.6g}, the mean square entry of {q0_from})"
        ) from exc


def _k(k: Any, kmax: int, what: str) -> int:
    if k is None:
        return min(kmax, 16)
    return v.int_in("k", k, 1, kmax, f"None or an integer between 1 and {what}, {kmax}")


def _fit_start(fit_start: Any, depth: int) -> int:
    if fit_start is None:
        return depth // 2
    return v.int_in(
        "fit_start", fit_start, 0, depth - 1, f"None or an integer between 0 and {depth - 1}"
    )


def _compare_mlp(
    net: MLP,
    x: Any,
    sigma_w: Any,
    sigma_b: Any,
    batch: Any,
    seed: int,
    fit_start: Any,
    spectrum: bool,
    k: Any,
    sbatch: int,
) -> TheoryComparison:
    widths = net.widths
    L = net.depth
    kk = _k(k, min(widths), "the smallest width")
    fs = _fit_start(fit_start, L)
    if x is None:
        b = v.positive_int("batch", batch)
        _check_draws(b, widths[0], widths[-1], net.dtype)
        xa = _rng(seed, 0).standard_normal((b, widths[0])).astype(net.dtype)
    else:
        xa = v.float_array("x", x, net.dtype, (None, widths[0]))
    b = xa.shape[0]
    sw, sb, src_w, src_b = _mlp_sigmas(net, sigma_w, sigma_b)
    cfg = net._config
    act_kw = {"negative_slope": float(cfg["negative_slope"]), "alpha": float(cfg["alpha"])}
    rx = _rms(xa)
    q0 = rx * rx
    with _theory_inputs(sw, src_w, sb, src_b, q0, "x"):
        pred = theory.predicted_grad_norms(L, net.activation, sw, sb, q0=q0, **act_kw)
        mf = theory.mean_field(net.activation, sw, sb, q0=q0, correlation=False, **act_kw)
    predicted = np.array(pred.log10_activation_grad_norms, dtype=np.float64)

    _check_draws(b, 0, widths[-1], np.float64)
    g = _rng(seed, 1).standard_normal((b, widths[-1]))
    rep = net.backward(xa, grad_output=g)
    lg = rep.log10_activation_grad_norms
    measured = lg - lg[-1]

    spec = _mlp_spectrum(net, xa[:sbatch], kk, sw, pred, predicted) if spectrum else {}
    return _result(
        measured=measured,
        predicted=predicted,
        mf=mf,
        fit_start=fs,
        spec=spec,
        kind="mlp",
        activation=net.activation,
        net=repr(net),
        depth=L,
        batch=b,
        seed=seed,
        sigma_w=sw,
        sigma_b=sb,
        sigma_source=src_w,
        sigma_b_source=src_b,
        input_variance=0.0,
        q0=q0,
    )


def _compare_rnn(
    net: RNN,
    x: Any,
    sigma_w: Any,
    sigma_b: Any,
    h0: Any,
    batch: Any,
    steps: Any,
    seed: int,
    fit_start: Any,
    spectrum: bool,
    k: Any,
    sbatch: int,
) -> TheoryComparison:
    if net.cell not in _VANILLA:
        raise ValueError(
            f"compare_theory covers the vanilla cells 'tanh' and 'relu' (mean-field theory of "
            f"h_t = phi(W_hh h_(t-1) + W_ih x_t + b)); got cell={net.cell!r}"
        )
    if net.num_layers != 1:
        raise ValueError(
            f"compare_theory covers single-layer recurrent chains; got num_layers={net.num_layers}"
        )
    H = net.hidden_size
    kk = _k(k, H, "hidden_size")
    if x is None:
        T = v.positive_int("steps", steps)
        b = v.positive_int("batch", batch)
        _check_draws(T * b, net.input_size, 0, net.dtype)
        xa = _rng(seed, 0).standard_normal((T, b, net.input_size)).astype(net.dtype)
    else:
        xa = net._x(x)
    T, b = xa.shape[0], xa.shape[1]
    fs = _fit_start(fit_start, T)
    h0a = net._state("h0", h0, b)
    sw, sb, sih, src_w, src_b = _rnn_sigmas(net, sigma_w, sigma_b)
    rh = 0.0 if h0a is None else _rms(h0a)
    q0 = rh * rh
    drive_std = sih * _rms(xa)  # weight_ih x_t adds drive_std**2 to every pre-activation
    drive = drive_std * drive_std
    sb_eff = math.hypot(sb, drive_std)

    with _theory_inputs(sw, src_w, sb_eff, src_b + ", with the input drive", q0, "h0"):
        # mf.lyapunov_exponent is theory.rnn_max_lyapunov_meanfield(sw, sb_eff, ...).
        mf = theory.mean_field(net.cell, sw, sb_eff, q0=q0, correlation=False)
        # The same length map as a deep chain: q_1 = sigma_w**2 q0 + sigma_b_eff**2, and
        # 0.5 log10 chi(q_t) per step back, i.e. lambda / ln 10 once q_t has settled.
        pred = theory.predicted_grad_norms(T, net.cell, sw, sb_eff, q0=q0)
    predicted = np.array(pred.log10_activation_grad_norms, dtype=np.float64)

    _check_draws(b, 0, H, np.float64)
    g = _rng(seed, 1).standard_normal((b, H))
    rep = net.backward(net._as_given(xa), grad_output=g, h0=h0a)
    lg = np.asarray(rep.log10_state_grad_norms, dtype=np.float64)
    measured = lg - lg[-1]

    spec: dict[str, Any] = {}
    if spectrum:
        h0s = None if h0a is None else h0a[:, :sbatch]
        spectrum_result = jacobian_spectrum(net, net._as_given(xa[:, :sbatch]), h0=h0s, k=kk)
        spec = _spectrum_fields(spectrum_result, pred, predicted)
    return _result(
        measured=measured,
        predicted=predicted,
        mf=mf,
        fit_start=fs,
        spec=spec,
        kind="rnn",
        activation=net.cell,
        net=repr(net),
        depth=T,
        batch=b,
        seed=seed,
        sigma_w=sw,
        sigma_b=sb,
        sigma_source=src_w,
        sigma_b_source=src_b,
        input_variance=drive,
        q0=q0,
    )
