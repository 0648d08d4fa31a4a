"""Per-layer Jacobian norms and the QR spectrum of Jacobian products (gradchain.jacobian)
against NumPy, PyTorch autograd and exact identities."""

from __future__ import annotations

import json
import math

import numpy as np
import oracles as O
import pytest
from conftest import CONFIGS, ChainConfig
from gradchain import NonFiniteError
from gradchain.jacobian import JacobianNorms, JacobianSpectrum, jacobian_norms, jacobian_spectrum

try:
    import torch
except ImportError:  # the NumPy-reference tests still run
    torch = None
needs_torch = pytest.mark.skipif(
    torch is None, reason="PyTorch is the oracle here: pip install torch==2.13.0"
)

RTOL = 1e-10


# --------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------
def numpy_jacobians(net, x, cfg: ChainConfig | None = None, activation=None):
    """J_l = diag(phi'(z_l)) W_l for every example: a list over examples of lists over
    layers, from the NumPy forward pass (float64 weights, x rounded to the net's dtype)."""
    act = activation or cfg.activation
    kw = cfg.act_kwargs() if cfg else {}
    W = [np.asarray(w, np.float64) for w in net.weights]
    b = [np.asarray(bb, np.float64) for bb in net.biases]
    x = np.atleast_2d(np.asarray(x, net.dtype)).astype(np.float64)
    zs, _ = O.numpy_forward(W, b, x, act, **kw)
    return [
        [O.act_derivative(act, z[e], **kw)[:, None] * w for z, w in zip(zs, W)]
        for e in range(x.shape[0])
    ]


def qr_log_diag(M, k, Q0=None):
    """log|R_ii| of the thin QR of M Q0 (Q0 = first k columns of I), and the size of
    ||M Q0|| / |R_ii|, which bounds the reference's own relative error in R_ii."""
    A = M[:, :k] if Q0 is None else M @ Q0
    r = np.abs(np.diag(np.linalg.qr(A)[1]))
    with np.errstate(divide="ignore"):
        return np.log(r), np.linalg.norm(A, 2) / r


def gaussian_lyapunov(n, sigma, depth):
    """Newman's exponents for products of n x n matrices with N(0, sigma^2/n) entries, and
    the standard error of a depth-L QR estimate; from gradchain.theory when it has them."""
    try:
        from gradchain import theory

        return (theory.gaussian_lyapunov_spectrum(n, sigma),
                theory.gaussian_lyapunov_stderr(n, depth))
    except (ImportError, AttributeError):
        pass
    # psi and psi' at (n - i + 1) / 2 from their values at 1/2 and 1 by recurrence.
    g = 0.57721566490153286061
    psi, tri = {0.5: -g - 2 * math.log(2), 1.0: -g}, {0.5: math.pi**2 / 2, 1.0: math.pi**2 / 6}
    for j in range(2, n + 1):
        a = j / 2
        psi[a] = psi[a - 1] + 1 / (a - 1)
        tri[a] = tri[a - 1] - 1 / (a - 1) ** 2
    halves = [(n - i + 1) / 2 for i in range(1, n + 1)]
    lam = np.array([math.log(sigma) + 0.5 * (math.log(2 / n) + psi[a]) for a in halves])
    se = np.sqrt(np.array([tri[a] for a in halves]) / (4 * depth))
    return lam, se


def _x(cfg: ChainConfig):
    return cfg.make_data()[0]


# --------------------------------------------------------------------------------------
# per-layer norms
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.id for c in CONFIGS])
def test_norms_vs_numpy(gc, cfg):
    net, x = cfg.make_net(gc), _x(cfg)
    r = jacobian_norms(net, x)
    assert r.log10_frobenius.shape == r.log10_spectral.shape == (cfg.batch, cfg.depth)
    for e, Js in enumerate(numpy_jacobians(net, x, cfg)):
        fro = np.array([np.linalg.norm(J, "fro") for J in Js])
        two = np.array([np.linalg.norm(J, 2) for J in Js])
        np.testing.assert_allclose(r.frobenius[e], fro, rtol=RTOL, atol=0)
        np.testing.assert_allclose(r.spectral[e], two, rtol=RTOL, atol=0)
    assert (r.spectral_iterations == 0).all() and r.all_converged


@pytest.mark.parametrize("cfg", CONFIGS[:8], ids=[c.id for c in CONFIGS[:8]])
def test_norms_float32_net(gc, cfg):
    """A float32 chain: its float32 weights, x rounded to float32, arithmetic in float64."""
    net, x = cfg.make_net(gc, "float32"), _x(cfg)
    r = jacobian_norms(net, x)
    for e, Js in enumerate(numpy_jacobians(net, x, cfg)):
        np.testing.assert_allclose(r.frobenius[e], [np.linalg.norm(J) for J in Js], rtol=RTOL)
        np.testing.assert_allclose(r.spectral[e], [np.linalg.norm(J, 2) for J in Js], rtol=RTOL)


@needs_torch
@pytest.mark.parametrize("cfg", CONFIGS[::4], ids=[c.id for c in CONFIGS[::4]])
def test_norms_vs_torch_autograd(gc, cfg):
    """Each J_l from torch.autograd.functional.jacobian of the layer map at h_{l-1}."""
    net, x = cfg.make_net(gc), _x(cfg)
    r = jacobian_norms(net, x)
    act = O._torch_act(cfg.activation, cfg.negative_slope, cfg.alpha)
    W = [torch.tensor(np.array(w)) for w in net.weights]
    b = [torch.tensor(np.array(bb)) for bb in net.biases]
    for e in range(cfg.batch):
        h = torch.tensor(x[e])
        for l, (w, bb) in enumerate(zip(W, b)):
            J = torch.autograd.functional.jacobian(lambda v, w=w, bb=bb: act(w @ v + bb), h)
            fro = float(torch.linalg.matrix_norm(J, "fro"))
            two = float(torch.linalg.matrix_norm(J, 2))
            assert r.frobenius[e, l] == pytest.approx(fro, rel=RTOL, abs=0)
            assert r.spectral[e, l] == pytest.approx(two, rel=RTOL, abs=0)
            h = act(w @ h + bb)


def test_power_iteration_vs_exact(gc):
    """exact_max_dim=0 forces power iteration; it agrees with the SVD and reports its
    iterations. A wide layer (> exact_max_dim) uses power iteration by default."""
    for cfg in CONFIGS[:20]:
        net, x = cfg.make_net(gc), _x(cfg)
        exact = jacobian_norms(net, x)
        power = jacobian_norms(net, x, exact_max_dim=0, tol=1e-13, max_iter=20000)
        assert power.all_converged and (power.spectral_iterations >= 1).all()
        np.testing.assert_allclose(power.spectral, exact.spectral, rtol=1e-7, atol=0)
        np.testing.assert_array_equal(power.log10_frobenius, exact.log10_frobenius)
    net = gc.MLP(width=[300, 260, 40], activation="tanh", bias_std=0.1, seed=1)
    x = np.random.default_rng(0).standard_normal((2, 300))
    r = jacobian_norms(net, x)
    assert (r.spectral_iterations[:, 0] > 0).all() and r.all_converged
    for e, Js in enumerate(numpy_jacobians(net, x, activation="tanh")):
        np.testing.assert_allclose(r.spectral[e], [np.linalg.norm(J, 2) for J in Js], rtol=1e-7)
        np.testing.assert_allclose(r.frobenius[e], [np.linalg.norm(J) for J in Js], rtol=RTOL)
    capped = jacobian_norms(net, x, max_iter=1)
    assert not capped.all_converged and (capped.spectral_iterations[:, 0] == 1).all()
    assert (capped.log10_spectral[:, 0] <= r.log10_spectral[:, 0] + 1e-12).all()  # lower bound


def test_norms_without_spectral(gc):
    net = gc.MLP(depth=5, width=6, seed=0)
    r = jacobian_norms(net, np.ones(6), spectral=False)
    assert r.log10_spectral is None and r.spectral is None and r.spectral_iterations is None
    assert r.log10_spectral_mean is None and r.log10_spectral_std is None
    assert r.log10_frobenius.shape == (1, 5)
    json.dumps(r.to_dict())
    assert "log10|J|_2" not in r.table()


def test_norms_batch_statistics_and_zero_jacobian(gc):
    """Mean and spread over the batch; a layer whose units are all off has J = 0: -inf,
    kept through the statistics and written as "-inf" by to_dict."""
    rng = np.random.default_rng(0)
    W = [rng.standard_normal((5, 5)) for _ in range(4)]
    b = [np.zeros(5), np.zeros(5), np.full(5, -1e3), np.zeros(5)]
    net = gc.MLP.from_weights(W, b, activation="relu")
    x = rng.standard_normal((6, 5))
    r = jacobian_norms(net, x)
    assert np.isneginf(r.log10_frobenius[:, 2]).all() and np.isneginf(r.log10_spectral[:, 2]).all()
    assert np.isneginf(r.log10_frobenius_mean[2]) and np.isnan(r.log10_frobenius_std[2])
    np.testing.assert_allclose(r.log10_frobenius_mean[:2], r.log10_frobenius[:, :2].mean(0))
    np.testing.assert_allclose(r.log10_spectral_std[:2], r.log10_spectral[:, :2].std(0))
    d = json.loads(json.dumps(r.to_dict()))
    assert d["log10_frobenius"][0][2] == "-inf" and d["log10_frobenius_std"][2] is None
    assert isinstance(r, JacobianNorms) and "JacobianNorms(batch=6, depth=4)" in str(r)
    with pytest.raises(ValueError):
        r.log10_frobenius[0, 0] = 1.0  # read-only


# --------------------------------------------------------------------------------------
# QR spectrum: exact identities
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.id for c in CONFIGS])
def test_spectrum_is_qr_of_formed_product(gc, cfg):
    """log|R_ii| of the QR of M_l [I_k; 0], M_l = J_l ... J_1 formed explicitly (short
    chains), at every depth, for k = all and k = 1. The reference's own error in R_ii is
    about eps ||M|| / |R_ii|; entries it cannot resolve are skipped."""
    net, x = cfg.make_net(gc), _x(cfg)
    kmax = min(cfg.widths)
    for k in sorted({1, kmax}):
        s = jacobian_spectrum(net, x, k=k)
        assert s.log_singular_values.shape == (cfg.batch, cfg.depth, k)
        np.testing.assert_array_equal(s.depths, np.arange(1, cfg.depth + 1))
        for e, Js in enumerate(numpy_jacobians(net, x, cfg)):
            M = np.eye(cfg.widths[0])
            for l, J in enumerate(Js):
                M = J @ M
                ref, cond = qr_log_diag(M, k)
                ok = cond < 1e8
                got = s.log_singular_values[e, l]
                err = np.abs(got[ok] - ref[ok])
                assert (err <= 1e-12 * (1 + cond[ok])).all(), (l, got, ref, cond)
                # exactly rank-deficient (dead relu units): -inf here, rounding noise there
                assert (cond[np.isneginf(got)] > 1e12).all()


def test_spectrum_random_start_is_qr_of_product_times_frame(gc):
    """With start='random', k < n: reproduce the frame from k = n results. The volume
    spanned (sum of log|R_ii|) is the log of prod sigma_i(M Q0), whatever Q0 is; and the
    frame is the same for every example and seed-determined."""
    net = gc.MLP(width=[7, 9, 7, 8, 7], activation="tanh", bias_std=0.3, seed=4)
    x = np.random.default_rng(1).standard_normal((3, 7))
    a = jacobian_spectrum(net, x, k=4, start="random", seed=11)
    b = jacobian_spectrum(net, x, k=4, start="random", seed=11)
    c = jacobian_spectrum(net, x, k=4, start="random", seed=12)
    np.testing.assert_array_equal(a.log_singular_values, b.log_singular_values)
    assert not np.array_equal(a.log_singular_values, c.log_singular_values)
    single = jacobian_spectrum(net, x[1], k=4, start="random", seed=11)
    np.testing.assert_array_equal(single.log_singular_values[0], a.log_singular_values[1])
    # k = n: the volume is |det M| for any orthonormal start
    full_r = jacobian_spectrum(net, x, k=7, start="random", seed=3)
    full_i = jacobian_spectrum(net, x, k=7)
    np.testing.assert_allclose(full_r.log_volume, full_i.log_volume, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act,bias", [("tanh", 0.2), ("relu", 0.1), ("gelu", 0.0)])
@pytest.mark.parametrize("start", ["identity", "random"])
def test_sum_is_log_abs_det(gc, act, bias, start):
    """k = n, square layers: sum_i log|R_ii| = log|det M_l| = sum over layers of
    (sum log|phi'| + log|det W|), at every depth of a deep chain (no product formed)."""
    n, L = 12, 300
    net = gc.MLP(depth=L, width=n, activation=act, bias_std=bias, init="orthogonal", gain=1.3,
                 seed=2)
    x = np.random.default_rng(3).standard_normal((2, n))
    s = jacobian_spectrum(net, x, start=start, seed=5)
    W = [np.asarray(w) for w in net.weights]
    logdetW = np.array([np.linalg.slogdet(w)[1] for w in W])
    zs, _ = O.numpy_forward(W, net.biases, x, act)
    for e in range(2):
        with np.errstate(divide="ignore"):
            per = np.array([np.log(np.abs(O.act_derivative(act, z[e]))).sum() for z in zs])
        ref = np.cumsum(per + logdetW)
        fin = np.isfinite(ref)
        np.testing.assert_allclose(s.log_volume[e][fin], ref[fin], rtol=1e-10, atol=1e-9)
        assert (np.isneginf(s.log_volume[e][~fin])).all()


@pytest.mark.parametrize("start", ["identity", "random"])
@pytest.mark.parametrize("k,interval", [(32, 1), (5, 1), (32, 7), (1, 3)])
def test_orthogonal_chain_is_isometric(gc, k, interval, start):
    """Orthogonal linear layers: every singular value of every product is 1."""
    net = gc.MLP(depth=200, width=32, activation="linear", init="orthogonal", seed=7)
    s = jacobian_spectrum(net, np.random.default_rng(0).standard_normal((2, 32)), k=k,
                          interval=interval, start=start)
    assert np.abs(s.log_singular_values).max() < 1e-12
    assert np.abs(s.lyapunov_exponents).max() < 1e-14


def test_top_direction_is_growth_of_a_vector(gc):
    """k = 1: log|R_11| at depth l is log ||M_l q|| for the start vector q = e_1: the
    growth of one vector, computed here with renormalisation at every layer."""
    for act, bias in [("tanh", 0.1), ("relu", 0.2), ("silu", 0.0)]:
        net = gc.MLP(depth=300, width=16, activation=act, bias_std=bias, gain=1.5, seed=3)
        x = np.random.default_rng(4).standard_normal((2, 16))
        s = jacobian_spectrum(net, x, k=1)
        for e, Js in enumerate(numpy_jacobians(net, x, activation=act)):
            q, acc, ref = np.eye(16)[:, 0], 0.0, []
            for J in Js:
                q = J @ q
                nq = np.linalg.norm(q)
                acc += math.log(nq)
                q /= nq
                ref.append(acc)
            np.testing.assert_allclose(s.log_singular_values[e, :, 0], ref, rtol=1e-10, atol=1e-10)


def test_triangular_chain_gives_log_diagonal(gc):
    """A constant upper-triangular J = U with the identity start: M_l = U^l is its own R,
    so log|R_ii| = l log|U_ii| exactly (and these are the Lyapunov exponents)."""
    rng = np.random.default_rng(0)
    diag = np.array([2.5, -1.7, 1.2, 0.9, -0.5, 0.3])
    U = np.triu(rng.standard_normal((6, 6)))
    U[np.diag_indices(6)] = diag
    L = 400
    net = gc.MLP.from_weights([U] * L, activation="linear")
    s = jacobian_spectrum(net, np.ones(6))
    ref = np.arange(1, L + 1)[:, None] * np.log(np.abs(diag))[None, :]
    np.testing.assert_allclose(s.log_singular_values[0], ref, rtol=1e-13, atol=1e-12)
    np.testing.assert_allclose(s.lyapunov_exponents[0], np.log(np.abs(diag)), rtol=1e-13)


def test_exactly_singular_layer_gives_minus_inf(gc):
    rng = np.random.default_rng(1)
    W = [np.abs(rng.standard_normal((4, 4))) for _ in range(5)]  # layer 1: all units on
    b = [np.zeros(4), np.full(4, -1e3), np.zeros(4), np.zeros(4), np.zeros(4)]
    net = gc.MLP.from_weights(W, b, activation="relu")
    s = jacobian_spectrum(net, np.abs(rng.standard_normal((2, 4))))
    assert np.isfinite(s.log_singular_values[:, 0]).all()
    assert np.isneginf(s.log_singular_values[:, 1:]).all()
    json.dumps(s.to_dict())


def _dead_unit_chain(gc, depth, dead_at):
    """A relu chain of width 5 whose unit 2 is off (z < 0) at layer `dead_at` only (its
    weight row is minus the positive input's direction) and on everywhere else."""
    rng = np.random.default_rng(2)
    W = [np.abs(rng.standard_normal((5, 5))) + 0.1 for _ in range(depth)]
    W[dead_at - 1][2] = -1.0
    return gc.MLP.from_weights(W, activation="relu"), np.abs(rng.standard_normal((1, 5))) + 0.1


@pytest.mark.parametrize("start", ["identity", "random"])
@pytest.mark.parametrize("dead_at,depth", [(1, 1), (1, 2), (2, 2), (2, 3)])
def test_dead_unit_gives_minus_inf_at_every_depth(gc, dead_at, depth, start):
    """A layer with a unit off has a zero row: from that layer on the product has rank 4,
    and the fifth direction is -inf, at depth 1 as at depth 2 and after (rounding alone
    would leave about log(eps) there). The other four are the QR of the formed product."""
    net, x = _dead_unit_chain(gc, depth, dead_at)
    for interval in (1, 2):
        s = jacobian_spectrum(net, x, start=start, seed=3, interval=interval)
        got = s.log_singular_values[0]
        depths = np.asarray(s.depths)
        assert np.isneginf(got[depths >= dead_at, 4]).all(), (interval, got)
        assert np.isfinite(got[:, :4]).all() and np.isfinite(got[depths < dead_at]).all()
    if start == "identity":
        s = jacobian_spectrum(net, x)
        M = np.eye(5)
        for l, J in enumerate(numpy_jacobians(net, x, activation="relu")[0]):
            M = J @ M
            ref, _ = qr_log_diag(M, 5)
            np.testing.assert_allclose(s.log_singular_values[0, l, :4], ref[:4], rtol=1e-12)


@pytest.mark.parametrize("start", ["identity", "random"])
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("k", [2, 3, 4, 6])
def test_zero_weight_rows_bound_the_finite_directions(gc, k, depth, start):
    """Linear layers with 3 of 6 weight rows zero (rank 3): directions 4.. are -inf for
    every k, start and depth, and the first ones are finite."""
    rng = np.random.default_rng(1)
    W = rng.standard_normal((6, 6))
    W[[1, 3, 5]] = 0.0
    s = jacobian_spectrum(gc.MLP.from_weights([W] * depth, activation="linear"), np.ones(6),
                          k=k, start=start, seed=2)
    got = s.log_singular_values[0]
    assert np.isfinite(got[:, : min(k, 3)]).all()
    assert np.isneginf(got[:, 3:]).all()


def test_rank_loss_without_zero_rows_is_rounding_level(gc):
    """A weight of rank 2 with no zero row or column: exact arithmetic would give R_33 = 0,
    floating point leaves about eps |W|, as the README says: finite, some 30 below."""
    rng = np.random.default_rng(5)
    W = rng.standard_normal((5, 2)) @ rng.standard_normal((2, 5))
    s = jacobian_spectrum(gc.MLP.from_weights([W], activation="linear"), np.ones(5))
    got = s.log_singular_values[0, 0]
    assert np.isfinite(got).all()
    assert (got[2:] < got[:2].min() - 30).all()


def test_zero_column_gives_minus_inf_in_its_direction(gc):
    """An input the layer ignores (zero weight column): with the identity start that
    direction's vector is exactly zero, so its R_ii is -inf and the others are finite."""
    rng = np.random.default_rng(6)
    W = rng.standard_normal((5, 5))
    W[:, 2] = 0.0
    got = jacobian_spectrum(gc.MLP.from_weights([W], activation="linear"), np.ones(5))
    got = got.log_singular_values[0, 0]
    assert np.isneginf(got[2]) and np.isfinite(np.delete(got, 2)).all()


def numpy_qr_loop(Js, k, interval):
    """The textbook loop Q, R = qr(J_l Q) from the first k columns of the identity, with a
    NumPy (LAPACK) QR every `interval` layers, after the last, and wherever the vectors
    have fewer than k nonzero rows (as the core factors them). At each recorded depth: the
    depth, the cumulative log|R_ii|, whether each direction was clear of rank loss (every
    |R_ii| so far either exactly 0 or above 1e-8 of the norm of the vectors factored), and
    the largest rank loss that zero rows have shown so far (k minus their nonzero rows)."""
    q = np.eye(Js[0].shape[1])[:, :k]
    acc, clear, lost, out = np.zeros(k), np.ones(k, dtype=bool), 0, []
    for l, J in enumerate(Js, start=1):
        q = J @ q
        rows = np.count_nonzero(np.any(q != 0, axis=1))
        record = l % interval == 0 or l == len(Js)
        if not record and rows >= k:
            continue
        lost = max(lost, k - rows)
        norm = np.linalg.norm(q, 2)
        q, r = np.linalg.qr(q)
        d = np.abs(np.diag(r))
        with np.errstate(divide="ignore"):
            acc = acc + np.log(d)
        clear &= (d == 0) | (d > 1e-8 * norm)
        if record:
            out.append((l, acc.copy(), clear.copy(), lost))
    return out


def _with_zeros(n, seed, rows=(), cols=()):
    w = np.random.default_rng(seed).standard_normal((n, n))
    w[list(rows)] = 0.0
    w[:, list(cols)] = 0.0
    return w


# one-layer and two-layer products with zero rows and zero columns, at the same index and
# at different ones, in the same layer and in different layers
RANK_LOSS = {
    "2x2 zero column and row": [np.array([[0.0, 0.0], [0.0, 1.0]])],
    "column 1 and row 1": [_with_zeros(4, 0, rows=[0], cols=[0])],
    "column 2 and row 4": [_with_zeros(4, 1, rows=[3], cols=[1])],
    "columns 1, 3 and row 2": [_with_zeros(4, 2, rows=[1], cols=[0, 2])],
    "rows 1, 2 and column 3": [_with_zeros(4, 3, rows=[0, 1], cols=[2])],
    "column, then row": [_with_zeros(4, 4, cols=[0]), _with_zeros(4, 5, rows=[0])],
    "row, then column": [_with_zeros(4, 6, rows=[2]), _with_zeros(4, 7, cols=[0])],
    "both, then full": [_with_zeros(4, 8, rows=[0], cols=[0]), _with_zeros(4, 9)],
    "full, then both": [_with_zeros(4, 10), _with_zeros(4, 11, rows=[3], cols=[1])],
    "both, then both": [_with_zeros(4, 12, rows=[1], cols=[0]),
                        _with_zeros(4, 13, rows=[2], cols=[3])],
}  # fmt: skip


@pytest.mark.parametrize("interval", [1, 2])
@pytest.mark.parametrize("name", list(RANK_LOSS))
def test_rank_loss_against_numpy_qr_of_the_same_products(gc, name, interval):
    """Linear layers with exactly zero rows and columns, for every k: the values are
    NumPy's QR of the products that are factored (every `interval` layers, after the last,
    and where the vectors have fewer than k nonzero rows). Where NumPy's R_ii is exactly 0
    the direction is -inf; where it is rounding noise, the direction is -inf or noise too;
    at least as many directions are -inf as zero rows imply, and no more than that or the
    exact zeros: a direction that is exactly zero in its own place counts towards the loss
    that the zero rows imply."""
    Ws = RANK_LOSS[name]
    net = gc.MLP.from_weights(Ws, activation="linear")
    n = Ws[0].shape[0]
    for k in range(1, n + 1):
        s = jacobian_spectrum(net, np.ones(n), k=k, interval=interval)
        ref = numpy_qr_loop(Ws, k, interval)
        assert list(s.depths) == [l for l, *_ in ref]
        for t, (_, want, clear, lost) in enumerate(ref):
            got = s.log_singular_values[0, t]
            ok = clear & np.isfinite(want)
            np.testing.assert_allclose(got[ok], want[ok], rtol=1e-12, atol=1e-12, err_msg=name)
            assert np.isneginf(got[np.isneginf(want)]).all(), (name, k, t, got, want)
            # rank lost in exact arithmetic only: -inf, or rounding noise as NumPy's
            noise = got[~ok & np.isfinite(got)]
            assert (noise < want[ok].min(initial=0.0) - 25).all(), (name, k, t, got, want)
            assert np.isneginf(got).sum() >= lost, (name, k, t, got, lost)


def test_rank_loss_counts_exact_zeros_once(gc):
    """W = [[0, 0], [0, 1]] has rank 1: its first column is zero (direction 1 is -inf in
    its own place) and direction 2, after it, grows by exactly 1 (NumPy's R is W itself).
    One zero row and one zero column make one direction -inf, not two."""
    W = np.array([[0.0, 0.0], [0.0, 1.0]])
    np.testing.assert_array_equal(np.abs(np.diag(np.linalg.qr(W)[1])), [0.0, 1.0])
    net = gc.MLP.from_weights([W], activation="linear")
    x = np.random.default_rng(0).standard_normal((1, 2))
    got = [jacobian_spectrum(net, x, k=k).log_singular_values for k in (2, 1)]
    np.testing.assert_array_equal(got[0], [[[-np.inf, 0.0]]])
    np.testing.assert_array_equal(got[1], [[[-np.inf]]])


def test_directions_after_an_exact_zero_follow_the_factored_product(gc):
    """A zero first column and no zero row, then a rotation: the QR is no longer unique,
    and each interval gives NumPy's QR of the products it factors (the README's example)."""
    W = np.array([[0.0, 1.0], [0.0, 1.0]])
    rot = np.array([[0.6, -0.8], [0.8, 0.6]])
    net = gc.MLP.from_weights([W, rot], activation="linear")
    for interval, want in ((1, [[-np.inf, 0.0], [-np.inf, 0.0]]), (2, [[-np.inf, math.log(1.4)]])):
        got = jacobian_spectrum(net, np.ones(2), interval=interval).log_singular_values[0]
        np.testing.assert_allclose(got, want, rtol=1e-15, atol=1e-15)
    np.testing.assert_allclose(np.abs(np.diag(np.linalg.qr(rot @ W)[1])), [0.0, 1.4], rtol=1e-15)


@pytest.mark.parametrize("exact_max_dim", [0, 256])
def test_saturated_gelu_tanh_jacobian_is_finite(gc, exact_max_dim):
    """Pre-activations of 1e200 and beyond, where the cubic inside gelu_tanh overflows:
    phi' is exactly 1 (or 0 below), so J_1 is W_1 on the units that are on; layer 2 is
    back in the ordinary range."""
    W1 = np.array([[1e200, 0.0, 0.0], [0.0, 1e300, 0.0], [0.0, 0.0, -1e250]])
    W2 = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 0.25], [2.0, 0.0, 1.0]]) * 1e-300
    net = gc.MLP.from_weights([W1, W2], activation="gelu_tanh")
    r = jacobian_norms(net, np.ones((2, 3)), exact_max_dim=exact_max_dim)
    J1 = W1 * np.array([1.0, 1.0, 0.0])[:, None]
    z2 = W2 @ np.array([1e200, 1e300, 0.0])
    J2 = W2 * O.act_derivative("gelu_tanh", z2)[:, None]
    for l, (J, scale) in enumerate(((J1, 300), (J2, -300))):
        Js = J * 10.0**-scale
        np.testing.assert_allclose(r.log10_frobenius[:, l], np.log10(np.linalg.norm(Js)) + scale,
                                   rtol=1e-14)
        np.testing.assert_allclose(r.log10_spectral[:, l], np.log10(np.linalg.norm(Js, 2)) + scale,
                                   rtol=1e-9)


def test_norms_beyond_the_double_range(gc):
    """||J||_F above the largest double (entries near it) comes out in log10, exactly; a
    Jacobian entry that overflows (phi' times W) raises NonFiniteError naming the layer."""
    net = gc.MLP.from_weights([np.diag([1.5e308, 1.5e308])], activation="linear")
    for emd in (0, 256):
        r = jacobian_norms(net, np.ones(2), exact_max_dim=emd)
        np.testing.assert_allclose(r.log10_frobenius[0, 0], 308 + math.log10(1.5 * math.sqrt(2)),
                                   rtol=1e-15)
        np.testing.assert_allclose(r.log10_spectral[0, 0], 308 + math.log10(1.5), rtol=1e-12)
    # elu's phi' is alpha e^z at z <= 0: 1e300 here, times a weight of 1e10
    net = gc.MLP.from_weights([np.full((1, 1), 1e10)], activation="elu", alpha=1e300)
    for emd in (0, 256):
        with pytest.raises(NonFiniteError, match=r"Jacobian of layer 1 of 1 has entries beyond"):
            jacobian_norms(net, np.full(1, -1e-20), exact_max_dim=emd)


# --------------------------------------------------------------------------------------
# QR spectrum: convergence and random matrices
# --------------------------------------------------------------------------------------
def test_converges_to_singular_values_of_product(gc):
    """A constant non-normal J = A: log|R_ii| stays within O(1) of log sigma_i(A^l) (the
    formed product, short chains), so per layer both approach log|lambda_i(A)|, at rate
    1/l: the finite-depth Lyapunov exponents converge."""
    rng = np.random.default_rng(0)
    lam = np.array([1.3, -1.0, 0.8, 0.6])
    V = rng.standard_normal((4, 4))
    A = V @ np.diag(lam) @ np.linalg.inv(V)
    for start in ("identity", "random"):
        for L in (10, 30):
            s = jacobian_spectrum(gc.MLP.from_weights([A] * L, activation="linear"), np.ones(4),
                                  start=start, seed=1)
            sv = np.log(np.linalg.svd(np.linalg.matrix_power(A, L), compute_uv=False))
            assert np.abs(s.log_singular_values[0, -1] - sv).max() < 2.0
        errs = []
        for L in (10, 100, 1000):
            s = jacobian_spectrum(gc.MLP.from_weights([A] * L, activation="linear"), np.ones(4),
                                  start=start, seed=1)
            errs.append(np.abs(s.lyapunov_exponents[0] - np.log(np.abs(lam))).max())
            assert errs[-1] * L < 1.5
        assert errs[0] > errs[1] > errs[2]
        # the running estimates settle: convergence[:, l] = S_l / l
        conv = s.convergence[0]
        assert np.abs(conv[-1] - conv[-100]).max() < 1e-3


@pytest.mark.parametrize("sigma,start", [(1.0, "identity"), (1.7, "random")])
def test_gaussian_products_match_newman(gc, sigma, start):
    """Products of Gaussian matrices (entries N(0, sigma^2/n)): after QR every layer adds
    independent log-chi terms, so the depth-L estimate of lambda_i is unbiased with a known
    standard error (Newman 1986)."""
    n, L = 8, 3000
    net = gc.MLP(depth=L, width=n, activation="linear", init="normal", sigma_w=sigma, seed=21)
    s = jacobian_spectrum(net, np.ones(n), start=start, seed=2)
    lam, se = gaussian_lyapunov(n, sigma, L)
    z = (s.lyapunov_exponents[0] - lam) / se
    assert np.abs(z).max() < 4.5, z
    assert abs(z.sum()) / math.sqrt(n) < 4.5


def test_interval_matches_every_layer(gc):
    """Re-orthonormalising every `interval` layers gives the same QR (it is unique) at
    the depths where it happens, as long as interval * (lambda_1 - lambda_k) stays well
    below log(1/eps); vectors are rescaled by powers of two in between, so an exploding
    chain does not overflow."""
    net = gc.MLP(depth=103, width=10, activation="tanh", bias_std=0.2, gain=1.2, seed=5)
    x = np.random.default_rng(2).standard_normal((2, 10))
    every = jacobian_spectrum(net, x, k=6)
    for k, interval in [(6, 2), (6, 5), (6, 10), (1, 103), (1, 200)]:
        s = jacobian_spectrum(net, x, k=k, interval=interval)
        want = sorted(set(range(interval, 104, interval)) | {103})
        np.testing.assert_array_equal(s.depths, want)
        np.testing.assert_allclose(s.log_singular_values,
                                   every.log_singular_values[:, s.depths - 1, :k],
                                   rtol=1e-9, atol=1e-9)
    rng = np.random.default_rng(3)
    W = [rng.standard_normal((6, 6)) * 1e30 for _ in range(50)]
    big = gc.MLP.from_weights(W, activation="linear")  # the product reaches 1e1500
    a = jacobian_spectrum(big, np.ones(6), interval=10)
    b = jacobian_spectrum(big, np.ones(6))
    np.testing.assert_allclose(a.log_singular_values, b.log_singular_values[:, 9::10], rtol=1e-9)
    assert a.log_singular_values[0, -1, 0] > 3000


def test_homogeneous_chain_never_overflows(gc):
    """relu with zero biases: h_l is renormalised by powers of two in the forward pass, so
    phi' is exact at any scale; scaling every W by 1024 adds exactly l ln(1024)."""
    rng = np.random.default_rng(6)
    W = [rng.standard_normal((16, 16)) * math.sqrt(2 / 16) for _ in range(300)]
    x = rng.standard_normal((2, 16))
    s1 = jacobian_spectrum(gc.MLP.from_weights(W, activation="relu"), x)
    s2 = jacobian_spectrum(gc.MLP.from_weights([w * 1024.0 for w in W], activation="relu"), x)
    shift = np.arange(1, 301)[None, :, None] * math.log(1024.0)
    np.testing.assert_allclose(s2.log_singular_values, s1.log_singular_values + shift,
                               rtol=1e-12, atol=1e-9)


def test_forward_overflow_raises_nonfinite(gc):
    rng = np.random.default_rng(0)
    W = [rng.standard_normal((5, 5)) * 1e30 for _ in range(20)]
    b = [np.full(5, 0.1)] * 20
    net = gc.MLP.from_weights(W, b, activation="linear")
    x = np.ones((1, 5))
    first = O.first_nonfinite_layer(W, b, x, "linear")
    for fn in (jacobian_norms, jacobian_spectrum):
        with pytest.raises(NonFiniteError) as info:
            fn(net, x)
        assert info.value.where == "forward" and info.value.index == first


# --------------------------------------------------------------------------------------
# threads, result objects, bad input
# --------------------------------------------------------------------------------------
def test_single_example_equals_batch_row(gc):
    """One example runs on two threads sharing each layer (when a layer has enough work);
    a batch runs one example per thread. Both give bit-identical results, for varying
    widths too."""
    for widths in ([128] * 40, [100, 160, 120, 140, 110, 150, 130], [30, 50, 20, 40, 33]):
        net = gc.MLP(width=widths, activation="tanh", bias_std=0.2, seed=8)
        x = np.random.default_rng(5).standard_normal((3, widths[0]))
        for k in sorted({1, 7, min(widths)}):
            batch = jacobian_spectrum(net, x, k=k, start="random")
            for e in range(3):
                one = jacobian_spectrum(net, x[e], k=k, start="random")
                np.testing.assert_array_equal(one.log_singular_values[0],
                                              batch.log_singular_values[e])


def test_spectrum_result_object(gc):
    net = gc.MLP(depth=12, width=6, activation="tanh", seed=0)
    s = jacobian_spectrum(net, np.ones(6), k=3, interval=4)
    assert isinstance(s, JacobianSpectrum)
    assert (s.batch, s.depth, s.k, s.interval, s.start) == (1, 12, 3, 4, "identity")
    np.testing.assert_array_equal(s.depths, [4, 8, 12])
    np.testing.assert_allclose(s.log10_singular_values, s.log_singular_values / math.log(10))
    np.testing.assert_allclose(s.exponents_at(8), s.log_singular_values[:, 1] / 8)
    np.testing.assert_allclose(s.lyapunov_exponents, s.exponents_at(12))
    np.testing.assert_allclose(s.lyapunov_exponents_mean, s.lyapunov_exponents[0])
    np.testing.assert_allclose(s.convergence[:, :, 0], s.log_singular_values[:, :, 0] / [4, 8, 12])
    np.testing.assert_allclose(s.log_volume, s.log_singular_values.sum(-1))
    with pytest.raises(ValueError, match=r"depth must be one of .*4, 8, 12"):
        s.exponents_at(5)
    d = json.loads(json.dumps(s.to_dict()))
    assert d["depths"] == [4, 8, 12] and len(d["log_singular_values"][0]) == 3
    assert "log_singular_values" not in s.to_dict(values=False)
    assert "JacobianSpectrum(batch=1, depth=12, k=3" in str(s) and "depth" in s.table()
    with pytest.raises(ValueError):
        s.log_singular_values[0, 0, 0] = 0.0  # read-only


def _net(gc):
    return gc.MLP(width=[6, 5, 7], activation="tanh", seed=0)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"k": 6}, ValueError,
         r"k must be None or an integer between 1 and the smallest width, 5; got 6"),
        ({"k": 0}, ValueError, r"k must be .* between 1 and the smallest width, 5; got 0"),
        ({"k": 2.0}, TypeError, r"k must be"),
        ({"interval": 0}, ValueError, r"interval must be a positive integer; got 0"),
        ({"interval": -3}, ValueError, r"interval must be a positive integer; got -3"),
        ({"start": "eye"}, ValueError, r"start must be one of 'identity', 'random'; got 'eye'"),
        ({"seed": -1}, ValueError, r"seed must be"),
    ],
)
def test_spectrum_bad_arguments(gc, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        jacobian_spectrum(_net(gc), np.ones(6), **kwargs)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"tol": 0.0}, ValueError, r"tol must be a positive finite number; got 0.0"),
        ({"tol": float("nan")}, ValueError, r"tol must be finite"),
        ({"max_iter": 0}, ValueError, r"max_iter must be a positive integer; got 0"),
        ({"exact_max_dim": -1}, ValueError,
         r"exact_max_dim must be a non-negative integer; got -1"),
        ({"spectral": 1}, TypeError, r"spectral must be True or False"),
    ],
)
def test_norms_bad_arguments(gc, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        jacobian_norms(_net(gc), np.ones(6), **kwargs)


@pytest.mark.parametrize("fn", [jacobian_norms, jacobian_spectrum])
@pytest.mark.parametrize(
    "x,exc,match",
    [
        (np.ones(5), ValueError, r"x must have shape \(batch, 6\) or \(6,\); got \(5,\)"),
        (np.ones((2, 7)), ValueError, r"x must have shape \(batch, 6\) or \(6,\); got \(2, 7\)"),
        (np.ones((2, 3, 6)), ValueError, r"x must have shape \(batch, 6\) or \(6,\)"),
        (np.full(6, np.nan), ValueError, r"x contains NaN"),
        (np.ones((0, 6)), ValueError, r"x must not be empty"),
        (np.array(["a"] * 6), TypeError, r"x must hold real numbers"),
    ],
)
def test_bad_x(gc, fn, x, exc, match):
    with pytest.raises(exc, match=match):
        fn(_net(gc), x)


def test_net_must_be_mlp(gc):
    with pytest.raises(TypeError, match=r"net must be a gradchain.MLP"):
        jacobian_spectrum(object(), np.ones(6))


@pytest.mark.parametrize("exact_max_dim", [0, 64])
@pytest.mark.parametrize("shift", [-1070, -1040, 1000])
def test_norms_of_weights_beyond_the_normal_range(gc, shift, exact_max_dim):
    """A layer's Jacobian formed from subnormal (or huge) weights keeps every bit the
    weights hold: its norms are those of the same weights scaled into range, shifted back."""
    rng = np.random.default_rng(3)
    w = [rng.standard_normal((5, 3)), rng.standard_normal((4, 5))]
    scaled = [np.ldexp(a, shift) for a in w]  # rounded once, where the weights are stored
    net = gc.MLP.from_weights(scaled, [None, None], activation="linear")
    jn = jacobian_norms(net, rng.standard_normal((2, 3)), exact_max_dim=exact_max_dim)
    back = [np.ldexp(a, -shift) for a in scaled]  # exact
    s = shift * math.log10(2.0)
    for l, a in enumerate(back):
        assert np.allclose(jn.log10_frobenius[:, l], np.log10(np.linalg.norm(a)) + s, rtol=1e-13)
        assert np.allclose(jn.log10_spectral[:, l], np.log10(np.linalg.norm(a, 2)) + s, rtol=1e-9)
    # a 1 x 1 Jacobian has one singular value: both norms are it
    one = gc.MLP.from_weights([np.array([[1.255e-321]])], [None], activation="sigmoid")
    n1 = jacobian_norms(one, np.array([[0.12573022]]), exact_max_dim=exact_max_dim)
    assert n1.log10_spectral[0, 0] == pytest.approx(n1.log10_frobenius[0, 0], abs=1e-12)
