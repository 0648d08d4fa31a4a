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
          const double* b, int ldb, double* c, int ldc) {
  kernels::run<ZD>(ta, tb, m, n, k, alpha, a, lda, b, ldb, c, ldc);
}
void gemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda,
          const float* b, int ldb, float* c, int ldc) {
  kernels::run<ZF>(ta, tb, m, n, k, alpha, a, lda, b, ldb, c, ldc);
}

}  // namespace gradchain::small::avx512
#endif
