#include "gradchain/blas.hpp"

#include "gradchain/small_gemm.hpp"
#include "gradchain/system.hpp"

#include <cblas.h>
#include <lapacke.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace gradchain::blas {
namespace {
CBLAS_TRANSPOSE tr(Trans t) {
  return t == Trans::N ? CblasNoTrans : CblasTrans;
}

thread_local bool split_columns = false;
constexpr double kSplitWork = 1 << 20;

void raw(Trans ta, Trans tb, int m, int n, int k, double alpha, const double* a, int lda,
         const double* b, int ldb, double beta, double* c, int ldc) {
  if (beta == 0.0 && small::gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, c, ldc)) return;
  scipy_cblas_dgemm(CblasRowMajor, tr(ta), tr(tb), m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void raw(Trans ta, Trans tb, int m, int n, int k, float alpha, const float* a, int lda,
         const float* b, int ldb, float beta, float* c, int ldc) {
  if (beta == 0.0f && small::gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, c, ldc)) return;
  scipy_cblas_sgemm(CblasRowMajor, tr(ta), tr(tb), m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

template <class T>
void product(Trans ta, Trans tb, int m, int n, int k, T alpha, const T* a, int lda, const T* b,
             int ldb, T beta, T* c, int ldc) {
  if (!split_columns || n < 2 || double(m) * n * k < kSplitWork) {
    raw(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  const int n0 = n / 2;
  auto half = [&](int h) {
    const int j = h == 0 ? 0 : n0, w = h == 0 ? n0 : n - n0;
    const T* bh = tb == Trans::T ? b + static_cast<std::ptrdiff_t>(j) * ldb : b + j;
    raw(ta, tb, m, w, k, alpha, a, lda, bh, ldb, beta, c + j, ldc);
  };
#ifdef _OPENMP
  if (!omp_in_parallel() && max_threads() > 1) {
#pragma omp parallel num_threads(team_threads(2))
    {
      if (omp_get_num_threads() == 2) {
        half(omp_get_thread_num());
      } else {
        half(0);
        half(1);
      }
    }
    return;
  }
#endif
  half(0);
  half(1);
}
}  // namespace

SplitColumns::SplitColumns(bool on) : old_(split_columns) {
  split_columns = on;
}
SplitColumns::~SplitColumns() {
  split_columns = old_;
}

void gemm(Trans ta, Trans tb, int m, int n, int k, double alpha, const double* a, int lda,
          const double* b, int ldb, double beta, double* c, int ldc) {
  product(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void gemm(Trans ta, Trans tb, int m, int n, int k, float alpha, const float* a, int lda,
          const float* b, int ldb, float beta, float* c, int ldc) {
  product(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

int geqrf(int m, int n, double* a, int lda, double* tau) {
  return scipy_LAPACKE_dgeqrf(LAPACK_ROW_MAJOR, m, n, a, lda, tau);
}

int orgqr(int m, int n, int k, double* a, int lda, const double* tau) {
  return scipy_LAPACKE_dorgqr(LAPACK_ROW_MAJOR, m, n, k, a, lda, tau);
}

int geqrf_cm(int m, int n, double* a, int lda, double* tau) {
  return scipy_LAPACKE_dgeqrf(LAPACK_COL_MAJOR, m, n, a, lda, tau);
}

int orgqr_cm(int m, int n, int k, double* a, int lda, const double* tau) {
  return scipy_LAPACKE_dorgqr(LAPACK_COL_MAJOR, m, n, k, a, lda, tau);
}

int ormqr_left_cm(Trans trans, int m, int n, int k, const double* a, int lda, const double* tau,
                  double* c, int ldc) {
  return scipy_LAPACKE_dormqr(LAPACK_COL_MAJOR, 'L', trans == Trans::N ? 'N' : 'T', m, n, k, a, lda,
                              tau, c, ldc);
}

int eigvals(int n, double* a, int lda, double* wr, double* wi) {
  return scipy_LAPACKE_dgeev(LAPACK_ROW_MAJOR, 'N', 'N', n, a, lda, wr, wi, nullptr, 1, nullptr, 1);
}

int singular_values(int m, int n, double* a, int lda, double* s) {
  // A row-major m x n matrix is its transpose in column-major order, with the same
  // singular values: no copy needed.
  return scipy_LAPACKE_dgesdd(LAPACK_COL_MAJOR, 'N', n, m, a, lda, s, nullptr, 1, nullptr, 1);
}

void set_num_threads(int n) {
  scipy_openblas_set_num_threads(n);
}
int get_num_threads() {
  return scipy_openblas_get_num_threads();
}

}  // namespace gradchain::blas
