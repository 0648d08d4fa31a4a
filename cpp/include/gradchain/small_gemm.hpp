// Register-blocked AVX2 kernels for the small matrix products of narrow chains, where
// OpenBLAS spends much of its time packing operands. They read the operands where they
// lie (all fit in L1) and are used only when the CPU has AVX2 and FMA.
#pragma once

#include "gradchain/blas.hpp"

namespace gradchain::small {

// C = alpha * op(A) op(B), row-major, beta = 0. Returns false (and does nothing) when the
// product is too large for these kernels, op(B) = B^T with op(A) = A^T, or the CPU lacks
// AVX2/FMA: the caller then uses BLAS.
bool gemm(blas::Trans ta, blas::Trans tb, int m, int n, int k, double alpha, const double* a,
          int lda, const double* b, int ldb, double* c, int ldc);
bool gemm(blas::Trans ta, blas::Trans tb, int m, int n, int k, float alpha, const float* a, int lda,
          const float* b, int ldb, float* c, int ldc);

}  // namespace gradchain::small
