"""gradchain.compare_theory: measured gradient norms beside mean-field theory.

Agreement asserted below and why the tolerances are what they are:

* Slopes (log10 of ||dL/dh|| per layer going back, fitted over the half nearest the
  loss). A chain's log-norm moves by nearly independent increments, so the least-squares
  slope has the standard error ``measured_slope_stderr`` reported by the comparison
  (checked against the spread over seeds while writing these tests: 0.0007-0.004 at
  width 512-1000). Mean field predicts the log of the *mean square*, above the mean log
  by O(1/width) per layer, so the tolerance is ``4 stderr + 1 / (width ln 10)``: about
  0.005-0.012 here, where a 10% error in chi moves the slope by
  ``0.5 log10 1.1 = 0.0207``; every agreement test also checks that a sigma_w giving
  chi 10% off fails by a clear margin.
* Linear chains: Newman's exponents within 4 of their exact standard errors; orthogonal
  chains' exponents ``ln gain`` to 1e-12.
* Recurrent tanh chains (hidden 400, T = 200): measured slopes within 4 stderr + 1 /
  (hidden ln 10) of ``lambda / ln 10`` (measured -0.2825 vs -0.2847 ordered, 0.0528 vs
  0.0523 chaotic).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import gradchain as gc
import numpy as np
import pytest
from gradchain import theory

LN10 = math.log(10.0)


def _fit(y, start):
    """Least-squares slope per step back, as the comparison defines it."""
    idx = np.arange(start, len(y))
    return -np.polyfit(idx, y[start:], 1)[0]


def _tolerance(cmp, width):
    return 4.0 * cmp.measured_slope_stderr + 1.0 / (width * LN10)


# --------------------------------------------------------------------------------------
# MLP: agreement where the theory holds
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("activation", "sigma_w", "bias_std", "width", "phase"),
    [
        ("tanh", 0.8, 0.1, 512, "ordered"),
        ("tanh", 1.5, 0.1, 512, "chaotic"),
        ("tanh", 2.5, 0.3, 512, "chaotic"),
        ("relu", 1.2, 0.0, 768, "ordered"),  # relu halves the active units: wider
        ("relu", 1.6, 0.0, 768, "chaotic"),
    ],
)
def test_mlp_slopes_agree_with_mean_field(activation, sigma_w, bias_std, width, phase):
    depth = 40
    net = gc.MLP(depth=depth, width=width, activation=activation, init="normal",
                 sigma_w=sigma_w, bias_std=bias_std, seed=11)
    cmp = gc.compare_theory(net, batch=16, seed=3, spectrum=False)
    assert cmp.phase == phase
    assert (cmp.sigma_w, cmp.sigma_b, cmp.sigma_source) == (sigma_w, bias_std, "init")
    assert cmp.fit_start == depth // 2
    tol = _tolerance(cmp, width)
    assert 0 < cmp.measured_slope_stderr < 0.0025
    miss = abs(cmp.measured_slope - cmp.predicted_slope)
    assert miss < tol
    # Deep in the chain the prediction is 0.5 log10 chi_1 per layer.
    assert cmp.predicted_slope == pytest.approx(0.5 * math.log10(cmp.chi_1), abs=1e-6)
    # The tolerance is tight enough that a chi 10% off in either direction fails ...
    chi10 = 0.5 * math.log10(1.1)
    assert tol < 0.6 * chi10
    for sign in (-1, 1):
        assert abs(cmp.measured_slope - (cmp.predicted_slope + sign * chi10)) > tol
    # ... and the theory at a sigma_w 10% off fits clearly worse.
    wrong = theory.predicted_grad_norms(depth, activation, sigma_w * 1.1, bias_std,
                                        q0=cmp.q0).log10_activation_grad_norms
    wrong_miss = abs(cmp.measured_slope - _fit(wrong, cmp.fit_start))
    assert wrong_miss > max(tol, 3 * miss)
    # The whole curve: the log-norm is a random walk around the prediction.
    inc = np.diff(cmp.measured[cmp.fit_start:])
    walk = 4 * np.std(inc) * math.sqrt(depth) + depth / (width * LN10)
    assert abs(cmp.residual[0]) < walk


def test_relu_prediction_is_exactly_linear_and_aligned():
    """relu: chi = sigma_w**2 / 2 at every q, so predicted[l] = (L - l) 0.5 log10 chi."""
    L, sw = 30, 1.6
    net = gc.MLP(depth=L, width=600, activation="relu", init="normal", sigma_w=sw, seed=2)
    cmp = gc.compare_theory(net, batch=16, spectrum=False)
    expect = 0.5 * (L - np.arange(L + 1)) * math.log10(sw * sw / 2)
    np.testing.assert_allclose(cmp.predicted, expect, rtol=1e-12, atol=1e-12)
    assert cmp.measured[-1] == 0.0 and cmp.predicted[-1] == 0.0
    assert cmp.index.tolist() == list(range(L + 1))
    rep = net.backward(np.random.default_rng([0, 0]).standard_normal((16, 600)),
                       grad_output=np.random.default_rng([0, 1]).standard_normal((16, 600)))
    lg = rep.log10_activation_grad_norms
    np.testing.assert_array_equal(cmp.measured, lg - lg[-1])  # l matches l
    # the whole-chain ratio: L * 0.5 log10 chi = 3.06 decades, within the random walk
    assert cmp.measured[0] == pytest.approx(expect[0], abs=0.15)


@pytest.mark.parametrize(("sigma_w", "scale"), [(0.9, 5.0), (1.3, 4.0)])
def test_tanh_transient_layers_are_aligned(sigma_w, scale):
    """Inputs far from q* saturate the first layers (chi(q_1) is small) and q_l settles
    within a few layers: the per-layer increments of the measured curve follow those of
    the prediction layer for layer, while the prediction shifted by one layer misses
    the first increment by more than 0.07 decades."""
    L, n = 12, 1000
    net = gc.MLP(depth=L, width=n, activation="tanh", init="normal", sigma_w=sigma_w,
                 bias_std=0.1, seed=3)
    x = np.random.default_rng(1).standard_normal((32, n)) * scale
    cmp = gc.compare_theory(net, x, spectrum=False)
    assert cmp.q0 == pytest.approx(scale**2, rel=0.04)
    d_meas = cmp.measured[:-1] - cmp.measured[1:]  # 0.5 log10 chi(q_l), l = 1..L
    d_pred = cmp.predicted[:-1] - cmp.predicted[1:]
    np.testing.assert_allclose(d_meas[:4], d_pred[:4], atol=0.03)
    assert abs(d_meas[0] - d_pred[1]) > 0.07
    assert abs(d_meas[1] - d_pred[0]) > 0.07
    assert d_pred[0] < d_pred[1] < d_pred[2]  # the first layers really differ


# --------------------------------------------------------------------------------------
# MLP: spectrum
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("init", "kw", "sigma"),
    [("normal", {"sigma_w": 1.1}, 1.1), ("xavier_normal", {"gain": 0.9}, 0.9),
     ("he_normal", {}, math.sqrt(2.0)), ("lecun_normal", {"gain": 1.2}, 1.2)],
)
def test_linear_gaussian_exponents_match_newman(init, kw, sigma):
    n, L, k = 48, 400, 12
    net = gc.MLP(depth=L, width=n, activation="linear", init=init, seed=5, **kw)
    cmp = gc.compare_theory(net, batch=2, k=k, spectrum_batch=1)
    assert cmp.exponent_theory == "newman"
    assert cmp.sigma_w == pytest.approx(sigma, rel=1e-12)
    lam = theory.gaussian_lyapunov_spectrum(n, sigma)[:k]
    se = theory.gaussian_lyapunov_stderr(n, L)[:k]
    np.testing.assert_allclose(cmp.predicted_exponents, lam, rtol=1e-13)
    np.testing.assert_allclose(cmp.predicted_exponents_stderr, se, rtol=1e-13)
    z = (cmp.measured_exponents - lam) / se
    assert np.all(np.abs(z) < 4), z
    # the mean-field top-direction growth is 0.5 ln sigma**2 per layer (log of the mean)
    np.testing.assert_allclose(cmp.predicted_log_growth, math.log(sigma) * cmp.spectrum_depths,
                               rtol=1e-10)
    assert cmp.measured_log_growth[-1] / L == pytest.approx(cmp.measured_exponents[0], rel=1e-12)


@pytest.mark.parametrize("gain", [0.7, 1.1])
def test_linear_orthogonal_exponents_are_log_gain(gain):
    net = gc.MLP(depth=60, width=32, activation="linear", init="orthogonal", gain=gain, seed=1)
    cmp = gc.compare_theory(net, batch=3, k=8, spectrum_batch=3)
    assert cmp.exponent_theory == "orthogonal" and cmp.sigma_w == pytest.approx(gain, rel=1e-14)
    np.testing.assert_allclose(cmp.predicted_exponents, math.log(gain), rtol=0, atol=1e-15)
    np.testing.assert_array_equal(cmp.predicted_exponents_stderr, 0.0)
    np.testing.assert_allclose(cmp.measured_exponents, math.log(gain), rtol=0, atol=1e-12)
    np.testing.assert_allclose(cmp.measured_exponents_std, 0.0, atol=1e-12)
    # every gradient norm shrinks or grows by exactly gain per layer
    np.testing.assert_allclose(cmp.measured, cmp.predicted, atol=1e-10)


def test_nonlinear_spectrum_predicts_the_top_exponent_only():
    L = 40
    net = gc.MLP(depth=L, width=400, activation="tanh", init="normal", sigma_w=1.8, seed=4)
    cmp = gc.compare_theory(net, batch=8, k=3, spectrum_batch=4)
    assert cmp.exponent_theory == "mean_field_top" and cmp.spectrum_batch == 4
    assert np.isnan(cmp.predicted_exponents[1:]).all()
    assert np.isnan(cmp.predicted_exponents_stderr).all()
    # the cumulative prediction is the grad-norm prediction read from the input end
    np.testing.assert_allclose(
        cmp.predicted_log_growth, LN10 * (cmp.predicted[0] - cmp.predicted[1:]), rtol=1e-12
    )
    assert cmp.predicted_exponents[0] == pytest.approx(cmp.predicted_log_growth[-1] / L)
    # measured top exponent: four examples, width 400; chi 10% off would move it by 0.048
    assert abs(cmp.measured_exponents[0] - cmp.predicted_exponents[0]) < 0.015
    assert cmp.measured_exponents[0] > cmp.measured_exponents[2]


def test_default_input_just_works():
    net = gc.MLP(depth=50, width=256, activation="tanh", init="normal", sigma_w=1.2)
    cmp = gc.compare_theory(net)
    assert cmp.kind == "mlp" and cmp.batch == 32 and cmp.depth == 50
    assert cmp.measured.shape == cmp.predicted.shape == (51,)
    assert cmp.has_spectrum and cmp.measured_exponents.shape == (16,)
    assert cmp.spectrum_depths.tolist() == list(range(1, 51))
    assert cmp.q0 == pytest.approx(1.0, abs=0.05)
    again = gc.compare_theory(net)
    np.testing.assert_array_equal(again.measured, cmp.measured)
    other = gc.compare_theory(net, seed=1)
    assert not np.array_equal(other.measured, cmp.measured)
    for a in (cmp.index, cmp.measured, cmp.predicted, cmp.measured_exponents,
              cmp.predicted_log_growth):
        assert not a.flags.writeable
    with pytest.raises(dataclasses.FrozenInstanceError):
        cmp.sigma_w = 2.0


# --------------------------------------------------------------------------------------
# Where sigma_w and sigma_b come from
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", gc.INITS)
def test_mlp_init_sigmas_match_the_weights(init):
    """The effective sigma_w of every initializer (read from its variance) agrees with
    fan_in * mean(W**2) of the weights it draws: 4 layers of 192 x 192 entries estimate
    the variance to 0.4% (uniform) - 0.5% (Gaussian), orthogonal exactly."""
    net = gc.MLP(depth=4, width=192, activation="tanh", init=init, gain=1.3, sigma_w=0.8,
                 bias_std=0.2, seed=9)
    cmp = gc.compare_theory(net, batch=2, spectrum=False)
    same = gc.MLP.from_weights(net.weights, net.biases, activation="tanh")
    est = gc.compare_theory(same, batch=2, spectrum=False)
    assert (cmp.sigma_source, cmp.sigma_b_source) == ("init", "init")
    assert (est.sigma_source, est.sigma_b_source) == ("estimated", "estimated")
    assert est.sigma_w == pytest.approx(cmp.sigma_w, rel=0.01 if init != "orthogonal" else 1e-12)
    assert est.sigma_b == pytest.approx(cmp.sigma_b, rel=0.15)  # 768 bias entries
    np.testing.assert_array_equal(est.measured, cmp.measured)


def test_unequal_widths_need_sigma_w():
    widths = [64, 128, 128, 32]
    net = gc.MLP(width=widths, activation="tanh", init="xavier_normal", seed=0)
    with pytest.raises(ValueError, match=r"different effective sigma_w.*pass sigma_w="):
        gc.compare_theory(net, spectrum=False)
    cmp = gc.compare_theory(net, sigma_w=1.0, spectrum=False)
    assert (cmp.sigma_source, cmp.sigma_b_source, cmp.sigma_w) == ("given", "init", 1.0)
    he = gc.MLP(width=widths, activation="relu", init="he_normal", seed=0)  # constant: fine
    assert gc.compare_theory(he, spectrum=False).sigma_w == pytest.approx(math.sqrt(2))


def test_overrides_and_estimates_for_arrays():
    rng = np.random.default_rng(0)
    n, L = 100, 6
    W = [rng.standard_normal((n, n)) * 1.4 / math.sqrt(n) for _ in range(L)]
    b = [rng.standard_normal(n) * 0.3 for _ in range(L)]
    net = gc.MLP.from_weights(W, b, activation="tanh")
    cmp = gc.compare_theory(net, spectrum=False)
    assert (cmp.sigma_source, cmp.sigma_b_source) == ("estimated", "estimated")
    assert cmp.sigma_w == pytest.approx(1.4, rel=0.02)
    assert cmp.sigma_b == pytest.approx(0.3, rel=0.1)
    given = gc.compare_theory(net, sigma_w=1.4, sigma_b=0.3, spectrum=False)
    assert (given.sigma_w, given.sigma_b, given.sigma_source, given.sigma_b_source) == (
        1.4, 0.3, "given", "given")
    pred = theory.predicted_grad_norms(L, "tanh", 1.4, 0.3, q0=given.q0)
    np.testing.assert_array_equal(given.predicted, pred.log10_activation_grad_norms)
    np.testing.assert_array_equal(given.measured, cmp.measured)
    # spectrum of an array-built linear chain: the mean-field top exponent only
    lin = gc.compare_theory(gc.MLP.from_weights(W, activation="linear"), k=2)
    assert lin.exponent_theory == "mean_field_top"


@pytest.mark.parametrize("init", gc.RNN_INITS)
def test_rnn_init_sigmas_match_the_weights(init):
    H, I = 200, 40
    net = gc.RNN("tanh", I, H, init=init, gain=0.7, recurrent_gain=1.3, seed=4)
    x = np.random.default_rng(0).standard_normal((5, 2, I)) * 1.5
    cmp = gc.compare_theory(net, x, spectrum=False)
    est = gc.compare_theory(gc.RNN.from_state_dict(net.state_dict(), "tanh"), x, spectrum=False)
    assert cmp.sigma_source == "init" and est.sigma_source == "estimated"
    exact = init == "orthogonal"
    assert est.sigma_w == pytest.approx(cmp.sigma_w, rel=1e-12 if exact else 0.01)
    assert est.input_variance == pytest.approx(cmp.input_variance, rel=0.03)
    assert cmp.input_variance == pytest.approx(
        I * np.mean(net.state_dict()["weight_ih_l0"] ** 2) * np.mean(x**2), rel=0.03)
    if init == "default":  # b_ih + b_hh, two U(-1/sqrt(H), 1/sqrt(H))
        assert cmp.sigma_b == pytest.approx(math.sqrt(2 / (3 * H)))
        assert est.sigma_b == pytest.approx(cmp.sigma_b, rel=0.15)
        assert cmp.sigma_w == pytest.approx(1.3 / math.sqrt(3))
    else:
        assert cmp.sigma_b == est.sigma_b == 0.0
        assert cmp.sigma_w == pytest.approx(1.3)
    assert cmp.effective_sigma_b == pytest.approx(
        math.sqrt(cmp.sigma_b**2 + cmp.input_variance))


def test_rnn_spectral_radius_is_estimated():
    net = gc.RNN("tanh", 4, 150, init="normal", spectral_radius=0.9, seed=0)
    cmp = gc.compare_theory(net, steps=5, batch=2, spectrum=False)
    assert cmp.sigma_source == "estimated"
    assert cmp.sigma_w == pytest.approx(0.9, rel=0.1)  # circular law: radius ~ sigma_w


# --------------------------------------------------------------------------------------
# RNN
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("recurrent_gain", "gain", "phase"), [(0.8, 1.0, "ordered"), (2.0, 0.5, "chaotic")]
)
def test_rnn_tanh_decay_rate_matches_lyapunov_exponent(recurrent_gain, gain, phase):
    H, T = 400, 200
    net = gc.RNN("tanh", 32, H, init="normal", gain=gain, recurrent_gain=recurrent_gain, seed=0)
    cmp = gc.compare_theory(net, steps=T, batch=16, spectrum=False)
    assert cmp.kind == "rnn" and cmp.phase == phase and cmp.depth == T
    lam = theory.rnn_max_lyapunov_meanfield(recurrent_gain, cmp.effective_sigma_b,
                                            activation="tanh")
    assert cmp.lyapunov_exponent == pytest.approx(lam, rel=1e-14)
    assert cmp.predicted_slope == pytest.approx(lam / LN10, rel=1e-9)
    # settled steps: a straight line of slope lambda / ln 10
    t = np.arange(T // 2, T + 1)
    np.testing.assert_allclose(cmp.predicted[t], lam * (T - t) / LN10, rtol=1e-9, atol=1e-12)
    tol = _tolerance(cmp, H)
    assert abs(cmp.measured_slope - cmp.predicted_slope) < tol
    assert tol < 0.5 * 0.5 * math.log10(1.1)  # a 10% error in chi would show


def test_rnn_autonomous_chaotic_network():
    H, T = 400, 200
    net = gc.RNN("tanh", 8, H, init="normal", recurrent_gain=2.0, seed=0)
    h0 = np.random.default_rng(5).standard_normal((1, 16, H))
    cmp = gc.compare_theory(net, np.zeros((T, 16, 8)), h0=h0, spectrum=False)
    assert cmp.input_variance == 0.0 and cmp.sigma_b == 0.0
    assert cmp.q0 == pytest.approx(1.0, rel=0.05)
    assert cmp.lyapunov_exponent == pytest.approx(
        theory.rnn_max_lyapunov_meanfield(2.0, 0.0, q0=cmp.q0))
    assert abs(cmp.measured_slope - cmp.predicted_slope) < _tolerance(cmp, H)


def test_rnn_spectrum():
    net = gc.RNN("tanh", 16, 200, init="normal", recurrent_gain=2.0, gain=0.5, seed=1)
    cmp = gc.compare_theory(net, steps=150, batch=4, k=3, spectrum_batch=2)
    if not cmp.has_spectrum:
        pytest.skip("jacobian_spectrum does not take recurrent chains in this build")
    assert cmp.spectrum_depths.tolist() == list(range(1, 151))
    assert cmp.measured_exponents.shape == (3,) and cmp.exponent_theory == "mean_field_top"
    assert cmp.predicted_exponents[0] == pytest.approx(cmp.predicted_log_growth[-1] / 150)
    assert np.isnan(cmp.predicted_exponents[1:]).all()
    # two sequences of 150 steps: spread about 0.005; chi 10% off would move it by 0.048
    assert abs(cmp.measured_exponents[0] - cmp.predicted_exponents[0]) < 0.02
    assert cmp.predicted_exponents[0] == pytest.approx(cmp.lyapunov_exponent, abs=0.01)


def test_rnn_relu_runs():
    net = gc.RNN("relu", 8, 100, init="normal", recurrent_gain=1.2, seed=0)
    cmp = gc.compare_theory(net, steps=60, batch=4, spectrum=False)
    assert cmp.lyapunov_exponent == pytest.approx(0.5 * math.log(1.2**2 / 2))
    assert cmp.chi_1 == pytest.approx(0.72)


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------
def test_bad_input():
    mlp = gc.MLP(depth=3, width=8, seed=0)
    with pytest.raises(TypeError, match="net"):
        gc.compare_theory("mlp")
    with pytest.raises(TypeError, match="net"):
        gc.compare_theory(mlp.weights)
    for cell in ("lstm", "gru"):
        with pytest.raises(ValueError, match="vanilla"):
            gc.compare_theory(gc.RNN(cell, 2, 8, seed=0))
    with pytest.raises(ValueError, match="num_layers"):
        gc.compare_theory(gc.RNN("tanh", 2, 8, num_layers=2, seed=0))
    with pytest.raises(ValueError, match="x"):
        gc.compare_theory(mlp, np.ones((4, 7)))
    with pytest.raises(ValueError, match="x"):
        gc.compare_theory(mlp, np.ones(8))
    with pytest.raises(ValueError, match="x"):
        gc.compare_theory(mlp, np.full((2, 8), np.nan))
    rnn = gc.RNN("tanh", 2, 8, seed=0)
    with pytest.raises(ValueError, match="x"):
        gc.compare_theory(rnn, np.ones((4, 2)))
    with pytest.raises(ValueError, match="x"):
        gc.compare_theory(rnn, np.ones((4, 2, 3)))
    with pytest.raises(ValueError, match="h0"):
        gc.compare_theory(rnn, np.ones((4, 2, 2)), h0=np.ones((1, 3, 8)))
    with pytest.raises(ValueError, match="h0"):
        gc.compare_theory(mlp, h0=np.ones((1, 2, 8)))
    for bad in (0, 9, -1):
        with pytest.raises(ValueError, match="k must be"):
            gc.compare_theory(mlp, k=bad)
    with pytest.raises(ValueError, match="k must be"):
        gc.compare_theory(rnn, k=9)
    with pytest.raises(TypeError, match="k must be"):
        gc.compare_theory(mlp, k=2.0)
    with pytest.raises(ValueError, match="fit_start"):
        gc.compare_theory(mlp, fit_start=3)
    with pytest.raises(ValueError, match="sigma_w"):
        gc.compare_theory(mlp, sigma_w=-1.0)
    with pytest.raises(ValueError, match="sigma_b"):
        gc.compare_theory(mlp, sigma_b=math.inf)
    with pytest.raises(TypeError, match="spectrum"):
        gc.compare_theory(mlp, spectrum="yes")
    with pytest.raises(ValueError, match="batch"):
        gc.compare_theory(mlp, batch=0)
    with pytest.raises(ValueError, match="spectrum_batch"):
        gc.compare_theory(mlp, spectrum_batch=0)


# --------------------------------------------------------------------------------------
# Presentation
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, kwargs",
    [
        # every unit of a width-4 relu layer off somewhere: the gradients below are exactly 0
        (lambda: gc.MLP(100, 4, activation="relu", init="he_normal", seed=0), {}),
        (lambda: gc.MLP(5, 4, activation="tanh", init="normal", sigma_w=0.0), {}),
        (lambda: gc.MLP(5, 4, activation="linear", init="normal", sigma_w=0.0), {}),
        (lambda: gc.MLP.from_weights([np.zeros((4, 4))] * 3, activation="tanh"), {}),
        (lambda: gc.MLP(5, 4, activation="tanh", seed=0), {"x": np.zeros((3, 4))}),
        (lambda: gc.RNN("relu", 2, 4, bias=False, seed=0), {"x": np.zeros((20, 2, 2))}),
    ],
)
def test_exactly_zero_gradients_give_no_warning_and_no_nan(make, kwargs):
    """Where gradients or chi are exactly 0 the curves hold -inf: no RuntimeWarning (they
    are errors here), no NaN in the curves, residuals or predicted growth, and the text
    says "undefined" where a slope cannot be fitted."""
    cmp = gc.compare_theory(make(), **kwargs)
    for name in ("measured", "predicted", "residual", "predicted_log_growth"):
        assert not np.isnan(getattr(cmp, name)).any(), (name, getattr(cmp, name))
    text = str(cmp)
    assert "nan" not in text.replace("undefined", ""), text
    json.dumps(cmp.to_dict())


def test_huge_parameters_give_named_errors(monkeypatch):
    """Scales beyond what mean-field theory takes (or whose squares would overflow): a
    ValueError naming the argument and where compare_theory took it from."""
    cases = [
        (gc.MLP(5, 4, activation="tanh", gain=1e200), {},
         r"sigma_w must be .*sigma_w=1e\+200 \(init\)"),
        (gc.MLP(5, 4, activation="tanh"), {"sigma_w": 1e300}, r"sigma_w must be .*\(given\)"),
        (gc.MLP.from_weights([np.full((4, 4), 1e200)] * 2, activation="relu"), {},
         r"sigma_w must be .*\(estimated\)"),
        (gc.MLP(5, 4, activation="relu"), {"x": np.full((2, 4), 1e200)},
         r"q0 must be .*mean square entry of x"),
        (gc.RNN("tanh", 2, 4, recurrent_gain=1e200, seed=0), {"steps": 10},
         r"sigma_w must be .*\(init\)"),
    ]  # fmt: skip
    for net, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            gc.compare_theory(net, spectrum=False, **kwargs)
    monkeypatch.setattr("gradchain._validate.available_memory_bytes", lambda: 2**20)
    with pytest.raises(MemoryError, match=r"random inputs and gradient needs \d+ bytes"):
        gc.compare_theory(gc.MLP(2, 8, seed=0), batch=10**5)
    with pytest.raises(MemoryError, match=r"random inputs and gradient needs \d+ bytes"):
        gc.compare_theory(gc.RNN("tanh", 8, 4, seed=0), steps=10**5)


def test_to_dict_json_round_trip():
    net = gc.MLP(depth=20, width=32, activation="tanh", init="normal", sigma_w=1.3, seed=0)
    cmp = gc.compare_theory(net, batch=4, k=4)
    d = json.loads(json.dumps(cmp.to_dict()))
    assert d["kind"] == "mlp" and d["sigma_source"] == "init"
    assert d["measured"] == pytest.approx(cmp.measured.tolist())
    assert d["residual"] == pytest.approx(cmp.residual.tolist())
    assert d["predicted_exponents"][1:] == [None] * 3  # NaN -> None
    assert d["index"] == list(range(21))
    assert d["depth_scale"] == pytest.approx(cmp.depth_scale)
    assert d["effective_sigma_b"] == 0.0
    relu = gc.compare_theory(gc.MLP(depth=3, width=4, activation="relu", init="normal",
                                    sigma_w=0.0, seed=0), spectrum=False)
    d = json.loads(json.dumps(relu.to_dict()))  # zero weights: -inf norms survive
    assert d["measured"][0] == "-inf" and d["measured_slope"] is None


def test_table_and_str():
    net = gc.MLP(depth=40, width=32, activation="tanh", init="normal", sigma_w=1.3, seed=0)
    cmp = gc.compare_theory(net, batch=4, k=2)
    t = cmp.table()
    lines = t.splitlines()
    assert "measured" in lines[0] and "predicted" in lines[0] and "ln|R_11|" in lines[0]
    assert len(lines) == 1 + 21  # l = 0, 2, ..., 40
    assert lines[-1].split()[0] == "40" and lines[1].split()[0] == "0"
    assert len(cmp.table(every=10).splitlines()) == 1 + 5
    s = str(cmp)
    assert s.startswith("TheoryComparison(MLP(") and "chaotic" in s and "mean_field_top" in s
    assert t in s
    rnn = gc.compare_theory(gc.RNN("tanh", 3, 16, init="normal", seed=0), steps=30, batch=2,
                            spectrum=False)
    assert rnn.table().splitlines()[0].split()[0] == "t"
    assert "per step" in str(rnn) and "ln|R_11|" not in str(rnn)


def test_plot_with_matplotlib():
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    cmp = gc.compare_theory(gc.MLP(depth=10, width=16, seed=0), batch=2, spectrum=False)
    ax = cmp.plot()
    assert len(ax.get_lines()) == 2
    _fig, ax2 = plt.subplots()
    assert cmp.plot(ax2) is ax2
    plt.close("all")


def test_plot_without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    cmp = gc.compare_theory(gc.MLP(depth=4, width=8, seed=0), batch=2, spectrum=False)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        cmp.plot()
