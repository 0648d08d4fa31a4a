"""Measured gradient norms beside their mean-field prediction, aligned layer by layer.

:func:`compare_theory` runs one backward pass through a chain with a seeded Gaussian
upstream gradient, reads the exact log10 norms ``||dL/dh_l||`` and sets them beside
:func:`gradchain.theory.predicted_grad_norms` (an :class:`~gradchain.MLP`), the
mean-field Lyapunov exponent :func:`gradchain.theory.rnn_max_lyapunov_meanfield` (a
vanilla :class:`~gradchain.RNN`) or, for a chain of blocks (a :class:`~gradchain.Chain`,
or an MLP with norm or residual layers), the block result that matches its repeated
blocks (:func:`~gradchain.theory.batchnorm_grad_norms`,
:func:`~gradchain.theory.residual_grad_norms`,
:func:`~gradchain.theory.norm_position_grad_norms`), with the weight and bias scales read
from the chain's initializer. Optionally it also measures the QR spectrum of the forward
Jacobian products (:func:`gradchain.jacobian_spectrum`) and sets the finite-depth Lyapunov
exponents beside their predictions.

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import numpy as np

from . import _validate as v
from . import theory
from .blocks import Activation, BatchNorm, Block, LayerNorm, Linear, Residual
from .chain import Chain
from .errors import NonFiniteError
from .jacobian import jacobian_spectrum
from .mlp import MLP
from .report import _jsonable
from .rnn import RNN

__all__ = ["TheoryComparison", "compare_theory"]

_LN10 = math.log(10.0)
_GAUSSIAN_INITS = ("normal", "xavier_normal", "he_normal", "lecun_normal")
_VANILLA = ("tanh", "relu")
_SAME = 1e-9  # relative: per-layer effective sigma_w counted as one value
# Kinds whose prediction is geometric once settled: their slopes are the comparison.
_SLOPE_KINDS = ("mlp", "rnn", "batch_norm")
_THEORY_OF = {
    "mlp": "theory.predicted_grad_norms (Schoenholz et al. 2017)",
    "batch_norm": "theory.batchnorm_grad_norms (Yang et al. 2019)",
    "residual": "theory.residual_grad_norms (Yang & Schoenholz 2017)",
    "pre_norm": "theory.norm_position_grad_norms, position='pre' (Xiong et al. 2020)",
    "post_norm": "theory.norm_position_grad_norms, position='post' (Xiong et al. 2020)",
}
_SUPPORTED_SHAPES: tuple[str, ...] = (
    "[Linear, Activation] x L (a plain MLP)",
    "[Linear, BatchNorm, Activation] x L in train mode",
    (
        "Residual([Activation, Linear]) x L or Residual([Linear, Activation, Linear]) x L "
        "(one scale, no shortcut Linear)"
    ),
    (
        "pre-LN: Residual([LayerNorm, Activation, Linear]) x L or Residual([LayerNorm, "
        "Linear, Activation, Linear]) x L, optionally followed by a LayerNorm"
    ),
    (
        "post-LN: [Residual([Activation, Linear]), LayerNorm] x L or [Residual([Linear, "
        "Activation, Linear]), LayerNorm] x L"
    ),
)


# --------------------------------------------------------------------------- result


@dataclass(frozen=True, eq=False)
class TheoryComparison:
    """Measured per-layer (or per-step, or per-block) gradient norms beside the mean-field
    prediction.

    Arrays are read-only. The spectrum fields are None when the spectrum was not asked for
    (``spectrum=False``) or is not available for the chain (:attr:`notes` says why).

    For a chain of blocks the comparison covers its *span*: the repeated blocks that one
    theory result describes (:attr:`pattern`), with the blocks before it run forward to
    give its input and the read-out blocks after it left out. Index l then counts the
    span's blocks in the theory's sense (a post-LN block is a residual block and its
    LayerNorm), and the fields of the plain-MLP mean field (``q_star``, ``chi_1``,
    ``phase``) say None or ``"not applicable"``.

    Attributes
    ----------
    kind : {"mlp", "rnn", "batch_norm", "residual", "pre_norm", "post_norm"}
        The theory compared with: an MLP's mean field (also for a :class:`~gradchain.Chain`
        of ``[Linear, Activation]`` blocks), an RNN's, or the block result of
        :mod:`gradchain.theory` of that kind (the ``kind`` of its
        :class:`~gradchain.theory.BlockGradNormPrediction`).
    activation : str
        The activation (an RNN's cell: ``tanh`` or ``relu``).
    net : str
        ``repr`` of the chain.
    depth : int
        Layers L (an RNN: time steps T; a chain of blocks: the span's blocks).
    batch : int
        Examples in the backward pass.
    seed : int
        Seed of the upstream gradient (and of the default input).
    sigma_w : float
        Weight std of the theory: entries of ``W_l`` (an RNN's ``weight_hh``) have
        variance ``sigma_w**2 / fan_in``.
    sigma_b : float
        Bias std: of ``b_l``, or of ``b_ih + b_hh`` for an RNN; 0 for a BatchNorm chain,
        where a bias before the BatchNorm cancels.
    sigma_source, sigma_b_source : {"init", "given", "estimated", "not applicable"}
        Where ``sigma_w`` and ``sigma_b`` came from: the chain's initializer, the
        arguments, or the weights themselves (``fan_in * mean(W**2)`` averaged over
        layers, and ``mean(b**2)``); ``sigma_b`` of a BatchNorm chain is not applicable.
    input_variance : float
        An RNN's input drive ``sigma_ih**2 * q_x``, the variance ``weight_ih @ x_t`` adds
        to every pre-activation (``sigma_ih**2 / input_size`` the variance of
        ``weight_ih`` entries, ``q_x`` the mean square entry of x); it acts as extra
        bias variance in mean field. 0 for an MLP.
    q0 : float
        Mean square entry of the input x (an MLP), of the initial state h0 (an RNN) or of
        the span's input (a chain of blocks). Where a norm layer sees the span's input
        first it is what that layer divides by: for a BatchNorm chain the features' mean
        batch variance (unbiased), for a pre-LN chain the examples' mean variance over the
        features; for independent zero-mean inputs these equal the mean square. For
        residual, pre-LN and post-LN spans, the mean over the examples of their own.
    index : ndarray of int, shape (depth + 1,)
        ``l = 0..L`` (``t = 0..T``).
    measured : ndarray, shape (depth + 1,)
        ``log10 ||dL/dh_l|| - log10 ||dL/dy||`` from the exact log10 norms of one
        backward pass (Frobenius norms over the batch, which for a train-mode BatchNorm
        chain, whose blocks couple the examples, is the only norm the theory speaks of);
        ``y = h_L`` except for a pre-LN span that ends in a LayerNorm, where ``y`` is
        that LayerNorm's output and the last entry is ``log10 ||dL/dh_L|| / ||dL/dy||``.
        ``-inf`` where a gradient is exactly zero.
    predicted : ndarray, shape (depth + 1,)
        The mean-field prediction of the same, index for index:
        ``0.5 * sum_{k > l} log10 chi(q_k)`` (:func:`gradchain.theory.predicted_grad_norms`),
        with ``q_k`` the pre-activation variance of layer (step) k, iterated from
        ``q_1 = sigma_w**2 q0 + effective_sigma_b**2``. Once ``q_k`` has settled this is
        ``(L - l) * 0.5 log10 chi_1``; for an RNN ``lambda * (T - t) / ln 10`` with
        ``lambda`` the mean-field maximal Lyapunov exponent, except over the first steps,
        where the state is still moving away from ``h_0`` (from ``h_0 = 0`` a tanh
        network starts with ``chi = sigma_w**2`` and gradients change faster there). For
        a chain of blocks, the theory result's ``log10_activation_grad_norms``; residual,
        pre-LN and post-LN blocks act on each example alone, so there the theory is
        evaluated at each example's own q0 and the examples' mean squared norms are
        combined, as the batch's Frobenius norm combines them.
    q_star, chi_1 : float or None
        Fixed point of the length map and ``chi`` there (:func:`gradchain.theory.mean_field`);
        None for a chain of blocks.
    depth_scale : float or None
        ``xi = -1 / ln chi_1``; for a BatchNorm chain ``-1 / ln growth``
        (:class:`~gradchain.theory.BatchNormMeanField`); None for other blocks, whose
        per-block factor changes with depth.
    phase : str
        ``"ordered"``, ``"chaotic"`` or ``"critical"``; ``"not applicable"`` for a chain of
        blocks.
    lyapunov_exponent : float or None
        ``0.5 ln chi_1`` (natural log per layer or step): for an RNN the predicted
        maximal Lyapunov exponent ``lambda``; for a BatchNorm chain ``0.5 ln growth``; None
        for other blocks.
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
    measured_stderr : ndarray or None, shape (depth + 1,)
        Standard error of each :attr:`measured` value for a log-norm that moves away from
        the prediction by independent increments of equal variance, estimated from the
        ``depth`` increments of :attr:`residual`: ``sqrt((L - l) s**2)``. NaN where the
        curves hold a zero gradient or there are fewer than 2 increments. Like
        :attr:`measured_slope_stderr` it does not cover the O(1/width) gap between the
        mean log and the log of the mean.
    span : tuple of int or None
        A chain of blocks: the top-level blocks ``[start, stop)`` compared (of
        ``net.blocks``); None for an MLP without norm or residual layers and an RNN.
    pattern : str or None
        The span's blocks as recognised, e.g.
        ``"[Linear(256, 256), BatchNorm(256), Activation('relu')] x 20"``.
    scale : float or None
        The residual branch multiplier ``a`` of residual, pre-LN and post-LN spans.
    branch : {"act_linear", "linear_act_linear"} or None
        Their branch: ``W phi(h) + b`` or ``W' phi(W h + b) + b'``.
    measured_log10_weight_grad_norms : ndarray or None, shape (depth,)
        Blocks l = 1..L: ``log10 ||dL/dW_l|| - 0.5 log10 fan_in - log10 ||dL/dy||`` for the
        weight the theory predicts (a BatchNorm block's Linear, a branch's last Linear),
        Frobenius norms over the batch; None where the theory has no prediction (MLP, RNN).
    predicted_log10_weight_grad_norms : ndarray or None, shape (depth,)
        The theory's ``log10_weight_grad_norms`` of the same (for a batch of independent
        output gradients the per-example squared norms add, so the ratio is the same).
    notes : tuple of str
        What the comparison left out or assumed beyond the fields, e.g. a spectrum that a
        train-mode BatchNorm rules out, or the blocks outside the span.
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
    q_star: float | None
    chi_1: float | None
    depth_scale: float | None
    phase: str
    lyapunov_exponent: float | None
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
    measured_stderr: np.ndarray | None = None
    span: tuple[int, int] | None = None
    pattern: str | None = None
    scale: float | None = None
    branch: str | None = None
    measured_log10_weight_grad_norms: np.ndarray | None = None
    predicted_log10_weight_grad_norms: np.ndarray | None = None
    notes: tuple[str, ...] = ()

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

    @property
    def comparison(self) -> str:
        """``"slope"`` where the prediction is geometric once settled (an MLP, an RNN, a
        BatchNorm chain), so that the per-layer slope is the number to compare, or
        ``"curve"`` where the per-block factor changes with depth (residual, pre-LN and
        post-LN chains), compared index for index (``measured[0]`` against
        ``predicted[0]`` within :attr:`measured_stderr` sums it up)."""
        return "slope" if self.kind in _SLOPE_KINDS else "curve"

    # -- presentation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A dictionary of plain Python values that ``json.dumps`` accepts.

        Non-finite floats become ``"inf"``/``"-inf"`` (NaN becomes None).
        """
        out = {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}
        for name in ("residual", "effective_sigma_b", "comparison"):
            out[name] = _jsonable(getattr(self, name))
        return out

    def _labels(self) -> tuple[str, str]:
        if self.kind == "rnn":
            return ("t", "step")
        return ("layer", "layer") if self.kind == "mlp" else ("block", "block")

    def table(self, every: int | None = None) -> str:
        """A text table of both curves (every `every`-th index; about 20 rows by default).

        Columns: the index (l or t), ``measured`` and ``predicted`` log10 norm ratios to the
        top, their difference, with the spectrum the measured and predicted top
        direction's cumulative log growth (natural log) up to that depth, and where the
        theory predicts them the measured and predicted weight gradients of block l.
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
        mw, pw = self.measured_log10_weight_grad_norms, self.predicted_log10_weight_grad_norms
        if mw is not None and pw is not None:
            head += f"  {'log10|dW| meas':>14}  {'log10|dW| pred':>14}"
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
            if mw is not None and pw is not None:
                row += (
                    f"  {_num(mw[i - 1], '>14.5f')}  {_num(pw[i - 1], '>14.5f')}" if i else " " * 32
                )
            rows.append(row.rstrip())
        return "\n".join(rows)

    def _summary(self) -> str:
        unit = self._labels()[1]
        lines = [f"TheoryComparison({self.net})"]
        if self.pattern is not None:
            assert self.span is not None
            lines.append(
                f"  span: blocks {self.span[0]}..{self.span[1] - 1}, {self.pattern}; theory: "
                f"{_THEORY_OF[self.kind]}"
            )
        scale = "" if self.scale is None else f", scale = {self.scale:.6g}"
        branch = "" if self.branch is None else f", branch {self.branch}"
        lines.append(
            f"  sigma_w = {self.sigma_w:.6g} ({self.sigma_source}), sigma_b = "
            f"{self.sigma_b:.6g} ({self.sigma_b_source})"
            + (f", input variance = {self.input_variance:.6g}" if self.kind == "rnn" else "")
            + f"{scale}{branch}, q0 = {self.q0:.6g}"
            + (f", batch {self.batch}" if self.kind == "batch_norm" else "")
        )
        if self.kind in ("mlp", "rnn"):
            assert self.q_star is not None and self.chi_1 is not None
            assert self.depth_scale is not None and self.lyapunov_exponent is not None
            lines.append(
                f"  mean field: q* = {self.q_star:.6g}, chi_1 = {self.chi_1:.6g}, depth scale"
                f" = {self.depth_scale:.6g}, {self.phase}, exponent 0.5 ln chi_1 = "
                f"{self.lyapunov_exponent:.6g} per {unit}"
            )
        elif self.kind == "batch_norm":
            assert self.depth_scale is not None and self.lyapunov_exponent is not None
            lines.append(
                f"  mean field: growth of squared gradient norms {math.exp(2 * self.lyapunov_exponent):.6g}"
                f" per block, depth scale = {self.depth_scale:.6g}, exponent 0.5 ln growth = "
                f"{self.lyapunov_exponent:.6g} per block"
            )
        if self.comparison == "slope":
            lines.append(
                f"  log10 |dL/dh| per {unit} back ({self._labels()[0]} {self.fit_start}.."
                f"{self.depth}): measured {_num(self.measured_slope, '.5f')} +- "
                f"{_num(self.measured_slope_stderr, '.5f')}, predicted "
                f"{_num(self.predicted_slope, '.5f')}"
            )
        else:
            se = math.nan if self.measured_stderr is None else float(self.measured_stderr[0])
            lines.append(
                f"  log10 |dL/dh_0| / |dL/dy| over the span: measured "
                f"{_num(float(self.measured[0]), '.5f')} +- {_num(se, '.5f')}, predicted "
                f"{_num(float(self.predicted[0]), '.5f')}"
            )
        mw, pw = self.measured_log10_weight_grad_norms, self.predicted_log10_weight_grad_norms
        if mw is not None and pw is not None:
            lines.append(
                f"  log10 |dL/dW_l| / (sqrt(fan_in) |dL/dy|): block 1 measured "
                f"{_num(float(mw[0]), '.5f')}, predicted {_num(float(pw[0]), '.5f')}; block "
                f"{self.depth} measured {_num(float(mw[-1]), '.5f')}, predicted "
                f"{_num(float(pw[-1]), '.5f')}"
            )
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
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return f"{self._summary()}\n{self.table()}"

    def plot(self, ax: Any = None) -> Any:
        """Plot the measured and predicted curves against the index (matplotlib); the same
        as :func:`gradchain.plot.theory`.

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
            When matplotlib is not installed (``pip install "gradchain[plot]"``).
        """
        from . import plot

        return plot.theory(self, ax)


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


def _init_sigma_ws(
    cfg: dict[str, Any] | None, fans: Sequence[tuple[int, int]]
) -> list[float] | None:
    """The effective sigma_w, ``sqrt(fan_in * Var W)``, that the initializer of `cfg` gives
    each Linear of shape ``(fan_out, fan_in)`` (None when the initializer is not known)."""
    init = None if cfg is None else cfg.get("init")
    if cfg is None or init is None:
        return None
    g = abs(float(cfg["gain"]))  # not squared: a huge gain must not overflow here
    per_layer = []
    for fi, fo in fans:
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
    return per_layer


def _one_sigma_w(per_layer: Sequence[float], labels: Sequence[str], what: str, init: str) -> float:
    """The common value of `per_layer`, or a ValueError that lists them (`labels` names
    each layer, `what` says whose layers they are)."""
    lo, hi = min(per_layer), max(per_layer)
    if hi - lo > _SAME * hi:
        where = ", ".join(f"{name}: {s:.6g}" for name, s in zip(labels[:4], per_layer[:4])) + (
            ", ..." if len(per_layer) > 4 else ""
        )
        raise ValueError(
            f"init={init!r} {what} different effective sigma_w = sqrt(fan_in * Var W_l) "
            f"({where}); mean-field theory needs one value: pass sigma_w= (and sigma_b=) "
            "explicitly"
        )
    return per_layer[0]


def _mlp_init_sigma_w(net: MLP) -> float | None:
    """The effective sigma_w of the MLP's initializer (None when not known), with a
    ValueError when it differs between layers."""
    w = net.widths
    per_layer = _init_sigma_ws(net._config, list(zip(w[:-1], w[1:])))
    if per_layer is None:
        return None
    labels = [f"layer {i + 1}" for i in range(min(len(per_layer), 4))]
    return _one_sigma_w(
        per_layer, labels, f"with widths {list(w)} gives the layers", net._config["init"]
    )


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
    depths: np.ndarray,
    S: np.ndarray,
    pred: Any,
    predicted: np.ndarray,
    exact: tuple[np.ndarray, np.ndarray, str] | None = None,
) -> dict[str, Any]:
    """The spectrum fields of a TheoryComparison from the QR spectrum's depths (in the
    comparison's index) and log singular values (batch, depths, k): measured growth of the
    top direction and exponents (batch mean and spread) beside the prediction, which is
    the mean-field top exponent unless `exact` gives a whole predicted spectrum
    (exponents, standard errors, name)."""
    depths = np.asarray(depths)
    depth, k = int(depths[-1]), S.shape[2]
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
        "spectrum_batch": S.shape[0],
        "spectrum_depths": depths,
        "measured_log_growth": growth,
        "predicted_log_growth": pred_growth,
        "measured_exponents": m_exp,
        "measured_exponents_std": s_exp,
        "predicted_exponents": exact[0],
        "predicted_exponents_stderr": exact[1],
        "exponent_theory": exact[2],
    }


def _exact_spectrum(
    activation: str, widths: Sequence[int], init: str | None, sw: float, depth: int, k: int
) -> tuple[np.ndarray, np.ndarray, str] | None:
    """The whole predicted spectrum where it is known exactly: a linear chain of equal
    widths with Gaussian weights (Newman) or orthogonal ones."""
    if activation != "linear" or len(set(widths)) != 1 or not sw > 0:
        return None
    n = widths[0]
    if init in _GAUSSIAN_INITS:
        return (
            theory.gaussian_lyapunov_spectrum(n, sw)[:k].copy(),
            theory.gaussian_lyapunov_stderr(n, depth)[:k].copy(),
            "newman",
        )
    if init == "orthogonal":
        return (np.full(k, math.log(sw)), np.zeros(k), "orthogonal")
    return None


def _mlp_spectrum(
    net: MLP, x: np.ndarray, k: int, sw: float, pred: Any, predicted: np.ndarray
) -> dict[str, Any]:
    exact = _exact_spectrum(net.activation, net.widths, net._config.get("init"), sw, net.depth, k)
    s = jacobian_spectrum(net, x, k=k)
    return _spectrum_fields(s.depths, s.log_singular_values, pred, predicted, exact)


def _walk_stderr(measured: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Standard error of each ``measured[l]`` when measured - predicted moves by
    independent increments of a common variance: ``sqrt((L - l) s**2)``, with ``s**2``
    the sample variance of the L increments (NaN where they are not all finite)."""
    L = measured.size - 1
    with np.errstate(invalid="ignore"):
        d = np.diff(measured) - np.diff(predicted)
    if L < 2 or not np.isfinite(d).all():
        return np.full(L + 1, math.nan)
    return np.sqrt(np.arange(L, -1, -1, dtype=np.float64) * float(np.var(d, ddof=1)))


def _mean_field_fields(mf: Any) -> dict[str, Any]:
    return {
        "q_star": mf.q_star,
        "chi_1": mf.chi_1,
        "depth_scale": mf.depth_scale,
        "phase": mf.phase,
        "lyapunov_exponent": mf.lyapunov_exponent,
    }


def _result(
    *,
    measured: np.ndarray,
    predicted: np.ndarray,
    mean: dict[str, Any],
    fit_start: int,
    spec: dict[str, Any],
    **fields: Any,
) -> TheoryComparison:
    """Slopes over the fit window, the random-walk standard errors, read-only arrays and
    the result, for every chain kind."""
    m_slope, m_se = _slope(measured, fit_start)
    p_slope, _ = _slope(predicted, fit_start)
    index = np.arange(measured.size)
    stderr = _walk_stderr(measured, predicted)
    arrays = [*spec.values(), *fields.values()]
    v.readonly(
        index, measured, predicted, stderr, *(a for a in arrays if isinstance(a, np.ndarray))
    )
    return TheoryComparison(
        index=index,
        measured=measured,
        predicted=predicted,
        fit_start=fit_start,
        measured_slope=m_slope,
        measured_slope_stderr=m_se,
        predicted_slope=p_slope,
        measured_stderr=stderr,
        **mean,
        **spec,
        **fields,
    )


# --------------------------------------------------------------------------- RNN


def _rnn_sigmas(net: RNN, sigma_w: Any, sigma_b: Any) -> tuple[float, float, float, str, str]:
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


# --------------------------------------------------------------------------- chains of blocks


class _Unit(NamedTuple):
    """One repetition of a supported shape: its top-level blocks and what the theory needs
    of them. Locations are ``(top-level offset in the unit, index in a residual body or
    None)``."""

    kind: str
    size: int  # top-level blocks
    key: tuple[Any, ...]  # equal for every unit of one span
    act: Activation
    branch: str | None
    scale: float | None
    linears: tuple[tuple[int, int | None], ...]  # whose weights the theory's sigma_w describes
    weight: tuple[int, int | None] | None  # the Linear whose gradient the theory predicts
    norms: tuple[tuple[int, int | None], ...]  # taken at initialization by the theory


class _Span(NamedTuple):
    unit: _Unit
    start: int
    stop: int  # top-level blocks [start, stop), a final LayerNorm included
    units: int
    final_norm: bool


def _act_key(a: Activation) -> tuple[Any, ...]:
    return (a.name, a.negative_slope, a.alpha)


def _branch(body: Sequence[Block]) -> tuple[str, Activation, tuple[int, ...]] | None:
    """A residual branch the theory covers: (its name, the activation, its Linears)."""
    kinds = tuple(type(b) for b in body)
    if kinds == (Activation, Linear):
        return "act_linear", body[0], (1,)  # type: ignore[return-value]
    if kinds == (Linear, Activation, Linear):
        return "linear_act_linear", body[1], (0, 2)  # type: ignore[return-value]
    return None


def _units_at(blocks: Sequence[Block], i: int) -> list[_Unit]:
    """Every unit of a supported shape that starts at ``blocks[i]`` (a residual block
    followed by a LayerNorm starts both a residual and a post-LN unit)."""
    b = blocks[i]
    nxt = blocks[i + 1] if i + 1 < len(blocks) else None
    if isinstance(b, Linear):
        if isinstance(nxt, Activation):
            return [
                _Unit("mlp", 2, ("mlp", _act_key(nxt)), nxt, None, None, ((0, None),), None, ())
            ]
        after = blocks[i + 2] if i + 2 < len(blocks) else None
        if isinstance(nxt, BatchNorm) and isinstance(after, Activation):
            bn_key: tuple[Any, ...] = ("batch_norm", _act_key(after))
            return [
                _Unit(
                    "batch_norm",
                    3,
                    bn_key,
                    after,
                    None,
                    None,
                    ((0, None),),
                    (0, None),
                    ((1, None),),
                )
            ]
        return []
    if not isinstance(b, Residual) or b.shortcut is not False:
        return []
    body = b.blocks
    pre = isinstance(body[0], LayerNorm)
    found = _branch(body[1:] if pre else body)
    if found is None:
        return []
    name, act, lins = found
    linears = tuple((0, j + int(pre)) for j in lins)
    key = (name, _act_key(act), b.scale)
    if pre:
        return [
            _Unit(
                "pre_norm",
                1,
                ("pre_norm", *key),
                act,
                name,
                b.scale,
                linears,
                linears[-1],
                ((0, 0),),
            )
        ]
    out = [_Unit("residual", 1, ("residual", *key), act, name, b.scale, linears, linears[-1], ())]
    if isinstance(nxt, LayerNorm):
        out.insert(
            0,
            _Unit(
                "post_norm",
                2,
                ("post_norm", *key),
                act,
                name,
                b.scale,
                linears,
                linears[-1],
                ((1, None),),
            ),
        )
    return out


def _longest_run(blocks: Sequence[Block]) -> _Span | None:
    """The longest run (in top-level blocks) of equal units of one supported shape; the
    first of equally long ones."""
    best: _Span | None = None
    i, n = 0, len(blocks)
    while i < n:
        here: _Span | None = None
        for unit in _units_at(blocks, i):
            count, j = 1, i + unit.size
            while j < n and any(u.key == unit.key for u in _units_at(blocks, j)):
                count, j = count + 1, j + unit.size
            final = unit.kind == "pre_norm" and j < n and isinstance(blocks[j], LayerNorm)
            span = _Span(unit, i, j + int(final), count, final)
            if here is None or span.stop > here.stop:
                here = span
        if here is None:
            i += 1
            continue
        if best is None or here.stop - here.start > best.stop - best.start:
            best = here
        i = here.stop
    return best


def _short(blocks: Sequence[Block], limit: int = 240) -> str:
    """The blocks as a compact list (runs of equal blocks as ``[block] x k``)."""
    parts: list[str] = []
    i = 0
    while i < len(blocks):
        j = i + 1
        while j < len(blocks) and blocks[j]._text(False) == blocks[i]._text(False):
            j += 1
        text = blocks[i]._text(False)
        parts.append(text if j - i == 1 else f"{text} x {j - i}")
        i = j
    out = "[" + ", ".join(parts) + "]"
    return out if len(out) <= limit else out[: limit - 5] + " ...]"


def _outside(part: Sequence[Block]) -> str | None:
    """Why blocks before or after a span are more than the input or read-out layers that
    the comparison may run forward or cut (None when they are not)."""
    if any(isinstance(b, Residual) for b in part):
        return "holds a residual block"
    lin = sum(isinstance(b, Linear) for b in part)
    return f"holds {lin} Linear blocks" if lin > 1 else None


def _recognise(blocks: Sequence[Block]) -> _Span:
    """The span that one block theory describes, or a ValueError that says what was found
    and what is supported."""
    span = _longest_run(blocks)
    supported = "; ".join(_SUPPORTED_SHAPES)
    rules = (
        "compare_theory sets a theory beside L repeated blocks of one of these shapes, after "
        "at most one input Linear (with norm and activation blocks) that it runs forward and "
        f"before read-out blocks (at most one Linear) that it leaves out: {supported}"
    )
    if span is None:
        raise ValueError(
            f"compare_theory has no theory for this chain: its blocks are {_short(blocks)}, "
            f"with no run of a supported shape. {rules}"
        )
    for part, where in ((blocks[: span.start], "before"), (blocks[span.stop :], "after")):
        why = _outside(part)
        if why is not None:
            raise ValueError(
                f"compare_theory has no theory for this chain: its blocks are {_short(blocks)}; "
                f"the longest run of a supported shape, {_pattern(blocks, span)} (blocks "
                f"{span.start}..{span.stop - 1}), has blocks {where} it that {why}. {rules}"
            )
    return span


def _numbered(start: int, stop: int) -> str:
    return f"block {start}" if stop == start + 1 else f"blocks {start}..{stop - 1}"


def _pattern(blocks: Sequence[Block], span: _Span) -> str:
    unit = blocks[span.start : span.start + span.unit.size]
    text = ", ".join(b._text(False) for b in unit)
    out = (f"[{text}]" if len(unit) > 1 else text) + f" x {span.units}"
    return out + (f", {blocks[span.stop - 1]._text(False)}" if span.final_norm else "")


def _located(chain: Chain, top: int, body: int | None) -> tuple[Block, str]:
    """The block at a top-level index (and index in its residual body) and its name, as
    the chain names its parameters."""
    b, name = chain.blocks[top], chain._names[top]
    if body is None:
        return b, name
    assert isinstance(b, Residual)
    c = b.blocks[body]
    if c.prefix is not None:
        return c, c.prefix
    return c, (f"{name}.block.{body}" if name else f"block.{body}")


def _named_copy(b: Block, name: str) -> Block:
    """`b` named `name` (as its chain names it), so that a chain of a slice of the blocks
    keeps the chain's parameter names."""
    if b.prefix is not None:
        return b
    pos, kw = b._args()
    return type(b)(*pos, **{**kw, "prefix": name})


def _sub_chain(chain: Chain, start: int, stop: int) -> Chain:
    """A chain of the top-level blocks [start, stop) with a copy of their parameters and
    buffers, the same names and the same mode."""
    blocks = [_named_copy(b, n) for b, n in zip(chain.blocks[start:stop], chain._names[start:stop])]
    sub = Chain.__new__(Chain)
    sub._build(blocks, chain.dtype)
    src = chain._layout().position
    sub.load_state_dict({k: chain._core.param(src[k]) for k in sub._layout().torch_order})
    sub._config = None
    sub._training = chain.training
    return sub


def _has_batchnorm(blocks: Sequence[Block]) -> bool:
    return any(
        isinstance(b, BatchNorm) or (isinstance(b, Residual) and _has_batchnorm(b.blocks))
        for b in blocks
    )


@contextlib.contextmanager
def _buffers_kept(chain: Chain) -> Iterator[None]:
    """Restores a chain's buffers after a train-mode pass, which updates BatchNorm's running
    statistics as a torch forward pass does: a comparison leaves the chain as it was."""
    if not (chain.training and _has_batchnorm(chain.blocks)):
        yield
        return
    n = int(chain._core.num_params)
    saved = [
        (i, np.array(chain._core.param(i)).reshape(-1))
        for i in range(n, len(chain._layout().names))
    ]
    try:
        yield
    finally:
        if saved:
            chain._core.set_params(saved)


def _norms_at_init(chain: Chain, span: _Span) -> None:
    """The block theories take every norm layer at initialization (weight 1, bias 0)."""
    places = [
        (span.start + l * span.unit.size + off, j)
        for l in range(span.units)
        for off, j in span.unit.norms
    ]
    if span.final_norm:
        places.append((span.stop - 1, None))
    for top, j in places:
        block, name = _located(chain, top, j)
        for suffix, value in (("weight", 1.0), ("bias", 0.0)):
            key = f"{name}.{suffix}"
            if key in chain._layout().position and np.any(chain._view(key) != value):
                raise ValueError(
                    f"compare_theory's block theories take norm layers at initialization "
                    f"(weight 1, bias 0), but {key} of {block._text(False)} is not {value:g} "
                    "everywhere (a trained or edited model): the prediction does not apply to it"
                )


def _span_linears(body: Chain, span: _Span) -> tuple[list[Linear], list[str]]:
    """The Linear blocks of the body chain (the span alone) whose weights the theory's
    sigma_w and sigma_b describe, and their names."""
    lins, names = [], []
    for l in range(span.units):
        for off, j in span.unit.linears:
            block, name = _located(body, l * span.unit.size + off, j)
            assert isinstance(block, Linear)
            lins.append(block)
            names.append(name)
    return lins, names


def _chain_sigmas(
    chain: Chain, body: Chain, span: _Span, sigma_w: Any, sigma_b: Any
) -> tuple[float, float, str, str]:
    """sigma_w and sigma_b of the span's Linears: given, from the chain's initializer (a
    chain that has not loaded other parameters), or estimated from the weights."""
    cfg = None if chain._loaded else getattr(chain, "_config", None)
    lins, names = _span_linears(body, span)
    if sigma_w is not None:
        sw, src_w = _sigma("sigma_w", sigma_w), "given"
    else:
        per = _init_sigma_ws(cfg, [(b.in_features, b.out_features) for b in lins])
        if per is not None:
            assert cfg is not None
            labels = [f"{n} {b._text(False)}" for n, b in zip(names[:4], lins[:4])]
            sw = _one_sigma_w(per, labels, "gives the span's Linear layers", cfg["init"])
            src_w = "init"
        else:
            ws = [body._view(f"{n}.weight") for n in names]
            sw, src_w = _rms([math.sqrt(w.shape[1]) * _rms(w) for w in ws]), "estimated"
    if span.unit.kind == "batch_norm":
        if sigma_b is not None:
            raise ValueError(
                "sigma_b plays no part in a BatchNorm chain's theory (a bias before a BatchNorm "
                f"cancels); leave it None; got sigma_b={sigma_b!r}"
            )
        return sw, 0.0, src_w, "not applicable"
    if sigma_b is not None:
        return sw, _sigma("sigma_b", sigma_b), src_w, "given"
    with_bias = [b.bias for b in lins]
    if cfg is not None:
        std = float(cfg["bias_std"])
        if std > 0 and any(with_bias) and not all(with_bias):
            raise ValueError(
                f"bias_std={std:g} draws the biases of some of the span's Linear layers while "
                "others have none; mean-field theory needs one sigma_b: pass sigma_b= explicitly"
            )
        return sw, (std if all(with_bias) else 0.0), src_w, "init"
    rms = [_rms(body._view(f"{n}.bias")) if b.bias else 0.0 for n, b in zip(names, lins)]
    return sw, _rms(rms), src_w, "estimated"


def _span_input(
    chain: Chain, span: _Span, x: Any, batch: Any, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The chain's input (given, or drawn from `seed`) and the span's (the blocks before
    the span run forward on it)."""
    if x is None:
        b = v.positive_int("batch", batch)
        _check_draws(b, chain.in_features, chain.widths[span.stop], chain.dtype)
        xa = _rng(seed, 0).standard_normal((b, chain.in_features)).astype(chain.dtype)
    else:
        xa = chain._x(x)
    if span.start == 0:
        return xa, xa
    return xa, _sub_chain(chain, 0, span.start).forward(xa)


def _span_q0(xs: np.ndarray, kind: str) -> tuple[np.ndarray, float]:
    """The theory's q0 from the span's input, per example (one value for a BatchNorm
    chain, whose blocks see the batch), and the share of the input's mean square that
    is the mean of each example's entries.

    q0 is the mean square entry, except where a norm layer sees the input first: for a
    BatchNorm chain the features' mean unbiased batch variance (what the first BatchNorm
    divides by), for a pre-LN chain the variance over the features (what each LayerNorm
    divides by: the input's mean across the features stays in h_l through the identity
    paths, and the LayerNorms remove it). For independent zero-mean inputs they agree.
    """
    a = np.asarray(xs, dtype=np.float64)
    scale = float(np.max(np.abs(a), initial=0.0))
    if scale == 0.0:
        return np.zeros(1 if kind == "batch_norm" else a.shape[0]), 0.0
    a = a / scale  # the squares below neither overflow nor underflow
    ms = np.mean(a * a, axis=1)
    centred = np.mean(np.square(a - a.mean(axis=1, keepdims=True)), axis=1)
    share = float((ms.sum() - centred.sum()) / ms.sum())
    if kind == "batch_norm":
        b = a.shape[0]
        c = a - a.mean(axis=0)
        return np.array([float(np.mean(c * c)) * b / (b - 1) * scale * scale]), share
    return (centred if kind == "pre_norm" else ms) * scale * scale, share


# Examples are grouped by their q0 for the per-example theory: the curves are smooth in q0,
# so the group means stand for their members to second order in the spread within a group
# (with 8 groups about 1/64 of the whole correction; each group costs one theory call).
_Q0_GROUPS = 8
_Q0_OF = {
    "mlp": "the mean square entry of",
    "batch_norm": "the features' mean batch variance of",
    "residual": "the mean square entry of",
    "pre_norm": "the variance over the features of",
    "post_norm": "the mean square entry of",
}


def _mean_square_log10(curves: Sequence[np.ndarray], shares: Sequence[float]) -> np.ndarray:
    """``0.5 log10 sum_k shares_k 10**(2 curves_k)``: the log10 of the root mean square of
    norms given as log10 curves, elementwise, in log space."""
    if len(curves) == 1:
        return np.array(curves[0], dtype=np.float64)
    values = np.array(curves, dtype=np.float64)
    stack = values * (2.0 * _LN10) + np.log(np.asarray(shares, dtype=np.float64))[:, None]
    out = np.logaddexp.reduce(stack, axis=0) / (2.0 * _LN10)
    # where every example's curve has the same value (the top, 0 by definition) it is that
    # value, without the rounding of the sum
    same = np.all(values == values[0], axis=0)
    out[same] = values[0, same]
    return out


def _block_prediction(
    span: _Span,
    depth: int,
    sw: float,
    sb: float,
    q0s: np.ndarray,
    batch: int,
    inputs: tuple[str, str],
) -> tuple[Any, np.ndarray, np.ndarray | None, dict[str, Any]]:
    """The theory result of the span (at the mean q0), the predicted curve and weight
    gradients, and the mean-field fields of the comparison.

    Residual, pre-LN and post-LN blocks act on each example alone: the theory is evaluated
    at each example's own q0 and the mean squared norms are combined over the batch, as
    the batch's Frobenius norm combines them (with independent output gradients of equal
    variance). Evaluated at the mean q0 instead, a batch whose examples differ in scale (a
    narrow input Linear before the span) would be predicted too low, since the per-example
    curves are convex in q0.
    """
    u = span.unit
    act = u.act
    kw = {"negative_slope": act.negative_slope, "alpha": act.alpha}
    none = {"q_star": None, "chi_1": None, "depth_scale": None, "lyapunov_exponent": None}
    q0 = float(np.mean(q0s))
    src_w, src_b = inputs

    def at(q: float, what: str) -> Any:
        with _theory_inputs(sw, src_w, sb, src_b, q, what):
            if u.kind == "mlp":
                return theory.predicted_grad_norms(depth, act.name, sw, sb, q0=q, **kw)
            if u.kind == "batch_norm":
                return theory.batchnorm_grad_norms(depth, act.name, batch, sigma_w=sw, q0=q, **kw)
            assert u.branch is not None and u.scale is not None
            if u.kind == "residual":
                return theory.residual_grad_norms(
                    depth, act.name, sw, sb, scale=u.scale, branch=u.branch, q0=q, **kw
                )
            return theory.norm_position_grad_norms(
                depth, act.name, sw, sb, position=u.kind[: -len("_norm")], scale=u.scale,
                branch=u.branch, q0=q, **kw,
            )  # fmt: skip

    pred = at(q0, f"{_Q0_OF[u.kind]} the span's input")
    if u.kind in ("mlp", "batch_norm"):
        predicted = np.array(pred.log10_activation_grad_norms, dtype=np.float64)
        if u.kind == "mlp":
            mf = theory.mean_field(act.name, sw, sb, q0=q0, correlation=False, **kw)
            return pred, predicted, None, _mean_field_fields(mf)
        bmf = theory.batchnorm_mean_field(act.name, batch, **kw)
        mean = {**none, "depth_scale": bmf.depth_scale, "lyapunov_exponent": bmf.lyapunov_exponent}
        weights = np.array(pred.log10_weight_grad_norms, dtype=np.float64)
        return pred, predicted, weights, {**mean, "phase": "not applicable"}
    groups = np.array_split(np.sort(q0s), min(q0s.size, _Q0_GROUPS))
    curves, wcurves, shares = [], [], []
    for g in groups:
        p = at(float(np.mean(g)), f"{_Q0_OF[u.kind]} some examples of the span's input")
        c = np.array(p.log10_activation_grad_norms, dtype=np.float64)
        w = np.array(p.log10_weight_grad_norms, dtype=np.float64)
        if u.kind == "pre_norm" and not span.final_norm:
            # y is h_L itself: the curves are relative to it, without a final LayerNorm's factor
            top = c[-1]
            c -= top
            w -= top
        curves.append(c)
        wcurves.append(w)
        shares.append(g.size / q0s.size)
    predicted = _mean_square_log10(curves, shares)
    weights = _mean_square_log10(wcurves, shares)
    return pred, predicted, weights, {**none, "phase": "not applicable"}


def _compare_chain(
    chain: Chain,
    label: str,
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
    blocks = chain.blocks
    span = _recognise(blocks)
    u, L = span.unit, span.units
    if u.kind == "batch_norm" and not chain.training:
        raise ValueError(
            "the BatchNorm blocks are in eval mode, where they normalise with running "
            "statistics; the theory (Yang et al. 2019) is that of train mode, with batch "
            "statistics: call net.train() first"
        )
    fs = _fit_start(fit_start, L)
    kk = _k(k, min(chain.widths[span.start : span.stop + 1]), "the smallest width")
    xa, xs = _span_input(chain, span, x, batch, seed)
    b = xa.shape[0]
    if u.kind == "batch_norm" and b < 4:
        raise ValueError(
            "a chain of train-mode BatchNorm blocks needs a batch of at least 4 for a finite "
            "prediction (the mean squared gradient is infinite at batch 3 and exactly 0 at "
            f"2; Yang et al. 2019); got a batch of {b}"
        )
    whole = span.start == 0 and span.stop == len(blocks)
    if chain._loaded or getattr(chain, "_config", None) is None:
        _norms_at_init(chain, span)
    body = chain if whole else _sub_chain(chain, span.start, span.stop)
    sw, sb, src_w, src_b = _chain_sigmas(chain, body, span, sigma_w, sigma_b)
    q0s, mean_share = _span_q0(xs, u.kind)
    q0 = float(np.mean(q0s))
    pred, predicted, p_weights, mean = _block_prediction(span, L, sw, sb, q0s, b, (src_w, src_b))
    notes: list[str] = []
    if mean_share > 0.05 and (u.kind == "post_norm" or u.branch == "act_linear"):
        notes.append(
            f"the span's input has a mean across its entries ({100 * mean_share:.3g}% of its "
            "mean square), which the theory takes as zero: the first blocks may differ"
        )
    if u.kind == "pre_norm" and not span.final_norm:
        notes.append("no LayerNorm after the last block: y is h_L")

    _check_draws(b, 0, body.out_features, np.float64)
    g = _rng(seed, 1).standard_normal((b, body.out_features))
    try:
        with _buffers_kept(body):
            rep = body.backward(xs, grad_output=g)
    except NonFiniteError as err:
        if span.start == 0:
            raise
        raise NonFiniteError(
            f"{err} (counting from block {span.start}, where the span compared starts)",
            err.where,
            err.index + span.start,
        ) from None
    lg = np.asarray(rep.log10_activation_grad_norms, dtype=np.float64)
    ends = np.arange(L + 1) * u.size
    measured = lg[ends] - lg[-1]
    m_weights = None
    if u.weight is not None:
        lw = rep.log10_param_grad_norms
        off, j = u.weight
        rows = []
        for l in range(L):
            lin, name = _located(body, l * u.size + off, j)
            assert isinstance(lin, Linear)
            rows.append(lw[f"{name}.weight"] - 0.5 * math.log10(lin.in_features))
        m_weights = np.array(rows, dtype=np.float64) - lg[-1]

    spec: dict[str, Any] = {}
    if spectrum and u.kind == "batch_norm":
        notes.append(
            "no spectrum: a train-mode BatchNorm couples the examples of a batch, so a block's "
            "Jacobian is that of the whole batch, which the per-example theory does not describe"
        )
    elif spectrum:
        # A random start frame: the theory is that of a random direction, and in a residual
        # chain whose branch starts with the activation a coordinate direction is not one
        # (a unit that is off stays off from block to block, so e_1 may hardly grow).
        start = "identity" if u.kind == "mlp" else "random"
        s = jacobian_spectrum(body, xs[:sbatch], k=kk, interval=u.size, start=start, seed=seed)
        d = np.asarray(s.depths)
        keep = (d % u.size == 0) & (d <= L * u.size)
        cfg = None if chain._loaded else getattr(chain, "_config", None)
        exact = None
        if u.kind == "mlp":
            init = None if cfg is None else cfg.get("init")
            exact = _exact_spectrum(
                u.act.name, body.widths[: L * u.size + 1 : u.size], init, sw, L, kk
            )
        spec = _spectrum_fields(
            d[keep] // u.size, s.log_singular_values[:, keep, :], pred, predicted, exact
        )
    if span.start:
        notes.append(
            f"{_numbered(0, span.start)} {_short(blocks[: span.start])} ran forward only, to "
            "give the span its input"
        )
    if span.stop < len(blocks):
        notes.append(
            f"{_numbered(span.stop, len(blocks))} {_short(blocks[span.stop :])} left out: the "
            "seeded gradient enters at the span's output"
        )
    return _result(
        measured=measured,
        predicted=predicted,
        mean=mean,
        fit_start=fs,
        spec=spec,
        kind=u.kind,
        activation=u.act.name,
        net=label,
        depth=L,
        batch=b,
        seed=seed,
        sigma_w=sw,
        sigma_b=sb,
        sigma_source=src_w,
        sigma_b_source=src_b,
        input_variance=0.0,
        q0=q0,
        span=(span.start, span.stop),
        pattern=_pattern(blocks, span),
        scale=u.scale,
        branch=u.branch,
        measured_log10_weight_grad_norms=m_weights,
        predicted_log10_weight_grad_norms=p_weights,
        notes=tuple(notes),
    )


# --------------------------------------------------------------------------- entry point


def compare_theory(
    net: MLP | Chain | RNN,
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

    A chain of blocks (a :class:`~gradchain.Chain`, or an MLP with ``norm`` or
    ``residual``) is compared over its span of repeated blocks of one of these shapes,
    with the theory result that describes it:

    ==============================================================  ===========================================
    blocks (x L)                                                    theory
    ==============================================================  ===========================================
    ``Linear, Activation``                                          :func:`~gradchain.theory.predicted_grad_norms`
    ``Linear, BatchNorm, Activation`` (train mode)                  :func:`~gradchain.theory.batchnorm_grad_norms`
    ``Residual([Activation, Linear])``,                             :func:`~gradchain.theory.residual_grad_norms`
    ``Residual([Linear, Activation, Linear])``
    ``Residual([LayerNorm, <either branch>])``, then optionally     :func:`~gradchain.theory.norm_position_grad_norms`,
    a ``LayerNorm``                                                 ``position="pre"``
    ``Residual([<either branch>]), LayerNorm``                      ``position="post"``
    ==============================================================  ===========================================

    with one activation and one residual scale throughout, identity shortcuts and norm
    layers at initialization (weight 1, bias 0). Blocks before the span (an input Linear
    with norm and activation blocks: at most one Linear, no residual block) are run
    forward to give the span its input x; blocks after it (read-out blocks, at most one
    Linear) are left out, the Gaussian gradient entering at the span's output. These are
    the shapes ``gc.MLP`` builds with ``norm="batch", norm_position="post"``, with
    ``residual=True`` and no norm, and with ``residual=True`` and ``norm="layer"`` (pre or
    post); its other options (``norm="rms"``, pre-norm without residuals, BatchNorm in
    residual layers) have no theory here and raise a ValueError, as does any other chain.

    Parameters
    ----------
    net : MLP, Chain or RNN
        The chain. An RNN must have one layer and a vanilla cell (``tanh`` or ``relu``),
        the cells the theory covers.
    x : array_like, optional
        Inputs: shape (batch, widths[0]) for an MLP or a Chain, (steps, batch,
        input_size) for an RNN. By default a standard Gaussian drawn from `seed`. For the
        autonomous recurrent network pass ``x=np.zeros((steps, batch, input_size))`` (with
        a nonzero `h0`, or biases, so that the state moves). A train-mode BatchNorm chain
        needs a batch of at least 4.
    sigma_w, sigma_b : float, optional
        Weight and bias standard deviations for the theory (``W_l`` entries of variance
        ``sigma_w**2 / fan_in``; for an RNN ``weight_hh`` and ``b_ih + b_hh``). By default
        they follow from the chain's initializer (``gain``, ``sigma_w``, ``bias_std``,
        ``recurrent_gain``), or, for chains built from arrays (``MLP.from_weights``,
        ``RNN.from_state_dict``) or with ``spectral_radius``, are estimated from the
        weights. An MLP whose initializer gives the layers different effective values
        (e.g. ``xavier_normal`` with unequal widths, or a branch ``Linear(n, 4n), ...,
        Linear(4n, n)``) needs `sigma_w` here. An RNN's input drive is added to
        ``sigma_b**2`` in any case (see :attr:`TheoryComparison.input_variance`). A
        BatchNorm chain takes no `sigma_b` (a bias before a BatchNorm cancels), and its
        `sigma_w` only scales the weight gradients.
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
        ``4 n**2 k`` flops per layer and example. Not for a train-mode BatchNorm chain,
        whose blocks couple the examples (:attr:`TheoryComparison.notes` says so).
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
        `net` is not an MLP, Chain or RNN, or an argument has the wrong type.
    ValueError
        An RNN that is not a single-layer vanilla one, a chain of blocks of no supported
        shape (the message lists what it found and the shapes above), inputs of the wrong
        shape or not finite, `k` or `fit_start` out of range, or a chain whose initializer
        gives the layers different effective sigma_w (pass `sigma_w`).
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
    spectrum = v.flag("spectrum", spectrum)
    sd = v.seed(seed)
    sbatch = v.positive_int("spectrum_batch", spectrum_batch)
    if isinstance(net, RNN):
        return _compare_rnn(
            net, x, sigma_w, sigma_b, h0, batch, steps, sd, fit_start, spectrum, k, sbatch
        )
    if not isinstance(net, (MLP, Chain)):
        raise TypeError(
            f"net must be a gradchain.MLP, gradchain.Chain or gradchain.RNN; got {type(net).__name__}"
        )
    if h0 is not None:
        raise ValueError(
            f"h0 is the initial state of a gradchain.RNN; a {type(net).__name__} has none"
        )
    if isinstance(net, MLP) and net.norm is None and not net.residual:
        return _compare_mlp(net, x, sigma_w, sigma_b, batch, sd, fit_start, spectrum, k, sbatch)
    chain = net._net if isinstance(net, MLP) else net
    return _compare_chain(
        chain, repr(net), x, sigma_w, sigma_b, batch, sd, fit_start, spectrum, k, sbatch
    )


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
            f"({src_b}) and q0={q0:.6g}, {q0_from})"
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
    with _theory_inputs(sw, src_w, sb, src_b, q0, "the mean square entry of x"):
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
        mean=_mean_field_fields(mf),
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

    with _theory_inputs(
        sw, src_w, sb_eff, src_b + ", with the input drive", q0, "the mean square entry of h0"
    ):
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
        s = jacobian_spectrum(net, net._as_given(xa[:, :sbatch]), h0=h0s, k=kk)
        spec = _spectrum_fields(s.depths, s.log_singular_values, pred, predicted)
    return _result(
        measured=measured,
        predicted=predicted,
        mean=_mean_field_fields(mf),
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
