// The small-product kernels for AVX2 and FMA (compiled with -mavx2 -mfma; called only on
// CPUs that have both).
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include "small_gemm_kernels.hpp"

namespace gradchain::small::avx2 {
namespace {

struct VD {
  using T = double;
  using V = __m256d;
  using M = __m256i;
  static constexpr int W = 4, kWide = 2, kWideRows = 4, kDotRows = 3;
  static constexpr bool kSums16 = false;
  static V zero() { return _mm256_setzero_pd(); }
  static V set1(T x) { return _mm256_set1_pd(x); }
  static V load(const T* p) { return _mm256_loadu_pd(p); }
  static V mload(const T* p, M m) { return _mm256_maskload_pd(p, m); }
  static void store(T* p, V v) { _mm256_storeu_pd(p, v); }
  static void mstore(T* p, M m, V v) { _mm256_maskstore_pd(p, m, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_pd(a, b); }
  // Lanes [0, valid).
  static M mask(int valid) {
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(valid), _mm256_set_epi64x(3, 2, 1, 0));
  }
  template <int NR>
  static void store_sums(T* c, const V* acc, T alpha) {
    for (int s = 0; s < NR; ++s) c[s] = alpha * kernels::hsum(acc[s]);
  }
};

struct VF {
  using T = float;
  using V = __m256;
  using M = __m256i;
  static constexpr int W = 8, kWide = 2, kWideRows = 4, kDotRows = 3;
  static constexpr bool kSums16 = false;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(T x) { return _mm256_set1_ps(x); }
  static V load(const T* p) { return _mm256_loadu_ps(p); }
  static V mload(const T* p, M m) { return _mm256_maskload_ps(p, m); }
  static void store(T* p, V v) { _mm256_storeu_ps(p, v); }
  static void mstore(T* p, M m, V v) { _mm256_maskstore_ps(p, m, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static M mask(int valid) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(valid), _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0));
  }
  template <int NR>
  static void store_sums(T* c, const V* acc, T alpha) {
    if constexpr (NR == 4) {
      _mm_storeu_ps(c,
                    _mm_mul_ps(_mm_set1_ps(alpha), kernels::hsum4(acc[0], acc[1], acc[2], acc[3])));
    } else {
      for (int s = 0; s < NR; ++s) c[s] = alpha * kernels::hsum(acc[s]);
    }
  }
};

}  // namespace

void gemm(bool ta, bool tb, int m, int n, int k, double alpha, const double* a, int lda,
          const double* b, int ldb, double* c, int ldc, Prefetch& pf) {
  kernels::run<VD>(ta, tb, m, n, k, alpha, a, lda, b, ldb, c, ldc, pf);
}
void gemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda,
          const float* b, int ldb, float* c, int ldc, Prefetch& pf) {
  kernels::run<VF>(ta, tb, m, n, k, alpha, a, lda, b, ldb, c, ldc, pf);
}

void transpose(int n, int k, const double* b, int ldb, double* bt, int ldbt) {
  kernels::transpose(n, k, b, ldb, bt, ldbt);
}
void transpose(int n, int k, const float* b, int ldb, float* bt, int ldbt) {
  kernels::transpose(n, k, b, ldb, bt, ldbt);
}

}  // namespace gradchain::small::avx2
#endif
