// The product a recurrent pass repeats at every step: a few rows of states (or of gate
// gradients) times the same recurrent weight, read where it lies (the weight, or a
// transposed copy made once per pass), so that no step copies or repacks it.
#pragma once

namespace gradchain::step {

// C = A B, row-major: A is m x k, B is k x n, C is m x n (overwritten). Each entry of C is one
// chain of fused multiply-adds over p = 0 .. k - 1 in order, starting from zero, whatever the
// instruction set or the split of C's rows and columns: the same numbers on every path and
// thread count (and the same as the small-product kernels' A B with alpha 1).
void gemm(int m, int n, int k, const float* a, int lda, const float* b, int ldb, float* c, int ldc);
void gemm(int m, int n, int k, const double* a, int lda, const double* b, int ldb, double* c,
          int ldc);

}  // namespace gradchain::step
