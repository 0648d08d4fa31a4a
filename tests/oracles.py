"""Independent reference implementations that gradchain is tested against.

Nothing in here imports gradchain.  Three oracles:

* :func:`numpy_backward` -- plain NumPy float64 forward and backward with hand-written
  derivative formulas.
* :func:`torch_backward` -- the same chain built from ``torch.nn.Linear`` layers and
  ``torch.nn.functional`` activations, differentiated by autograd (optionally followed by
  ``torch.nn.utils.clip_grad_norm_``).
* :func:`renormalised_log10_norms` -- a NumPy reference that renormalises the propagated
  gradient (and, for positively homogeneous chains with zero biases, the forward
  activations) at every layer and accumulates the scale as a log10, for chains deep enough
  that float norms underflow or overflow.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

ACTIVATIONS = (
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
INITS = (
    "xavier_normal",
    "xavier_uniform",
    "he_normal",
    "he_uniform",
    "lecun_normal",
    "orthogonal",
    "normal",
)
LOSSES = ("probe", "mse", "cross_entropy", "grad_output")
HOMOGENEOUS = ("linear", "relu", "leaky_relu")

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_KAPPA = 0.044715
_erf = np.vectorize(math.erf, otypes=[np.float64])


# --------------------------------------------------------------------------------------
# Activations: value and derivative with respect to the pre-activation z, in float64.
# --------------------------------------------------------------------------------------
def _sigmoid(z):
    e = np.exp(-np.abs(z))  # never overflows
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def act_forward(name, z, negative_slope=0.01, alpha=1.0):
    z = np.asarray(z, dtype=np.float64)
    if name == "linear":
        return z.copy()
    if name == "sigmoid":
        return _sigmoid(z)
    if name == "tanh":
        return np.tanh(z)
    if name == "relu":
        return np.where(z > 0, z, 0.0)
    if name == "leaky_relu":
        return np.where(z > 0, z, negative_slope * z)
    if name == "elu":
        return np.where(z > 0, z, alpha * np.expm1(np.minimum(z, 0.0)))
    if name == "gelu":
        return 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * z * (1.0 + np.tanh(_SQRT_2_OVER_PI * (z + _GELU_KAPPA * z**3)))
    if name == "silu":
        return z * _sigmoid(z)
    if name == "softplus":  # beta = 1, threshold = 20 (torch default)
        return np.where(z > 20.0, z, np.log1p(np.exp(np.minimum(z, 20.0))))
    raise ValueError(f"unknown activation {name!r}")


def act_derivative(name, z, negative_slope=0.01, alpha=1.0):
    """phi'(z), with torch's conventions at the kinks (relu'(0) = 0, leaky'(0) = slope,
    elu'(0) = alpha)."""
    z = np.asarray(z, dtype=np.float64)
    if name == "linear":
        return np.ones_like(z)
    if name == "sigmoid":
        s = _sigmoid(z)
        return s * (1.0 - s)
    if name == "tanh":
        t = np.tanh(z)
        return 1.0 - t * t
    if name == "relu":
        return np.where(z > 0, 1.0, 0.0)
    if name == "leaky_relu":
        return np.where(z > 0, 1.0, negative_slope)
    if name == "elu":
        return np.where(z > 0, 1.0, alpha * np.exp(np.minimum(z, 0.0)))
    if name == "gelu":
        cdf = 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))
        pdf = _INV_SQRT_2PI * np.exp(-0.5 * z * z)
        return cdf + z * pdf
    if name == "gelu_tanh":
        inner = _SQRT_2_OVER_PI * (z + _GELU_KAPPA * z**3)
        t = np.tanh(inner)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (
            1.0 + 3.0 * _GELU_KAPPA * z * z
        )
    if name == "silu":
        s = _sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    if name == "softplus":
        return np.where(z > 20.0, 1.0, _sigmoid(z))
    raise ValueError(f"unknown activation {name!r}")


# --------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------
def _loss_and_grad(h, loss, target, grad_output):
    """Loss value and dL/dh_L for the output h (float64)."""
    if loss == "probe":
        return 0.5 * float(np.sum(h * h)), h.copy()
    if loss == "mse":
        y = np.asarray(target, dtype=np.float64)
        d = h - y
        return float(np.mean(d * d)), 2.0 * d / d.size
    if loss == "cross_entropy":
        labels = np.asarray(target, dtype=np.int64)
        b = h.shape[0]
        m = h.max(axis=1, keepdims=True)
        e = np.exp(h - m)
        s = e.sum(axis=1, keepdims=True)
        lse = (m + np.log(s))[:, 0]
        loss_val = float(np.mean(lse - h[np.arange(b), labels]))
        p = e / s
        p[np.arange(b), labels] -= 1.0
        return loss_val, p / b
    if loss == "grad_output":
        return float("nan"), np.array(grad_output, dtype=np.float64, copy=True)
    raise ValueError(f"unknown loss {loss!r}")


def _as64(a):
    return np.asarray(a, dtype=np.float64)


def _zeros_biases(weights):
    return [np.zeros(np.shape(w)[0]) for w in weights]


def numpy_forward(weights, biases, x, activation, negative_slope=0.01, alpha=1.0, dtype=np.float64):
    """Plain forward (float64 unless `dtype`: then the affine maps run in that precision
    and each activation output is rounded to it).  Returns (zs, hs) with hs[0] = x."""
    dt = np.dtype(dtype)
    if biases is None:
        biases = _zeros_biases(weights)
    h = np.asarray(x, dtype=dt)
    zs, hs = [], [h]
    with np.errstate(all="ignore"):
        for w, b in zip(weights, biases):
            z = h @ np.asarray(w, dtype=dt).T + np.asarray(b, dtype=dt)
            h = act_forward(activation, z, negative_slope, alpha).astype(dt)
            zs.append(z)
            hs.append(h)
    return zs, hs


def first_nonfinite_layer(
    weights, biases, x, activation, negative_slope=0.01, alpha=1.0, dtype=np.float64
):
    """1-based index of the first layer whose output (plain forward in `dtype`) has a NaN
    or inf, or None."""
    _, hs = numpy_forward(weights, biases, x, activation, negative_slope, alpha, dtype)
    for l, h in enumerate(hs[1:], start=1):
        if not np.all(np.isfinite(h)):
            return l
    return None


def numpy_backward(
    weights,
    biases,
    x,
    activation,
    loss="probe",
    target=None,
    grad_output=None,
    negative_slope=0.01,
    alpha=1.0,
):
    """Reference forward + backward in float64 NumPy.

    Returns a namespace with ``loss``, ``output`` (h_L), ``dW`` and ``db`` (lists of length
    depth) and ``dh`` (length depth + 1, dh[0] = dL/dx).
    """
    if biases is None:
        biases = _zeros_biases(weights)
    zs, hs = numpy_forward(weights, biases, x, activation, negative_slope, alpha)
    loss_val, g = _loss_and_grad(hs[-1], loss, target, grad_output)
    depth = len(weights)
    dW, db, dh = [None] * depth, [None] * depth, [None] * (depth + 1)
    dh[depth] = g
    for l in range(depth - 1, -1, -1):
        dz = g * act_derivative(activation, zs[l], negative_slope, alpha)
        dW[l] = dz.T @ hs[l]
        db[l] = dz.sum(axis=0)
        g = dz @ _as64(weights[l])
        dh[l] = g
    return SimpleNamespace(loss=loss_val, output=hs[-1], dW=dW, db=db, dh=dh)


# --------------------------------------------------------------------------------------
# torch autograd
# --------------------------------------------------------------------------------------
def _torch_act(name, negative_slope, alpha):
    import torch
    import torch.nn.functional as F

    return {
        "linear": lambda z: z,
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "relu": F.relu,
        "leaky_relu": lambda z: F.leaky_relu(z, negative_slope),
        "elu": lambda z: F.elu(z, alpha),
        "gelu": F.gelu,
        "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
        "silu": F.silu,
        "softplus": F.softplus,
    }[name]


def torch_backward(
    weights,
    biases,
    x,
    activation,
    loss="probe",
    target=None,
    grad_output=None,
    negative_slope=0.01,
    alpha=1.0,
    dtype="float64",
    max_norm=None,
    norm_type=2.0,
):
    """The chain as torch ``nn.Linear`` layers, differentiated by autograd.

    With ``max_norm`` the parameter gradients are clipped by
    ``torch.nn.utils.clip_grad_norm_`` over ``[W1, b1, W2, b2, ...]``; ``total_norm`` is what
    it returns, ``dW``/``db`` are the gradients after clipping and ``dW_unclipped``/
    ``db_unclipped`` before.
    """
    import torch
    import torch.nn.functional as F

    tdt = {"float64": torch.float64, "float32": torch.float32}[str(np.dtype(dtype))]
    npdt = np.dtype(dtype)
    if biases is None:
        biases = _zeros_biases(weights)
    layers = []
    for w, b in zip(weights, biases):
        w = np.asarray(w)
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=True, dtype=tdt)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.array(w, dtype=npdt)))
            lin.bias.copy_(torch.from_numpy(np.array(b, dtype=npdt)))
        layers.append(lin)
    phi = _torch_act(activation, negative_slope, alpha)

    h0 = torch.tensor(np.array(x, dtype=npdt), dtype=tdt, requires_grad=True)
    hs = [h0]
    h = h0
    for lin in layers:
        h = phi(lin(h))
        h.retain_grad()
        hs.append(h)
    if loss == "probe":
        lv = 0.5 * h.pow(2).sum()
        lv.backward()
        loss_val = float(lv.detach())
    elif loss == "mse":
        lv = F.mse_loss(h, torch.tensor(np.array(target, dtype=npdt), dtype=tdt))
        lv.backward()
        loss_val = float(lv.detach())
    elif loss == "cross_entropy":
        lv = F.cross_entropy(h, torch.tensor(np.asarray(target), dtype=torch.int64))
        lv.backward()
        loss_val = float(lv.detach())
    elif loss == "grad_output":
        h.backward(torch.tensor(np.array(grad_output, dtype=npdt), dtype=tdt))
        loss_val = float("nan")
    else:
        raise ValueError(f"unknown loss {loss!r}")

    def grads():
        return (
            [lin.weight.grad.detach().numpy().copy() for lin in layers],
            [lin.bias.grad.detach().numpy().copy() for lin in layers],
        )

    dW, db = grads()
    res = SimpleNamespace(
        loss=loss_val,
        output=h.detach().numpy().copy(),
        dW=dW,
        db=db,
        dh=[t.grad.detach().numpy().copy() for t in hs],
        total_norm=None,
        dW_unclipped=dW,
        db_unclipped=db,
    )
    if max_norm is not None:
        params = []
        for lin in layers:
            params += [lin.weight, lin.bias]
        total = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)
        res.total_norm = float(total)
        res.dW, res.db = grads()
    return res


# --------------------------------------------------------------------------------------
# Norms
# --------------------------------------------------------------------------------------
def pnorm(arrays, p=2.0):
    """The p-norm of all entries of the given arrays together (as clip_grad_norm_)."""
    flat = np.concatenate([np.ravel(np.asarray(a, dtype=np.float64)) for a in arrays])
    if math.isinf(p):
        return float(np.max(np.abs(flat))) if flat.size else 0.0
    return float(np.sum(np.abs(flat) ** p) ** (1.0 / p))


def frob_norms(arrays):
    return np.array([np.linalg.norm(np.asarray(a, dtype=np.float64)) for a in arrays])


def log10_sum_pow10(values):
    """log10(sum 10^v) computed stably; -inf for an empty or all -inf input."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or np.all(v == -np.inf):
        return -math.inf
    m = np.max(v)
    return float(m + np.log10(np.sum(10.0 ** (v - m))))


def log10_total_norm(log10_norms, p=2.0):
    """log10 of the p-norm of a set of arrays given the log10 of each one's p-norm."""
    v = np.asarray(log10_norms, dtype=np.float64)
    if math.isinf(p):
        return float(np.max(v))
    return log10_sum_pow10(p * v) / p


def _log10(x):
    return math.log10(x) if x > 0 else -math.inf


def renormalised_log10_norms(
    weights,
    biases,
    x,
    activation,
    loss="probe",
    target=None,
    grad_output=None,
    negative_slope=0.01,
    alpha=1.0,
    log_forward=None,
):
    """log10 of the per-layer gradient norms, robust to under/overflow.

    The backward pass divides the propagated gradient by its norm at every layer and
    accumulates the log10 of the divisor.  The forward pass is plain float64 unless
    ``log_forward`` (default: the activation is positively homogeneous and every bias is
    zero), in which case the activations are renormalised the same way (then only the
    ``probe`` and ``grad_output`` losses are supported).

    Returns a namespace with ``log10_weight``, ``log10_bias`` (depth), ``log10_act``
    (depth + 1), ``log10_loss``, ``log10_total`` (2-norm) and ``log10_output`` (the
    Frobenius norm of h_L).
    """
    depth = len(weights)
    zero_bias = biases is None or all(not np.any(np.asarray(b)) for b in biases)
    if biases is None:
        biases = _zeros_biases(weights)
    if log_forward is None:
        log_forward = activation in HOMOGENEOUS and zero_bias
    if log_forward and not (activation in HOMOGENEOUS and zero_bias):
        raise ValueError("log_forward needs a positively homogeneous chain with zero biases")

    # Forward: hs[l] * 10**fs[l] is h_l.  zs are the (identically scaled) pre-activations;
    # phi' is scale invariant for homogeneous phi so the scaled z gives the same mask.
    h = _as64(x)
    hs, zs, fs = [h], [], [0.0]
    scale = 0.0
    for w, b in zip(weights, biases):
        z = h @ _as64(w).T + _as64(b)
        h = act_forward(activation, z, negative_slope, alpha)
        if log_forward:
            n = np.linalg.norm(h)
            if n > 0:
                scale += math.log10(n)
                h = h / n
                z = z / n
        zs.append(z)
        hs.append(h)
        fs.append(scale)

    if log_forward:
        out_log = _log10(float(np.linalg.norm(hs[-1]))) + fs[-1]
        if loss == "probe":
            g, gs = hs[-1].copy(), fs[-1]
            log10_loss = math.log10(0.5) + 2.0 * out_log
        elif loss == "grad_output":
            g, gs = _as64(grad_output).copy(), 0.0
            log10_loss = math.nan
        else:
            raise ValueError("log_forward supports the probe and grad_output losses only")
    else:
        out_log = _log10(float(np.linalg.norm(hs[-1])))
        loss_val, g = _loss_and_grad(hs[-1], loss, target, grad_output)
        gs = 0.0
        log10_loss = _log10(loss_val) if not math.isnan(loss_val) else math.nan

    lw, lb, la = np.empty(depth), np.empty(depth), np.empty(depth + 1)
    n = float(np.linalg.norm(g))
    la[depth] = _log10(n) + gs
    for l in range(depth - 1, -1, -1):
        n = float(np.linalg.norm(g))
        if n > 0:
            gs += math.log10(n)
            g = g / n
        dz = g * act_derivative(activation, zs[l], negative_slope, alpha)
        lw[l] = _log10(float(np.linalg.norm(dz.T @ hs[l]))) + gs + fs[l]
        lb[l] = _log10(float(np.linalg.norm(dz.sum(axis=0)))) + gs
        g = dz @ _as64(weights[l])
        la[l] = _log10(float(np.linalg.norm(g))) + gs
    return SimpleNamespace(
        log10_weight=lw,
        log10_bias=lb,
        log10_act=la,
        log10_loss=log10_loss,
        log10_total=log10_total_norm(np.concatenate([lw, lb]), 2.0),
        log10_output=out_log,
    )
