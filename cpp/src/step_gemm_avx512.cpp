// step::gemm's tiles for AVX-512F. This file alone is compiled with -mavx512f; it is called
// only on CPUs that have it, and shares no inline function with the rest of the core.
#include <immintrin.h>

#include "step_gemm_tiles.hpp"

namespace gradchain::step {
namespace {

struct F512 {
  using T = float;
  using V = __m512;
  using M = __mmask16;
  static constexpr int W = 16, MR = 8;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(T x) { return _mm512_set1_ps(x); }
  static M mask(int valid) {
    return valid >= W ? M(0xFFFF) : valid <= 0 ? M(0) : M((1u << valid) - 1);
  }
  static V load(const T* p, M m) { return _mm512_maskz_loadu_ps(m, p); }
  static V loadf(const T* p) { return _mm512_loadu_ps(p); }
  static void store(T* p, M m, V v) { _mm512_mask_storeu_ps(p, m, v); }
  static void storef(T* p, V v) { _mm512_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
};

struct D512 {
  using T = double;
  using V = __m512d;
  using M = __mmask8;
  static constexpr int W = 8, MR = 8;
  static V zero() { return _mm512_setzero_pd(); }
  static V set1(T x) { return _mm512_set1_pd(x); }
  static M mask(int valid) {
    return valid >= W ? M(0xFF) : valid <= 0 ? M(0) : M((1u << valid) - 1);
  }
  static V load(const T* p, M m) { return _mm512_maskz_loadu_pd(m, p); }
  static V loadf(const T* p) { return _mm512_loadu_pd(p); }
  static void store(T* p, M m, V v) { _mm512_mask_storeu_pd(p, m, v); }
  static void storef(T* p, V v) { _mm512_storeu_pd(p, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
};

}  // namespace

void gemm_avx512(int m, int n, int k, const float* a, std::ptrdiff_t lda, const float* b,
                 std::ptrdiff_t ldb, float* c, std::ptrdiff_t ldc) {
  tiles::kernel<F512>(m, n, k, a, lda, b, ldb, c, ldc);
}

void gemm_avx512(int m, int n, int k, const double* a, std::ptrdiff_t lda, const double* b,
                 std::ptrdiff_t ldb, double* c, std::ptrdiff_t ldc) {
  tiles::kernel<D512>(m, n, k, a, lda, b, ldb, c, ldc);
}

}  // namespace gradchain::step
