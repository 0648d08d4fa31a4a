"""gradchain.clip against torch.nn.utils' clip_grad_norm_, clip_grad_value_ and
get_total_norm, on random lists of float32/float64 arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gradchain.clip import clip_coefficient, clip_grad_norm_, clip_grad_value_, get_total_norm
from gradchain.errors import NonFiniteError

N_CASES = 120
NORM_TYPES = [2.0, math.inf, 1.0, 0.5, 3.0, "random"]
TINY32 = float(np.finfo(np.float32).tiny)
TINY64 = float(np.finfo(np.float64).tiny)


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


# --- random inputs ------------------------------------------------------------------


def random_grads(rng, *, lo=-30.0, hi=30.0, nonfinite=True, empty_arrays=True):
    """0..6 arrays: random shapes (0-d included), dtypes and magnitudes 10**lo..10**hi
    (each array has its own scale, entries spread over 4 decades around it), with
    some zeros and, in about a third of the lists, injected inf/-inf/NaN."""
    arrays = []
    for _ in range(int(rng.integers(0, 7))):
        ndim = int(rng.integers(0, 4))
        shape = tuple(int(d) for d in rng.integers(0 if empty_arrays else 1, 6, size=ndim))
        dtype = np.float32 if rng.random() < 0.5 else np.float64
        exps = rng.uniform(lo, hi) + rng.uniform(-2.0, 2.0, size=shape)
        vals = np.asarray(np.where(rng.random(shape) < 0.5, -1.0, 1.0) * 10.0**exps)
        if rng.random() < 0.2:
            vals[rng.random(shape) < 0.3] = 0.0
        arrays.append(vals.astype(dtype))
    if nonfinite and rng.random() < 0.35:
        for _ in range(int(rng.integers(1, 3))):
            a = arrays[int(rng.integers(len(arrays)))] if arrays else np.empty(0)
            if a.size:
                a.flat[int(rng.integers(a.size))] = rng.choice([np.inf, -np.inf, np.nan])
    return arrays


def pick_norm_type(rng, norm_type):
    return float(rng.uniform(0.25, 8.0)) if norm_type == "random" else norm_type


def pick_max_norm(rng, total):
    u = rng.random()
    if u < 0.08:
        return 0.0
    if u < 0.12:
        return math.inf
    if math.isfinite(total) and total > 0:
        return total * 10.0 ** rng.uniform(-3.0, 0.5)  # clips about 85% of the time
    return 10.0 ** rng.uniform(-3.0, 3.0)


# --- torch references -----------------------------------------------------------------


def as_params(torch, arrays, dtype=None):
    params = []
    for a in arrays:
        g = torch.from_numpy(np.array(a, dtype=dtype or a.dtype))
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g
        params.append(p)
    return params


def torch_total(torch, arrays, p):
    """torch on float64 copies: the exact norm of the (float32-exact) values."""
    tensors = [torch.from_numpy(np.array(a, dtype=np.float64)) for a in arrays]
    return torch.nn.utils.get_total_norm(tensors, p).item()


def torch_clip(torch, arrays, max_norm, p, dtype=np.float64):
    params = as_params(torch, arrays, dtype)
    total = torch.nn.utils.clip_grad_norm_(params, max_norm, p).item()
    return total, [prm.grad.numpy() for prm in params]


def assert_arrays_close(got, want, msg, rtol64=1e-12, rtol32=1e-6):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        f32 = g.dtype == np.float32
        np.testing.assert_allclose(
            g.astype(np.float64),
            w,
            rtol=rtol32 if f32 else rtol64,
            atol=(rtol32 * TINY32) if f32 else (rtol64 * TINY64),  # subnormal results
            err_msg=f"{msg}, array {i} ({g.dtype}, shape {g.shape})",
        )


# --- agreement with torch on random lists -----------------------------------------------


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_get_total_norm_matches_torch(torch, norm_type):
    rng = np.random.default_rng(1000 + NORM_TYPES.index(norm_type))
    for case in range(N_CASES):
        p = pick_norm_type(rng, norm_type)
        # torch cannot take the inf-norm of a size-0 tensor
        arrays = random_grads(rng, empty_arrays=p != math.inf)
        msg = f"case {case}, p={p}"
        want = torch_total(torch, arrays, p)
        got = get_total_norm(arrays, p)
        assert isinstance(got, float)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=0, err_msg=msg)
        if math.isfinite(want):
            assert get_total_norm(arrays, p, error_if_nonfinite=True) == got
        else:
            with pytest.raises(NonFiniteError, match="non-finite"):
                get_total_norm(arrays, p, error_if_nonfinite=True)
            tensors = [torch.from_numpy(np.array(a, dtype=np.float64)) for a in arrays]
            with pytest.raises(RuntimeError, match="non-finite"):
                torch.nn.utils.get_total_norm(tensors, p, error_if_nonfinite=True)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_grad_norm_matches_torch(torch, norm_type):
    rng = np.random.default_rng(2000 + NORM_TYPES.index(norm_type))
    n_clipped = 0
    for case in range(N_CASES):
        p = pick_norm_type(rng, norm_type)
        arrays = random_grads(rng, empty_arrays=p != math.inf)
        max_norm = pick_max_norm(rng, torch_total(torch, arrays, p))
        msg = f"case {case}, p={p}, max_norm={max_norm}"
        want_total, want = torch_clip(torch, arrays, max_norm, p)
        originals = [(a, a.dtype, a.shape, a.copy()) for a in arrays]
        got_total = clip_grad_norm_(arrays, max_norm, p)
        np.testing.assert_allclose(got_total, want_total, rtol=1e-12, atol=0, err_msg=msg)
        for a, (orig, dtype, shape, _) in zip(arrays, originals):
            assert a is orig and a.dtype == dtype and a.shape == shape
        assert_arrays_close(arrays, want, msg)
        n_clipped += any(
            not np.array_equal(a, c, equal_nan=True) for a, (*_, c) in zip(arrays, originals)
        )
    assert n_clipped > N_CASES // 2  # the cases do exercise clipping


@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0, 0.5, 3.0])
def test_clip_grad_norm_matches_torch_in_native_dtypes(torch, norm_type):
    # Magnitudes where torch's float32 arithmetic cannot overflow. torch's float32 norms
    # are accumulated in float32 (errors up to ~1.5e-6 measured), hence rtol 1e-5 when
    # a float32 array is in the list.
    rng = np.random.default_rng(3000 + int(norm_type * 10 if math.isfinite(norm_type) else 99))
    for case in range(N_CASES // 2):
        arrays = random_grads(rng, lo=-8.0, hi=8.0, empty_arrays=norm_type != math.inf)
        max_norm = pick_max_norm(rng, torch_total(torch, arrays, norm_type))
        msg = f"case {case}, max_norm={max_norm}"
        want_total, want = torch_clip(torch, arrays, max_norm, norm_type, dtype=None)
        got_total = clip_grad_norm_(arrays, max_norm, norm_type)
        rtol = 1e-12 if all(a.dtype == np.float64 for a in arrays) else 1e-5
        np.testing.assert_allclose(got_total, want_total, rtol=rtol, atol=0, err_msg=msg)
        assert_arrays_close(arrays, want, msg, rtol64=rtol, rtol32=1e-5)


def test_float32_arrays_are_multiplied_by_the_float32_rounded_coefficient(torch):
    rng = np.random.default_rng(4)
    x32 = rng.standard_normal(4001).astype(np.float32)
    x64 = rng.standard_normal(999)
    g32, g64 = x32.copy(), x64.copy()
    total = clip_grad_norm_([g32, g64], 0.37)
    coef = clip_coefficient(total, 0.37)
    assert coef == 0.37 / (total + 1e-6) < 1
    assert g32.dtype == np.float32
    np.testing.assert_array_equal(g32, x32 * np.float32(coef))
    np.testing.assert_array_equal(g64, x64 * coef)
    # torch's in-place mul by a float64 0-d tensor rounds it to float32 the same way
    t = torch.from_numpy(x32.copy())
    t.mul_(torch.tensor(coef, dtype=torch.float64))
    np.testing.assert_array_equal(g32, t.numpy())
    # and rounding after a double-precision product would differ
    assert not np.array_equal(g32, (x32.astype(np.float64) * coef).astype(np.float32))


def test_clip_grad_value_matches_torch(torch):
    rng = np.random.default_rng(5)
    for case in range(2 * N_CASES):
        arrays = random_grads(rng)
        u = rng.random()
        clip_value = 0.0 if u < 0.05 else math.inf if u < 0.1 else 10.0 ** rng.uniform(-32, 32)
        originals = [a.copy() for a in arrays]
        assert clip_grad_value_(arrays, clip_value) is None
        if not arrays:  # torch raises on an empty list
            continue
        params = as_params(torch, originals)
        torch.nn.utils.clip_grad_value_(params, clip_value)
        for i, (a, prm) in enumerate(zip(arrays, params)):
            np.testing.assert_array_equal(
                a, prm.grad.numpy(), err_msg=f"case {case}, array {i}, clip_value={clip_value}"
            )
            assert np.array_equal(np.isnan(a), np.isnan(originals[i]))


def test_clip_coefficient_matches_torch(torch):
    cases = [
        (4.0, 1.0),
        (0.5, 1.0),
        (0.0, 1.0),
        (0.0, 0.0),
        (3.0, 0.0),
        (1e-7, 1e-7),
        (1e300, 1e-300),
        (math.inf, 1.0),
        (math.inf, math.inf),
        (math.nan, 1.0),
        (2.5, math.inf),
        (0.999999, 1.0),
        (1.0, 1.0),
    ]
    for total, max_norm in cases:
        t = torch.tensor(max_norm, dtype=torch.float64) / (
            torch.tensor(total, dtype=torch.float64) + 1e-6
        )
        want = torch.clamp(t, max=1.0).item()
        got = clip_coefficient(total, max_norm)
        assert got == want or (math.isnan(got) and math.isnan(want)), (total, max_norm)


def test_torch_overflows_where_we_do_not(torch):
    x = np.full(4, 1e200)
    assert torch.nn.utils.get_total_norm([torch.from_numpy(x.copy())]).item() == math.inf
    assert get_total_norm(x) == pytest.approx(2e200, rel=1e-15)


# --- exact values (no torch needed) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("arrays", "p", "want"),
    [
        ([np.full(4, 1e200)], 2.0, 2e200),
        ([np.full(8, 1e200)], 3.0, 2e200),
        ([np.full(4, 1e200)], 0.5, 1.6e201),
        ([np.full(4, -1e200)], 1.0, 4e200),
        ([np.array([1e200]), np.array([[1e200]])], 2.0, math.sqrt(2) * 1e200),
        ([np.array([1e308, -1e308])], 2.0, math.sqrt(2) * 1e308),
        ([np.array([1e308, 1e308])], 1.0, math.inf),  # the true norm exceeds DBL_MAX
        ([np.full(4, 1e-200)], 2.0, 2e-200),
        ([np.full(4, 1e-200)], 4.0, math.sqrt(2) * 1e-200),
        ([np.full(4, 5e-324)], 2.0, 1e-323),
        ([np.full(4, 3e38, dtype=np.float32)], 2.0, 2 * float(np.float32(3e38))),
        ([np.full(16, 1e-30, dtype=np.float32)], 2.0, 4 * float(np.float32(1e-30))),
        ([np.array([3.0, -4.0], dtype=np.float32), np.array([12.0])], 2.0, 13.0),
        ([np.array([1.0, -7.0]), np.array([5.0], dtype=np.float32)], math.inf, 7.0),
        ([np.array([1.0, 4.0]), np.array([4.0])], 0.5, 25.0),
    ],
)
def test_exact_norms_without_overflow_or_underflow(arrays, p, want):
    assert get_total_norm(arrays, p) == pytest.approx(want, rel=1e-14, abs=0)


def test_small_p_keeps_the_contribution_of_tiny_entries():
    # (1e-300)**0.01 = 1e-3 is not negligible next to (1e100)**0.01 = 10, although
    # 1e-300 / 1e100 underflows to 0
    want = (1e100**0.01 + 1e-300**0.01) ** 100
    assert want > 1.005e100
    assert get_total_norm(np.array([1e100, 1e-300]), 0.01) == pytest.approx(want, rel=1e-12)


def test_clip_with_huge_entries_gives_finite_results():
    g = [np.full(3, 1e200), np.array([-1e200])]
    assert clip_grad_norm_(g, 1.0) == pytest.approx(2e200, rel=1e-15)
    np.testing.assert_allclose(g[0], 0.5, rtol=1e-14)
    np.testing.assert_allclose(g[1], -0.5, rtol=1e-14)


@pytest.mark.parametrize("p", [2.0, math.inf, 1.0, 3.0, 0.5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_arrays(p, dtype):
    # big enough for the blocked, multi-threaded reductions and elementwise loops
    rng = np.random.default_rng(6)
    x = (rng.standard_normal(100_003) * 10.0 ** rng.uniform(-3, 3, 100_003)).astype(dtype)
    y = rng.standard_normal((300, 301)).astype(dtype)
    want = np.linalg.norm(
        [np.linalg.norm(x.astype(np.float64), p), np.linalg.norm(y.astype(np.float64).ravel(), p)],
        p,
    )
    g = [x.copy(), y.copy()]
    assert clip_grad_norm_(g, 1.0, p) == pytest.approx(want, rel=1e-12)
    c = dtype(1.0 / (want + 1e-6))
    np.testing.assert_allclose(g[0], x * c, rtol=1e-6 if dtype == np.float32 else 1e-12)
    np.testing.assert_allclose(g[1], y * c, rtol=1e-6 if dtype == np.float32 else 1e-12)
    h = [x.copy(), y.copy()]
    clip_grad_value_(h, 0.25)
    np.testing.assert_array_equal(h[0], np.clip(x, -0.25, 0.25))


def test_empty():
    for grads in ([], (), iter([])):
        assert get_total_norm(grads) == 0.0
    assert get_total_norm([], math.inf, error_if_nonfinite=True) == 0.0
    assert clip_grad_norm_([], 1.0, error_if_nonfinite=True) == 0.0
    assert clip_grad_value_([], 1.0) is None


@pytest.mark.parametrize("p", [2.0, math.inf, 1.0, 0.5])
def test_size_zero_arrays(p):
    # torch raises for the inf-norm of a size-0 tensor; we call it 0
    empty = [np.empty(0), np.empty((3, 0), dtype=np.float32)]
    assert get_total_norm(empty, p) == 0.0
    assert get_total_norm([*empty, np.array([-2.0])], p) == pytest.approx(2.0, rel=1e-15)
    assert clip_grad_norm_([*empty, np.array([-2.0])], 1.0, p) == pytest.approx(2.0, rel=1e-15)


def test_single_array_and_any_iterable():
    a = np.array([[3.0], [4.0]])
    assert clip_grad_norm_(a, 0.5) == 5.0
    np.testing.assert_allclose(a, [[0.3], [0.4]], rtol=1e-6)
    assert a.shape == (2, 1)
    b, c = np.array([3.0]), np.array([4.0], dtype=np.float32)
    assert clip_grad_norm_((x for x in (b, c)), 10.0) == 5.0
    assert clip_grad_norm_((b, c), 1.0) == 5.0
    np.testing.assert_allclose([b[0], c[0]], [0.6, 0.8], rtol=1e-6)
    s = np.array(-5.0, dtype=np.float32)  # 0-d
    clip_grad_value_(s, 2.0)
    assert s == -2.0


def test_norm_type_inf_string():
    g = [np.array([1.0, -9.0]), np.array([3.0])]
    assert get_total_norm(g, "inf") == get_total_norm(g, math.inf) == 9.0


# --- non-finite gradients ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "p", "order", "shown"),
    [
        (np.nan, 2.0, "2.0", "nan"),
        (np.inf, 2.0, "2.0", "inf"),
        (-np.inf, math.inf, "inf", "inf"),
        (np.nan, 0.5, "0.5", "nan"),
        (np.inf, 1.0, "1.0", "inf"),
    ],
)
def test_error_if_nonfinite(bad, p, order, shown):
    g = [np.array([1.0, bad, 2.0]), np.array([3.0], dtype=np.float32)]
    before = [a.copy() for a in g]
    pattern = (
        rf"total norm of order {order} for gradients is non-finite \({shown}\)"
        r".*error_if_nonfinite=False"
    )
    for f in (
        lambda: clip_grad_norm_(g, 1.0, p, error_if_nonfinite=True),
        lambda: get_total_norm(g, p, error_if_nonfinite=True),
    ):
        with pytest.raises(NonFiniteError, match=pattern) as info:
            f()
        assert isinstance(info.value, FloatingPointError)
        assert info.value.where == "clip"
    for a, b in zip(g, before):
        np.testing.assert_array_equal(a, b)


def test_nonfinite_total_scales_like_torch():
    g = [np.array([1.0, np.inf, -2.0]), np.array([3.0], dtype=np.float32)]
    assert clip_grad_norm_(g, 1.0) == math.inf
    np.testing.assert_array_equal(g[0], [0.0, np.nan, -0.0])  # coef 0, and inf * 0 = nan
    np.testing.assert_array_equal(g[1], [0.0])
    g = [np.array([1.0, np.nan]), np.array([np.inf, 3.0], dtype=np.float32)]
    assert math.isnan(clip_grad_norm_(g, 1.0))
    assert np.isnan(g[0]).all() and np.isnan(g[1]).all()


def test_clip_grad_value_keeps_nan_and_clamps_inf():
    g = np.array([np.nan, np.inf, -np.inf, 0.5, -3.0], dtype=np.float32)
    clip_grad_value_(g, 1.0)
    np.testing.assert_array_equal(g, [np.nan, 1.0, -1.0, 0.5, -1.0])
    h = np.array([np.inf, -np.inf, 3e38], dtype=np.float32)
    clip_grad_value_(h, 1e39)  # beyond float32's range: no bound at all
    np.testing.assert_array_equal(h, [np.inf, -np.inf, np.float32(3e38)])


# --- memory layouts -------------------------------------------------------------------------


def _views(dtype):
    rng = np.random.default_rng(7)
    return [
        lambda b: b.T,
        lambda b: b[:, ::2],
        lambda b: b[::-1, 1:5],
        lambda b: b[2],
        lambda b: b[1:4, 3],
        lambda b: b[::2, ::3].T,
    ], (rng.standard_normal((6, 7)) * 3).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("which", range(6))
def test_non_contiguous_views_are_modified_in_place(dtype, which):
    views, data = _views(dtype)
    base = data.copy()
    view = views[which](base)
    other = np.array([0.5, -1.5], dtype=np.float64)
    x = view.astype(np.float64)
    total = math.sqrt(float(np.sum(x * x)) + 0.5**2 + 1.5**2)
    assert get_total_norm([view, other]) == pytest.approx(total, rel=1e-13)
    assert clip_grad_norm_([view, other], 1.0) == pytest.approx(total, rel=1e-13)
    coef = 1.0 / (total + 1e-6)
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(view, x * coef, rtol=tol)
    np.testing.assert_allclose(other, [0.5 * coef, -1.5 * coef], rtol=1e-13)
    mask = np.ones(base.shape, dtype=bool)
    views[which](mask)[...] = False
    np.testing.assert_array_equal(base[mask], data[mask])  # only the view changed

    base = data.copy()
    view = views[which](base)
    clip_grad_value_(view, 1.0)
    np.testing.assert_array_equal(view, np.clip(views[which](data), -1.0, 1.0))
    np.testing.assert_array_equal(base[mask], data[mask])


@pytest.mark.parametrize("dtype", [">f4", ">f8", "<f4", "<f8"])
def test_any_byte_order(dtype):
    a = np.array([[3.0, 0.0], [0.0, -4.0]], dtype=dtype)
    assert clip_grad_norm_(a, 2.5) == 5.0
    assert a.dtype == np.dtype(dtype)
    np.testing.assert_allclose(a, [[1.5, 0.0], [0.0, -2.0]], rtol=1e-6)
    clip_grad_value_(a, 1.75)
    np.testing.assert_allclose(a, [[1.5, 0.0], [0.0, -1.75]], rtol=1e-6)


def test_read_only_arrays_can_be_measured_but_not_clipped():
    a = np.array([3.0, 4.0])
    a.flags.writeable = False
    assert get_total_norm(a) == 5.0
    assert get_total_norm(np.broadcast_to(np.float32(2.0), (4,))) == 4.0  # read-only, stride 0
    with pytest.raises(ValueError, match="read-only"):
        clip_grad_norm_([np.ones(2), a], 1.0)
    with pytest.raises(ValueError, match="read-only"):
        clip_grad_value_(a, 1.0)


# --- bad input -------------------------------------------------------------------------------

_FUNCS = {
    "get_total_norm": lambda g: get_total_norm(g),
    "clip_grad_norm_": lambda g: clip_grad_norm_(g, 1.0),
    "clip_grad_value_": lambda g: clip_grad_value_(g, 1.0),
}


@pytest.mark.parametrize("func", _FUNCS)
@pytest.mark.parametrize(
    ("grads", "pattern"),
    [
        (5, r"^grads must be a numpy.ndarray or an iterable"),
        (None, r"^grads must be"),
        ("abc", r"^grads must be"),
        (np.float64(1.0), r"^grads must be"),
        ([np.ones(2), [1.0, 2.0]], r"^grads\[1\] must be a numpy.ndarray, got list"),
        ([3.0], r"^grads\[0\] must be a numpy.ndarray, got float"),
    ],
)
def test_grads_not_arrays(func, grads, pattern):
    with pytest.raises(TypeError, match=pattern):
        _FUNCS[func](grads)


@pytest.mark.parametrize("func", _FUNCS)
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.complex128, np.float16, np.bool_, object])
def test_bad_dtypes(func, dtype):
    good = np.array([1.0, 2.0])
    with pytest.raises(TypeError, match=r"grads\[1\] has dtype .*float32 or float64"):
        _FUNCS[func]([good, np.ones(3, dtype=dtype)])
    with pytest.raises(TypeError, match=r"^grads has dtype .*float32 or float64"):
        _FUNCS[func](np.ones(3, dtype=dtype))
    np.testing.assert_array_equal(good, [1.0, 2.0])  # checked before anything is touched


@pytest.mark.parametrize(
    "norm_type", [0, 0.0, -1.0, -math.inf, math.nan, "two", "2", None, True, [2.0]]
)
def test_bad_norm_type(norm_type):
    g = np.array([3.0, 4.0])
    msg = r"norm_type must be a number p > 0 .* or inf"
    with pytest.raises(ValueError, match=msg):
        get_total_norm(g, norm_type)
    with pytest.raises(ValueError, match=msg):
        clip_grad_norm_(g, 1.0, norm_type)
    np.testing.assert_array_equal(g, [3.0, 4.0])


@pytest.mark.parametrize(
    ("value", "exc"),
    [
        (-1.0, ValueError),
        (-1e-300, ValueError),
        (-math.inf, ValueError),
        (math.nan, ValueError),
        ("1", TypeError),
        (None, TypeError),
        (True, TypeError),
    ],
)
def test_bad_max_norm_and_clip_value(value, exc):
    g = np.array([3.0, 4.0])
    with pytest.raises(exc, match="max_norm"):
        clip_grad_norm_(g, value)
    with pytest.raises(exc, match="clip_value"):
        clip_grad_value_(g, value)
    with pytest.raises(exc, match="max_norm"):
        clip_coefficient(1.0, value)
    np.testing.assert_array_equal(g, [3.0, 4.0])


def test_bad_total_norm():
    with pytest.raises(ValueError, match="total_norm must be non-negative"):
        clip_coefficient(-1.0, 1.0)
    with pytest.raises(TypeError, match="total_norm"):
        clip_coefficient("1", 1.0)


def test_clip_coefficient():
    assert clip_coefficient(4.0, 1.0) == 1.0 / (4.0 + 1e-6)
    assert clip_coefficient(np.float32(0.5), 1) == 1.0
    assert clip_coefficient(math.inf, 1.0) == 0.0
    assert math.isnan(clip_coefficient(math.nan, 1.0))
    assert math.isnan(clip_coefficient(math.inf, math.inf))
