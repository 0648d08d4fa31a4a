"""The counter-based generator (Philox4x32-10) and the normals and uniforms drawn from it:
every vector variant gives the scalar generator's bits, and the numbers of a release stay
the numbers (pinned by hashes)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from gradchain import _core
from oracles import philox4x32, philox_normals, philox_uniform_pm1

ORDER = ["avx512", "avx2", "scalar"]


@pytest.fixture
def rng_isas(gc):
    """Every generator variant this CPU runs (the widest first, 'scalar' last); the
    variant in use is restored afterwards."""
    widest = _core.rng_isa()
    yield ORDER[ORDER.index(widest) :]
    _core.set_rng_isa(widest)


def _on(isa, f, *args):
    _core.set_rng_isa(isa)
    return f(*args)


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint64)


def _random_cases(rng, k):
    """(seed, stream, first, n): full-width seeds and streams, counters on both sides of the
    2^32 boundary of the low word and of 2^64, lengths off the vector widths."""
    cases = [(0, 0, 0, 1), (2**64 - 1, 2**64 - 1, 2**64 - 5, 9), (5, 3, 2**32 - 3, 7),
             (7, 2**40, 2**33 - 17, 40), (1, 1, 0, 0)]  # fmt: skip
    for _ in range(k):
        seed, stream = (int(v) for v in rng.integers(0, 2**64, 2, dtype=np.uint64))
        near = int(rng.integers(1, 2**31)) << 32
        first = int(rng.choice([rng.integers(0, 2**63), near - int(rng.integers(0, 70))]))
        cases.append((seed, stream, first, int(rng.integers(1, 140))))
    return cases


def test_philox_known_answers(rng_isas):
    """The Random123 known-answer vectors for Philox4x32-10, on every variant."""
    kat = [
        ((0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((2**64 - 1, 2**64 - 1, 2**64 - 1), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x299F31D0A4093822, 0x0370734413198A2E, 0x85A308D3243F6A88),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]  # fmt: skip
    for (seed, stream, index), want in kat:
        assert philox4x32(seed, stream, [index]).tolist() == [list(want)]
        for isa in rng_isas:
            got = _on(isa, _core.philox_blocks, seed, stream, index, 1)
            assert got.tolist() == [list(want)], isa


def test_philox_blocks_match_the_oracle_on_every_variant(rng_isas):
    rng = np.random.default_rng(11)
    for seed, stream, first, n in _random_cases(rng, 60):
        want = philox4x32(seed, stream, np.uint64(first) + np.arange(n, dtype=np.uint64))
        for isa in rng_isas:
            got = _on(isa, _core.philox_blocks, seed, stream, first, n)
            assert got.dtype == np.uint32 and got.shape == (n, 4)
            np.testing.assert_array_equal(got, want, err_msg=f"{isa} {(seed, stream, first, n)}")


@pytest.mark.parametrize("kind", ["normal", "uniform_pm1"])
def test_vector_variants_draw_the_scalar_bits(rng_isas, kind):
    """Lengths around the vector widths, the kernels' blocks of 256 pairs and the 8192 pairs
    between looks at Ctrl-C; n = 0, 1 and odd n drop the last pair's second number."""
    fill = getattr(_core, f"fill_{kind}")
    rng = np.random.default_rng(5)
    sizes = [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65, 511, 512, 513, 16383, 16385, 16400]
    for n in sizes + [int(v) for v in rng.integers(1, 3000, 8)]:
        seed, stream = (int(v) for v in rng.integers(0, 2**64, 2, dtype=np.uint64))
        want = _on("scalar", fill, seed, stream, n)
        assert want.shape == (n,)
        for isa in rng_isas[:-1]:
            got = _on(isa, fill, seed, stream, n)
            assert np.array_equal(_bits(got), _bits(want)), (isa, n, seed, stream)
        # A longer draw starts with the same numbers.
        assert np.array_equal(_bits(fill(seed, stream, n + 3)[:n]), _bits(want)), n


@pytest.mark.parametrize("kind", ["normal", "uniform_pm1"])
def test_a_long_draw_is_the_same_on_any_number_of_threads(rng_isas, kind):
    """Past 2^17 pairs one draw is split over the threads, in chunks of 8192 pairs."""
    fill = getattr(_core, f"fill_{kind}")
    n = 2 * (1 << 17) + 2 * 8192 * 3 + 2 * 100 + 1
    want = _on("scalar", fill, 9, 2**33 + 1, n)
    previous = _core.set_thread_limit(1)
    try:
        for threads in (1, 2, 3):
            _core.set_thread_limit(threads)
            for isa in rng_isas:
                got = _on(isa, fill, 9, 2**33 + 1, n)
                assert np.array_equal(_bits(got), _bits(want)), (isa, threads)
    finally:
        _core.set_thread_limit(previous)


def test_draws_follow_their_definition(gc):
    """Element i from block i // 2, in NumPy's libm: uniforms exactly, normals to libm's
    last bits."""
    for seed, stream, n in ((0, 0, 9), (2**63 + 1, 6, 1001), (12345, 2**50 + 3, 4096)):
        assert np.array_equal(_core.fill_uniform_pm1(seed, stream, n),
                              philox_uniform_pm1(seed, stream, n))  # fmt: skip
        np.testing.assert_allclose(_core.fill_normal(seed, stream, n),
                                   philox_normals(seed, stream, n), rtol=1e-13, atol=1e-14)  # fmt: skip


def test_set_rng_isa_rejects_unknown_names(gc):
    with pytest.raises(ValueError, match="isa must be 'avx512', 'avx2' or 'scalar'; got 'sse9'"):
        _core.set_rng_isa("sse9")


# ---- the numbers stay the numbers ----------------------------------------------------------


def _hash(arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


# The weights' hashes were computed before the generator had vector kernels, the draws' by
# its scalar loop. libm's transcendental functions set the last bits of the normals, so these
# hold for glibc's libmvec on CPUs with AVX2 (the variants vm::log, sin and cos use there).
DRAWS = [
    ((0, 0, 1), "9a7eb3f639e840be", "9beb52be0ab2ad19"),
    ((1, 2, 1001), "b25dda5bd4943d2c", "d217e878613e31cc"),
    ((2**64 - 1, 2**63, 20001), "272ae33a493bcb3a", "291e73ffd8311637"),
]
MLP_WEIGHTS = [
    ({"init": "xavier_normal", "dtype": "float64", "seed": 0}, "b377b9e923dc1ca4"),
    ({"init": "he_uniform", "dtype": "float64", "seed": 7}, "cb0eae49f903d17f"),
    (
        {"init": "normal", "dtype": "float32", "seed": 123456789, "bias_std": 0.5},
        "2e95e514ce005b51",
    ),
    ({"init": "xavier_uniform", "dtype": "float32", "seed": 2**40 + 3}, "d21810aeb1420e7f"),
    ({"init": "orthogonal", "dtype": "float64", "seed": 5}, "121cfa683470e2b4"),
    ({"init": "lecun_normal", "dtype": "float64", "seed": 11, "bias_std": 0.1}, "5c735c6e90b3310d"),
]

needs_libmvec_avx2 = pytest.mark.skipif(
    not _core.vectorized_math() or _core.rng_isa() == "scalar",
    reason="pinned for glibc's libmvec on a CPU with AVX2",
)


@needs_libmvec_avx2
def test_pinned_draws(rng_isas):
    for isa in rng_isas:
        for args, normal, uniform in DRAWS:
            assert _hash([_on(isa, _core.fill_normal, *args)]) == normal, (isa, args)
            assert _hash([_on(isa, _core.fill_uniform_pm1, *args)]) == uniform, (isa, args)


@needs_libmvec_avx2
@pytest.mark.parametrize(("kwargs", "digest"), MLP_WEIGHTS, ids=[k["init"] for k, _ in MLP_WEIGHTS])
def test_pinned_mlp_weights(gc, rng_isas, kwargs, digest):
    for isa in rng_isas:
        _core.set_rng_isa(isa)
        m = gc.MLP(depth=3, width=[5, 17, 33, 8], **kwargs)
        assert _hash(m.weights + m.biases) == digest, isa


@needs_libmvec_avx2
def test_pinned_large_layer_and_drawn_chain(gc, rng_isas):
    """A layer of 89999 weights (odd, past many blocks), and a chain that draws its weights
    in every pass (the same numbers as kept ones)."""
    x = np.random.default_rng(1).standard_normal((5, 40))
    for isa in rng_isas:
        _core.set_rng_isa(isa)
        m = gc.MLP(depth=1, width=[301, 299], init="he_normal", bias_std=1.0, seed=2**63 + 5)
        assert _hash(m.weights + m.biases) == "5ff20b84f48a20c5", isa
        for store in (True, False):
            m = gc.MLP(depth=4, width=[7, 9, 31, 3, 5], init="normal", bias_std=0.2, seed=3,
                       store_weights=store)  # fmt: skip
            assert _hash(m.weights + m.biases) == "0e628bd219dfe8b6", (isa, store)
        m = gc.MLP(depth=6, width=40, bias_std=0.3, seed=9, store_weights=False)
        r = m.backward(x, checkpoint="sqrt")
        got = _hash([r.weight_grad_norms, r.bias_grad_norms, r.output])
        assert got == "664715e57fd0d3cd", isa


@needs_libmvec_avx2
def test_pinned_rnn_weights(gc, rng_isas):
    want = {"float64": "28d908cdfe61288e", "float32": "6527521413ee5aad"}
    for isa in rng_isas:
        _core.set_rng_isa(isa)
        for dt, digest in want.items():
            net = gc.RNN("lstm", input_size=3, hidden_size=7, num_layers=2, output_size=2,
                         dtype=dt, seed=4)  # fmt: skip
            assert _hash(list(net.state_dict().values())) == digest, (isa, dt)
