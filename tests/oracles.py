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

The same three for recurrent chains (torch's RNN/LSTM/GRU layout, full and truncated BPTT):
:func:`numpy_rnn_backward`, :func:`torch_rnn_backward` (plus :func:`torch_module_backward`
through torch's fused modules) and :func:`renormalised_rnn_log10_state_norms`.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
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
_erfc = np.vectorize(math.erfc, otypes=[np.float64])


def _normal_cdf(z):
    """Phi(z) as erfc(-z / sqrt 2) / 2, accurate in the lower tail (torch's
    (1 + erf(z / sqrt 2)) / 2 keeps about |Phi| / eps of its digits there)."""
    return 0.5 * _erfc(-np.asarray(z, dtype=np.float64) / math.sqrt(2.0))


# --------------------------------------------------------------------------------------
# Activations: value and derivative with respect to the pre-activation z, in float64.
# --------------------------------------------------------------------------------------
def _sigmoid(z):
    e = np.exp(-np.abs(z))  # never overflows
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def saturated(v, ulps=0):
    """v with the entries within `ulps` units in the last place (of float64, below 1) of
    +-1 rounded to +-1: another faithful rounding of a tanh or sigmoid output, one that
    makes the derivatives formed from it (1 - t^2, s (1 - s)) exactly 0."""
    if not ulps:
        return v
    return np.where(np.abs(v) >= 1.0 - ulps * 2.0**-53, np.sign(v), v)


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
        return z * _normal_cdf(z)
    if name == "gelu_tanh":  # (1 + tanh(u)) / 2 as sigmoid(2 u): no cancellation below z = -7
        with np.errstate(over="ignore"):
            return z * _sigmoid(2.0 * _SQRT_2_OVER_PI * (z + _GELU_KAPPA * z**3))
    if name == "silu":
        return z * _sigmoid(z)
    if name == "softplus":  # beta = 1, threshold = 20 (torch default)
        return np.where(z > 20.0, z, np.log1p(np.exp(np.minimum(z, 20.0))))
    raise ValueError(f"unknown activation {name!r}")


def act_derivative(name, z, negative_slope=0.01, alpha=1.0, saturate=0):
    """phi'(z), with torch's conventions at the kinks (relu'(0) = 0, leaky'(0) = slope,
    elu'(0) = alpha). Formed as torch forms it, from the rounded tanh or sigmoid output;
    `saturate`: that output rounded to +-1 within so many ulps (see `saturated`)."""
    z = np.asarray(z, dtype=np.float64)
    if name == "linear":
        return np.ones_like(z)
    if name == "sigmoid":
        s = saturated(_sigmoid(z), saturate)
        return s * (1.0 - s)
    if name == "tanh":
        t = saturated(np.tanh(z), saturate)
        return 1.0 - t * t
    if name == "relu":
        return np.where(z > 0, 1.0, 0.0)
    if name == "leaky_relu":
        return np.where(z > 0, 1.0, negative_slope)
    if name == "elu":
        return np.where(z > 0, 1.0, alpha * np.exp(np.minimum(z, 0.0)))
    if name == "gelu":
        cdf = _normal_cdf(z)
        pdf = _INV_SQRT_2PI * np.exp(-0.5 * z * z)
        return cdf + z * pdf
    if name == "gelu_tanh":
        with np.errstate(over="ignore", invalid="ignore"):
            s = saturated(_sigmoid(2.0 * _SQRT_2_OVER_PI * (z + _GELU_KAPPA * z**3)), saturate)
            # 2 s (1 - s) = 1 - tanh(u)^2; where it is 0, z^2 may be inf
            q = 2.0 * s * (1.0 - s)
            right = np.where(
                q == 0.0, 0.0, z * q * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_KAPPA * z * z)
            )
        return s + right
    if name == "silu":
        s = saturated(_sigmoid(z), saturate)
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


def _flushed(a, flush):
    """`a` with its entries more than 2**flush below its largest set to 0 (flush None: `a`
    as it is)."""
    if flush is None:
        return a
    m = float(np.max(np.abs(a), initial=0.0))
    if not math.isfinite(m):
        return a
    return np.where(np.abs(a) < math.ldexp(m, -flush), 0.0 * a, a)


def numpy_forward(
    weights, biases, x, activation, negative_slope=0.01, alpha=1.0, dtype=np.float64, flush=None
):
    """Plain forward (float64 unless `dtype`: then the affine maps run in that precision
    and each activation output is rounded to it).  Returns (zs, hs) with hs[0] = x.
    ``flush``: pre-activations more than 2**flush below their layer's largest are set to 0."""
    dt = np.dtype(dtype)
    if biases is None:
        biases = _zeros_biases(weights)
    h = np.asarray(x, dtype=dt)
    zs, hs = [], [h]
    with np.errstate(all="ignore"):
        for w, b in zip(weights, biases):
            z = _flushed(h @ np.asarray(w, dtype=dt).T + np.asarray(b, dtype=dt), flush)
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
    saturate=0,
    flush=None,
):
    """Reference forward + backward in float64 NumPy.

    Returns a namespace with ``loss``, ``output`` (h_L), ``dW`` and ``db`` (lists of length
    depth) and ``dh`` (length depth + 1, dh[0] = dL/dx). ``saturate``: tanh and sigmoid
    outputs within so many ulps of +-1 are taken as +-1 in the derivatives (`saturated`);
    ``flush``: as in :func:`numpy_forward`, and the same for dL/dh_l and dL/dz_l in the
    backward pass.
    """
    if biases is None:
        biases = _zeros_biases(weights)
    zs, hs = numpy_forward(weights, biases, x, activation, negative_slope, alpha, flush=flush)
    loss_val, g = _loss_and_grad(hs[-1], loss, target, grad_output)
    g = _flushed(g, flush)
    depth = len(weights)
    dW, db, dh = [None] * depth, [None] * depth, [None] * (depth + 1)
    dh[depth] = g
    for l in range(depth - 1, -1, -1):
        dz = _flushed(g * act_derivative(activation, zs[l], negative_slope, alpha, saturate), flush)
        dW[l] = dz.T @ hs[l]
        db[l] = dz.sum(axis=0)
        g = _flushed(dz @ _as64(weights[l]), flush)
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


# --------------------------------------------------------------------------------------
# Extended precision: x87 long double has 15 exponent bits (down to 1e-4951), so chains
# whose float64 values underflow or overflow are computed plainly, with no rescaling.
# --------------------------------------------------------------------------------------
LD = np.longdouble
HAVE_LONGDOUBLE = np.finfo(LD).maxexp >= 16384


def _ld_erf(z):
    # math.erf is double; below 1e-300 erf(u) = 2u/sqrt(pi) to every bit that matters here.
    flat = [
        LD(math.erf(float(v))) if abs(v) > 1e-300 else LD(2.0 / math.sqrt(math.pi)) * v
        for v in np.ravel(z)
    ]
    return np.array(flat, dtype=LD).reshape(np.shape(z))


def _ld_sigmoid(z):
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e))


def _ld_act(name, z, negative_slope, alpha, derivative):
    one = LD(1)
    if name == "tanh":
        t = np.tanh(z)
        return one - t * t if derivative else t
    if name == "silu":
        s = _ld_sigmoid(z)
        return s * (one + z * (one - s)) if derivative else z * s
    if name == "sigmoid":
        s = _ld_sigmoid(z)
        return s * (one - s) if derivative else s
    if name == "elu":
        a = LD(alpha)
        if derivative:
            return np.where(z > 0, one, a * np.exp(np.minimum(z, 0)))
        return np.where(z > 0, z, a * np.expm1(np.minimum(z, 0)))
    if name == "gelu":
        cdf = (one + _ld_erf(z / np.sqrt(LD(2)))) / 2
        if derivative:
            return cdf + z * np.exp(-z * z / 2) / np.sqrt(2 * LD(math.pi))
        return z * cdf
    if name == "gelu_tanh":
        b, k = np.sqrt(2 / LD(math.pi)), LD(_GELU_KAPPA)
        t = np.tanh(b * (z + k * z**3))
        if derivative:
            return (one + t) / 2 + z / 2 * (one - t * t) * b * (one + 3 * k * z * z)
        return z / 2 * (one + t)
    if name in ("linear", "relu", "leaky_relu"):
        s = LD(0 if name == "relu" else (1 if name == "linear" else negative_slope))
        if derivative:
            return np.where(z > 0, one, s)
        return np.where(z > 0, z, s * z)
    raise ValueError(f"no long-double form for {name!r}")


def longdouble_backward(
    weights, biases, x, activation, loss="probe", grad_output=None, negative_slope=0.01, alpha=1.0
):
    """log10 of the per-layer gradient norms of an MLP computed plainly in long double
    (probe or grad_output loss). Returns a namespace like renormalised_log10_norms."""
    if not HAVE_LONGDOUBLE:
        raise RuntimeError("numpy's long double is not the x87 80-bit format here")
    W = [np.asarray(w, dtype=np.float64).astype(LD) for w in weights]
    if biases is None:
        biases = _zeros_biases(weights)
    b_ = [np.asarray(b, dtype=np.float64).astype(LD) for b in biases]
    h = np.asarray(x, dtype=np.float64).astype(LD)
    hs, zs = [h], []
    for w, b in zip(W, b_):
        z = h @ w.T + b
        h = _ld_act(activation, z, negative_slope, alpha, False)
        zs.append(z)
        hs.append(h)

    def lg(a):
        n = np.sqrt(np.sum(a * a))
        return float(np.log10(n)) if n > 0 else -math.inf

    if loss == "probe":
        g = hs[-1].copy()
        log10_loss = float(np.log10(np.sum(g * g) / 2)) if np.any(g) else -math.inf
    else:
        g = np.asarray(grad_output, dtype=np.float64).astype(LD)
        log10_loss = math.nan
    depth = len(W)
    lw, lb, la = np.empty(depth), np.empty(depth), np.empty(depth + 1)
    la[depth] = lg(g)
    for l in range(depth - 1, -1, -1):
        dz = g * _ld_act(activation, zs[l], negative_slope, alpha, True)
        lw[l] = lg(dz.T @ hs[l])
        lb[l] = lg(dz.sum(axis=0))
        g = dz @ W[l]
        la[l] = lg(g)
    return SimpleNamespace(
        log10_weight=lw,
        log10_bias=lb,
        log10_act=la,
        log10_loss=log10_loss,
        log10_total=log10_total_norm(np.concatenate([lw, lb]), 2.0),
        log10_output=lg(hs[-1]),
    )


# ======================================================================================
# Recurrent chains (torch.nn.RNN / LSTM / GRU layout and equations)
# ======================================================================================
#
# Notation: layers l = 0..L-1, states h^l_t for t = 0..T (h^l_0 the initial state), the
# input of layer 0 at step t is x[t - 1], that of layer l > 0 is h^{l-1}_t.  The loss sees
# the top layer through an optional readout y_t = h_t W_out^T + b_out.  "State gradient"
# means the total gradient arriving at a state (see the definitions in the truncated
# modes below).
RNN_CELLS = ("tanh", "relu", "lstm", "gru")
RNN_LOSSES = ("probe", "mse", "cross_entropy", "grad")
TRUNCATE_MODES = ("detach", "window")
RNN_GATES = {"tanh": 1, "relu": 1, "lstm": 4, "gru": 3}


def _np64(a):
    """float64 copy of an array-like or a torch tensor."""
    if hasattr(a, "detach") and hasattr(a, "cpu"):
        a = a.detach().cpu().numpy()
    return np.array(a, dtype=np.float64)


def _rnn_params(cell, state_dict):
    """The state dict as float64 arrays plus the sizes inferred from it."""
    if cell not in RNN_CELLS:
        raise ValueError(f"unknown cell {cell!r}")
    sd = {k: _np64(v) for k, v in state_dict.items()}
    num_layers = 0
    while f"weight_ih_l{num_layers}" in sd:
        num_layers += 1
    if num_layers == 0:
        raise ValueError("state_dict has no weight_ih_l0")
    gates = RNN_GATES[cell]
    hidden = sd["weight_hh_l0"].shape[1]
    bias = "bias_ih_l0" in sd
    layers = []
    for l in range(num_layers):
        w_ih, w_hh = sd[f"weight_ih_l{l}"], sd[f"weight_hh_l{l}"]
        if w_ih.shape[0] != gates * hidden or w_hh.shape != (gates * hidden, hidden):
            raise ValueError(f"layer {l}: shapes {w_ih.shape}, {w_hh.shape} do not fit {cell!r}")
        zero = np.zeros(gates * hidden)
        layers.append(
            SimpleNamespace(
                w_ih=w_ih,
                w_hh=w_hh,
                b_ih=sd.get(f"bias_ih_l{l}", zero),
                b_hh=sd.get(f"bias_hh_l{l}", zero),
            )
        )
    readout = None
    if "readout.weight" in sd:
        w = sd["readout.weight"]
        readout = SimpleNamespace(w=w, b=sd.get("readout.bias", np.zeros(w.shape[0])))
    return SimpleNamespace(
        cell=cell,
        num_layers=num_layers,
        hidden=hidden,
        input_size=sd["weight_ih_l0"].shape[1],
        bias=bias,
        layers=layers,
        readout=readout,
        names=list(sd),
        shapes={k: v.shape for k, v in sd.items()},
    )


def _initial_states(P, x, h0, c0):
    shape = (P.num_layers, x.shape[1], P.hidden)
    h = np.zeros(shape) if h0 is None else _np64(h0).reshape(shape)
    c = None
    if P.cell == "lstm":
        c = np.zeros(shape) if c0 is None else _np64(c0).reshape(shape)
    return h, c


def _check_truncate(truncate, truncate_mode):
    if truncate_mode not in TRUNCATE_MODES:
        raise ValueError(f"unknown truncate_mode {truncate_mode!r}")
    if truncate is not None and (int(truncate) != truncate or truncate < 1):
        raise ValueError(f"truncate must be None or an integer >= 1; got {truncate!r}")
    return None if truncate is None else int(truncate)


def _np_cell_forward(cell, p, xin, h, c, saturate=0):
    """One step of one layer: (h', c' or None, cache for the backward step). `saturate`:
    tanh and sigmoid outputs within so many ulps of +-1 are rounded to +-1 (`saturated`)."""
    gi = xin @ p.w_ih.T + p.b_ih
    gh = h @ p.w_hh.T + p.b_hh

    def tanh(v):
        return saturated(np.tanh(v), saturate)

    def sigmoid(v):
        return saturated(_sigmoid(v), saturate)

    if cell in ("tanh", "relu"):
        z = gi + gh
        hn = tanh(z) if cell == "tanh" else np.where(z > 0, z, 0.0)
        return hn, None, (xin, h, z, hn)
    if cell == "lstm":
        a = gi + gh
        ai, af, ag, ao = np.split(a, 4, axis=1)
        i, f, g, o = sigmoid(ai), sigmoid(af), tanh(ag), sigmoid(ao)
        cn = f * c + i * g
        tc = tanh(cn)
        return o * tc, cn, (xin, h, c, i, f, g, o, tc)
    # gru
    gi_r, gi_z, gi_n = np.split(gi, 3, axis=1)
    gh_r, gh_z, gh_n = np.split(gh, 3, axis=1)
    r = sigmoid(gi_r + gh_r)
    z = sigmoid(gi_z + gh_z)
    n = tanh(gi_n + r * gh_n)
    return (1.0 - z) * n + z * h, None, (xin, h, r, z, n, gh_n)


def _np_cell_backward(cell, p, cache, dh, dc, acc):
    """Backward of one step of one layer.

    dh: gradient at h' to propagate; dc (LSTM): gradient at c' from the next step.
    Adds the parameter gradients to `acc` (w_ih, w_hh, b_ih, b_hh) and returns
    (d input, d h, d c (LSTM) or None, total gradient at c' (LSTM) or None).
    """
    if cell in ("tanh", "relu"):
        xin, h, z, hn = cache
        da = dh * (1.0 - hn * hn) if cell == "tanh" else np.where(z > 0, dh, 0.0)
        dgi = dgh = da
        dc_prev = dc_total = None
        dh_direct = 0.0
    elif cell == "lstm":
        xin, h, c, i, f, g, o, tc = cache
        dc_total = dc + dh * o * (1.0 - tc * tc)
        do = dh * tc
        di, dg, df = dc_total * g, dc_total * i, dc_total * c
        dc_prev = dc_total * f
        da = np.concatenate(
            [di * i * (1.0 - i), df * f * (1.0 - f), dg * (1.0 - g * g), do * o * (1.0 - o)],
            axis=1,
        )
        dgi = dgh = da
        dh_direct = 0.0
    else:  # gru
        xin, h, r, z, n, gh_n = cache
        dn = dh * (1.0 - z)
        dz = dh * (h - n)
        dh_direct = dh * z
        dn_pre = dn * (1.0 - n * n)
        dr_pre = dn_pre * gh_n * r * (1.0 - r)
        dz_pre = dz * z * (1.0 - z)
        dgi = np.concatenate([dr_pre, dz_pre, dn_pre], axis=1)
        dgh = np.concatenate([dr_pre, dz_pre, dn_pre * r], axis=1)
        dc_prev = dc_total = None
    acc["w_ih"] += dgi.T @ xin
    acc["w_hh"] += dgh.T @ h
    acc["b_ih"] += dgi.sum(axis=0)
    acc["b_hh"] += dgh.sum(axis=0)
    if "abs" in acc:  # the same sums over absolute values (see numpy_rnn_backward)
        a = acc["abs"]
        a["w_ih"] += np.abs(dgi).T @ np.abs(xin)
        a["w_hh"] += np.abs(dgh).T @ np.abs(h)
        a["b_ih"] += np.abs(dgi).sum(axis=0)
        a["b_hh"] += np.abs(dgh).sum(axis=0)
    return dgi @ p.w_ih, dh_direct + dgh @ p.w_hh, dc_prev, dc_total


def _np_rnn_forward(P, x, h, c, saturate=0):
    """Full forward from the initial states.  hs[l][t], cs[l][t] for t = 0..T; caches[t][l]
    for t = 1..T (caches[0] is unused)."""
    T = x.shape[0]
    hs = [[h[l]] for l in range(P.num_layers)]
    cs = [[c[l]] for l in range(P.num_layers)] if c is not None else None
    caches = [None]
    for t in range(1, T + 1):
        inp = x[t - 1]
        step = []
        for l, p in enumerate(P.layers):
            hn, cn, cache = _np_cell_forward(
                P.cell, p, inp, hs[l][t - 1], cs[l][t - 1] if cs else None, saturate
            )
            hs[l].append(hn)
            if cs is not None:
                cs[l].append(cn)
            step.append(cache)
            inp = hn
        caches.append(step)
    return hs, cs, caches


def _np_loss_terms(P, top, loss, target):
    """Loss value, {t: d ell_t / d h_t at the top layer} and the readout gradients.

    `top` lists the top layer's states h_0..h_T.  Since ell_t depends on h_t only, the
    gradient of the full loss at h_t equals that of its term ell_t.
    """
    T = len(top) - 1
    B = top[0].shape[0]
    ro = P.readout
    d_ro_w = None if ro is None else np.zeros_like(ro.w)
    d_ro_b = None if ro is None else np.zeros_like(ro.b)

    def y_of(h):
        return h if ro is None else h @ ro.w.T + ro.b

    def to_h(t, h, dy):
        if ro is None:
            return dy
        d_ro_w[...] += dy.T @ h
        d_ro_b[...] += dy.sum(axis=0)
        return dy @ ro.w

    inject = {}
    if loss == "probe":
        val = 0.5 * float(np.sum(top[T] * top[T]))
        inject[T] = top[T].copy()
    elif loss == "mse":
        tgt = _np64(target)
        steps = {T: tgt} if tgt.ndim == 2 else {t: tgt[t - 1] for t in range(1, T + 1)}
        if tgt.ndim not in (2, 3) or (tgt.ndim == 3 and tgt.shape[0] != T):
            raise ValueError(f"mse target must be (B, out) or (T, B, out); got {tgt.shape}")
        total, val = tgt.size, 0.0
        for t, tg in steps.items():
            d = y_of(top[t]) - tg
            val += float(np.sum(d * d))
            inject[t] = to_h(t, top[t], 2.0 * d / total)
        val /= total
    elif loss == "cross_entropy":
        labels = np.asarray(target)
        if labels.ndim not in (1, 2) or (labels.ndim == 2 and labels.shape[0] != T):
            raise ValueError(f"cross_entropy target must be (B,) or (T, B); got {labels.shape}")
        labels = labels.astype(np.int64)
        steps = {T: labels} if labels.ndim == 1 else {t: labels[t - 1] for t in range(1, T + 1)}
        total, val = labels.size, 0.0
        for t, lab in steps.items():
            y = y_of(top[t])
            m = y.max(axis=1, keepdims=True)
            e = np.exp(y - m)
            s = e.sum(axis=1, keepdims=True)
            lse = (m + np.log(s))[:, 0]
            val += float(np.sum(lse - y[np.arange(B), lab]))
            prob = e / s
            prob[np.arange(B), lab] -= 1.0
            inject[t] = to_h(t, top[t], prob / total)
        val /= total
    elif loss == "grad":
        g = _np64(target)
        if g.ndim == 2:
            inject[T] = g
        elif g.ndim == 3 and g.shape[0] == T:
            inject.update({t: g[t - 1] for t in range(1, T + 1)})
        else:
            raise ValueError(f"grad target must be (B, H) or (T, B, H); got {g.shape}")
        val = float("nan")
    else:
        raise ValueError(f"unknown loss {loss!r}")
    return val, inject, d_ro_w, d_ro_b


def _np_backward_range(P, caches, lo, hi, inject, cut, acc):
    """Backpropagate the top-layer injections {t: dh} over steps hi..lo+1.

    At t in `cut` (lo < t < hi) the gradient coming from step t + 1 is reported as part
    of the state gradient at t but not propagated further back (a detached state).
    Returns the state and cell gradients at t = lo..hi, shape (L, hi - lo + 1, B, H).
    """
    L = P.num_layers
    B = caches[hi][0][1].shape[0]
    H = P.hidden
    lstm = P.cell == "lstm"
    sg = np.zeros((L, hi - lo + 1, B, H))
    cg = np.zeros((L, hi - lo + 1, B, H)) if lstm else None
    carry_h = [np.zeros((B, H)) for _ in range(L)]
    carry_c = [np.zeros((B, H)) for _ in range(L)] if lstm else [None] * L
    for t in range(hi, lo, -1):
        from_above = None
        for l in range(L - 1, -1, -1):
            g = np.zeros((B, H))
            if l == L - 1 and t in inject:
                g = g + inject[t]
            if from_above is not None:
                g = g + from_above
            if t in cut:
                report = g + carry_h[l]
                dh, dc = g, (np.zeros((B, H)) if lstm else None)
                extra_c = carry_c[l]
            else:
                dh = g + carry_h[l]
                report = dh
                dc = carry_c[l]
                extra_c = None
            dx, dh_prev, dc_prev, dc_total = _np_cell_backward(
                P.cell, P.layers[l], caches[t][l], dh, dc, acc[l]
            )
            sg[l, t - lo] = report
            if lstm:
                cg[l, t - lo] = dc_total if extra_c is None else dc_total + extra_c
            carry_h[l], carry_c[l] = dh_prev, dc_prev
            from_above = dx
    for l in range(L):
        sg[l, 0] = carry_h[l]
        if lstm:
            cg[l, 0] = carry_c[l]
    return sg, cg


def numpy_rnn_step_values(cell, state_dict, x, *, h0=None, c0=None, absolute=False):
    """The plain float64 forward pass step by step, to judge what float arithmetic can hold
    (a flat list, in this order): per step and layer the input and recurrent pre-activations
    (``x W_ih^T + b_ih``, ``h W_hh^T + b_hh``), the new state (and the LSTM's cell state),
    and per step the read-out's output.  Overflow gives inf or NaN, not an error.  With
    ``absolute``, the pre-activations are replaced by the same sums of absolute values
    (``|x| |W_ih|^T + |b_ih|``...), which bound every partial sum of the products."""
    P = _rnn_params(cell, state_dict)
    x = _np64(x)
    h, c = _initial_states(P, x, h0, c0)
    hs = [h[l] for l in range(P.num_layers)]
    cs = [c[l] for l in range(P.num_layers)] if c is not None else None
    out = []
    with np.errstate(all="ignore"):
        for t in range(x.shape[0]):
            inp = x[t]
            for l, p in enumerate(P.layers):
                if absolute:
                    out += [np.abs(inp) @ np.abs(p.w_ih.T) + np.abs(p.b_ih),
                            np.abs(hs[l]) @ np.abs(p.w_hh.T) + np.abs(p.b_hh)]  # fmt: skip
                else:
                    out += [inp @ p.w_ih.T + p.b_ih, hs[l] @ p.w_hh.T + p.b_hh]
                hs[l], cn, _ = _np_cell_forward(cell, p, inp, hs[l], cs[l] if cs else None)
                out.append(hs[l])
                if cs is not None:
                    cs[l] = cn
                    out.append(cn)
                inp = hs[l]
            if P.readout is not None:
                if absolute:
                    out.append(np.abs(inp) @ np.abs(P.readout.w.T) + np.abs(P.readout.b))
                else:
                    out.append(inp @ P.readout.w.T + P.readout.b)
    return out


def numpy_rnn_forward(cell, state_dict, x, *, h0=None, c0=None, loss=None, target=None):
    """Reference forward pass in float64 NumPy (no backward).

    Returns a dict with ``output`` (T, B, H) (the top layer's h_1..h_T, as
    ``torch.nn.RNN``), ``h_n``, ``c_n`` (LSTM) or None, and ``loss`` (the loss value when
    ``loss`` is given, else None; NaN for ``"grad"``).
    """
    P = _rnn_params(cell, state_dict)
    x = _np64(x)
    if x.ndim != 3 or x.shape[2] != P.input_size or x.shape[0] < 1:
        raise ValueError(f"x must be (T >= 1, B, {P.input_size}); got {x.shape}")
    T = x.shape[0]
    h, c = _initial_states(P, x, h0, c0)
    hs, cs, _ = _np_rnn_forward(P, x, h, c)
    val = None if loss is None else _np_loss_terms(P, hs[-1], loss, target)[0]
    return {
        "loss": val,
        "output": np.stack(hs[-1][1:]),
        "h_n": np.stack([hs[l][T] for l in range(P.num_layers)]),
        "c_n": np.stack([cs[l][T] for l in range(P.num_layers)]) if cs is not None else None,
    }


def numpy_rnn_backward(
    cell,
    state_dict,
    x,
    *,
    h0=None,
    c0=None,
    loss="probe",
    target=None,
    truncate=None,
    truncate_mode="detach",
    saturate=0,
    sums=False,
):
    """Reference forward + backward of a recurrent chain in float64 NumPy.

    ``cell`` is one of :data:`RNN_CELLS` and ``state_dict`` has torch's layout
    (``weight_ih_l{k}``, ``weight_hh_l{k}``, optional ``bias_ih_l{k}``/``bias_hh_l{k}``,
    optional ``readout.weight``/``readout.bias``).  Losses and truncation follow the
    gradchain recurrent API:

    * ``truncate_mode="detach"``: the carried states of every layer are detached after
      steps k, 2k, ... < T; the state gradient reported at such a boundary is everything
      arriving there (loss, layer above, and step t + 1 through the detached copy), of which
      only the part not from step t + 1 travels further back.
    * ``truncate_mode="window"``: every loss term ell_t is backpropagated alone through the
      steps max(0, t - k) + 1..t, starting from the forward states at max(0, t - k) taken as
      leaves; parameter and state gradients are summed over t.  (Implemented directly:
      one backward pass per loss term.)

    ``saturate``: tanh and sigmoid outputs within so many ulps of +-1 are rounded to +-1
    (:func:`saturated`), so that the derivatives formed from them are exactly 0.

    Returns a dict with ``loss`` (NaN for ``"grad"``), ``state_grads`` (L, T + 1, B, H),
    ``cell_grads`` (LSTM, same shape) or None, ``grads`` (name -> array for every entry of
    the state dict), ``h_n`` (L, B, H) and ``c_n`` (LSTM) or None. With ``sums``, also
    ``abs_sums``: name -> the cells' parameter-gradient sums taken over absolute values
    (sum over steps and examples of |dL/dgates|^T |input|), which bound the rounding error
    of those sums in any order; the read-out's are None.
    """
    P = _rnn_params(cell, state_dict)
    k = _check_truncate(truncate, truncate_mode)
    x = _np64(x)
    if x.ndim != 3 or x.shape[2] != P.input_size or x.shape[0] < 1:
        raise ValueError(f"x must be (T >= 1, B, {P.input_size}); got {x.shape}")
    T, B = x.shape[:2]
    h, c = _initial_states(P, x, h0, c0)
    hs, cs, caches = _np_rnn_forward(P, x, h, c, saturate)
    val, inject, d_ro_w, d_ro_b = _np_loss_terms(P, hs[-1], loss, target)

    acc = [
        {
            "w_ih": np.zeros_like(p.w_ih),
            "w_hh": np.zeros_like(p.w_hh),
            "b_ih": np.zeros_like(p.b_ih),
            "b_hh": np.zeros_like(p.b_hh),
        }
        for p in P.layers
    ]
    if sums:
        for a in acc:
            a["abs"] = {n: np.zeros_like(v) for n, v in a.items()}
    if k is None or truncate_mode == "detach":
        cut = set() if k is None else set(range(k, T, k))  # empty when k >= T
        sg, cg = _np_backward_range(P, caches, 0, T, inject, cut, acc)
    else:  # window
        sg = np.zeros((P.num_layers, T + 1, B, P.hidden))
        cg = np.zeros_like(sg) if cell == "lstm" else None
        for t in sorted(inject):
            s0 = max(0, t - k)
            s, cc = _np_backward_range(P, caches, s0, t, {t: inject[t]}, set(), acc)
            sg[:, s0 : t + 1] += s
            if cg is not None:
                cg[:, s0 : t + 1] += cc
    grads = {}
    for l, a in enumerate(acc):
        grads[f"weight_ih_l{l}"] = a["w_ih"]
        grads[f"weight_hh_l{l}"] = a["w_hh"]
        grads[f"bias_ih_l{l}"] = a["b_ih"]
        grads[f"bias_hh_l{l}"] = a["b_hh"]
    if P.readout is not None:
        grads["readout.weight"] = d_ro_w
        grads["readout.bias"] = d_ro_b
    out = {}
    if sums:
        out["abs_sums"] = {
            f"{n}_l{l}": a["abs"][k]
            for l, a in enumerate(acc)
            for n, k in (
                ("weight_ih", "w_ih"),
                ("weight_hh", "w_hh"),
                ("bias_ih", "b_ih"),
                ("bias_hh", "b_hh"),
            )
        }
        out["abs_sums"] = {n: out["abs_sums"].get(n) for n in P.names}
    return out | {
        "loss": val,
        "state_grads": sg,
        "cell_grads": cg,
        "grads": {name: grads[name] for name in P.names},
        "h_n": np.stack([hs[l][T] for l in range(P.num_layers)]),
        "c_n": np.stack([cs[l][T] for l in range(P.num_layers)]) if cs is not None else None,
    }


def _torch_one_thread(fn):
    """Run a torch oracle on one intra-op thread (restored afterwards): its tensors are
    tiny, and an oversubscribed OpenMP pool makes them orders of magnitude slower."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(n)

    return wrapper


def _torch_cells(P):
    """One torch.nn.{RNN,LSTM,GRU}Cell per layer (float64) holding the state dict's weights."""
    import torch

    cells = []
    for l, p in enumerate(P.layers):
        in_size = P.input_size if l == 0 else P.hidden
        if P.cell in ("tanh", "relu"):
            m = torch.nn.RNNCell(
                in_size, P.hidden, bias=P.bias, nonlinearity=P.cell, dtype=torch.float64
            )
        elif P.cell == "lstm":
            m = torch.nn.LSTMCell(in_size, P.hidden, bias=P.bias, dtype=torch.float64)
        else:
            m = torch.nn.GRUCell(in_size, P.hidden, bias=P.bias, dtype=torch.float64)
        with torch.no_grad():
            m.weight_ih.copy_(torch.from_numpy(p.w_ih))
            m.weight_hh.copy_(torch.from_numpy(p.w_hh))
            if P.bias:
                m.bias_ih.copy_(torch.from_numpy(p.b_ih))
                m.bias_hh.copy_(torch.from_numpy(p.b_hh))
        cells.append(m)
    return cells


def _torch_readout(P):
    import torch

    if P.readout is None:
        return None, None
    w = torch.tensor(P.readout.w, dtype=torch.float64, requires_grad=True)
    b = None
    if "readout.bias" in P.names:
        b = torch.tensor(P.readout.b, dtype=torch.float64, requires_grad=True)
    return w, b


def _torch_target(loss, target):
    import torch

    if loss == "cross_entropy":
        return torch.as_tensor(np.asarray(target).astype(np.int64))
    if loss in ("mse", "grad"):
        return torch.as_tensor(_np64(target))
    return None


def _torch_full_loss(loss, tgt, top, ro_w, ro_b):
    """The loss of the top-layer states h_1..h_T (list) by torch.nn.functional; None for
    "grad"."""
    import torch
    import torch.nn.functional as F

    def y_of(h):
        return h if ro_w is None else F.linear(h, ro_w, ro_b)

    if loss == "probe":
        return 0.5 * top[-1].pow(2).sum()
    if loss == "mse":
        if tgt.dim() == 2:
            return F.mse_loss(y_of(top[-1]), tgt)
        return F.mse_loss(torch.stack([y_of(h) for h in top]), tgt)
    if loss == "cross_entropy":
        if tgt.dim() == 1:
            return F.cross_entropy(y_of(top[-1]), tgt)
        y = torch.stack([y_of(h) for h in top])
        T, B = tgt.shape
        return F.cross_entropy(y.reshape(T * B, -1), tgt.reshape(T * B))
    if loss == "grad":
        return None
    raise ValueError(f"unknown loss {loss!r}")


def _torch_loss_term(loss, tgt, t, T, h, ro_w, ro_b):
    """ell_t, the term of the loss that depends on the top state h_t (None if none)."""
    import torch.nn.functional as F

    def y_of(h):
        return h if ro_w is None else F.linear(h, ro_w, ro_b)

    if loss == "probe":
        return 0.5 * h.pow(2).sum() if t == T else None
    if loss == "mse":
        if tgt.dim() == 2:
            return F.mse_loss(y_of(h), tgt) if t == T else None
        return F.mse_loss(y_of(h), tgt[t - 1], reduction="sum") / tgt.numel()
    if loss == "cross_entropy":
        if tgt.dim() == 1:
            return F.cross_entropy(y_of(h), tgt) if t == T else None
        return F.cross_entropy(y_of(h), tgt[t - 1], reduction="sum") / tgt.numel()
    if loss == "grad":
        if tgt.dim() == 2:
            return (h * tgt).sum() if t == T else None
        return (h * tgt[t - 1]).sum()
    raise ValueError(f"unknown loss {loss!r}")


def _torch_step(cells, lstm, inp, h, c):
    """One time step through all layers: lists of the new h (and c) per layer."""
    hn, cn = [], []
    for l, m in enumerate(cells):
        if lstm:
            a, b = m(inp, (h[l], c[l]))
            cn.append(b)
        else:
            a = m(inp, h[l])
        hn.append(a)
        inp = a
    return hn, (cn if lstm else None)


def _grad_or_zero(t):
    import torch

    return torch.zeros_like(t) if t.grad is None else t.grad


@_torch_one_thread
def torch_rnn_backward(
    cell,
    state_dict,
    x,
    *,
    h0=None,
    c0=None,
    loss="probe",
    target=None,
    truncate=None,
    truncate_mode="detach",
    dtype="float64",
):
    """:func:`numpy_rnn_backward` by PyTorch autograd in float64 (or ``dtype``: the
    parameters, inputs and initial states rounded to it and every operation in it).

    The chain is unrolled step by step with one ``torch.nn.RNNCell``/``LSTMCell``/
    ``GRUCell`` per layer, ``retain_grad()`` on every state.  ``"detach"`` truncation
    replaces the carried states by ``state.detach().requires_grad_()`` after every k steps
    (the reported gradient at a boundary is the pre-detach state's plus the detached
    copy's); ``"window"`` re-runs the chain from detached leaves at max(0, t - k) for every
    loss term ell_t and backpropagates it alone.  Same return value.
    """
    import torch

    P = _rnn_params(cell, state_dict)
    k = _check_truncate(truncate, truncate_mode)
    xn = _np64(x)
    if xn.ndim != 3 or xn.shape[2] != P.input_size or xn.shape[0] < 1:
        raise ValueError(f"x must be (T >= 1, B, {P.input_size}); got {xn.shape}")
    T, B = xn.shape[:2]
    L, H = P.num_layers, P.hidden
    lstm = cell == "lstm"
    h0n, c0n = _initial_states(P, xn, h0, c0)
    npdt = np.dtype(dtype)
    tdt = {"float64": torch.float64, "float32": torch.float32}[npdt.name]
    xn, h0n = xn.astype(npdt), h0n.astype(npdt)
    c0n = None if c0n is None else c0n.astype(npdt)
    xt = torch.from_numpy(xn)
    cells = [m.to(tdt) for m in _torch_cells(P)]
    ro_w, ro_b = _torch_readout(P)
    if ro_w is not None:
        ro_w = ro_w.detach().to(tdt).requires_grad_()
        ro_b = None if ro_b is None else ro_b.detach().to(tdt).requires_grad_()
    tgt = _torch_target(loss, target)
    if tgt is not None and tgt.is_floating_point():
        tgt = tgt.to(tdt)

    sg = np.zeros((L, T + 1, B, H))
    cg = np.zeros_like(sg) if lstm else None

    def leaves(hv, cv):
        h = [torch.tensor(hv[l], requires_grad=True) for l in range(L)]
        c = [torch.tensor(cv[l], requires_grad=True) for l in range(L)] if lstm else None
        return h, c

    if k is None or truncate_mode == "detach":
        h, c = leaves(h0n, c0n)
        hs = [[h[l]] for l in range(L)]
        cs = [[c[l]] for l in range(L)] if lstm else None
        detached = {}  # t -> (h copies, c copies) carried into step t + 1
        for t in range(1, T + 1):
            h, c = _torch_step(cells, lstm, xt[t - 1], h, c)
            for l in range(L):
                h[l].retain_grad()
                hs[l].append(h[l])
                if lstm:
                    c[l].retain_grad()
                    cs[l].append(c[l])
            if k is not None and t % k == 0 and t < T:
                h = [v.detach().requires_grad_() for v in h]
                c = [v.detach().requires_grad_() for v in c] if lstm else None
                detached[t] = (h, c)
        top = hs[L - 1][1:]
        lv = _torch_full_loss(loss, tgt, top, ro_w, ro_b)
        if lv is None:  # "grad": upstream gradients at the top states
            if tgt.dim() == 2:
                torch.autograd.backward([top[-1]], [tgt])
            else:
                torch.autograd.backward(top, list(tgt.unbind(0)))
            val = float("nan")
        else:
            lv.backward()
            val = float(lv.detach())
        for l in range(L):
            for t in range(T + 1):
                sg[l, t] = _grad_or_zero(hs[l][t]).numpy()
                if lstm:
                    cg[l, t] = _grad_or_zero(cs[l][t]).numpy()
        for t, (hd, cd) in detached.items():
            for l in range(L):
                sg[l, t] += _grad_or_zero(hd[l]).numpy()
                if lstm:
                    cg[l, t] += _grad_or_zero(cd[l]).numpy()
        h_n = np.stack([hs[l][T].detach().numpy() for l in range(L)])
        c_n = np.stack([cs[l][T].detach().numpy() for l in range(L)]) if lstm else None
    else:  # window
        with torch.no_grad():
            h = [torch.from_numpy(h0n[l]) for l in range(L)]
            c = [torch.from_numpy(c0n[l]) for l in range(L)] if lstm else None
            fh, fc = [h], [c]
            for t in range(1, T + 1):
                h, c = _torch_step(cells, lstm, xt[t - 1], h, c)
                fh.append(h)
                fc.append(c)
            lv = _torch_full_loss(loss, tgt, [s[L - 1] for s in fh[1:]], ro_w, ro_b)
            val = float("nan") if lv is None else float(lv)
        for t in range(1, T + 1):
            s0 = max(0, t - k)
            h, c = leaves(
                np.stack([v.numpy() for v in fh[s0]]),
                np.stack([v.numpy() for v in fc[s0]]) if lstm else None,
            )
            run_h, run_c = [h], [c]
            for s in range(s0 + 1, t + 1):
                h, c = _torch_step(cells, lstm, xt[s - 1], h, c)
                for v in h + (c if lstm else []):
                    v.retain_grad()
                run_h.append(h)
                run_c.append(c)
            term = _torch_loss_term(loss, tgt, t, T, h[L - 1], ro_w, ro_b)
            if term is None:
                continue
            term.backward()
            for j, s in enumerate(range(s0, t + 1)):
                for l in range(L):
                    sg[l, s] += _grad_or_zero(run_h[j][l]).numpy()
                    if lstm:
                        cg[l, s] += _grad_or_zero(run_c[j][l]).numpy()
        h_n = np.stack([v.numpy() for v in fh[T]])
        c_n = np.stack([v.numpy() for v in fc[T]]) if lstm else None

    grads = {}
    for l, m in enumerate(cells):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            p = getattr(m, name, None)
            if p is not None:
                grads[f"{name}_l{l}"] = _grad_or_zero(p).detach().numpy().copy()
    if ro_w is not None:
        grads["readout.weight"] = _grad_or_zero(ro_w).detach().numpy().copy()
        if ro_b is not None:
            grads["readout.bias"] = _grad_or_zero(ro_b).detach().numpy().copy()
    return {
        "loss": val,
        "state_grads": sg,
        "cell_grads": cg,
        "grads": {name: grads[name] for name in P.names},
        "h_n": h_n.copy(),
        "c_n": None if c_n is None else c_n.copy(),
    }


@_torch_one_thread
def torch_module_backward(cell, state_dict, x, h0=None, c0=None, loss="probe", target=None):
    """Full BPTT through torch's fused ``torch.nn.RNN``/``LSTM``/``GRU`` module (float64).

    Returns a dict with ``loss``, ``grads`` (name -> array, state dict order),
    ``output_grads`` (the loss's gradient at the module's output, (T, B, H)),
    ``h0_grad``/``c0_grad`` (gradient at the initial states; c0_grad None unless LSTM),
    ``output``, ``h_n`` and ``c_n``.
    """
    import torch

    P = _rnn_params(cell, state_dict)
    xn = _np64(x)
    lstm = cell == "lstm"
    kw = {"bias": P.bias, "dtype": torch.float64}
    if cell in ("tanh", "relu"):
        mod = torch.nn.RNN(P.input_size, P.hidden, P.num_layers, nonlinearity=cell, **kw)
    elif lstm:
        mod = torch.nn.LSTM(P.input_size, P.hidden, P.num_layers, **kw)
    else:
        mod = torch.nn.GRU(P.input_size, P.hidden, P.num_layers, **kw)
    rnn_keys = [n for n in P.names if not n.startswith("readout.")]
    mod.load_state_dict({n: torch.from_numpy(_np64(state_dict[n])) for n in rnn_keys}, strict=True)
    h0n, c0n = _initial_states(P, xn, h0, c0)
    h0t = torch.tensor(h0n, requires_grad=True)
    xt = torch.from_numpy(xn)
    if lstm:
        c0t = torch.tensor(c0n, requires_grad=True)
        out, (h_n, c_n) = mod(xt, (h0t, c0t))
    else:
        c0t = c_n = None
        out, h_n = mod(xt, h0t)
    out.retain_grad()
    ro_w, ro_b = _torch_readout(P)
    tgt = _torch_target(loss, target)
    lv = _torch_full_loss(loss, tgt, list(out.unbind(0)), ro_w, ro_b)
    if lv is None:
        g = torch.zeros_like(out)
        if tgt.dim() == 2:
            g[-1] = tgt
        else:
            g[...] = tgt
        out.backward(g)
        val = float("nan")
    else:
        lv.backward()
        val = float(lv.detach())
    grads = {n: _grad_or_zero(p).detach().numpy().copy() for n, p in mod.named_parameters()}
    if ro_w is not None:
        grads["readout.weight"] = _grad_or_zero(ro_w).detach().numpy().copy()
        if ro_b is not None:
            grads["readout.bias"] = _grad_or_zero(ro_b).detach().numpy().copy()
    return {
        "loss": val,
        "grads": {n: grads[n] for n in P.names},
        "output_grads": _grad_or_zero(out).detach().numpy().copy(),
        "h0_grad": _grad_or_zero(h0t).numpy().copy(),
        "c0_grad": None if c0t is None else _grad_or_zero(c0t).numpy().copy(),
        "output": out.detach().numpy().copy(),
        "h_n": h_n.detach().numpy().copy(),
        "c_n": None if c_n is None else c_n.detach().numpy().copy(),
    }


def _renormalised_rnn(cell, state_dict, x, h0, c0, grad_output):
    P = _rnn_params(cell, state_dict)
    x = _np64(x)
    T = x.shape[0]
    h, c = _initial_states(P, x, h0, c0)
    with np.errstate(over="raise", invalid="raise"):
        hs, _, caches = _np_rnn_forward(P, x, h, c)
    L = P.num_layers
    lstm = cell == "lstm"
    top = hs[L - 1][T]
    if not np.all(np.isfinite(top)):
        raise FloatingPointError("the forward pass is not finite")
    log_h = np.full(T + 1, -math.inf)
    log_c = np.full(T + 1, -math.inf) if lstm else None
    # Carried gradients (all layers), all divided by 10**scale.
    scale = 0.0
    zeros = np.zeros_like(top)
    carry_h = [zeros] * L
    carry_c = [zeros] * L if lstm else [None] * L
    # probe loss: dL/dh_T = h_T; otherwise the given upstream gradient at h_T
    inject = top.copy() if grad_output is None else _np64(grad_output).reshape(top.shape)
    acc = [
        {
            "w_ih": np.zeros_like(p.w_ih),
            "w_hh": np.zeros_like(p.w_hh),
            "b_ih": np.zeros_like(p.b_ih),
            "b_hh": np.zeros_like(p.b_hh),
        }
        for p in P.layers
    ]
    for t in range(T, 0, -1):
        from_above = None
        for l in range(L - 1, -1, -1):
            dh = carry_h[l]
            if l == L - 1 and t == T:
                dh = dh + inject
            if from_above is not None:
                dh = dh + from_above
            dx, dh_prev, dc_prev, dc_total = _np_cell_backward(
                cell, P.layers[l], caches[t][l], dh, carry_c[l], acc[l]
            )
            if l == L - 1:
                log_h[t] = _log10(float(np.linalg.norm(dh))) + scale
                if lstm:
                    log_c[t] = _log10(float(np.linalg.norm(dc_total))) + scale
            carry_h[l], carry_c[l] = dh_prev, dc_prev
            from_above = dx
        # Renormalise every carried gradient by one common factor (the backward pass is
        # linear in them) so that they stay of order one.
        n = math.sqrt(
            sum(float(np.sum(v * v)) for v in carry_h)
            + (sum(float(np.sum(v * v)) for v in carry_c) if lstm else 0.0)
        )
        if n == 0.0:
            break  # everything earlier is exactly zero (-inf)
        scale += math.log10(n)
        carry_h = [v / n for v in carry_h]
        if lstm:
            carry_c = [v / n for v in carry_c]
    else:
        log_h[0] = _log10(float(np.linalg.norm(carry_h[L - 1]))) + scale
        if lstm:
            log_c[0] = _log10(float(np.linalg.norm(carry_c[L - 1]))) + scale
    return log_h, log_c


def renormalised_rnn_log10_state_norms(cell, state_dict, x, *, h0=None, c0=None, grad_output=None):
    """log10 ||dL/dh_t|| of the top layer, t = 0..T, for the probe loss 0.5 ||h_T||^2
    (or, with ``grad_output`` (B, H), for that upstream gradient at h_T: the "grad" loss
    with a last-step target).

    The forward pass is plain float64 (it must stay finite); the backward pass divides the
    carried gradients by their common norm after every step and keeps the log10 of the
    divisor, so the result is exact far outside float64's range (T in the thousands).
    Exact zeros give -inf.
    """
    return _renormalised_rnn(cell, state_dict, x, h0, c0, grad_output)[0]


def renormalised_rnn_log10_cell_norms(cell, state_dict, x, *, h0=None, c0=None, grad_output=None):
    """As :func:`renormalised_rnn_log10_state_norms`, for ||dL/dc_t|| of an LSTM's top
    layer."""
    if cell != "lstm":
        raise ValueError("cell gradients exist for 'lstm' only")
    return _renormalised_rnn(cell, state_dict, x, h0, c0, grad_output)[1]


def random_rnn_state_dict(
    cell,
    input_size,
    hidden_size,
    num_layers=1,
    *,
    output_size=None,
    bias=True,
    gain=1.0,
    bias_std=0.3,
    seed=0,
):
    """A random float64 state dict in torch's layout (weights N(0, gain^2 / fan_in),
    biases N(0, bias_std^2)), with a readout when ``output_size`` is given."""
    rng = np.random.default_rng(seed)
    G = RNN_GATES[cell]
    sd = {}
    for l in range(num_layers):
        fan_in = input_size if l == 0 else hidden_size
        sd[f"weight_ih_l{l}"] = (
            rng.normal(size=(G * hidden_size, fan_in)) * gain / math.sqrt(fan_in)
        )
        sd[f"weight_hh_l{l}"] = (
            rng.normal(size=(G * hidden_size, hidden_size)) * gain / math.sqrt(hidden_size)
        )
        if bias:
            sd[f"bias_ih_l{l}"] = rng.normal(size=G * hidden_size) * bias_std
            sd[f"bias_hh_l{l}"] = rng.normal(size=G * hidden_size) * bias_std
    if output_size is not None:
        sd["readout.weight"] = rng.normal(size=(output_size, hidden_size)) / math.sqrt(hidden_size)
        sd["readout.bias"] = rng.normal(size=output_size) * bias_std
    return sd


def numpy_rnn_intermediates(cell, state_dict, x, *, h0=None, c0=None):
    """Every intermediate value of the recurrent chain's plain float64 forward pass: the
    input and recurrent projections, the gates, states, cell states and their tanh, and the
    read-out's outputs, as a list of arrays (NaN or inf where float64 overflows)."""
    P = _rnn_params(cell, state_dict)
    xn = _np64(x)
    h, c = _initial_states(P, xn, h0, c0)
    out = []
    with np.errstate(all="ignore"):
        hs, cs, caches = _np_rnn_forward(P, xn, h, c)
        for t in range(1, xn.shape[0] + 1):
            for l, p in enumerate(P.layers):
                xin, hp = caches[t][l][0], caches[t][l][1]
                out += [xin @ p.w_ih.T + p.b_ih, hp @ p.w_hh.T + p.b_hh]
                out += [np.asarray(v) for v in caches[t][l][2:]]
        for l in range(P.num_layers):
            out += hs[l] + (cs[l] if cs is not None else [])
        if P.readout is not None:
            out += [hv @ P.readout.w.T + P.readout.b for hv in hs[-1]]
    return out


def numpy_rnn_squashed(cell, state_dict, x, *, h0=None, c0=None):
    """The arguments of every tanh and every sigmoid of the float64 forward pass, as two
    lists of arrays (for telling where a derivative taken from a rounded output, such as
    1 - tanh(z)^2 near |tanh(z)| = 1, is ill-conditioned)."""
    P = _rnn_params(cell, state_dict)
    xn = _np64(x)
    h, c = _initial_states(P, xn, h0, c0)
    tanh_args, sigmoid_args = [], []
    with np.errstate(all="ignore"):
        _, cs, caches = _np_rnn_forward(P, xn, h, c)
        for t in range(1, xn.shape[0] + 1):
            for l, p in enumerate(P.layers):
                xin, hp = caches[t][l][0], caches[t][l][1]
                gi, gh = xin @ p.w_ih.T + p.b_ih, hp @ p.w_hh.T + p.b_hh
                if cell == "tanh":
                    tanh_args.append(gi + gh)
                elif cell == "lstm":
                    ai, af, ag, ao = np.split(gi + gh, 4, axis=1)
                    sigmoid_args += [ai, af, ao]
                    tanh_args += [ag, cs[l][t]]
                elif cell == "gru":
                    gi_r, gi_z, gi_n = np.split(gi, 3, axis=1)
                    gh_r, gh_z, gh_n = np.split(gh, 3, axis=1)
                    sigmoid_args += [gi_r + gh_r, gi_z + gh_z]
                    tanh_args.append(gi_n + _sigmoid(gi_r + gh_r) * gh_n)
    return tanh_args, sigmoid_args


def magnitude_range(arrays):
    """(smallest nonzero |value|, largest |value|, all finite) over the arrays."""
    lo, hi, finite = math.inf, 0.0, True
    for a in arrays:
        a = np.abs(_np64(a)).ravel()
        if a.size == 0:
            continue
        finite = finite and bool(np.all(np.isfinite(a)))
        nz = a[a > 0]
        if nz.size:
            lo, hi = min(lo, float(nz.min())), max(hi, float(nz.max()))
    return lo, hi, finite


def log10_norm(a, axis=None):
    """log10 of the 2-norm of `a` (over `axis`), computed at a scale that cannot overflow or
    underflow for finite entries; -inf for a zero norm."""
    a = np.abs(_np64(a))
    m = np.max(a, axis=axis, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(m > 0, a / np.where(m > 0, m, 1.0), 0.0)
        out = np.log10(m) + 0.5 * np.log10(np.sum(r * r, axis=axis, keepdims=True))
    out = np.where(m > 0, out, -np.inf)
    return out.squeeze(axis=axis) if axis is not None else float(out.squeeze())


# --------------------------------------------------------------------------------------
# Recurrent state Jacobians J_t = ds_t / ds_{t-1}, s_t = [h^0_t, (c^0_t,) h^1_t, ...]
# --------------------------------------------------------------------------------------
def _cplx_sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def _cplx_step(P, x_t, s):
    """One time step of the stacked state in complex arithmetic (for the complex step)."""
    H, lstm = P.hidden, P.cell == "lstm"
    S = 2 * H if lstm else H
    out, inp = [], x_t
    for l, p in enumerate(P.layers):
        h = s[l * S : l * S + H]
        gi = p.w_ih @ inp + p.b_ih
        gh = p.w_hh @ h + p.b_hh
        if P.cell in ("tanh", "relu"):
            z = gi + gh
            hn = np.tanh(z) if P.cell == "tanh" else np.where(z.real > 0, z, 0.0)
            out.append(hn)
        elif lstm:
            a = gi + gh
            i, f = _cplx_sigmoid(a[:H]), _cplx_sigmoid(a[H : 2 * H])
            g, o = np.tanh(a[2 * H : 3 * H]), _cplx_sigmoid(a[3 * H :])
            c = f * s[l * S + H : l * S + 2 * H] + i * g
            hn = o * np.tanh(c)
            out += [hn, c]
        else:
            r = _cplx_sigmoid(gi[:H] + gh[:H])
            z = _cplx_sigmoid(gi[H : 2 * H] + gh[H : 2 * H])
            n = np.tanh(gi[2 * H :] + r * gh[2 * H :])
            hn = (1.0 - z) * n + z * h
            out.append(hn)
        inp = hn
    return np.concatenate(out)


def initial_stacked_state(P, h0, c0, batch):
    """s_0 per sequence, (batch, n), from (num_layers, batch, hidden) h0 / c0 or zeros."""
    H, L = P.hidden, P.num_layers
    h = np.zeros((L, batch, H)) if h0 is None else _np64(h0)
    parts = [h]
    if P.cell == "lstm":
        parts.append(np.zeros((L, batch, H)) if c0 is None else _np64(c0))
    # (L, parts, batch, H) -> (batch, L, parts, H)
    return np.stack(parts, axis=1).transpose(2, 0, 1, 3).reshape(batch, -1)


def numpy_rnn_state_jacobians(cell, state_dict, x, *, h0=None, c0=None, step=1e-30):
    """J_t for every sequence and step, (batch, steps, n, n), by complex-step
    differentiation of a NumPy cell (Squire & Trapp 1998): exact to rounding, with no
    derivative formula in common with the core's."""
    P = _rnn_params(cell, state_dict)
    x = _np64(x)
    T, B = x.shape[:2]
    s0 = initial_stacked_state(P, h0, c0, B)
    n = s0.shape[1]
    out = np.empty((B, T, n, n))
    for b in range(B):
        s = s0[b]
        for t in range(T):
            for j in range(n):
                sc = s.astype(complex)
                sc[j] += 1j * step
                out[b, t, :, j] = _cplx_step(P, x[t, b], sc).imag / step
            s = _cplx_step(P, x[t, b], s.astype(complex)).real
    return out


@_torch_one_thread
def torch_rnn_state_jacobians(cell, state_dict, x, *, h0=None, c0=None):
    """J_t for every sequence and step, (batch, steps, n, n), by
    torch.autograd.functional.jacobian of one step through torch's cells."""
    import torch

    P = _rnn_params(cell, state_dict)
    cells = _torch_cells(P)
    x = _np64(x)
    T, B = x.shape[:2]
    H, lstm = P.hidden, P.cell == "lstm"
    S = 2 * H if lstm else H
    s0 = initial_stacked_state(P, h0, c0, B)

    def step(s, xt):
        h = [s[l * S : l * S + H][None] for l in range(P.num_layers)]
        c = [s[l * S + H : l * S + 2 * H][None] for l in range(P.num_layers)] if lstm else None
        hn, cn = _torch_step(cells, lstm, xt[None], h, c)
        parts = [torch.cat([hn[l][0], cn[l][0]]) if lstm else hn[l][0] for l in range(P.num_layers)]
        return torch.cat(parts)

    out = np.empty((B, T, s0.shape[1], s0.shape[1]))
    for b in range(B):
        s = torch.from_numpy(s0[b])
        for t in range(T):
            xt = torch.from_numpy(x[t, b])
            out[b, t] = torch.autograd.functional.jacobian(
                lambda s_, xt=xt: step(s_, xt), s
            ).numpy()
            with torch.no_grad():
                s = step(s, xt)
    return out


# ======================================================================================
# Chains of blocks, given as the spec dicts of gradchain._core.Chain64 / Chain32
# ======================================================================================
#
# Parameters travel as a dict {torch name: array} ("0.weight", "3.block.1.bias",
# "2.running_mean", ...). The NumPy reference below works in float64 or, for inputs whose
# statistics leave the float64 range, in long double; its normalisation backward passes
# are the step-by-step chain rule through mean, variance and rstd.


def np_layer_norm(x, eps, weight=None, bias=None, axis=1):
    """LayerNorm over `axis` (BatchNorm with batch statistics: axis 0). Returns y and a
    backward function dy -> (dx, dweight, dbias)."""
    n = x.shape[axis]
    mu = x.mean(axis=axis, keepdims=True)
    d = x - mu
    var = (d * d).sum(axis=axis, keepdims=True) / n
    rstd = 1 / np.sqrt(var + eps)
    xhat = d * rstd
    y = xhat * weight if weight is not None else xhat.copy()
    if bias is not None:
        y = y + bias

    def backward(dy):
        dxhat = dy * weight if weight is not None else dy
        drstd = (dxhat * d).sum(axis=axis, keepdims=True)
        dvar = drstd * (-0.5) * rstd**3
        dd = dxhat * rstd + dvar * 2 * d / n
        dx = dd - dd.sum(axis=axis, keepdims=True) / n
        # weight and bias are per feature (the last axis) in both layouts
        dw = (dy * xhat).sum(axis=0) if weight is not None else None
        db = dy.sum(axis=0) if bias is not None else None
        return dx, dw, db

    return y, backward


def np_rms_norm(x, eps, weight=None):
    """torch.nn.RMSNorm over the rows: y = x / sqrt(mean(x^2) + eps) * weight."""
    n = x.shape[1]
    ms = (x * x).sum(axis=1, keepdims=True) / n
    rstd = 1 / np.sqrt(ms + eps)
    y = x * rstd
    if weight is not None:
        y = y * weight

    def backward(dy):
        dxn = dy * weight if weight is not None else dy
        drstd = (dxn * x).sum(axis=1, keepdims=True)
        dms = drstd * (-0.5) * rstd**3
        dx = dxn * rstd + dms * 2 * x / n
        dw = (dy * x * rstd).sum(axis=0) if weight is not None else None
        return dx, dw

    return y, backward


def np_batch_norm_eval(x, running_mean, running_var, eps, weight=None, bias=None):
    """BatchNorm with running statistics: a per-feature affine map."""
    invstd = 1 / np.sqrt(running_var + eps)
    xhat = (x - running_mean) * invstd
    y = xhat * weight if weight is not None else xhat
    if bias is not None:
        y = y + bias

    def backward(dy):
        dx = dy * invstd * (weight if weight is not None else 1)
        dw = (dy * xhat).sum(axis=0) if weight is not None else None
        db = dy.sum(axis=0) if bias is not None else None
        return dx, dw, db

    return y, backward


def np_running_stats(x, running_mean, running_var, num_batches, momentum):
    """torch's update after a train-mode pass: the batch mean and unbiased variance mixed in
    with factor momentum (None: 1 / num_batches_tracked, counted after this pass)."""
    B = x.shape[0]
    num_batches = num_batches + 1
    f = 1.0 / num_batches if momentum is None else momentum
    mean = x.mean(axis=0)
    var = ((x - mean) ** 2).sum(axis=0) / (B - 1)
    return (
        f * mean + (1 - f) * running_mean,
        f * var + (1 - f) * running_var,
        num_batches,
    )


def _chain_act(name, z, negative_slope, alpha, derivative):
    if z.dtype == LD:
        return _ld_act(name, z, negative_slope, alpha, derivative)
    if derivative:
        return act_derivative(name, z, negative_slope, alpha)
    return act_forward(name, z, negative_slope, alpha)


def _np_block(spec, prefix, P, x, train, grads, buffers):
    """Forward of one block; returns y and dy -> dx (which adds parameter gradients to
    `grads`). Running statistics go to `buffers`."""
    kind = spec["kind"]
    dt = x.dtype

    def p(name):
        key = f"{prefix}.{name}"
        return np.asarray(P[key]).astype(dt) if key in P else None

    def add(name, g):
        if g is not None:
            key = f"{prefix}.{name}"
            grads[key] = grads.get(key, 0) + g

    if kind == "linear":
        W, b = p("weight"), p("bias")
        y = x @ W.T + (b if b is not None else 0)

        def back(dy):
            add("weight", dy.T @ x)
            if b is not None:
                add("bias", dy.sum(axis=0))
            return dy @ W

        return y, back
    if kind == "activation":
        a = (spec["activation"], x, spec["negative_slope"], spec["alpha"])
        return _chain_act(*a, False), lambda dy: dy * _chain_act(*a, True)
    if kind == "scale":
        c = dt.type(spec["value"])
        return c * x, lambda dy: c * dy
    if kind in ("layer_norm", "rms_norm", "batch_norm"):
        if kind == "rms_norm":
            eps = spec["eps"] if spec["eps"] is not None else np.finfo(np.float64).eps
            y, bw = np_rms_norm(x, dt.type(eps), p("weight"))
            back2 = bw
        else:
            eps = dt.type(spec["eps"])
            batch = kind == "batch_norm" and (train or not spec["track_running_stats"])
            if kind == "layer_norm":
                y, back2 = np_layer_norm(x, eps, p("weight"), p("bias"), axis=1)
            elif batch:
                y, back2 = np_layer_norm(x, eps, p("weight"), p("bias"), axis=0)
                if train and spec["track_running_stats"]:
                    rm, rv, nb = np_running_stats(
                        x,
                        p("running_mean"),
                        p("running_var"),
                        float(P[f"{prefix}.num_batches_tracked"]),
                        spec["momentum"],
                    )
                    buffers[f"{prefix}.running_mean"] = rm
                    buffers[f"{prefix}.running_var"] = rv
                    buffers[f"{prefix}.num_batches_tracked"] = nb
            else:
                y, back2 = np_batch_norm_eval(
                    x, p("running_mean"), p("running_var"), eps, p("weight"), p("bias")
                )

        def back(dy):
            dx, *pg = back2(dy)
            for name, g in zip(("weight", "bias"), pg):
                add(name, g)
            return dx

        return y, back
    if kind == "residual":
        s = dt.type(spec["scale"])
        f, fb = _np_blocks(spec["body"], f"{prefix}.block", P, x, train, grads, buffers)
        if spec["shortcut"] is not None:
            skip, sb = _np_block(
                spec["shortcut"], f"{prefix}.shortcut", P, x, train, grads, buffers
            )
        else:
            skip, sb = x, lambda dy: dy
        return skip + s * f, lambda dy: sb(dy) + fb(s * dy)
    raise ValueError(f"unknown block kind {kind!r}")


def _np_blocks(specs, prefix, P, x, train, grads, buffers, outputs=None):
    backs = []
    for j, spec in enumerate(specs):
        x, b = _np_block(spec, f"{prefix}.{j}" if prefix else str(j), P, x, train, grads, buffers)
        backs.append(b)
        if outputs is not None:
            outputs.append(x)

    def back(dy, boundary=None):
        for j in range(len(backs) - 1, -1, -1):
            if boundary is not None:
                boundary[j + 1] = dy
            dy = backs[j](dy)
        if boundary is not None:
            boundary[0] = dy
        return dy

    return x, back


def spec_numpy_chain_backward(
    specs, params, x, loss="probe", target=None, grad_output=None, train=True, dtype=np.float64
):
    """The chain in NumPy (float64, or long double with dtype=np.longdouble for the probe
    and grad_output losses). Returns output, loss, param_grads {name: array},
    boundary_grads (the input's, then each top-level block's output's) and buffers (the
    running statistics after this pass, where a train-mode BatchNorm updated them)."""
    dt = np.dtype(dtype)
    x = np.asarray(x).astype(dt)
    grads, buffers, outs = {}, {}, []
    h, back = _np_blocks(specs, "", params, x, train, grads, buffers, outs)
    if dt == LD:
        if loss == "probe":
            lv, g = h * h / 2, h.copy()
            lv = float(np.log10(lv.sum())) if np.any(h) else -math.inf
        else:
            lv, g = math.nan, np.asarray(grad_output, dtype=np.float64).astype(LD)
    else:
        lv, g = _loss_and_grad(h, loss, target, grad_output)
    boundary = [None] * (len(specs) + 1)
    back(g, boundary)
    return SimpleNamespace(
        output=h,
        loss=lv,
        param_grads=grads,
        boundary_grads=boundary,
        buffers=buffers,
    )


def _torch_modules():
    import torch

    class Residual(torch.nn.Module):
        def __init__(self, body, scale, shortcut):
            super().__init__()
            self.block = torch.nn.Sequential(*body)
            self.scale = scale
            self.shortcut = shortcut

        def forward(self, x):
            s = x if self.shortcut is None else self.shortcut(x)
            return s + self.scale * self.block(x)

    class Act(torch.nn.Module):
        def __init__(self, name, negative_slope, alpha):
            super().__init__()
            self.phi = _torch_act(name, negative_slope, alpha)

        def forward(self, x):
            return self.phi(x)

    class Scale(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c = c

        def forward(self, x):
            return self.c * x

    return Residual, Act, Scale


def torch_block(spec, dtype="float64"):
    """The torch module of one block spec."""
    import torch

    Residual, Act, Scale = _torch_modules()
    tdt = {"float64": torch.float64, "float32": torch.float32}[str(np.dtype(dtype))]
    kind = spec["kind"]
    if kind == "linear":
        return torch.nn.Linear(spec["in_features"], spec["out_features"], spec["bias"], dtype=tdt)
    if kind == "activation":
        return Act(spec["activation"], spec["negative_slope"], spec["alpha"])
    if kind == "scale":
        return Scale(spec["value"])
    if kind == "layer_norm":
        return torch.nn.LayerNorm(
            spec["width"],
            eps=spec["eps"],
            elementwise_affine=spec["elementwise_affine"],
            bias=spec["bias"],
            dtype=tdt,
        )
    if kind == "rms_norm":
        return torch.nn.RMSNorm(
            spec["width"], eps=spec["eps"], elementwise_affine=spec["elementwise_affine"], dtype=tdt
        )
    if kind == "batch_norm":
        return torch.nn.BatchNorm1d(
            spec["width"],
            eps=spec["eps"],
            momentum=spec["momentum"],
            affine=spec["affine"],
            track_running_stats=spec["track_running_stats"],
            dtype=tdt,
        )
    if kind == "residual":
        body = [torch_block(s, dtype) for s in spec["body"]]
        sc = torch_block(spec["shortcut"], dtype) if spec["shortcut"] is not None else None
        return Residual(body, spec["scale"], sc)
    raise ValueError(f"unknown block kind {kind!r}")


def spec_torch_chain(specs, params=None, dtype="float64"):
    """nn.Sequential of the specs' modules, with `params` ({torch name: array}) loaded
    strictly (every name must match torch's state_dict)."""
    import torch

    model = torch.nn.Sequential(*[torch_block(s, dtype) for s in specs])
    if params is not None:
        sd = model.state_dict()
        model.load_state_dict(
            {
                k: torch.as_tensor(np.asarray(v)).to(sd[k].dtype).reshape(sd[k].shape)
                for k, v in params.items()
            }
        )
    return model


def spec_torch_chain_backward(model, x, loss="probe", target=None, grad_output=None, train=True):
    """One forward and backward pass of a torch_chain model in train or eval mode, with
    retain_grad on every top-level block output."""
    import torch
    import torch.nn.functional as F

    tdt = next(iter(model.state_dict().values())).dtype if model.state_dict() else torch.float64
    model.train(train)
    model.zero_grad(set_to_none=True)
    h0 = torch.tensor(np.asarray(x), dtype=tdt, requires_grad=True)
    hs, h = [h0], h0
    for m in model:
        h = m(h)
        h.retain_grad()
        hs.append(h)
    if loss == "probe":
        lv = 0.5 * h.pow(2).sum()
    elif loss == "mse":
        lv = F.mse_loss(h, torch.as_tensor(np.asarray(target)).to(tdt))
    elif loss == "cross_entropy":
        lv = F.cross_entropy(h, torch.as_tensor(np.asarray(target), dtype=torch.int64))
    elif loss == "grad_output":
        lv = None
        h.backward(torch.as_tensor(np.asarray(grad_output)).to(tdt))
    else:
        raise ValueError(f"unknown loss {loss!r}")
    if lv is not None:
        lv.backward()
    return SimpleNamespace(
        output=h.detach().numpy().copy(),
        loss=float(lv.detach()) if lv is not None else math.nan,
        param_grads={n: _grad_or_zero(p) for n, p in model.named_parameters()},
        boundary_grads=[t.grad.detach().numpy().copy() for t in hs],
        buffers={n: b.detach().numpy().copy() for n, b in model.named_buffers()},
    )


def renormalised_linear_batch_norm(weights, x, eps=1e-5, anchors=None):
    """log10 gradient norms of the chain [Linear(n, n, bias=False), BatchNorm(n) in train
    mode with weight 1 and bias 0] * L under the probe loss, at any depth: the backward
    pass divides the gradient by its norm before every block and accumulates the log10 of
    the divisors (both blocks' backward passes are linear in the gradient, so this is
    exact). BatchNorm keeps the forward pass at unit scale.

    A float64 forward pass this deep is chaotic (rounding differences between two
    implementations grow until the trajectories part), so ``anchors`` {l: h} may give the
    BatchNorm output of pair l to continue from. Returns log10_params (W, weight, bias per
    pair), log10_boundaries (the input, then every block output) and the largest relative
    difference between this forward pass and the anchors where it met them."""
    anchors = anchors or {}
    h = np.asarray(x, dtype=np.float64)
    hs, caches, drift = [h], [], 0.0
    for l, W in enumerate(weights):
        z = h @ np.asarray(W, dtype=np.float64).T
        mu = z.mean(axis=0)
        d = z - mu
        rstd = 1 / np.sqrt((d * d).mean(axis=0) + eps)
        h = d * rstd
        if l in anchors:
            a = np.asarray(anchors[l], dtype=np.float64)
            drift = max(drift, float(np.abs(h - a).max() / np.abs(a).max()))
            h = a
        caches.append((z, h, rstd))
        hs.append(h)
    L = len(weights)
    lp = np.empty(3 * L)
    lb = np.empty(2 * L + 1)
    g, acc = hs[-1].copy(), 0.0  # probe: dL/dh = h
    lb[2 * L] = _log10(float(np.linalg.norm(g)))
    for l in range(L - 1, -1, -1):
        z, xhat, rstd = caches[l]
        n = float(np.linalg.norm(g))
        acc += math.log10(n)
        g = g / n
        lp[3 * l + 1] = _log10(float(np.linalg.norm((g * xhat).sum(axis=0)))) + acc
        lp[3 * l + 2] = _log10(float(np.linalg.norm(g.sum(axis=0)))) + acc
        g = rstd * (g - g.mean(axis=0) - xhat * (g * xhat).mean(axis=0))
        lb[2 * l + 1] = _log10(float(np.linalg.norm(g))) + acc
        n = float(np.linalg.norm(g))
        acc += math.log10(n)
        g = g / n
        lp[3 * l] = _log10(float(np.linalg.norm(g.T @ hs[l]))) + acc
        g = g @ np.asarray(weights[l], dtype=np.float64)
        lb[2 * l] = _log10(float(np.linalg.norm(g))) + acc
    return SimpleNamespace(log10_params=lp, log10_boundaries=lb, drift=drift)


# --------------------------------------------------------------------------------------
# Chains of blocks.  A chain is described by plain dicts (nothing from gradchain):
#   {"kind": "linear", "in": n, "out": m, "bias": bool}
#   {"kind": "activation", "name": str, "negative_slope": s, "alpha": a}
#   {"kind": "scale", "value": c}
#   {"kind": "layer_norm", "n": n, "eps": e, "affine": bool, "bias": bool}
#   {"kind": "rms_norm", "n": n, "eps": e or None, "affine": bool}
#   {"kind": "batch_norm", "n": n, "eps": e, "momentum": m or None, "affine": bool,
#    "track": bool}
#   {"kind": "residual", "body": [...], "scale": s, "shortcut": None or a linear dict}
# Parameters are named as torch.nn.Sequential names them: "i.weight", "i.block.j.weight",
# "i.shortcut.weight"; the oracles take them from a state_dict of NumPy arrays.
# --------------------------------------------------------------------------------------
def _torch_activation_module(d):
    from torch import nn

    return {
        "linear": nn.Identity,
        "sigmoid": nn.Sigmoid,
        "tanh": nn.Tanh,
        "relu": nn.ReLU,
        "leaky_relu": lambda: nn.LeakyReLU(d.get("negative_slope", 0.01)),
        "elu": lambda: nn.ELU(d.get("alpha", 1.0)),
        "gelu": nn.GELU,
        "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
        "silu": nn.SiLU,
        "softplus": nn.Softplus,
    }[d["name"]]()


def torch_module(desc, dtype="float64"):
    """The torch module of one block description (see above)."""
    import torch
    from torch import nn

    tdt = {"float64": torch.float64, "float32": torch.float32}[str(np.dtype(dtype))]
    k = desc["kind"]
    if k == "linear":
        return nn.Linear(desc["in"], desc["out"], bias=desc["bias"], dtype=tdt)
    if k == "activation":
        return _torch_activation_module(desc)
    if k == "scale":
        return TorchScale(desc["value"])
    if k == "layer_norm":
        return nn.LayerNorm(
            desc["n"],
            eps=desc["eps"],
            elementwise_affine=desc["affine"],
            bias=desc["bias"],
            dtype=tdt,
        )
    if k == "rms_norm":
        return nn.RMSNorm(desc["n"], eps=desc["eps"], elementwise_affine=desc["affine"], dtype=tdt)
    if k == "batch_norm":
        return nn.BatchNorm1d(
            desc["n"], eps=desc["eps"], momentum=desc["momentum"], affine=desc["affine"],
            track_running_stats=desc["track"], dtype=tdt,
        )  # fmt: skip
    if k == "residual":
        sc = None if desc["shortcut"] is None else torch_module(desc["shortcut"], dtype)
        return TorchResidual([torch_module(b, dtype) for b in desc["body"]], desc["scale"], sc)
    raise ValueError(f"unknown block kind {k!r}")


@functools.cache
def _torch_classes():
    from torch import nn

    class Scale(nn.Module):
        def __init__(self, value):
            super().__init__()
            self.value = value

        def forward(self, x):
            return x * self.value

    class Residual(nn.Module):
        """x + scale * block(x), or shortcut(x) + scale * block(x)."""

        def __init__(self, body, scale, shortcut=None):
            super().__init__()
            self.block = nn.Sequential(*body)
            self.scale = scale
            if shortcut is not None:
                self.shortcut = shortcut
            else:
                self.shortcut = None

        def forward(self, x):
            s = x if self.shortcut is None else self.shortcut(x)
            return s + self.scale * self.block(x)

    return Scale, Residual


def TorchScale(value):
    return _torch_classes()[0](value)


def TorchResidual(body, scale, shortcut=None):
    return _torch_classes()[1](body, scale, shortcut)


def torch_chain(descs, state_dict=None, dtype="float64", train=True):
    """An ``nn.Sequential`` of the descriptions, with `state_dict` loaded (strictly)."""
    import torch

    model = torch.nn.Sequential(*[torch_module(d, dtype) for d in descs])
    if state_dict is not None:
        model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state_dict.items()})
    model.train(train)
    return model


def torch_chain_backward(
    model, x, loss="probe", target=None, grad_output=None, max_norm=None, norm_type=2.0
):
    """Autograd through a torch ``nn.Sequential`` (any torch model whose top-level children
    run in order), keeping the gradient at every top-level boundary.

    Returns loss, output, ``grads`` (by ``named_parameters()`` name, clipped when
    ``max_norm`` is given; ``grads_unclipped`` before), ``dh`` (input, then each top-level
    child's output), ``total_norm`` (clip_grad_norm_'s return) and ``state`` (the model's
    state_dict after the pass, running statistics included).
    """
    import torch
    import torch.nn.functional as F

    p0 = next(model.parameters(), None)
    tdt = p0.dtype if p0 is not None else torch.float64
    for p in model.parameters():
        p.grad = None
    h = torch.tensor(np.asarray(x), dtype=tdt, requires_grad=True)
    hs = [h]
    for child in model.children():
        h = child(h)
        h.retain_grad()
        hs.append(h)
    if loss == "probe":
        lv = 0.5 * h.pow(2).sum()
    elif loss == "mse":
        lv = F.mse_loss(h, torch.tensor(np.asarray(target), dtype=tdt))
    elif loss == "cross_entropy":
        lv = F.cross_entropy(h, torch.tensor(np.asarray(target), dtype=torch.int64))
    elif loss == "grad_output":
        lv = None
        h.backward(torch.tensor(np.asarray(grad_output), dtype=tdt))
    else:
        raise ValueError(f"unknown loss {loss!r}")
    if lv is not None:
        lv.backward()

    def grads():
        return {
            n: (p.grad.detach().numpy().copy() if p.grad is not None else np.zeros(tuple(p.shape)))
            for n, p in model.named_parameters()
        }

    res = SimpleNamespace(
        loss=float("nan") if lv is None else float(lv.detach()),
        output=h.detach().numpy().copy(),
        dh=[
            t.grad.detach().numpy().copy() if t.grad is not None else np.zeros(tuple(t.shape))
            for t in hs
        ],
        total_norm=None,
    )
    res.grads = res.grads_unclipped = grads()
    if max_norm is not None:
        res.total_norm = float(
            torch.nn.utils.clip_grad_norm_(list(model.parameters()), max_norm, norm_type=norm_type)
        )
        res.grads = grads()
    res.state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return res


def _np_forward(d, p, x, train, name, caches, eps_default):
    """One block forward in float64; `p` maps names to arrays (updated in place for the
    running statistics). Returns y and appends what backward needs to `caches`."""
    k = d["kind"]
    if k == "linear":
        w = p[f"{name}.weight"]
        y = x @ w.T
        if d["bias"]:
            y = y + p[f"{name}.bias"]
        caches.append((d, name, x))
        return y
    if k == "activation":
        caches.append((d, name, x))
        return act_forward(d["name"], x, d.get("negative_slope", 0.01), d.get("alpha", 1.0))
    if k == "scale":
        caches.append((d, name, None))
        return d["value"] * x
    if k in ("layer_norm", "rms_norm"):
        eps = d["eps"] if d["eps"] is not None else eps_default
        if k == "layer_norm":
            xc = x - x.mean(axis=1, keepdims=True)
        else:
            xc = x
        r = 1.0 / np.sqrt(np.mean(xc * xc, axis=1, keepdims=True) + eps)
        xh = xc * r
        y = xh * p[f"{name}.weight"] if d["affine"] else xh.copy()
        if k == "layer_norm" and d["affine"] and d["bias"]:
            y = y + p[f"{name}.bias"]
        caches.append((d, name, (xh, r)))
        return y
    if k == "batch_norm":
        batch_stats = train or not d["track"]
        if batch_stats:
            mu = x.mean(axis=0)
            var = np.mean((x - mu) ** 2, axis=0)
            if train and d["track"]:
                n = x.shape[0]
                nbt = int(p[f"{name}.num_batches_tracked"]) + 1
                p[f"{name}.num_batches_tracked"] = np.asarray(nbt, dtype=np.int64)
                m = 1.0 / nbt if d["momentum"] is None else d["momentum"]
                p[f"{name}.running_mean"] = (1 - m) * p[f"{name}.running_mean"] + m * mu
                p[f"{name}.running_var"] = (1 - m) * p[f"{name}.running_var"] + m * var * n / (
                    n - 1
                )
        else:
            mu, var = p[f"{name}.running_mean"], p[f"{name}.running_var"]
        r = 1.0 / np.sqrt(var + d["eps"])
        xh = (x - mu) * r
        y = xh * p[f"{name}.weight"] + p[f"{name}.bias"] if d["affine"] else xh.copy()
        caches.append((d, name, (xh, r, batch_stats)))
        return y
    if k == "residual":
        sub = []
        h = x
        for j, b in enumerate(d["body"]):
            h = _np_forward(b, p, h, train, f"{name}.block.{j}", sub, eps_default)
        sc = []
        s = (
            x
            if d["shortcut"] is None
            else _np_forward(d["shortcut"], p, x, train, f"{name}.shortcut", sc, eps_default)
        )
        caches.append((d, name, (sub, sc)))
        return s + d["scale"] * h
    raise ValueError(f"unknown block kind {k!r}")


def _np_backward(cache, p, dy, grads):
    d, name, saved = cache
    k = d["kind"]
    if k == "linear":
        x = saved
        grads[f"{name}.weight"] = dy.T @ x
        if d["bias"]:
            grads[f"{name}.bias"] = dy.sum(axis=0)
        return dy @ p[f"{name}.weight"]
    if k == "activation":
        return dy * act_derivative(
            d["name"], saved, d.get("negative_slope", 0.01), d.get("alpha", 1.0)
        )
    if k == "scale":
        return d["value"] * dy
    if k in ("layer_norm", "rms_norm"):
        xh, r = saved
        if d["affine"]:
            grads[f"{name}.weight"] = np.sum(dy * xh, axis=0)
            if k == "layer_norm" and d["bias"]:
                grads[f"{name}.bias"] = dy.sum(axis=0)
            g = dy * p[f"{name}.weight"]
        else:
            g = dy
        if k == "layer_norm":
            return r * (
                g - g.mean(axis=1, keepdims=True) - xh * np.mean(g * xh, axis=1, keepdims=True)
            )
        return r * (g - xh * np.mean(g * xh, axis=1, keepdims=True))
    if k == "batch_norm":
        xh, r, batch_stats = saved
        if d["affine"]:
            grads[f"{name}.weight"] = np.sum(dy * xh, axis=0)
            grads[f"{name}.bias"] = dy.sum(axis=0)
            g = dy * p[f"{name}.weight"]
        else:
            g = dy
        if not batch_stats:
            return g * r
        return r * (g - g.mean(axis=0) - xh * np.mean(g * xh, axis=0))
    if k == "residual":
        sub, sc = saved
        df = d["scale"] * dy
        for c in reversed(sub):
            df = _np_backward(c, p, df, grads)
        ds = dy
        for c in reversed(sc):
            ds = _np_backward(c, p, ds, grads)
        return df + ds
    raise ValueError(f"unknown block kind {k!r}")


def numpy_chain_backward(
    descs, state_dict, x, loss="probe", target=None, grad_output=None, train=True, eps_default=None
):
    """Forward and backward through a chain of block descriptions in float64 NumPy, with
    hand-written derivatives for every block kind.

    Returns loss, output, ``grads`` by name, ``dh`` (input, then each top-level block's
    output) and ``state`` (the state_dict after the pass: running statistics updated in
    train mode). ``eps_default`` is RMSNorm's eps when its description says None (torch:
    the machine epsilon of the dtype).
    """
    p = {
        k: np.array(v, dtype=np.int64 if k.endswith("num_batches_tracked") else np.float64)
        for k, v in state_dict.items()
    }
    eps_default = np.finfo(np.float64).eps if eps_default is None else eps_default
    h = np.asarray(x, dtype=np.float64)
    tops = []
    hs = [h]
    for i, d in enumerate(descs):
        c = []
        h = _np_forward(d, p, h, train, str(i), c, eps_default)
        tops.append(c)
        hs.append(h)
    loss_val, g = _loss_and_grad(h, loss, target, grad_output)
    grads = {}
    dh = [None] * (len(descs) + 1)
    dh[-1] = g
    for i in range(len(descs) - 1, -1, -1):
        for c in reversed(tops[i]):
            g = _np_backward(c, p, g, grads)
        dh[i] = g
    return SimpleNamespace(loss=loss_val, output=h, grads=grads, dh=dh, state=p)


# --------------------------------------------------------------------------------------
# Chains of blocks: a NumPy forward and backward for the theory's simulations
# --------------------------------------------------------------------------------------
@functools.cache
def _numpy_blas_threads():
    """(get, set) of the thread count of the OpenBLAS NumPy's products call (Linux), or None."""
    np.dot(np.ones((2, 2)), np.ones((2, 2)))  # loaded by now
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({ln.split()[-1] for ln in f if "openblas" in ln and "numpy" in ln})
    except OSError:
        return None
    for path in paths:
        lib = ctypes.CDLL(path)
        for prefix, suffix in itertools.product(("scipy_openblas", "openblas"), ("64_", "")):
            get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            if get is not None and put is not None:
                put.argtypes = [ctypes.c_int]
                return get, put
    return None


def _numpy_one_blas_thread(fn):
    """Run `fn` with NumPy's BLAS on one thread: the simulations' products are small, and on
    a busy machine a threaded BLAS spends more time waiting for its threads (tenfold) than
    computing."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        threads = _numpy_blas_threads()
        if threads is None:
            return fn(*args, **kwargs)
        n = threads[0]()
        threads[1](1)
        try:
            return fn(*args, **kwargs)
        finally:
            threads[1](n)

    return wrapper


def _normalize(u, axis, eps):
    """(u - mean) / sqrt(biased var + eps) along `axis` and the divisor."""
    c = u - u.mean(axis=axis, keepdims=True)
    s = np.sqrt((c * c).mean(axis=axis, keepdims=True) + eps)
    return c / s, s


def _normalize_backward(g, y, s, axis):
    """dL/du of y = (u - mean) / s along `axis`, given g = dL/dy."""
    return (g - g.mean(axis=axis, keepdims=True) - y * (g * y).mean(axis=axis, keepdims=True)) / s


@_numpy_one_blas_thread
def block_chain_backward(blocks, x, grad_output, *, eps=0.0, negative_slope=0.01, alpha=1.0):
    """Forward and backward through a chain of blocks in float64, x of shape (batch, width).

    Blocks are tuples: ``("linear", W, b)`` (W of shape (out, in) as torch.nn.Linear, b None
    or (out,)), ``("act", name)``, ``("batch_norm",)`` (train mode: the batch's mean and
    biased variance, no affine), ``("layer_norm",)`` (no affine), ``("scale", a)`` and
    ``("residual", [blocks], a)`` (``h + a f(h)``). ``eps`` is both norms' epsilon.

    Returns a namespace with ``output``; ``h`` and ``grads``, the values and dL/d of every
    top-level block boundary (index 0 = x); and ``linears``, one ``(input, grad_of_output)``
    pair per Linear in the order the forward pass meets them (dL/dW = grad.T @ input).
    """
    linears = []

    def fwd(spec, h):
        kind = spec[0]
        if kind == "linear":
            _, W, b = spec
            rec = [h, None]
            linears.append(rec)
            return h @ W.T + (0.0 if b is None else b), rec
        if kind == "act":
            return act_forward(spec[1], h, negative_slope, alpha), h
        if kind in ("batch_norm", "layer_norm"):
            y, s = _normalize(h, 0 if kind == "batch_norm" else 1, eps)
            return y, (y, s)
        if kind == "scale":
            return spec[1] * h, None
        if kind == "residual":
            out, caches = h, []
            for sub in spec[1]:
                out, c = fwd(sub, out)
                caches.append(c)
            return h + spec[2] * out, caches
        raise ValueError(f"unknown block {kind!r}")

    def bwd(spec, cache, g):
        kind = spec[0]
        if kind == "linear":
            cache[1] = g
            return g @ spec[1]
        if kind == "act":
            return g * act_derivative(spec[1], cache, negative_slope, alpha)
        if kind in ("batch_norm", "layer_norm"):
            y, s = cache
            return _normalize_backward(g, y, s, 0 if kind == "batch_norm" else 1)
        if kind == "scale":
            return spec[1] * g
        gb = spec[2] * g
        for sub, c in zip(reversed(spec[1]), reversed(cache)):
            gb = bwd(sub, c, gb)
        return g + gb

    h = [np.asarray(x, dtype=np.float64)]
    caches = []
    for spec in blocks:
        out, c = fwd(spec, h[-1])
        h.append(out)
        caches.append(c)
    grads = [np.asarray(grad_output, dtype=np.float64)]
    for spec, c in zip(reversed(blocks), reversed(caches)):
        grads.append(bwd(spec, c, grads[-1]))
    return SimpleNamespace(
        output=h[-1], h=h, grads=grads[::-1], linears=[tuple(r) for r in linears]
    )


# --------------------------------------------------------------------------------------
# Optimizers and learning-rate schedules: torch.optim itself, single-tensor (foreach=False)

TORCH_OPTIMIZERS = {
    "sgd": "SGD",
    "adam": "Adam",
    "adamw": "AdamW",
    "rmsprop": "RMSprop",
    "adagrad": "Adagrad",
}


def torch_optimizer(kind, params, **hyper):
    """``torch.optim.<kind>(params, foreach=False, **hyper)`` (kind as gradchain names it)."""
    import torch

    return getattr(torch.optim, TORCH_OPTIMIZERS[kind])(params, foreach=False, **hyper)


@_torch_one_thread
def torch_optimizer_run(kind, hyper, params, grads, *, lrs=None, state_dict=None):
    """Copies of the NumPy arrays `params` after ``len(grads)`` steps of torch.optim.<kind>
    (``grads[t][i]`` the gradient of parameter i at step t, ``lrs[t]`` the step's rate if
    given), starting from `state_dict` if given (NumPy arrays become tensors). Returns
    ``(params, optimizer)``."""
    import torch

    tp = [torch.nn.Parameter(torch.tensor(np.array(p))) for p in params]
    opt = torch_optimizer(kind, tp, **hyper)
    if state_dict is not None:
        opt.load_state_dict(numpy_to_torch(state_dict))
    for t, gs in enumerate(grads):
        for p, g in zip(tp, gs):
            p.grad = torch.tensor(np.array(g))
        if lrs is not None:
            opt.param_groups[0]["lr"] = float(lrs[t])
        opt.step()
    return [p.detach().numpy().copy() for p in tp], opt


def numpy_to_torch(obj):
    """NumPy arrays (and NumPy scalars) inside nested dicts and lists as tensors; a
    "step" given as a number as a 0-d float32 tensor, as torch keeps it."""
    import torch

    if isinstance(obj, np.ndarray):
        return torch.tensor(obj)
    if isinstance(obj, dict):
        return {
            k: torch.tensor(float(v), dtype=torch.float32)
            if k == "step" and not isinstance(v, (np.ndarray, torch.Tensor))
            else numpy_to_torch(v)
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [numpy_to_torch(v) for v in obj]
    return obj


@_torch_one_thread
def torch_schedule_lrs(name, args, base_lr, steps, losses=None, state_dict=None):
    """The rate of each of `steps` optimizer steps under ``torch.optim.lr_scheduler.<name>
    (optimizer, **args)``, stepped once after each optimizer step (ReduceLROnPlateau with
    ``losses[t]``); `state_dict`, if given, is loaded first (the optimizer's lr set to its
    ``_last_lr``). Returns ``(lrs, scheduler)``."""
    import torch

    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=base_lr)
    sched = getattr(torch.optim.lr_scheduler, name)(opt, **args)
    if state_dict is not None:
        sched.load_state_dict(dict(state_dict))
        opt.param_groups[0]["lr"] = state_dict["_last_lr"][0]
    out = np.empty(steps)
    for t in range(steps):
        out[t] = opt.param_groups[0]["lr"]
        opt.step()  # no gradient: nothing moves, but torch sees the order it expects
        if name == "ReduceLROnPlateau":
            sched.step(float(losses[t]))
        else:
            sched.step()
    return out, sched


# ---------------------------------------------------------------------------------------
# Training loops: what gradchain.train computes, by torch autograd and torch.optim.


def torch_renorm_(params, max_norm):
    """``w.copy_(torch.renorm(w, 2, 0, max_norm))`` for every 2-d parameter."""
    import torch

    with torch.no_grad():
        for p in params:
            if p.dim() == 2:
                p.copy_(torch.renorm(p, 2, 0, max_norm))


@_torch_one_thread
def torch_train_loop(
    step_loss,
    params,
    order,
    optimizer,
    *,
    max_norm=None,
    norm_type=2.0,
    clip_value=None,
    max_weight_norm=None,
    scheduler=None,
):
    """A plain torch training loop over the batches `order` (steps x batch indices):
    ``loss = step_loss(indices)``, ``backward``, the recorded norms, ``clip_grad_norm_`` or
    ``clip_grad_value_``, ``optimizer.step()``, ``torch.renorm`` on every 2-d parameter,
    ``scheduler.step()`` (with the loss for ReduceLROnPlateau). Returns per-step arrays:
    loss, lr, total_norm, clipped_total_norm, param_grad_norms, param_norms, update_ratios."""
    import torch

    rec = {k: [] for k in ("loss", "lr", "total_norm", "clipped_total_norm", "param_grad_norms",
                           "param_norms", "update_ratios")}  # fmt: skip

    def total(grads):
        norms = torch.stack([torch.linalg.vector_norm(g, norm_type) for g in grads])
        return float(torch.linalg.vector_norm(norms, norm_type))

    for idx in order:
        optimizer.zero_grad(set_to_none=False)
        loss = step_loss(torch.as_tensor(np.asarray(idx)))
        loss.backward()
        grads = [p.grad for p in params]
        rec["loss"].append(float(loss.detach()))
        rec["lr"].append(optimizer.param_groups[0]["lr"])
        rec["param_grad_norms"].append([float(torch.linalg.vector_norm(g)) for g in grads])
        rec["total_norm"].append(total(grads))
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, foreach=False)
        elif clip_value is not None:
            torch.nn.utils.clip_grad_value_(params, clip_value, foreach=False)
        rec["clipped_total_norm"].append(total(grads))
        before = [p.detach().clone() for p in params]
        optimizer.step()
        if max_weight_norm is not None:
            torch_renorm_(params, max_weight_norm)
        if scheduler is not None:
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(rec["loss"][-1])
            else:
                scheduler.step()
        with torch.no_grad():
            rec["param_norms"].append([float(torch.linalg.vector_norm(p)) for p in params])
            ratios = [torch.linalg.vector_norm(p - b) / torch.linalg.vector_norm(b)
                      for p, b in zip(params, before)]  # fmt: skip
            rec["update_ratios"].append([float(r) for r in ratios])
    return {k: np.asarray(a, dtype=np.float64) for k, a in rec.items()}


def torch_sequence_loss(model, readout, x, y, loss, truncate=None, truncate_mode="detach"):
    """The loss of a batch of sequences ``x`` (T, B, in) through a torch ``nn.RNN``/
    ``LSTM``/``GRU`` `model` and a ``nn.Linear`` `readout`, with gradchain's truncation:
    ``detach`` carries the states detached after every `truncate` steps; ``window``
    (a loss at the last step only) runs the first ``T - truncate`` steps without a graph.
    `y`: the last step's targets (B, ...) or every step's (T, B, ...)."""
    import torch
    import torch.nn.functional as F

    T = x.shape[0]
    every = y.dim() == (2 if loss == "cross_entropy" else 3)
    if truncate is None:
        out, _ = model(x)
    elif truncate_mode == "detach":
        outs, state = [], None
        for t0 in range(0, T, truncate):
            o, state = model(x[t0 : t0 + truncate], state)
            outs.append(o)
            state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
        out = torch.cat(outs)
    else:
        if every:
            raise ValueError("the window oracle takes a loss at the last step only")
        s0 = max(0, T - truncate)
        state = None
        if s0 > 0:
            with torch.no_grad():
                _, state = model(x[:s0])
        out, _ = model(x[s0:], state)
    z = readout(out)
    if every:
        if loss == "cross_entropy":
            return F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1))
        return F.mse_loss(z, y)
    return F.cross_entropy(z[-1], y) if loss == "cross_entropy" else F.mse_loss(z[-1], y)


# ---- counter-based random numbers ----------------------------------------------------------


def philox4x32(seed, stream, index):
    """Philox4x32-10 blocks (Salmon et al. 2011) of the uint64 counters `index` of one
    stream, as an (n, 4) uint32 array: counter words (index low, index high, stream low,
    stream high), key (seed low, seed high)."""
    m32, s32, s = np.uint64(0xFFFFFFFF), np.uint64(32), np.uint64(stream)
    index = np.asarray(index, dtype=np.uint64)
    c = [index & m32, index >> s32, np.full_like(index, s & m32), np.full_like(index, s >> s32)]
    k0, k1 = seed & 0xFFFFFFFF, seed >> 32
    for _ in range(10):
        p0 = c[0] * np.uint64(0xD2511F53)  # < 2^64: no wrap-around
        p1 = c[2] * np.uint64(0xCD9E8D57)
        c = [
            (p1 >> s32) ^ c[1] ^ np.uint64(k0),
            p1 & m32,
            (p0 >> s32) ^ c[3] ^ np.uint64(k1),
            p0 & m32,
        ]
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return np.stack(c, axis=1).astype(np.uint32)


def philox_normals(seed, stream, n):
    """The first n normals of a stream as gradchain defines them, in NumPy's libm: number i
    is Box-Muller on block i // 2's two 53-bit uniforms (1 - u0 into the log)."""
    b = philox4x32(seed, stream, np.arange((n + 1) // 2, dtype=np.uint64)).astype(np.uint64)
    u0 = ((b[:, 1] << np.uint64(32) | b[:, 0]) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    u1 = ((b[:, 3] << np.uint64(32) | b[:, 2]) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    rad, t = np.sqrt(-2.0 * np.log(1.0 - u0)), 2.0 * np.pi * u1
    return np.stack([rad * np.cos(t), rad * np.sin(t)], axis=1).ravel()[:n]


def philox_uniform_pm1(seed, stream, n):
    """The first n uniforms on [-1, 1) of a stream: 2 u - 1 for the 53-bit uniforms of
    blocks 0, 1, ... (two per block)."""
    b = philox4x32(seed, stream, np.arange((n + 1) // 2, dtype=np.uint64)).astype(np.uint64)
    u = np.stack([b[:, 1] << np.uint64(32) | b[:, 0], b[:, 3] << np.uint64(32) | b[:, 2]], axis=1)
    return ((u >> np.uint64(11)).astype(np.float64) * 2.0**-53 * 2.0 - 1.0).ravel()[:n]
