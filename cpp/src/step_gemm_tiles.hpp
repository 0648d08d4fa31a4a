// The tiles of step::gemm, generic over a vector type S (its lane count W, row block MR,
// loads, stores and fused multiply-add). Included by one file per instruction set, each
// compiled for it: nothing here is visible outside those files.
#pragma once

#include <cstddef>

namespace gradchain::step::tiles {

// One MR x (2 W) tile of C: each step of p broadcasts one A entry per row against two
// vectors of B's row p. FULL: all 2 W columns present (no masks).
template <class S, int MR, bool FULL>
inline void tile(int k, const typename S::T* a, std::ptrdiff_t lda, const typename S::T* b,
                 std::ptrdiff_t ldb, typename S::T* c, std::ptrdiff_t ldc, int cols) {
  using V = typename S::V;
  V c0[MR], c1[MR];
  for (int r = 0; r < MR; ++r) c0[r] = c1[r] = S::zero();
  const typename S::M m0 = S::mask(cols), m1 = S::mask(cols - S::W);
  for (int p = 0; p < k; ++p) {
    const typename S::T* bp = b + p * ldb;
    const V b0 = FULL ? S::loadf(bp) : S::load(bp, m0);
    const V b1 = FULL ? S::loadf(bp + S::W) : S::load(bp + S::W, m1);
    for (int r = 0; r < MR; ++r) {
      const V av = S::set1(a[r * lda + p]);
      c0[r] = S::fma(av, b0, c0[r]);
      c1[r] = S::fma(av, b1, c1[r]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    typename S::T* cr = c + r * ldc;
    if (FULL) {
      S::storef(cr, c0[r]);
      S::storef(cr + S::W, c1[r]);
    } else {
      S::store(cr, m0, c0[r]);
      S::store(cr + S::W, m1, c1[r]);
    }
  }
}

// Columns outermost, so that a panel of B (k x 2 W) serves every block of rows while it is
// in the cache.
template <class S, int MR>
inline void rows(int n, int k, const typename S::T* a, std::ptrdiff_t lda, const typename S::T* b,
                 std::ptrdiff_t ldb, typename S::T* c, std::ptrdiff_t ldc, int j) {
  if (j + 2 * S::W <= n)
    tile<S, MR, true>(k, a, lda, b + j, ldb, c + j, ldc, 2 * S::W);
  else
    tile<S, MR, false>(k, a, lda, b + j, ldb, c + j, ldc, n - j);
}

template <class S>
inline void kernel(int m, int n, int k, const typename S::T* a, std::ptrdiff_t lda,
                   const typename S::T* b, std::ptrdiff_t ldb, typename S::T* c,
                   std::ptrdiff_t ldc) {
  constexpr int MR = S::MR;
  for (int j = 0; j < n; j += 2 * S::W) {
    int i = 0;
    for (; i + MR <= m; i += MR) rows<S, MR>(n, k, a + i * lda, lda, b, ldb, c + i * ldc, ldc, j);
    const typename S::T* ai = a + i * lda;
    typename S::T* ci = c + i * ldc;
    switch (m - i) {
      case 7:
        rows<S, 7>(n, k, ai, lda, b, ldb, ci, ldc, j);
        break;
      case 6:
        rows<S, 6>(n, k, ai, lda, b, ldb, ci, ldc, j);
        break;
      case 5:
        rows<S, 5>(n, k, ai, lda, b, ldb, ci, ldc, j);
        break;
      case 4:
        rows<S, 4>(n, k, ai, lda, b, ldb, ci, ldc, j);
        break;
      case 3:
        rows<S, 3>(n, k, ai, lda, b, ldb, ci, ldc, j);
        break;
      case 2:
        rows<S, 2>(n, k, ai, lda, b, ldb, ci, ldc, j);
        break;
      case 1:
        rows<S, 1>(n, k, ai, lda, b, ldb, ci, ldc, j);
        break;
      default:
        break;
    }
  }
}

}  // namespace gradchain::step::tiles
