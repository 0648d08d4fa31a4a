"""Theory of vanishing and exploding gradients: mean-field signal propagation and
random-matrix results, in pure NumPy.

Conventions
-----------
A fully connected chain maps an input ``h_0 = x`` (``N_0`` entries) through
``z_l = W_l h_{l-1} + b_l`` and ``h_l = phi(z_l)``, ``l = 1..L``, with
``W_l[i, j] ~ N(0, sigma_w**2 / N_{l-1})`` and ``b_l[i] ~ N(0, sigma_b**2)``: this is
:class:`gradchain.MLP` with ``init="normal"`` and ``bias_std=sigma_b``. ``sigma_w`` and
``sigma_b`` are standard deviations throughout; the literature's axes are their squares.

``q_l`` is the variance of a *pre-activation* ``z_l[i]`` in the wide limit (Poole et al.
2016). An input enters through ``q0 = ||x||**2 / N_0`` (its mean squared entry, Poole's
``q^0``), so that

* ``q_1 = sigma_w**2 * q0 + sigma_b**2`` (exact in expectation over ``W_1, b_1``);
* ``q_l = sigma_w**2 * E_z[phi(sqrt(q_{l-1}) z)**2] + sigma_b**2`` for ``l >= 2``, the
  *length map*, with ``z ~ N(0, 1)``.

Backpropagation gives ``dL/dh_{l-1} = W_l^T (phi'(z_l) * dL/dh_l)``, and with the usual
gradient-independence assumption (Schoenholz et al. 2017) the *squared* norms obey
``E||dL/dh_{l-1}||**2 = chi(q_l) * ||dL/dh_l||**2`` with
``chi(q) = sigma_w**2 * E_z[phi'(sqrt(q) z)**2]`` (equal widths). At the fixed point
``q*`` of the length map this is ``chi_1``: squared gradient norms shrink (``chi_1 < 1``,
ordered phase) or grow (``chi_1 > 1``, chaotic phase) by ``chi_1`` per layer. Norms (not
squared) change by ``sqrt(chi_1)`` per layer. Activations and their derivatives are
PyTorch's, as in :data:`gradchain.ACTIVATIONS` (``relu'(0) = 0``, softplus with beta 1 and
threshold 20, gelu in its erf form).

A growth factor (``chi``, ``chi_1``, the slope of a homogeneous length map) within 8
units in the last place of 1 is taken as exactly 1: ``sigma_w`` is seldom exact in
binary, and ``math.sqrt(2)**2 / 2 = 1 + 2**-52`` would otherwise put the He-initialised
relu chain 1e-16 into the chaotic phase, with ``q* = inf`` and a depth scale of -4.5e15
layers instead of the marginal chain it is.

Chains of blocks (normalization and residual connections) have their own functions:
:func:`batchnorm_mean_field` and :func:`batchnorm_grad_norms` (Yang et al. 2019),
:func:`residual_grad_norms` (Yang & Schoenholz 2017, Hanin & Rolnick 2018) and
:func:`norm_position_grad_norms` (Xiong et al. 2020), each returning per-block
predictions as a :class:`BlockGradNormPrediction`.

Expectations over ``z`` are computed by composite Gauss-Legendre quadrature on
``[-12, 12]`` standard deviations, with panel ends at the activation's kink (0) and at
the scales where it bends (``|x|`` = 1/4 .. 64, and 20 for softplus's threshold):
accurate to 1e-14 relative or better for every activation and every ``q`` from 0 to
1e300 (tests/test_theory.py checks closed forms, a brute-force rule and 30-digit mpmath
integrals at ``q`` = 1e-6, 1, 10, 80 and 1e4). Plain Gauss-Hermite quadrature with 160
nodes misses the kink of ``elu`` (errors near 1e-3) and the narrow spike of
``sech(sqrt(q) z)**4`` at large ``q`` (60% error at ``q = 80``, 70% at 100). The
expectations of batch normalization, over a uniform point of a sphere, use the same
panels in polar angles (see :func:`batchnorm_mean_field`). One helper, ``_panels``, makes
every rule.

Ranges
------
Every function takes standard deviations (``sigma_w``, ``sigma_b``) in [0, 1e150],
variances (``q``, ``q0``) in [0, 1e300], ``negative_slope`` in [-100, 100] and ``alpha``
in (0, 1e150]: within them no intermediate value of the quadrature leaves the double
range. Outside, and for non-finite values, a ``ValueError`` names the argument and its
range; the residual branch multiplier ``scale`` takes ``|scale| <= 1e150`` and ``batch``
runs from 2 to 2**31 - 1. A result that itself exceeds the double range (``chi`` for
``sigma_w = 1e150`` and ``alpha = 1e100``, a moment of a very deep product) is ``inf``. Sizes (``depth``,
``n``) are checked against the memory available before anything is allocated
(``MemoryError`` stating the bytes), and work that would not finish promptly is refused
with a ``ValueError`` naming the argument and the range that is accepted.

References
----------
.. [1] B. Poole, S. Lahiri, M. Raghu, J. Sohl-Dickstein, S. Ganguli, "Exponential
   expressivity in deep neural networks through transient chaos", NeurIPS 2016.
.. [2] S. S. Schoenholz, J. Gilmer, S. Ganguli, J. Sohl-Dickstein, "Deep information
   propagation", ICLR 2017.
.. [3] J. Pennington, S. S. Schoenholz, S. Ganguli, "Resurrecting the sigmoid in deep
   learning through dynamical isometry: theory and practice", NeurIPS 2017.
.. [4] C. M. Newman, "The distribution of Lyapunov exponents: exact results for random
   matrices", Commun. Math. Phys. 103, 121-126 (1986).
.. [5] P. J. Forrester, "Lyapunov exponents for products of complex Gaussian random
   matrices", J. Stat. Phys. 151, 796-808 (2013).
.. [6] K. A. Penson, K. Zyczkowski, "Product of Ginibre matrices: Fuss-Catalan and Raney
   distributions", Phys. Rev. E 83, 061118 (2011).
.. [7] H. Sompolinsky, A. Crisanti, H. J. Sommers, "Chaos in random neural networks",
   Phys. Rev. Lett. 61, 259-262 (1988).
.. [8] L. Molgedey, J. Schuchhardt, H. G. Schuster, "Suppressing chaos in neural networks
   by noise", Phys. Rev. Lett. 69, 3717-3719 (1992).
.. [9] Y. Bengio, P. Simard, P. Frasconi, "Learning long-term dependencies with gradient
   descent is difficult", IEEE Trans. Neural Netw. 5, 157-166 (1994).
.. [10] G. Yang, J. Pennington, V. Rao, J. Sohl-Dickstein, S. S. Schoenholz, "A mean field
   theory of batch normalization", ICLR 2019.
.. [11] G. Yang, S. S. Schoenholz, "Mean field residual networks: on the edge of chaos",
   NeurIPS 2017.
.. [12] B. Hanin, D. Rolnick, "How to start training: the effect of initialization and
   architecture", NeurIPS 2018.
.. [13] R. Xiong, Y. Yang, D. He, K. Zheng, S. Zheng, C. Xing, H. Zhang, Y. Lan, L. Wang,
   T.-Y. Liu, "On layer normalization in the Transformer architecture", ICML 2020.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from numpy.polynomial.legendre import leggauss

from . import _validate as v
from .report import _jsonable, _pow10

__all__ = [
    "ACTIVATIONS",
    "BatchNormMeanField",
    "BlockGradNormPrediction",
    "ConvergenceError",
    "GradNormPrediction",
    "MeanField",
    "OrderChaosBoundary",
    "ScalarChain",
    "batchnorm_grad_norms",
    "batchnorm_mean_field",
    "chi",
    "chi_1",
    "correlation_map",
    "critical_sigma_w",
    "fuss_catalan_moments",
    "gaussian_lyapunov_spectrum",
    "gaussian_lyapunov_stderr",
    "gaussian_product_moments",
    "length_map",
    "mean_field",
    "norm_position_grad_norms",
    "order_chaos_boundary",
    "predicted_grad_norms",
    "residual_grad_norms",
    "rnn_max_lyapunov_meanfield",
    "scalar_chain",
]

ACTIVATIONS: tuple[str, ...] = (
    "linear",
    "sigmoid",
    "tanh",
    "relu",
    "leaky_relu",
    "elu",
    "gelu",
    "gelu_tanh",
    "silu",
    "softplus",
)
_HOMOGENEOUS = ("linear", "relu", "leaky_relu")

# q beyond these is treated as 0 / as diverged; the largest node, 12 sqrt(1e300) (times
# 2**(1/8)), still has a square in double range.
_Q_TINY = 1e-300
_Q_HUGE = 1e300
_TOL = 2.0**-50  # relative: a few units in the last place
# A growth factor within 8 units in the last place of 1 counts as exactly 1 (marginal).
# sigma_w is seldom exact in binary: math.sqrt(2)**2 / 2 = 1 + 2**-52, and taken at its word
# the He-initialised relu chain would sit 1e-16 above the boundary, its q* infinite.
_MARGINAL = 8 * 2.0**-52


def _marginal(x: float) -> float:
    """x, or exactly 1 where x is within rounding of 1 (see _MARGINAL)."""
    return 1.0 if abs(x - 1.0) <= _MARGINAL else x


# ---------------------------------------------------------------------------------------
# Quadrature
# ---------------------------------------------------------------------------------------
_Z_MAX = 12.0  # standard deviations; the Gaussian mass beyond is 3.6e-33
_Z_BREAKS = np.array([0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.5, 8.5, _Z_MAX])
# Where the activations bend, in units of their argument (20: softplus's threshold).
_X_BREAKS = np.array([0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 20.0, 32.0, 64.0])
_GL_T, _GL_W = leggauss(12)
_GL2_T, _GL2_W = leggauss(8)  # the inner integral of the two-dimensional expectations
_GL10_T, _GL10_W = leggauss(10)  # both angles of the batch-norm pair rule (1e-15 there)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_LN10 = math.log(10.0)


def _panels(breaks: np.ndarray, t: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights on the panels between sorted breakpoints."""
    mid, half = (breaks[1:] + breaks[:-1]) / 2, (breaks[1:] - breaks[:-1]) / 2
    return (mid[:, None] + half[:, None] * t).ravel(), (half[:, None] * w).ravel()


@functools.lru_cache(maxsize=1024)
def _half_rule(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes x > 0 and weights for integrals over [0, 12 s], s = 2**(k/4), with panel
    ends at the activation breaks and at multiples of s (the Gaussian's scale)."""
    s = 2.0 ** (k / 4.0)
    br = np.unique(np.concatenate(([0.0], _X_BREAKS[_X_BREAKS < s * _Z_MAX], s * _Z_BREAKS)))
    return _panels(br, _GL_T, _GL_W)


def _rule(q: float) -> tuple[np.ndarray, np.ndarray]:
    """Nodes x (both signs) and weights w with sum(w * f(x)) ~ E[f(sqrt(q) z)], q > 0."""
    s = math.sqrt(q)
    # Panels follow the Gaussian's scale to within 2**(1/8); the cache keeps one rule per step.
    x, w = _half_rule(round(4.0 * math.log2(s)))
    w = w * np.exp(-0.5 * (x / s) ** 2) * (_INV_SQRT_2PI / s)
    return np.concatenate((x, -x)), np.concatenate((w, w))


def _sphere_breaks(R: float, k: int) -> np.ndarray:
    """Panel ends in an angle t on [0, upper] for integrands of R sin(t) under a weight
    that falls like cos(t)**k ~ exp(-k t**2 / 2): at multiples of the weight's scale (as
    _rule does in z, up to 12 of them or pi/2) and where R sin(t) crosses the
    activations' bends."""
    s = 1.0 / math.sqrt(max(k, 1))
    upper = min(0.5 * math.pi, _Z_MAX * s)
    bends = _X_BREAKS[_X_BREAKS < R * math.sin(upper)]
    br = np.concatenate(([0.0, upper], s * _Z_BREAKS, np.arcsin(bends / R)))
    return np.unique(br[br <= upper])


@functools.lru_cache(maxsize=64)
def _sphere_rule(batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes y and weights w with sum(w * f(y)) ~ E[f(y_1)] for ``y = sqrt(B) v``, ``v``
    uniform on the unit sphere of the hyperplane ``sum(x) = 0`` of R^B (B >= 3): an entry
    of a batch-normalized vector at the fixed point of Yang et al. (2019).

    ``y_1 = sqrt(B - 1) sin(t)`` with density proportional to ``cos(t)**(B - 3)`` on
    ``(-pi/2, pi/2)``; in t the weight is smooth at the ends for every B (in y it has a
    square-root edge at B = 5), and the kink of relu at 0 is a panel end."""
    t, w = _panels(_sphere_breaks(math.sqrt(batch - 1), batch - 3), _GL_T, _GL_W)
    sin_t = np.sin(t)
    w = w * np.exp(0.5 * (batch - 3) * np.log1p(-sin_t * sin_t))
    y = math.sqrt(batch - 1) * sin_t
    y, w = np.concatenate((y, -y)), np.concatenate((w, w))
    return y, w / w.sum()


@functools.lru_cache(maxsize=64)
def _sphere_pair_rule(batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nodes (y1, y2) and weights w for E[f(y_1, y_2)], y as in _sphere_rule (B >= 3).

    The plane of ``e_1, e_2`` projected on the hyperplane: in orthonormal coordinates
    ``(r cos(o), r sin(o))`` there, ``y_1 = R r cos(o)`` and ``y_2 = R r cos(o - o2)``
    with ``R = sqrt(B - 1)`` and ``cos(o2) = -1/(B - 1)``. The projection of a uniform
    point of the (B - 2)-sphere has density proportional to ``(1 - r**2)**((B - 5)/2)``
    on the unit disc; with ``r = sin(p)`` the weight is ``sin(p) cos(p)**(B - 4) dp do``,
    smooth for every B >= 4 (B = 3: the unit circle, r = 1). The lines ``y_1 = 0`` and
    ``y_2 = 0`` (relu's kinks) are panel ends in o."""
    o2 = math.acos(-1.0 / (batch - 1))
    kinks = np.mod(np.array([0.5, 1.5, 0.5, 1.5]) * math.pi + np.array([0, 0, o2, o2]), 2 * math.pi)
    ob = np.unique(np.concatenate((np.linspace(0.0, 2 * math.pi, 13), kinks)))
    o, wo = _panels(ob, _GL10_T, _GL10_W)
    if batch == 3:
        r, wr = np.ones(1), np.ones(1)
    else:
        p, wr = _panels(_sphere_breaks(math.sqrt(batch - 1), batch - 4), _GL10_T, _GL10_W)
        sin_p = np.sin(p)
        r = sin_p
        wr = wr * sin_p * np.exp(0.5 * (batch - 4) * np.log1p(-sin_p * sin_p))
    R = math.sqrt(batch - 1)
    y1 = R * np.outer(r, np.cos(o)).ravel()
    y2 = R * np.outer(r, np.cos(o - o2)).ravel()
    w = np.outer(wr, wo).ravel()
    return y1, y2, w / w.sum()


_erf = np.frompyfunc(math.erf, 1, 1)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -x))  # no overflow for any x


@dataclass(frozen=True)
class _Act:
    """An activation with PyTorch's formulas: ``phi(x)`` and ``phi'(x)`` on arrays."""

    name: str
    negative_slope: float = 0.01
    alpha: float = 1.0

    @property
    def homogeneous(self) -> bool:
        return self.name in _HOMOGENEOUS

    def homogeneous_moments(self) -> tuple[float, float]:
        """E[phi(z)**2] and E[phi'(z)**2] for the positively homogeneous activations
        (relu is leaky_relu with slope 0): q-independent up to the factor q."""
        s = {"linear": 1.0, "relu": 0.0, "leaky_relu": self.negative_slope}[self.name]
        c = (1.0 + s * s) / 2.0
        return c, c

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = self.name
        if n == "linear":
            return x, np.ones_like(x)
        if n == "tanh":
            t = np.tanh(x)
            return t, 1.0 - t * t
        if n == "sigmoid":
            s = _sigmoid(x)
            return s, s * (1.0 - s)
        if n in ("relu", "leaky_relu"):
            slope = 0.0 if n == "relu" else self.negative_slope
            pos = x > 0
            return np.where(pos, x, slope * x), np.where(pos, 1.0, slope)
        if n == "elu":
            neg = np.minimum(x, 0.0)
            pos = x > 0
            return np.where(pos, x, self.alpha * np.expm1(neg)), np.where(
                pos, 1.0, self.alpha * np.exp(neg)
            )
        if n == "silu":
            s = _sigmoid(x)
            return x * s, s * (1.0 + x * (1.0 - s))
        if n == "softplus":
            xc = np.minimum(x, 20.0)
            big = x > 20.0
            return np.where(big, x, np.log1p(np.exp(xc))), np.where(big, 1.0, _sigmoid(xc))
        # gelu, gelu_tanh: exactly x (x > 40) or 0 (x < -40) in double; clipping keeps
        # the cubic and the Gaussian from overflowing.
        xc = np.clip(x, -40.0, 40.0)
        extra = np.maximum(x - 40.0, 0.0)
        if n == "gelu":
            cdf = 0.5 * (1.0 + _erf(xc * math.sqrt(0.5)).astype(np.float64))
            return xc * cdf + extra, cdf + xc * np.exp(-0.5 * xc * xc) * _INV_SQRT_2PI
        beta, kappa = math.sqrt(2.0 / math.pi), 0.044715
        t = np.tanh(beta * (xc + kappa * xc**3))
        d = 0.5 * (1.0 + t) + 0.5 * xc * (1.0 - t * t) * beta * (1.0 + 3.0 * kappa * xc * xc)
        return 0.5 * xc * (1.0 + t) + extra, d

    # -- one-dimensional expectations ---------------------------------------------------
    def moments(self, q: float) -> tuple[float, float]:
        """E[phi(sqrt(q) z)**2] and E[phi'(sqrt(q) z)**2]."""
        if self.homogeneous:
            a, b = self.homogeneous_moments()
            return a * q, b
        if q == 0.0:  # phi(0)**2 and the mean of phi'(0-)**2 and phi'(0+)**2 (a kink's limit)
            p, d = self(np.array([1e-200, -1e-200]))
            return float(np.mean(p * p)), float(np.mean(d * d))
        x, w = _rule(q)
        p, d = self(x)
        return float(w @ (p * p)), float(w @ (d * d))

    def second(self, x: np.ndarray) -> np.ndarray:
        """phi''(x) of the smooth activations (and of elu away from its kink)."""
        n = self.name
        if n == "tanh":
            t = np.tanh(x)
            return -2.0 * t * (1.0 - t * t)
        if n == "sigmoid":
            s = _sigmoid(x)
            return s * (1.0 - s) * (1.0 - 2.0 * s)
        if n == "elu":
            return np.where(x > 0, 0.0, self.alpha * np.exp(np.minimum(x, 0.0)))
        if n == "silu":
            s = _sigmoid(x)
            return s * (1.0 - s) * (2.0 + x * (1.0 - 2.0 * s))
        if n == "softplus":
            s = _sigmoid(np.minimum(x, 20.0))
            return np.where(x > 20.0, 0.0, s * (1.0 - s))
        xc = np.clip(x, -40.0, 40.0)  # beyond, phi'' is 0 in double (as in __call__)
        if n == "gelu":
            return np.exp(-0.5 * xc * xc) * _INV_SQRT_2PI * (2.0 - xc * xc)
        beta, kappa = math.sqrt(2.0 / math.pi), 0.044715  # gelu_tanh
        t = np.tanh(beta * (xc + kappa * xc**3))
        du, d2u = beta * (1.0 + 3.0 * kappa * xc * xc), 6.0 * beta * kappa * xc
        return (1.0 - t * t) * (du + 0.5 * xc * (d2u - 2.0 * t * du * du))

    def map_moments(self, q: float) -> tuple[float, float, float]:
        """E[phi**2], E[phi'**2] and d E[phi(sqrt(q) z)**2] / dq by Stein's lemma: for
        q > 1 as E[phi phi' x] / q, for q <= 1 as E[phi'**2 + phi phi''] (Stein's lemma
        twice; phi**2 has a continuous derivative for every activation here, so elu's kink
        adds nothing). Each form cancels to noise at the other end: the first at small q
        once phi(0) != 0 (sigmoid, softplus), the second at large q, where both of its terms
        are about 1/sqrt(q) and their sum about q**-1.5. At q = 0 the limit (both sides of a
        kink averaged)."""
        if self.homogeneous:
            a, b = self.homogeneous_moments()
            return a * q, b, a
        if q == 0.0:
            x, w = np.array([1e-200, -1e-200]), np.array([0.5, 0.5])
        else:
            x, w = _rule(q)
        p, d = self(x)
        d2 = d * d
        if q > 1.0:
            slope = float(w @ (p * d * x)) / q
        else:
            slope = float(w @ (d2 + p * self.second(x)))
        return float(w @ (p * p)), float(w @ d2), slope

    # -- two-dimensional expectations ---------------------------------------------------
    def pair(self, q: float, c: float, deriv: bool) -> float:
        """E[g(u1) g(u2)] for g = phi (or phi' with `deriv`), (u1, u2) centred Gaussian
        with variances q and correlation c: the inner integral over u2 given u1 = x is a
        Gaussian of mean c x and std tau = sqrt(q (1 - c**2)), with panel ends at the
        breaks; the outer one has extra panel ends at |x| ~ tau / c, where the inner
        integral smooths the kink at 0."""
        tau = math.sqrt(q * max(0.0, 1.0 - c * c))
        s = math.sqrt(q)
        outer = [np.zeros(1), _X_BREAKS[_X_BREAKS < s * _Z_MAX], s * _Z_BREAKS]
        if tau > 0 and c != 0:
            near = (tau / abs(c)) * _Z_BREAKS[:6]
            outer.append(near[near < s * _Z_MAX])
        x, w = _panels(np.unique(np.concatenate(outer)), _GL_T, _GL_W)
        w = w * np.exp(-0.5 * (x / s) ** 2) * (_INV_SQRT_2PI / s)
        x, w = np.concatenate((x, -x)), np.concatenate((w, w))
        g1 = self(x)[int(deriv)]
        if tau == 0.0:
            return float(w @ (g1 * self(c * x)[int(deriv)]))
        mu = c * x
        breaks = np.concatenate(([0.0], _X_BREAKS, -_X_BREAKS))
        y_fixed = np.concatenate((-_Z_BREAKS[::-1], [0.0], _Z_BREAKS))
        yb = np.clip((breaks[None, :] - mu[:, None]) / tau, -_Z_MAX, _Z_MAX)
        br = np.sort(
            np.concatenate((np.broadcast_to(y_fixed, (mu.size, y_fixed.size)), yb), axis=1), axis=1
        )
        mid, half = (br[:, 1:] + br[:, :-1]) / 2, (br[:, 1:] - br[:, :-1]) / 2
        y = mid[..., None] + half[..., None] * _GL2_T
        wy = half[..., None] * _GL2_W * np.exp(-0.5 * y * y) * _INV_SQRT_2PI
        g2 = self(mu[:, None, None] + tau * y)[int(deriv)]
        return float(w @ (g1 * np.einsum("rpk,rpk->r", wy, g2)))


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------
class ConvergenceError(RuntimeError):
    """An iteration or root search of the theory did not converge."""


# The ranges every theory function accepts. Within them every product the quadrature
# forms stays in the double range: nodes reach |x| = 13 sqrt(q), so phi(x)**2 reaches
# 171 q times max(1, slope**2) (alpha**2 for elu).
_STD_MAX = 1e150  # its square, a variance, stays below _Q_HUGE
_SLOPE_MAX = 100.0
_ALPHA_MAX = 1e150
# Iterating a length map costs one quadrature (about 10 to 50 microseconds) per layer.
_MAX_ITERATED_LAYERS = 100_000
# order_chaos_boundary runs one root search (up to a few tenths of a second) per entry.
_MAX_BOUNDARY_POINTS = 1000


def _in_range(name: str, value: Any, lo: float, hi: float, what: str = "") -> float:
    """A finite real in [lo, hi]; the ValueError names the argument and the range."""
    f = v.finite_float(name, value)
    if not lo <= f <= hi:
        raise ValueError(f"{name} must be between {lo:g} and {hi:g}{what}; got {f!r}")
    return f


def _activation(activation: Any, negative_slope: Any, alpha: Any) -> _Act:
    v.choice("activation", activation, ACTIVATIONS)
    s = _in_range("negative_slope", negative_slope, -_SLOPE_MAX, _SLOPE_MAX)
    a = _in_range("alpha", alpha, 0.0, _ALPHA_MAX)
    if a <= 0:
        raise ValueError(f"alpha must be > 0; got {a}")
    return _Act(activation, s, a)


def _std(name: str, value: Any) -> float:
    """A standard deviation: [0, 1e150], so that its square is a variance the theory covers."""
    return _in_range(
        name, value, 0.0, _STD_MAX, " (a standard deviation; its square is a variance)"
    )


def _variance(name: str, value: Any) -> float:
    """A variance in [0, 1e300], the range the quadrature covers."""
    return _in_range(name, value, 0.0, _Q_HUGE, " (a variance; the quadrature covers up to 1e300)")


def _first_variance(sw2: float, q0: float, sb2: float) -> float:
    """q_1 = sigma_w**2 q0 + sigma_b**2, which a prediction starts from and must evaluate."""
    q1 = sw2 * q0 + sb2
    if q1 > _Q_HUGE:
        # beyond the double range only sigma_w**2 q0 can be (each term is below 1e300)
        value = f"{q1:.6g}" if math.isfinite(q1) else f"1e+{math.log10(sw2) + math.log10(q0):.0f}"
        raise ValueError(
            f"sigma_w**2 * q0 + sigma_b**2 = {value}, the first layer's pre-activation "
            f"variance, must be at most 1e300; lower sigma_w, sigma_b or q0"
        )
    return q1


def _size(name: str, value: Any, *, bytes_each: float, maximum: int = v.INT32_MAX) -> int:
    """A positive integer that sets how large a theory function's arrays get: at most
    `maximum` (ValueError naming the argument and the range), and `bytes_each` bytes per
    unit of it within the available memory (MemoryError stating the bytes)."""
    n = v.positive_int(name, value, maximum)
    v.check_memory(bytes_each * n, f"{name}={n}")
    return n


def _depth_scale(x: float) -> float:
    """-1 / ln|x|: inf at |x| = 1, 0 at x = 0, negative for |x| > 1 (a negative slope
    makes the approach alternate, at the rate |x|)."""
    x = abs(x)
    if x == 1.0:
        return math.inf
    if x == 0.0:
        return 0.0
    return -1.0 / math.log(x)


def _to_dict(obj: Any, extra: Sequence[str] = ()) -> dict[str, Any]:
    out = {f.name: _jsonable(getattr(obj, f.name)) for f in fields(obj)}
    out.update({name: _jsonable(getattr(obj, name)) for name in extra})
    return out


# ---------------------------------------------------------------------------------------
# Root finding
# ---------------------------------------------------------------------------------------
def _root(
    f: Callable[[float], float],
    a: float,
    b: float,
    fa: float,
    fb: float,
    rtol: float,
    atol: float = 0.0,
) -> float:
    """A root of f in [a, b] (fa, fb of opposite signs): regula falsi with the Illinois
    modification, and a bisection step whenever the bracket shrinks too slowly (which
    also finds the jump of a discontinuous f)."""
    width = abs(b - a)
    for it in range(300):
        c = b - fb * (b - a) / (fb - fa)
        if it % 3 == 2 and abs(b - a) > 0.5 * width:
            c = 0.5 * (a + b)
        if not min(a, b) < c < max(a, b):
            c = 0.5 * (a + b)
        if it % 3 == 2:
            width = abs(b - a)
        fc = f(c)
        if fc == 0.0:
            return c
        if (fc > 0) == (fb > 0):
            b, fb = c, fc
            fa *= 0.5
        else:
            a, fa = b, fb
            b, fb = c, fc
        if abs(b - a) <= rtol * max(abs(a), abs(b)) + atol:
            return b if abs(fb) <= abs(fa) else a
    raise ConvergenceError(f"root search did not converge in [{a!r}, {b!r}]")  # pragma: no cover


# ---------------------------------------------------------------------------------------
# Mean field
# ---------------------------------------------------------------------------------------
def _fixed_point(act: _Act, sw2: float, sb2: float, q1: float, max_iter: int = 5000) -> float:
    """The fixed point of the length map reached from q1 (0, finite, or inf)."""
    if act.homogeneous:
        a = _marginal(sw2 * act.homogeneous_moments()[0])
        if a < 1.0:
            return sb2 / (1.0 - a)
        if sb2 == 0.0 and (a == 1.0 or q1 == 0.0):
            return q1
        return math.inf
    if q1 == 0.0 and sb2 == 0.0 and act.moments(0.0)[0] == 0.0:
        return 0.0  # a zero input stays zero (phi(0) = 0, no bias)
    # Every fixed point is >= sigma_b**2 (the map is), so h = f - q >= 0 there: lo, hi
    # bracket the root the iteration heads for, and keep Newton steps from overshooting.
    lo, hi = sb2, math.inf
    # From beyond 1e300 the map comes back down (bounded phi) or diverges either way.
    q, grow = min(q1, _Q_HUGE), 2.0
    for _ in range(max_iter):
        e2, _d2, de2 = act.map_moments(q)
        f, slope = sw2 * e2 + sb2, sw2 * de2
        h = f - q
        if h == 0.0:
            return q
        if h > 0 and q >= _Q_HUGE:
            return math.inf
        if h > 0:
            lo = max(lo, q)
        else:
            hi = min(hi, q)
        if slope < 1.0:
            # Newton moves the way the iteration does and converges quadratically; at a
            # marginal root q* = 0 it halves q.
            qn = q + h / (1.0 - slope)
        elif h > 0:
            # Growing away from 0 (or without bound): growth steps reach q* or the
            # divergence in a few dozen steps where iterating a rate near 1 takes thousands.
            qn, grow = max(f, grow * q), min(grow * grow, 1e64)
        else:
            qn = f
        qn = min(qn, _Q_HUGE)
        if not lo < qn < hi:
            if lo == 0.0 and qn <= 0.0:  # Newton aims at 0 (or past a small root): probe far below
                qn = q * 2.0**-64
            elif lo < f < hi:
                qn = f
            else:
                qn = math.sqrt(lo * hi) if lo > 0 and hi > 4 * lo else 0.5 * (lo + hi)
        if qn <= _Q_TINY:
            return 0.0
        if abs(qn - q) <= _TOL * qn and (slope < 1.0 or hi - lo <= _TOL * hi):
            return qn
        q = qn
    raise ConvergenceError(
        f"the length map of {act.name} (sigma_w**2={sw2}, sigma_b**2={sb2}) did not reach a "
        f"fixed point in {max_iter} steps from q_1={q1}; last q={q}"
    )


def _chi_limit(act: _Act, q: float) -> float:
    """E[phi'(sqrt(q) z)**2]; at q = inf its limit, evaluated at q = 1e300."""
    return act.moments(_Q_HUGE if math.isinf(q) else q)[1]


def _fields_table(obj: Any, extra: Sequence[str], width: int) -> str:
    """A result's fields and the named properties as an aligned two-column text table."""
    d = {f.name: getattr(obj, f.name) for f in fields(obj)}
    d.update((name, getattr(obj, name)) for name in extra)
    return "\n".join(
        f"{k:>{width}}  {val:.10g}" if isinstance(val, float) else f"{k:>{width}}  {val}"
        for k, val in d.items()
    )


@dataclass(frozen=True, eq=False)
class MeanField:
    """Mean-field state of a deep chain at the fixed point of its length map.

    Attributes
    ----------
    activation : str
    sigma_w, sigma_b : float
        Weight and bias standard deviations (``W_ij ~ N(0, sigma_w**2 / N)``).
    negative_slope, alpha : float
        Parameters of ``leaky_relu`` and ``elu`` (stored for every activation).
    q0 : float
        Mean squared input entry the iteration started from (``q_1 = sigma_w**2 q0 +
        sigma_b**2``); it matters only where the length map has several attracting fixed
        points.
    q_star : float
        Fixed point ``q*`` of the length map: the pre-activation variance deep in the
        chain. ``inf`` where ``q_l`` grows without bound (e.g. relu with
        ``sigma_w**2 > 2``), 0 where it decays to 0.
    chi_1 : float
        ``sigma_w**2 E[phi'(sqrt(q*) z)**2]``: the factor by which *squared* gradient norms
        shrink (< 1) or grow (> 1) per layer. At ``q* = 0`` the limit ``q -> 0+`` (for
        relu: ``sigma_w**2 / 2``); at ``q* = inf`` the limit ``q -> inf``; ``inf`` where it
        exceeds the double range.
    depth_scale : float
        ``xi = -1 / ln(chi_1)``: squared gradient norms change by ``exp(-d / xi)`` over
        ``d`` layers, norms by ``exp(-d / (2 xi))``. ``inf`` at ``chi_1 = 1`` (the
        order-to-chaos boundary). For ``chi_1 > 1`` gradients explode and ``xi`` is
        negative: ``|xi|`` is then the depth over which squared norms grow by ``e``.
    length_map_slope : float
        ``dq_l / dq_{l-1}`` at ``q*``; ``q_l - q*`` decays like its l-th power.
    length_depth_scale : float
        ``xi_q = -1 / ln|length_map_slope|`` (Schoenholz et al. 2017).
    c_star : float
        Stable fixed point of the correlation map (1 in the ordered phase); NaN where
        ``q*`` is 0 or inf (the map is degenerate) or when not computed.
    chi_c : float
        Slope of the correlation map at ``c*``: ``sigma_w**2 E[phi'(u1) phi'(u2)]``.
    correlation_depth_scale : float
        ``xi_c = -1 / ln(chi_c)``: the depth over which two inputs stay distinguishable;
        equal to ``depth_scale`` in the ordered phase, finite on both sides of the
        boundary and infinite on it.
    """

    activation: str
    sigma_w: float
    sigma_b: float
    negative_slope: float
    alpha: float
    q0: float
    q_star: float
    chi_1: float
    depth_scale: float
    length_map_slope: float
    length_depth_scale: float
    c_star: float
    chi_c: float
    correlation_depth_scale: float

    @property
    def phase(self) -> str:
        """``"ordered"`` (chi_1 < 1), ``"chaotic"`` (chi_1 > 1) or ``"critical"`` (within 1e-9)."""
        if abs(self.chi_1 - 1.0) <= 1e-9:
            return "critical"
        return "ordered" if self.chi_1 < 1.0 else "chaotic"

    @property
    def lyapunov_exponent(self) -> float:
        """``0.5 ln(chi_1)``: growth rate per layer of gradient norms (and, for a recurrent
        net with these weights, of small perturbations; see
        :func:`rnn_max_lyapunov_meanfield`)."""
        return 0.5 * math.log(self.chi_1) if self.chi_1 > 0 else -math.inf

    def to_dict(self) -> dict[str, Any]:
        """Plain values for ``json.dumps`` (non-finite floats as ``"inf"``/``"-inf"``/None)."""
        return _to_dict(self, ("phase", "lyapunov_exponent"))

    def table(self) -> str:
        """The fields as an aligned two-column text table."""
        return _fields_table(self, ("phase",), 24)

    def __str__(self) -> str:
        head = f"MeanField({self.activation}, sigma_w={self.sigma_w:g}, sigma_b={self.sigma_b:g})"
        return f"{head}\n{self.table()}"


def length_map(
    q: Any,
    activation: str,
    sigma_w: Any,
    sigma_b: Any = 0.0,
    *,
    negative_slope: float = 0.01,
    alpha: float = 1.0,
) -> Any:
    """One step of the length map, ``sigma_w**2 E_z[phi(sqrt(q) z)**2] + sigma_b**2``.

    Parameters
    ----------
    q : float
        Pre-activation variance of the previous layer (>= 0).
    activation : str
        One of :data:`ACTIVATIONS`.
    sigma_w, sigma_b : float
        Weight and bias standard deviations (>= 0).
    negative_slope, alpha : float
        Parameters of ``leaky_relu`` and ``elu``.

    Returns
    -------
    float or ndarray
        The next layer's pre-activation variance (Poole et al. 2016, eq. 3); ``inf``
        where it exceeds the double range. `q`, `sigma_w` and `sigma_b` may be arrays:
        the result is then an ndarray of their broadcast shape.
    """
    act = _activation(activation, negative_slope, alpha)

    def one(q: Any, sigma_w: Any, sigma_b: Any) -> float:
        q = _variance("q", q)
        return _std("sigma_w", sigma_w) ** 2 * act.moments(q)[0] + _std("sigma_b", sigma_b) ** 2

    return _broadcast(one, ("q", "sigma_w", "sigma_b"), q, sigma_w, sigma_b)


def _is_array(value: Any) -> bool:
    """True for arguments given as arrays or sequences (scalars keep their scalar path)."""
    return isinstance(value, (np.ndarray, Sequence)) and not isinstance(value, (str, bytes))


def _broadcast(fn: Callable[..., float], names: Sequence[str], *args: Any) -> Any:
    """`fn` of scalars, applied over the broadcast shape of `args` when any is an array:
    an ndarray of float64 then, else `fn`'s own scalar result. Each element goes through
    `fn`'s checks, so a bad entry is reported as a scalar would be (with its index)."""
    if not any(_is_array(a) for a in args):
        return fn(*args)
    arrays = []
    for name, a in zip(names, args):
        arr = np.asarray(a)
        if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
            raise TypeError(f"{name} must hold real numbers; got dtype {arr.dtype}")
        arrays.append(arr.astype(np.float64))
    try:
        bc = np.broadcast_arrays(*arrays)
    except ValueError:
        shapes = ", ".join(f"{n}: {a.shape}" for n, a in zip(names, arrays))
        raise ValueError(f"the array arguments do not broadcast together ({shapes})") from None
    out = np.empty(bc[0].shape)
    for idx in np.ndindex(out.shape):
        try:
            out[idx] = fn(*(float(a[idx]) for a in bc))
        except ValueError as exc:
            raise ValueError(f"{exc} (at index {idx})") from None
    return out


def chi(
    q: Any, activation: str, sigma_w: Any, *, negative_slope: float = 0.01, alpha: float = 1.0
) -> Any:
    """``sigma_w**2 E_z[phi'(sqrt(q) z)**2]``: the mean factor by which a layer with
    pre-activation variance ``q`` multiplies squared gradient norms; ``chi_1`` at ``q*``.

    At ``q = 0`` this is the limit ``q -> 0+`` (relu: ``sigma_w**2 / 2``, not 0); ``inf``
    where it exceeds the double range. `q` and `sigma_w` may be arrays: the result is
    then an ndarray of their broadcast shape (a float for scalars).
    """
    act = _activation(activation, negative_slope, alpha)

    def one(q: Any, sigma_w: Any) -> float:
        return _marginal(_std("sigma_w", sigma_w) ** 2 * act.moments(_variance("q", q))[1])

    return _broadcast(one, ("q", "sigma_w"), q, sigma_w)


@functools.lru_cache(maxsize=65536)
def _chi_1(act: _Act, sw: float, sb: float, q0: float) -> float:
    sw2, sb2 = sw * sw, sb * sb
    qs = _fixed_point(act, sw2, sb2, sw2 * q0 + sb2)
    return _marginal(sw2 * _chi_limit(act, qs))


def chi_1(
    activation: str,
    sigma_w: Any,
    sigma_b: Any = 0.0,
    *,
    q0: float = 1.0,
    negative_slope: float = 0.01,
    alpha: float = 1.0,
) -> Any:
    """``chi_1`` of :func:`mean_field` (the factor by which squared gradient norms change
    per layer at the fixed point ``q*``), over arrays of ``sigma_w`` and ``sigma_b``.

    Parameters
    ----------
    activation : str
        One of :data:`ACTIVATIONS`.
    sigma_w, sigma_b : float or array_like
        Weight and bias standard deviations; arrays broadcast against each other (e.g.
        ``sigma_w[:, None]`` and ``sigma_b[None, :]`` for a phase diagram).
    q0, negative_slope, alpha
        As in :func:`mean_field`.

    Returns
    -------
    float or ndarray
        A float for scalar arguments, else an ndarray of the broadcast shape; equal to
        ``mean_field(activation, sw, sb, q0=q0).chi_1`` entry by entry.

    Examples
    --------
    >>> import numpy as np
    >>> from gradchain import theory
    >>> theory.chi_1("tanh", np.array([0.5, 1.0, 1.5]), 0.3).round(4)
    array([0.2085, 0.7003, 1.061 ])
    """
    act = _activation(activation, negative_slope, alpha)
    q0 = _variance("q0", q0)

    def one(sigma_w: Any, sigma_b: Any) -> float:
        return _chi_1(act, _std("sigma_w", sigma_w), _std("sigma_b", sigma_b), q0)

    return _broadcast(one, ("sigma_w", "sigma_b"), sigma_w, sigma_b)


def _correlation_fixed_point(
    act: _Act, sw2: float, sb2: float, q: float, chi_1: float
) -> tuple[float, float]:
    """(c*, chi_c) for q* = q: c* = 1 unless the phase is chaotic, when c* is the largest
    root of C(c) - c below 1 (there C(c) < c just below 1, so that root is stable)."""
    if chi_1 <= 1.0:
        return 1.0, chi_1

    def h(c: float) -> float:
        return (sw2 * act.pair(q, c, False) + sb2) / q - c

    b = 1.0 - 1e-6
    hb = h(b)
    if hb >= 0.0:  # c* within 1e-6 of 1: barely chaotic
        return 1.0, chi_1
    for a in (1.0 - 1e-4, 0.99, 0.9, 0.5, 0.0):
        ha = h(a)
        if ha >= 0.0 or a == 0.0:
            break
        b, hb = a, ha
    # C(0) = sigma_w**2 E[phi]**2 / q + sigma_b**2 / q >= 0; rounding-size h(0) means c* = 0
    # (odd activations without bias).
    c = a if ha <= 1e-14 else _root(h, a, b, ha, hb, 1e-13, 1e-15)
    return c, sw2 * act.pair(q, c, True)


def mean_field(
    activation: str,
    sigma_w: float,
    sigma_b: float = 0.0,
    *,
    q0: float = 1.0,
    negative_slope: float = 0.01,
    alpha: float = 1.0,
    correlation: bool = True,
) -> MeanField:
    """Fixed point ``q*`` of the length map, ``chi_1`` and the depth scales.

    Parameters
    ----------
    activation : str
        One of :data:`ACTIVATIONS`.
    sigma_w, sigma_b : float
        Weight and bias standard deviations (>= 0, finite).
    q0 : float
        Mean squared input entry ``||x||**2 / N_0``; the iteration starts at
        ``q_1 = sigma_w**2 q0 + sigma_b**2``. Only matters when the length map has
        several attracting fixed points (gelu or silu with ``2 < sigma_w**2 < 4`` and
        ``sigma_b = 0``: ``q_l`` decays to 0 or grows without bound depending on ``q_1``).
    negative_slope, alpha : float
        Parameters of ``leaky_relu`` and ``elu``.
    correlation : bool
        Also compute ``c*``, ``chi_c`` and ``xi_c`` (a two-dimensional quadrature; about
        0.1 s in the chaotic phase, free in the ordered phase).

    Returns
    -------
    MeanField

    Raises
    ------
    ValueError
        An unsupported activation or a parameter outside its range (see the module notes).
    ConvergenceError
        When the length map does not settle (not seen for these activations).

    Notes
    -----
    ``q*`` is found by iterating the length map, with Newton steps where the map
    contracts, to a relative change below ``2**-50``; values below 1e-300 are reported as
    0 and above 1e300 as inf. ``relu``, ``leaky_relu`` and ``linear`` use the closed form
    ``q* = sigma_b**2 / (1 - sigma_w**2 (1 + s**2) / 2)`` (``s`` the negative slope, 1 for
    linear). Where ``q_l -> 0`` only algebraically (tanh or elu with ``sigma_w = 1``,
    ``sigma_b = 0``) the map equals the identity in double below ``q ~ 1e-17``, and that is
    what ``q*`` reports. See Poole et al. (2016) and Schoenholz et al. (2017).

    Examples
    --------
    >>> from gradchain import theory
    >>> mf = theory.mean_field("tanh", sigma_w=0.5)
    >>> mf.q_star, mf.chi_1
    (0.0, 0.25)
    >>> mf = theory.mean_field("tanh", sigma_w=1.5, sigma_b=0.3)
    >>> round(mf.q_star, 6), round(mf.chi_1, 6), mf.phase
    (0.960844, 1.060981, 'chaotic')
    """
    act = _activation(activation, negative_slope, alpha)
    sw, sb = _std("sigma_w", sigma_w), _std("sigma_b", sigma_b)
    q0 = _variance("q0", q0)
    correlation = v.flag("correlation", correlation)
    sw2, sb2 = sw * sw, sb * sb
    qs = _fixed_point(act, sw2, sb2, sw2 * q0 + sb2)
    chi_1 = _marginal(sw2 * _chi_limit(act, qs))
    slope = _marginal(sw2 * act.map_moments(_Q_HUGE if math.isinf(qs) else qs)[2])
    c_star = chi_c = math.nan
    if correlation and 0.0 < qs < math.inf:
        c_star, chi_c = _correlation_fixed_point(act, sw2, sb2, qs, chi_1)
    return MeanField(
        activation=activation,
        sigma_w=sw,
        sigma_b=sb,
        negative_slope=act.negative_slope,
        alpha=act.alpha,
        q0=q0,
        q_star=qs,
        chi_1=chi_1,
        depth_scale=_depth_scale(chi_1),
        length_map_slope=slope,
        length_depth_scale=_depth_scale(slope),
        c_star=c_star,
        chi_c=chi_c,
        correlation_depth_scale=_depth_scale(chi_c) if math.isfinite(chi_c) else math.nan,
    )


def correlation_map(
    c: float,
    activation: str,
    sigma_w: float,
    sigma_b: float = 0.0,
    *,
    q: float | None = None,
    negative_slope: float = 0.01,
    alpha: float = 1.0,
) -> float:
    """One step of the correlation map of two inputs whose pre-activations both have
    variance ``q`` (Poole et al. 2016, eq. 5)::

        c_next = (sigma_w**2 E[phi(u1) phi(u2)] + sigma_b**2) / q_next

    with ``(u1, u2)`` centred Gaussian of variances ``q`` and correlation ``c``, and
    ``q_next`` the length map of ``q`` (``= q`` at the default ``q = q*``).

    Parameters
    ----------
    c : float
        Correlation of the two pre-activations, in [-1, 1].
    activation, sigma_w, sigma_b, negative_slope, alpha
        As in :func:`mean_field`.
    q : float, optional
        Pre-activation variance; defaults to ``q*`` (which must then be finite and > 0).
    """
    act = _activation(activation, negative_slope, alpha)
    sw, sb = _std("sigma_w", sigma_w), _std("sigma_b", sigma_b)
    c = v.finite_float("c", c)
    if not -1.0 <= c <= 1.0:
        raise ValueError(f"c must lie in [-1, 1]; got {c}")
    if q is None:
        q = _fixed_point(act, sw * sw, sb * sb, sw * sw + sb * sb)
        if not 0.0 < q < math.inf:
            raise ValueError(
                f"q* = {q} for sigma_w = {sw}, sigma_b = {sb} (the fixed point must be finite "
                "and > 0); pass q explicitly (> 0, finite) or other sigma_w, sigma_b"
            )
    else:
        q = _variance("q", q)
        if q == 0.0:
            raise ValueError("q must be > 0 (the correlation of two zero vectors is undefined)")
    # Both variances divided by the larger of sigma_w**2 and sigma_b**2: they may overflow
    # where their ratio does not.
    scale = max(sw * sw, sb * sb)
    a, b = sw * sw / scale if scale else 0.0, sb * sb / scale if scale else 0.0
    q_next = a * act.moments(q)[0] + b
    if q_next == 0.0:
        raise ValueError(
            f"the next pre-activations are 0 (sigma_w={sw!r}, sigma_b={sb!r}, q={q!r}): "
            "their correlation is undefined"
        )
    return (a * act.pair(q, c, False) + b) / q_next


# ---------------------------------------------------------------------------------------
# Order-to-chaos boundary
# ---------------------------------------------------------------------------------------
def _critical(act: _Act, sb: float, q0: float, rtol: float) -> tuple[float, float]:
    """(sigma_w, q*) with chi_1 = 1 at bias std sb."""
    if act.homogeneous:
        # chi_1 = sigma_w**2 (1 + s**2) / 2 for every q; on the boundary the length map is
        # q -> q + sigma_b**2.
        sw2 = 1.0 / act.homogeneous_moments()[1]
        return math.sqrt(sw2), (math.inf if sb > 0 else sw2 * q0)
    sb2 = sb * sb

    def excess(sw: float) -> float:
        qs = _fixed_point(act, sw * sw, sb2, sw * sw * q0 + sb2)
        return sw * sw * _chi_limit(act, qs) - 1.0

    lo, f_lo = 0.0, -1.0
    hi = 1.0
    f_hi = excess(hi)
    while f_hi < 0.0:
        lo, f_lo = hi, f_hi
        hi *= 2.0
        if hi > 1e6:
            raise ConvergenceError(
                f"chi_1 stays below 1 for sigma_w up to 1e6 ({act.name}, sigma_b={sb})"
            )
        f_hi = excess(hi)
    sw = hi if f_hi == 0.0 else _root(excess, lo, hi, f_lo, f_hi, rtol)
    if abs(excess(sw)) > 1e-6:
        raise ConvergenceError(
            f"chi_1 jumps across 1 at sigma_w = {sw:.12g} ({act.name}, sigma_b={sb}, q0={q0}): "
            "the attracting fixed point q* changes discontinuously there, so the boundary "
            "depends on the input scale"
        )
    qs = _fixed_point(act, sw * sw, sb2, sw * sw * q0 + sb2)
    return sw, qs


def critical_sigma_w(
    activation: str,
    sigma_b: float = 0.0,
    *,
    q0: float = 1.0,
    negative_slope: float = 0.01,
    alpha: float = 1.0,
    rtol: float = 1e-12,
) -> float:
    """The weight std on the order-to-chaos boundary: ``chi_1(sigma_w, sigma_b) = 1``.

    Parameters
    ----------
    activation : str
        One of :data:`ACTIVATIONS`.
    sigma_b : float
        Bias standard deviation.
    q0 : float
        Mean squared input entry the fixed-point iteration starts from (see
        :func:`mean_field`).
    negative_slope, alpha : float
        Parameters of ``leaky_relu`` and ``elu``.
    rtol : float
        Relative tolerance on ``sigma_w``.

    Returns
    -------
    float
        ``sigma_w`` (square it for the ``sigma_w**2`` axis of Poole et al. and Schoenholz
        et al.). Closed forms: ``sqrt(2)`` for relu, ``sqrt(2 / (1 + s**2))`` for
        leaky_relu, 1 for linear, 1 for tanh at ``sigma_b = 0``.

    Raises
    ------
    ConvergenceError
        When ``chi_1`` jumps across 1 instead of crossing it (the attracting ``q*``
        changes discontinuously, e.g. gelu and silu at ``sigma_b = 0``), or stays below 1.

    Notes
    -----
    ``chi_1`` (at the ``q*`` reached from ``q0``) is bracketed by doubling ``sigma_w``
    from 1 and the root is found by regula falsi (Illinois) safeguarded by bisection.
    """
    act = _activation(activation, negative_slope, alpha)
    sb = _std("sigma_b", sigma_b)
    return _critical(act, sb, _variance("q0", q0), v.finite_float("rtol", rtol, minimum=1e-15))[0]


@dataclass(frozen=True, eq=False)
class OrderChaosBoundary:
    """The order-to-chaos boundary ``chi_1 = 1`` sampled over bias standard deviations.

    Attributes
    ----------
    activation : str
    sigma_b : ndarray
        The bias standard deviations asked for.
    sigma_w : ndarray
        The critical weight standard deviation at each (NaN where ``chi_1`` jumps
        across 1 instead of crossing it).
    q_star : ndarray
        ``q*`` on the boundary (inf where it diverges, e.g. relu with ``sigma_b > 0``).
    """

    activation: str
    sigma_b: np.ndarray
    sigma_w: np.ndarray
    q_star: np.ndarray

    @property
    def sigma_w2(self) -> np.ndarray:
        """``sigma_w**2``, the horizontal axis of the phase diagrams in the literature."""
        return self.sigma_w**2

    @property
    def sigma_b2(self) -> np.ndarray:
        """``sigma_b**2``, their vertical axis."""
        return self.sigma_b**2

    def to_dict(self) -> dict[str, Any]:
        """Plain values for ``json.dumps``."""
        return _to_dict(self)

    def table(self) -> str:
        """One row per sampled ``sigma_b``."""
        rows = [
            f"{'sigma_b':>10}  {'sigma_b^2':>10}  {'sigma_w':>14}  {'sigma_w^2':>14}  {'q*':>12}"
        ]
        for sb, sw, qs in zip(self.sigma_b, self.sigma_w, self.q_star):
            rows.append(
                f"{sb:>10.4g}  {sb * sb:>10.4g}  {sw:>14.10g}  {sw * sw:>14.10g}  {qs:>12.6g}"
            )
        return "\n".join(rows)


def order_chaos_boundary(
    activation: str,
    sigma_b: Any = None,
    *,
    q0: float = 1.0,
    negative_slope: float = 0.01,
    alpha: float = 1.0,
    rtol: float = 1e-10,
) -> OrderChaosBoundary:
    """Sample the order-to-chaos boundary ``chi_1 = 1`` over a grid of bias stds.

    Parameters
    ----------
    activation : str
        One of :data:`ACTIVATIONS`.
    sigma_b : array_like, optional
        Bias standard deviations (in [0, 1e150], at most 1000 of them: each is one root
        search); default ``sqrt(linspace(0, 1, 11))``, an even grid in ``sigma_b**2``.
    q0, negative_slope, alpha, rtol
        As in :func:`critical_sigma_w`.

    Returns
    -------
    OrderChaosBoundary
    """
    act = _activation(activation, negative_slope, alpha)
    sbs = (
        np.sqrt(np.linspace(0.0, 1.0, 11))
        if sigma_b is None
        else np.atleast_1d(np.asarray(sigma_b))
    )
    if sbs.size > _MAX_BOUNDARY_POINTS:
        raise ValueError(
            f"sigma_b must have at most {_MAX_BOUNDARY_POINTS} entries (one root search "
            f"each); got {sbs.size}"
        )
    sbs = v.float_array("sigma_b", sbs.ravel(), np.dtype(np.float64), (None,))
    for sb in sbs:
        _std("sigma_b", float(sb))
    q0 = _variance("q0", q0)
    rtol = v.finite_float("rtol", rtol, minimum=1e-15)
    sws = np.empty_like(sbs)
    qss = np.empty_like(sbs)
    for i, sb in enumerate(sbs):
        try:
            sws[i], qss[i] = _critical(act, float(sb), q0, rtol)
        except ConvergenceError:
            sws[i] = qss[i] = math.nan
    for a in (sbs, sws, qss):
        a.setflags(write=False)
    return OrderChaosBoundary(activation=activation, sigma_b=sbs, sigma_w=sws, q_star=qss)


# ---------------------------------------------------------------------------------------
# Predicted gradient norms
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class GradNormPrediction:
    """Mean-field prediction of the per-layer gradient norms of a deep chain.

    Attributes
    ----------
    activation : str
    sigma_w, sigma_b, q0 : float
        As passed (``q0 = ||x||**2 / N_0``).
    q : ndarray, shape (depth,)
        ``q_l``, l = 1..depth: pre-activation variances (may reach 0 or inf in float).
    log10_chi : ndarray, shape (depth,)
        ``log10 chi(q_l)``: layer l multiplies the squared gradient norm by ``chi(q_l)``
        on the way back.
    log10_activation_grad_norms : ndarray, shape (depth + 1,)
        ``log10(||dL/dh_l|| / ||dL/dh_L||)``, l = 0..depth (norms, not squared; the last
        entry is 0): ``0.5 * sum(log10_chi[l:])``. Compare with
        ``rep.log10_activation_grad_norms - rep.log10_activation_grad_norms[-1]`` of a
        :class:`~gradchain.BackwardReport`.
    iterated_layers : int
        Layers whose ``q_l`` was iterated; beyond them ``chi`` had settled to the last
        bit and the rest was filled in closed form.
    """

    activation: str
    sigma_w: float
    sigma_b: float
    q0: float
    q: np.ndarray
    log10_chi: np.ndarray
    log10_activation_grad_norms: np.ndarray
    iterated_layers: int

    @property
    def depth(self) -> int:
        """Number of layers."""
        return int(self.q.shape[0])

    @property
    def log10_activation_grad_sq_norms(self) -> np.ndarray:
        """``log10(||dL/dh_l||**2 / ||dL/dh_L||**2) = sum(log10_chi[l:])``."""
        return 2.0 * self.log10_activation_grad_norms

    @property
    def activation_grad_norms(self) -> np.ndarray:
        """``||dL/dh_l|| / ||dL/dh_L||`` as floats (0 or inf outside the float range)."""
        return _pow10(self.log10_activation_grad_norms)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for ``json.dumps`` (-inf/inf as strings)."""
        return _to_dict(self)

    def table(self, every: int | None = None) -> str:
        """Per-layer text table (every `every`-th layer; about 20 rows by default)."""
        L = self.depth
        step = every or max(1, L // 20)
        rows = [f"{'layer':>8}  {'q_l':>12}  {'chi(q_l)':>12}  {'log10|dL/dh_l|/|dL/dh_L|':>25}"]
        for l in sorted(set(range(0, L + 1, step)) | {L}):
            q, c = (
                (f"{self.q[l - 1]:>12.6g}", f"{_pow10(self.log10_chi[l - 1]):>12.6g}")
                if l
                else (f"{'':>12}", f"{'':>12}")
            )
            rows.append(f"{l:>8}  {q}  {c}  {self.log10_activation_grad_norms[l]:>25.6f}")
        return "\n".join(rows)


def _settled(d: float, prev: float, value: float) -> bool:
    """Whether a geometrically converging sequence with last steps prev, d is within a
    few ulp of its limit (Aitken's estimate of the remaining change)."""
    if d == 0.0:
        return True
    rho = abs(d / prev) if prev else math.inf
    return rho < 1.0 and abs(d) <= _TOL * abs(value) * (1.0 - rho)


def predicted_grad_norms(
    depth: int,
    activation: str,
    sigma_w: float,
    sigma_b: float = 0.0,
    *,
    q0: float = 1.0,
    negative_slope: float = 0.01,
    alpha: float = 1.0,
) -> GradNormPrediction:
    """Mean-field per-layer gradient norms of a deep chain, as log10 ratios.

    Parameters
    ----------
    depth : int
        Number of layers L (1e6 takes a fraction of a second unless ``q_l`` converges
        slowly, see Notes).
    activation : str
        One of :data:`ACTIVATIONS`.
    sigma_w, sigma_b : float
        Weight and bias standard deviations.
    q0 : float
        Mean squared input entry ``||x||**2 / N_0``; ``q_1 = sigma_w**2 q0 + sigma_b**2``.
        Inputs away from the fixed point make the first layers differ from ``chi_1``.
    negative_slope, alpha : float
        Parameters of ``leaky_relu`` and ``elu``.

    Returns
    -------
    GradNormPrediction
        ``log10_activation_grad_norms[l] = 0.5 * sum_{k > l} log10 chi(q_k)`` where
        ``chi(q) = sigma_w**2 E[phi'(sqrt(q) z)**2]``: the log10 of the *norm* ratio
        ``||dL/dh_l|| / ||dL/dh_L||`` (twice that for squared norms), finite at any depth
        (``-inf`` where ``chi = 0``, ``inf`` where ``chi`` exceeds the double range).

    Raises
    ------
    ValueError
        A parameter outside its range (see the module notes), ``sigma_w**2 q0 +
        sigma_b**2`` above 1e300 for an activation that is not positively homogeneous, or
        a depth beyond 100,000 where ``chi(q_l)`` has not settled by then.
    MemoryError
        When the arrays (about 96 bytes per layer) exceed the memory available.

    Notes
    -----
    ``q_l`` is iterated layer by layer (one quadrature each) until ``chi(q_l)`` has
    settled to a few units in the last place; the remaining layers have that ``chi``,
    and ``q_l`` continues at its limit, or geometrically where it decays to 0 or grows
    without bound (beyond 1e300 it counts as diverged, with ``chi`` at its limit, as in
    :func:`mean_field`). relu, leaky_relu and linear are done in closed form. Near the
    order-to-chaos boundary with ``q* = 0`` (e.g. tanh with ``sigma_w = 1``,
    ``sigma_b = 0``, where ``q_l ~ 1/(2l)`` and gradients decay as a power of depth)
    ``chi`` never settles and every layer is iterated, at 10 to 50 microseconds each, up to
    100,000 layers.
    """
    # q, log10_chi and the result, with the temporaries of the closed forms: 12 doubles a layer
    L = _size("depth", depth, bytes_each=96)
    act = _activation(activation, negative_slope, alpha)
    sw, sb, q0 = _std("sigma_w", sigma_w), _std("sigma_b", sigma_b), _variance("q0", q0)
    sw2, sb2 = sw * sw, sb * sb
    q1 = sw2 * q0 + sb2 if act.homogeneous else _first_variance(sw2, q0, sb2)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        if act.homogeneous:
            a, d2 = act.homogeneous_moments()
            a = _marginal(a * sw2)
            n = np.arange(L, dtype=np.float64)
            an = np.power(a, n)  # q_l = a**(l-1) q_1 + sigma_b**2 (1 + a + ... + a**(l-2))
            # (a**n - 1) / (a - 1) through expm1 and log1p: no cancellation for a near 1
            geo = (
                n
                if a == 1.0
                else np.where(an == np.inf, np.inf, np.expm1(n * np.log1p(a - 1.0)) / (a - 1.0))
            )
            q = (an * q1 if q1 else np.zeros(L)) + (sb2 * geo if sb2 else 0.0)
            lc_head = np.empty(0)
            lc_tail = float(np.log10(_marginal(sw2 * d2)))
            k = 0
        else:
            qs: list[float] = []
            chis: list[float] = []
            qk, dq_prev, dc_prev = q1, math.nan, math.nan
            settled_q = False
            for _ in range(L):
                if len(qs) == _MAX_ITERATED_LAYERS:
                    raise ValueError(
                        f"depth must be at most {_MAX_ITERATED_LAYERS} for {act.name} with "
                        f"sigma_w={sw!r}, sigma_b={sb!r}: chi(q_l) has not settled after "
                        f"{_MAX_ITERATED_LAYERS} layers (q_l moves algebraically near the "
                        f"order-to-chaos boundary) and every further layer is iterated; "
                        f"got {L}"
                    )
                # Beyond 1e300 q_l has diverged: chi is at its limit (as in mean_field).
                e2, d2 = act.moments(min(qk, _Q_HUGE))
                qs.append(qk)
                chis.append(_marginal(sw2 * d2))
                if len(qs) >= 2:
                    dq, dc = qs[-1] - qs[-2], chis[-1] - chis[-2]
                    settled_q = _settled(dq, dq_prev, qk)
                    if _settled(dc, dc_prev, chis[-1]) or qk <= _Q_TINY or qk >= _Q_HUGE:
                        break
                    dq_prev, dc_prev = dq, dc
                qk = sw2 * e2 + sb2
            k = len(qs)
            lc_head = np.log10(np.asarray(chis[:-1]))
            lc_tail = float(np.log10(chis[-1]))
            k -= 1  # the last iterated layer already has the limit chi
            rest = np.arange(1, L - k, dtype=np.float64)
            if settled_q or k == 0 or qs[-2] == 0.0:
                tail_q = np.full(rest.size, qs[-1])
            else:
                tail_q = qs[-1] * np.power(qs[-1] / qs[-2], rest)
            q = np.concatenate((qs, tail_q))
        log10_chi = np.concatenate((lc_head, np.full(L - k, lc_tail)))
        # 0.5 * sum_{j > l} log10 chi_j, the constant tail in closed form (no rounding
        # growth with depth).
        tail_count = np.minimum(L - np.arange(L + 1), L - k).astype(np.float64)
        head = np.concatenate((np.cumsum(lc_head[::-1])[::-1], np.zeros(L + 1 - k)))
        g = 0.5 * (head + np.where(tail_count > 0, tail_count * lc_tail, 0.0))
    for arr in (q, log10_chi, g):
        arr.setflags(write=False)
    return GradNormPrediction(
        activation=activation,
        sigma_w=sw,
        sigma_b=sb,
        q0=q0,
        q=q,
        log10_chi=log10_chi,
        log10_activation_grad_norms=g,
        iterated_layers=k + (0 if act.homogeneous else 1),
    )


def rnn_max_lyapunov_meanfield(
    sigma_w: float,
    sigma_b: float = 0.0,
    *,
    activation: str = "tanh",
    q0: float = 1.0,
    negative_slope: float = 0.01,
    alpha: float = 1.0,
) -> float:
    """Mean-field maximal Lyapunov exponent of an autonomous random recurrent network.

    The network is ``h_t = phi(W h_{t-1} + b)`` with one fixed ``W``,
    ``W_ij ~ N(0, sigma_w**2 / N)``, and ``b_i ~ N(0, sigma_b**2)``. Its pre-activation
    variance follows the same length map as a deep chain, and a small perturbation obeys
    ``delta_t = phi'(z_t) * (W delta_{t-1})``, whose squared norm is multiplied by
    ``chi_1`` per step at the fixed point, so::

        lambda_max = 0.5 * ln(chi_1) = 0.5 * ln(sigma_w**2 E[phi'(sqrt(q*) z)**2])

    i.e. ``-1 / (2 xi)`` with ``xi`` the gradient depth scale: positive (chaos) exactly
    where a deep chain with these weights has exploding gradients. The expression is exact
    for large N when ``W`` is redrawn every step (the annealed network of Molgedey,
    Schuchhardt & Schuster 1992) and the standard mean-field result for a fixed ``W``
    (Sompolinsky, Crisanti & Sommers 1988 for continuous time; Poole et al. 2016;
    Pennington et al. 2017). For tanh with ``sigma_b = 0`` it is ``ln(sigma_w)`` for
    ``sigma_w <= 1`` (``q* = 0``), and positive above.

    Parameters
    ----------
    sigma_w, sigma_b : float
        Recurrent weight and bias standard deviations.
    activation : str
        One of :data:`ACTIVATIONS`; tanh by default.
    q0, negative_slope, alpha
        As in :func:`mean_field` (``q0`` is the mean squared entry of ``h_0``).

    Returns
    -------
    float
        The exponent per time step (natural log); ``-inf`` when ``chi_1 = 0``.
    """
    return mean_field(
        activation,
        sigma_w,
        sigma_b,
        q0=q0,
        negative_slope=negative_slope,
        alpha=alpha,
        correlation=False,
    ).lyapunov_exponent


# ---------------------------------------------------------------------------------------
# Normalization and residual blocks
# ---------------------------------------------------------------------------------------
_MAX_BATCH = v.INT32_MAX
_BRANCHES = ("act_linear", "linear_act_linear")
_POSITIONS = ("pre", "post")


def _scale(value: Any) -> float:
    """A residual branch multiplier: |scale| <= 1e150 (only |scale| enters)."""
    return abs(_in_range("scale", value, -_STD_MAX, _STD_MAX, " (the residual branch multiplier)"))


def _ln(x: float) -> float:
    """Natural log with ln(0) = -inf (no warning)."""
    return math.log(x) if x > 0.0 else -math.inf


def _lse(x: float, y: float) -> float:
    """ln(exp(x) + exp(y)) for two terms given as natural logs (-inf for a zero term)."""
    hi, lo = max(x, y), min(x, y)
    if lo == -math.inf or hi == math.inf:
        return hi
    return hi + math.log1p(math.exp(lo - hi))


def _exp(x: float) -> float:
    """exp(x), inf beyond the double range (math.exp raises there)."""
    return math.exp(x) if x < 709.0 else math.inf if x > 710.0 else float(np.exp(x))


def _batch_moments(act: _Act, batch: int) -> dict[str, float]:
    """The expectations at the BSB1 fixed point that the batch-norm results need, with
    y_1, y_2 two entries of sqrt(B) times a uniform unit vector orthogonal to (1, ..., 1)."""
    if batch == 2:  # y = (1, -1) or (-1, 1)
        y1, y2, w = np.array([1.0, -1.0]), np.array([-1.0, 1.0]), np.array([0.5, 0.5])
        p1, d1 = act(y1)
        p2, d2 = act(y2)
        e = {"p2": w @ (p1 * p1), "d2": w @ (d1 * d1), "d2y2": w @ (d1 * d1)}
    else:
        y, w = _sphere_rule(batch)
        p, d = act(y)
        e = {"p2": w @ (p * p), "d2": w @ (d * d), "d2y2": w @ (d * d * y * y)}
        y1, y2, w = _sphere_pair_rule(batch)
        p1, d1 = act(y1)
        p2, d2 = act(y2)
    e["pp"] = w @ (p1 * p2)
    e["dd"] = w @ (d1 * d2)
    e["dydy"] = w @ (d1 * y1 * d2 * y2)
    return {k: float(val) for k, val in e.items()}


@dataclass(frozen=True, eq=False)
class BatchNormMeanField:
    """Mean field of a deep chain of ``Linear -> BatchNorm (train mode) -> activation``
    blocks at initialization (Yang et al. 2019).

    Attributes
    ----------
    activation : str
    batch : int
        Batch size B: the examples whose statistics the BatchNorm layers use.
    negative_slope, alpha : float
        Parameters of ``leaky_relu`` and ``elu`` (stored for every activation).
    q_star : float
        ``E[phi(y_1)**2]``: the mean squared entry of a block's output at the fixed point.
    c_star : float
        ``E[phi(y_1) phi(y_2)] / q_star``: the correlation of two examples' outputs there
        (``-1/(B - 1)`` for linear: the batch mean is subtracted).
    centred_variance : float
        ``q_star (1 - c_star)``: the batch variance of an output feature, which the next
        BatchNorm divides by.
    growth : float
        ``lambda_G``: the factor by which a block multiplies the mean squared gradient norm
        on the way back (the batch's whole ``B x width`` gradient). Greater than 1 for
        every activation at B >= 4: gradients explode. ``(B - 2)/(B - 3)`` for linear;
        ``inf`` at B = 3 and 0 at B = 2 (see :func:`batchnorm_mean_field`).
    top_growth : float
        The same factor for the last block when the gradient arriving at the chain's
        output has i.i.d. entries: it also has a component along the batch mean, which
        the BatchNorm removes.
    """

    activation: str
    batch: int
    negative_slope: float
    alpha: float
    q_star: float
    c_star: float
    centred_variance: float
    growth: float
    top_growth: float

    @property
    def depth_scale(self) -> float:
        """``-1 / ln(growth)``: negative (explosion); ``|depth_scale|`` layers multiply
        squared gradient norms by e."""
        return _depth_scale(self.growth)

    @property
    def lyapunov_exponent(self) -> float:
        """``0.5 ln(growth)``: the growth rate of gradient norms per block (natural log)."""
        return 0.5 * math.log(self.growth) if self.growth > 0 else -math.inf

    def to_dict(self) -> dict[str, Any]:
        """Plain values for ``json.dumps``."""
        return _to_dict(self, ("depth_scale", "lyapunov_exponent"))

    def table(self) -> str:
        """The fields as an aligned two-column text table."""
        return _fields_table(self, ("depth_scale",), 18)

    def __str__(self) -> str:
        return f"BatchNormMeanField({self.activation}, batch={self.batch})\n{self.table()}"


def _batchnorm(act: _Act, batch: int) -> BatchNormMeanField:
    B = batch
    if act.name == "linear":  # closed forms: phi(y) = y, sum(y) = 0, sum(y**2) = B
        lam = (B - 2.0) / (B - 3.0) if B > 3 else (0.0 if B == 2 else math.inf)
        top = lam * (B - 1.0) / B
        c = -1.0 / (B - 1.0)
        return BatchNormMeanField(
            act.name, B, act.negative_slope, act.alpha, 1.0, c, 1.0 - c, lam, top
        )
    e = _batch_moments(act, B)
    kappa = e["p2"] - e["pp"]
    # m: the trace of the backward map g -> P D g on a gradient covariance orthogonal to
    # the batch mean, per unit of its trace; m_top: the same on the identity. The factor
    # 1/sigma**2 contributes B / ((B - 3) kappa). Divided by B before adding: elu's
    # alpha**2 times B would leave the double range.
    m = (B - 1) / B * e["d2"] + (e["dd"] + e["dydy"] - e["d2y2"]) / B
    m_top = (B - 1) / B * e["d2"] - e["d2y2"] / B
    if B == 2:
        lam = top = 0.0
    elif B == 3 or kappa <= 0.0:
        lam = top = math.inf
    else:
        lam = _marginal(B / (B - 3) * (m / kappa))
        top = B / (B - 3) * (m_top / kappa)
    c = e["pp"] / e["p2"] if e["p2"] > 0 else math.nan
    return BatchNormMeanField(
        act.name, B, act.negative_slope, act.alpha, e["p2"], c, kappa, lam, top
    )


def batchnorm_mean_field(
    activation: str, batch: int, *, negative_slope: float = 0.01, alpha: float = 1.0
) -> BatchNormMeanField:
    """Gradient explosion of a deep batch-normalized chain at initialization (Yang,
    Pennington, Rao, Sohl-Dickstein & Schoenholz 2019).

    The chain is ``h_l = phi(BN(W_l h_{l-1}))`` over a batch of B examples: ``W_l``
    Gaussian (any scale; a bias before BatchNorm cancels), BatchNorm in train mode with
    the batch's mean and biased variance, ``eps = 0``, ``gamma = 1``, ``beta = 0``. In
    the wide limit the batch's Gram matrix reaches the fixed point where every example
    looks alike (BSB1): the normalized pre-activations ``y = BN(W h)`` of one feature are
    ``sqrt(B)`` times a uniform unit vector orthogonal to ``(1, ..., 1)``. There::

        growth = B / (B - 3) * m / kappa,
        kappa  = E[phi(y_1)**2] - E[phi(y_1) phi(y_2)],
        m      = ((B - 1) E[phi'(y_1)**2] + E[phi'(y_1) phi'(y_2) (1 + y_1 y_2)]
                  - E[phi'(y_1)**2 y_1**2]) / B.

    Derivation: a feature's backward map is ``g -> P D g / sigma`` with ``D =
    diag(phi'(y))``, ``P = I - 11^T/B - y y^T/B`` (the BatchNorm Jacobian) and ``sigma``
    the batch standard deviation of ``W h``, whose square is ``sigma_w**2 kappa
    chi2_{B-1} / B``; ``E[B / chi2_{B-1}] = B / (B - 3)``, and ``W^T`` contributes
    ``sigma_w**2``. The map commutes with permutations of the batch, so for every
    gradient orthogonal to the batch mean (all but the top block's) the trace, the mean
    squared norm, is multiplied by the same number: ``growth``, the top eigenvalue
    ``lambda_G`` of Yang et al. For linear ``phi`` it is exactly ``(B - 2)/(B - 3)`` (1.2
    at B = 8). As ``B -> inf`` it tends to ``E[phi'(z)**2] / Var[phi(z)]``, z standard
    normal, which is at least 1 by the Gaussian Poincare inequality, with equality only
    for linear ``phi``: batch normalization itself makes gradients explode; relu's limit
    is ``pi / (pi - 1) = 1.467``.

    Parameters
    ----------
    activation : str
        One of :data:`ACTIVATIONS`.
    batch : int
        Batch size B, from 2 to 2**31 - 1. At B = 3 the mean squared gradient is infinite
        (``E[1/chi2_2]`` diverges), at B = 2 it is 0 (BatchNorm maps any two examples to
        ``(1, -1)`` or ``(-1, 1)``).
    negative_slope, alpha : float
        Parameters of ``leaky_relu`` and ``elu``.

    Returns
    -------
    BatchNormMeanField

    Notes
    -----
    The expectations are over ``(y_1, y_2)``, the projection of a uniform point of a
    (B - 2)-sphere on a plane, by Gauss-Legendre panels in polar angles (closed forms for
    linear); they agree with Monte Carlo and with simulation (tests/test_theory.py). The
    prediction assumes the forward kernel sits at the BSB1 fixed point, which a batch of
    distinct wide random inputs reaches at the first block and which attracts for the
    activations here (Yang et al. discuss activations where the symmetry breaks), and
    ``eps`` well below the batch variance of ``W h``.

    References
    ----------
    G. Yang, J. Pennington, V. Rao, J. Sohl-Dickstein, S. S. Schoenholz, "A mean field
    theory of batch normalization", ICLR 2019.

    Examples
    --------
    >>> from gradchain import theory
    >>> theory.batchnorm_mean_field("linear", 8).growth
    1.2
    """
    act = _activation(activation, negative_slope, alpha)
    B = v.int_in("batch", batch, 2, _MAX_BATCH, f"an integer from 2 to {_MAX_BATCH}")
    return _batchnorm(act, B)


@dataclass(frozen=True, eq=False)
class BlockGradNormPrediction:
    """Mean-field per-block gradient norms of a chain of blocks (batch-normalized,
    residual, pre-norm or post-norm).

    Boundaries ``h_0`` (the input) .. ``h_L`` (the last block's output) are indexed as in
    :class:`GradNormPrediction`; log10 values are exact at any depth.

    Attributes
    ----------
    kind : {"batch_norm", "residual", "pre_norm", "post_norm"}
        Which function made it, i.e. which block (see that function).
    activation : str
    sigma_w, sigma_b, scale, q0 : float
        As passed (``scale``: the residual branch multiplier, 1 for batch_norm).
    batch : int or None
        The batch size (batch_norm); None where the prediction is per example.
    q : ndarray, shape (depth + 1,)
        Mean squared entry of ``h_l`` (0 or inf where beyond the double range).
    log10_chi : ndarray, shape (depth,)
        log10 of the factor by which block l multiplies the squared gradient norm on the
        way back, l = 1..depth.
    log10_activation_grad_norms : ndarray, shape (depth + 1,)
        ``log10(||dL/dh_l|| / ||dL/dy||)``, l = 0..depth, with ``y`` the chain's output:
        ``h_L``, except for pre_norm, where it is the final LayerNorm's output (there the
        last entry is ``-0.5 log10 q[-1]``, elsewhere 0).
    log10_weight_grad_norms : ndarray, shape (depth,)
        ``log10(||dL/dW_l||_F / (sqrt(fan_in) ||dL/dy||))`` for block l's last weight
        matrix ``W_l`` (fan_in: its number of columns), one example (batch_norm: the whole
        batch) with the gradient at ``y`` independent of the weights.
    iterated_layers : int
        Blocks whose ``q`` was iterated by quadrature (0: closed forms throughout).

    Notes
    -----
    To set a measured chain beside it, take ``log10 ||dL/dh_l||`` at the boundaries
    between its top-level blocks (``h_0`` the input, each block's output after it) minus
    ``log10 ||dL/dy||``, with a seeded Gaussian gradient at ``y``: i.i.d. entries, as the
    last block's factor assumes. For a train-mode BatchNorm chain the norms are the whole
    batch's, since its Jacobian couples the examples. :func:`gradchain.compare_theory` does
    this for a :class:`~gradchain.Chain` (or an MLP with norm or residual layers).
    """

    kind: str
    activation: str
    sigma_w: float
    sigma_b: float
    scale: float
    q0: float
    batch: int | None
    q: np.ndarray
    log10_chi: np.ndarray
    log10_activation_grad_norms: np.ndarray
    log10_weight_grad_norms: np.ndarray
    iterated_layers: int

    @property
    def depth(self) -> int:
        """Number of blocks."""
        return int(self.log10_chi.shape[0])

    @property
    def activation_grad_norms(self) -> np.ndarray:
        """The activation gradient ratios as floats (0 or inf outside the float range)."""
        return _pow10(self.log10_activation_grad_norms)

    @property
    def weight_grad_norms(self) -> np.ndarray:
        """The weight gradient ratios as floats (0 or inf outside the float range)."""
        return _pow10(self.log10_weight_grad_norms)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for ``json.dumps`` (-inf/inf as strings)."""
        return _to_dict(self)

    def table(self, every: int | None = None) -> str:
        """Per-block text table (every `every`-th block; about 20 rows by default)."""
        L = self.depth
        step = every or max(1, L // 20)
        head = f"{'block':>8}  {'q_l':>12}  {'log10 chi_l':>12}  {'log10|dL/dh_l|':>15}"
        rows = [f"{head}  {'log10|dL/dW_l|':>15}"]
        for l in sorted(set(range(0, L + 1, step)) | {L}):
            c, w = (
                (f"{self.log10_chi[l - 1]:>12.6g}", f"{self.log10_weight_grad_norms[l - 1]:>15.6f}")
                if l
                else (f"{'':>12}", f"{'':>15}")
            )
            g = self.log10_activation_grad_norms[l]
            rows.append(f"{l:>8}  {self.q[l]:>12.6g}  {c}  {g:>15.6f}  {w}")
        return "\n".join(rows)


def _suffix_half_sums(log10_chi: np.ndarray) -> np.ndarray:
    """0.5 * sum_{k > l} log10_chi[k - 1], l = 0..L (the last entry 0). The sums run over
    the deviations from the last value, which is added count times: a constant tail adds
    no rounding, however long."""
    L = log10_chi.shape[0]
    ref = float(log10_chi[-1])
    if not math.isfinite(ref):
        ref = 0.0
    count = np.arange(L, -1, -1, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        dev = np.concatenate((np.cumsum((log10_chi - ref)[::-1])[::-1], [0.0]))
        return 0.5 * (dev + count * ref if ref else dev)


def _readonly_prediction(**kw: Any) -> BlockGradNormPrediction:
    for name in ("q", "log10_chi", "log10_activation_grad_norms", "log10_weight_grad_norms"):
        kw[name] = np.ascontiguousarray(kw[name], dtype=np.float64)
        kw[name].setflags(write=False)
    return BlockGradNormPrediction(**kw)


def batchnorm_grad_norms(
    depth: int,
    activation: str,
    batch: int,
    *,
    sigma_w: float = 1.0,
    q0: float = 1.0,
    negative_slope: float = 0.01,
    alpha: float = 1.0,
) -> BlockGradNormPrediction:
    """Per-block gradient norms of ``h_l = phi(BN(W_l h_{l-1}))`` over a batch of B
    examples, l = 1..depth (Yang et al. 2019; see :func:`batchnorm_mean_field`).

    Going back, every block but the last multiplies the batch's squared gradient norm by
    ``growth``; the last one, for a gradient at ``h_L`` with i.i.d. entries, by
    ``top_growth``. The first block's factor is also multiplied by ``centred_variance /
    q0``: its BatchNorm divides by the input's batch standard deviation.
    ``||dL/dW_l||_F**2 = width * kappa_l * ||dL/d(W_l h_{l-1})||_F**2``
    with ``kappa_l`` the batch variance of ``h_{l-1}``'s features (``q0`` for the input,
    then ``centred_variance``), and ``||dL/dh_{l-1}|| = sigma_w ||dL/d(W_l h_{l-1})||``:
    weight gradients grow at the same rate and scale as ``1/sigma_w``.

    Parameters
    ----------
    depth : int
        Number of blocks L (any; closed form in L).
    activation, batch, negative_slope, alpha
        As in :func:`batchnorm_mean_field`.
    sigma_w : float
        Weight std times ``sqrt(fan_in)`` (> 0, at most 1e150); only the weight gradients
        depend on it.
    q0 : float
        Mean squared input entry (> 0); the input batch is taken to be i.i.d. wide vectors
        (Gram matrix ``q0 I``), which the first BatchNorm already maps to the fixed point.

    Returns
    -------
    BlockGradNormPrediction
        ``kind="batch_norm"``, ``q = [q0, q_star, ...]``.

    Raises
    ------
    MemoryError
        When the arrays (about 64 bytes per block) exceed the memory available.

    References
    ----------
    G. Yang, J. Pennington, V. Rao, J. Sohl-Dickstein, S. S. Schoenholz, "A mean field
    theory of batch normalization", ICLR 2019.

    Examples
    --------
    >>> from gradchain import theory
    >>> p = theory.batchnorm_grad_norms(10_000, "linear", batch=8)
    >>> round(float(p.log10_activation_grad_norms[0]), 1)  # |dL/dx| / |dL/dh_L|
    395.9
    """
    L = _size("depth", depth, bytes_each=64)
    act = _activation(activation, negative_slope, alpha)
    B = v.int_in("batch", batch, 2, _MAX_BATCH, f"an integer from 2 to {_MAX_BATCH}")
    sw = _std("sigma_w", sigma_w)
    if sw <= 0.0:
        raise ValueError(f"sigma_w must be > 0 (BatchNorm of a zero signal is undefined); got {sw}")
    q0 = _variance("q0", q0)
    if q0 <= 0.0:
        raise ValueError(f"q0 must be > 0 (BatchNorm of a zero input is undefined); got {q0}")
    mf = _batchnorm(act, B)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        lc = np.full(L, np.log10(mf.growth))
        lc[-1] = np.log10(mf.top_growth)
        # The first BatchNorm divides by the input's batch deviation sqrt(q0), not by the
        # fixed point's sqrt(centred_variance).
        lc[0] += math.log10(mf.centred_variance) - math.log10(q0)
        g = _suffix_half_sums(lc)
        kappa = np.full(L, mf.centred_variance)
        kappa[0] = q0
        w = 0.5 * np.log10(kappa) - math.log10(sw) + g[:-1]
    q = np.full(L + 1, mf.q_star)
    q[0] = q0
    return _readonly_prediction(
        kind="batch_norm",
        activation=activation,
        sigma_w=sw,
        sigma_b=0.0,
        scale=1.0,
        q0=q0,
        batch=B,
        q=q,
        log10_chi=lc,
        log10_activation_grad_norms=g,
        log10_weight_grad_norms=w,
        iterated_layers=0,
    )


def residual_grad_norms(
    depth: int,
    activation: str,
    sigma_w: float,
    sigma_b: float = 0.0,
    *,
    scale: float = 1.0,
    branch: str = "act_linear",
    q0: float = 1.0,
    negative_slope: float = 0.01,
    alpha: float = 1.0,
) -> BlockGradNormPrediction:
    """Mean-field forward and gradient norms of a residual chain (Yang & Schoenholz 2017).

    Blocks ``h_l = h_{l-1} + a * f_l(h_{l-1})``, l = 1..depth, with ``a = scale`` and
    the branch

    * ``"act_linear"``: ``f(h) = W phi(h) + b`` (``gc.Residual([Activation, Linear])``);
    * ``"linear_act_linear"``: ``f(h) = W' phi(W h + b) + b'`` (the two-layer MLP branch,
      Yang & Schoenholz's full residual network), both layers with ``sigma_w``,
      ``sigma_b``.

    With ``q_l`` the mean squared entry of ``h_l`` and ``u`` the activation's input
    (variance ``r_l = q_{l-1}`` or ``sigma_w**2 q_{l-1} + sigma_b**2``)::

        q_l   = q_{l-1} + a**2 (sigma_w**2 E[phi(sqrt(r_l) z)**2] + sigma_b**2)
        chi_l = 1 + a**2 sigma_w**2 * (1 or sigma_w**2) * E[phi'(sqrt(r_l) z)**2]

    going back, block l multiplies the squared gradient norm by ``chi_l`` (the identity
    path and the branch add, their cross term averages to 0). Nothing pulls ``q_l`` back:
    with ``a = 1`` it grows geometrically for relu (``(1 + sigma_w**2/2)**l`` for the
    first branch) and so do gradients; for tanh linearly, with gradients growing like
    ``exp(c sqrt(l))``. The branch scale ``a = c / sqrt(depth)`` keeps both bounded at
    any depth: for relu without bias ``q_L / q_0`` and the squared gradient ratio both
    equal ``(1 + c**2 sigma_w**2 / 2)**L -> exp(c**2 sigma_w**2 / 2)`` (Hanin & Rolnick
    2018: the output length stays bounded iff the sum of the branch variances does);
    for any activation with ``|phi(x)| <= |x|`` and ``|phi'| <= 1`` the squared gradient
    ratio stays below ``exp(c**2 sigma_w**2)`` (``exp(c**2 sigma_w**4)`` for the
    two-layer branch).

    Parameters
    ----------
    depth : int
        Number of blocks L. Closed form for linear, relu and leaky_relu; other
        activations iterate ``q_l`` (one quadrature, 10 to 50 microseconds, per block) up
        to 100,000 blocks unless ``q_l`` stops changing or diverges.
    activation : str
        One of :data:`ACTIVATIONS`.
    sigma_w, sigma_b : float
        Weight and bias standard deviations of the branch's Linear layers
        (``W_ij ~ N(0, sigma_w**2 / fan_in)``).
    scale : float
        The branch multiplier ``a`` (``|a| <= 1e150``; only ``|a|`` enters).
    branch : {"act_linear", "linear_act_linear"}
    q0 : float
        Mean squared entry of ``h_0``, taken as Gaussian across its entries (the
        activation sees it directly in ``"act_linear"``).
    negative_slope, alpha : float
        Parameters of ``leaky_relu`` and ``elu``.

    Returns
    -------
    BlockGradNormPrediction
        ``kind="residual"``; weight gradients are those of the branch's last ``W``:
        ``||dL/dW_l|| = a ||dL/dh_l|| sqrt(fan_in E[phi(u)**2])``.

    Raises
    ------
    ValueError
        A parameter outside its range, or a depth beyond 100,000 where ``q_l`` has not
        settled by then.
    MemoryError
        When the arrays (about 96 bytes per block) exceed the memory available.

    References
    ----------
    G. Yang, S. S. Schoenholz, "Mean field residual networks: on the edge of chaos",
    NeurIPS 2017. B. Hanin, D. Rolnick, "How to start training: the effect of
    initialization and architecture", NeurIPS 2018.
    """
    L = _size("depth", depth, bytes_each=96)
    act = _activation(activation, negative_slope, alpha)
    sw, sb = _std("sigma_w", sigma_w), _std("sigma_b", sigma_b)
    a = _scale(scale)
    v.choice("branch", branch, _BRANCHES)
    q0 = _variance("q0", q0)
    two = branch == "linear_act_linear"
    lsw2, lsb2, la2 = 2 * _ln(sw), 2 * _ln(sb), 2 * _ln(a)
    # chi = 1 + gain E[phi'(u)**2] with gain = a**2 sigma_w**2 (times sigma_w**2 for two layers)
    lgain = la2 + lsw2 * (2 if two else 1)
    if act.homogeneous:
        c = act.homogeneous_moments()[0]  # E[phi**2] / r = E[phi'**2]
        lA = _lse(0.0, lgain + math.log(c))  # q_l = A q_{l-1} + K, chi = A
        # K / (A - 1), whose a**2 cancels: sigma_b**2 (1 + sigma_w**2 c) / (sigma_w**4 c) or
        # sigma_b**2 / (sigma_w**2 c)
        lK = _lse(0.0, lsw2 + math.log(c)) + lsb2 if two else lsb2
        lKp = lK - lgain + la2 - math.log(c)
        lq0 = _ln(q0)
        n = np.arange(L + 1, dtype=np.float64)
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            if lA == 0.0:  # nothing added, or below rounding: q_l = q0 + l K
                lKa = la2 + lK  # ln K itself
                lq = np.logaddexp(lq0, np.log(n) + lKa) if lKa > -math.inf else np.full(L + 1, lq0)
            else:
                grown = np.log(-np.expm1(-n * lA))  # ln(1 - A**-l)
                lq = n * lA + np.logaddexp(lq0, lKp + grown)
            lq[0] = lq0
            q = np.exp(lq)
            lc = np.full(L, lA / _LN10)
            g = _suffix_half_sums(lc)
            lr = lq[:-1] if not two else np.logaddexp(lsw2 + lq[:-1], lsb2)
            w = (0.5 * la2 + 0.5 * (math.log(c) + lr)) / _LN10 + g[1:]
        iterated = 0
    else:
        qs, lcs, le2 = [q0], [], []
        qk = q0
        for k in range(L):
            if k == _MAX_ITERATED_LAYERS:
                raise ValueError(
                    f"depth must be at most {_MAX_ITERATED_LAYERS} for {act.name} with "
                    f"sigma_w={sw!r}, sigma_b={sb!r}, scale={a!r}: q_l has not settled after "
                    f"{_MAX_ITERATED_LAYERS} blocks and every further block is iterated; "
                    f"got {L}"
                )
            r = sw * sw * qk + sb * sb if two else qk  # inf beyond the double range
            e2, d2 = act.moments(min(r, _Q_HUGE))
            lcs.append(_lse(0.0, lgain + _ln(d2)) / _LN10)
            le2.append(_ln(e2))
            inc = _exp(la2 + _lse(lsw2 + _ln(e2), lsb2))
            q_next = qk + inc if inc < math.inf else math.inf
            qs.append(q_next)
            if q_next == qk or q_next >= _Q_HUGE:  # constant from here, or diverged
                break
            qk = q_next
        k = len(lcs)
        rest = L - k
        if rest:
            if qs[-1] >= _Q_HUGE:
                e2, d2 = act.moments(_Q_HUGE)  # the limits, as in predicted_grad_norms
                qs.extend([math.inf] * rest)
                lcs.extend([_lse(0.0, lgain + _ln(d2)) / _LN10] * rest)
                # E[phi**2] diverges with q unless phi is bounded
                le2.extend([_ln(e2) if act.name in ("tanh", "sigmoid") else math.inf] * rest)
            else:
                qs.extend([qs[-1]] * rest)
                lcs.extend([lcs[-1]] * rest)
                le2.extend([le2[-1]] * rest)
        q = np.array(qs)
        lc = np.array(lcs)
        g = _suffix_half_sums(lc)
        with np.errstate(invalid="ignore"):
            w = (0.5 * la2 + 0.5 * np.array(le2)) / _LN10 + g[1:]
        iterated = k
    return _readonly_prediction(
        kind="residual",
        activation=activation,
        sigma_w=sw,
        sigma_b=sb,
        scale=a,
        q0=q0,
        batch=None,
        q=q,
        log10_chi=lc,
        log10_activation_grad_norms=g,
        log10_weight_grad_norms=w,
        iterated_layers=iterated,
    )


def norm_position_grad_norms(
    depth: int,
    activation: str = "relu",
    sigma_w: float = 1.0,
    sigma_b: float = 0.0,
    *,
    position: str = "pre",
    scale: float = 1.0,
    branch: str = "linear_act_linear",
    q0: float = 1.0,
    negative_slope: float = 0.01,
    alpha: float = 1.0,
) -> BlockGradNormPrediction:
    """Gradient norms of residual MLP blocks with LayerNorm before (pre-LN) or after
    (post-LN) the residual sum (Xiong et al. 2020), in mean field.

    With ``F(x) = W' phi(W x + b) + b'`` (both layers ``sigma_w``, ``sigma_b``; any
    hidden width; ``branch="act_linear"``: ``F(x) = W phi(x) + b``, the layers of
    ``gc.MLP(norm="layer", residual=True)``) and ``LN`` a LayerNorm at initialization
    (``gamma = 1``, ``beta = 0``, ``eps`` negligible), for l = 1..depth:

    * ``position="pre"``: ``h_l = h_{l-1} + a F(LN(h_{l-1}))`` and the output
      ``y = LN(h_L)`` (the final LayerNorm of pre-LN Transformers);
    * ``position="post"``: ``h_l = LN(h_{l-1} + a F(h_{l-1}))`` and ``y = h_L``.

    Write ``r = sigma_w**2 + sigma_b**2`` (the variance at ``phi``'s input when the
    block's input is normalized; 1 for ``act_linear``), ``v = a**2 (sigma_w**2
    E[phi(sqrt(r) z)**2] + sigma_b**2)`` (the branch's mean squared output) and ``x =
    a**2 sigma_w**4 E[phi'(sqrt(r) z)**2]`` (its squared gain on gradients; ``sigma_w**2``
    in place of ``sigma_w**4`` for ``act_linear``). A LayerNorm divides gradients by its
    input's root mean square; so, going back:

    * pre: ``q_l = q0 + l v``; block l multiplies the squared gradient norm by
      ``1 + x / q_{l-1}`` and the final LayerNorm by ``1 / q_L``. The last block's
      weight gradient is ``||dL/dW'_L|| = a sqrt(fan_in E[phi**2] / (q0 + L v))
      ||dL/dy||``: it shrinks as ``1/sqrt(L)``.
    * post: ``q_l = 1``; block l multiplies by ``(1 + x) / (1 + v)`` (``q0 + v_1`` and
      ``x_1`` for the first block, whose ``phi`` sees variance ``sigma_w**2 q0 +
      sigma_b**2``, or ``q0`` for ``act_linear``). The last block's weight gradient is
      ``a sqrt(fan_in E[phi**2] / (1 + v)) ||dL/dy||`` whatever L. Going down from the
      output, gradients shrink geometrically where ``x < v`` (relu with bias, gelu with
      a bias...), stay level where ``x = v`` (relu or leaky_relu without bias) and grow
      where ``x > v`` (tanh without bias).

    This is Xiong et al.'s Theorem 1 (pre-LN: ``O(d sqrt(ln d / L))``, post-LN:
    ``O(d sqrt(ln d))`` for the last layer's FFN weights) with the mean-field constants,
    for MLP blocks: their attention sub-layers and the softmax loss's ``sqrt(ln d)`` are
    left out, and ``fan_in`` is the hidden width.

    Parameters
    ----------
    depth : int
        Number of blocks L (any; closed form).
    activation : str
        One of :data:`ACTIVATIONS`; relu by default (Xiong et al.'s FFN).
    sigma_w, sigma_b : float
        Weight and bias standard deviations of both Linear layers of ``F``
        (``W_ij ~ N(0, sigma_w**2 / fan_in)``); ``sigma_w**2 q0 + sigma_b**2`` and
        ``sigma_w**2 + sigma_b**2`` must be at most 1e300.
    position : {"pre", "post"}
    scale : float
        The branch multiplier ``a`` (``|a| <= 1e150``).
    branch : {"linear_act_linear", "act_linear"}
        The two-layer MLP branch of Transformers (default), or ``W phi(x) + b``.
    q0 : float
        Mean squared entry of the input ``h_0`` (> 0; taken with zero mean over its
        entries).
    negative_slope, alpha : float
        Parameters of ``leaky_relu`` and ``elu``.

    Returns
    -------
    BlockGradNormPrediction
        ``kind="pre_norm"`` or ``"post_norm"``; ``q[l]`` is the mean squared entry of
        ``h_l``; ``log10_weight_grad_norms`` are those of each block's second Linear
        ``W'`` (the only one for ``act_linear``), per ``sqrt(fan_in)`` and per
        ``||dL/dy||``, for one example whose
        ``dL/dy`` is independent of the weights (for a batch of examples with
        independent zero-mean ``dL/dy`` the squared norms add).

    Raises
    ------
    MemoryError
        When the arrays (about 96 bytes per block) exceed the memory available.

    Notes
    -----
    Mean field ignores the two directions a LayerNorm's Jacobian removes from a
    gradient (the mean and the normalized vector itself): at width d that is a factor
    about ``1 - 2/d`` per LayerNorm on squared norms, which compounds over the blocks of
    a post-LN chain (L / d matters there).

    References
    ----------
    R. Xiong, Y. Yang, D. He, K. Zheng, S. Zheng, C. Xing, H. Zhang, Y. Lan, L. Wang,
    T.-Y. Liu, "On layer normalization in the Transformer architecture", ICML 2020.
    """
    L = _size("depth", depth, bytes_each=96)
    act = _activation(activation, negative_slope, alpha)
    sw, sb = _std("sigma_w", sigma_w), _std("sigma_b", sigma_b)
    v.choice("position", position, _POSITIONS)
    a = _scale(scale)
    v.choice("branch", branch, _BRANCHES)
    two = branch == "linear_act_linear"
    q0 = _variance("q0", q0)
    if q0 <= 0.0:
        raise ValueError(f"q0 must be > 0 (a LayerNorm of a zero input is undefined); got {q0}")
    sw2, sb2 = sw * sw, sb * sb
    r = sw2 + sb2 if two else 1.0
    if r > _Q_HUGE:
        raise ValueError(
            f"sigma_w**2 + sigma_b**2 = {r:.6g}, the variance at the activation's input, must "
            "be at most 1e300; lower sigma_w or sigma_b"
        )
    la2, lsw2, lsb2 = 2 * _ln(a), 2 * _ln(sw), 2 * _ln(sb)

    def branch_moments(var: float) -> tuple[float, float, float]:
        """ln v, ln x and ln E[phi**2] of a branch whose phi sees variance var."""
        e2, d2 = act.moments(var)
        le2 = _ln(e2)
        return la2 + _lse(lsw2 + le2, lsb2), la2 + (2 if two else 1) * lsw2 + _ln(d2), le2

    lv, lx, le2 = branch_moments(r)
    lq0 = _ln(q0)
    n = np.arange(L + 1, dtype=np.float64)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        if position == "pre":
            lq = np.logaddexp(lq0, np.log(n) + lv)  # q_l = q0 + l v
            lq[0] = lq0
            lc = np.logaddexp(0.0, lx - lq[:-1]) / _LN10
            g = _suffix_half_sums(lc) - 0.5 * lq[-1] / _LN10
            w = np.full(L, (0.5 * la2 + 0.5 * le2) / _LN10) + g[1:]
        else:
            first = _first_variance(sw2, q0, sb2) if two else q0
            lv1, lx1, le21 = branch_moments(first) if first != r else (lv, lx, le2)
            lq = np.zeros(L + 1)
            lq[0] = lq0
            ls = np.full(L, _lse(0.0, lv))  # ln of the mean square of h_{l-1} + a F
            ls[0] = _lse(lq0, lv1)
            lgain = np.full(L, _lse(0.0, lx))
            lgain[0] = _lse(0.0, lx1)
            lc = (lgain - ls) / _LN10
            g = _suffix_half_sums(lc)
            le = np.full(L, le2)
            le[0] = le21
            # dL/d(h_{l-1} + a F) = dL/dh_l through the LayerNorm: 1 / its rms
            w = (0.5 * la2 + 0.5 * le - 0.5 * ls) / _LN10 + g[1:]
        q = np.exp(lq)
    return _readonly_prediction(
        kind=f"{position}_norm",
        activation=activation,
        sigma_w=sw,
        sigma_b=sb,
        scale=a,
        q0=q0,
        batch=None,
        q=q,
        log10_chi=lc,
        log10_activation_grad_norms=g,
        log10_weight_grad_norms=w,
        iterated_layers=0,
    )


# ---------------------------------------------------------------------------------------
# Random matrices
# ---------------------------------------------------------------------------------------
def _digamma_halves(kmax: int) -> np.ndarray:
    """psi(k/2), k = 1..kmax, from the closed forms psi(m) = -gamma + H_{m-1} and
    psi(m + 1/2) = -gamma - 2 ln 2 + sum_{j=1}^m 2/(2j-1)."""
    out = np.empty(kmax)
    n_even, n_odd = kmax // 2, (kmax + 1) // 2  # k = 2m (m = 1..), k = 2m + 1 (m = 0..)
    harmonic = np.concatenate(([0.0], np.cumsum(1.0 / np.arange(1, n_even, dtype=np.float64))))
    odd_sum = np.concatenate(
        ([0.0], np.cumsum(2.0 / (2.0 * np.arange(1, n_odd, dtype=np.float64) - 1.0)))
    )
    out[1::2] = -np.euler_gamma + harmonic[:n_even]
    out[0::2] = -np.euler_gamma - 2.0 * math.log(2.0) + odd_sum[:n_odd]
    return out


def _trigamma_tail(x0: float, count: int) -> np.ndarray:
    """psi'(x0 + j), j = 0..count-1, as sum_{i >= j} 1/(x0 + i)**2: the asymptotic series
    at x0 + J (J >= 40) plus the finite sum (no cancellation, unlike pi**2/6 - partial sums)."""
    J = max(count, 40)
    x = x0 + J
    tail = (
        1 / x
        + 1 / (2 * x**2)
        + 1 / (6 * x**3)
        - 1 / (30 * x**5)
        + 1 / (42 * x**7)
        - 1 / (30 * x**9)
    )
    terms = 1.0 / (x0 + np.arange(J, dtype=np.float64)) ** 2
    return (np.cumsum(terms[::-1])[::-1] + tail)[:count]


def _trigamma_halves(kmax: int) -> np.ndarray:
    """psi'(k/2), k = 1..kmax (psi'(m) = pi**2/6 - sum_{j<m} 1/j**2,
    psi'(m + 1/2) = pi**2/2 - 4 sum_{j<=m} 1/(2j-1)**2, computed as tail sums)."""
    out = np.empty(kmax)
    out[1::2] = _trigamma_tail(1.0, kmax // 2)
    out[0::2] = _trigamma_tail(0.5, (kmax + 1) // 2)
    return out


def gaussian_lyapunov_spectrum(n: int, sigma: float = 1.0) -> np.ndarray:
    """Lyapunov exponents of a product of i.i.d. n x n Gaussian matrices (Newman 1986).

    For matrices with entries ``N(0, sigma**2 / n)``, the exponents (per factor, natural
    log, descending) are exactly::

        lambda_i = ln(sigma) + 0.5 * (ln(2/n) + psi((n - i + 1) / 2)),  i = 1..n

    with ``psi`` the digamma function, here in closed form at integer and half-integer
    arguments. Reason: after QR re-orthonormalisation each factor contributes
    ``R_ii**2 ~ sigma**2 chi2_{n-i+1} / n`` independently (Bartlett decomposition), and
    ``E ln chi2_k = ln 2 + psi(k/2)``. ``lambda_1 = -1/(2n) + O(n**-2)`` at ``sigma = 1``
    and the sum is ``E ln|det W|``. Forrester (2013) gives the complex analogue.

    Parameters
    ----------
    n : int
        Matrix size.
    sigma : float
        Entry standard deviation times ``sqrt(n)`` (> 0).

    Returns
    -------
    ndarray, shape (n,)

    Raises
    ------
    MemoryError
        When its arrays (about 48 bytes per unit of n) exceed the memory available.
    """
    n = _size("n", n, bytes_each=48)  # the digamma values and their temporaries
    s = v.finite_float("sigma", sigma)
    if s <= 0:
        raise ValueError(f"sigma must be > 0; got {s}")
    psi = _digamma_halves(n)[::-1]  # psi((n - i + 1)/2), i = 1..n
    return math.log(s) + 0.5 * (math.log(2.0 / n) + psi)


def gaussian_lyapunov_stderr(n: int, depth: int) -> np.ndarray:
    """Standard error of the Lyapunov exponents estimated from a product of ``depth``
    Gaussian matrices by QR re-orthonormalisation.

    Each factor adds ``0.5 * ln(R_ii**2)`` with ``R_ii**2 ~ (sigma**2/n) chi2_{n-i+1}``,
    independent across factors and across ``i``, and ``Var ln chi2_k = psi'(k/2)``
    (trigamma), so the estimate of ``lambda_i`` after ``depth`` factors has standard
    deviation exactly ``sqrt(psi'((n - i + 1)/2) / (4 depth))``, whatever ``sigma``
    (starting from any orthonormal frame: rotation invariance leaves no transient).

    Parameters
    ----------
    n : int
        Matrix size.
    depth : int
        Number of factors.

    Returns
    -------
    ndarray, shape (n,)

    Raises
    ------
    MemoryError
        When its arrays (about 48 bytes per unit of n) exceed the memory available.
    """
    n = _size("n", n, bytes_each=48)  # the trigamma tail sums and their temporaries
    L = v.positive_int("depth", depth)
    return np.sqrt(_trigamma_halves(n)[::-1] / (4.0 * L))


def fuss_catalan_moments(depth: int, k_max: int = 2) -> np.ndarray:
    """Moments of the squared singular values of a product of ``depth`` i.i.d. Gaussian
    matrices (entries ``N(0, 1/n)``) in the infinite-width limit.

    ``E[tr((M M^T)**k) / n] -> FC_L(k) = binom((L+1) k, k) / (L k + 1)``, the Fuss-Catalan
    numbers (Penson & Zyczkowski 2011): 1, ``L + 1``, ``(L+1)(3L+2)/2``, ... The spread
    of the singular values grows with depth even though the mean stays 1 (Pennington et
    al. 2017); a product of orthogonal matrices instead has every squared singular value
    exactly 1 (all moments 1) at any width. See :func:`gaussian_product_moments` for the
    exact finite-width second moment.

    Parameters
    ----------
    depth : int
        Number of factors L.
    k_max : int
        Highest moment.

    Returns
    -------
    ndarray, shape (k_max,)
        Moments k = 1..k_max as floats (inf beyond the float range).
    """
    L = v.positive_int("depth", depth)
    K = _size("k_max", k_max, bytes_each=8, maximum=10_000)  # one lgamma (or comb) each
    out = np.full(K, math.inf)
    for k in range(1, K + 1):
        # ln FC_L(k) from lgamma first: the exact integer would have up to millions of
        # digits, while the float is inf from 1.8e308 on (and FC_L(k) grows with k).
        n = (L + 1) * k
        log_fc = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
        if log_fc - math.log(L * k + 1) > 712.0:  # ln(1.8e308) = 709.8, and some margin
            break
        fc = math.comb(n, k) // (L * k + 1)  # an integer
        try:
            out[k - 1] = float(fc)
        except OverflowError:
            break
    return out


def gaussian_product_moments(depth: int, n: int) -> np.ndarray:
    """Exact first and second moments of the squared singular values of a product of
    ``depth`` i.i.d. n x n Gaussian matrices with entries ``N(0, 1/n)``, at finite n.

    ``E[tr(M M^T) / n] = 1`` and::

        E[tr((M M^T)**2) / n] = ((n + 2) (1 + 2/n)**L - (n - 1) (1 - 1/n)**L) / 3
                              = L + 1 + L (L + 1) / (2 n) + O(L**3 / n**2)

    Derivation: for ``A`` fixed and ``W`` Gaussian, ``E tr((W A W^T)**2) = ((n + 1)
    tr(A**2) + (tr A)**2) / n`` and ``E (tr W A W^T)**2 = (tr A)**2 + 2 tr(A**2) / n``
    (Wick's theorem), a linear recursion for ``(E tr(A**2)/n, E (tr A)**2/n**2)`` with
    eigenvalues ``1 + 2/n`` and ``1 - 1/n``. As ``n -> inf`` it tends to the Fuss-Catalan
    value ``L + 1``.

    Parameters
    ----------
    depth : int
        Number of factors L.
    n : int
        Matrix size.

    Returns
    -------
    ndarray, shape (2,)
        ``[1.0, second moment]`` (inf beyond the float range).
    """
    L = v.positive_int("depth", depth)
    n = v.positive_int("n", n)
    with np.errstate(over="ignore"):
        up = np.expm1(L * np.log1p(2.0 / n))  # (1 + 2/n)**L - 1, no cancellation at large n
        down = np.expm1(L * np.log1p(-1.0 / n)) if n > 1 else np.float64(-1.0)
        m2 = 1.0 + ((n + 2) * up - (n - 1) * down) / 3.0
    return np.array([1.0, float(m2)])


@dataclass(frozen=True, eq=False)
class ScalarChain:
    """The scalar linear chain ``h_l = w h_{l-1}``, ``h_L = w**L h_0``: the one-line model
    of vanishing (``|w| < 1``) and exploding (``|w| > 1``) gradients (Bengio et al. 1994).

    Attributes
    ----------
    w : float
    depth : int
    log10_abs_gain : float
        ``log10 |dh_L/dh_0| = L log10 |w|``.
    gain_sign : float
        Sign of ``w**L`` (0 for ``w = 0``).
    log10_abs_weight_grad : float
        ``log10 |dh_L/dw_l| = (L - 1) log10 |w|`` for every layer's own weight at
        ``h_0 = 1`` (add ``log10 L`` for one weight shared by all layers).
    log10_activation_grad_norms : ndarray, shape (depth + 1,)
        ``log10 |dh_L/dh_l| = (L - l) log10 |w|``, l = 0..L (as in
        :class:`GradNormPrediction`).
    """

    w: float
    depth: int
    log10_abs_gain: float
    gain_sign: float
    log10_abs_weight_grad: float
    log10_activation_grad_norms: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        """Plain values for ``json.dumps``."""
        return _to_dict(self)


def scalar_chain(w: float, depth: int) -> ScalarChain:
    """Gain and gradients of the scalar linear chain ``h_L = w**L h_0``, in log10.

    Parameters
    ----------
    w : float
        The weight of every layer (finite).
    depth : int
        Number of layers L.

    Returns
    -------
    ScalarChain

    Raises
    ------
    MemoryError
        When the per-layer array (about 24 bytes per layer) exceeds the memory available.
    """
    w = v.finite_float("w", w)
    L = _size("depth", depth, bytes_each=24)  # the per-layer array and its temporaries
    lw = math.log10(abs(w)) if w else -math.inf
    per_layer = (
        (L - np.arange(L + 1, dtype=np.float64)) * lw
        if w
        else np.where(np.arange(L + 1) < L, -np.inf, 0.0)
    )
    per_layer.setflags(write=False)
    return ScalarChain(
        w=w,
        depth=L,
        log10_abs_gain=L * lw,
        gain_sign=float(np.sign(w) ** L),
        log10_abs_weight_grad=(L - 1) * lw if L > 1 else 0.0,
        log10_activation_grad_norms=per_layer,
    )
