// step::gemm's tiles for AVX2 and FMA. This file alone is compiled with -mavx2 -mfma; it is called
// only on CPUs that have it, and shares no inline function with the rest of the core.
#include <immintrin.h>

#include "step_gemm_tiles.hpp"

namespace gradchain::step {
namespace {

struct F256 {
  using T = float;
  using V = __m256;
  using M = __m256i;
  static constexpr int W = 8, MR = 6;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(T x) { return _mm256_set1_ps(x); }
  static M mask(int valid) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(valid), _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0));
  }
  static V load(const T* p, M m) { return _mm256_maskload_ps(p, m); }
  static V loadf(const T* p) { return _mm256_loadu_ps(p); }
  static void store(T* p, M m, V v) { _mm256_maskstore_ps(p, m, v); }
  static void storef(T* p, V v) { _mm256_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
};

struct D256 {
  using T = double;
  using V = __m256d;
  using M = __m256i;
  static constexpr int W = 4, MR = 6;
  static V zero() { return _mm256_setzero_pd(); }
  static V set1(T x) { return _mm256_set1_pd(x); }
  static M mask(int valid) {
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(valid), _mm256_set_epi64x(3, 2, 1, 0));
  }
  static V load(const T* p, M m) { return _mm256_maskload_pd(p, m); }
  static V loadf(const T* p) { return _mm256_loadu_pd(p); }
  static void store(T* p, M m, V v) { _mm256_maskstore_pd(p, m, v); }
  static void storef(T* p, V v) { _mm256_storeu_pd(p, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
};

}  // namespace

void gemm_avx2(int m, int n, int k, const float* a, std::ptrdiff_t lda, const float* b,
               std::ptrdiff_t ldb, float* c, std::ptrdiff_t ldc) {
  tiles::kernel<F256>(m, n, k, a, lda, b, ldb, c, ldc);
}

void gemm_avx2(int m, int n, int k, const double* a, std::ptrdiff_t lda, const double* b,
               std::ptrdiff_t ldb, double* c, std::ptrdiff_t ldc) {
  tiles::kernel<D256>(m, n, k, a, lda, b, ldb, c, ldc);
}

}  // namespace gradchain::step
