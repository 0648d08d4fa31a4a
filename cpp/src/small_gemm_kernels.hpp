// The register-blocked kernels of small_gemm, written once over a vector type S and
// compiled in one translation unit per instruction set (small_gemm_avx2.cpp,
// small_gemm_avx512.cpp, each with its own compiler flags). Everything here has internal
// linkage and uses intrinsics only: no inline function of a shared header is instantiated
// with the wider instruction set, where the linker could pick it for code that runs on
// every CPU.
//
// S provides T, V (a vector of W lanes), M (a lane mask), and zero, set1, load, mload,
// store, mstore, fma, mul, mask(valid) and store_sums(c, acc[NR], alpha) (c[s] =
// alpha * the sum of acc[s]'s lanes, for 1 <= NR <= 4); with kSums16 also
// store_sums16(c, ldc, acc[4][4], alpha), the same for a whole 4 x 4 tile at once.
#pragma once

#include <cstddef>

#include <immintrin.h>

#include "gradchain/small_gemm.hpp"

namespace gradchain::small::kernels {
namespace {

// One line of pf's ranges into cache per step of a product's inner loop: loads spread over
// the product overlap with its arithmetic.
// Products with nothing to prefetch run without the check.
struct NoPrefetch {};
inline __attribute__((always_inline)) void prefetch_step(NoPrefetch&) {}
inline __attribute__((always_inline)) void prefetch_step(Prefetch& pf) {
  for (int r = 0; r < 2; ++r)
    if (pf.p[r] < pf.end[r]) {
      __builtin_prefetch(pf.p[r], 0, 2);
      pf.p[r] += 64;
      return;
    }
}

// Horizontal sums of 256-bit vectors, in one fixed order: the halves, then the pairs.
inline __attribute__((always_inline)) double hsum(__m256d v) {
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}
inline __attribute__((always_inline)) float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}
// {hsum(a), hsum(b), hsum(c), hsum(d)}: the same additions of the same pairs as hsum,
// four at a time (so the same numbers).
inline __attribute__((always_inline)) __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab =
      _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
  const __m256 cd =
      _mm256_add_ps(_mm256_permute2f128_ps(c, d, 0x20), _mm256_permute2f128_ps(c, d, 0x31));
  const __m256 r = _mm256_add_ps(_mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 h = _mm256_add_ps(_mm256_shuffle_ps(r, r, _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm256_shuffle_ps(r, r, _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm_unpacklo_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
inline __attribute__((always_inline)) __m256d hsum4(__m256d a, __m256d b, __m256d c, __m256d d) {
  const __m256d ab = _mm256_hadd_pd(a, b), cd = _mm256_hadd_pd(c, d);
  return _mm256_add_pd(_mm256_permute2f128_pd(ab, cd, 0x20), _mm256_permute2f128_pd(ab, cd, 0x31));
}

// C[MR x NV*W] tile of C = alpha * A B: A(i, p) = a[i * sai + p * sak], B row-major, nr
// columns valid (all of them when FULL). Each step broadcasts one A entry per row against
// the NV vectors of a B row: every C entry is the sum over p in order, one fused
// multiply-add at a time, so the numbers are the same for any vector width.
template <class S, int MR, int NV, bool FULL, class P>
inline __attribute__((always_inline)) void broadcast_tile(
    int k, const typename S::T* a, std::ptrdiff_t sai, std::ptrdiff_t sak, const typename S::T* b,
    std::ptrdiff_t ldb, typename S::T* c, std::ptrdiff_t ldc, typename S::T alpha, int nr, P& pf) {
  using V = typename S::V;
  using M = typename S::M;
  V acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = S::zero();
  M m[NV];
  if (!FULL)
    for (int v = 0; v < NV; ++v) m[v] = S::mask(nr - v * S::W);
  for (int p = 0; p < k; ++p) {
    prefetch_step(pf);
    const typename S::T* bp = b + p * ldb;
    V bv[NV];
    for (int v = 0; v < NV; ++v)
      bv[v] = FULL ? S::load(bp + v * S::W) : S::mload(bp + v * S::W, m[v]);
    for (int r = 0; r < MR; ++r) {
      const V av = S::set1(a[r * sai + p * sak]);
      for (int v = 0; v < NV; ++v) acc[r][v] = S::fma(av, bv[v], acc[r][v]);
    }
  }
  const V al = S::set1(alpha);
  for (int r = 0; r < MR; ++r) {
    typename S::T* cr = c + r * ldc;
    for (int v = 0; v < NV; ++v) {
      if (FULL) {
        S::store(cr + v * S::W, S::mul(acc[r][v], al));
      } else {
        S::mstore(cr + v * S::W, m[v], S::mul(acc[r][v], al));
      }
    }
  }
}

// Rows [0, MR) of C, the columns in tiles of NV vectors (a narrower last tile).
template <class S, int MR, int NV, class P>
inline __attribute__((always_inline)) void broadcast_rows(int n, int k, const typename S::T* a,
                                                          std::ptrdiff_t sai, std::ptrdiff_t sak,
                                                          const typename S::T* b,
                                                          std::ptrdiff_t ldb, typename S::T* c,
                                                          std::ptrdiff_t ldc, typename S::T alpha,
                                                          P& pf) {
  constexpr int NR = NV * S::W;
  int j = 0;
  for (; j + NR <= n; j += NR)
    broadcast_tile<S, MR, NV, true>(k, a, sai, sak, b + j, ldb, c + j, ldc, alpha, NR, pf);
  if (j < n)
    broadcast_tile<S, MR, NV, false>(k, a, sai, sak, b + j, ldb, c + j, ldc, alpha, n - j, pf);
}

template <class S, int MR, int NV, class P>
void broadcast_rows_tail(int m, int n, int k, const typename S::T* a, std::ptrdiff_t sai,
                         std::ptrdiff_t sak, const typename S::T* b, std::ptrdiff_t ldb,
                         typename S::T* c, std::ptrdiff_t ldc, typename S::T alpha, P& pf);

template <class S, int MR, int NV, class P>
void broadcast_rows_of(int m, int n, int k, const typename S::T* a, std::ptrdiff_t sai,
                       std::ptrdiff_t sak, const typename S::T* b, std::ptrdiff_t ldb,
                       typename S::T* c, std::ptrdiff_t ldc, typename S::T alpha, P& pf) {
  int i = 0;
  for (; i + MR <= m; i += MR)
    broadcast_rows<S, MR, NV>(n, k, a + i * sai, sai, sak, b, ldb, c + i * ldc, ldc, alpha, pf);
  if constexpr (MR > 1) {
    if (m - i > 0)
      broadcast_rows_tail<S, MR - 1, NV>(m - i, n, k, a + i * sai, sai, sak, b, ldb, c + i * ldc,
                                         ldc, alpha, pf);
  }
}

// The last m < MR + 1 rows.
template <class S, int MR, int NV, class P>
void broadcast_rows_tail(int m, int n, int k, const typename S::T* a, std::ptrdiff_t sai,
                         std::ptrdiff_t sak, const typename S::T* b, std::ptrdiff_t ldb,
                         typename S::T* c, std::ptrdiff_t ldc, typename S::T alpha, P& pf) {
  if (m == MR) {
    broadcast_rows<S, MR, NV>(n, k, a, sai, sak, b, ldb, c, ldc, alpha, pf);
    return;
  }
  if constexpr (MR > 1)
    broadcast_rows_tail<S, MR - 1, NV>(m, n, k, a, sai, sak, b, ldb, c, ldc, alpha, pf);
}

// C = alpha * A B, the tile shape chosen by how many vectors a row of C takes: wide rows
// in tiles of S::kWideRows rows x S::kWide vectors, narrower ones in taller tiles.
template <class S, class P>
void broadcast_gemm(int m, int n, int k, const typename S::T* a, std::ptrdiff_t sai,
                    std::ptrdiff_t sak, const typename S::T* b, std::ptrdiff_t ldb,
                    typename S::T* c, std::ptrdiff_t ldc, typename S::T alpha, P& pf) {
  const int nv = (n + S::W - 1) / S::W;
  if (nv >= S::kWide) {
    broadcast_rows_of<S, S::kWideRows, S::kWide>(m, n, k, a, sai, sak, b, ldb, c, ldc, alpha, pf);
    return;
  }
  if constexpr (S::kWide > 3) {
    if (nv == 3) {
      broadcast_rows_of<S, 5, 3>(m, n, k, a, sai, sak, b, ldb, c, ldc, alpha, pf);
      return;
    }
  }
  if constexpr (S::kWide > 2) {
    if (nv == 2) {
      broadcast_rows_of<S, 8, 2>(m, n, k, a, sai, sak, b, ldb, c, ldc, alpha, pf);
      return;
    }
  }
  broadcast_rows_of<S, 8, 1>(m, n, k, a, sai, sak, b, ldb, c, ldc, alpha, pf);
}

// C[MR x NR] tile of C = alpha * A B^T with A, B row-major: MR x NR dot products over k.
template <class S, int MR, int NR, class P>
inline __attribute__((always_inline)) void dot_tile(int k, const typename S::T* a,
                                                    std::ptrdiff_t lda, const typename S::T* b,
                                                    std::ptrdiff_t ldb, typename S::T* c,
                                                    std::ptrdiff_t ldc, typename S::T alpha,
                                                    P& pf) {
  using V = typename S::V;
  V acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int s = 0; s < NR; ++s) acc[r][s] = S::zero();
  int p = 0;
  for (; p + S::W <= k; p += S::W) {
    prefetch_step(pf);
    V av[MR];
    for (int r = 0; r < MR; ++r) av[r] = S::load(a + r * lda + p);
    for (int s = 0; s < NR; ++s) {
      const V bv = S::load(b + s * ldb + p);
      for (int r = 0; r < MR; ++r) acc[r][s] = S::fma(av[r], bv, acc[r][s]);
    }
  }
  if (p < k) {
    const typename S::M m = S::mask(k - p);
    V av[MR];
    for (int r = 0; r < MR; ++r) av[r] = S::mload(a + r * lda + p, m);
    for (int s = 0; s < NR; ++s) {
      const V bv = S::mload(b + s * ldb + p, m);
      for (int r = 0; r < MR; ++r) acc[r][s] = S::fma(av[r], bv, acc[r][s]);
    }
  }
  if constexpr (S::kSums16 && MR == 4 && NR == 4) {
    S::store_sums16(c, ldc, acc, alpha);
  } else {
    for (int r = 0; r < MR; ++r) S::template store_sums<NR>(c + r * ldc, acc[r], alpha);
  }
}

// Columns [0, NR) of C: every row tile against the same NR rows of B, which stay in L1
// while A (the smaller operand in a layer's forward product) streams past them.
template <class S, int NR, class P>
void dot_cols(int m, int k, const typename S::T* a, std::ptrdiff_t lda, const typename S::T* b,
              std::ptrdiff_t ldb, typename S::T* c, std::ptrdiff_t ldc, typename S::T alpha,
              P& pf) {
  constexpr int MR = S::kDotRows;
  int i = 0;
  for (; i + MR <= m; i += MR)
    dot_tile<S, MR, NR>(k, a + i * lda, lda, b, ldb, c + i * ldc, ldc, alpha, pf);
  switch (m - i) {
    case 3:
      if constexpr (MR > 3)
        dot_tile<S, 3, NR>(k, a + i * lda, lda, b, ldb, c + i * ldc, ldc, alpha, pf);
      break;
    case 2:
      dot_tile<S, 2, NR>(k, a + i * lda, lda, b, ldb, c + i * ldc, ldc, alpha, pf);
      break;
    case 1:
      dot_tile<S, 1, NR>(k, a + i * lda, lda, b, ldb, c + i * ldc, ldc, alpha, pf);
      break;
    default:
      break;
  }
}

template <class S, class P>
void dot_gemm(int m, int n, int k, const typename S::T* a, std::ptrdiff_t lda,
              const typename S::T* b, std::ptrdiff_t ldb, typename S::T* c, std::ptrdiff_t ldc,
              typename S::T alpha, P& pf) {
  int j = 0;
  for (; j + 4 <= n; j += 4) dot_cols<S, 4>(m, k, a, lda, b + j * ldb, ldb, c + j, ldc, alpha, pf);
  switch (n - j) {
    case 3:
      dot_cols<S, 3>(m, k, a, lda, b + j * ldb, ldb, c + j, ldc, alpha, pf);
      break;
    case 2:
      dot_cols<S, 2>(m, k, a, lda, b + j * ldb, ldb, c + j, ldc, alpha, pf);
      break;
    case 1:
      dot_cols<S, 1>(m, k, a, lda, b + j * ldb, ldb, c + j, ldc, alpha, pf);
      break;
    default:
      break;
  }
}

// bt (k x n, leading dimension ldbt) = the transpose of b (n x k, leading dimension ldb). B is read
// a block of rows at a time, each row in order (as the prefetchers expect of memory that is not yet
// in cache), and every row of bt receives a whole cache line from a block: 8 rows of doubles (two 4
// x 4 transposes in registers) or 16 of floats (two 8 x 8).
inline __attribute__((always_inline)) void transpose4(const double* r, std::ptrdiff_t ldb,
                                                      double* o, std::ptrdiff_t n) {
  const __m256d r0 = _mm256_loadu_pd(r), r1 = _mm256_loadu_pd(r + ldb);
  const __m256d r2 = _mm256_loadu_pd(r + 2 * ldb), r3 = _mm256_loadu_pd(r + 3 * ldb);
  const __m256d t0 = _mm256_unpacklo_pd(r0, r1), t1 = _mm256_unpackhi_pd(r0, r1);
  const __m256d t2 = _mm256_unpacklo_pd(r2, r3), t3 = _mm256_unpackhi_pd(r2, r3);
  _mm256_storeu_pd(o, _mm256_permute2f128_pd(t0, t2, 0x20));
  _mm256_storeu_pd(o + n, _mm256_permute2f128_pd(t1, t3, 0x20));
  _mm256_storeu_pd(o + 2 * n, _mm256_permute2f128_pd(t0, t2, 0x31));
  _mm256_storeu_pd(o + 3 * n, _mm256_permute2f128_pd(t1, t3, 0x31));
}
inline __attribute__((always_inline)) void transpose8(const float* r, std::ptrdiff_t ldb, float* o,
                                                      std::ptrdiff_t n) {
  __m256 v[8], t[8];
  for (int s = 0; s < 8; ++s) v[s] = _mm256_loadu_ps(r + s * ldb);
  for (int s = 0; s < 8; s += 2) {
    t[s] = _mm256_unpacklo_ps(v[s], v[s + 1]);
    t[s + 1] = _mm256_unpackhi_ps(v[s], v[s + 1]);
  }
  for (int s = 0; s < 8; s += 4) {
    v[s] = _mm256_shuffle_ps(t[s], t[s + 2], _MM_SHUFFLE(1, 0, 1, 0));
    v[s + 1] = _mm256_shuffle_ps(t[s], t[s + 2], _MM_SHUFFLE(3, 2, 3, 2));
    v[s + 2] = _mm256_shuffle_ps(t[s + 1], t[s + 3], _MM_SHUFFLE(1, 0, 1, 0));
    v[s + 3] = _mm256_shuffle_ps(t[s + 1], t[s + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  // v[s] (s < 4): of rows 0..3, column s in lanes 0..3 and column s + 4 in lanes 4..7;
  // v[s + 4] the same of rows 4..7.
  for (int s = 0; s < 4; ++s) {
    _mm256_storeu_ps(o + s * n, _mm256_permute2f128_ps(v[s], v[s + 4], 0x20));
    _mm256_storeu_ps(o + (s + 4) * n, _mm256_permute2f128_ps(v[s], v[s + 4], 0x31));
  }
}
template <class T>
void transpose(int n, int k, const T* b, std::ptrdiff_t ldb, T* bt, std::ptrdiff_t ldbt) {
  constexpr int B = 32 / sizeof(T);  // a register block: 4 doubles or 8 floats
  const int nb = n - n % (2 * B), kb = k - k % B;
  for (int j = 0; j < nb; j += 2 * B) {
    const T* r = b + j * ldb;
    for (int p = 0; p < kb; p += B) {
      T* o = bt + std::ptrdiff_t(p) * ldbt + j;
      if constexpr (B == 4) {
        transpose4(r + p, ldb, o, ldbt);
        transpose4(r + 4 * ldb + p, ldb, o + 4, ldbt);
      } else {
        transpose8(r + p, ldb, o, ldbt);
        transpose8(r + 8 * ldb + p, ldb, o + 8, ldbt);
      }
    }
    for (int p = kb; p < k; ++p)
      for (int s = 0; s < 2 * B; ++s) bt[std::ptrdiff_t(p) * ldbt + j + s] = r[s * ldb + p];
  }
  for (int j = nb; j < n; ++j)
    for (int p = 0; p < k; ++p) bt[std::ptrdiff_t(p) * ldbt + j] = b[j * ldb + p];
}

// op(B) = B: broadcast form; op(B) = B^T (with op(A) = A): dot products. (small_gemm.cpp
// runs larger A B^T products as a transpose and the A B form.)
template <class S>
void run(bool ta, bool tb, int m, int n, int k, typename S::T alpha, const typename S::T* a,
         int lda, const typename S::T* b, int ldb, typename S::T* c, int ldc, Prefetch& pf) {
  if (tb) {
    if (pf.p[0] == pf.end[0]) {
      NoPrefetch none;
      dot_gemm<S>(m, n, k, a, lda, b, ldb, c, ldc, alpha, none);
    } else {
      dot_gemm<S>(m, n, k, a, lda, b, ldb, c, ldc, alpha, pf);
    }
    return;
  }
  const std::ptrdiff_t sai = ta ? 1 : lda;
  const std::ptrdiff_t sak = ta ? lda : 1;
  if (pf.p[0] == pf.end[0]) {
    NoPrefetch none;
    broadcast_gemm<S>(m, n, k, a, sai, sak, b, ldb, c, ldc, alpha, none);
  } else {
    broadcast_gemm<S>(m, n, k, a, sai, sak, b, ldb, c, ldc, alpha, pf);
  }
}

}  // namespace
}  // namespace gradchain::small::kernels
