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
        (lambda: gc.Chain([gc.Linear(4, 4), gc.Activation("relu")] * 100, init="he_normal"), {}),
        (lambda: gc.MLP(5, 4, activation="relu", residual=True, seed=0), {"x": np.zeros((3, 4))}),
        (lambda: gc.MLP(5, 4, activation="tanh", residual=True, norm="layer", norm_position="post",
                        init="normal", sigma_w=0.0), {}),
    ],
)  # fmt: skip
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
        (gc.MLP(5, 4, activation="tanh", residual=True, gain=1e200), {},
         r"sigma_w must be .*sigma_w=1e\+200 \(init\).*the span's input"),
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


# --------------------------------------------------------------------------------------
# Chains of blocks: agreement with the block theories
# --------------------------------------------------------------------------------------
#
# Each case draws SEEDS chains (and inputs and output gradients) and compares the mean of
# one statistic per chain with the prediction in units of its standard error (the spread
# over the chains / sqrt(SEEDS)): within 3 of it, and a prediction 10% off more than 3
# away. "10% off" is a factor 1.1 on a squared norm: 0.5 log10(1.1) = 0.0207 decades on
# each block's factor chi_l (the slope of a BatchNorm chain, whose prediction is
# geometric, and the whole span's ratio per block, measured[0] / L, of the others) and on
# the weight gradients. Width 256 keeps the O(1/width) corrections to mean field below one
# standard error at these depths; measured slopes and ratios were checked over 60 chains
# while writing these tests (e.g. post-LN tanh: -0.0005 +- 0.0033 decades over the span).

SEEDS = 16
N = 256
TEN_PERCENT = 0.5 * math.log10(1.1)


def _comparisons(make, **kwargs):
    return [gc.compare_theory(make(s), seed=s, spectrum=False, **kwargs) for s in range(SEEDS)]


def _assert_reproduces(diffs, what):
    """The mean of measured - predicted within 3 standard errors of 0, and 10% apart."""
    diffs = np.asarray(diffs, dtype=np.float64)
    mean = diffs.mean()
    se = diffs.std(ddof=1) / math.sqrt(diffs.size)
    assert abs(mean) < 3 * se, f"{what}: measured - predicted = {mean:.4f} +- {se:.4f}"
    for wrong in (TEN_PERCENT, -TEN_PERCENT):
        assert abs(mean - wrong) > 3 * se, f"{what}: {se:.4f} cannot tell a 10% error apart"
    return mean, se


def _bn_chain(activation, read_out):
    def make(seed):
        blocks = [gc.Linear(N, N), gc.BatchNorm(N), gc.Activation(activation)] * 10
        return gc.Chain(blocks + ([gc.Linear(N, 10)] if read_out else []), init="he_normal",
                        seed=seed)
    return make


BLOCK_CASES = {
    # kind, make(seed), compare_theory arguments
    "batch_norm relu, read-out Linear": (
        "batch_norm", _bn_chain("relu", True), {"batch": 8}),
    "batch_norm tanh, gc.MLP(norm='batch', norm_position='post')": (
        "batch_norm",
        lambda s: gc.MLP(depth=10, width=N, activation="tanh", norm="batch",
                         norm_position="post", seed=s),
        {"batch": 8}),
    "residual act_linear relu, gc.MLP(residual=True)": (
        "residual",
        lambda s: gc.MLP(depth=10, width=N, activation="relu", init="he_normal", residual=True,
                         residual_scale=0.2, seed=s),
        {"batch": 16}),
    "residual linear_act_linear tanh": (
        "residual",
        lambda s: gc.Chain([gc.Residual([gc.Linear(N, N), gc.Activation("tanh"),
                                         gc.Linear(N, N)], scale=0.5)] * 10,
                           init="normal", sigma_w=1.5, bias_std=0.3, seed=s),
        {"batch": 16}),
    "pre-LN linear_act_linear gelu, input Linear, final LayerNorm, read-out": (
        "pre_norm",
        lambda s: gc.Chain([gc.Linear(32, N),
                            *[gc.Residual([gc.LayerNorm(N), gc.Linear(N, N), gc.Activation("gelu"),
                                           gc.Linear(N, N)])] * 10,
                            gc.LayerNorm(N), gc.Linear(N, 10)],
                           init="normal", sigma_w=1.2, bias_std=0.3, seed=s),
        {"batch": 16}),
    "pre-LN act_linear relu, gc.MLP(norm='layer', residual=True)": (
        "pre_norm",
        lambda s: gc.MLP(depth=10, width=N, activation="relu", init="he_normal", norm="layer",
                         residual=True, seed=s),
        {"batch": 16}),
    "post-LN linear_act_linear tanh": (
        "post_norm",
        lambda s: gc.Chain([gc.Residual([gc.Linear(N, N), gc.Activation("tanh"),
                                         gc.Linear(N, N)]), gc.LayerNorm(N)] * 10,
                           init="normal", sigma_w=1.5, seed=s),
        {"batch": 16}),
    "post-LN act_linear gelu, gc.MLP(norm_position='post')": (
        "post_norm",
        lambda s: gc.MLP(depth=10, width=N, activation="gelu", init="normal", sigma_w=1.3,
                         norm="layer", norm_position="post", residual=True, seed=s),
        {"batch": 16}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_block_chains_agree_with_their_theory(case):
    """Every supported shape at width 256, 10 blocks, 16 chains (about a second each): the
    BatchNorm chains' slope (the prediction is geometric there), the other chains' whole
    span per block, the weight gradients relative to the gradient at their block (the
    theory's weight formula, averaged over the blocks) and the last block's weight
    gradient relative to the output's (Xiong et al.'s quantity), each within 3 standard
    errors of the theory and 10% apart from it."""
    kind, make, kwargs = BLOCK_CASES[case]
    comps = _comparisons(make, **kwargs)
    c = comps[0]
    assert c.kind == kind and c.depth == 10 and c.measured.shape == c.predicted.shape == (11,)
    assert c.comparison == ("slope" if kind == "batch_norm" else "curve")
    if kind == "batch_norm":
        assert c.q_star is None and c.chi_1 is None and c.phase == "not applicable"
        assert c.sigma_b_source == "not applicable"
        growth = math.exp(2 * c.lyapunov_exponent)
        assert growth == pytest.approx(theory.batchnorm_mean_field(c.activation, 8).growth)
        _assert_reproduces([x.measured_slope - x.predicted_slope for x in comps], "slope")
    else:
        assert c.q_star is None and c.depth_scale is None and c.lyapunov_exponent is None
        _assert_reproduces([(x.measured[0] - x.predicted[0]) / x.depth for x in comps],
                           "whole span per block")  # fmt: skip
    local = [
        np.mean(x.measured_log10_weight_grad_norms - x.measured[1:])
        - np.mean(x.predicted_log10_weight_grad_norms - x.predicted[1:])
        for x in comps
    ]
    _assert_reproduces(local, "weight gradients at their blocks")
    _assert_reproduces(
        [x.measured_log10_weight_grad_norms[-1] - x.predicted_log10_weight_grad_norms[-1]
         for x in comps], "last block's weight gradient")  # fmt: skip


def test_block_chain_random_walk_stderr_matches_the_spread_over_chains():
    """measured_stderr[0], from one chain's increments, is the size of the chain-to-chain
    spread of measured[0] - predicted[0] (within a factor 2 at 16 chains)."""
    comps = _comparisons(BLOCK_CASES["residual linear_act_linear tanh"][1], batch=16)
    spread = np.std([c.measured[0] - c.predicted[0] for c in comps], ddof=1)
    reported = np.mean([c.measured_stderr[0] for c in comps])
    assert 0.5 < reported / spread < 2.0, (reported, spread)
    c = comps[0]
    assert c.measured_stderr[-1] == 0.0 and np.all(np.diff(c.measured_stderr) < 0)


# --------------------------------------------------------------------------------------
# Chains of blocks: what is compared
# --------------------------------------------------------------------------------------
def test_plain_chain_is_the_mlp_comparison():
    """A Chain of [Linear, Activation] blocks is an MLP to the theory: the same weights give
    the same measured and predicted curves and spectrum (per layer, from two blocks each)."""
    mlp = gc.MLP(depth=12, width=48, activation="linear", init="normal", sigma_w=1.1, seed=3)
    chain = gc.Chain(mlp.blocks, init="normal", sigma_w=1.1, seed=3)
    a = gc.compare_theory(mlp, batch=4, k=5, spectrum_batch=2)
    b = gc.compare_theory(chain, batch=4, k=5, spectrum_batch=2)
    assert b.kind == "mlp" and b.span == (0, 24) and b.pattern == "[Linear(48, 48), Activation('linear')] x 12"
    assert (b.sigma_w, b.sigma_source, b.chi_1, b.phase) == (a.sigma_w, "init", a.chi_1, a.phase)
    np.testing.assert_allclose(b.measured, a.measured, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(b.predicted, a.predicted)
    assert b.exponent_theory == a.exponent_theory == "newman"
    np.testing.assert_array_equal(b.spectrum_depths, a.spectrum_depths)
    np.testing.assert_allclose(b.measured_exponents, a.measured_exponents, rtol=0, atol=1e-12)
    assert b.measured_log10_weight_grad_norms is None and b.notes == ()


def test_span_between_input_and_read_out_blocks():
    """The README's shape: an input Linear, LayerNorm and gelu run forward, then pre-LN
    blocks and their final LayerNorm compared, the read-out Linear left out. The measured
    curve is that of a chain of the span's blocks alone, fed the input blocks' output."""
    blocks = [
        gc.Linear(16, 64), gc.LayerNorm(64), gc.Activation("gelu"),
        *[gc.Residual([gc.LayerNorm(64), gc.Linear(64, 128), gc.Activation("relu"),
                       gc.Linear(128, 64)], scale=0.5)] * 6,
        gc.LayerNorm(64), gc.Linear(64, 10),
    ]  # fmt: skip
    net = gc.Chain(blocks, init="he_normal", seed=1)
    x = np.random.default_rng(0).standard_normal((8, 16))
    cmp = gc.compare_theory(net, x, sigma_w=math.sqrt(2), seed=4, spectrum=False)
    assert cmp.kind == "pre_norm" and cmp.span == (3, 10) and cmp.depth == 6
    assert cmp.branch == "linear_act_linear" and cmp.scale == 0.5
    assert cmp.pattern.endswith("x 6, LayerNorm(64)")
    assert cmp.notes[0].startswith("blocks 0..2 [Linear(16, 64), LayerNorm(64)")
    assert cmp.notes[1].startswith("block 10 [Linear(64, 10)] left out")
    sd = net.state_dict()
    stem = gc.Chain(blocks[:3])
    stem.load_state_dict({k: a for k, a in sd.items() if int(k.split(".")[0]) < 3})
    span = gc.Chain(blocks[3:10])
    span.load_state_dict({f"{int(k.split('.')[0]) - 3}.{k.split('.', 1)[1]}": a
                          for k, a in sd.items() if 3 <= int(k.split(".")[0]) < 10})  # fmt: skip
    xs = stem.forward(x)
    g = np.random.default_rng([4, 1]).standard_normal((8, 64))
    lg = span.backward(xs, grad_output=g).log10_activation_grad_norms
    np.testing.assert_allclose(cmp.measured, lg[:7] - lg[7], rtol=0, atol=1e-12)
    # the LayerNorms see each example's variance over the features (gelu's output has a mean)
    np.testing.assert_allclose(cmp.q0, np.mean(np.var(xs, axis=1)), rtol=1e-12)
    # y is the final LayerNorm's output: h_L's gradient is 1/sqrt(q_L) of its own
    assert cmp.measured[-1] < 0 and cmp.predicted[-1] < 0
    assert net.state_dict().keys() == sd.keys()


def test_per_example_theory_combines_mean_squares():
    """Pre-LN blocks act on each example alone: with examples of very different scales the
    prediction is 0.5 log10 of the mean of the examples' predicted squared ratios, above the
    prediction at the mean q0 (the per-example curves are convex in q0)."""
    n, L = 64, 8
    net = gc.MLP(depth=L, width=n, activation="relu", init="he_normal", norm="layer",
                 residual=True, seed=0)  # fmt: skip
    x = np.random.default_rng(0).standard_normal((2, n))
    x -= x.mean(axis=1, keepdims=True)
    x /= x.std(axis=1, keepdims=True)  # q0 exactly 1 per example ...
    x[1] *= 4.0  # ... and 16
    cmp = gc.compare_theory(net, x, spectrum=False)
    assert cmp.q0 == pytest.approx(8.5, rel=1e-12)
    kw = {"position": "pre", "branch": "act_linear"}
    parts = [theory.norm_position_grad_norms(L, "relu", math.sqrt(2), q0=q, **kw) for q in (1, 16)]
    # y = h_L: each example's curves relative to its own h_L
    curves = [p.log10_activation_grad_norms - p.log10_activation_grad_norms[-1] for p in parts]
    weights = [p.log10_weight_grad_norms - p.log10_activation_grad_norms[-1] for p in parts]
    for got, want in ((cmp.predicted, curves), (cmp.predicted_log10_weight_grad_norms, weights)):
        sq = np.mean([10 ** (2 * w) for w in want], axis=0)
        np.testing.assert_allclose(got, 0.5 * np.log10(sq), rtol=1e-12, atol=1e-14)
    at_mean = theory.norm_position_grad_norms(L, "relu", math.sqrt(2), q0=8.5, **kw)
    g = at_mean.log10_activation_grad_norms
    assert cmp.predicted[0] > g[0] - g[-1] + 0.05


def test_mlp_pre_norm_without_final_layer_norm():
    net = gc.MLP(depth=6, width=32, activation="tanh", init="normal", sigma_w=1.3, bias_std=0.2,
                 norm="layer", residual=True, residual_scale=0.5, seed=2)  # fmt: skip
    cmp = gc.compare_theory(net, batch=4, spectrum=False)
    assert cmp.kind == "pre_norm" and cmp.branch == "act_linear" and cmp.span == (0, 6)
    assert cmp.measured[-1] == 0.0 and cmp.predicted[-1] == 0.0
    assert cmp.notes == ("no LayerNorm after the last block: y is h_L",)
    assert (cmp.sigma_w, cmp.sigma_b, cmp.sigma_source, cmp.sigma_b_source) == (
        1.3, 0.2, "init", "init")  # fmt: skip
    assert str(cmp).startswith("TheoryComparison(MLP(depth=6, width=32")


def test_batchnorm_comparison_leaves_the_chain_as_it_was():
    """A train-mode pass updates BatchNorm's running statistics; the comparison restores
    them, skips the spectrum (the blocks couple the batch) and says so."""
    net = gc.MLP(depth=5, width=32, activation="relu", norm="batch", norm_position="post",
                 init="he_normal", seed=0)  # fmt: skip
    before, text = net.state_dict(), repr(net)
    cmp = gc.compare_theory(net, batch=6)
    after = net.state_dict()
    assert after.keys() == before.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])
    assert repr(net) == text and net.training
    assert not cmp.has_spectrum and cmp.spectrum_depths is None
    assert any("couples the examples" in n for n in cmp.notes)
    assert cmp.kind == "batch_norm" and cmp.batch == 6 and cmp.sigma_b == 0.0
    # q0: the features' mean unbiased batch variance of the input
    x = np.random.default_rng([0, 0]).standard_normal((6, 32))
    assert cmp.q0 == pytest.approx(np.mean(np.var(x, axis=0, ddof=1)), rel=1e-12)
    assert "growth of squared gradient norms" in str(cmp) and "per block back" in str(cmp)


def test_residual_spectrum_starts_from_a_random_frame():
    """A relu residual chain x + a W relu(x): the top direction's growth follows the mean
    field of a random direction; the identity frame's e_1 would hardly grow in the examples
    whose first unit is off, since that unit stays off from block to block."""
    net = gc.MLP(depth=20, width=128, activation="relu", init="he_normal", residual=True,
                 residual_scale=0.3, seed=0)  # fmt: skip
    cmp = gc.compare_theory(net, batch=8, k=4, spectrum_batch=8)
    assert cmp.exponent_theory == "mean_field_top" and cmp.spectrum_depths.tolist() == list(
        range(1, 21))
    np.testing.assert_allclose(
        cmp.predicted_log_growth, LN10 * (cmp.predicted[0] - cmp.predicted[1:]), rtol=1e-12)
    # per block: predicted 0.5 ln(1 + 0.09) = 0.0431; a 10% error in chi moves it by 0.048
    assert cmp.predicted_exponents[0] == pytest.approx(0.5 * math.log1p(0.09), rel=1e-12)
    assert abs(cmp.measured_exponents[0] - cmp.predicted_exponents[0]) < 0.012
    s = gc.jacobian_spectrum(net.to_chain(), np.random.default_rng([0, 0]).standard_normal(
        (8, 128)), k=1)  # fmt: skip
    assert s.lyapunov_exponents_mean[0] < cmp.measured_exponents[0] - 0.01


def test_loaded_chains_estimate_sigma_and_check_their_norm_layers():
    net = gc.MLP(depth=6, width=128, activation="relu", norm="layer", norm_position="post",
                 residual=True, init="normal", sigma_w=1.2, bias_std=0.3, seed=5)  # fmt: skip
    cmp = gc.compare_theory(net, batch=4, spectrum=False)
    chain = net.to_chain()
    chain.load_state_dict(chain.state_dict())  # parameters from elsewhere: no initializer
    est = gc.compare_theory(chain, batch=4, spectrum=False)
    assert (cmp.sigma_source, est.sigma_source, est.sigma_b_source) == ("init", "estimated",
                                                                        "estimated")  # fmt: skip
    assert est.sigma_w == pytest.approx(1.2, rel=0.03)
    assert est.sigma_b == pytest.approx(0.3, rel=0.25)  # 6 x 128 bias entries
    np.testing.assert_array_equal(est.measured, cmp.measured)
    sd = chain.state_dict()
    sd["3.weight"] = sd["3.weight"] * 1.5  # the second layer's LayerNorm, trained
    chain.load_state_dict(sd)
    with pytest.raises(ValueError, match=r"norm layers at initialization.*3\.weight"):
        gc.compare_theory(chain, spectrum=False)


def test_torch_model_with_residual_modules():
    """A torch model read with torch.fx (blocks named by the model's modules) compares as
    the gc.Chain of the same blocks and weights."""
    torch = pytest.importorskip("torch")
    from torch import nn

    class Block(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(n, n), nn.Tanh(), nn.Linear(n, n))

        def forward(self, x):
            return x + 0.5 * self.mlp(x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), *[Block(32) for _ in range(5)], nn.Linear(32, 3))
    net = gc.Chain.from_torch(model.double())
    cmp = gc.compare_theory(net, batch=4, spectrum=False)
    assert cmp.kind == "residual" and cmp.span == (1, 6) and cmp.sigma_source == "estimated"
    same = gc.Chain([gc.Linear(8, 32), *[gc.Residual([gc.Linear(32, 32), gc.Activation("tanh"),
                                                      gc.Linear(32, 32)], scale=0.5)] * 5,
                     gc.Linear(32, 3)])  # fmt: skip
    same.load_state_dict({k.replace(".mlp.", ".block."): a for k, a in net.state_dict().items()})
    ref = gc.compare_theory(same, batch=4, spectrum=False)
    np.testing.assert_allclose(cmp.measured, ref.measured, rtol=0, atol=1e-12)
    np.testing.assert_allclose(cmp.measured_log10_weight_grad_norms,
                               ref.measured_log10_weight_grad_norms, rtol=0, atol=1e-12)  # fmt: skip
    np.testing.assert_array_equal(cmp.predicted, ref.predicted)


# --------------------------------------------------------------------------------------
# Chains of blocks: what is not covered
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: gc.MLP(depth=3, width=8, norm="rms", residual=True),
         r"blocks are \[Residual\(\[RMSNorm\(8\)"),
        (lambda: gc.MLP(depth=3, width=8, norm="layer"), r"LayerNorm\(8\), Linear\(8, 8\)"),
        (lambda: gc.MLP(depth=3, width=8, norm="batch", residual=True),
         r"Residual\(\[BatchNorm\(8\)"),
        (lambda: gc.Chain([gc.Linear(8, 8)]), r"no run of a supported shape"),
        (lambda: gc.Chain([gc.Residual([gc.Activation("relu"), gc.Linear(8, 16)], shortcut=True),
                           *[gc.Residual([gc.Activation("relu"), gc.Linear(16, 16)])] * 3]),
         r"x 3 \(blocks 1..3\), has blocks before it that holds a residual block"),
        (lambda: gc.Chain([gc.Linear(8, 8), gc.Activation("relu"), gc.Linear(8, 8),
                           gc.Activation("tanh"), gc.Linear(8, 8)]),
         r"blocks after it that holds 2 Linear blocks"),
    ],
)  # fmt: skip
def test_unsupported_chains_say_what_they_found(make, words):
    with pytest.raises(ValueError, match=words) as info:
        gc.compare_theory(make(), spectrum=False)
    msg = str(info.value)
    assert msg.startswith("compare_theory has no theory for this chain")
    for shape in ("[Linear, BatchNorm, Activation] x L in train mode", "pre-LN:", "post-LN:"):
        assert shape in msg


def test_block_chain_bad_input():
    bn = gc.MLP(depth=3, width=8, norm="batch", norm_position="post", seed=0)
    with pytest.raises(ValueError, match=r"batch of at least 4.*got a batch of 3"):
        gc.compare_theory(bn, batch=3)
    with pytest.raises(ValueError, match=r"sigma_b plays no part"):
        gc.compare_theory(bn, sigma_b=0.1)
    with pytest.raises(ValueError, match=r"eval mode.*net.train\(\)"):
        gc.compare_theory(bn.eval())
    wide = gc.Chain([gc.Residual([gc.Linear(8, 32), gc.Activation("relu"), gc.Linear(32, 8)])] * 3,
                    init="xavier_normal")  # fmt: skip
    with pytest.raises(ValueError, match=r"different effective sigma_w.*pass sigma_w="):
        gc.compare_theory(wide)
    assert gc.compare_theory(wide, sigma_w=1.0, spectrum=False).sigma_b_source == "init"
    mixed = gc.Chain([gc.Residual([gc.Linear(8, 8, bias=False), gc.Activation("relu"),
                                   gc.Linear(8, 8)])] * 3, bias_std=0.1)  # fmt: skip
    with pytest.raises(ValueError, match=r"bias_std=0.1 draws the biases of some.*sigma_b="):
        gc.compare_theory(mixed)
    chain = gc.MLP(depth=3, width=8, residual=True).to_chain()
    with pytest.raises(ValueError, match=r"h0 is the initial state of a gradchain.RNN; a Chain"):
        gc.compare_theory(chain, h0=np.ones((1, 2, 8)))
    with pytest.raises(ValueError, match=r"x must have shape"):
        gc.compare_theory(chain, np.ones((2, 7)))
    with pytest.raises(ValueError, match="k must be"):
        gc.compare_theory(chain, k=9)
    with pytest.raises(ValueError, match="fit_start"):
        gc.compare_theory(chain, fit_start=3)
    ln = gc.MLP(depth=3, width=8, norm="layer", residual=True)
    with pytest.raises(ValueError, match=r"q0 must be > 0.*compare_theory passed"):
        gc.compare_theory(ln, np.zeros((2, 8)))


def test_block_chain_presentation():
    net = gc.MLP(depth=8, width=32, activation="relu", norm="layer", norm_position="post",
                 residual=True, init="he_normal", seed=0)  # fmt: skip
    cmp = gc.compare_theory(net, batch=4, k=2)
    d = json.loads(json.dumps(cmp.to_dict()))
    assert d["kind"] == "post_norm" and d["comparison"] == "curve" and d["span"] == [0, 16]
    assert d["q_star"] is None and d["chi_1"] is None and d["phase"] == "not applicable"
    assert len(d["measured_log10_weight_grad_norms"]) == 8 and d["notes"] == []
    lines = cmp.table().splitlines()
    assert lines[0].split()[0] == "block" and "log10|dW|" in lines[0] and "ln|R_11|" in lines[0]
    assert len(lines) == 1 + 9 and len(lines[1].split()) == 4  # block 0 has no weight
    assert len(lines[2].split()) == 8
    s = str(cmp)
    assert "norm_position_grad_norms, position='post'" in s and "over the span" in s
    assert "mean field: q*" not in s
    for a in (cmp.measured, cmp.predicted, cmp.measured_stderr,
              cmp.measured_log10_weight_grad_norms, cmp.predicted_log10_weight_grad_norms):
        assert not a.flags.writeable  # fmt: skip
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    ax = cmp.plot()
    assert len(ax.get_lines()) == 2 and "post norm" in ax.get_title()
    plt.close("all")
