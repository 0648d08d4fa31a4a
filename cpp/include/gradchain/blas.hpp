// The one place that knows BLAS/LAPACK symbol names (scipy-openblas32: scipy_ prefix,
// 32-bit integers). Everything else calls these typed wrappers.
#pragma once

#include <cstddef>

namespace gradchain::blas {

enum class Trans { N, T };

// C = alpha * op(A) op(B) + beta * C, all row-major; op(A) is m x k, op(B) is k x n.
void gemm(Trans ta, Trans tb, int m, int n, int k, double alpha, const double* a, int lda,
          const double* b, int ldb, double beta, double* c, int ldc);
void gemm(Trans ta, Trans tb, int m, int n, int k, float alpha, const float* a, int lda,
          const float* b, int ldb, float beta, float* c, int ldc);

// In-place Householder QR of a row-major m x n matrix (LAPACK geqrf); tau has min(m,n).
// Returns LAPACK's info.
int geqrf(int m, int n, double* a, int lda, double* tau);
// Forms the first n columns of Q from geqrf's output (LAPACK orgqr), m >= n.
int orgqr(int m, int n, int k, double* a, int lda, const double* tau);
// The same on column-major matrices (no transposed copies), and C <- op(Q) C with Q the
// product of the k reflectors that geqrf_cm left in a (m x k): the pieces of a
// factorisation done a panel at a time.
int geqrf_cm(int m, int n, double* a, int lda, double* tau);
int orgqr_cm(int m, int n, int k, double* a, int lda, const double* tau);
int ormqr_left_cm(Trans trans, int m, int n, int k, const double* a, int lda, const double* tau,
                  double* c, int ldc);

// Eigenvalues (real and imaginary parts) of a general row-major n x n matrix, which is
// overwritten (LAPACK geev without vectors). Returns LAPACK's info.
int eigvals(int n, double* a, int lda, double* wr, double* wi);

// Singular values (descending, min(m,n) of them) of a row-major m x n matrix, which is
// overwritten (LAPACK gesdd without vectors). Returns LAPACK's info.
int singular_values(int m, int n, double* a, int lda, double* s);

void set_num_threads(int n);
int get_num_threads();

// Within its scope, every product of at least 2^20 multiply-adds that this thread asks for
// computes C's columns in two fixed halves, each a single-threaded product, on two of the
// core's threads where it has them (one after the other otherwise): its sums are then the
// same for any thread count, as they are not with OpenBLAS's own threads.
class SplitColumns {
 public:
  explicit SplitColumns(bool on);
  ~SplitColumns();
  SplitColumns(const SplitColumns&) = delete;
  SplitColumns& operator=(const SplitColumns&) = delete;

 private:
  bool old_;
};

}  // namespace gradchain::blas
