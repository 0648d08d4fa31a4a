"""gradchain.theory against closed forms, brute-force integration and simulation.

Accuracy achieved (and asserted below): the quadrature of E[phi(sqrt(q) z)**2] and
E[phi'(sqrt(q) z)**2] agrees with closed forms (relu, leaky_relu, elu, small-q Taylor series
of tanh) and with a 400,001-point trapezoid rule to 1e-13 relative or better for q from 1e-4
to 30, and with the large-q asymptotics of tanh at q = 1e8 to 1e-7 (the asymptotic
series' own error). Fixed points q* and the order-to-chaos boundary agree with the
trapezoid rule to 1e-12; the digamma and trigamma closed forms with their asymptotic series
to 1e-13.
"""

from __future__ import annotations

import json
import math

import numpy as np
import oracles
import pytest
from gradchain import theory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

GAMMA = np.euler_gamma
SMOOTH = ("sigmoid", "tanh", "gelu", "gelu_tanh", "silu", "softplus")


# --- independent references ----------------------------------------------------------


def reference_phi(name, x):
    """phi and phi' written directly from their textbook formulas (math.erf for gelu)."""
    if name == "tanh":
        return np.tanh(x), 1 / np.cosh(x) ** 2
    if name == "sigmoid":
        s = 1 / (1 + np.exp(-x))
        return s, s * (1 - s)
    if name == "silu":
        s = 1 / (1 + np.exp(-x))
        return x * s, s + x * s * (1 - s)
    if name == "softplus":
        return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20)))), 1 / (1 + np.exp(-x))
    if name == "gelu":
        cdf = 0.5 * (1 + np.array([math.erf(t / math.sqrt(2)) for t in x]))
        return x * cdf, cdf + x * np.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    if name == "gelu_tanh":
        b, k = math.sqrt(2 / math.pi), 0.044715
        t = np.tanh(b * (x + k * x**3))
        return 0.5 * x * (1 + t), 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * b * (1 + 3 * k * x * x)
    raise AssertionError(name)


Z_GRID = np.linspace(-12.0, 12.0, 4801)
Z_WEIGHT = np.exp(-(Z_GRID**2) / 2) / math.sqrt(2 * math.pi) * (24.0 / 4800)  # exact spacing


def trapezoid_moments(name, q):
    """E[phi**2], E[phi'**2] by the trapezoid rule with step 0.005: for integrands analytic
    in a strip of half-width d around the real axis the error is about exp(-2 pi d / h),
    far below rounding here (d >= 0.28 for tanh at q = 30)."""
    p, d = reference_phi(name, math.sqrt(q) * Z_GRID)
    return float(Z_WEIGHT @ (p * p)), float(Z_WEIGHT @ (d * d))


def reference_chi_at_fixed_point(name, sw, sb, q):
    """Checks that q is a fixed point of the trapezoid length map (the residual bounds the
    error of q by residual / (1 - slope)); returns chi there."""
    e2, d2 = trapezoid_moments(name, q)
    assert sw * sw * e2 + sb * sb == pytest.approx(q, rel=1e-13)
    return sw * sw * d2


def Phi(x):
    return 0.5 * math.erfc(-x / math.sqrt(2))


def elu_moments(q, alpha):
    """Closed forms via E[exp(a z); z < 0] = exp(a**2 / 2) Phi(-a)."""
    r = math.sqrt(q)
    neg = alpha**2 * (math.exp(2 * q) * Phi(-2 * r) - 2 * math.exp(q / 2) * Phi(-r) + 0.5)
    return q / 2 + neg, 0.5 + alpha**2 * math.exp(2 * q) * Phi(-2 * r)


def quadrature(name, q, **kw):
    """The library's rule applied to any activation (also relu and linear, which the
    public functions do in closed form)."""
    act = theory._Act(name, **kw)
    x, w = theory._rule(q)
    p, d = act(x)
    return float(w @ (p * p)), float(w @ (d * d))


# --- quadrature ----------------------------------------------------------------------


@pytest.mark.parametrize("q", [1e-4, 0.3, 1.0, 7.0, 1e4, 1e12])
def test_quadrature_kinks_exact(q):
    # relu and leaky_relu: the kink at 0 is a panel end, so their moments are exact.
    e2, d2 = quadrature("relu", q)
    assert e2 == pytest.approx(q / 2, rel=1e-14)
    assert d2 == pytest.approx(0.5, rel=1e-14)
    e2, d2 = quadrature("leaky_relu", q, negative_slope=-0.3)
    assert e2 == pytest.approx(1.09 * q / 2, rel=1e-14)
    assert d2 == pytest.approx(1.09 / 2, rel=1e-14)
    assert quadrature("linear", q)[0] == pytest.approx(q, rel=1e-14)


@pytest.mark.parametrize("alpha", [1.0, 0.6, 2.0])
@pytest.mark.parametrize("q", [1e-4, 0.3, 1.0, 4.0, 25.0])
def test_quadrature_elu_closed_form(q, alpha):
    e2, d2 = quadrature("elu", q, alpha=alpha)
    ref = elu_moments(q, alpha)
    assert e2 == pytest.approx(ref[0], rel=1e-13)
    assert d2 == pytest.approx(ref[1], rel=1e-13)


@pytest.mark.parametrize("name", SMOOTH)
@pytest.mark.parametrize("q", [1e-3, 1.0, 30.0])
def test_quadrature_against_trapezoid(name, q):
    ours = quadrature(name, q)
    ref = trapezoid_moments(name, q)
    assert ours[0] == pytest.approx(ref[0], rel=1e-13)
    assert ours[1] == pytest.approx(ref[1], rel=1e-13)


def test_quadrature_tanh_small_and_large_q():
    # Taylor: tanh**2 = x**2 - 2x**4/3 + 17x**6/45, sech**4 = 1 - 2x**2 + 7x**4/3 - 94x**6/45
    q = 1e-4
    e2, d2 = quadrature("tanh", q)
    assert e2 == pytest.approx(q - 2 * q**2 + 17 / 3 * q**3, rel=1e-12)
    assert d2 == pytest.approx(1 - 2 * q + 7 * q**2 - 94 / 3 * q**3, rel=1e-13)
    q = 1e8  # E[sech(sqrt(q) z)**k] ~ phi(0) * int sech**k / sqrt(q): 2 for k=2, 4/3 for k=4
    e2, d2 = quadrature("tanh", q)
    pdf0 = 1 / math.sqrt(2 * math.pi)
    assert 1 - e2 == pytest.approx(2 * pdf0 / math.sqrt(q), rel=1e-7)
    assert d2 == pytest.approx(4 / 3 * pdf0 / math.sqrt(q), rel=1e-7)


# The q values at which a fixed Gauss-Hermite rule fails on the narrow sech**4 spike, and
# beyond; each against 30-digit mpmath integration split at the integrand's features.
MPMATH_Q = (1e-6, 1.0, 10.0, 80.0, 1e4)


def mpmath_moments(name, q):
    """E[phi(sqrt(q) z)**2] and E[phi'(sqrt(q) z)**2] from textbook formulas in mpmath, the
    range split where phi bends (in units of its argument) and at softplus' threshold."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 30
    s = mp.sqrt(mp.mpf(q))

    b, k = mp.sqrt(2 / mp.pi), mp.mpf("0.044715")

    def sig(x):
        return 1 / (1 + mp.exp(-x))

    phi, dphi = {
        "tanh": (mp.tanh, lambda x: mp.sech(x) ** 2),
        "sigmoid": (sig, lambda x: sig(x) * (1 - sig(x))),
        "silu": (lambda x: x * sig(x), lambda x: sig(x) * (1 + x * (1 - sig(x)))),
        "softplus": (
            lambda x: x if x > 20 else mp.log1p(mp.exp(x)),
            lambda x: 1 if x > 20 else sig(x),
        ),
        "elu": (lambda x: x if x > 0 else mp.expm1(x), lambda x: 1 if x > 0 else mp.exp(x)),
        "gelu": (lambda x: x * mp.ncdf(x), lambda x: mp.ncdf(x) + x * mp.npdf(x)),
        "gelu_tanh": (
            lambda x: x / 2 * (1 + mp.tanh(b * (x + k * x**3))),
            lambda x: (1 + mp.tanh(b * (x + k * x**3))) / 2
            + x / 2 * mp.sech(b * (x + k * x**3)) ** 2 * b * (1 + 3 * k * x * x),
        ),
    }[name]
    bends = [0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 20.0, 32.0]
    pts = sorted({-14.0, 14.0} | {sg * b / float(s) for b in bends for sg in (-1, 1)
                                  if b / float(s) < 14.0})  # fmt: skip

    def expect(f):
        return mp.quad(lambda z: f(s * z) ** 2 * mp.npdf(z), pts)

    return float(expect(phi)), float(expect(dphi))


@pytest.mark.parametrize("q", MPMATH_Q)
@pytest.mark.parametrize("name", ["tanh", "sigmoid", "silu", "softplus", "elu", "gelu",
                                  "gelu_tanh"])  # fmt: skip
def test_quadrature_against_mpmath(name, q):
    """Every Gaussian expectation the module takes (through _Act.moments, which the maps,
    fixed points and predictions share) to 1e-13 relative at q from 1e-6 to 1e4."""
    ref = mpmath_moments(name, q)
    ours = theory._Act(name).moments(q)
    assert ours[0] == pytest.approx(ref[0], rel=1e-13)
    assert ours[1] == pytest.approx(ref[1], rel=1e-13)


def test_sech4_spike_needs_more_than_gauss_hermite():
    """E[sech(sqrt(80) z)**4]: the integrand is a spike of width 0.1 at z = 0, between the
    nodes of a 160-point Gauss-Hermite rule, which misses it by more than half; the
    composite rule agrees with mpmath to 1e-14."""
    ref = mpmath_moments("tanh", 80.0)[1]
    z, w = np.polynomial.hermite_e.hermegauss(160)
    e = np.exp(-math.sqrt(80.0) * np.abs(z))
    hermite = float(w @ (2 * e / (1 + e * e)) ** 4) / math.sqrt(2 * math.pi)
    assert abs(hermite - ref) > 0.5 * ref
    assert theory.chi(80.0, "tanh", 1.0) == pytest.approx(ref, rel=1e-14)


def test_public_maps():
    assert theory.length_map(2.0, "relu", 1.5, 0.3) == pytest.approx(
        2.25 * 2.0 / 2 + 0.09, rel=1e-15
    )
    assert theory.chi(5.0, "relu", 1.5) == pytest.approx(2.25 / 2, rel=1e-15)
    assert theory.chi(0.0, "relu", 1.0) == 0.5  # the limit q -> 0+, not relu'(0) = 0
    assert theory.chi(0.0, "elu", 1.0, alpha=0.5) == pytest.approx((1 + 0.25) / 2)
    assert theory.length_map(0.0, "sigmoid", 2.0) == pytest.approx(4 * 0.25)
    assert theory.chi(0.7, "linear", 1.3) == pytest.approx(1.69)


def test_correlation_pair_relu_arccos_kernel():
    # E[relu(u1) relu(u2)] = q (sin t + (pi - t) c) / (2 pi), E[relu' relu'] = (pi - t) / (2 pi)
    # with t = arccos c (Cho & Saul 2009): checks the kink handling of the 2-D quadrature.
    act = theory._Act("relu")
    for q in (0.3, 4.0):
        for c in (-0.8, 0.0, 0.5, 0.99, 0.9999):
            t = math.acos(c)
            assert act.pair(q, c, False) == pytest.approx(
                q * (math.sin(t) + (math.pi - t) * c) / (2 * math.pi), rel=1e-9
            )
            assert act.pair(q, c, True) == pytest.approx((math.pi - t) / (2 * math.pi), rel=1e-6)


# --- mean field ----------------------------------------------------------------------


@pytest.mark.parametrize("sw", [0.3, 0.9, 0.999])
def test_tanh_without_bias_ordered(sw):
    mf = theory.mean_field("tanh", sw, 0.0)
    assert mf.q_star == 0.0
    assert mf.chi_1 == pytest.approx(sw * sw, rel=1e-15)
    assert mf.depth_scale == pytest.approx(-1 / math.log(sw * sw), rel=1e-12)
    assert mf.phase == "ordered"


def test_tanh_critical_point_without_bias():
    mf = theory.mean_field("tanh", 1.0, 0.0)
    assert mf.q_star < 1e-15  # the marginal fixed point 0, to rounding
    assert mf.chi_1 == pytest.approx(1.0, abs=1e-15)
    assert mf.phase == "critical"
    assert abs(mf.depth_scale) > 1e14


@pytest.mark.parametrize("sw, sb", [(1.5, 0.3), (1.1, 0.05), (3.0, 1.0), (1.2, 0.0)])
def test_tanh_fixed_point_against_trapezoid(sw, sb):
    mf = theory.mean_field("tanh", sw, sb)
    assert mf.chi_1 == pytest.approx(
        reference_chi_at_fixed_point("tanh", sw, sb, mf.q_star), rel=1e-13
    )
    assert mf.length_map_slope < 1  # the fixed point attracts
    assert theory.length_map(mf.q_star, "tanh", sw, sb) == pytest.approx(mf.q_star, rel=1e-14)


@pytest.mark.parametrize("name", ["sigmoid", "gelu", "silu", "softplus", "elu"])
def test_other_fixed_points_against_trapezoid(name):
    mf = theory.mean_field(name, 1.3, 0.3, correlation=False)
    assert mf.length_map_slope < 0.9  # so the residual bounds the error of q* to ~1e-12
    if name == "elu":
        e2, d2 = elu_moments(mf.q_star, 1.0)
        assert 1.69 * e2 + 0.09 == pytest.approx(mf.q_star, rel=1e-13)
        assert mf.chi_1 == pytest.approx(1.69 * d2, rel=1e-13)
    else:
        assert mf.chi_1 == pytest.approx(
            reference_chi_at_fixed_point(name, 1.3, 0.3, mf.q_star), rel=1e-13
        )


@pytest.mark.parametrize("sw", [0.5, 1.0, 1.3])
@pytest.mark.parametrize("sb", [0.0, 0.4])
def test_homogeneous_closed_forms(sw, sb):
    relu = theory.mean_field("relu", sw, sb)
    assert relu.chi_1 == pytest.approx(sw * sw / 2, rel=1e-15)
    assert relu.q_star == pytest.approx(sb * sb / (1 - sw * sw / 2), rel=1e-14)
    lin = theory.mean_field("linear", sw, sb)
    assert lin.chi_1 == pytest.approx(sw * sw, rel=1e-15)
    expected = sb * sb / (1 - sw * sw) if sw < 1 else (math.inf if sb or sw > 1 else 1.0)
    assert lin.q_star == pytest.approx(expected, rel=1e-14)
    leaky = theory.mean_field("leaky_relu", sw, sb, negative_slope=0.2)
    assert leaky.chi_1 == pytest.approx(sw * sw * 1.04 / 2, rel=1e-15)


def test_depth_scale_conventions():
    assert theory.mean_field("linear", 1.0).depth_scale == math.inf
    ordered = theory.mean_field("relu", 1.0)
    assert ordered.depth_scale == pytest.approx(1 / math.log(2))
    chaotic = theory.mean_field("relu", 2.0, 0.1)
    assert chaotic.q_star == math.inf and chaotic.chi_1 == 2.0
    assert chaotic.depth_scale == pytest.approx(-1 / math.log(2))  # negative: explosion
    assert chaotic.lyapunov_exponent == pytest.approx(0.5 * math.log(2))
    assert theory.mean_field("tanh", 0.0, 0.5).depth_scale == 0.0


def test_unbounded_activations_diverge_like_relu():
    for name in ("elu", "gelu", "silu", "softplus"):
        mf = theory.mean_field(name, 1.6, 0.2)
        assert mf.q_star == math.inf
        assert mf.chi_1 == pytest.approx(1.6**2 / 2, rel=1e-12)


def test_correlation_fixed_point():
    ordered = theory.mean_field("tanh", 1.3, 0.3)
    assert ordered.c_star == 1.0 and ordered.correlation_depth_scale == ordered.depth_scale
    chaotic = theory.mean_field("tanh", 1.5, 0.3)
    assert chaotic.phase == "chaotic"
    assert 0 < chaotic.c_star < 1 and 0 < chaotic.chi_c < 1
    assert theory.correlation_map(chaotic.c_star, "tanh", 1.5, 0.3) == pytest.approx(
        chaotic.c_star, abs=1e-12
    )
    assert theory.correlation_map(1.0, "tanh", 1.5, 0.3) == pytest.approx(1.0, rel=1e-14)
    # odd activation without bias: c* = 0
    assert theory.mean_field("tanh", 1.5, 0.0).c_star == pytest.approx(0.0, abs=1e-12)
    # relu's map is the normalised arc-cosine kernel at q* (ordered, finite q*)
    q = theory.mean_field("relu", 1.2, 0.5).q_star
    t = math.acos(0.3)
    k = q * (math.sin(t) + (math.pi - t) * 0.3) / (2 * math.pi)
    assert theory.correlation_map(0.3, "relu", 1.2, 0.5) == pytest.approx(
        (1.44 * k + 0.25) / q, rel=1e-9
    )


# --- rounding at the order-to-chaos boundary ----------------------------------------


def test_he_point_is_marginal():
    """sigma_w = math.sqrt(2) squares to 2 + 2**-51: relu's chi_1 is 1 + 2**-52, within the
    8 ulps that count as exactly 1. The chain is marginal: q* is the first layer's
    variance without bias (it was inf), and grows without bound (linearly) with one."""
    he = math.sqrt(2)
    mf = theory.mean_field("relu", he)
    assert mf.chi_1 == 1.0 and mf.length_map_slope == 1.0
    assert mf.q_star == pytest.approx(2.0, rel=1e-15)
    assert mf.depth_scale == math.inf and mf.phase == "critical"
    assert mf.lyapunov_exponent == 0.0
    biased = theory.mean_field("relu", he, 0.1)
    assert biased.q_star == math.inf and biased.chi_1 == 1.0 and biased.depth_scale == math.inf
    assert theory.chi(3.0, "relu", he) == 1.0
    assert theory.rnn_max_lyapunov_meanfield(he, activation="relu") == 0.0
    p = theory.predicted_grad_norms(10**6, "relu", he, 0.1)
    assert not p.log10_activation_grad_norms.any() and not p.log10_chi.any()
    np.testing.assert_allclose(p.q[[0, -1]], [2.01, 2 + 0.01 * 10**6], rtol=1e-12)
    s = theory.critical_sigma_w("leaky_relu", negative_slope=0.3)
    lk = theory.mean_field("leaky_relu", s, negative_slope=0.3)
    assert lk.chi_1 == 1.0 and lk.depth_scale == math.inf and math.isfinite(lk.q_star)
    # 1e-14 away from the boundary is a real (slow) explosion, not rounding
    off = theory.mean_field("relu", he * (1 + 1e-14), 0.1)
    assert off.chi_1 > 1.0 and -1e15 < off.depth_scale < -1e13


def test_homogeneous_variances_near_the_boundary_are_accurate():
    """q_l = a**(l-1) q_1 + sigma_b**2 (a**(l-1) - 1) / (a - 1) with a = 1 + 2e-12: the
    geometric sum through expm1/log1p, against exact rational arithmetic (the quotient
    of differences lost 4 digits)."""
    from fractions import Fraction

    sw = math.sqrt(2 * (1 + 2e-12))
    p = theory.predicted_grad_norms(1000, "relu", sw, 0.5, q0=0.0)
    a, sb2 = Fraction(sw) ** 2 / 2, Fraction(0.5) ** 2
    q = [sb2]
    for _ in range(999):
        q.append(a * q[-1] + sb2)
    np.testing.assert_allclose(p.q, [float(x) for x in q], rtol=1e-13)


# --- order-to-chaos boundary --------------------------------------------------------


def test_boundary_closed_forms():
    assert theory.critical_sigma_w("tanh", 0.0) == pytest.approx(1.0, abs=1e-10)
    assert theory.critical_sigma_w("relu", 0.7) == math.sqrt(2)
    assert theory.critical_sigma_w("leaky_relu", 0.0, negative_slope=0.5) == pytest.approx(
        math.sqrt(2 / 1.25)
    )
    assert theory.critical_sigma_w("linear", 0.3) == 1.0
    # softplus' = sigmoid < 1 ... chi_1 < sigma_w**2 / 2 at any finite q*: the boundary is
    # the divergence of q* at sigma_w**2 = 2.
    assert theory.critical_sigma_w("softplus", 0.3) == pytest.approx(math.sqrt(2), rel=1e-10)


@pytest.mark.parametrize("sb", [0.1, 0.5, 1.0])
def test_tanh_boundary_against_trapezoid(sb):
    sw = theory.critical_sigma_w("tanh", sb)
    q = theory.mean_field("tanh", sw, sb, correlation=False).q_star
    assert reference_chi_at_fixed_point("tanh", sw, sb, q) == pytest.approx(1.0, abs=1e-12)


def test_boundary_curve():
    b = theory.order_chaos_boundary("tanh", [0.0, 0.2, 0.5, 1.0])
    assert b.sigma_w[0] == pytest.approx(1.0, abs=1e-9)
    assert np.all(np.diff(b.sigma_w) > 0)
    for sb, sw in zip(b.sigma_b, b.sigma_w):
        assert theory.mean_field("tanh", sw, sb, correlation=False).chi_1 == pytest.approx(
            1.0, abs=1e-9
        )
    np.testing.assert_allclose(b.sigma_w2, b.sigma_w**2)
    json.dumps(b.to_dict())
    assert "sigma_w^2" in b.table()
    assert theory.order_chaos_boundary("tanh").sigma_b.shape == (11,)


def test_boundary_jump_is_reported():
    # gelu without bias: q_l decays to 0 (chi_1 = sigma_w**2/4) or grows without bound
    # (chi_1 = sigma_w**2/2) depending on the input scale; chi_1 jumps across 1.
    with pytest.raises(theory.ConvergenceError, match="jumps across 1"):
        theory.critical_sigma_w("gelu", 0.0)
    b = theory.order_chaos_boundary("gelu", [0.0, 0.5])
    assert math.isnan(b.sigma_w[0]) and b.sigma_w[1] == pytest.approx(1.3998682164, rel=1e-8)


# --- predicted gradient norms -------------------------------------------------------


@pytest.mark.parametrize(
    "name, factor", [("relu", 0.5), ("linear", 1.0), ("leaky_relu", 0.5 * 1.04)]
)
def test_predicted_norms_homogeneous(name, factor):
    L, sw, sb = 1000, 1.3, 0.2
    p = theory.predicted_grad_norms(L, name, sw, sb, q0=2.0, negative_slope=0.2)
    chi_1 = sw * sw * factor
    expected = (L - np.arange(L + 1)) * math.log10(chi_1) / 2  # norms: half the squared
    np.testing.assert_allclose(p.log10_activation_grad_norms, expected, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(
        p.log10_activation_grad_sq_norms, 2 * expected, rtol=1e-14, atol=1e-14
    )
    a = sw * sw * (1.04 / 2 if name == "leaky_relu" else factor)
    q = [sw * sw * 2.0 + sb * sb]
    for _ in range(L - 1):
        q.append(a * q[-1] + sb * sb)
    np.testing.assert_allclose(p.q, q, rtol=1e-12)


def test_predicted_norms_relu_million_layers():
    p = theory.predicted_grad_norms(10**6, "relu", 1.0)
    assert p.log10_activation_grad_norms[0] == pytest.approx(10**6 * math.log10(0.5) / 2, rel=1e-14)
    assert p.q[-1] == 0.0 and np.isfinite(p.log10_activation_grad_norms).all()


def per_layer_loop(L, name, sw, sb, q0):
    """The definition, layer by layer through the public maps."""
    q, lc = sw * sw * q0 + sb * sb, []
    for _ in range(L):
        lc.append(math.log10(theory.chi(q, name, sw)))
        q = theory.length_map(q, name, sw, sb)
    return 0.5 * np.concatenate((np.cumsum(lc[::-1])[::-1], [0.0]))


@pytest.mark.parametrize(
    "name, sw, sb, q0",
    [("tanh", 1.3, 0.2, 5.0), ("sigmoid", 3.0, 0.5, 0.1), ("elu", 1.2, 0.0, 1.0)],
)
def test_predicted_norms_match_definition(name, sw, sb, q0):
    L = 600
    p = theory.predicted_grad_norms(L, name, sw, sb, q0=q0)
    assert p.iterated_layers < L  # the rest was filled in closed form
    np.testing.assert_allclose(
        p.log10_activation_grad_norms, per_layer_loop(L, name, sw, sb, q0), rtol=1e-12, atol=1e-11
    )
    assert p.log10_activation_grad_norms[-1] == 0.0


def test_predicted_norms_deep_and_fast():
    mf = theory.mean_field("tanh", 1.3, 0.2, correlation=False)
    p = theory.predicted_grad_norms(
        10**6, "tanh", 1.3, 0.2, q0=(mf.q_star - 0.04) / 1.69
    )  # starts at q*
    assert p.iterated_layers < 100
    np.testing.assert_allclose(p.q[-1], mf.q_star, rtol=1e-13)
    assert p.log10_activation_grad_norms[0] == pytest.approx(
        10**6 * math.log10(mf.chi_1) / 2, rel=1e-11
    )
    np.testing.assert_allclose(
        np.diff(p.log10_activation_grad_norms), -math.log10(mf.chi_1) / 2, rtol=1e-10
    )


def test_critical_tanh_gradients_decay_as_a_power():
    # sigma_w = 1, sigma_b = 0: q_l ~ 1/(2l), chi(q_l) ~ 1 - 1/l, so squared norms fall as 1/L.
    p = theory.predicted_grad_norms(4000, "tanh", 1.0, 0.0)
    sq = p.log10_activation_grad_sq_norms
    slope = ((sq[0] - sq[4000]) - (sq[0] - sq[1000])) / math.log10(4)
    assert slope == pytest.approx(-1.0, abs=0.02)
    np.testing.assert_allclose(p.q[999], 1 / 2000, rtol=0.02)


@pytest.mark.parametrize("name, sw, sb, depth", [("sigmoid", 3.0, 0.5, 20), ("tanh", 0.9, 0.0, 60)])
def test_predicted_norms_against_simulation(gc, name, sw, sb, depth):
    """A width-512 chain: mean field holds to about 0.1 decades over 3 to 6 decades."""
    p = theory.predicted_grad_norms(depth, name, sw, sb, q0=1.0)
    assert p.log10_activation_grad_norms[0] < -3
    net = gc.MLP(
        depth=depth, width=512, activation=name, init="normal", sigma_w=sw, bias_std=sb, seed=3
    )
    rng = np.random.default_rng(3)
    rep = net.backward(rng.standard_normal((8, 512)), grad_output=rng.standard_normal((8, 512)))
    sim = rep.log10_activation_grad_norms - rep.log10_activation_grad_norms[-1]
    np.testing.assert_allclose(sim, p.log10_activation_grad_norms, atol=0.3)


def test_prediction_result_object():
    p = theory.predicted_grad_norms(50, "tanh", 1.1, 0.1)
    assert p.depth == 50 and p.q.shape == (50,) and p.log10_chi.shape == (50,)
    assert p.log10_activation_grad_norms.shape == (51,)
    np.testing.assert_allclose(p.activation_grad_norms, 10**p.log10_activation_grad_norms)
    json.dumps(p.to_dict())
    assert "layer" in p.table()
    with pytest.raises(ValueError):
        p.q[0] = 1.0  # read-only


# --- recurrent nets -------------------------------------------------------------------


def test_rnn_lyapunov_closed_form():
    for sw in (0.5, 0.9):
        assert theory.rnn_max_lyapunov_meanfield(sw) == pytest.approx(math.log(sw), rel=1e-14)
    assert theory.rnn_max_lyapunov_meanfield(1.2) > 0
    mf = theory.mean_field("tanh", 1.7, 0.2)
    assert theory.rnn_max_lyapunov_meanfield(1.7, 0.2) == pytest.approx(0.5 * math.log(mf.chi_1))


@pytest.mark.parametrize("sw, sb", [(2.0, 0.0), (1.5, 0.3)])
def test_rnn_lyapunov_against_simulation(sw, sb):
    n, steps, burn = 400, 600, 100
    rng = np.random.default_rng(1)
    W = rng.standard_normal((n, n)) * sw / math.sqrt(n)
    b = rng.standard_normal(n) * sb
    h, v = rng.standard_normal(n), rng.standard_normal(n)
    total = 0.0
    for t in range(steps):
        h = np.tanh(W @ h + b)
        v = (1 - h * h) * (W @ v)
        nv = np.linalg.norm(v)
        v /= nv
        total += math.log(nv) if t >= burn else 0.0
    assert total / (steps - burn) == pytest.approx(
        theory.rnn_max_lyapunov_meanfield(sw, sb), abs=0.02
    )


# --- digamma / trigamma ---------------------------------------------------------------


def digamma_asymptotic(x):
    """psi(x) by upward recurrence to x + 30 and the asymptotic series there."""
    shift = sum(1 / (x + j) for j in range(30))
    y = x + 30
    return math.log(y) - 1 / (2 * y) - 1 / (12 * y**2) + 1 / (120 * y**4) - 1 / (252 * y**6) - shift


def test_digamma_closed_forms():
    psi = theory._digamma_halves(400)  # psi(k/2), k = 1..400
    assert psi[1] == pytest.approx(-GAMMA, abs=1e-16)  # psi(1)
    assert psi[0] == pytest.approx(-GAMMA - 2 * math.log(2), abs=1e-15)  # psi(1/2)
    for k in (1, 2, 3, 7, 50, 399, 400):
        assert psi[k - 1] == pytest.approx(digamma_asymptotic(k / 2), rel=1e-13, abs=1e-14)
    np.testing.assert_allclose(
        psi[2:] - psi[:-2], 2 / np.arange(1, 399), rtol=1e-13
    )  # psi(x+1) - psi(x) = 1/x


def test_trigamma_closed_forms():
    t = theory._trigamma_halves(300)
    assert t[1] == pytest.approx(math.pi**2 / 6, rel=1e-15)
    assert t[0] == pytest.approx(math.pi**2 / 2, rel=1e-15)
    for m in (1, 2, 5, 20):
        assert t[2 * m - 1] == pytest.approx(
            math.pi**2 / 6 - sum(1 / j**2 for j in range(1, m)), rel=1e-14
        )
        assert t[2 * m] == pytest.approx(
            math.pi**2 / 2 - 4 * sum(1 / (2 * j - 1) ** 2 for j in range(1, m + 1)), rel=1e-14
        )
    np.testing.assert_allclose(t[:-2] - t[2:], 4 / np.arange(1, 299) ** 2, rtol=1e-12)
    assert t[-1] == pytest.approx(1 / 150 + 1 / (2 * 150**2) + 1 / (6 * 150**3), rel=1e-10)


# --- random matrices ------------------------------------------------------------------


def test_newman_spectrum_limits():
    lam = theory.gaussian_lyapunov_spectrum(100_000)
    assert lam[0] == pytest.approx(-1 / (2 * 100_000), rel=1e-3)  # lambda_1 -> 0 like -1/(2n)
    assert np.all(np.diff(theory.gaussian_lyapunov_spectrum(50)) < 0)
    np.testing.assert_allclose(
        theory.gaussian_lyapunov_spectrum(20, 3.0),
        theory.gaussian_lyapunov_spectrum(20) + math.log(3.0),
        rtol=1e-15,
    )
    # n = 1: E ln|w| for w ~ N(0, 1) is -(gamma + ln 2) / 2
    assert theory.gaussian_lyapunov_spectrum(1)[0] == pytest.approx(
        -(GAMMA + math.log(2)) / 2, rel=1e-15
    )


def test_newman_sum_is_log_det():
    rng = np.random.default_rng(5)
    n, samples = 6, 40_000
    _, logdet = np.linalg.slogdet(rng.standard_normal((samples, n, n)) / math.sqrt(n))
    se = logdet.std() / math.sqrt(samples)
    assert theory.gaussian_lyapunov_spectrum(n).sum() == pytest.approx(logdet.mean(), abs=4 * se)


@pytest.mark.parametrize("n", [16, 32])
def test_newman_spectrum_from_qr_simulation(n):
    depth, sigma = 300, 1.3
    rng = np.random.default_rng(n)
    Q = np.eye(n)
    logs = np.empty((depth, n))
    for t in range(depth):
        Q, R = np.linalg.qr(rng.standard_normal((n, n)) * (sigma / math.sqrt(n)) @ Q)
        logs[t] = np.log(np.abs(np.diag(R)))
    est = logs.mean(axis=0)
    se = theory.gaussian_lyapunov_stderr(n, depth)
    z = (est - theory.gaussian_lyapunov_spectrum(n, sigma)) / se
    assert np.abs(z).max() < 4
    assert np.mean(z * z) == pytest.approx(1.0, abs=0.5)  # the stderr is the right size
    # per-step variance of 0.5 ln R_ii**2 is psi'((n-i+1)/2)/4
    ratio = logs.var(axis=0, ddof=1) / (se**2 * depth)
    assert ratio.mean() == pytest.approx(1.0, abs=0.1)


def test_fuss_catalan_numbers():
    np.testing.assert_array_equal(theory.fuss_catalan_moments(1, 4), [1, 2, 5, 14])  # Catalan
    np.testing.assert_array_equal(theory.fuss_catalan_moments(2, 4), [1, 3, 12, 55])
    for L in (1, 7, 10**6):
        assert theory.fuss_catalan_moments(L)[1] == L + 1
    assert theory.fuss_catalan_moments(10**6, 200)[-1] == math.inf


def test_finite_width_second_moment_exact():
    assert theory.gaussian_product_moments(1, 10)[1] == pytest.approx(
        2 + 1 / 10, rel=1e-15
    )  # Wishart
    assert theory.gaussian_product_moments(5, 1)[1] == pytest.approx(
        3.0**5, rel=1e-15
    )  # E w**4 = 3
    m = theory.gaussian_product_moments(3, 10**9)
    assert m[0] == 1.0 and m[1] == pytest.approx(
        4 + 12 / (2 * 10**9), rel=1e-15
    )  # L + 1 + L(L+1)/(2n)
    # Monte Carlo at n = 4, L = 3: many small products
    rng = np.random.default_rng(11)
    n, L, samples = 4, 3, 200_000
    M = np.broadcast_to(np.eye(n), (samples, n, n))
    for _ in range(L):
        M = rng.standard_normal((samples, n, n)) / math.sqrt(n) @ M
    A = M @ np.swapaxes(M, 1, 2)
    m1 = np.trace(A, axis1=1, axis2=2) / n
    m2 = np.einsum("sij,sji->s", A, A) / n
    exact = theory.gaussian_product_moments(L, n)
    assert m1.mean() == pytest.approx(exact[0], abs=5 * m1.std() / math.sqrt(samples))
    assert m2.mean() == pytest.approx(exact[1], abs=5 * m2.std() / math.sqrt(samples))


def test_fuss_catalan_from_simulation():
    """Width 200: the second moment is L + 1 up to the finite-width term L (L+1) / (2n)."""
    rng = np.random.default_rng(2)
    n, L = 200, 3
    vals = []
    for _ in range(6):
        M = np.eye(n)
        for _ in range(L):
            M = rng.standard_normal((n, n)) / math.sqrt(n) @ M
        A = M @ M.T
        vals.append(np.trace(A @ A) / n)
    assert np.mean(vals) == pytest.approx(theory.fuss_catalan_moments(L)[1], rel=0.08)
    se = np.std(vals, ddof=1) / math.sqrt(len(vals))
    assert np.mean(vals) == pytest.approx(theory.gaussian_product_moments(L, n)[1], abs=4 * se)


def test_scalar_chain():
    s = theory.scalar_chain(0.9, 100)
    assert s.log10_abs_gain == pytest.approx(100 * math.log10(0.9))
    assert s.log10_abs_weight_grad == pytest.approx(99 * math.log10(0.9))
    np.testing.assert_allclose(
        s.log10_activation_grad_norms, (100 - np.arange(101)) * math.log10(0.9)
    )
    assert (
        theory.scalar_chain(-2.0, 3).gain_sign == -1.0
        and theory.scalar_chain(-2.0, 4).gain_sign == 1.0
    )
    z = theory.scalar_chain(0.0, 5)
    assert z.log10_abs_gain == -math.inf and z.log10_activation_grad_norms[-1] == 0.0
    json.dumps(z.to_dict())
    assert theory.scalar_chain(10.0, 10**6).log10_abs_gain == 10**6


# --- normalization and residual blocks ----------------------------------------------
#
# Simulations with the NumPy chain of tests/oracles.py. Each draws K independent chains
# (replicas), computes one statistic per replica whose expectation is the predicted
# quantity, and compares the mean with the prediction in units of its standard error
# (sample standard deviation over the replicas / sqrt(K)); widths are large enough that the
# O(1/width) corrections to mean field stay below one standard error.


def assert_reproduces(samples, predicted, what):
    """The mean of the replicas within 3 standard errors of the prediction, and the standard
    error small enough that a prediction 10% off either way is more than 3 away."""
    samples = np.asarray(samples, dtype=np.float64)
    mean = samples.mean()
    se = samples.std(ddof=1) / math.sqrt(samples.size)
    z = (mean - predicted) / se
    assert abs(z) < 3, f"{what}: measured {mean:.5g} +- {se:.2g}, predicted {predicted:.5g}"
    for wrong in (1.1 * predicted, predicted / 1.1):
        assert abs(mean - wrong) > 3 * se, f"{what}: {se:.2g} cannot tell {wrong:.5g} apart"


def linear_spec(rng, n_out, n_in, sigma_w=1.0, sigma_b=0.0):
    W = rng.standard_normal((n_out, n_in)) * (sigma_w / math.sqrt(n_in))
    return ("linear", W, rng.standard_normal(n_out) * sigma_b if sigma_b else None)


def batchnorm_chain(rng, depth, width, activation):
    """[Linear (no bias), BatchNorm (train), activation] * depth: 3 specs per block."""
    out = []
    for _ in range(depth):
        out += [linear_spec(rng, width, width), ("batch_norm",), ("act", activation)]
    return out


def block_ratios(blocks, every, x, g):
    """Ratios ||dL/dh_{l-1}||**2 / ||dL/dh_l||**2 of the batch's squared gradient norms, one
    per block of `every` specs, and the oracle's run."""
    run = oracles.block_chain_backward(blocks, x, g)
    sq = np.array([float((a * a).sum()) for a in run.grads[::every]])
    return sq[:-1] / sq[1:], run


def test_batchnorm_linear_closed_form():
    for B in (4, 5, 8, 100, 10**6):
        mf = theory.batchnorm_mean_field("linear", B)
        assert mf.growth == (B - 2) / (B - 3)
        assert mf.q_star == 1.0 and mf.c_star == -1 / (B - 1)
        # the same through the sphere quadrature: leaky_relu with slope 1 is the identity,
        # evaluated piecewise on both sides of its kink
        q = theory.batchnorm_mean_field("leaky_relu", B, negative_slope=1.0)
        assert q.growth == pytest.approx((B - 2) / (B - 3), rel=1e-13)
        assert q.top_growth == pytest.approx((B - 2) * (B - 1) / (B * (B - 3)), rel=1e-13)
        assert q.c_star == pytest.approx(-1 / (B - 1), rel=1e-12)
    assert theory.batchnorm_mean_field("linear", 8).growth == 1.2  # the 1.2x
    assert theory.batchnorm_mean_field("tanh", 2).growth == 0.0
    assert theory.batchnorm_mean_field("relu", 3).growth == math.inf
    # 10,000 blocks at batch 8: the input's gradient norm is 10**395.9 times the output's
    p = theory.batchnorm_grad_norms(10_000, "linear", 8)
    assert p.log10_activation_grad_norms[0] == pytest.approx(
        0.5 * (9998 * math.log10(1.2) + math.log10(1.05 * 1.2 * 8 / 7)), rel=1e-12
    )


def test_batchnorm_sphere_quadrature():
    """Exact moments of y_1, y_2 (two entries of sqrt(B) times a uniform unit vector with
    zero sum), then the expectations of tanh and relu against Monte Carlo within 4 s.e."""
    for B in (3, 4, 5, 8, 1000, 10**9):
        y, w = theory._sphere_rule(B)
        assert w @ (y * y) == pytest.approx(1.0, rel=1e-14)
        assert w @ y**4 == pytest.approx(3 * (B - 1) / (B + 1), rel=1e-13)
        y1, y2, w2 = theory._sphere_pair_rule(B)
        assert w2 @ (y1 * y2) == pytest.approx(-1 / (B - 1), rel=1e-11)
        assert w2 @ (y1 * y1) == pytest.approx(1.0, rel=1e-14)
    rng = np.random.default_rng(7)
    for B in (5, 8):
        z = rng.standard_normal((200_000, B))
        z -= z.mean(axis=1, keepdims=True)
        y = math.sqrt(B) * z / np.linalg.norm(z, axis=1, keepdims=True)
        for name in ("tanh", "relu"):
            p, d = oracles.act_forward(name, y), oracles.act_derivative(name, y)
            mc = {
                "p2": p[:, 0] ** 2, "pp": p[:, 0] * p[:, 1], "d2": d[:, 0] ** 2,
                "d2y2": (d[:, 0] * y[:, 0]) ** 2, "dd": d[:, 0] * d[:, 1],
                "dydy": d[:, 0] * y[:, 0] * d[:, 1] * y[:, 1],
            }  # fmt: skip
            ours = theory._batch_moments(theory._Act(name), B)
            for k, s in mc.items():
                se = s.std() / math.sqrt(s.size)
                assert abs(ours[k] - s.mean()) < 4 * se, (name, B, k, ours[k], s.mean(), se)


def test_batchnorm_explodes_for_every_activation():
    """growth > 1 at every batch size (Yang et al.: BatchNorm itself causes the explosion),
    decreasing in B towards E[phi'(z)**2] / Var phi(z) >= 1 (Gaussian Poincare): for relu
    pi / (pi - 1)."""
    for name in theory.ACTIVATIONS:
        g = [theory.batchnorm_mean_field(name, B).growth for B in (4, 16, 10**8)]
        assert g[0] > g[1] > g[2] >= 1.0, (name, g)
    assert theory.batchnorm_mean_field("relu", 10**8).growth == pytest.approx(
        math.pi / (math.pi - 1), rel=1e-7
    )
    p2, d2 = trapezoid_moments("tanh", 1.0)  # tanh is odd: Var = E[tanh**2]
    assert theory.batchnorm_mean_field("tanh", 10**8).growth == pytest.approx(d2 / p2, rel=1e-7)


@pytest.mark.parametrize("name, B", [("linear", 8), ("tanh", 8), ("relu", 16), ("gelu", 6)])
def test_batchnorm_growth_against_simulation(name, B):
    """Width 256, 10 blocks, 8 chains: the mean ratio of squared gradient norms across the
    middle blocks (the first divides by the input's deviation, the last sees the raw
    output gradient)."""
    mid = []
    for k in range(8):
        rng = np.random.default_rng(k)
        blocks = batchnorm_chain(rng, 10, 256, name)
        r, _ = block_ratios(
            blocks, 3, rng.standard_normal((B, 256)), rng.standard_normal((B, 256))
        )
        mid.append(r[1:-1].mean())
    assert_reproduces(mid, theory.batchnorm_mean_field(name, B).growth, f"{name} B={B}")


def test_batchnorm_first_and_top_blocks_against_simulation():
    """Two blocks of relu at batch 8: the top one's factor (the output gradient has a
    batch-mean component BatchNorm removes) and the first one's (its BatchNorm divides by
    the input's deviation, 1, not the fixed point's), and the weight gradients."""
    B, n = 8, 256
    p = theory.batchnorm_grad_norms(2, "relu", B, sigma_w=1.5)
    first, top, w1, w2 = [], [], [], []
    for k in range(40):
        rng = np.random.default_rng(100 + k)
        blocks = batchnorm_chain(rng, 2, n, "relu")
        for spec in blocks[::3]:
            spec[1][...] *= 1.5
        g = rng.standard_normal((B, n))
        r, run = block_ratios(blocks, 3, rng.standard_normal((B, n)), g)
        first.append(r[0])
        top.append(r[1])
        gy = float((g * g).sum())
        for out, (inp, grad) in zip((w1, w2), run.linears):
            out.append(float(((grad.T @ inp) ** 2).sum()) / (n * gy))
    chi = 10**p.log10_chi
    assert_reproduces(first, chi[0], "first block")
    assert_reproduces(top, chi[1], "top block")
    assert_reproduces(w1, 10 ** (2 * p.log10_weight_grad_norms[0]), "first weight gradient")
    assert_reproduces(w2, 10 ** (2 * p.log10_weight_grad_norms[1]), "top weight gradient")


def residual_loop(L, name, sw, sb, a, branch, q0):
    """The recursion through the public maps, block by block: q_l = q_{l-1} + a**2 *
    length_map(r_l) and chi_l = 1 + a**2 (1 or sigma_w**2) chi(r_l)."""
    q, lc = [q0], []
    for _ in range(L):
        r = q[-1] if branch == "act_linear" else sw * sw * q[-1] + sb * sb
        inner = 1.0 if branch == "act_linear" else sw * sw
        lc.append(math.log10(1 + a * a * inner * theory.chi(r, name, sw)))
        q.append(q[-1] + a * a * theory.length_map(r, name, sw, sb))
    return np.array(q), np.array(lc)


@pytest.mark.parametrize("branch", ["act_linear", "linear_act_linear"])
@pytest.mark.parametrize(
    "name, sw, sb, a, q0",
    [("tanh", 1.5, 0.3, 1.0, 1.0), ("gelu", 1.2, 0.2, 0.3, 2.0), ("relu", 1.3, 0.4, 0.5, 0.7),
     ("leaky_relu", 0.9, 0.0, 2.0, 1.0), ("linear", 1.0, 0.1, 0.1, 3.0)],
)  # fmt: skip
def test_residual_matches_the_recursion(name, sw, sb, a, q0, branch):
    """Closed forms (relu, leaky_relu, linear, in log space) and the iterated quadrature
    against the definition."""
    L = 60
    p = theory.residual_grad_norms(L, name, sw, sb, scale=a, branch=branch, q0=q0)
    q, lc = residual_loop(L, name, sw, sb, a, branch, q0)
    np.testing.assert_allclose(p.q, q, rtol=1e-12)
    np.testing.assert_allclose(p.log10_chi, lc, rtol=1e-12, atol=1e-15)
    g = 0.5 * np.concatenate((np.cumsum(lc[::-1])[::-1], [0.0]))
    np.testing.assert_allclose(p.log10_activation_grad_norms, g, rtol=1e-12, atol=1e-13)
    assert p.iterated_layers == (0 if name in ("relu", "leaky_relu", "linear") else L)


def test_residual_branch_scale_keeps_norms_bounded():
    """relu without bias, a = 1/sqrt(L): q_L / q_0 and the squared gradient ratio are both
    (1 + sigma_w**2 / (2L))**L, bounded by exp(sigma_w**2 / 2) at any depth; with a = 1
    they grow as (1 + sigma_w**2 / 2)**L."""
    for L in (10, 1000, 10**6):
        p = theory.residual_grad_norms(L, "relu", 1.4, scale=L**-0.5)
        expected = L * math.log1p(1.4 * 1.4 / (2 * L)) / math.log(10)
        assert math.log10(p.q[-1]) == pytest.approx(expected, rel=1e-12)
        assert 2 * p.log10_activation_grad_norms[0] == pytest.approx(expected, rel=1e-12)
        assert expected < 0.98 / math.log(10)
    p = theory.residual_grad_norms(10**6, "relu", 1.4)
    assert p.log10_activation_grad_norms[0] == pytest.approx(
        0.5 * 10**6 * math.log10(1.98), rel=1e-12
    )
    assert p.q[-1] == math.inf  # 10**148,000: beyond the float range, as documented
    # tanh: q_l grows linearly (E[tanh**2] -> 1), chi_l - 1 ~ 1/sqrt(l), so the log of the
    # gradient ratio grows like sqrt(L)
    t = theory.residual_grad_norms(4000, "tanh", 1.0)
    assert 0.9 * 4000 < t.q[-1] < 4000
    g = t.log10_activation_grad_norms
    assert (g[1000] - g[4000]) / (g[250] - g[1000]) == pytest.approx(
        (math.sqrt(4000) - math.sqrt(1000)) / (math.sqrt(1000) - math.sqrt(250)), rel=0.05
    )


def residual_chain(rng, L, n, name, sw, sb, a, branch):
    blocks = []
    for _ in range(L):
        if branch == "act_linear":
            body = [("act", name), linear_spec(rng, n, n, sw, sb)]
        else:
            body = [linear_spec(rng, n, n, sw, sb), ("act", name), linear_spec(rng, n, n, sw, sb)]
        blocks.append(("residual", body, a))
    return blocks


@pytest.mark.parametrize(
    "name, sw, sb, a, L, branch",
    [("relu", 1.0, 0.0, 16**-0.5, 16, "act_linear"), ("tanh", 1.5, 0.3, 1.0, 12, "act_linear"),
     ("gelu", 1.2, 0.2, 0.5, 6, "linear_act_linear")],
)  # fmt: skip
def test_residual_against_simulation(name, sw, sb, a, L, branch):
    """Width 256, batch 32, 8 chains: q_L (mean square of h_L), the mean per-block ratio of
    squared gradient norms, and the last branch weight's gradient."""
    n, B = 256, 32
    p = theory.residual_grad_norms(L, name, sw, sb, scale=a, branch=branch)
    qL, ratio, w = [], [], []
    for k in range(8):
        rng = np.random.default_rng(300 + k)
        blocks = residual_chain(rng, L, n, name, sw, sb, a, branch)
        g = rng.standard_normal((B, n))
        r, run = block_ratios(blocks, 1, rng.standard_normal((B, n)), g)
        ratio.append(r.mean())
        qL.append(float((run.h[-1] ** 2).mean()))
        inp, grad = run.linears[-1]  # per example: ||g_b x_b^T|| = |g_b| |x_b|
        w.append(float(((grad * grad).sum(1) * (inp * inp).sum(1)).sum()) / (n * (g * g).sum()))
    assert_reproduces(qL, p.q[-1], "q_L")
    assert_reproduces(ratio, float(np.mean(10**p.log10_chi)), "per-block factor")
    assert_reproduces(w, 10 ** (2 * p.log10_weight_grad_norms[-1]), "last weight gradient")


def test_residual_chain_of_the_core_against_theory():
    """gradchain's own chain of blocks (the core's Residual, Activation and Linear, exact in
    log space): 500 relu blocks x + a W relu(x), a = 1/sqrt(500), sigma_w = 1, width
    64, 10 chains. log10 of the squared gradient ratio from output to input and q_L / q_0,
    both (1 + a**2 sigma_w**2 / 2)**L in mean field."""
    from gradchain import _core

    n, L, B, sw = 64, 500, 16, 1.0
    a = L**-0.5
    act = {"kind": "activation", "width": n, "activation": "relu", "negative_slope": 0.01,
           "alpha": 1.0}  # fmt: skip
    lin = {"kind": "linear", "in_features": n, "out_features": n, "bias": False}
    specs = [{"kind": "residual", "body": [act, lin], "scale": a, "shortcut": None}] * L
    log_ratio, growth = [], []
    for seed in range(10):
        chain = _core.Chain64(specs)
        chain.init("normal", 1.0, sw, 0.0, seed)
        rng = np.random.default_rng(seed)
        x, g = rng.standard_normal((B, n)), rng.standard_normal((B, n))
        d = chain.backward(x, "grad_output", g, False, math.nan, 2.0, True)
        b = d["log10_boundary_grad_norms"]
        log_ratio.append(2 * (b[0] - b[-1]))
        growth.append(float((d["output"] ** 2).mean() / (x * x).mean()))
    p = theory.residual_grad_norms(L, "relu", sw, scale=a)
    expected = L * math.log1p(a * a * sw * sw / 2) / math.log(10)
    assert 2 * p.log10_activation_grad_norms[0] == pytest.approx(expected, rel=1e-12)
    # in log10, a 10% error in the squared ratio is log10(1.1) either way
    mean, se = np.mean(log_ratio), np.std(log_ratio, ddof=1) / math.sqrt(len(log_ratio))
    assert abs(mean - expected) < 3 * se
    assert min(abs(mean - expected - d) for d in (0.0414, -0.0414)) > 3 * se
    assert_reproduces(growth, p.q[-1], "q_L / q_0")


def norm_position_chain(rng, L, d, name, sw, sb, a, position):
    """Residual MLP blocks with LayerNorm before the branch (and a final one) or after the
    sum; hidden width d."""
    blocks = []
    for _ in range(L):
        body = [linear_spec(rng, d, d, sw, sb), ("act", name), linear_spec(rng, d, d, sw, sb)]
        if position == "pre":
            blocks.append(("residual", [("layer_norm",), *body], a))
        else:
            blocks += [("residual", body, a), ("layer_norm",)]
    return [*blocks, ("layer_norm",)] if position == "pre" else blocks


def test_norm_position_closed_forms():
    """relu without bias (Xiong et al.'s FFN), a = 1: v = x = 1/2, so the last block's
    squared weight gradient per fan_in is 1 / (2 + L) pre-LN and 1/3 post-LN, and both
    chains carry gradients level (pre-LN's telescopes to 1/q0 at the input)."""
    for L in (1, 4, 64, 10**6):
        pre = theory.norm_position_grad_norms(L, position="pre")
        post = theory.norm_position_grad_norms(L, position="post")
        assert 10 ** (2 * pre.log10_weight_grad_norms[-1]) == pytest.approx(1 / (2 + L))
        assert 10 ** (2 * post.log10_weight_grad_norms[-1]) == pytest.approx(1 / 3)
        assert pre.q[-1] == pytest.approx(1 + L / 2) and post.q[-1] == 1.0
        assert pre.log10_activation_grad_norms[0] == pytest.approx(0.0, abs=1e-9)
        np.testing.assert_allclose(post.log10_activation_grad_norms, 0.0, atol=1e-12)
    pre = theory.norm_position_grad_norms(100, "relu", q0=4.0)
    assert pre.log10_activation_grad_norms[0] == pytest.approx(-0.5 * math.log10(4.0))
    # post-LN: going down, gradients shrink where the branch adds more variance than gain
    # (relu with bias: v = 2, x = 1/2 at sigma_w = sigma_b = 1) and grow where it adds less
    assert theory.norm_position_grad_norms(5, "relu", 1.0, 1.0, position="post").log10_chi[
        1
    ] == pytest.approx(math.log10(1.5 / 3.0))
    assert theory.norm_position_grad_norms(5, "tanh", 1.5, position="post").log10_chi[1] > 0


@pytest.mark.parametrize("position", ["pre", "post"])
@pytest.mark.parametrize(
    "name, sw, sb, a, q0",
    [("relu", 1.4, 0.0, 1.0, 1.0), ("tanh", 1.5, 0.3, 0.5, 2.0), ("gelu", 1.2, 0.2, 0.3, 0.7)],
)  # fmt: skip
def test_norm_position_act_linear_branch_matches_the_recursion(position, name, sw, sb, a, q0):
    """branch="act_linear" (gc.MLP's own layers, F(x) = W phi(x) + b): phi sees the
    normalized input (variance 1), or for post-LN's first block the input itself (q0); the
    branch adds v = a**2 length_map and gains x = a**2 chi on squared gradients."""
    L = 7
    p = theory.norm_position_grad_norms(L, name, sw, sb, position=position, scale=a, q0=q0,
                                        branch="act_linear")  # fmt: skip
    v, x = a * a * theory.length_map(1.0, name, sw, sb), a * a * theory.chi(1.0, name, sw)
    if position == "pre":
        q = q0 + v * np.arange(L + 1)
        lc = np.log10(1 + x / q[:-1])
        top = -0.5 * math.log10(q[-1])
    else:
        v1, x1 = a * a * theory.length_map(q0, name, sw, sb), a * a * theory.chi(q0, name, sw)
        q = np.ones(L + 1)
        q[0] = q0
        lc = np.full(L, math.log10((1 + x) / (1 + v)))
        lc[0] = math.log10((1 + x1) / (q0 + v1))
        top = 0.0
    np.testing.assert_allclose(p.q, q, rtol=1e-12)
    np.testing.assert_allclose(p.log10_chi, lc, rtol=1e-12, atol=1e-14)
    g = 0.5 * np.concatenate((np.cumsum(lc[::-1])[::-1], [0.0])) + top
    np.testing.assert_allclose(p.log10_activation_grad_norms, g, rtol=1e-12, atol=1e-13)
    # the last block's weight gradient: a sqrt(E[phi(u)**2]) times the gradient at its sum
    var = 1.0 if position == "pre" or L > 1 else q0
    e2 = theory.length_map(var, name, 1.0, 0.0)
    rms = 1.0 if position == "pre" else math.sqrt(1 + v)
    assert 10 ** p.log10_weight_grad_norms[-1] == pytest.approx(
        a * math.sqrt(e2) * 10 ** g[-1] / rms, rel=1e-12)
    two = theory.norm_position_grad_norms(L, name, sw, sb, position=position, scale=a, q0=q0)
    # the default is the two-layer branch
    assert not np.allclose(two.log10_weight_grad_norms, p.log10_weight_grad_norms)


@pytest.mark.parametrize(
    "position, L", [("pre", 1), ("pre", 8), ("post", 1), ("post", 8)]
)
def test_last_weight_gradient_scaling_against_simulation(position, L):
    """Xiong et al.: the last block's weight gradient shrinks as 1/sqrt(L) pre-LN and not
    post-LN (relu, no bias, a = 1: squared per fan_in 1/(2 + L) and 1/3). Width 256, batch
    32 with an independent Gaussian output gradient per example, 20 chains (the examples'
    inputs to the last block are correlated, so the chains, not the examples, average out
    the weights)."""
    B, d = 32, 256
    p = theory.norm_position_grad_norms(L, "relu", position=position)
    w = []
    for k in range(20):
        rng = np.random.default_rng(500 + k)
        blocks = norm_position_chain(rng, L, d, "relu", 1.0, 0.0, 1.0, position)
        g = rng.standard_normal((B, d))
        run = oracles.block_chain_backward(blocks, rng.standard_normal((B, d)), g)
        inp, grad = run.linears[-1]
        w.append(float(((grad * grad).sum(1) * (inp * inp).sum(1)).sum()) / (d * (g * g).sum()))
    assert_reproduces(w, 10 ** (2 * p.log10_weight_grad_norms[-1]), f"{position} L={L}")


@pytest.mark.parametrize(
    "position, name, sw, sb",
    [("post", "relu", 1.0, 1.0), ("post", "tanh", 1.5, 0.0), ("pre", "tanh", 1.5, 0.0),
     ("pre", "gelu", 1.2, 0.3)],
)  # fmt: skip
def test_norm_position_gradients_against_simulation(position, name, sw, sb):
    """The mean per-block ratio of squared gradient norms (2 blocks, width 1024, batch 16,
    8 chains; at width 256 the O(1/width) corrections reach 1%): post-LN relu with bias
    halves squared gradients per block going down, tanh multiplies them by 1.21; pre-LN's
    factors 1 + x / q_{l-1} fall with depth."""
    L, d, B = 2, 1024, 16
    p = theory.norm_position_grad_norms(L, name, sw, sb, position=position)
    ratio = []
    for k in range(8):
        rng = np.random.default_rng(700 + k)
        blocks = norm_position_chain(rng, L, d, name, sw, sb, 1.0, position)
        x, g = rng.standard_normal((B, d)), rng.standard_normal((B, d))
        if position == "pre":  # the boundaries h_0..h_L, before the final LayerNorm
            run = oracles.block_chain_backward(blocks, x, g)
            sq = np.array([float((a * a).sum()) for a in run.grads[:-1]])
            ratio.append(float(np.mean(sq[:-1] / sq[1:])))
        else:
            ratio.append(float(block_ratios(blocks, 2, x, g)[0].mean()))
    assert_reproduces(ratio, float(np.mean(10**p.log10_chi)), f"{position} {name}")


def test_block_chain_oracle_against_torch():
    """The NumPy chain of blocks against autograd (float64): every kind of block, nested."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    n, B = 6, 5
    lin = [linear_spec(rng, n, n, 1.2, 0.3) for _ in range(4)]
    blocks = [
        lin[0], ("batch_norm",), ("act", "tanh"),
        ("residual", [("layer_norm",), lin[1], ("act", "gelu"), lin[2]], 0.7),
        ("scale", 1.5), lin[3], ("layer_norm",),
    ]  # fmt: skip
    x, g = rng.standard_normal((B, n)), rng.standard_normal((B, n))
    run = oracles.block_chain_backward(blocks, x, g, eps=1e-5)
    tl = []
    for _, W, b in lin:
        m = torch.nn.Linear(n, n, dtype=torch.float64)
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(W))
            m.bias.copy_(torch.from_numpy(b))
        tl.append(m)
    bn = torch.nn.BatchNorm1d(n, affine=False, track_running_stats=False, dtype=torch.float64)
    ln = torch.nn.LayerNorm(n, elementwise_affine=False, dtype=torch.float64)
    xt = torch.from_numpy(x).requires_grad_(True)
    h1 = torch.tanh(bn(tl[0](xt)))
    h2 = h1 + 0.7 * tl[2](torch.nn.functional.gelu(tl[1](ln(h1))))
    out = ln(tl[3](1.5 * h2))
    out.backward(torch.from_numpy(g))
    np.testing.assert_allclose(run.output, out.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(run.grads[0], xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    for (inp, grad), m in zip(run.linears, tl):
        np.testing.assert_allclose(grad.T @ inp, m.weight.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_block_prediction_result_objects():
    p = theory.residual_grad_norms(30, "tanh", 1.2, 0.1, scale=0.5)
    assert p.depth == 30 and p.q.shape == (31,) and p.log10_weight_grad_norms.shape == (30,)
    np.testing.assert_allclose(p.activation_grad_norms, 10**p.log10_activation_grad_norms)
    json.dumps(p.to_dict())
    assert "block" in p.table()
    with pytest.raises(ValueError):
        p.q[0] = 1.0  # read-only
    mf = theory.batchnorm_mean_field("relu", 8)
    json.dumps(mf.to_dict())
    assert "growth" in str(mf) and mf.depth_scale < 0
    assert mf.lyapunov_exponent == pytest.approx(0.5 * math.log(mf.growth))


# --- results and errors ---------------------------------------------------------------


def test_mean_field_result_object():
    mf = theory.mean_field("tanh", 1.5, 0.3)
    d = mf.to_dict()
    json.dumps(d)
    assert d["phase"] == "chaotic" and d["activation"] == "tanh"
    json.dumps(theory.mean_field("relu", 2.0, 0.1).to_dict())  # inf and NaN fields
    assert "q_star" in str(mf)
    with pytest.raises(AttributeError):
        mf.chi_1 = 0.0  # frozen


def test_activation_names_match_the_chains(gc):
    assert theory.ACTIVATIONS == gc.ACTIVATIONS


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: theory.mean_field("swish", 1.0), "activation must be one of 'linear'"),
        (lambda: theory.predicted_grad_norms(10, "Tanh", 1.0), "activation must be one of"),
        (lambda: theory.mean_field("tanh", -1.0), r"sigma_w must be between 0 and 1e\+150"),
        (lambda: theory.mean_field("tanh", math.inf), "sigma_w must be finite"),
        (lambda: theory.mean_field("tanh", math.nan), "sigma_w must be finite"),
        (lambda: theory.mean_field("tanh", 1.0, -0.1), r"sigma_b must be between 0 and 1e\+150"),
        (lambda: theory.mean_field("tanh", 1.0, q0=-1.0), r"q0 must be between 0 and 1e\+300"),
        (lambda: theory.mean_field("elu", 1.0, alpha=0.0), "alpha must be > 0"),
        (lambda: theory.predicted_grad_norms(0, "tanh", 1.0), "depth must be a positive integer"),
        (lambda: theory.gaussian_lyapunov_spectrum(0), "n must be a positive integer"),
        (lambda: theory.gaussian_lyapunov_spectrum(4, sigma=0.0), "sigma must be > 0"),
        (lambda: theory.gaussian_lyapunov_stderr(4, -3), "depth must be a positive integer"),
        (lambda: theory.fuss_catalan_moments(3, 0), "k_max must be a positive integer"),
        (lambda: theory.gaussian_product_moments(3, 0), "n must be a positive integer"),
        (lambda: theory.scalar_chain(math.inf, 3), "w must be finite"),
        (lambda: theory.correlation_map(1.5, "tanh", 1.0, 0.1), "c must lie in"),
        (lambda: theory.order_chaos_boundary("tanh", [0.1, -0.2]), "sigma_b must be between 0"),
        (lambda: theory.critical_sigma_w("sigmoid", -1.0), "sigma_b must be between 0"),
        # finite but huge: a ValueError naming the argument, not an OverflowError
        (lambda: theory.mean_field("tanh", 1e300), r"sigma_w must be between 0 and 1e\+150"),
        (lambda: theory.mean_field("relu", 1.0, 1e200), r"sigma_b must be between 0 and 1e\+150"),
        (lambda: theory.mean_field("tanh", 1.0, q0=1e308), r"q0 must be between 0 and 1e\+300"),
        (lambda: theory.length_map(1e308, "tanh", 1.0), r"q must be between 0 and 1e\+300"),
        (lambda: theory.chi(1.0, "gelu", 1e300), "sigma_w must be between"),
        (lambda: theory.correlation_map(0.5, "tanh", 1e300), "sigma_w must be between"),
        (lambda: theory.critical_sigma_w("tanh", 1e300), "sigma_b must be between"),
        (lambda: theory.critical_sigma_w("tanh", 0.1, q0=1e308), "q0 must be between"),
        (lambda: theory.rnn_max_lyapunov_meanfield(1e300), "sigma_w must be between"),
        (lambda: theory.order_chaos_boundary("tanh", [1e300]), "sigma_b must be between"),
        (lambda: theory.predicted_grad_norms(10**30, "tanh", 1.0), "depth must be at most"),
        (lambda: theory.predicted_grad_norms(10, "tanh", 1e100, q0=1e200),
         r"sigma_w\*\*2 \* q0 \+ sigma_b\*\*2 = 1e\+400.*must be at most 1e300"),
        (lambda: theory.mean_field("leaky_relu", 1.0, negative_slope=1e3),
         "negative_slope must be between -100 and 100"),
        (lambda: theory.mean_field("elu", 1.0, alpha=1e200), r"alpha must be between 0 and 1e"),
        (lambda: theory.gaussian_lyapunov_stderr(4, 10**12), "depth must be at most 2147483647"),
        (lambda: theory.order_chaos_boundary("tanh", np.zeros(1001)),
         "sigma_b must have at most 1000 entries"),
        (lambda: theory.correlation_map(0.5, "tanh", 0.0, 0.0, q=1.0),
         "sigma_w=0.0, sigma_b=0.0.*undefined"),
        (lambda: theory.batchnorm_mean_field("tanh", 1),
         "batch must be an integer from 2 to 2147483647; got 1"),
        (lambda: theory.batchnorm_grad_norms(10, "tanh", 8, sigma_w=0.0), "sigma_w must be > 0"),
        (lambda: theory.batchnorm_grad_norms(10, "tanh", 8, q0=0.0), "q0 must be > 0"),
        (lambda: theory.batchnorm_grad_norms(10, "tanh", 2**31), "batch must be an integer"),
        (lambda: theory.residual_grad_norms(10, "tanh", 1.0, branch="mlp"),
         "branch must be one of 'act_linear', 'linear_act_linear'; got 'mlp'"),
        (lambda: theory.residual_grad_norms(10, "tanh", 1.0, scale=1e200),
         r"scale must be between -1e\+150 and 1e\+150"),
        (lambda: theory.residual_grad_norms(10, "tanh", 1.0, q0=math.inf), "q0 must be finite"),
        (lambda: theory.norm_position_grad_norms(10, position="middle"),
         "position must be one of 'pre', 'post'"),
        (lambda: theory.norm_position_grad_norms(10, "tanh", 1e150, 1e150),
         r"sigma_w\*\*2 \+ sigma_b\*\*2 = 2e\+300.*at most 1e300"),
        (lambda: theory.norm_position_grad_norms(10, q0=0.0), "q0 must be > 0"),
        (lambda: theory.norm_position_grad_norms(10, "relu", 1e100, position="post", q0=1e200),
         r"sigma_w\*\*2 \* q0 \+ sigma_b\*\*2 = 1e\+400"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_argument_types():
    with pytest.raises(TypeError, match="depth"):
        theory.predicted_grad_norms(2.5, "tanh", 1.0)
    with pytest.raises(TypeError, match="n must be a positive integer"):
        theory.gaussian_lyapunov_spectrum(True)
    with pytest.raises(TypeError, match="sigma_w"):
        theory.mean_field("tanh", "1.0")


# --- every public function over its whole argument space -------------------------------

_MAG = st.floats(-300.0, 300.0).map(lambda e: 10.0**e)  # log-uniform over 1e-300..1e300
REALS = st.one_of(
    _MAG,
    _MAG.map(lambda x: -x),
    st.floats(-4.0, 4.0),
    st.sampled_from([0.0, 1.0, 2.0, 1e150, 1e300, 1.7e308, 5e-324, -1.0, math.nan, math.inf,
                     -math.inf]),
)  # fmt: skip
INTS = st.one_of(
    st.integers(0, 12).flatmap(lambda e: st.integers(0, 10**e)),  # 0..1e12, log-spread
    st.integers(-5, 0),
)
REAL_ARRAYS = st.lists(REALS, min_size=0, max_size=3)

# The arguments of every public theory function, by kind.
SIGNATURES = {
    "length_map": {"q": REALS, "sigma_w": REALS, "sigma_b": REALS},
    "chi": {"q": REALS, "sigma_w": REALS},
    "mean_field": {"sigma_w": REALS, "sigma_b": REALS, "q0": REALS, "correlation": st.booleans()},
    "correlation_map": {"c": REALS, "sigma_w": REALS, "sigma_b": REALS,
                        "q": st.one_of(st.none(), REALS)},
    "critical_sigma_w": {"sigma_b": REALS, "q0": REALS, "rtol": REALS},
    "order_chaos_boundary": {"sigma_b": REAL_ARRAYS, "q0": REALS, "rtol": REALS},
    "predicted_grad_norms": {"depth": INTS, "sigma_w": REALS, "sigma_b": REALS, "q0": REALS},
    "rnn_max_lyapunov_meanfield": {"sigma_w": REALS, "sigma_b": REALS, "q0": REALS},
    "gaussian_lyapunov_spectrum": {"n": INTS, "sigma": REALS},
    "gaussian_lyapunov_stderr": {"n": INTS, "depth": INTS},
    "fuss_catalan_moments": {"depth": INTS, "k_max": INTS},
    "gaussian_product_moments": {"depth": INTS, "n": INTS},
    "scalar_chain": {"w": REALS, "depth": INTS},
    "batchnorm_mean_field": {"batch": INTS},
    "batchnorm_grad_norms": {"depth": INTS, "batch": INTS, "sigma_w": REALS, "q0": REALS},
    "residual_grad_norms": {"depth": INTS, "sigma_w": REALS, "sigma_b": REALS, "scale": REALS,
                            "q0": REALS,
                            "branch": st.sampled_from(["act_linear", "linear_act_linear", "x"])},
    "norm_position_grad_norms": {"depth": INTS, "sigma_w": REALS, "sigma_b": REALS,
                                 "scale": REALS, "q0": REALS,
                                 "position": st.sampled_from(["pre", "post", "mid"])},
}  # fmt: skip
_WITHOUT_ACTIVATION = (
    "gaussian_lyapunov_spectrum",
    "gaussian_lyapunov_stderr",
    "fuss_catalan_moments",
    "gaussian_product_moments",
    "scalar_chain",
)


def _no_nan(value, what):
    arr = np.asarray(value, dtype=np.float64)
    assert not np.isnan(arr).any(), f"{what} has NaN: {value!r}"


def _check_result(name, out, kwargs):
    """Finite results, or the infinities and NaNs the docstrings promise."""
    if name in ("length_map", "chi"):
        assert out >= 0.0, out  # +inf where it exceeds the float range
    elif name == "correlation_map":
        assert math.isfinite(out) and abs(out) <= 1.0 + 1e-9, out
    elif name == "critical_sigma_w":
        assert math.isfinite(out) and out > 0, out
    elif name == "rnn_max_lyapunov_meanfield":
        _no_nan(out, name)
    elif name == "mean_field":
        assert 0.0 <= out.q_star <= math.inf and 0.0 <= out.chi_1 <= math.inf, out
        for f in ("depth_scale", "length_map_slope", "length_depth_scale", "lyapunov_exponent"):
            _no_nan(getattr(out, f), f)
        if kwargs["correlation"] and 0.0 < out.q_star < math.inf:
            assert -1.0 <= out.c_star <= 1.0 and not math.isnan(out.chi_c), out
        json.dumps(out.to_dict())
    elif name == "order_chaos_boundary":
        assert np.array_equal(np.isnan(out.sigma_w), np.isnan(out.q_star)), out
        assert (out.sigma_w[~np.isnan(out.sigma_w)] > 0).all(), out
    elif name == "predicted_grad_norms":
        assert out.q.shape == (kwargs["depth"],) and (out.q >= 0).all()
        _no_nan(out.log10_chi, "log10_chi")
        _no_nan(out.log10_activation_grad_norms, "log10_activation_grad_norms")
        assert out.log10_activation_grad_norms[-1] == 0.0
    elif name in ("gaussian_lyapunov_spectrum", "gaussian_lyapunov_stderr"):
        assert np.isfinite(out).all() and out.shape == (kwargs["n"],)
    elif name in ("fuss_catalan_moments", "gaussian_product_moments"):
        assert (out >= 1.0).all(), out  # inf beyond the float range
    elif name == "scalar_chain":
        for f in ("log10_abs_gain", "log10_abs_weight_grad", "log10_activation_grad_norms"):
            _no_nan(getattr(out, f), f)
    elif name == "batchnorm_mean_field":
        assert out.growth >= 1.0 or kwargs["batch"] < 4, out  # inf at B = 3, 0 at B = 2
        assert 0.0 <= out.top_growth <= math.inf and out.q_star > 0, out
        _no_nan([out.depth_scale, out.lyapunov_exponent, out.c_star], name)
        json.dumps(out.to_dict())
    else:  # the chains of blocks
        L = kwargs["depth"]
        assert out.q.shape == (L + 1,) and (out.q >= 0).all(), out.q
        assert out.log10_chi.shape == out.log10_weight_grad_norms.shape == (L,)
        for f in ("log10_chi", "log10_activation_grad_norms", "log10_weight_grad_norms"):
            _no_nan(getattr(out, f), f)
        if name != "norm_position_grad_norms" or kwargs["position"] == "post":
            assert out.log10_activation_grad_norms[-1] == 0.0
        json.dumps(out.to_dict())


@pytest.mark.parametrize("name", sorted(SIGNATURES))
# The memory patch below is the same for every example.
@settings(max_examples=40, deadline=10_000, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_function_returns_documented_values_or_a_named_error(name, data, monkeypatch):
    """Random finite floats over 1e-300..1e300 (either sign), zeros, NaN, inf and integers
    from 0 to 1e12: the result is finite or one of the documented infinities and NaNs, or a
    ValueError, TypeError or MemoryError names an argument. Never an OverflowError,
    ZeroDivisionError, a RuntimeWarning (warnings are errors here) or a hang (deadline).
    With 64 MiB of memory assumed available, sizes up to about a million are computed and
    larger ones refused before any allocation."""
    monkeypatch.setattr("gradchain._validate.available_memory_bytes", lambda: 64 * 2**20)
    # A residual chain of a bounded activation iterates every block (40-130 microseconds
    # each): the cap, tested on its own below, is lowered to keep the sweep quick.
    monkeypatch.setattr(theory, "_MAX_ITERATED_LAYERS", 2000)
    kwargs = data.draw(st.fixed_dictionaries(SIGNATURES[name]), label="kwargs")
    if name not in _WITHOUT_ACTIVATION:
        act = data.draw(st.sampled_from(theory.ACTIVATIONS), label="activation")
        kwargs["activation"] = act
        if act == "leaky_relu":
            kwargs["negative_slope"] = data.draw(REALS, label="negative_slope")
        if act == "elu":
            kwargs["alpha"] = data.draw(REALS, label="alpha")
    fn = getattr(theory, name)
    try:
        out = fn(**kwargs)
    except (ValueError, TypeError, MemoryError) as exc:
        msg = str(exc)
        assert any(arg in msg for arg in kwargs), f"{type(exc).__name__} names no argument: {msg}"
        return
    except theory.ConvergenceError as exc:
        # documented for the boundary: chi_1 jumps across 1 or stays below it
        assert name == "critical_sigma_w", exc
        return
    _check_result(name, out, kwargs)


@pytest.mark.parametrize(
    "call, what",
    [
        (lambda: theory.gaussian_lyapunov_spectrum(2**31 - 1), "n=2147483647 needs"),
        (lambda: theory.gaussian_lyapunov_stderr(10**8, 3), "n=100000000 needs"),
        (lambda: theory.predicted_grad_norms(10**9, "tanh", 1.0), "depth=1000000000 needs"),
        (lambda: theory.predicted_grad_norms(10**8, "relu", 1.5), "depth=100000000 needs"),
        (lambda: theory.scalar_chain(0.5, 2**31 - 1), "depth=2147483647 needs"),
        (lambda: theory.residual_grad_norms(10**8, "relu", 1.0), "depth=100000000 needs"),
        (lambda: theory.norm_position_grad_norms(10**8), "depth=100000000 needs"),
        (lambda: theory.batchnorm_grad_norms(10**8, "relu", 8), "depth=100000000 needs"),
    ],
)
def test_sizes_are_checked_against_available_memory(call, what, monkeypatch):
    """Before allocating: a MemoryError stating the bytes (here with 1 GiB available)."""
    monkeypatch.setattr("gradchain._validate.available_memory_bytes", lambda: 2**30)
    with pytest.raises(MemoryError, match=rf"{what} \d+ bytes .* more than the 1 GiB"):
        call()


def test_iterated_layers_are_capped(monkeypatch):
    """Where chi(q_l) never settles (tanh at sigma_w = 1, sigma_b = 0: q_l ~ 1/(2l)) every
    layer is a quadrature; beyond the cap (lowered here) a ValueError names depth and the
    accepted range instead of minutes of work. Settling chains of any depth are not capped."""
    monkeypatch.setattr(theory, "_MAX_ITERATED_LAYERS", 300)
    assert theory.predicted_grad_norms(300, "tanh", 1.0).iterated_layers == 300
    with pytest.raises(ValueError, match=r"depth must be at most 300 for tanh.*got 301"):
        theory.predicted_grad_norms(301, "tanh", 1.0)
    pred = theory.predicted_grad_norms(10**5, "tanh", 1.5, 0.3)
    assert pred.iterated_layers < 300
    # a residual chain iterates until q_l stops changing or diverges
    assert theory.residual_grad_norms(300, "tanh", 1.0, scale=0.1).iterated_layers == 300
    with pytest.raises(ValueError, match=r"depth must be at most 300 for tanh.*scale=0.1.*301"):
        theory.residual_grad_norms(301, "tanh", 1.0, scale=0.1)
    assert theory.residual_grad_norms(10**5, "gelu", 10.0).iterated_layers < 300  # diverges
    assert theory.residual_grad_norms(10**5, "tanh", 1.0, scale=1e-9).iterated_layers == 1


def test_fuss_catalan_moments_of_huge_depth_are_prompt():
    """FC_L(k) for L near 2**31: from lgamma where the exact integer would have millions of
    digits (the float is inf there), exact where it is finite."""
    L = 2**31 - 1
    fc = theory.fuss_catalan_moments(L, 10_000)
    assert fc[0] == 1.0 and fc[1] == float(L + 1)
    assert fc[2] == float(math.comb(3 * (L + 1), 3) // (3 * L + 1))
    finite = np.isfinite(fc)
    assert finite[:10].all() and not finite[-1] and (np.diff(finite.astype(int)) <= 0).all()
    assert fc[finite].max() < 1.8e308


def test_length_map_slope_is_accurate_at_small_and_large_q():
    """d E[phi(sqrt(q) z)**2] / dq: its small-q limit phi'(0)**2 + phi(0) phi''(0) for
    sigmoid (1/16) and softplus, where E[phi phi' x] / q cancels to noise, and its large-q
    decay (positive, about q**-1.5) for sigmoid at q = 5e35."""
    for name, limit in (("sigmoid", 1 / 16), ("softplus", 0.25 + math.log(2) / 4)):
        for q in (1e-40, 1e-12):
            slope = theory._Act(name).map_moments(q)[2]
            assert slope == pytest.approx(limit, rel=1e-9), (name, q, slope)
    mf = theory.mean_field("sigmoid", 1e-21)  # q* = 2.5e-43 (a math domain error before)
    assert mf.length_map_slope == pytest.approx(1e-42 / 16, rel=1e-9)
    big = theory.mean_field("sigmoid", 1e18, 1.0)  # did not converge before
    assert big.q_star == pytest.approx(5e35, rel=1e-9) and 0 < big.length_map_slope < 1e-15


def test_correlation_map_with_a_huge_variance_ratio():
    """sigma_b**2 / sigma_w**2 = 1e310: the next variance is the bias's, c_next = 1."""
    assert theory.correlation_map(0.0, "linear", 1e-130, 1e25) == 1.0
    assert theory.correlation_map(0.3, "tanh", 1e150, 0.0, q=1e300) == pytest.approx(
        theory.correlation_map(0.3, "tanh", 1.0, 0.0, q=1e300), rel=1e-12
    )
