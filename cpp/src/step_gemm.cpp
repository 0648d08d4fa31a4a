#include "gradchain/step_gemm.hpp"
#include "gradchain/system.hpp"

#include <cmath>
#include <cstddef>

namespace gradchain::step {

#ifdef GRADCHAIN_STEP_SIMD
// step_gemm_avx512.cpp and step_gemm_avx2.cpp, each compiled for its instruction set.
void gemm_avx512(int m, int n, int k, const float* a, std::ptrdiff_t lda, const float* b,
                 std::ptrdiff_t ldb, float* c, std::ptrdiff_t ldc);
void gemm_avx512(int m, int n, int k, const double* a, std::ptrdiff_t lda, const double* b,
                 std::ptrdiff_t ldb, double* c, std::ptrdiff_t ldc);
void gemm_avx2(int m, int n, int k, const float* a, std::ptrdiff_t lda, const float* b,
               std::ptrdiff_t ldb, float* c, std::ptrdiff_t ldc);
void gemm_avx2(int m, int n, int k, const double* a, std::ptrdiff_t lda, const double* b,
               std::ptrdiff_t ldb, double* c, std::ptrdiff_t ldc);
#endif

namespace {

// CPUs without FMA: the same chains, one entry at a time.
template <class T>
void plain(int m, int n, int k, const T* a, std::ptrdiff_t lda, const T* b, std::ptrdiff_t ldb,
           T* c, std::ptrdiff_t ldc) {
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      T s = T(0);
      for (int p = 0; p < k; ++p) s = std::fma(a[i * lda + p], b[p * ldb + j], s);
      c[i * ldc + j] = s;
    }
}

enum class Isa { plain, avx2, avx512 };

Isa isa() {
#ifdef GRADCHAIN_STEP_SIMD
  switch (cpu_vector_isa()) {
    case VectorIsa::avx512:
      return Isa::avx512;
    case VectorIsa::avx2:
      return Isa::avx2;
    case VectorIsa::none:
      break;
  }
  return Isa::plain;
#else
  return Isa::plain;
#endif
}

template <class T>
void run(int m, int n, int k, const T* a, int lda, const T* b, int ldb, T* c, int ldc) {
  if (m <= 0 || n <= 0) return;
  switch (isa()) {
#ifdef GRADCHAIN_STEP_SIMD
    case Isa::avx512:
      gemm_avx512(m, n, k, a, lda, b, ldb, c, ldc);
      return;
    case Isa::avx2:
      gemm_avx2(m, n, k, a, lda, b, ldb, c, ldc);
      return;
#endif
    default:
      plain(m, n, k, a, lda, b, ldb, c, ldc);
  }
}

}  // namespace

void gemm(int m, int n, int k, const float* a, int lda, const float* b, int ldb, float* c,
          int ldc) {
  run(m, n, k, a, lda, b, ldb, c, ldc);
}

void gemm(int m, int n, int k, const double* a, int lda, const double* b, int ldb, double* c,
          int ldc) {
  run(m, n, k, a, lda, b, ldb, c, ldc);
}

}  // namespace gradchain::step
