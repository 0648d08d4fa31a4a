"""gradchain.MLP against independent oracles (torch autograd and a NumPy reference)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import oracles as O
import pytest
from checks import assert_arrays, assert_log10, assert_scalar
from conftest import ACTIVATIONS, CONFIGS, INITS, THREADED_CONFIGS, ChainConfig, needs_torch, torch
from hypothesis import given, settings
from hypothesis import strategies as st

RTOL = 1e-10


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def _backward(net, cfg: ChainConfig, x, kw, **extra):
    if cfg.loss == "grad_output":
        return net.backward(x, **kw, **extra)
    return net.backward(x, loss=cfg.loss, **kw, **extra)


def _oracle(fn, weights, biases, cfg: ChainConfig, x, kw, **extra):
    return fn(
        weights,
        biases,
        x,
        cfg.activation,
        cfg.loss,
        target=kw.get("target"),
        grad_output=kw.get("grad_output"),
        **cfg.act_kwargs(),
        **extra,
    )


def assert_norms(actual, expected, rtol, what):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=0, err_msg=what)


def check_report(rep, ref, rtol, grads=True, p=2.0):
    depth = len(ref.dW)
    wn, bn, an = O.frob_norms(ref.dW), O.frob_norms(ref.db), O.frob_norms(ref.dh)
    assert rep.weight_grad_norms.shape == (depth,)
    assert rep.activation_grad_norms.shape == (depth + 1,)
    assert_norms(rep.weight_grad_norms, wn, rtol, "weight_grad_norms")
    assert_norms(rep.bias_grad_norms, bn, rtol, "bias_grad_norms")
    assert_norms(rep.activation_grad_norms, an, rtol, "activation_grad_norms")
    assert_log10(rep.log10_weight_grad_norms, wn, rtol, "log10_weight_grad_norms")
    assert_log10(rep.log10_bias_grad_norms, bn, rtol, "log10_bias_grad_norms")
    assert_log10(rep.log10_activation_grad_norms, an, rtol, "log10_activation_grad_norms")
    assert_scalar(rep.loss, ref.loss, rtol, "loss")
    if math.isnan(ref.loss):
        assert math.isnan(rep.log10_loss)
    elif ref.loss > 0:
        assert abs(rep.log10_loss - math.log10(ref.loss)) <= rtol, "log10_loss"
    total = (
        O.pnorm(ref.dW_unclipped + ref.db_unclipped, p)
        if hasattr(ref, "dW_unclipped")
        else O.pnorm(ref.dW + ref.db, p)
    )
    assert_scalar(rep.total_norm, total, rtol, "total_norm")
    if total > 0:
        assert abs(rep.log10_total_norm - math.log10(total)) <= rtol, "log10_total_norm"
    assert rep.norm_type == p
    assert_arrays([rep.output], [ref.output], rtol, "output")
    if grads:
        assert_arrays(rep.weight_grads, ref.dW, rtol, "weight_grads")
        assert_arrays(rep.bias_grads, ref.db, rtol, "bias_grads")
        assert_arrays(rep.activation_grads, ref.dh, rtol, "activation_grads")


# --------------------------------------------------------------------------------------
# the oracles agree with each other (so that a failure below is gradchain's)
# --------------------------------------------------------------------------------------
@needs_torch
@pytest.mark.parametrize("cfg", CONFIGS[::2], ids=[c.id for c in CONFIGS[::2]])
def test_oracles_agree(cfg):
    rng = np.random.default_rng(cfg.seed)
    w = [
        rng.normal(size=(cfg.widths[i + 1], cfg.widths[i])) * cfg.gain / math.sqrt(cfg.widths[i])
        for i in range(cfg.depth)
    ]
    b = [rng.normal(size=n) * cfg.bias_std for n in cfg.widths[1:]]
    x, kw = cfg.make_data()
    a = _oracle(O.numpy_backward, w, b, cfg, x, kw)
    t = _oracle(O.torch_backward, w, b, cfg, x, kw)
    check_report_pair = [(a.dW, t.dW), (a.db, t.db), (a.dh, t.dh), ([a.output], [t.output])]
    for u, v in check_report_pair:
        assert_arrays(u, v, 1e-12, "numpy vs torch")
    assert_scalar(a.loss, t.loss, 1e-12, "loss")
    r = _oracle(O.renormalised_log10_norms, w, b, cfg, x, kw, log_forward=False)
    assert_log10(r.log10_weight, O.frob_norms(t.dW), 1e-12, "renormalised weight")
    assert_log10(r.log10_act, O.frob_norms(t.dh), 1e-12, "renormalised act")
    assert_log10(r.log10_bias, O.frob_norms(t.db), 1e-12, "renormalised bias")


def test_configs_cover_everything():
    pairs = {(c.activation, c.loss) for c in CONFIGS}
    assert pairs == {(a, lo) for a in ACTIVATIONS for lo in O.LOSSES}
    assert {c.init for c in CONFIGS} == set(INITS)
    for a in ACTIVATIONS:
        assert len({c.init for c in CONFIGS if c.activation == a}) >= 3, a
    assert any(c.bias_std > 0 for c in CONFIGS) and any(c.bias_std == 0 for c in CONFIGS)
    assert max(c.depth for c in CONFIGS) >= 10 and min(c.depth for c in CONFIGS) <= 2


def test_nonfinite_error_type(gc):
    assert issubclass(gc.NonFiniteError, FloatingPointError)


# --------------------------------------------------------------------------------------
# float64 parity on the random configurations
# --------------------------------------------------------------------------------------
@needs_torch
def test_parity_torch(gc, config):
    net = config.make_net(gc)
    x, kw = config.make_data()
    assert [w.shape for w in net.weights] == [
        (config.widths[i + 1], config.widths[i]) for i in range(config.depth)
    ]
    rep = _backward(net, config, x, kw, return_grads=True)
    ref = _oracle(O.torch_backward, net.weights, net.biases, config, x, kw)
    check_report(rep, ref, RTOL)


@needs_torch
@pytest.mark.parametrize("cfg", THREADED_CONFIGS, ids=[c.id for c in THREADED_CONFIGS])
def test_parity_torch_two_threads(gc, cfg):
    """Chains big enough for the two-thread forward split and backward pipeline."""
    work = sum(cfg.batch * a * b for a, b in zip(cfg.widths[:-1], cfg.widths[1:]))
    assert work >= 2**16 and cfg.batch >= 2
    net = cfg.make_net(gc)
    x, kw = cfg.make_data()
    rep = _backward(net, cfg, x, kw, return_grads=True)
    ref = _oracle(O.torch_backward, net.weights, net.biases, cfg, x, kw)
    check_report(rep, ref, RTOL)


def test_parity_numpy(gc, config):
    net = config.make_net(gc)
    x, kw = config.make_data()
    rep = _backward(net, config, x, kw)
    ref = _oracle(O.numpy_backward, net.weights, net.biases, config, x, kw)
    check_report(rep, ref, RTOL, grads=False)
    assert rep.weight_grads is None and rep.bias_grads is None and rep.activation_grads is None
    assert rep.max_norm is None


def test_report_to_dict_is_json(gc):
    cfg = CONFIGS[0]
    net = cfg.make_net(gc)
    x, kw = cfg.make_data()
    rep = _backward(net, cfg, x, kw, return_grads=True, max_norm=0.5)
    s = json.dumps(rep.to_dict())
    assert isinstance(json.loads(s), dict)


def test_backward_is_deterministic(gc):
    cfg = CONFIGS[1]
    net = cfg.make_net(gc)
    x, kw = cfg.make_data()
    r1 = _backward(net, cfg, x, kw, return_grads=True)
    r2 = _backward(net, cfg, x, kw, return_grads=True)
    np.testing.assert_array_equal(r1.log10_weight_grad_norms, r2.log10_weight_grad_norms)
    for a, b in zip(r1.weight_grads, r2.weight_grads):
        np.testing.assert_array_equal(a, b)


@needs_torch
def test_defaults_probe_and_mse(gc):
    """No loss given: probe without target, and the documented probe value."""
    net = gc.MLP(depth=3, width=[4, 6, 5, 3], activation="tanh", seed=3)
    x = np.random.default_rng(0).normal(size=(5, 4))
    rep = net.backward(x)
    ref = O.torch_backward(net.weights, net.biases, x, "tanh", "probe")
    check_report(rep, ref, RTOL, grads=False)
    assert_scalar(rep.loss, 0.5 * float(np.sum(ref.output**2)), 1e-12, "probe")


# --------------------------------------------------------------------------------------
# float32 against torch float32
# --------------------------------------------------------------------------------------
@needs_torch
@pytest.mark.parametrize("cfg", CONFIGS[1::2], ids=[c.id for c in CONFIGS[1::2]])
def test_parity_torch_float32(gc, cfg):
    net = cfg.make_net(gc, dtype="float32")
    assert all(w.dtype == np.float32 for w in net.weights)
    x, kw = cfg.make_data()
    x = x.astype(np.float32)
    kw = {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in kw.items()}
    rep = _backward(net, cfg, x, kw)
    ref = _oracle(O.torch_backward, net.weights, net.biases, cfg, x, kw, dtype="float32")
    rtol = 1e-4
    assert_norms(rep.weight_grad_norms, O.frob_norms(ref.dW), rtol, "weight_grad_norms f32")
    assert_norms(rep.bias_grad_norms, O.frob_norms(ref.db), rtol, "bias_grad_norms f32")
    assert_norms(rep.activation_grad_norms, O.frob_norms(ref.dh), rtol, "act_grad_norms f32")
    assert_log10(rep.log10_weight_grad_norms, O.frob_norms(ref.dW), rtol, "log10 f32")
    assert_scalar(rep.loss, ref.loss, rtol, "loss f32")
    np.testing.assert_allclose(
        rep.output, ref.output, rtol=rtol, atol=rtol * np.abs(ref.output).max()
    )


def test_float32_accepts_numpy_dtype(gc):
    a = gc.MLP(depth=2, width=3, dtype=np.float32, seed=1)
    b = gc.MLP(depth=2, width=3, dtype="float32", seed=1)
    c = gc.MLP(depth=2, width=3, dtype=np.float64, seed=1)
    for wa, wb, wc in zip(a.weights, b.weights, c.weights):
        assert wa.dtype == np.float32 and wc.dtype == np.float64
        np.testing.assert_array_equal(wa, wb)


# --------------------------------------------------------------------------------------
# hypothesis: free-form small chains against the NumPy oracle
# --------------------------------------------------------------------------------------
@st.composite
def chains(draw):
    act = draw(st.sampled_from(ACTIVATIONS))
    init = draw(st.sampled_from(INITS))
    loss = draw(st.sampled_from(O.LOSSES))
    depth = draw(st.integers(1, 6))
    widths = draw(st.lists(st.integers(1, 9), min_size=depth + 1, max_size=depth + 1))
    if loss == "cross_entropy":
        widths[-1] = max(widths[-1], 2)
    sat = act not in ("relu", "leaky_relu", "linear")
    hi = 0.7 if (sat and init.startswith("he")) else (3.0 if act == "sigmoid" else 1.0)
    return ChainConfig(
        activation=act,
        init=init,
        widths=tuple(widths),
        batch=draw(st.integers(1, 6)),
        loss=loss,
        gain=draw(st.floats(0.3, hi)),
        bias_std=draw(st.sampled_from([0.0, 0.1, 0.5])),
        sigma_w=draw(st.floats(0.5, 1.0)),
        negative_slope=draw(st.sampled_from([0.01, 0.1, 0.3])),
        alpha=draw(st.sampled_from([0.5, 1.0, 1.7])),
        input_scale=draw(st.sampled_from([0.5, 1.0, 2.5])),
        seed=draw(st.integers(0, 2**40)),
    )


@settings(max_examples=60, deadline=None)
@given(cfg=chains())
def test_hypothesis_parity_numpy(cfg):
    import gradchain as gc

    net = cfg.make_net(gc)
    x, kw = cfg.make_data()
    rep = _backward(net, cfg, x, kw, return_grads=True)
    ref = _oracle(O.numpy_backward, net.weights, net.biases, cfg, x, kw)
    check_report(rep, ref, RTOL)


@settings(max_examples=30, deadline=None)
@given(
    cfg=chains(),
    norm_type=st.sampled_from([1.0, 1.5, 2.0, 3.0, math.inf]),
    frac=st.sampled_from([0.0, 0.1, 0.5, 0.99, 3.0]),
)
@needs_torch
def test_hypothesis_clipping(cfg, norm_type, frac):
    import gradchain as gc

    net = cfg.make_net(gc)
    x, kw = cfg.make_data()
    ref0 = _oracle(O.numpy_backward, net.weights, net.biases, cfg, x, kw)
    max_norm = frac * O.pnorm(ref0.dW + ref0.db, norm_type)
    _check_clip(net, cfg, x, kw, max_norm, norm_type)


# --------------------------------------------------------------------------------------
# clipping vs torch.nn.utils.clip_grad_norm_
# --------------------------------------------------------------------------------------
def _check_clip(net, cfg, x, kw, max_norm, norm_type):
    rep = _backward(net, cfg, x, kw, return_grads=True, max_norm=max_norm, norm_type=norm_type)
    ref = _oracle(
        O.torch_backward,
        net.weights,
        net.biases,
        cfg,
        x,
        kw,
        max_norm=max_norm,
        norm_type=norm_type,
    )
    assert rep.max_norm == max_norm
    assert rep.norm_type == norm_type
    total = ref.total_norm
    assert_scalar(rep.total_norm, total, RTOL, "total_norm (clip_grad_norm_'s return)")
    coef = min(1.0, max_norm / (total + 1e-6))
    assert_scalar(rep.clip_coef, coef, 1e-12, "clip_coef")
    if coef > 0:
        assert abs(rep.log10_clip_coef - math.log10(coef)) <= 1e-12
    else:
        assert rep.log10_clip_coef == -math.inf
    # norms before clipping are the unclipped ones, after clipping torch's clipped ones
    assert_norms(rep.weight_grad_norms, O.frob_norms(ref.dW_unclipped), RTOL, "unclipped W")
    assert_norms(rep.bias_grad_norms, O.frob_norms(ref.db_unclipped), RTOL, "unclipped b")
    assert_norms(rep.clipped_weight_grad_norms, O.frob_norms(ref.dW), RTOL, "clipped W")
    assert_norms(rep.clipped_bias_grad_norms, O.frob_norms(ref.db), RTOL, "clipped b")
    assert_norms(rep.clipped_weight_grad_norms, rep.weight_grad_norms * coef, 1e-12, "W*coef")
    assert_norms(rep.clipped_bias_grad_norms, rep.bias_grad_norms * coef, 1e-12, "b*coef")
    assert_log10(rep.log10_clipped_weight_grad_norms, O.frob_norms(ref.dW), RTOL, "log10 W")
    assert_log10(rep.log10_clipped_bias_grad_norms, O.frob_norms(ref.db), RTOL, "log10 b")
    assert_scalar(
        rep.clipped_total_norm, O.pnorm(ref.dW + ref.db, norm_type), RTOL, "clipped total"
    )
    # the returned arrays are the clipped ones
    assert_arrays(rep.weight_grads, ref.dW, RTOL, "clipped weight_grads")
    assert_arrays(rep.bias_grads, ref.db, RTOL, "clipped bias_grads")
    return rep


CLIP_CFGS = [c for c in CONFIGS if c.loss != "cross_entropy" or c.widths[-1] > 1][:6]


@needs_torch
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.5], ids=["l2", "linf", "l1.5"])
@pytest.mark.parametrize("frac", [0.3, 0.999, 5.0, 0.0], ids=["clip", "edge", "noclip", "zero"])
@pytest.mark.parametrize("cfg", CLIP_CFGS, ids=[c.id for c in CLIP_CFGS])
def test_clipping_matches_torch(gc, cfg, frac, norm_type):
    net = cfg.make_net(gc)
    x, kw = cfg.make_data()
    ref0 = _oracle(O.numpy_backward, net.weights, net.biases, cfg, x, kw)
    total = O.pnorm(ref0.dW + ref0.db, norm_type)
    assert total > 0
    rep = _check_clip(net, cfg, x, kw, frac * total, norm_type)
    if frac == 5.0:
        assert rep.clip_coef == 1.0
    elif frac < 1:
        assert rep.clip_coef < 1.0
        # max_norm / (total + 1e-6) * total
        np.testing.assert_allclose(rep.clipped_total_norm, frac * total, rtol=1e-6 / total)


@needs_torch
def test_no_clipping_report(gc):
    cfg = CONFIGS[2]
    net = cfg.make_net(gc)
    x, kw = cfg.make_data()
    rep = _backward(net, cfg, x, kw, return_grads=True, norm_type=math.inf)
    ref = _oracle(O.torch_backward, net.weights, net.biases, cfg, x, kw)
    assert rep.max_norm is None
    assert rep.clip_coef == 1.0
    assert rep.norm_type == math.inf
    assert_scalar(rep.total_norm, O.pnorm(ref.dW + ref.db, math.inf), RTOL, "inf total")
    assert_arrays(rep.weight_grads, ref.dW, RTOL, "weight_grads (unclipped)")


# --------------------------------------------------------------------------------------
# from_weights round trip with torch.nn.Sequential
# --------------------------------------------------------------------------------------
SEQ_ACTS = {
    "linear": lambda: torch.nn.Identity(),
    "sigmoid": lambda: torch.nn.Sigmoid(),
    "tanh": lambda: torch.nn.Tanh(),
    "relu": lambda: torch.nn.ReLU(),
    "leaky_relu": lambda: torch.nn.LeakyReLU(0.01),
    "elu": lambda: torch.nn.ELU(),
    "gelu": lambda: torch.nn.GELU(),
    "gelu_tanh": lambda: torch.nn.GELU(approximate="tanh"),
    "silu": lambda: torch.nn.SiLU(),
    "softplus": lambda: torch.nn.Softplus(),
}


@needs_torch
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_from_weights_torch_sequential(gc, act):
    torch.manual_seed(ACTIVATIONS.index(act))
    widths = [6, 9, 4, 7, 3]
    mods = []
    for i in range(len(widths) - 1):
        mods += [torch.nn.Linear(widths[i], widths[i + 1], dtype=torch.float64), SEQ_ACTS[act]()]
    seq = torch.nn.Sequential(*mods)
    lins = [m for m in seq if isinstance(m, torch.nn.Linear)]
    ws = [m.weight.detach().numpy().copy() for m in lins]
    bs = [m.bias.detach().numpy().copy() for m in lins]
    net = gc.MLP.from_weights(ws, bs, activation=act)
    assert net.depth == 4
    for a, b in zip(net.weights, ws):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(net.biases, bs):
        np.testing.assert_array_equal(a, b)

    x = np.random.default_rng(5).normal(size=(4, 6)) * 1.5
    xt = torch.tensor(x, requires_grad=True)
    out = seq(xt)
    (0.5 * out.pow(2).sum()).backward()
    rep = net.backward(x, return_grads=True)
    assert_arrays(rep.weight_grads, [m.weight.grad.numpy() for m in lins], RTOL, "dW")
    assert_arrays(rep.bias_grads, [m.bias.grad.numpy() for m in lins], RTOL, "db")
    assert_arrays([rep.activation_grads[0]], [xt.grad.numpy()], RTOL, "dx")
    assert_arrays([rep.output], [out.detach().numpy()], RTOL, "output")


@needs_torch
def test_from_weights_no_biases(gc):
    rng = np.random.default_rng(1)
    ws = [rng.normal(size=(5, 3)) / 2, rng.normal(size=(2, 5)) / 2]
    net = gc.MLP.from_weights(ws, None, activation="relu")
    for b, w in zip(net.biases, ws):
        np.testing.assert_array_equal(b, np.zeros(w.shape[0]))
    x = rng.normal(size=(3, 3))
    rep = net.backward(x, return_grads=True)
    check_report(rep, O.torch_backward(ws, None, x, "relu"), RTOL)


def test_from_weights_of_generated_net(gc):
    cfg = CONFIGS[3]
    net = cfg.make_net(gc)
    net2 = gc.MLP.from_weights(
        net.weights,
        net.biases,
        activation=cfg.activation,
        negative_slope=cfg.negative_slope,
        alpha=cfg.alpha,
    )
    x, kw = cfg.make_data()
    r1, r2 = _backward(net, cfg, x, kw), _backward(net2, cfg, x, kw)
    np.testing.assert_array_equal(r1.log10_weight_grad_norms, r2.log10_weight_grad_norms)
    np.testing.assert_array_equal(r1.log10_activation_grad_norms, r2.log10_activation_grad_norms)


# --------------------------------------------------------------------------------------
# reproducibility
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", INITS)
def test_same_seed_same_weights(gc, init):
    kw = {"depth": None, "width": [7, 5, 9, 4], "activation": "tanh", "init": init, "bias_std": 0.3}
    a, b = gc.MLP(seed=11, **kw), gc.MLP(seed=11, **kw)
    c = gc.MLP(seed=12, **kw)
    for wa, wb, wc in zip(a.weights, b.weights, c.weights):
        np.testing.assert_array_equal(wa, wb)
        assert not np.any(wa == wc), "different seeds should give different weights"
    for ba, bb, bc in zip(a.biases, b.biases, c.biases):
        np.testing.assert_array_equal(ba, bb)
        assert not np.any(ba == bc)
    # layers differ from each other
    assert not np.array_equal(a.weights[0][:4, :4], a.weights[1][:4, :4])


@pytest.mark.parametrize("init", INITS)
def test_float32_weights_are_rounded_float64(gc, init):
    kw = {
        "depth": None,
        "width": [6, 8, 8, 3],
        "init": init,
        "gain": 1.3,
        "bias_std": 0.2,
        "seed": 99,
    }
    n64 = gc.MLP(dtype="float64", **kw)
    n32 = gc.MLP(dtype="float32", **kw)
    for w64, w32 in zip(n64.weights, n32.weights):
        assert w32.dtype == np.float32
        np.testing.assert_array_equal(w32, w64.astype(np.float32))
    for b64, b32 in zip(n64.biases, n32.biases):
        np.testing.assert_array_equal(b32, b64.astype(np.float32))


# --------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------
def _net(gc, **kw):
    base = {"depth": 2, "width": [4, 5, 3], "activation": "tanh", "seed": 0}
    base.update(kw)
    return gc.MLP(**base)


X = np.ones((2, 4))
BAD = [
    # constructor
    ("depth0", lambda gc: gc.MLP(depth=0, width=4), ValueError, "depth"),
    ("depth-neg", lambda gc: gc.MLP(depth=-3, width=4), ValueError, "depth"),
    ("depth-float", lambda gc: gc.MLP(depth=2.5, width=4), (TypeError, ValueError), "depth"),
    ("width0", lambda gc: gc.MLP(depth=3, width=0), ValueError, "width"),
    ("width-neg", lambda gc: gc.MLP(depth=3, width=-2), ValueError, "width"),
    ("width-seq-0", lambda gc: gc.MLP(depth=None, width=[4, 0, 3]), ValueError, "width"),
    ("width-float", lambda gc: gc.MLP(depth=3, width=2.5), (TypeError, ValueError), "width"),
    ("depth-mismatch", lambda gc: gc.MLP(depth=5, width=[4, 3, 2]), ValueError, "depth"),
    (
        "dtype-f16",
        lambda gc: gc.MLP(depth=2, width=3, dtype="float16"),
        (ValueError, TypeError),
        "dtype",
    ),
    (
        "dtype-int",
        lambda gc: gc.MLP(depth=2, width=3, dtype=np.int32),
        (ValueError, TypeError),
        "dtype",
    ),
    (
        "dtype-junk",
        lambda gc: gc.MLP(depth=2, width=3, dtype="double!"),
        (ValueError, TypeError),
        "dtype",
    ),
    ("gain-nan", lambda gc: gc.MLP(depth=2, width=3, gain=float("nan")), ValueError, "gain"),
    ("gain-inf", lambda gc: gc.MLP(depth=2, width=3, gain=float("inf")), ValueError, "gain"),
    ("bias_std-neg", lambda gc: gc.MLP(depth=2, width=3, bias_std=-1.0), ValueError, "bias_std"),
    (
        "bias_std-nan",
        lambda gc: gc.MLP(depth=2, width=3, bias_std=float("nan")),
        ValueError,
        "bias_std",
    ),
    (
        "sigma_w-inf",
        lambda gc: gc.MLP(depth=2, width=3, init="normal", sigma_w=math.inf),
        ValueError,
        "sigma_w",
    ),
    ("memory", lambda gc: gc.MLP(depth=10, width=10**6), MemoryError, "bytes"),
    # backward: x
    ("x-shape", lambda gc: _net(gc).backward(np.ones((2, 5))), ValueError, "x"),
    ("x-3d", lambda gc: _net(gc).backward(np.ones((2, 4, 1))), ValueError, "x"),
    (
        "x-complex",
        lambda gc: _net(gc).backward(np.ones((2, 4), complex)),
        (TypeError, ValueError),
        "x",
    ),
    ("x-str", lambda gc: _net(gc).backward(np.full((2, 4), "a")), (TypeError, ValueError), "x"),
    (
        "x-nan",
        lambda gc: _net(gc).backward(np.where(np.eye(2, 4) > 0, np.nan, 1.0)),
        ValueError,
        "x",
    ),
    ("x-inf", lambda gc: _net(gc).backward(np.full((2, 4), -np.inf)), ValueError, "x"),
    # losses and targets
    (
        "loss-name",
        lambda gc: _net(gc).backward(X, np.ones((2, 3)), loss="hinge"),
        ValueError,
        "loss",
    ),
    ("mse-no-target", lambda gc: _net(gc).backward(X, loss="mse"), ValueError, "target"),
    (
        "mse-shape",
        lambda gc: _net(gc).backward(X, np.ones((2, 4)), loss="mse"),
        ValueError,
        "target",
    ),
    (
        "mse-nan",
        lambda gc: _net(gc).backward(X, np.full((2, 3), np.nan), loss="mse"),
        ValueError,
        "target",
    ),
    (
        "mse-complex",
        lambda gc: _net(gc).backward(X, np.ones((2, 3), complex), loss="mse"),
        (TypeError, ValueError),
        "target",
    ),
    (
        "ce-float",
        lambda gc: _net(gc).backward(X, np.array([0.0, 1.0]), loss="cross_entropy"),
        (TypeError, ValueError),
        "target|label",
    ),
    (
        "ce-shape",
        lambda gc: _net(gc).backward(X, np.array([0, 1, 2]), loss="cross_entropy"),
        ValueError,
        "target|label",
    ),
    (
        "ce-2d",
        lambda gc: _net(gc).backward(X, np.zeros((2, 3), np.int64), loss="cross_entropy"),
        ValueError,
        "target|label",
    ),
    (
        "ce-range",
        lambda gc: _net(gc).backward(X, np.array([0, 3]), loss="cross_entropy"),
        ValueError,
        "target|label",
    ),
    (
        "ce-neg",
        lambda gc: _net(gc).backward(X, np.array([-1, 0]), loss="cross_entropy"),
        ValueError,
        "target|label",
    ),
    (
        "go-shape",
        lambda gc: _net(gc).backward(X, grad_output=np.ones((2, 4))),
        ValueError,
        "grad_output",
    ),
    (
        "go-inf",
        lambda gc: _net(gc).backward(X, grad_output=np.full((2, 3), np.inf)),
        ValueError,
        "grad_output",
    ),
    (
        "go-nan",
        lambda gc: _net(gc).backward(X, grad_output=np.full((2, 3), np.nan)),
        ValueError,
        "grad_output",
    ),
    # from_weights
    (
        "fw-chain",
        lambda gc: gc.MLP.from_weights([np.ones((3, 4)), np.ones((2, 5))]),
        ValueError,
        "weights",
    ),
    (
        "fw-bias",
        lambda gc: gc.MLP.from_weights([np.ones((3, 4))], [np.ones(4)]),
        ValueError,
        "biases",
    ),
    ("fw-nan", lambda gc: gc.MLP.from_weights([np.full((3, 4), np.nan)]), ValueError, "weights"),
    (
        "fw-act",
        lambda gc: gc.MLP.from_weights([np.ones((3, 4))], activation="swish"),
        ValueError,
        "activation",
    ),
]


@pytest.mark.parametrize("make,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs(gc, make, exc, match):
    with pytest.raises(exc, match=match):
        make(gc)


FLOAT32_MAX = "3.4028235e+38"


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"gain": 1e40}, "gain"),
        ({"gain": -3e38, "init": "he_normal"}, "gain"),  # weights up to 12 gain at fan_in 1
        ({"gain": 3e38, "init": "xavier_uniform"}, "gain"),  # up to 1.22 gain
        ({"init": "normal", "sigma_w": 1e30, "gain": 1e10}, "gain * sigma_w"),
        ({"bias_std": 1e38}, "bias_std"),
        ({"activation": "leaky_relu", "negative_slope": -1e39}, "negative_slope"),
        ({"activation": "elu", "alpha": 1e39}, "alpha"),
    ],
)
def test_float32_parameters_beyond_float32_are_refused(gc, kwargs, name):
    """A parameter that makes a float32 weight, bias or activation constant overflow is
    refused when the chain is built, naming it, its value and float32's largest value."""
    with pytest.raises(ValueError) as info:
        gc.MLP(width=[1, 3, 2], dtype="float32", **kwargs)
    msg = str(info.value)
    assert msg.startswith(f"{name} must be at most") and FLOAT32_MAX in msg, msg
    if name.startswith("gain"):
        value = kwargs["gain"] * kwargs.get("sigma_w", 1.0)
    else:
        value = kwargs[name]
    assert f"got {value!r}" in msg, msg


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_largest_accepted_gain_draws_finite_weights(gc, init, dtype):
    """Just below the refused gain every weight is finite, just above it is refused: the
    bound is the scale at the smallest fan times the largest draw."""
    widths = [1, 4, 2, 3]
    with pytest.raises(ValueError, match=r"gain.* must be at most (\S+) in magnitude") as info:
        gc.MLP(width=widths, init=init, gain=float(np.finfo(dtype).max), dtype=dtype)
    bound = float(str(info.value).split("at most ")[1].split(" ")[0])
    for seed in range(5):
        net = gc.MLP(width=widths, init=init, gain=0.999 * bound, dtype=dtype, seed=seed)
        assert all(np.isfinite(w).all() for w in net.weights)
    with pytest.raises(ValueError, match="gain"):
        gc.MLP(width=widths, init=init, gain=1.001 * bound, dtype=dtype)


def test_float32_weights_beyond_float32_are_refused(gc):
    """float64 arrays with values float32 cannot hold: a ValueError naming the array, the
    index and float32's largest value (and no RuntimeWarning from the cast)."""
    w = np.ones((2, 3))
    w[1, 2] = -1e40
    top = re.escape(FLOAT32_MAX)
    match = rf"weights\[1\] has -1e\+40 at index \(1, 2\), beyond the largest float32 value {top}"
    with pytest.raises(ValueError, match=match):
        gc.MLP.from_weights([np.ones((3, 3)), w], dtype="float32")
    net = gc.MLP.from_weights([np.ones((3, 3))], dtype="float32")
    with pytest.raises(ValueError, match=rf"x has 1e\+39 at index \(0, 1\), beyond .* {top}"):
        net.backward(np.array([[1.0, 1e39, 0.0]]))


@pytest.mark.parametrize("what", ["activation", "init"])
def test_unknown_name_lists_valid_names(gc, what):
    with pytest.raises(ValueError, match=what) as ei:
        gc.MLP(depth=2, width=3, **{what: "nonesuch"})
    for name in {"activation": ACTIVATIONS, "init": INITS}[what]:
        assert name in str(ei.value), f"{name!r} missing from: {ei.value}"


def test_unknown_loss_lists_valid_names(gc):
    with pytest.raises(ValueError, match="loss") as ei:
        _net(gc).backward(X, loss="nonesuch")
    for name in ("probe", "mse", "cross_entropy"):
        assert name in str(ei.value)


# --------------------------------------------------------------------------------------
# NonFiniteError
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "act,dtype",
    [("linear", "float64"), ("relu", "float64"), ("linear", "float32"), ("elu", "float64")],
)
def test_forward_overflow_raises_nonfinite(gc, act, dtype):
    net = gc.MLP(
        depth=200,
        width=8,
        activation=act,
        init="xavier_normal",
        gain=1e3,
        bias_std=1.0,
        dtype=dtype,
        seed=4,
    )
    x = np.random.default_rng(0).normal(size=(3, 8)).astype(dtype)
    first = O.first_nonfinite_layer(net.weights, net.biases, x, act, dtype=dtype)
    assert first is not None and 1 < first < 200
    with pytest.raises(gc.NonFiniteError) as ei:
        net.backward(x)
    assert isinstance(ei.value, FloatingPointError)
    assert ei.value.where == "forward"
    assert ei.value.index == first


# --------------------------------------------------------------------------------------
# every branch of every activation: identity weights, so z = x sweeps [-45, 45]
# --------------------------------------------------------------------------------------
Z_SWEEP = np.concatenate(
    [
        np.linspace(-45.0, 45.0, 181),
        [
            0.0,
            -0.0,
            1e-300,
            -1e-300,
            20.0,
            np.nextafter(20.0, 21.0),
            np.nextafter(20.0, 19.0),
            -20.0,
            1e-8,
            -1e-8,
            3.0,
            -3.0,
            0.5,
            -0.5,
        ],
    ]
)
EPS = np.finfo(np.float64).eps


def _elementwise_tol(z, ref):
    """1e-12 relative plus the conditioning of the tanh/erf based forms: an error of one
    ulp in tanh(u) or erf(u) near +-1 moves phi'(z) by about |z| (1 + 3 kappa z^2) eps in
    gelu_tanh (the 1 - t^2 cancellation), so allow 8 eps (1 + z^2) absolute."""
    return 1e-12 * np.abs(ref) + 8 * EPS * (1 + z * z)


def _assert_elementwise(actual, expected, z, what):
    actual = np.asarray(actual, dtype=np.float64).ravel()
    expected = np.asarray(expected, dtype=np.float64).ravel()
    tol = _elementwise_tol(np.ravel(z), expected)
    bad = np.flatnonzero(~(np.abs(actual - expected) <= tol))
    assert bad.size == 0, "; ".join(
        f"{what}(z={z.ravel()[i]!r}): {actual[i]!r} vs torch {expected[i]!r}" for i in bad[:5]
    )


@needs_torch
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("slope_alpha", [(0.01, 1.0), (0.3, 0.4)], ids=["default", "custom"])
def test_activation_branches_vs_torch(gc, act, slope_alpha):
    slope, alpha = slope_alpha
    n = Z_SWEEP.size
    x = Z_SWEEP.reshape(1, n)
    net = gc.MLP.from_weights([np.eye(n)], None, activation=act, negative_slope=slope, alpha=alpha)
    g = np.linspace(0.5, 1.5, n).reshape(1, n)
    rep = net.backward(x, grad_output=g, return_grads=True)
    ref = O.torch_backward(
        [np.eye(n)], None, x, act, "grad_output", grad_output=g, negative_slope=slope, alpha=alpha
    )
    _assert_elementwise(rep.output, ref.output, x, "phi")
    _assert_elementwise(rep.activation_grads[0], ref.dh[0], x, "g*phi'")
    ours = O.numpy_backward(
        [np.eye(n)], None, x, act, "grad_output", grad_output=g, negative_slope=slope, alpha=alpha
    )
    _assert_elementwise(ours.dh[0], ref.dh[0], x, "oracle g*phi'")


@needs_torch
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "linear"])
def test_subnormal_inputs_vs_torch(gc, act):
    """Subnormal entries next to ordinary ones (positively homogeneous, zero biases, so
    the log-scale forward is used): torch keeps relu'(5e-324) = 1 and h = x exactly."""
    x = np.array([[5e-324, -5e-324, 1e-320, 1e-310, 2.0, 45.0]])
    n = x.shape[1]
    g = np.ones((1, n))
    net = gc.MLP.from_weights([np.eye(n)], None, activation=act)
    rep = net.backward(x, grad_output=g, return_grads=True)
    ref = O.torch_backward([np.eye(n)], None, x, act, "grad_output", grad_output=g)
    np.testing.assert_array_equal(rep.activation_grads[0], ref.dh[0], err_msg="g*phi'")
    np.testing.assert_array_equal(rep.output, ref.output, err_msg="phi")


@needs_torch
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activation_branches_vs_torch_float32(gc, act):
    n = Z_SWEEP.size
    x = Z_SWEEP.reshape(1, n).astype(np.float32)
    w = np.eye(n, dtype=np.float32)
    net = gc.MLP.from_weights([w], None, activation=act, dtype="float32")
    g = np.linspace(0.5, 1.5, n).reshape(1, n).astype(np.float32)
    rep = net.backward(x, grad_output=g, return_grads=True)
    ref = O.torch_backward([w], None, x, act, "grad_output", grad_output=g, dtype="float32")
    assert rep.activation_grads[0].dtype == np.float32
    np.testing.assert_allclose(rep.output, ref.output, rtol=1e-5, atol=1e-6, err_msg="phi")
    np.testing.assert_allclose(
        rep.activation_grads[0], ref.dh[0], rtol=1e-5, atol=1e-6, err_msg="phi'"
    )


def test_backward_memory_counts_stored_activations(gc):
    widths = [7, 11, 5, 3]
    tanh = gc.MLP(width=widths, activation="tanh", seed=0)
    gelu = gc.MLP(width=widths, activation="gelu", seed=0)
    b = 13
    acts = b * sum(widths) * 8
    # gelu also keeps the pre-activations of layers 1..L
    assert gelu.backward_memory(b) - tanh.backward_memory(b) == b * sum(widths[1:]) * 8
    assert tanh.backward_memory(b) >= acts
    # return_grads keeps every parameter gradient and the gradient at every block boundary:
    # the layer outputs h_l (acts) and the Linear outputs z_l
    grads = sum(o * i + o for i, o in zip(widths[:-1], widths[1:])) * 8 + acts
    grads += b * sum(widths[1:]) * 8
    assert tanh.backward_memory(b, return_grads=True) - tanh.backward_memory(b) == grads
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        tanh.backward_memory(0)


@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.5, 0.7])
@pytest.mark.parametrize("act", ["tanh", "relu", "gelu"])
def test_single_example_norms_in_every_norm_type(gc, act, norm_type):
    """With batch 1 the weight gradient is an outer product and its norms are taken
    without forming it: they must still equal the norms of the explicit matrices."""
    widths = [9, 14, 6, 11, 5]
    net = gc.MLP(width=widths, activation=act, init="he_normal", gain=0.8, bias_std=0.2, seed=4)
    x = np.random.default_rng(1).normal(size=(1, widths[0]))
    rep = net.backward(x, max_norm=0.05, norm_type=norm_type)
    ref = O.numpy_backward(net.weights, net.biases, x, act)
    np.testing.assert_allclose(rep.weight_grad_norms, O.frob_norms(ref.dW), rtol=1e-12)
    total = O.pnorm(ref.dW + ref.db, norm_type)
    assert rep.total_norm == pytest.approx(total, rel=1e-12)
    assert rep.clip_coef == pytest.approx(min(1.0, 0.05 / (total + 1e-6)), rel=1e-12)


@needs_torch
def test_from_weights_takes_torch_parameters_as_they_are(gc):
    torch.manual_seed(0)
    lins = [torch.nn.Linear(5, 7, dtype=torch.float64), torch.nn.Linear(7, 3, dtype=torch.float64)]
    net = gc.MLP.from_weights([m.weight for m in lins], [m.bias for m in lins], activation="relu")
    assert net.dtype == np.float64
    for w, m in zip(net.weights, lins):
        np.testing.assert_array_equal(w, m.weight.detach().numpy())


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_pickle_round_trip(gc, dtype):
    import pickle

    net = gc.MLP(depth=6, width=[5, 8, 8, 7, 6, 4, 3], activation="elu", alpha=0.7,
                 bias_std=0.3, dtype=dtype, seed=11)
    clone = pickle.loads(pickle.dumps(net))
    assert repr(clone) == repr(net) and clone.dtype == net.dtype
    x = np.random.default_rng(2).normal(size=(4, 5))
    a, b = net.backward(x), clone.backward(x)
    np.testing.assert_array_equal(a.log10_weight_grad_norms, b.log10_weight_grad_norms)
    np.testing.assert_array_equal(a.output, b.output)


@pytest.mark.parametrize("cfg", CONFIGS[:8], ids=[c.id for c in CONFIGS[:8]])
def test_forward_matches_numpy(gc, cfg):
    net = cfg.make_net(gc)
    x, _ = cfg.make_data()
    _, hs = O.numpy_forward(net.weights, net.biases, x, cfg.activation, **cfg.act_kwargs())
    out = net.forward(x)
    np.testing.assert_allclose(out, hs[-1], rtol=RTOL, atol=1e-300)


def test_forward_reports_overflow_and_bad_input(gc):
    net = gc.MLP(depth=200, width=6, activation="linear", gain=1e3, bias_std=1.0, seed=1)
    with pytest.raises(gc.NonFiniteError) as err:
        net.forward(np.ones((2, 6)))
    assert err.value.where == "forward" and 1 <= err.value.index <= 200
    with pytest.raises(ValueError, match=r"x must have shape \(any, 6\)"):
        net.forward(np.ones((2, 5)))
