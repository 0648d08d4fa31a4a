"""Every activation and its derivative at extreme arguments, in both dtypes, against
PyTorch float64 autograd where torch is finite and the exact limits where it is not."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ACTIVATIONS, needs_torch, torch

# mpmath comes with torch (through sympy)
mpmath = pytest.importorskip("mpmath") if torch is not None else None

# Arguments where formulas overflow or saturate (the cubic of gelu_tanh overflows above
# 1.4e154, or 1.5e13 in float32; exp(-z) above 709, or 88.7), tiny and subnormal ones.
EXTREMES = {
    "float64": [1.7e308, 1e300, 1.5e154, 1e30, 1e10, 800.0, 710.0, 100.0, 40.0, 20.5, 1e-300,
                1e-310, 5e-324],
    "float32": [3.4e38, 3e38, 1e30, 1.5e13, 1e5, 100.0, 88.8, 40.0, 20.5, 1e-30, 1e-40, 1e-45],
}  # fmt: skip


def _ours(gc, name, z, dtype):
    """phi(z) and phi'(z) through a two-unit chain with identity weights, one argument per
    pass. The second unit sees 1: a layer whose every output has underflowed is an error
    (NonFiniteError), not a value, so it keeps the layer's signal in the normal range while
    the first unit shows the kernel at z."""
    net = gc.MLP.from_weights([np.eye(2, dtype=dtype)], activation=name, dtype=dtype)
    rep = net.backward(
        np.array([[z, 1.0]], dtype), grad_output=np.ones((1, 2), dtype), return_grads=True
    )
    return float(rep.output[0, 0]), float(rep.activation_grads[0][0, 0])


def _torch(name, z):
    import torch.nn.functional as F

    f = {
        "linear": lambda t: t,
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "relu": F.relu,
        "leaky_relu": lambda t: F.leaky_relu(t, 0.01),
        "elu": F.elu,
        "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "silu": F.silu,
        "softplus": F.softplus,
    }[name]
    t = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    y = f(t)
    y.backward()
    return float(y.detach()), float(t.grad)


def _limit(name, z):
    """phi(z) and phi'(z) where |z| is so large that every activation has saturated."""
    if name == "linear":
        return z, 1.0
    if name in ("sigmoid", "tanh"):
        return (1.0 if z > 0 else (-1.0 if name == "tanh" else 0.0)), 0.0
    if z > 0:
        return z, 1.0
    return {"elu": (-1.0, 0.0), "leaky_relu": (0.01 * z, 0.01)}.get(name, (0.0, 0.0))


def _exact_mp(name, x):
    """phi(x) and phi'(x) in mpmath, with torch's definitions (softplus is x above its
    threshold 20, relu'(0) = 0, leaky_relu'(0) = slope, elu'(0) = alpha = 1)."""
    mp = mpmath.mp
    if name == "linear":
        v, d = x, 1
    elif name == "sigmoid":
        v = 1 / (1 + mpmath.exp(-x))
        d = v * (1 - v)
    elif name == "tanh":
        v = mpmath.tanh(x)
        d = 1 / mpmath.cosh(x) ** 2
    elif name in ("relu", "leaky_relu"):
        s = 0 if name == "relu" else mpmath.mpf(0.01)
        v, d = (x, 1) if x > 0 else (s * x, s)
    elif name == "elu":
        v, d = (x, 1) if x > 0 else (mpmath.expm1(x), mpmath.exp(x))
    elif name == "gelu":
        if abs(x) < 1000:
            cdf = mpmath.ncdf(x)
            v, d = x * cdf, cdf + x * mpmath.npdf(x)
        else:  # mpmath's ncdf fails there; Phi(x) is 0 or 1 to e**-500000
            v, d = (x, 1) if x > 0 else (0, 0)
    elif name == "gelu_tanh":
        beta, kappa = mpmath.sqrt(2 / mp.pi), mpmath.mpf(0.044715)
        # (1 + tanh(u)) / 2 as sigmoid(2 u): 1 + tanh(u) would cancel at any working
        # precision once tanh(u) is within 10^-dps of -1 (z = -20.5: 1e-281)
        s = 1 / (1 + mpmath.exp(-2 * beta * (x + kappa * x**3)))
        v = x * s
        d = s + x * 2 * s * (1 - s) * beta * (1 + 3 * kappa * x * x)
    elif name == "silu":
        sig = 1 / (1 + mpmath.exp(-x))
        v, d = x * sig, sig * (1 + x * (1 - sig))
    else:  # softplus
        v, d = (x, 1) if x > 20 else (mpmath.log1p(mpmath.exp(x)), 1 / (1 + mpmath.exp(-x)))
    return mpmath.mpf(v), mpmath.mpf(d)


def _exact(name, z):
    """phi(z) and phi'(z) to double precision, and the condition number |z f'(z) / f(z)|
    of each: the relative error that a rounding of z alone causes, per unit of it."""
    with mpmath.workdps(40):
        x = mpmath.mpf(z)
        v, d = _exact_mp(name, x)
        step = abs(x) * mpmath.mpf(10) ** -15
        dd = 0
        if step:
            up, down = _exact_mp(name, x + step)[1], _exact_mp(name, x - step)[1]
            dd = (up - down) / (2 * step)
        cond = [abs(x * d / v) if v else 0, abs(x * dd / d) if d else 0]
        return (float(v), float(d)), [float(c) for c in cond]


@needs_torch
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_extreme_arguments_match_torch_float64(gc, name, dtype):
    """Finite at every finite argument, and equal to torch's float64 value at the argument
    rounded to the dtype: to a few ulps times (1 + the condition number), or (results
    below the normal range, which carry fewer bits) to a thousandth of the smallest normal
    number. Where torch float64 is not finite (gelu_tanh's backward above 1.4e154) or its
    own formula lost the value (sigmoid and silu below -709, where exp(-z) overflows;
    gelu's 1 + erf below -8) the exact value is the reference."""
    info = np.finfo(dtype)
    eps, atol = float(info.eps), 1e-3 * float(info.tiny)

    def close(a, b, cond=0.0):
        return abs(a - b) <= atol + (8 * eps * (1 + cond) * abs(b) if b else 0.0)

    for mag in EXTREMES[dtype]:
        for z in (mag, -mag, 0.0):
            z = float(np.asarray(z, dtype))
            h, d = _ours(gc, name, z, dtype)
            exact, cond = _exact(name, z)
            ref = [
                t if np.isfinite(t) and close(t, e, c) else e
                for t, e, c in zip(_torch(name, z), exact, cond)
            ]
            if name in ("sigmoid", "tanh"):
                # phi' comes from the stored output h (rounded to the dtype), as in torch
                hm = mpmath.mpf(h)
                ref[1], cond[1] = float(hm * (1 - hm) if name == "sigmoid" else 1 - hm * hm), 0.0
            for what, got, want, c in (("phi", h, ref[0], cond[0]), ("phi'", d, ref[1], cond[1])):
                assert np.isfinite(got), f"{name} {what}({z!r}) = {got} ({dtype})"
                assert close(got, want, c), (
                    f"{name} {what}({z!r}) = {got!r}, expected {want!r} ({dtype})"
                )


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_saturated_arguments_give_exact_limits(gc, name, dtype):
    """At the largest finite arguments phi and phi' are their limits (to the rounding of
    leaky_relu's slope in float32)."""
    big = float(np.finfo(dtype).max)
    for z in (big, -big, big / 3, -big / 3):
        z = float(np.asarray(z, dtype))
        h, d = _ours(gc, name, z, dtype)
        want = _limit(name, z)
        assert h == pytest.approx(want[0], rel=1e-7, abs=0.0), (name, z, h)
        assert d == pytest.approx(want[1], rel=1e-7, abs=0.0), (name, z, d)
