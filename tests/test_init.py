"""Statistical tests of the weight and bias initializers.

Bounds are Z sigma (Z = 5.5: a false alarm about once in 2.6e7 checks) of the exact
sampling distribution of the statistic, computed from the moments of the documented law:
for n i.i.d. entries of mean 0 and variance s2, the mean of squares m2 has standard
deviation sqrt((E w^4 - s2^2) / n) (normal: E w^4 = 3 s2^2; uniform: 9/5 s2^2), and the
fourth moment m4 has standard deviation sqrt((E w^8 - (E w^4)^2) / n).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

Z = 5.5

# (E w^4 / s^4, E w^8 / s^8) for a normal and for a uniform law
MOMENTS = {"normal": (3.0, 105.0), "uniform": (9.0 / 5.0, 81.0 / 9.0)}
# uniform U(-a, a), s^2 = a^2/3: E w^4 = a^4/5 = 9/5 s^4, E w^8 = a^8/9 = 81/9 s^8


def documented_std(init, fan_out, fan_in, gain=1.0, sigma_w=1.0):
    if init in ("xavier_normal", "xavier_uniform"):
        return gain * math.sqrt(2.0 / (fan_in + fan_out))
    if init in ("he_normal", "he_uniform"):
        return gain * math.sqrt(2.0 / fan_in)
    if init == "lecun_normal":
        return gain / math.sqrt(fan_in)
    if init == "normal":
        return gain * sigma_w / math.sqrt(fan_in)
    raise ValueError(init)


def check_moments(w, std, law, what):
    """Mean, variance (mean of squares) and kurtosis of the entries of `w` against a zero
    mean law of standard deviation `std`."""
    w = np.ravel(np.asarray(w, dtype=np.float64))
    n = w.size
    k4, k8 = MOMENTS[law]
    s2 = std * std
    mean = w.mean()
    assert abs(mean) <= Z * std / math.sqrt(n), f"{what}: mean {mean:.3e} (std {std:.3e}, n {n})"
    m2 = np.mean(w * w)
    sd_m2 = s2 * math.sqrt((k4 - 1.0) / n)
    assert abs(m2 - s2) <= Z * sd_m2, (
        f"{what}: mean square {m2:.6e} vs documented {s2:.6e} ({(m2 - s2) / sd_m2:+.1f} sigma)"
    )
    m4 = np.mean(w**4) / (s2 * s2)
    sd_m4 = math.sqrt((k8 - k4 * k4) / n)
    assert abs(m4 - k4) <= Z * sd_m4, (
        f"{what}: fourth moment / std^4 = {m4:.4f}, {law} law has {k4} "
        f"({(m4 - k4) / sd_m4:+.1f} sigma)"
    )


def check_uncorrelated(a, b, what):
    a = np.ravel(a)
    b = np.ravel(b)
    n = min(a.size, b.size)
    a, b = a[:n], b[:n]
    r = np.dot(a, b) / math.sqrt(np.dot(a, a) * np.dot(b, b))
    # for independent zero-mean entries r ~ N(0, 1/n) approximately
    assert abs(r) <= Z / math.sqrt(n), f"{what}: correlation {r:.4f} with n = {n}"


# Shapes (fan_out, fan_in) chosen so fan_in and fan_out formulas differ by a lot.
SHAPES = [(150, 600), (600, 150), (300, 300)]
GAUSSIAN = ["xavier_normal", "he_normal", "lecun_normal", "normal"]
UNIFORM = ["xavier_uniform", "he_uniform"]


@pytest.mark.parametrize("init", GAUSSIAN + UNIFORM)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("gain", [1.0, 2.5])
def test_weight_variance_matches_documented_std(gc, init, shape, gain):
    fan_out, fan_in = shape
    sigma_w = 0.7
    net = gc.MLP(
        depth=None,
        width=[fan_in, fan_out],
        init=init,
        gain=gain,
        sigma_w=sigma_w,
        activation="tanh",
        seed=1234,
    )
    (w,) = net.weights
    assert w.shape == (fan_out, fan_in)
    std = documented_std(init, fan_out, fan_in, gain, sigma_w)
    law = "uniform" if init in UNIFORM else "normal"
    check_moments(w, std, law, f"{init} {shape} gain {gain}")
    # successive entries (generator pairs) are not correlated
    flat = w.ravel()
    check_uncorrelated(flat[0::2], flat[1::2], f"{init}: neighbouring entries")


@pytest.mark.parametrize("init", UNIFORM)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_uniform_bounds(gc, init, shape):
    fan_out, fan_in = shape
    gain = 1.7
    (w,) = gc.MLP(depth=None, width=[fan_in, fan_out], init=init, gain=gain, seed=7).weights
    bound = math.sqrt(3.0) * documented_std(init, fan_out, fan_in, gain)
    if init == "he_uniform":
        assert bound == pytest.approx(gain * math.sqrt(6.0 / fan_in), rel=1e-14)
    else:
        assert bound == pytest.approx(gain * math.sqrt(6.0 / (fan_in + fan_out)), rel=1e-14)
    n = w.size
    assert np.max(np.abs(w)) <= bound
    # P(max |w| < bound (1 - t)) = (1 - t)^n <= exp(-n t): with t = 25 / n, e^-25
    assert np.max(w) >= bound * (1 - 25.0 / n)
    assert np.min(w) <= -bound * (1 - 25.0 / n)
    # both halves of the interval are used evenly: count of positives ~ Binomial(n, 1/2)
    pos = int(np.sum(w > 0))
    assert abs(pos - n / 2) <= Z * math.sqrt(n / 4)


def test_layers_and_biases_are_independent(gc):
    net = gc.MLP(depth=4, width=200, init="xavier_normal", bias_std=1.0, seed=5)
    ws, bs = net.weights, net.biases
    for i in range(3):
        check_uncorrelated(ws[i], ws[i + 1], f"W{i + 1} vs W{i + 2}")
        check_uncorrelated(bs[i], bs[i + 1], f"b{i + 1} vs b{i + 2}")
        check_uncorrelated(ws[i].ravel()[:200], bs[i], f"W{i + 1} vs b{i + 1}")


@pytest.mark.parametrize("bias_std", [0.05, 1.0, 3.0])
def test_bias_std(gc, bias_std):
    net = gc.MLP(depth=40, width=250, init="he_normal", bias_std=bias_std, seed=21)
    b = np.concatenate(net.biases)
    assert b.size == 40 * 250
    check_moments(b, bias_std, "normal", f"biases std {bias_std}")


@pytest.mark.parametrize("init", GAUSSIAN + UNIFORM + ["orthogonal"])
def test_zero_bias_std_gives_zero_biases(gc, init):
    net = gc.MLP(depth=3, width=[5, 7, 6, 2], init=init, seed=3)
    for b, n in zip(net.biases, [7, 6, 2]):
        assert b.shape == (n,)
        np.testing.assert_array_equal(b, 0.0)


# --------------------------------------------------------------------------------------
# orthogonal
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape",
    [(64, 64), (96, 32), (32, 96), (1, 7), (7, 1), (200, 200)],
    ids=lambda s: f"{s[0]}x{s[1]}",
)
@pytest.mark.parametrize("gain", [1.0, 0.3, 4.0])
def test_orthogonal_is_orthogonal(gc, shape, gain):
    fan_out, fan_in = shape
    net = gc.MLP(
        depth=None,
        width=[fan_in, fan_out, fan_in],
        init="orthogonal",
        gain=gain,
        activation="linear",
        seed=17,
    )
    w, w2 = net.weights
    assert w.shape == (fan_out, fan_in) and w2.shape == (fan_in, fan_out)
    for m in (w, w2):
        gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m  # rows / columns orthonormal
        err = np.max(np.abs(gram - gain**2 * np.eye(gram.shape[0])))
        assert err <= 1e-12 * gain**2, f"{m.shape}: max |Gram - gain^2 I| = {err:.2e}"


def test_orthogonal_is_haar(gc):
    """2000 independent 3x3 layers: each entry has mean 0 and E q^2 = 1/3 (Q_ij^2 is
    Beta(1/2, 1) for Haar O(3): variance 4/45), and det = +1 / -1 equally often.  A QR
    without the sign correction of diag(R) fails all three."""
    n, d = 3, 2000
    ws = np.array(gc.MLP(depth=d, width=n, init="orthogonal", activation="linear", seed=8).weights)
    assert ws.shape == (d, n, n)
    mean = ws.mean(axis=0)
    assert np.all(np.abs(mean) <= Z / math.sqrt(n * d)), mean
    sq = (ws**2).mean(axis=0)
    assert np.all(np.abs(sq - 1 / n) <= Z * math.sqrt(4.0 / 45.0 / d)), sq
    dets = np.linalg.det(ws)
    np.testing.assert_allclose(np.abs(dets), 1.0, rtol=1e-12)
    pos = int(np.sum(dets > 0))
    assert abs(pos - d / 2) <= Z * math.sqrt(d / 4), pos


@pytest.mark.parametrize("shape", [(40, 10), (10, 40)], ids=["tall", "wide"])
def test_orthogonal_rectangular_haar_entries(gc, shape):
    """Entries of a Haar (Stiefel) matrix have mean 0 and variance 1/max(fan): check the
    mean of each entry over many layers (not just the fixed total sum of squares)."""
    fan_out, fan_in = shape
    d = 400
    widths = [fan_in] + [fan_out, fan_in] * (d // 2)
    net = gc.MLP(depth=None, width=widths, init="orthogonal", activation="linear", seed=9)
    ws = np.array(net.weights[0::2])
    m = max(shape)
    mean = ws.mean(axis=0)
    # each entry q has variance 1/m; over d/2 layers the mean has sd 1/sqrt(m d/2)
    assert np.max(np.abs(mean)) <= (Z + 1.5) / math.sqrt(m * d / 2)
    # E q^2 = 1/m for every entry position (Beta(1/2, (m-1)/2): var = 2(m-1)/(m^2 (m+2)))
    var_q2 = 2 * (m - 1) / (m * m * (m + 2))
    sq = (ws**2).mean(axis=0)
    assert np.max(np.abs(sq - 1 / m)) <= (Z + 1.5) * math.sqrt(var_q2 / (d / 2))


def test_redrawn_chain_equals_a_fresh_one(gc):
    """A chain redrawn in place (as gc.sweep does from point to point) holds the weights
    of a fresh chain bit for bit: when only the scale changes it rescales the unit draws
    it keeps; a new seed or another family of initializer draws anew."""
    rng = np.random.default_rng(7)
    widths = [5, 7, 3, 4]
    for dtype in ("float64", "float32"):
        net = gc.MLP(depth=3, width=widths, init="normal", dtype=dtype, seed=3)
        # Same family and seed in a row (rescaled), then random changes.
        steps = [("normal", 1.0, 1.5, 0.3, 3), ("he_normal", 2.0, 1.0, 0.0, 3)]
        steps += [("lecun_normal", 0.5, 1.0, 0.7, 3), ("orthogonal", 1.0, 1.0, 0.1, 3)]
        steps += [("orthogonal", 2.5, 1.0, 0.4, 3), ("xavier_uniform", 1.0, 1.0, 0.0, 4)]
        steps += [("he_uniform", 0.3, 1.0, 0.2, 4), ("normal", 1.0, 0.8, 0.5, 4)]
        # New biases only (the weights stay as they are), then weights written from
        # outside between two redraws of the same scale.
        steps += [("normal", 1.0, 0.8, 0.0, 4), ("normal", 1.0, 0.8, 0.9, 4), "write"]
        steps += [("normal", 1.0, 0.8, 0.9, 4), ("normal", 1.0, 0.8, 0.2, 4)]
        # Weights far outside the products' safe band (kept as a power-of-two scaled copy).
        big = 1e290 if dtype == "float64" else 1e30
        steps += [("normal", big, 1.0, 0.0, 4), ("he_normal", 1 / big, 1.0, 0.0, 4)]
        for _ in range(12):
            init = str(rng.choice(gc.INITS))
            seed = int(rng.choice([3, 4]))
            gain, sigma_w = float(rng.uniform(0.2, 3)), float(rng.uniform(0.2, 3))
            bias_std = float(rng.choice([0.0, rng.uniform(0.01, 1)]))
            steps.append((init, gain, sigma_w, bias_std, seed))
        for step in steps:
            if step == "write":
                sd = net.state_dict()
                net._net.load_state_dict({k: v * 0.5 for k, v in sd.items()})
                continue
            init, gain, sigma_w, bias_std, seed = step
            net._config["init"] = init
            net._reinit(gain=gain, sigma_w=sigma_w, bias_std=bias_std, seed=seed)
            fresh = gc.MLP(
                depth=3, width=widths, init=init, gain=gain, sigma_w=sigma_w,
                bias_std=bias_std, dtype=dtype, seed=seed,
            )  # fmt: skip
            what = f"{init} {dtype} seed {seed} gain {gain}"
            for a, b in zip(net.weights + net.biases, fresh.weights + fresh.biases):
                np.testing.assert_array_equal(a, b, err_msg=what)
            x = rng.standard_normal((2, 5))
            np.testing.assert_array_equal(
                net.backward(x).log10_activation_grad_norms,
                fresh.backward(x).log10_activation_grad_norms,
                err_msg=what,
            )
