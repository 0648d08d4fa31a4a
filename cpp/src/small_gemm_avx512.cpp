// The small-product kernels for AVX-512 (compiled with -mavx512f; called only on CPUs that
// have it). 32 vector registers hold tiles of 4 x 4 vectors (16 accumulators).
#if defined(__AVX512F__) && defined(__FMA__)
#include <immintrin.h>

#include "small_gemm_kernels.hpp"

// GCC 12 flags the deliberately undefined upper lanes inside its own extract intrinsics.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace gradchain::small::avx512 {
namespace {

struct ZD {
  using T = double;
  using V = __m512d;
  using M = __mmask8;
  static constexpr int W = 8, kWide = 4, kWideRows = 4, kDotRows = 4;
  static constexpr bool kSums16 = false;
  static V zero() { return _mm512_setzero_pd(); }
  static V set1(T x) { return _mm512_set1_pd(x); }
  static V load(const T* p) { return _mm512_loadu_pd(p); }
  static V mload(const T* p, M m) { return _mm512_maskz_loadu_pd(m, p); }
  static void store(T* p, V v) { _mm512_storeu_pd(p, v); }
  static void mstore(T* p, M m, V v) { _mm512_mask_storeu_pd(p, m, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_pd(a, b); }
  // Lanes [0, valid).
  static M mask(int valid) {
    return valid <= 0 ? M(0) : valid >= W ? M(0xff) : M((1u << valid) - 1u);
  }
  static __m256d halves(V v) {
    return _mm256_add_pd(_mm512_castpd512_pd256(v), _mm512_extractf64x4_pd(v, 1));
  }
  template <int NR>
  static void store_sums(T* c, const V* acc, T alpha) {
    if constexpr (NR == 4) {
      const __m256d s =
          kernels::hsum4(halves(acc[0]), halves(acc[1]), halves(acc[2]), halves(acc[3]));
      _mm256_storeu_pd(c, _mm256_mul_pd(_mm256_set1_pd(alpha), s));
    } else {
      for (int s = 0; s < NR; ++s) c[s] = alpha * kernels::hsum(halves(acc[s]));
    }
  }
};

struct ZF {
  using T = float;
  using V = __m512;
  using M = __mmask16;
  static constexpr int W = 16, kWide = 4, kWideRows = 4, kDotRows = 4;
  static constexpr bool kSums16 = true;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(T x) { return _mm512_set1_ps(x); }
  static V load(const T* p) { return _mm512_loadu_ps(p); }
  static V mload(const T* p, M m) { return _mm512_maskz_loadu_ps(m, p); }
  static void store(T* p, V v) { _mm512_storeu_ps(p, v); }
  static void mstore(T* p, M m, V v) { _mm512_mask_storeu_ps(p, m, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static M mask(int valid) {
    return valid <= 0 ? M(0) : valid >= W ? M(0xffff) : M((1u << valid) - 1u);
  }
  static __m256 halves(V v) {
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return _mm256_add_ps(_mm512_castps512_ps256(v), hi);
  }
  // The 16 sums of a 4 x 4 tile by one tree of pairwise additions over all 16 vectors (fewer
  // shuffles than a tree per vector): halves, quarters, then pairs within the quarters.
  static void store_sums16(T* c, std::ptrdiff_t ldc, const V (*acc)[4], T alpha) {
    V x[8], y[4], z[2];
    for (int i = 0; i < 8; ++i) {  // the vectors v[4 s + r] = acc[r][s] in pairs
      const V a = acc[(2 * i) % 4][(2 * i) / 4], b = acc[(2 * i + 1) % 4][(2 * i + 1) / 4];
      x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xee));
    }
    for (int j = 0; j < 4; ++j)
      y[j] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * j], x[2 * j + 1], 0x88),
                           _mm512_shuffle_f32x4(x[2 * j], x[2 * j + 1], 0xdd));
    for (int k = 0; k < 2; ++k)
      z[k] = _mm512_add_ps(_mm512_shuffle_ps(y[2 * k], y[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm512_shuffle_ps(y[2 * k], y[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    // Quarter q: row q, columns 0..3.
    const V t =
        _mm512_mul_ps(_mm512_set1_ps(alpha),
                      _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_ps(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1))));
    _mm_storeu_ps(c, _mm512_castps512_ps128(t));
    _mm_storeu_ps(c + ldc, _mm512_extractf32x4_ps(t, 1));
    _mm_storeu_ps(c + 2 * ldc, _mm512_extractf32x4_ps(t, 2));
    _mm_storeu_ps(c + 3 * ldc, _mm512_extractf32x4_ps(t, 3));
  }
  template <int NR>
  static void store_sums(T* c, const V* acc, T alpha) {
    if constexpr (NR == 4) {
      const __m128 s =
          kernels::hsum4(halves(acc[0]), halves(acc[1]), halves(acc[2]), halves(acc[3]));
      _mm_storeu_ps(c, _mm_mul_ps(_mm_set1_ps(alpha), s));
    } else {
      for (int s = 0; s < NR; ++s) c[s] = alpha * kernels::hsum(halves(acc[s]));
    }
  }
};

}  // namespace

void gemm(bool ta, bool tb, int m, int n, int k, double alpha, const double* a, int lda,
          const double* b, int ldb, double* c, int ldc, Prefetch& pf) {
  kernels::run<ZD>(ta, tb, m, n, k, alpha, a, lda, b, ldb, c, ldc, pf);
}
void gemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda,
          const float* b, int ldb, float* c, int ldc, Prefetch& pf) {
  kernels::run<ZF>(ta, tb, m, n, k, alpha, a, lda, b, ldb, c, ldc, pf);
}

void transpose(int n, int k, const double* b, int ldb, double* bt, int ldbt) {
  kernels::transpose(n, k, b, ldb, bt, ldbt);
}
void transpose(int n, int k, const float* b, int ldb, float* bt, int ldbt) {
  kernels::transpose(n, k, b, ldb, bt, ldbt);
}

}  // namespace gradchain::small::avx512
#endif
