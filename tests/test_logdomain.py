"""Deep chains where float norms underflow or overflow: log10 norms against closed forms
and against the renormalised NumPy reference."""

from __future__ import annotations

import math

import numpy as np
import oracles as O
import pytest

EPS64 = np.finfo(np.float64).eps
EPS32 = float(np.finfo(np.float32).eps)


def assert_log10_close(actual, expected, rtol=1e-12, atol=1e-13, what=""):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: non-finite log10 values"
    err = np.abs(actual - expected)
    tol = rtol * np.abs(expected) + atol
    bad = np.flatnonzero(err > tol)
    assert bad.size == 0, (
        f"{what}: {bad.size} entries off, first at {bad[0]}: {actual.flat[bad[0]]!r} vs "
        f"{expected.flat[bad[0]]!r} (max err {err.max():.3e})"
    )


def check_against_renormalised(rep, ref, atol, what=""):
    assert_log10_close(rep.log10_weight_grad_norms, ref.log10_weight, atol=atol, what=what + " W")
    assert_log10_close(rep.log10_bias_grad_norms, ref.log10_bias, atol=atol, what=what + " b")
    assert_log10_close(rep.log10_activation_grad_norms, ref.log10_act, atol=atol, what=what + " h")
    assert_log10_close(rep.log10_total_norm, ref.log10_total, atol=atol, what=what + " total")
    if not math.isnan(ref.log10_loss):
        assert_log10_close(rep.log10_loss, ref.log10_loss, atol=atol, what=what + " loss")


# --------------------------------------------------------------------------------------
# scalar linear chain: everything is a power of w
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [5000, pytest.param(100_000, marks=pytest.mark.slow)])
@pytest.mark.parametrize("w", [0.7, 1.3, -1.1])
@pytest.mark.parametrize("loss", ["probe", "grad_output"])
def test_scalar_linear_chain_closed_form(gc, depth, w, loss):
    L = depth
    x = np.array([[0.8], [-1.7], [2.3]])
    g = np.array([[1.5], [0.25], [-0.6]])
    net = gc.MLP.from_weights([np.array([[w]])] * L, None, activation="linear")
    assert net.depth == L
    rep = net.backward(x) if loss == "probe" else net.backward(x, grad_output=g)

    lw = math.log10(abs(w))
    l_idx = np.arange(1, L + 1)  # layers 1..L
    h_idx = np.arange(0, L + 1)  # activations 0..L
    nx = math.log10(np.linalg.norm(x))
    if loss == "probe":
        # h_l = w^l x; dL/dh_l = w^(2L-l) x; dW_l = w^(2L-1) |x|^2; db_l = w^(2L-l) sum x
        act = (2 * L - h_idx) * lw + nx
        wgt = np.full(L, (2 * L - 1) * lw + 2 * nx)
        bia = (2 * L - l_idx) * lw + math.log10(abs(x.sum()))
        log10_loss = math.log10(0.5) + 2 * L * lw + 2 * nx
        assert_log10_close(rep.log10_loss, log10_loss, what="loss")
    else:
        # dL/dh_l = w^(L-l) g; dW_l = w^(L-1) g.x; db_l = w^(L-l) sum g
        act = (L - h_idx) * lw + math.log10(np.linalg.norm(g))
        wgt = np.full(L, (L - 1) * lw + math.log10(abs(float(g.ravel() @ x.ravel()))))
        bia = (L - l_idx) * lw + math.log10(abs(g.sum()))
        assert math.isnan(rep.loss)
    assert_log10_close(rep.log10_activation_grad_norms, act, what="activation grads")
    assert_log10_close(rep.log10_weight_grad_norms, wgt, what="weight grads")
    assert_log10_close(rep.log10_bias_grad_norms, bia, what="bias grads")
    total = O.log10_total_norm(np.concatenate([wgt, bia]), 2.0)
    assert_log10_close(rep.log10_total_norm, total, what="total norm")

    # output h_L = w^L x: 0 / inf with the right sign where it leaves the float range
    with np.errstate(over="ignore", under="ignore"):
        expected = np.sign(x) * np.sign(w) ** L * 10.0 ** (L * lw + np.log10(np.abs(x)))
    assert np.all(np.isinf(expected) | (expected == 0)) == (abs(L * lw) > 400)
    np.testing.assert_allclose(rep.output, expected, rtol=1e-10, atol=0)
    # plain float norms are 0 / inf where their log10 is out of range
    with np.errstate(over="ignore", under="ignore"):
        np.testing.assert_allclose(rep.weight_grad_norms, 10.0**wgt, rtol=1e-9, atol=0)


# --------------------------------------------------------------------------------------
# orthogonal * gain linear chain: every layer scales every norm by exactly `gain`
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("gain", [1.1, 0.9])
def test_orthogonal_linear_chain_closed_form(gc, gain):
    L, n = 20_000, 8
    net = gc.MLP(depth=L, width=n, activation="linear", init="orthogonal", gain=gain, seed=31)
    assert net.log_scale_forward
    x = np.random.default_rng(2).normal(size=(3, n))
    rep = net.backward(x)
    lg = math.log10(gain)
    h_idx = np.arange(L + 1)
    l_idx = np.arange(1, L + 1)
    # dL/dh_L = h_L = x P^T, ||h_L|| = g^L ||x||; dL/dh_l = h_L W_L..W_{l+1}: g^(2L-l) ||x||
    act = (2 * L - h_idx) * lg + math.log10(np.linalg.norm(x))
    # dW_l = (dL/dh_l)^T h_{l-1}: norm g^(2L-1) ||x^T x||_F; db_l = 1^T dL/dh_l: g^(2L-l)|1^T x|
    wgt = np.full(L, (2 * L - 1) * lg + math.log10(np.linalg.norm(x.T @ x)))
    bia = (2 * L - l_idx) * lg + math.log10(np.linalg.norm(x.sum(axis=0)))
    # weights are orthogonal only to rounding: allow a drift of L * eps in each norm
    atol = 4 * L * EPS64
    assert_log10_close(rep.log10_activation_grad_norms, act, atol=atol, what="act")
    assert_log10_close(rep.log10_weight_grad_norms, wgt, atol=atol, what="W")
    assert_log10_close(rep.log10_bias_grad_norms, bia, atol=atol, what="b")
    assert_log10_close(
        rep.log10_loss,
        math.log10(0.5) + 2 * L * lg + 2 * math.log10(np.linalg.norm(x)),
        atol=atol,
        what="loss",
    )
    assert_log10_close(
        rep.log10_total_norm,
        O.log10_total_norm(np.concatenate([wgt, bia])),
        atol=atol,
        what="total",
    )
    if gain > 1:
        assert np.all(np.isinf(rep.output))
        assert np.all(np.isinf(rep.activation_grad_norms))
    else:
        np.testing.assert_array_equal(rep.output, 0.0)
        assert np.all(rep.activation_grad_norms == 0.0)


# --------------------------------------------------------------------------------------
# saturating chains: vanishing gradients vs the renormalised reference
# --------------------------------------------------------------------------------------
def test_sigmoid_5000_layers(gc):
    L = 5000
    net = gc.MLP(
        depth=L, width=8, activation="sigmoid", init="xavier_normal", gain=1.0, bias_std=0.1, seed=3
    )
    x = np.random.default_rng(3).normal(size=(2, 8))
    rep = net.backward(x, return_grads=True)
    ref = O.renormalised_log10_norms(net.weights, net.biases, x, "sigmoid")
    # vanishes to far below the smallest subnormal at layer 1
    assert ref.log10_weight[0] < -2500, ref.log10_weight[0]
    check_against_renormalised(rep, ref, atol=4 * L * EPS64, what="sigmoid")
    assert rep.weight_grad_norms[0] == 0.0 and rep.activation_grad_norms[0] == 0.0
    assert np.isfinite(rep.log10_weight_grad_norms[0])
    assert np.all(rep.weight_grads[0] == 0.0)
    assert np.all(rep.activation_grads[0] == 0.0)
    # near the output the float arrays are still ordinary numbers, and agree
    ref_tail = O.numpy_backward(
        net.weights[-5:],
        net.biases[-5:],
        O.numpy_forward(net.weights[:-5], net.biases[:-5], x, "sigmoid")[1][-1],
        "sigmoid",
    )
    np.testing.assert_allclose(rep.weight_grads[-1], ref_tail.dW[-1], rtol=1e-10, atol=0)


def test_sigmoid_5000_layers_float32(gc):
    """float32 arrays cannot hold 1e-3200 either (min subnormal 1e-45); log10 must."""
    L = 5000
    net = gc.MLP(
        depth=L,
        width=8,
        activation="sigmoid",
        init="xavier_normal",
        bias_std=0.1,
        dtype="float32",
        seed=3,
    )
    x = np.random.default_rng(3).normal(size=(2, 8)).astype(np.float32)
    rep = net.backward(x)
    ref = O.renormalised_log10_norms(net.weights, net.biases, x, "sigmoid")
    assert ref.log10_weight[0] < -2500
    # float32 rounding: a relative error of order eps32 per layer at worst
    check_against_renormalised(rep, ref, atol=L * EPS32, what="sigmoid f32")
    assert rep.weight_grad_norms[0] == 0.0


@pytest.mark.parametrize(
    "act,loss,init,gain",
    [
        ("tanh", "mse", "xavier_normal", 0.6),
        ("gelu", "cross_entropy", "he_normal", 0.8),
        ("softplus", "grad_output", "lecun_normal", 0.8),
        ("silu", "probe", "orthogonal", 0.8),
    ],
)
def test_deep_saturating_chain_losses(gc, act, loss, init, gain):
    L, n, B = 1500, 6, 3
    net = gc.MLP(depth=L, width=n, activation=act, init=init, gain=gain, bias_std=0.05, seed=77)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(B, n))
    kw = {}
    if loss == "mse":
        kw = {"target": rng.normal(size=(B, n))}
    elif loss == "cross_entropy":
        kw = {"target": rng.integers(0, n, size=B)}
    elif loss == "grad_output":
        kw = {"grad_output": rng.normal(size=(B, n))}
    rep = net.backward(x, **kw) if loss == "grad_output" else net.backward(x, loss=loss, **kw)
    ref = O.renormalised_log10_norms(
        net.weights,
        net.biases,
        x,
        act,
        loss,
        target=kw.get("target"),
        grad_output=kw.get("grad_output"),
    )
    assert ref.log10_weight[0] < -320  # the layer-1 float norm underflows
    check_against_renormalised(rep, ref, atol=4 * L * EPS64, what=act)
    assert rep.weight_grad_norms[0] == 0.0


# --------------------------------------------------------------------------------------
# positively homogeneous chains with zero biases: log-scale forward
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "act,init,gain,loss,n",
    [
        ("relu", "he_normal", 30.0, "probe", 16),
        ("leaky_relu", "xavier_uniform", 1e-3, "probe", 7),
        ("linear", "normal", 50.0, "grad_output", 7),
        ("leaky_relu", "orthogonal", 40.0, "grad_output", 7),
    ],
)
def test_homogeneous_chain_log_forward(gc, act, init, gain, loss, n):
    """Forward values far beyond float range: no NonFiniteError, exact log10 norms.
    (relu needs width 16 here: a relu layer kills all n units with probability 2^-n.)"""
    L = 300
    net = gc.MLP(
        depth=L,
        width=[5] + [n] * (L - 1) + [n // 2],
        activation=act,
        init=init,
        gain=gain,
        negative_slope=0.2,
        seed=12,
    )
    assert net.log_scale_forward
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 5))
    kw = {"grad_output": rng.normal(size=(2, n // 2))} if loss == "grad_output" else {}
    rep = net.backward(x, **kw)
    ref = O.renormalised_log10_norms(
        net.weights, None, x, act, loss, grad_output=kw.get("grad_output"), negative_slope=0.2
    )
    assert np.isfinite(ref.log10_output), "chain died"
    assert abs(ref.log10_weight[0]) > 400  # beyond float range
    check_against_renormalised(rep, ref, atol=4 * L * EPS64, what=act)
    if ref.log10_output > 310:  # the largest output entry overflows
        assert not np.all(np.isfinite(rep.output))
    elif ref.log10_output < -330:  # every entry underflows
        np.testing.assert_array_equal(rep.output, 0.0)


@pytest.mark.slow
def test_relu_he_chain_depth_100000(gc):
    # width 24: all units of a zero-bias relu layer die with probability 2^-24 per layer
    L, n = 100_000, 24
    net = gc.MLP(depth=L, width=n, activation="relu", init="he_normal", seed=2024)
    assert net.log_scale_forward
    x = np.random.default_rng(7).normal(size=(1, n))
    rep = net.backward(x)
    ref = O.renormalised_log10_norms(net.weights, None, x, "relu")
    assert np.isfinite(ref.log10_output), "chain died: pick another seed"
    check_against_renormalised(rep, ref, atol=4 * L * EPS64, what="relu 1e5")


def test_relu_chain_that_dies(gc):
    """Width 4: some layer outputs all zeros (probability 1/16 per layer); from then on
    h = 0, so the probe loss and every gradient are exactly 0: log10 = -inf, no errors."""
    L, n = 100_000, 4
    net = gc.MLP(depth=L, width=n, activation="relu", init="he_normal", seed=5)
    x = np.random.default_rng(8).normal(size=(2, n))
    h = x
    for w in net.weights[:2000]:
        h = np.maximum(h @ w.T, 0.0)
        if not np.any(h):
            break
    assert not np.any(h), "expected the chain to die within 2000 layers"
    rep = net.backward(x)
    np.testing.assert_array_equal(rep.output, 0.0)
    assert rep.loss == 0.0 and rep.log10_loss == -math.inf
    assert np.all(rep.log10_weight_grad_norms == -math.inf)
    assert np.all(rep.log10_bias_grad_norms == -math.inf)
    assert np.all(rep.log10_activation_grad_norms == -math.inf)
    assert rep.log10_total_norm == -math.inf and rep.total_norm == 0.0


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "linear"])
def test_batch_rows_of_very_different_scales(gc, act):
    """Rows 2^600 apart in scale (each half of the batch may run on its own thread with
    its own exponents, reconciled afterwards): norms still match the reference."""
    L, n = 60, 24  # 2^17 multiply-adds: enough for the two-thread forward split
    net = gc.MLP(depth=L, width=n, activation=act, init="he_normal", negative_slope=0.2, seed=5)
    rng = np.random.default_rng(9)
    x = rng.normal(size=(4, n))
    x[:2] *= 2.0**-300
    x[2:] *= 2.0**300
    rep = net.backward(x)
    ref = O.renormalised_log10_norms(net.weights, None, x, act, negative_slope=0.2)
    assert np.isfinite(ref.log10_output), "chain died"
    check_against_renormalised(rep, ref, atol=4 * L * EPS64, what=act)
    # The small rows' gradients are still there, 2^600 below the large ones.
    full = net.backward(x, return_grads=True)
    small = full.activation_grads[0][:2]
    large = full.activation_grads[0][2:]
    ratio = np.log2(np.linalg.norm(large)) - np.log2(np.linalg.norm(small))
    assert 590 < ratio < 610


# --------------------------------------------------------------------------------------
# the edges of the float range: signals that decay below it, operands beyond it
# --------------------------------------------------------------------------------------
needs_ld = pytest.mark.skipif(not O.HAVE_LONGDOUBLE, reason="needs x87 long double")


@needs_ld
@pytest.mark.parametrize("act", ["tanh", "silu", "elu", "gelu", "gelu_tanh"])
def test_small_signal_carried_below_the_float_range(gc, act):
    """A zero-bias chain whose activation is linear near 0 decays to 1e-1975: the forward
    pass carries the small signal's scale, and every norm matches a plain long-double
    computation (which needs no rescaling down to 1e-4951)."""
    L, n = 3000, 8
    gain = 0.5 if act in ("tanh", "elu") else 1.0  # the others have slope 1/2 at 0
    net = gc.MLP(depth=L, width=n, activation=act, gain=gain, seed=1)
    x = np.random.default_rng(0).standard_normal((3, n))
    rep = net.backward(x)
    ref = O.longdouble_backward(net.weights, None, x, act)
    assert ref.log10_output < -900  # float64 says 0 here
    # Long double itself runs out near 1e-4930 (the early layers' bias gradients).
    for name, want in (
        ("log10_weight_grad_norms", ref.log10_weight),
        ("log10_bias_grad_norms", ref.log10_bias),
        ("log10_activation_grad_norms", ref.log10_act),
    ):
        got = getattr(rep, name)
        assert np.all(np.isfinite(got)), name
        ok = want > -4900
        assert ok.sum() > L // 4
        assert_log10_close(got[ok], want[ok], atol=1e-11, what=f"{act} {name}")
    assert_log10_close(rep.log10_loss, ref.log10_loss, atol=1e-11)
    np.testing.assert_array_equal(rep.output, 0.0)


@needs_ld
@pytest.mark.slow
def test_tanh_30000_layers_is_not_silently_zero(gc):
    """Every activation of this near-default chain underflows float64 past layer 2000 or
    so; the log10 norms match long double (float64 used to say -inf everywhere)."""
    net = gc.MLP(depth=30_000, width=16, activation="tanh", seed=0)
    x = np.random.default_rng(0).standard_normal((4, 16))
    rep = net.backward(x)
    ref = O.longdouble_backward(net.weights, None, x, "tanh")
    assert ref.log10_output < -400
    check_against_renormalised(rep, ref, atol=1e-10, what="tanh 30000")


@needs_ld
def test_subnormal_float32_silu_chain(gc):
    """Near-default use: float32 activations pass 1e-38 around layer 130. No NaN; every
    norm within float32 rounding of the long-double truth."""
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    net = gc.MLP(depth=200, width=4, activation="silu", dtype="float32", seed=5)
    rep = net.backward(x)
    w64 = [w.astype(np.float64) for w in net.weights]
    ref = O.longdouble_backward(w64, None, x, "silu")
    assert ref.log10_output < -40
    check_against_renormalised(rep, ref, atol=1e-5, what="silu f32")


@needs_ld
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_subnormal_input(gc, dtype):
    tiny = 1e-320 if dtype == "float64" else 1e-44
    net = gc.MLP(depth=3, width=2, seed=0, dtype=dtype)
    x = np.full((2, 2), tiny, dtype=dtype)
    rep = net.backward(x)
    ref = O.longdouble_backward([w.astype(np.float64) for w in net.weights], None, x, "tanh")
    check_against_renormalised(rep, ref, atol=1e-11 if dtype == "float64" else 1e-6)


@needs_ld
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
def test_norms_of_huge_gradients(gc, batch, norm_type):
    """Squares of 1e200 overflow and of 1e-200 underflow: the batch-1 outer-product norms,
    the activation-gradient norms and the loss stay exact."""
    net = gc.MLP(depth=1, width=4, activation="linear", gain=1e200, seed=3)
    x = np.random.default_rng(1).standard_normal((batch, 4))
    ref = O.longdouble_backward(net.weights, None, x, "linear")
    check_against_renormalised(net.backward(x), ref, atol=1e-12)
    rep = net.backward(x, max_norm=1.0, norm_type=norm_type, return_grads=True)
    grads = [rep.weight_grads[0], rep.bias_grads[0]]
    assert all(np.all(np.isfinite(g)) for g in grads)  # clipped to max_norm 1
    assert_log10_close(math.log10(gc.get_total_norm(grads, norm_type=norm_type)), 0.0, atol=1e-9)
    assert rep.log10_total_norm > 199

    g = np.full((batch, 4), 1e-200)
    rep = net.backward(x, grad_output=g)
    ref = O.longdouble_backward(net.weights, None, x, "linear", "grad_output", grad_output=g)
    check_against_renormalised(rep, ref, atol=1e-12)


def test_weight_gradient_product_beyond_the_float_range(gc):
    """dW_2 = g^T h_1 with h_1 = 1e300 and g = 1e10: 2e310, beyond float64."""
    net = gc.MLP.from_weights([[[1e300]], [[1.0]]], [[1.0], [0.0]], activation="linear")
    rep = net.backward(np.ones((2, 1)), grad_output=np.full((2, 1), 1e10))
    assert_log10_close(rep.log10_weight_grad_norms, [math.log10(2e10), 10 + 300 + math.log10(2)])
    h = 10 + 0.5 * math.log10(2)
    assert_log10_close(rep.log10_activation_grad_norms, [300 + h, h, h], atol=1e-12)
    assert np.isinf(rep.activation_grad_norms[0])


@pytest.mark.parametrize("norm_type", [1000.0, 0.5, 7.0])
def test_in_chain_clipping_with_large_and_small_norm_types(gc, norm_type):
    """|g|^1000 overflows for |g| > 2.03: the total still matches get_total_norm, and the
    gradients are clipped."""
    net = gc.MLP(depth=3, width=3, activation="linear", gain=3.0, seed=0)
    x = np.ones((2, 3))
    plain = net.backward(x, return_grads=True)
    grads = [a.copy() for pair in zip(plain.weight_grads, plain.bias_grads) for a in pair]
    total = gc.get_total_norm(grads, norm_type=norm_type)
    assert np.max(np.abs(np.concatenate([g.ravel() for g in grads]))) > 2.1
    rep = net.backward(x, max_norm=0.5, norm_type=norm_type, return_grads=True)
    assert math.isclose(rep.total_norm, total, rel_tol=1e-12)
    clipped = [a for pair in zip(rep.weight_grads, rep.bias_grads) for a in pair]
    assert math.isclose(gc.get_total_norm(clipped, norm_type=norm_type), 0.5, rel_tol=1e-6)
    assert math.isclose(rep.clipped_total_norm, 0.5, rel_tol=1e-6)


@pytest.mark.parametrize("act", ["sigmoid", "softplus"])
def test_forward_underflow_is_an_error_not_minus_inf(gc, act):
    """sigmoid(-800) is 1e-348: below float64, and sigmoid is not linear near 0, so the
    scale cannot be carried; the pass raises, naming the layer."""
    w = [np.full((2, 2), 1.0), np.full((2, 2), -1000.0), np.full((2, 2), 1.0)]
    net = gc.MLP.from_weights(w, [np.zeros(2), np.zeros(2), np.zeros(2)], activation=act)
    with pytest.raises(gc.NonFiniteError, match=r"underflowed.*layer 2 of 3") as err:
        net.backward(np.ones((1, 2)))
    assert err.value.index == 2


@needs_ld
@pytest.mark.parametrize(
    "act,bias",
    [("linear", False), ("relu", False), ("tanh", False), ("gelu", False), ("linear", True)],
)
def test_weights_near_the_ends_of_the_float_range(gc, act, bias):
    """Layers scaled by 1e280 and 1e-280 in turn: every product h W and dz W leaves the
    float range unless the weights' scale is carried apart from them."""
    rng = np.random.default_rng(3)
    n, L = 5, 6
    ws = [rng.standard_normal((n, n)) * (1e280 if l % 2 == 0 else 1e-280) for l in range(L)]
    bs = [rng.standard_normal(n) * 1e-3 for _ in range(L)] if bias else None
    x = rng.standard_normal((2, n)) * 1e-290
    net = gc.MLP.from_weights(ws, bs, activation=act)
    rep = net.backward(x)
    ref = O.longdouble_backward(ws, bs, x, act)
    check_against_renormalised(rep, ref, atol=1e-12, what=act)


@needs_ld
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_output_beyond_the_float_range_above_a_biased_layer(gc, dtype):
    """Linear layers, the third with a bias, the last without one and with weights of
    about 4e154 (4e19 in float32): the output of the first example is beyond the float
    range, that of the second is not. The exponent is carried to the output, which is inf
    exactly where its true value overflows and the true value elsewhere, while
    output_mantissa * 2**output_log2_scale holds it exactly and the loss and every norm
    are those of the long-double reference."""
    big = 1e155 if dtype == "float64" else 1e20
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal((3, 1)), rng.standard_normal((1, 3)) * 0.5,
          rng.standard_normal((7, 1)), rng.standard_normal((1, 7)) * big / 3]  # fmt: skip
    bs = [np.zeros(3), np.zeros(1), rng.standard_normal(7), np.zeros(1)]
    ws, bs = ([a.astype(dtype) for a in v] for v in (ws, bs))
    x = np.array([[big], [big * 1e-10]], dtype=dtype)
    net = gc.MLP.from_weights(ws, bs, activation="linear", dtype=dtype)
    assert not net.log_scale_forward
    rep = net.backward(x)
    h = x.astype(O.LD)
    for w, b in zip(ws, bs):
        h = h @ w.astype(O.LD).T + b.astype(O.LD)
    fmax = np.finfo(dtype).max
    assert abs(h[0, 0]) > fmax and abs(h[1, 0]) < fmax / 1e5
    assert rep.output_log2_scale > 0 and rep.output.dtype == rep.output_mantissa.dtype == dtype
    assert np.isinf(rep.output[0, 0]) and np.sign(rep.output[0, 0]) == np.sign(h[0, 0])
    rtol = 1e-15 if dtype == "float64" else 1e-6
    np.testing.assert_allclose(float(rep.output[1, 0]), float(h[1, 0]), rtol=rtol)
    exact = np.ldexp(rep.output_mantissa.astype(O.LD), rep.output_log2_scale)
    assert np.all(np.abs(exact / h - 1) < rtol), (exact, h)
    ref = O.longdouble_backward(ws, bs, x, "linear")
    check_against_renormalised(rep, ref, atol=1e-12 if dtype == "float64" else 1e-6)


def _log10_norm_scaled(a):
    """log10 ||a|| without underflow (for gradients near the bottom of the doubles)."""
    a = np.abs(np.asarray(a, dtype=np.float64)).ravel()
    m = a.max(initial=0.0)
    if m == 0:
        return -math.inf
    k = math.frexp(m)[1]
    return math.log10(np.linalg.norm(np.ldexp(a, -k))) + k * math.log10(2.0)


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
def test_clipped_gradients_of_a_total_norm_beyond_the_doubles(gc, norm_type):
    """A total norm of about 1e397 gives a clip coefficient of about 1e-397, below the
    doubles; the clipped gradients are ordinary numbers and must be returned as such."""
    net = gc.MLP(width=[2, 1, 7, 2, 7, 8, 7, 2], activation="leaky_relu", negative_slope=0.2,
                 init="he_normal", gain=0.5, sigma_w=0.5, bias_std=1e200, seed=2313)  # fmt: skip
    x = np.random.default_rng(10540).standard_normal((1, 2)) * 0.5
    rep = net.backward(x, return_grads=True, max_norm=10.0, norm_type=norm_type)
    assert rep.log10_total_norm > 390 and rep.log10_clip_coef < -380
    for l in range(1, net.depth):
        want = rep.log10_weight_grad_norms[l] + rep.log10_clip_coef
        assert abs(_log10_norm_scaled(rep.weight_grads[l]) - want) < 1e-12 * max(1.0, abs(want))


@pytest.mark.parametrize("norm_type", [2.0, 0.5])
@pytest.mark.parametrize(
    "dtype,bias,max_norm",
    [("float64", 1e155, 1e-6), ("float64", 1e150, 1e-15), ("float32", 1e18, 1e-4)],
    ids=["float64-total-beyond-the-doubles", "float64-total-1e300", "float32-total-1e36"],
)
def test_clip_coefficient_below_the_normal_floats(gc, dtype, bias, max_norm, norm_type):
    """A bias of 1e155 (1e150; 1e18 in float32) makes the last layer's weight gradient
    about 1e310 (1e300; 1e36), and max_norm puts the clipping coefficient near 1e-317
    (1e-315; 1e-40): a subnormal, with some 20 of its 53 bits (6 of 24). It is carried as
    m * 2^k instead, so every clipped gradient is the unclipped one times the coefficient
    to rounding, and its norm is the reported one."""
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal((1, 1)), rng.standard_normal((1, 1)), rng.standard_normal((4, 1)),
          rng.standard_normal((1, 4)) * 1.5]  # fmt: skip
    bs = [np.zeros(1), np.zeros(1), rng.standard_normal(4) * bias, np.zeros(1)]
    net = gc.MLP.from_weights(ws, bs, activation="linear", dtype=dtype)
    x = np.full((1, 1), 0.5, dtype)
    kw = {"target": np.full((1, 1), 0.25, dtype), "loss": "mse", "return_grads": True}
    full = net.backward(x, **kw)
    rep = net.backward(x, max_norm=max_norm, norm_type=norm_type, **kw)
    tiny = np.finfo(dtype)
    assert math.log10(tiny.smallest_subnormal) < rep.log10_clip_coef < math.log10(tiny.tiny)
    tol = 1e-11 if dtype == "float64" else 2e-7  # decades
    for l in range(net.depth):
        got, want = _log10_norm_scaled(rep.weight_grads[l]), rep.log10_clipped_weight_grad_norms[l]
        assert abs(got - want) < tol, (l, got, want)
        unclipped = np.asarray(full.weight_grads[l], np.float64)
        if np.isfinite(unclipped).all():  # entry by entry (the ratio itself is subnormal)
            clipped = np.asarray(rep.weight_grads[l], np.float64)
            assert np.array_equal(np.sign(clipped), np.sign(unclipped))
            ratio = np.log10(np.abs(clipped)) - np.log10(np.abs(unclipped))
            np.testing.assert_allclose(ratio, rep.log10_clip_coef, rtol=0, atol=tol)


def test_recurrent_clipped_gradients_below_the_doubles_coefficient(gc):
    sd = {
        "weight_ih_l0": np.array([[0.3], [-0.2], [0.4]]) * 1e-200,
        "weight_hh_l0": np.array([[0.0], [0.5], [0.0]]),
        "weight_ih_l1": np.array([[0.7], [-1.1], [0.2]]) * 1e-300,
        "weight_hh_l1": np.full((3, 1), 1e40),
        "readout.weight": np.array([[1.0], [-0.5], [0.3], [0.8]]),
        "readout.bias": np.array([0.1, -0.2, 0.3, 0.05]),
    }
    rnn = gc.RNN.from_state_dict(sd, "gru")
    x = np.array([0.4, -0.3, 0.6]).reshape(3, 1, 1)
    h0 = np.array([0.8, -1.2]).reshape(2, 1, 1)
    target = np.full((3, 1, 4), 1e-310)
    rep = rnn.backward(x, target=target, loss="mse", h0=h0, return_grads=True, max_norm=1e-250)
    assert rep.log10_clip_coef < -320
    checked = 0
    for name, g in rep.param_grads.items():
        want = rep.log10_param_grad_norms[name] + rep.log10_clip_coef
        if want > -300:  # representable without subnormal rounding
            assert abs(_log10_norm_scaled(g) - want) < 1e-12 * abs(want), name
            checked += 1
    assert checked >= 1
