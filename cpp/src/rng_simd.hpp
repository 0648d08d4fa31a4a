// The generator kernels written once over a vector type A (rng_avx2.cpp, rng_avx512.cpp).
// Each 64-bit lane runs one Philox counter: _mul_epu32 then gives the full 32 x 32 -> 64-bit
// product of the low halves without shuffles, and the bits above a word, never read by a
// product, may carry junk until the words are taken out.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "rng_kernels.hpp"

#ifdef GRADCHAIN_HAVE_LIBMVEC
// glibc libmvec's AVX2 variants: the ones vm::log / cos / sin use on every CPU with AVX2, so
// the normals are the same bits with or without AVX-512.
extern "C" {
__m256d _ZGVdN4v_log(__m256d);
__m256d _ZGVdN4v_sin(__m256d);
__m256d _ZGVdN4v_cos(__m256d);
}
#endif

namespace gradchain::rng_kernels {
namespace {

#define GC_INLINE __attribute__((always_inline)) inline

// U vectors of A::W counters (index + j, stream) for j < U * A::W, through Philox4x32-10.
template <class A>
struct Rounds {
  using I = typename A::I;
  static constexpr int U = A::U;
  static constexpr std::size_t G = std::size_t{U} * A::W;  // counters per run
  I w[4][U];

  GC_INLINE void run(const Stream& s, std::uint64_t index) {
    const I m0 = A::set1(0xD2511F53u), m1 = A::set1(0xCD9E8D57u);
    const I b0 = A::set1(0x9E3779B9u), b1 = A::set1(0xBB67AE85u);
    I k0 = A::set1(s.k0), k1 = A::set1(s.k1);
    for (int u = 0; u < U; ++u) {
      const I idx = A::add(A::set1(index + std::uint64_t(u) * A::W), A::iota());
      w[0][u] = idx;
      w[1][u] = A::template shr<32>(idx);
      w[2][u] = A::set1(s.stream);
      w[3][u] = A::set1(s.stream >> 32);
    }
    for (int r = 0; r < 10; ++r) {
      for (int u = 0; u < U; ++u) {
        const I p0 = A::mul(w[0][u], m0), p1 = A::mul(w[2][u], m1);
        w[0][u] = A::xor_(A::xor_(A::template shr<32>(p1), w[1][u]), k0);
        w[1][u] = p1;
        w[2][u] = A::xor_(A::xor_(A::template shr<32>(p0), w[3][u]), k1);
        w[3][u] = p0;
      }
      k0 = A::add(k0, b0);  // 64-bit adds: their low halves are the 32-bit key schedule
      k1 = A::add(k1, b1);
    }
  }
};

// (hi:lo) >> 11 times 2^-53 from two words, as Philox::uniform2 computes it. Without a
// 64-bit integer to double conversion (AVX2), each part goes through the 2^52 exponent
// trick; both parts and their sum are exact.
template <class A>
GC_INLINE typename A::D unit(typename A::I lo, typename A::I hi) {
  const typename A::I e52 = A::set1(0x4330000000000000u);
  const typename A::D two52 = A::set1d(0x1p52);
  const typename A::D h =
      A::sub(A::as_double(A::or_(A::template shr<32>(A::template shl<32>(hi)), e52)), two52);
  const typename A::D l =
      A::sub(A::as_double(A::or_(A::template shr<43>(A::template shl<32>(lo)), e52)), two52);
  return A::addd(A::muld(h, A::set1d(0x1p-32)), A::muld(l, A::set1d(0x1p-53)));
}

// out[2 j] = a[j], out[2 j + 1] = b[j] for j < 4, or fewer (`pairs`).
GC_INLINE void interleave(__m256d a, __m256d b, double* out, std::size_t pairs) {
  const __m256d lo = _mm256_unpacklo_pd(a, b), hi = _mm256_unpackhi_pd(a, b);
  const __m256d v0 = _mm256_permute2f128_pd(lo, hi, 0x20),
                v1 = _mm256_permute2f128_pd(lo, hi, 0x31);
  if (pairs >= 4) {
    _mm256_storeu_pd(out, v0);
    _mm256_storeu_pd(out + 4, v1);
    return;
  }
  alignas(32) double tmp[8];
  _mm256_store_pd(tmp, v0);
  _mm256_store_pd(tmp + 4, v1);
  std::copy(tmp, tmp + 2 * pairs, out);
}

template <class A>
void blocks(const Stream& s, std::uint64_t first, std::size_t n, std::uint32_t* out) {
  Rounds<A> g;
  alignas(64) std::uint64_t w01[A::W], w23[A::W];
  for (std::size_t j = 0; j < n; j += g.G) {
    g.run(s, first + j);
    for (int u = 0; u < A::U; ++u) {
      // Words 0 and 1 (2 and 3) side by side: the block's layout on a little-endian CPU.
      A::store(w01, A::or_(A::template shr<32>(A::template shl<32>(g.w[0][u])),
                           A::template shl<32>(g.w[1][u])));
      A::store(w23, A::or_(A::template shr<32>(A::template shl<32>(g.w[2][u])),
                           A::template shl<32>(g.w[3][u])));
      for (std::size_t l = 0; l < std::size_t{A::W}; ++l) {
        const std::size_t i = j + std::size_t(u) * A::W + l;
        if (i >= n) return;
        std::memcpy(out + 4 * i, &w01[l], 8);
        std::memcpy(out + 4 * i + 2, &w23[l], 8);
      }
    }
  }
}

template <class A>
void uniform_pm1_pairs(const Stream& s, std::uint64_t first, std::size_t n, double scale,
                       double* out) {
  Rounds<A> g;
  alignas(64) double a[g.G], b[g.G];
  const typename A::D two = A::set1d(2.0), one = A::set1d(1.0), c = A::set1d(scale);
  for (std::size_t j = 0; j < n; j += g.G) {
    g.run(s, first + j);
    for (int u = 0; u < A::U; ++u) {
      // 2 u - 1 is exact, so a fused multiply-add would round it the same.
      A::stored(a + u * A::W, A::muld(A::sub(A::muld(two, unit<A>(g.w[0][u], g.w[1][u])), one), c));
      A::stored(b + u * A::W, A::muld(A::sub(A::muld(two, unit<A>(g.w[2][u], g.w[3][u])), one), c));
    }
    const std::size_t m = std::min(g.G, n - j);
    for (std::size_t k = 0; k < m; k += 4)
      interleave(_mm256_load_pd(a + k), _mm256_load_pd(b + k), out + 2 * (j + k), m - k);
  }
}

#ifdef GRADCHAIN_HAVE_LIBMVEC
// Box-Muller as the scalar path computes it: sqrt(-2 log(1 - u0)) times cos and sin of
// 2 pi u1, a block of pairs at a time so that the uniforms stay in L1 between the steps.
template <class A>
void normal_pairs(const Stream& s, std::uint64_t first, std::size_t n, double scale, double* out) {
  constexpr std::size_t kPairs = 256;  // a multiple of every G
  Rounds<A> g;
  alignas(64) double r[kPairs], t[kPairs];
  const typename A::D one = A::set1d(1.0), two_pi = A::set1d(6.283185307179586476925);
  const __m256d minus_two = _mm256_set1_pd(-2.0), c = _mm256_set1_pd(scale);
  for (std::size_t p = 0; p < n; p += kPairs) {
    const std::size_t m = std::min(kPairs, n - p);
    for (std::size_t j = 0; j < m; j += g.G) {
      g.run(s, first + p + j);
      for (int u = 0; u < A::U; ++u) {
        const std::size_t k = j + std::size_t(u) * A::W;
        A::stored(r + k, A::sub(one, unit<A>(g.w[0][u], g.w[1][u])));  // in (0, 1]
        A::stored(t + k, A::muld(two_pi, unit<A>(g.w[2][u], g.w[3][u])));
      }
    }
    // Whole vectors past m hold numbers of the next counters: computed, not stored.
    for (std::size_t k = 0; k < m; k += 4) {
      const __m256d rad =
          _mm256_sqrt_pd(_mm256_mul_pd(minus_two, _ZGVdN4v_log(_mm256_load_pd(r + k))));
      const __m256d tk = _mm256_load_pd(t + k);
      interleave(_mm256_mul_pd(_mm256_mul_pd(rad, _ZGVdN4v_cos(tk)), c),
                 _mm256_mul_pd(_mm256_mul_pd(rad, _ZGVdN4v_sin(tk)), c), out + 2 * (p + k), m - k);
    }
  }
}
#endif

#undef GC_INLINE

}  // namespace
}  // namespace gradchain::rng_kernels
