"""Jacobian norms and QR spectra of chains of blocks against PyTorch's Jacobians of the
same modules: per top-level block and per example, or of the whole batch where a
train-mode BatchNorm couples it."""

from __future__ import annotations

import math

import numpy as np
import oracles as O
import pytest
from conftest import HAS_NORMS, ChainCase, needs_norms, needs_torch

CASES = [ChainCase(31_000 + i, norms=HAS_NORMS and i % 4 != 0) for i in range(24)]


def _torch_point(model, x, coupled):
    """Per top-level module: its input (the batch, or one example per row) and a function
    of a flat state, so that torch's Jacobian is the block's."""
    import torch

    h = torch.tensor(x)
    out = []
    with torch.no_grad():
        for m in model:
            out.append((m, h.clone()))
            h = m(h)
    return out


def _torch_jacobians(model, x, coupled):
    """Dense Jacobians J[e][l] (example e, block l) of every top-level module."""
    import torch

    points = _torch_point(model, x, coupled)
    examples = [None] if coupled else list(range(x.shape[0]))
    J = []
    for e in examples:
        row = []
        for m, h in points:
            if coupled:
                shape = h.shape

                def f(v, m=m, shape=shape):
                    return m(v.reshape(shape)).reshape(-1)

                row.append(torch.autograd.functional.jacobian(f, h.reshape(-1)).numpy())
            else:

                def f(v, m=m):
                    return m(v[None, :])[0]

                row.append(torch.autograd.functional.jacobian(f, h[e]).numpy())
        J.append(row)
    return J


def _log10(v):
    return math.log10(v) if v > 0 else -math.inf


@needs_torch
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_block_jacobian_norms_match_torch(gc, case):
    net = case.chain()
    model = O.torch_chain(case.descs, net.state_dict(), train=case.train)
    x, _ = case.data(net.out_features)
    coupled = net._core.couples_batch(case.train)
    r = gc.jacobian_norms(net, x, tol=1e-13, max_iter=5000)
    J = _torch_jacobians(model, x, coupled)
    assert r.log10_frobenius.shape == (len(J), len(net.blocks))
    for e, row in enumerate(J):
        for l, Jl in enumerate(row):
            fro, spec = np.linalg.norm(Jl), np.linalg.norm(Jl, 2) if Jl.size else 0.0
            assert r.log10_frobenius[e, l] == pytest.approx(_log10(fro), abs=1e-10), (e, l)
            if spec > 1e-12 * fro:
                assert r.log10_spectral[e, l] == pytest.approx(_log10(spec), abs=1e-8), (e, l)


@needs_torch
@pytest.mark.parametrize("case", CASES[:12], ids=[c.id for c in CASES[:12]])
def test_block_qr_spectrum_matches_the_explicit_product(gc, case):
    net = case.chain()
    model = O.torch_chain(case.descs, net.state_dict(), train=case.train)
    x, _ = case.data(net.out_features)
    coupled = net._core.couples_batch(case.train)
    J = _torch_jacobians(model, x, coupled)
    k = min(min(j.shape) for j in J[0]) if J[0] else 1
    s = gc.jacobian_spectrum(net, x, k=k)
    assert s.depths.tolist() == list(range(1, len(net.blocks) + 1))
    for e, row in enumerate(J):
        M = np.eye(row[0].shape[1])[:, :k]
        for i, Jl in enumerate(row):
            M = Jl @ M
            d = np.abs(np.diag(np.linalg.qr(M, mode="r")))
            # After a direction the product has lost (a norm's radial direction, a
            # BatchNorm's mean), the later ones depend on how that rounding noise is
            # oriented: compare the directions before the first such loss.
            lost = np.flatnonzero(d <= 1e-9 * d.max(initial=0.0))
            r = lost[0] if lost.size else k
            np.testing.assert_allclose(
                s.log_singular_values[e, i][:r], np.log(d[:r]), atol=1e-8, err_msg=f"{e} {i}"
            )


@needs_norms
def test_train_mode_batch_norm_jacobian_is_the_whole_batch(gc):
    net = gc.Chain([gc.Linear(3, 4), gc.BatchNorm(4), gc.Activation("tanh")], seed=1)
    x = np.random.default_rng(0).normal(size=(5, 3))
    r = gc.jacobian_norms(net, x)
    assert r.log10_frobenius.shape == (1, 3)  # one point: the batch (state 5 x width)
    s = gc.jacobian_spectrum(net, x, k=12)
    assert s.log_singular_values.shape == (1, 3, 12)
    with pytest.raises(ValueError, match="smallest state size, 15"):
        gc.jacobian_spectrum(net, x, k=16)
    ev = gc.jacobian_norms(net.eval(), x)
    assert ev.log10_frobenius.shape == (5, 3)  # running statistics: per example


def test_plain_mlp_keeps_its_per_layer_jacobians(gc):
    """An MLP without norm or residual layers reports J_l = diag(phi'(z_l)) W_l per layer;
    the same chain written as blocks reports the Linear and the activation apart, and the
    product of the two is the layer's."""
    mlp = gc.MLP(depth=4, width=6, activation="tanh", seed=3)
    x = np.random.default_rng(1).normal(size=(2, 6))
    per_layer = gc.jacobian_spectrum(mlp, x, k=6)
    blocks = gc.jacobian_spectrum(mlp.to_chain(), x, k=6)
    assert per_layer.log_singular_values.shape == (2, 4, 6)
    assert blocks.log_singular_values.shape == (2, 8, 6)
    np.testing.assert_allclose(
        blocks.log_singular_values[:, 1::2], per_layer.log_singular_values, atol=1e-12
    )
