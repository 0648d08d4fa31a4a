"""Jacobians of recurrent steps, J_t = ds_t / ds_{t-1}, and the QR spectrum of ds_t / ds_0
(gradchain.jacobian with a gradchain.RNN) against a complex-step NumPy reference, PyTorch
autograd, exact identities and mean-field theory."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import oracles as O
import pytest
from conftest import needs_torch
from gradchain import NonFiniteError, theory
from gradchain.jacobian import jacobian_norms, jacobian_spectrum

LOG10_TOL = 1e-10 / math.log(10.0)  # relative 1e-10 on a norm, in log10


@dataclass(frozen=True)
class Cfg:
    cell: str
    layers: int
    input_size: int
    hidden: int
    bias: bool
    gain: float
    steps: int
    batch: int
    h0: bool
    seed: int

    @property
    def id(self) -> str:
        return (f"{self.cell}-L{self.layers}-i{self.input_size}-h{self.hidden}"
                f"{'-b' if self.bias else ''}-g{self.gain:.2f}-T{self.steps}x{self.batch}"
                f"{'-h0' if self.h0 else ''}")


def _draw(n: int, seed: int) -> list[Cfg]:
    rng = np.random.default_rng(seed)
    cells = ["tanh", "relu", "lstm", "gru"]
    out = []
    for i in range(n):
        out.append(Cfg(
            cell=cells[i % 4],
            layers=int(rng.integers(1, 4)),
            input_size=int(rng.integers(1, 6)),
            hidden=int(rng.integers(2, 8)),
            bias=bool(rng.integers(0, 2)),
            gain=float(rng.uniform(0.5, 2.5)),
            steps=int(rng.integers(1, 6)),
            batch=int(rng.integers(1, 4)),
            h0=bool(rng.integers(0, 2)),
            seed=int(rng.integers(0, 2**31)),
        ))
    return out


CFGS = _draw(24, 20261123)


def _setup(gc, cfg: Cfg):
    sd = O.random_rnn_state_dict(cfg.cell, cfg.input_size, cfg.hidden, cfg.layers,
                                 bias=cfg.bias, gain=cfg.gain, seed=cfg.seed)
    net = gc.RNN.from_state_dict(sd, cfg.cell)
    rng = np.random.default_rng(cfg.seed + 1)
    x = rng.standard_normal((cfg.steps, cfg.batch, cfg.input_size))
    h0 = c0 = None
    if cfg.h0:
        h0 = rng.standard_normal((cfg.layers, cfg.batch, cfg.hidden))
        if cfg.cell == "lstm":
            c0 = rng.standard_normal((cfg.layers, cfg.batch, cfg.hidden))
    return sd, net, x, h0, c0


def _log10_norms(J):
    with np.errstate(divide="ignore"):
        fro = np.log10(np.linalg.norm(J, axis=(-2, -1)))
        spec = np.log10(np.linalg.norm(J, 2, axis=(-2, -1)))
    return fro, spec


def _assert_log10_close(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert np.array_equal(np.isneginf(a), np.isneginf(b))
    fin = np.isfinite(a)
    assert np.all(np.isfinite(b[fin]))
    np.testing.assert_allclose(a[fin], b[fin], rtol=0, atol=LOG10_TOL)


# --------------------------------------------------------------------------------------
# per-step norms
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", CFGS, ids=[c.id for c in CFGS])
def test_norms_vs_complex_step_numpy(gc, cfg):
    sd, net, x, h0, c0 = _setup(gc, cfg)
    J = O.numpy_rnn_state_jacobians(cfg.cell, sd, x, h0=h0, c0=c0)
    n = cfg.layers * cfg.hidden * (2 if cfg.cell == "lstm" else 1)
    assert J.shape == (cfg.batch, cfg.steps, n, n)
    fro, spec = _log10_norms(J)
    r = jacobian_norms(net, x, h0=h0, c0=c0)
    assert r.log10_frobenius.shape == (cfg.batch, cfg.steps)
    _assert_log10_close(r.log10_frobenius, fro)
    _assert_log10_close(r.log10_spectral, spec)


@needs_torch
@pytest.mark.parametrize("cfg", CFGS[::2], ids=[c.id for c in CFGS[::2]])
def test_norms_vs_torch_autograd(gc, cfg):
    sd, net, x, h0, c0 = _setup(gc, cfg)
    J = O.torch_rnn_state_jacobians(cfg.cell, sd, x, h0=h0, c0=c0)
    # the two references agree entry by entry
    Jn = O.numpy_rnn_state_jacobians(cfg.cell, sd, x, h0=h0, c0=c0)
    np.testing.assert_allclose(Jn, J, rtol=1e-12, atol=1e-13 * max(1.0, np.abs(J).max()))
    fro, spec = _log10_norms(J)
    r = jacobian_norms(net, x, h0=h0, c0=c0)
    _assert_log10_close(r.log10_frobenius, fro)
    _assert_log10_close(r.log10_spectral, spec)


def test_power_iteration_matches_exact(gc):
    cfg = Cfg("lstm", 2, 3, 6, True, 1.4, 4, 2, True, 5)
    _, net, x, h0, c0 = _setup(gc, cfg)
    exact = jacobian_norms(net, x, h0=h0, c0=c0)
    power = jacobian_norms(net, x, h0=h0, c0=c0, exact_max_dim=0, tol=1e-14, max_iter=5000)
    assert (power.spectral_iterations > 0).all()
    np.testing.assert_allclose(power.log10_spectral, exact.log10_spectral, atol=1e-6)
    np.testing.assert_array_equal(power.log10_frobenius, exact.log10_frobenius)


# --------------------------------------------------------------------------------------
# QR spectrum of ds_t / ds_0
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", CFGS[:12], ids=[c.id for c in CFGS[:12]])
def test_spectrum_is_qr_of_formed_product(gc, cfg):
    sd, net, x, h0, c0 = _setup(gc, cfg)
    J = O.numpy_rnn_state_jacobians(cfg.cell, sd, x, h0=h0, c0=c0)
    n = J.shape[-1]
    for k in sorted({1, max(1, n // 2), n}):
        s = jacobian_spectrum(net, x, h0=h0, c0=c0, k=k)
        np.testing.assert_array_equal(s.depths, np.arange(1, cfg.steps + 1))
        for b in range(cfg.batch):
            M, scale = np.eye(n), 1.0
            for t in range(cfg.steps):
                M = J[b, t] @ M
                scale *= np.linalg.norm(J[b, t], 2)
                ref = qr_log_diag(M, k)
                got = s.log_singular_values[b, t]
                # The formed product carries rounding errors of about eps * prod ||J_t||:
                # compare where that is small against R_ii, up to the first direction where
                # it is not (later ones are then undetermined).
                with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
                    accurate = np.logical_and.accumulate(scale * np.exp(-ref) < 1e4)
                assert accurate[0] or scale == 0.0
                err = np.abs(got[accurate] - ref[accurate]) / (1 + np.abs(ref[accurate]))
                assert err.max(initial=0.0) < 1e-10, (k, b, t, err)


def qr_log_diag(M, k):
    """log|R_ii| of the thin QR of the first k columns of M."""
    with np.errstate(divide="ignore"):
        return np.log(np.abs(np.diag(np.linalg.qr(M[:, :k])[1])))


@pytest.mark.parametrize("gain", [0.7, 1.0, 1.3])
@pytest.mark.parametrize("k,interval", [(24, 1), (5, 1), (24, 9)])
def test_orthogonal_autonomous_rnn_is_scaled_isometry(gc, gain, k, interval):
    """A bias-free tanh RNN at rest (x = 0, h0 = 0) stays at 0, so J_t = recurrent_gain * Q
    for a Haar orthogonal Q: every exponent is ln(gain), to rounding, after 300 steps."""
    net = gc.RNN("tanh", input_size=3, hidden_size=24, init="orthogonal", bias=False,
                 recurrent_gain=gain, seed=3)
    s = jacobian_spectrum(net, np.zeros((300, 2, 3)), k=k, interval=interval)
    np.testing.assert_allclose(s.lyapunov_exponents, math.log(gain), rtol=0, atol=1e-12)
    np.testing.assert_allclose(s.log_singular_values[:, -1, :], 300 * math.log(gain), rtol=0, atol=1e-10)


def test_stacked_orthogonal_lstm_state_layout(gc):
    """The stacked state has num_layers * 2 * hidden entries; k may be all of them."""
    net = gc.RNN("lstm", input_size=2, hidden_size=4, num_layers=2, seed=0)
    x = np.random.default_rng(0).standard_normal((6, 1, 2))
    s = jacobian_spectrum(net, x)
    assert s.k == 16
    assert s.log_singular_values.shape == (1, 6, 16)
    with pytest.raises(ValueError, match=r"k must be None or an integer between 1 and the state size, 16"):
        jacobian_spectrum(net, x, k=17)


@pytest.mark.parametrize("sigma_w", [1.5, 2.0, 3.0])
def test_top_exponent_matches_mean_field(gc, sigma_w):
    """Autonomous tanh RNN h_t = tanh(W h_{t-1}), W_ij ~ N(0, sigma_w^2 / N), N = 400, in
    the chaotic phase: the measured top Lyapunov exponent against 0.5 ln chi_1 at the
    mean-field fixed point. (In the ordered phase the state settles at 0 and a fixed W's
    exponent is ln of its spectral radius, which exceeds sigma_w by O(N^-1/2).)
    The mean-field value is the exponent of the mean squared growth; the QR one is the mean
    log growth, lower by O(1/N) (~0.003 here), and a 600-step estimate fluctuates by a
    few 0.001. A 10% error in chi_1 would move the prediction by 0.05."""
    N, T = 400, 600
    net = gc.RNN("tanh", input_size=1, hidden_size=N, init="normal", bias=False,
                 recurrent_gain=sigma_w, seed=7)
    h0 = np.random.default_rng(1).standard_normal((1, 2, N))
    s = jacobian_spectrum(net, np.zeros((T, 2, 1)), h0=h0, k=1)
    measured = float(s.lyapunov_exponents.mean())
    predicted = theory.rnn_max_lyapunov_meanfield(sigma_w, 0.0, q0=1.0)
    assert abs(measured - predicted) < 0.02, (measured, predicted)
    assert abs(measured - 0.5 * math.log(1.1) - predicted) > 0.025


# --------------------------------------------------------------------------------------
# consistency, dtype, errors
# --------------------------------------------------------------------------------------
def test_batch_rows_equal_single_sequences(gc):
    cfg = Cfg("gru", 2, 3, 5, True, 1.2, 7, 3, True, 9)
    _, net, x, h0, _ = _setup(gc, cfg)
    s = jacobian_spectrum(net, x, h0=h0)
    r = jacobian_norms(net, x, h0=h0)
    for b in range(3):
        sb = jacobian_spectrum(net, x[:, b : b + 1], h0=h0[:, b : b + 1])
        rb = jacobian_norms(net, x[:, b : b + 1], h0=h0[:, b : b + 1])
        np.testing.assert_array_equal(sb.log_singular_values[0], s.log_singular_values[b])
        np.testing.assert_array_equal(rb.log10_frobenius[0], r.log10_frobenius[b])


def test_float32_chain_uses_its_float32_weights(gc):
    cfg = Cfg("lstm", 1, 3, 5, True, 1.1, 5, 2, False, 2)
    sd, _, x, _, _ = _setup(gc, cfg)
    sd32 = {k: v.astype(np.float32) for k, v in sd.items()}
    net32 = gc.RNN.from_state_dict(sd32, "lstm")
    net64 = gc.RNN.from_state_dict({k: v.astype(np.float64) for k, v in sd32.items()}, "lstm")
    x32 = x.astype(np.float32).astype(np.float64)
    a = jacobian_norms(net32, x)
    b = jacobian_norms(net64, x32)
    np.testing.assert_array_equal(a.log10_frobenius, b.log10_frobenius)
    np.testing.assert_array_equal(
        jacobian_spectrum(net32, x).log_singular_values, jacobian_spectrum(net64, x32).log_singular_values
    )


def test_relu_overflow_names_the_step(gc):
    sd = {"weight_ih_l0": np.zeros((4, 1)), "weight_hh_l0": 50.0 * np.eye(4)}
    net = gc.RNN.from_state_dict(sd, "relu")
    with pytest.raises(NonFiniteError, match=r"non-finite state at step 182, layer 0"):
        jacobian_spectrum(net, np.zeros((400, 1, 1)), h0=np.ones((1, 1, 4)), k=1)
    jacobian_spectrum(net, np.zeros((181, 1, 1)), h0=np.ones((1, 1, 4)), k=1)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"k": 0}, ValueError, r"k must be None or an integer between 1 and the state size, 6"),
        ({"k": 7}, ValueError, r"the state size, 6"),
        ({"interval": 0}, ValueError, r"interval must be a positive integer"),
        ({"c0": np.zeros((1, 2, 6))}, ValueError, r"c0 is the LSTM's initial cell state"),
        ({"h0": np.zeros((2, 2, 6))}, ValueError, r"h0"),
    ],
)
def test_bad_arguments(gc, kwargs, exc, match):
    net = gc.RNN("tanh", input_size=3, hidden_size=6, seed=0)
    with pytest.raises(exc, match=match):
        jacobian_spectrum(net, np.zeros((4, 2, 3)), **kwargs)


def test_bad_x_and_mlp_states(gc):
    net = gc.RNN("gru", input_size=3, hidden_size=6, seed=0)
    with pytest.raises(ValueError, match=r"x must have shape \(steps, batch, 3\)"):
        jacobian_norms(net, np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"x must have shape"):
        jacobian_norms(net, np.zeros((4, 2, 5)))
    with pytest.raises(ValueError, match=r"x"):
        jacobian_norms(net, np.full((4, 2, 3), np.nan))
    mlp = gc.MLP(depth=3, width=4, seed=0)
    with pytest.raises(ValueError, match=r"h0 is the initial state of a gradchain.RNN"):
        jacobian_norms(mlp, np.zeros(4), h0=np.zeros((1, 1, 4)))
