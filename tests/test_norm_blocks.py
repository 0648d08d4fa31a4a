"""The normalisation blocks (LayerNorm, RMSNorm, BatchNorm) in chains of blocks: against
PyTorch autograd and an independent NumPy reference on randomly drawn chains, their
Jacobian products, exactness in log space at the edges of the float range, bad input."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import oracles as O
import pytest
from checks import assert_close
from conftest import ACTIVATIONS, needs_torch, torch
from gradchain import _core

NORM_KINDS = ("layer_norm", "rms_norm", "batch_norm")
EPSES = (1e-5, 1e-3, 0.1, 1e-9)
MOMENTA = (0.1, None, 0.5, 1.0, 0.0)
LOG10_2 = math.log10(2.0)


# --------------------------------------------------------------------------------------
# randomly drawn chains
# --------------------------------------------------------------------------------------
def linear(i, o, bias=True):
    return {"kind": "linear", "in_features": int(i), "out_features": int(o), "bias": bool(bias)}


def act(w, name, negative_slope=0.01, alpha=1.0):
    return {
        "kind": "activation",
        "width": int(w),
        "activation": name,
        "negative_slope": negative_slope,
        "alpha": alpha,
    }


def layer_norm(w, eps=1e-5, elementwise_affine=True, bias=True):
    return {
        "kind": "layer_norm",
        "width": int(w),
        "eps": eps,
        "elementwise_affine": elementwise_affine,
        "bias": bias,
    }


def rms_norm(w, eps=None, elementwise_affine=True):
    return {
        "kind": "rms_norm",
        "width": int(w),
        "eps": eps,
        "elementwise_affine": elementwise_affine,
    }


def batch_norm(w, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True):
    return {
        "kind": "batch_norm",
        "width": int(w),
        "eps": eps,
        "momentum": momentum,
        "affine": affine,
        "track_running_stats": track_running_stats,
    }


def residual(body, scale=1.0, shortcut=None):
    return {"kind": "residual", "body": body, "scale": scale, "shortcut": shortcut}


def _norm(rng, w, kinds=NORM_KINDS):
    kind = kinds[rng.integers(len(kinds))]
    eps = float(EPSES[rng.integers(len(EPSES))])
    if kind == "layer_norm":
        return layer_norm(w, eps, bool(rng.random() < 0.8), bool(rng.random() < 0.7))
    if kind == "rms_norm":
        return rms_norm(w, None if rng.random() < 0.4 else eps, bool(rng.random() < 0.8))
    return batch_norm(
        w,
        eps,
        MOMENTA[rng.integers(len(MOMENTA))],
        bool(rng.random() < 0.8),
        bool(rng.random() < 0.8),
    )


def _act(rng, w):
    return act(w, ACTIVATIONS[rng.integers(len(ACTIVATIONS))], 0.1, 0.7)


def _draw_specs(rng):
    """A chain of 3..8 top-level blocks mixing the norms with linear layers, activations and
    pre-norm, post-norm, shortcut and nested residual blocks."""
    w = int(rng.integers(3, 11))
    specs = [linear(rng.integers(2, 9), w, rng.random() < 0.7)]
    for _ in range(int(rng.integers(2, 7))):
        pattern = rng.choice(["norm", "act", "linear", "pre", "post", "shortcut", "nested"])
        s = float(rng.choice([1.0, 0.5, -0.3]))
        h = int(rng.integers(3, 13))
        if pattern == "norm":
            specs.append(_norm(rng, w))
        elif pattern == "act":
            specs.append(_act(rng, w))
        elif pattern == "linear":
            w2 = int(rng.integers(3, 11))
            specs.append(linear(w, w2, rng.random() < 0.6))
            w = w2
        elif pattern == "pre":
            body = [_norm(rng, w), linear(w, h), _act(rng, h), linear(h, w, rng.random() < 0.5)]
            specs.append(residual(body, s))
        elif pattern == "post":
            specs.append(residual([linear(w, h), _act(rng, h), linear(h, w)], s))
            specs.append(_norm(rng, w))
        elif pattern == "shortcut":
            w2 = int(rng.integers(3, 11))
            body = [_norm(rng, w), linear(w, w2)]
            specs.append(residual(body, s, linear(w, w2, rng.random() < 0.5)))
            w = w2
        else:
            inner = residual([_norm(rng, w), linear(w, w)], 0.5)
            specs.append(residual([inner, _act(rng, w), _norm(rng, w)], s))
    if rng.random() < 0.5:
        specs.append(linear(w, int(rng.integers(2, 7)), rng.random() < 0.5))
    return specs


def _walk(specs):
    for s in specs:
        yield s
        if s["kind"] == "residual":
            yield from _walk(s["body"] + ([s["shortcut"]] if s["shortcut"] else []))


def _has_kind(specs, kind):
    for s in specs:
        if s["kind"] == kind:
            return True
        if s["kind"] == "residual" and (
            _has_kind(s["body"], kind) or (s["shortcut"] and _has_kind([s["shortcut"]], kind))
        ):
            return True
    return False


@dataclass(frozen=True)
class NormConfig:
    specs: list
    batch: int
    train: bool
    loss: str
    seed: int

    @property
    def id(self):
        kinds = [
            s["kind"] if s["kind"] != "residual" else f"res[{len(s['body'])}]" for s in self.specs
        ]
        mode = "train" if self.train else "eval"
        return f"{'-'.join(kinds)}-b{self.batch}-{mode}-{self.loss}-s{self.seed}"


def draw_norm_configs(n=40, seed=1234):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        specs = _draw_specs(rng)
        # every block kind and both modes in the first few
        if k < 6:
            specs.append(_norm(rng, _out_width(specs), (NORM_KINDS[k % 3],)))
        out.append(
            NormConfig(
                specs=specs,
                batch=int(rng.integers(2, 10)),
                train=bool(k % 2 == 0) if k < 12 else bool(rng.random() < 0.6),
                loss=O.LOSSES[k % 4],
                seed=int(rng.integers(2**31)),
            )
        )
    return out


def _out_width(specs):
    last = specs[-1]
    if last["kind"] == "linear":
        return last["out_features"]
    if last["kind"] == "residual":
        return _out_width(last["body"])
    return last["width"]


def build(specs, seed, dtype="float64"):
    """The core chain with Linear weights drawn by init and every norm parameter and buffer
    drawn at random (not left at 1 and 0), and the parameters as {torch name: array}."""
    rng = np.random.default_rng(seed)
    ch = (_core.Chain64 if dtype == "float64" else _core.Chain32)(specs)
    ch.init("xavier_normal", 1.0, 1.0, 0.2, seed)
    for i, (name, shape, _buffer) in enumerate(ch.parameters):
        leaf = name.rsplit(".", 1)[1]
        size = int(np.prod(shape))
        if leaf == "weight" and len(shape) == 1:
            ch.set_param(i, 1.0 + 0.3 * rng.normal(size=size))
        elif leaf == "bias" and _is_norm_param(specs, name):
            ch.set_param(i, 0.2 * rng.normal(size=size))
        elif leaf == "running_mean":
            ch.set_param(i, 0.5 * rng.normal(size=size))
        elif leaf == "running_var":
            ch.set_param(i, rng.uniform(0.5, 2.0, size=size))
        elif leaf == "num_batches_tracked":
            ch.set_param(i, np.array([float(rng.integers(0, 5))]))
    params = {name: np.array(ch.param(i)) for i, (name, _, _) in enumerate(ch.parameters)}
    return ch, params


def _spec_at(specs, name):
    parts = name.split(".")[:-1]
    spec = {"kind": "residual", "body": specs, "shortcut": None}
    k = 0
    while k < len(parts):
        if parts[k] == "block":
            k += 1
            continue
        if parts[k] == "shortcut":
            spec = spec["shortcut"]
        else:
            spec = spec["body"][int(parts[k])]
        k += 1
    return spec


def _is_norm_param(specs, name):
    return _spec_at(specs, name)["kind"] in ("layer_norm", "rms_norm", "batch_norm")


def make_data(cfg, pass_, in_width, out_width):
    rng = np.random.default_rng(cfg.seed + 7919 * pass_)
    x = rng.normal(size=(cfg.batch, in_width)) * 1.5 + 0.3
    target = grad = None
    if cfg.loss == "mse":
        target = rng.normal(size=(cfg.batch, out_width))
    elif cfg.loss == "cross_entropy":
        target = rng.integers(0, out_width, size=cfg.batch).astype(np.int64)
    elif cfg.loss == "grad_output":
        grad = rng.normal(size=(cfg.batch, out_width))
    return x, target, grad


def core_backward(ch, cfg, x, target, grad):
    tgt = grad if cfg.loss == "grad_output" else target
    return ch.backward(x, cfg.loss, tgt, True, -1.0, 2.0, cfg.train)


def buffers_of(ch):
    return {n: np.array(ch.param(i)) for i, (n, _, b) in enumerate(ch.parameters) if b}


NORM_CONFIGS = draw_norm_configs()


def test_configs_cover_every_norm_kind_mode_and_pattern():
    all_specs = [c.specs for c in NORM_CONFIGS]
    for kind in ("layer_norm", "rms_norm", "batch_norm", "residual"):
        assert sum(_has_kind(s, kind) for s in all_specs) >= 5, kind
    bn_train = [c for c in NORM_CONFIGS if c.train and _has_kind(c.specs, "batch_norm")]
    bn_eval = [c for c in NORM_CONFIGS if not c.train and _has_kind(c.specs, "batch_norm")]
    assert len(bn_train) >= 5 and len(bn_eval) >= 5
    flat = [s for specs in all_specs for s in _walk(specs)]
    assert any(s["kind"] == "residual" and s["shortcut"] for s in flat)
    assert any(s["kind"] == "residual" and _has_kind(s["body"], "residual") for s in flat)
    assert any(s["kind"] == "batch_norm" and s["momentum"] is None for s in flat)
    assert any(s["kind"] == "rms_norm" and s["eps"] is None for s in flat)
    assert {c.loss for c in NORM_CONFIGS} == set(O.LOSSES)


def _compare(res, ref, names, rtol, what):
    """Output, every parameter and boundary gradient and their log10 norms. A gradient that
    is zero in exact arithmetic (a Linear bias feeding a train-mode BatchNorm) is rounding
    noise in both: one far below the largest of its list is compared absolutely."""
    assert_close(res["output"], ref.output, rtol, f"{what} output")
    pairs = [(res["param_grads"][i], ref.param_grads[n], n) for i, n in enumerate(names)]
    pairs_b = [
        (a, e, f"boundary {i}")
        for i, (a, e) in enumerate(zip(res["boundary_grads"], ref.boundary_grads))
    ]
    assert len(res["boundary_grads"]) == len(ref.boundary_grads)
    for key, group in (("log10_param_grad_norms", pairs), ("log10_boundary_grad_norms", pairs_b)):
        top = max([float(np.linalg.norm(np.asarray(e))) for _, e, _ in group], default=0.0)
        floor = (1e-11 if rtol < 1e-6 else 1e-5) * top
        for j, (a, e, n) in enumerate(group):
            ne = float(np.linalg.norm(np.asarray(e)))
            if ne <= floor:
                assert np.linalg.norm(a) <= floor, f"{what} {n}: {np.linalg.norm(a)}"
                continue
            assert_close(a, e, rtol, f"{what} {n}")
            assert abs(res[key][j] - math.log10(ne)) <= rtol, f"{what} log10 {n}"
    if not math.isnan(ref.loss):
        assert abs(res["loss"] - ref.loss) <= rtol * abs(ref.loss) + 1e-300, what


def _trainable(ch):
    return [n for n, _, b in ch.parameters if not b]


# --------------------------------------------------------------------------------------
# float64 against torch autograd and against the NumPy reference, three passes each
# --------------------------------------------------------------------------------------
@needs_torch
@pytest.mark.parametrize("cfg", NORM_CONFIGS, ids=[c.id for c in NORM_CONFIGS])
def test_against_torch_float64(cfg):
    ch, params = build(cfg.specs, cfg.seed)
    model = O.spec_torch_chain(cfg.specs, params)
    names = _trainable(ch)
    for p in range(3):
        x, target, grad = make_data(cfg, p, ch.in_width, ch.out_width)
        res = core_backward(ch, cfg, x, target, grad)
        ref = O.spec_torch_chain_backward(model, x, cfg.loss, target, grad, cfg.train)
        _compare(res, ref, names, 1e-10, f"torch pass {p}")
        if p in (0, 2):
            # running statistics after one and after three passes
            got = buffers_of(ch)
            assert set(got) == set(ref.buffers)
            for n, v in got.items():
                assert_close(v, ref.buffers[n], 1e-12, f"pass {p} buffer {n}")


@pytest.mark.parametrize("cfg", NORM_CONFIGS, ids=[c.id for c in NORM_CONFIGS])
def test_against_numpy_reference(cfg):
    ch, params = build(cfg.specs, cfg.seed)
    names = _trainable(ch)
    for p in range(2):
        x, target, grad = make_data(cfg, p, ch.in_width, ch.out_width)
        res = core_backward(ch, cfg, x, target, grad)
        ref = O.spec_numpy_chain_backward(cfg.specs, params, x, cfg.loss, target, grad, cfg.train)
        for n in names:
            ref.param_grads.setdefault(n, np.zeros_like(params[n]))
        _compare(res, ref, names, 1e-10, f"numpy pass {p}")
        params.update(ref.buffers)
        got = buffers_of(ch)
        for n, v in ref.buffers.items():
            assert_close(got[n], v, 1e-12, f"numpy pass {p} buffer {n}")


@needs_torch
@pytest.mark.parametrize("cfg", NORM_CONFIGS[:20], ids=[c.id for c in NORM_CONFIGS[:20]])
def test_against_torch_float32(cfg):
    ch, params = build(cfg.specs, cfg.seed, "float32")
    model = O.spec_torch_chain(cfg.specs, params, "float32")
    names = _trainable(ch)
    for p in range(2):
        x, target, grad = make_data(cfg, p, ch.in_width, ch.out_width)
        x = x.astype(np.float32)
        grad = grad.astype(np.float32) if grad is not None else None
        target = target.astype(np.float32) if cfg.loss == "mse" else target
        res = core_backward(ch, cfg, x, target, grad)
        ref = O.spec_torch_chain_backward(model, x, cfg.loss, target, grad, cfg.train)
        _compare(res, ref, names, 2e-3, "torch float32")
        for n, v in buffers_of(ch).items():
            assert_close(v, ref.buffers[n], 1e-5, f"float32 buffer {n}")


# --------------------------------------------------------------------------------------
# each block against torch with its options, one at a time
# --------------------------------------------------------------------------------------
SINGLE = [
    layer_norm(7),
    layer_norm(7, 1e-3, True, False),
    layer_norm(7, 0.5, False, False),
    layer_norm(1, 1e-5),
    rms_norm(7),
    rms_norm(7, 1e-6),
    rms_norm(7, None, False),
    rms_norm(1, 0.1),
    batch_norm(7),
    batch_norm(7, 1e-3, None),
    batch_norm(7, 1e-5, 0.3, False),
    batch_norm(7, 1e-5, 0.1, True, False),
    batch_norm(7, 1e-5, None, False, False),
    batch_norm(1, 0.1, 1.0),
]


@needs_torch
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("spec", SINGLE, ids=[f"{s['kind']}{i}" for i, s in enumerate(SINGLE)])
def test_single_block_against_torch(spec, train, dtype):
    if dtype == "float32" and spec["kind"] == "layer_norm" and spec["width"] == 1:
        pytest.skip("torch's float32 LayerNorm of one feature returns rounding noise (x - x)")
    specs = [linear(5, spec["width"]), spec, linear(spec["width"], 3)]
    cfg = NormConfig(specs, 6, train, "mse", 99)
    ch, params = build(specs, 5, dtype)
    model = O.spec_torch_chain(specs, params, dtype)
    rtol = 1e-10 if dtype == "float64" else 2e-4
    for p in range(3):
        x, target, _ = make_data(cfg, p, 5, 3)
        x, target = x.astype(dtype), target.astype(dtype)
        res = core_backward(ch, cfg, x, target, None)
        ref = O.spec_torch_chain_backward(model, x, "mse", target, None, train)
        _compare(res, ref, _trainable(ch), rtol, "single")
        for n, v in buffers_of(ch).items():
            assert_close(v, ref.buffers[n], 1e-12 if dtype == "float64" else 1e-6, n)


def test_parameters_buffers_and_defaults():
    ch = _core.Chain64(
        [
            layer_norm(4),
            layer_norm(4, 1e-5, True, False),
            layer_norm(4, 1e-5, False, True),
            rms_norm(4),
            rms_norm(4, None, False),
            batch_norm(4),
            batch_norm(4, 1e-5, 0.1, False),
        ]
    )
    assert ch.parameters == [
        ("0.weight", (4,), False),
        ("0.bias", (4,), False),
        ("1.weight", (4,), False),
        ("3.weight", (4,), False),
        ("5.weight", (4,), False),
        ("5.bias", (4,), False),
        ("5.running_mean", (4,), True),
        ("5.running_var", (4,), True),
        ("5.num_batches_tracked", (), True),
        ("6.running_mean", (4,), True),
        ("6.running_var", (4,), True),
        ("6.num_batches_tracked", (), True),
    ]
    assert ch.num_params == 6
    vals = [np.array(ch.param(i)) for i in range(len(ch.parameters))]
    for (name, _, _), v in zip(ch.parameters, vals):
        expected = 1.0 if name.endswith(("weight", "running_var")) else 0.0
        assert np.all(v == expected), name
    assert ch.couples_batch(True) and not ch.couples_batch(False)
    # without running statistics the batch statistics are used in eval mode too
    assert _core.Chain64([batch_norm(4, 1e-5, 0.1, True, False)]).couples_batch(False)
    assert not _core.Chain64([layer_norm(4), rms_norm(4)]).couples_batch(True)


def test_rms_norm_default_eps_is_the_dtype_machine_epsilon():
    x = np.array([[1e-4, -2e-4, 3e-4]])
    for cls, dt in ((_core.Chain64, np.float64), (_core.Chain32, np.float32)):
        eps = float(np.finfo(dt).eps)
        out, _ = cls([rms_norm(3)]).forward(x.astype(dt), False)
        expected = x / np.sqrt((x * x).mean() + eps)
        np.testing.assert_allclose(out, expected, rtol=1e-6 if dt == np.float32 else 1e-15)
        # a different eps gives a visibly different result at this scale
        out2, _ = cls([rms_norm(3, 1e-6)]).forward(x.astype(dt), False)
        assert np.abs(out2 - out).max() > 1e-3


@needs_torch
def test_rms_norm_matches_torchs_formula_to_rounding():
    """torch.rms_norm: x * rsqrt(mean(x^2) + eps) * weight; float64 to 1e-15, float32 to
    a few float32 roundings (its sums are accumulated in double here)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 9)) * np.exp(rng.normal(size=(6, 1)) * 3)
    w = 1 + 0.3 * rng.normal(size=9)
    for dt, chain, rtol in ((np.float64, _core.Chain64, 1e-15), (np.float32, _core.Chain32, 4e-7)):
        for eps in (None, 1e-6, 0.3):
            ch = chain([rms_norm(9, eps)])
            ch.set_param(0, w.astype(dt))
            out, e = ch.forward(x.astype(dt), True)
            ref = torch.nn.functional.rms_norm(
                torch.tensor(x.astype(dt)), [9], torch.tensor(w.astype(dt)), eps
            ).numpy()
            assert e == 0 and out.dtype == dt
            np.testing.assert_allclose(out, ref, rtol=rtol, atol=0, err_msg=f"{dt} eps={eps}")


# --------------------------------------------------------------------------------------
# Jacobian products
# --------------------------------------------------------------------------------------
def _torch_fn(spec, params, train):
    model = O.spec_torch_chain([spec], {k: v for k, v in params.items()})
    model.train(train)

    def f(z):
        return model(z)

    return f


JAC_SPECS = [
    layer_norm(5, 1e-3),
    layer_norm(5, 1e-5, False, False),
    rms_norm(5, 0.01),
    rms_norm(5),
    batch_norm(5, 1e-3, 0.1),
    batch_norm(5, 1e-3, None, True, False),
]


@needs_torch
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize(
    "spec", JAC_SPECS, ids=[f"{s['kind']}{i}" for i, s in enumerate(JAC_SPECS)]
)
def test_jacobian_products_against_torch(spec, train):
    ch, params = build([spec], 11)
    rng = np.random.default_rng(4)
    coupled = ch.couples_batch(train)
    rows = 4 if coupled else 1
    x = rng.normal(size=(rows, 5)) + 0.5
    model = O.spec_torch_chain([spec], params)
    model.train(train)
    J = torch.autograd.functional.jacobian(lambda z: model(z), torch.tensor(x)).numpy()
    J = J.reshape(rows * 5, rows * 5)
    v = rng.normal(size=(3, rows, 5))
    for k in (0, 7, -9):  # the same point carried at other power-of-two scales
        xs = np.ldexp(x, -k)
        jv = ch.block_jacobian_product(0, xs, k, v, False, train)
        jtv = ch.block_jacobian_product(0, xs, k, v, True, train)
        for j in range(3):
            assert_close(jv[j].ravel(), J @ v[j].ravel(), 1e-12, f"J v, scale 2^{k}")
            assert_close(jtv[j].ravel(), J.T @ v[j].ravel(), 1e-12, f"J^T v, scale 2^{k}")


def test_jacobian_products_against_finite_differences():
    rng = np.random.default_rng(8)
    for spec in JAC_SPECS:
        for train in (True, False):
            ch, _ = build([spec], 12)
            rows = 4 if ch.couples_batch(train) else 1
            x = rng.normal(size=(rows, 5))
            v = rng.normal(size=(1, rows, 5))
            h = 1e-6
            # a train-mode pass moves the running statistics, which its output does not use
            plus, _ = ch.forward(x + h * v[0], train)
            minus, _ = ch.forward(x - h * v[0], train)
            fd = (plus - minus) / (2 * h)
            jv = ch.block_jacobian_product(0, x, 0, v, False, train)[0]
            assert_close(jv, fd, 1e-7, f"{spec['kind']} train={train}")
            # <u, J v> = <J^T u, v>
            u = rng.normal(size=(1, rows, 5))
            jtu = ch.block_jacobian_product(0, x, 0, u, True, train)[0]
            assert abs(np.sum(u[0] * jv) - np.sum(jtu * v[0])) <= 1e-12 * np.abs(u[0] * jv).sum()


# --------------------------------------------------------------------------------------
# log space
# --------------------------------------------------------------------------------------
def _linear_bn_chain(depth, n, batch, seed):
    specs = []
    for _ in range(depth):
        specs += [linear(n, n, False), batch_norm(n)]
    ch = _core.Chain64(specs)
    ch.init("xavier_normal", 1.0, 1.0, 0.0, seed)
    W = [np.array(ch.param(3 * l)) for l in range(depth)]
    return specs, ch, W


def _core_anchors(W, x, n, every):
    """The BatchNorm outputs the core computes every `every` pairs, from chains of `every`
    pairs run one after another (the same arithmetic as the full chain's forward pass)."""
    anchors, h = {}, x
    for start in range(0, len(W), every):
        stop = min(start + every, len(W))
        specs = []
        for _ in range(start, stop):
            specs += [linear(n, n, False), batch_norm(n)]
        part = _core.Chain64(specs)
        for j, l in enumerate(range(start, stop)):
            part.set_param(3 * j, W[l])
        h, e = part.forward(h, True)
        assert e == 0
        anchors[stop - 1] = h
    return anchors


@pytest.mark.slow
def test_deep_linear_batch_norm_chain_is_exact_in_log_space():
    """10,000 x [Linear(32, 32, bias=False), BatchNorm(32)] in train mode, batch 5: the
    squared gradient norm grows ~1.3x per layer (towards (B - 2) / (B - 3) = 1.5 as the
    width grows, Yang et al. 2019), to ~10^585 at the input. At batch 8 the limit is 1.2,
    but the finite-width rate is below 1 at width 8 (0.94) and still 1.11 at width 128, so
    batch 5 reaches the regime beyond float64 at a width that runs in a second."""
    depth, n, batch = 10_000, 32, 5
    t0 = time.perf_counter()
    _specs, ch, W = _linear_bn_chain(depth, n, batch, seed=2024)
    x = np.random.default_rng(5).normal(size=(batch, n))
    res = ch.backward(x, "probe", None, False, -1.0, 2.0, True)
    elapsed = time.perf_counter() - t0
    anchors = _core_anchors(W, x, n, 25)
    ref = O.renormalised_linear_batch_norm(W, x, 1e-5, anchors)
    assert ref.drift < 1e-11  # the reference follows the core's trajectory between anchors
    lb = res["log10_boundary_grad_norms"]
    assert lb[0] > 400  # far beyond float64
    rate = 10 ** ((lb[0] - lb[-1]) * 2 / depth)
    assert 1.2 < rate < 1.4
    np.testing.assert_allclose(lb, ref.log10_boundaries, rtol=0, atol=1e-9)
    lp = np.asarray(res["log10_param_grad_norms"])
    # Every BatchNorm bias has a zero gradient in exact arithmetic (the next BatchNorm's
    # backward pass, or the last one's zero-mean output under the probe loss, removes the
    # batch mean), and both give rounding noise there.
    noise = np.zeros(lp.size, dtype=bool)
    noise[2::3] = True
    np.testing.assert_allclose(lp[~noise], ref.log10_params[~noise], rtol=0, atol=1e-9)
    assert np.all(lp[noise] < lp[np.flatnonzero(noise) - 2] - 12)
    assert elapsed < 2.0, f"{elapsed:.2f} s"


# --------------------------------------------------------------------------------------
# inputs at 1e-300 and 1e300: LayerNorm and RMSNorm exact
# --------------------------------------------------------------------------------------
EDGE_CHAINS = {
    "ln-first": [
        layer_norm(6, 1e-5),
        linear(6, 5),
        act(5, "tanh"),
        layer_norm(5, 1e-3),
        linear(5, 3),
    ],
    "rms-first": [rms_norm(6), linear(6, 5, False), act(5, "relu"), rms_norm(5, 1e-6)],
    "linear-ln": [linear(6, 6, False), layer_norm(6, 1e-5, True, False), linear(6, 4)],
    "residual": [residual([rms_norm(6, 1e-5), linear(6, 6, False)], 0.5), layer_norm(6, 0.0)],
    "bn-train": [batch_norm(6, 1e-5, None), linear(6, 4)],
    # eval mode: x * alpha + beta at the true scale, or with a zero running mean and bias a
    # homogeneous map that carries the scale
    "bn-eval": [batch_norm(6), linear(6, 4)],
    "bn-eval-centred": [batch_norm(6), linear(6, 4)],
    # weights of 1e-200 bring LayerNorm an input of ~1e-400: its xhat (~1e-398) lies below
    # every float64 next to its bias, which it must leave exactly as it is
    "tiny-weights-ln": [linear(6, 6, False), linear(6, 6, False), layer_norm(6, 1e-5)],
}


@pytest.mark.skipif(not O.HAVE_LONGDOUBLE, reason="needs x87 long double")
@pytest.mark.parametrize("scale", [1e-300, 1e300, 1e-150, 1.0])
@pytest.mark.parametrize("name", list(EDGE_CHAINS))
def test_edge_scales_against_long_double(name, scale):
    specs = EDGE_CHAINS[name]
    train = not name.startswith("bn-eval")
    ch, params = build(specs, 17)
    if name == "bn-eval-centred":
        for leaf in ("0.running_mean", "0.bias"):
            ch.set_param(_index(ch, leaf), np.zeros(6))
            params[leaf] = np.zeros(6)
    if name == "tiny-weights-ln":
        for leaf in ("0.weight", "1.weight"):
            params[leaf] = params[leaf] * 1e-200
            ch.set_param(_index(ch, leaf), params[leaf])
    rng = np.random.default_rng(9)
    x0 = rng.normal(size=(3, 6))
    x = x0 * scale
    g = rng.normal(size=(3, ch.out_width))
    res = ch.backward(x, "grad_output", g, True, -1.0, 2.0, train)
    # the long double chain at the true scale: its variances (down to 1e-600, up to 1e600)
    # are ordinary numbers there
    xl = x.astype(O.LD)
    ref = O.spec_numpy_chain_backward(specs, params, xl, "grad_output", None, g, train, O.LD)
    _assert_close_at_scale(res["output"], ref.output, 1e-12, "output")
    if name == "tiny-weights-ln":
        assert np.array_equal(res["output"], np.broadcast_to(params["2.bias"], (3, 6)))

    def lg(a):
        n = np.sqrt(np.sum(np.asarray(a, dtype=O.LD) ** 2))
        return float(np.log10(n)) if n > 0 else -math.inf

    names = _trainable(ch)
    np.testing.assert_allclose(
        res["log10_param_grad_norms"], [lg(ref.param_grads[n]) for n in names], rtol=0, atol=1e-12
    )
    np.testing.assert_allclose(
        res["log10_boundary_grad_norms"], [lg(b) for b in ref.boundary_grads], rtol=0, atol=1e-12
    )
    # the values themselves where float64 holds them (the log10 norms cover the rest)
    beyond = name == "tiny-weights-ln"
    for i, n in enumerate(names):
        _assert_close_at_scale(res["param_grads"][i], ref.param_grads[n], 1e-11, n, beyond)
    _assert_close_at_scale(res["boundary_grads"][0], ref.boundary_grads[0], 1e-11, "dL/dx", beyond)


def _assert_close_at_scale(actual, expected, rtol, what, may_leave_float64=False):
    """assert_close on both divided by max|expected| (norms of values near 1e300 overflow).
    Entries that float64 holds as subnormals are off by 2.5e-324 at most, far below
    rtol * max|expected| while the largest is above 1e-305."""
    e = np.asarray(expected, dtype=O.LD)
    m = np.abs(e).max()
    if may_leave_float64 and not 1e-305 < m < np.finfo(np.float64).max:
        return
    assert 1e-305 < m < np.finfo(np.float64).max, f"{what}: max {float(m):.3g}"
    assert_close(np.asarray(actual) / float(m), (e / m).astype(np.float64), rtol, what)


@pytest.mark.parametrize("k", [-500, -200, 200, 500, -1000, 1000])
def test_norms_are_exactly_scale_covariant(k):
    """norm(2^k x; eps) = norm(x; eps 4^-k): the same output bit for bit, the same parameter
    gradients and dL/dx scaled by exactly 2^-k, wherever eps 4^-k is a float64; with
    eps = 0 at any k."""
    rng = np.random.default_rng(21)
    x = rng.normal(size=(4, 6)) + 0.2
    g = rng.normal(size=(4, 6))
    cases = [(layer_norm, e) for e in (1e-5, 0.0)] + [(rms_norm, e) for e in (1e-5, 0.0)]
    # batch statistics need eps > 0
    cases.append((lambda w, e: batch_norm(w, e, 0.1, True, False), 1e-5))
    ran = 0
    for make, eps in cases:
        try:
            eps_k = math.ldexp(eps, -2 * k)
        except OverflowError:
            continue
        if eps > 0 and not eps_k >= np.finfo(np.float64).tiny:
            continue
        a = _core.Chain64([make(6, eps), linear(6, 6, False), make(6, eps)])
        b = _core.Chain64([make(6, eps_k), linear(6, 6, False), make(6, eps)])
        w = rng.normal(size=(6, 6))
        a.set_param(_index(a, "1.weight"), w)
        b.set_param(_index(b, "1.weight"), w)
        ra = a.backward(np.ldexp(x, k), "grad_output", g, True, -1.0, 2.0, True)
        rb = b.backward(x, "grad_output", g, True, -1.0, 2.0, True)
        what = f"{a.parameters[0][0] if a.parameters else ''} eps={eps}"
        assert np.array_equal(ra["output"], rb["output"]), what
        for ga, gb in zip(ra["param_grads"], rb["param_grads"]):
            assert np.array_equal(ga, gb), what
        la, lb = ra["log10_boundary_grad_norms"], rb["log10_boundary_grad_norms"]
        assert la[0] == pytest.approx(lb[0] - k * LOG10_2, abs=1e-12), what
        assert np.array_equal(la[1:], lb[1:]), what
        if abs(k) <= 500:
            assert np.array_equal(ra["boundary_grads"][0], np.ldexp(rb["boundary_grads"][0], -k))
        ran += 1
    assert ran >= 2


def _index(ch, name):
    return [n for n, _, _ in ch.parameters].index(name)


@pytest.mark.parametrize("chain", [_core.Chain64, _core.Chain32])
def test_eps_dominated_signal_is_carried_not_underflowed(chain):
    """At 1e-200 (float64) or 1e-30 (float32) the variance is far below eps: LayerNorm gives
    (x - mean) / sqrt(eps), carried at its own power-of-two scale through later blocks."""
    dt = np.float64 if chain is _core.Chain64 else np.float32
    tiny = 1e-200 if dt == np.float64 else 1e-30
    x = np.array([[1.0, -2.0, 0.5, 3.0], [0.25, 0.0, -1.0, 2.0]])
    specs = [layer_norm(4, 1e-5, False, False), linear(4, 4, False), layer_norm(4, 1e-5)]
    ch = chain(specs)
    ch.init("orthogonal", 1.0, 1.0, 0.0, 3)
    out, _ = ch.forward((x * tiny).astype(dt), True)
    W = np.array(ch.param(0), dtype=np.float64)
    # both variances (~tiny^2) vanish next to eps
    h = ((x - x.mean(1, keepdims=True)) * tiny / math.sqrt(1e-5)) @ W.T
    expected = (h - h.mean(1, keepdims=True)) / math.sqrt(1e-5)
    assert np.abs(expected).max() < (1e-190 if dt == np.float64 else 1e-20)
    np.testing.assert_allclose(
        np.asarray(out, np.float64), expected, rtol=1e-12 if dt == np.float64 else 1e-5, atol=0
    )


@needs_torch
def test_rows_at_far_apart_scales_in_a_split_batch():
    """Wide enough that the forward pass splits the batch over two threads, with one half
    at 1e-100 and the other at 1: each half gets its own exponent in the forward pass and
    the stored rows are reconciled before the backward pass, which recomputes each row's
    statistics from them."""
    specs = [
        linear(64, 128, False),
        layer_norm(128, 1e-5),
        linear(128, 64),
        rms_norm(64, 1e-6),
        linear(64, 32),
    ]
    ch, params = build(specs, 31)
    rng = np.random.default_rng(31)
    x = rng.normal(size=(8, 64))
    x[:4] *= 1e-100
    g = rng.normal(size=(8, 32))
    res = ch.backward(x, "grad_output", g, True, -1.0, 2.0, True)
    ref = O.spec_torch_chain_backward(O.spec_torch_chain(specs, params), x, "grad_output", None, g)
    for a, e, what in [(res["output"], ref.output, "output")] + [
        (a, e, f"boundary {i}")
        for i, (a, e) in enumerate(zip(res["boundary_grads"], ref.boundary_grads))
    ]:
        for r in range(8):  # row by row: the tiny rows must be right too
            assert_close(a[r], e[r], 1e-10, f"{what} row {r}")
    for i, n in enumerate(_trainable(ch)):
        assert_close(res["param_grads"][i], ref.param_grads[n], 1e-10, n)


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (layer_norm(0), r"LayerNorm: width must be positive; got 0"),
        (layer_norm(-3), r"width must be positive; got -3"),
        (layer_norm(4, -1e-5), r"LayerNorm: eps must be a finite number >= 0; got -1e-05"),
        (layer_norm(4, math.nan), r"eps must be a finite number >= 0; got nan"),
        (layer_norm(4, math.inf), r"eps must be a finite number >= 0; got inf"),
        (rms_norm(0), r"RMSNorm: width must be positive; got 0"),
        (rms_norm(4, -0.5), r"RMSNorm: eps must be a finite number >= 0 or None; got -0.5"),
        (batch_norm(0), r"BatchNorm: width must be positive; got 0"),
        (batch_norm(4, -1.0), r"BatchNorm: eps must be a finite number >= 0; got -1.0"),
        (batch_norm(4, 1e-5, 1.5), r"momentum must be a number in \[0, 1\] or None; got 1.5"),
        (batch_norm(4, 1e-5, -0.1), r"momentum must be a number in \[0, 1\] or None; got -0.1"),
        (batch_norm(4, 1e-5, math.nan), r"momentum must be a number in \[0, 1\] or None; got nan"),
    ],
)
@pytest.mark.parametrize("chain", [_core.Chain64, _core.Chain32])
def test_bad_arguments(chain, spec, match):
    with pytest.raises(ValueError, match=match):
        chain([spec])


def test_width_mismatch_names_both_blocks():
    with pytest.raises(
        ValueError,
        match=r"block 0 \(Linear\(3, 5\)\) gives width 5 but block 1 "
        r"\(LayerNorm\(4, eps=1e-05\)\) takes 4",
    ):
        _core.Chain64([linear(3, 5), layer_norm(4)])


@needs_torch
def test_batch_of_one_in_train_mode_raises_torchs_error():
    x = np.ones((1, 4))
    with pytest.raises(ValueError) as ref:
        torch.nn.BatchNorm1d(4).train()(torch.tensor(x))
    msg = str(ref.value).split(",")[0]
    assert msg == "Expected more than 1 value per channel when training"
    ch = _core.Chain64([linear(4, 4), batch_norm(4)])
    with pytest.raises(ValueError, match=msg):
        ch.backward(x, "probe", None, False, -1.0, 2.0, True)
    # eval mode uses the running statistics: one example is fine
    ch.backward(x, "probe", None, False, -1.0, 2.0, False)
    # without running statistics the batch statistics are used in eval mode too
    ch = _core.Chain64([batch_norm(4, 1e-5, 0.1, True, False)])
    with pytest.raises(ValueError, match=msg + r", got input size \[1, 4\]"):
        ch.backward(x, "probe", None, False, -1.0, 2.0, False)
    with pytest.raises(ValueError):
        torch.nn.BatchNorm1d(4, track_running_stats=False).eval()(torch.tensor(x))


@needs_torch
def test_zero_eps_batch_statistics_raise_torchs_error():
    x = np.random.default_rng(0).normal(size=(3, 4))
    with pytest.raises(ValueError, match="batch_norm eps must be positive during training"):
        torch.nn.BatchNorm1d(4, eps=0.0).train()(torch.tensor(x))
    ch = _core.Chain64([batch_norm(4, 0.0)])
    with pytest.raises(
        ValueError, match=r"batch_norm eps must be positive during training, but got 0\.0"
    ):
        ch.backward(x, "probe", None, False, -1.0, 2.0, True)
    ch.backward(x, "probe", None, False, -1.0, 2.0, False)  # eval mode takes eps = 0


def test_describe_in_messages():
    blocks = [layer_norm(4, 1e-3, True, False), rms_norm(4), batch_norm(4, 0.1, None, False, False)]
    expected = [
        r"LayerNorm\(4, eps=0.001, bias=False\)",
        r"RMSNorm\(4, eps=None\)",
        r"BatchNorm\(4, eps=0.1, momentum=None, affine=False, track_running_stats=False\)",
    ]
    for b, e in zip(blocks, expected):
        with pytest.raises(ValueError, match=r"block 0 \(" + e + r"\) gives width 4 but block 1"):
            _core.Chain64([b, linear(3, 2)])
