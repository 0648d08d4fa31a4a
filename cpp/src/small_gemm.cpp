#include "gradchain/small_gemm.hpp"

#include <algorithm>
#include <cstddef>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define GC_SMALL_GEMM 1
#endif

namespace gradchain::small {

#ifdef GC_SMALL_GEMM
namespace {

// Products up to this many multiply-adds use the kernels (e.g. 64 x 64 x 128).
constexpr double kMaxWork = 1 << 19;

#define GC_AVX2 __attribute__((target("avx2,fma"), always_inline)) inline
#define GC_AVX2_FN __attribute__((target("avx2,fma")))

struct VD {
  using T = double;
  using V = __m256d;
  static constexpr int W = 4;
  GC_AVX2 static V zero() { return _mm256_setzero_pd(); }
  GC_AVX2 static V set1(T x) { return _mm256_set1_pd(x); }
  GC_AVX2 static V load(const T* p) { return _mm256_loadu_pd(p); }
  GC_AVX2 static V mload(const T* p, __m256i m) { return _mm256_maskload_pd(p, m); }
  GC_AVX2 static void store(T* p, V v) { _mm256_storeu_pd(p, v); }
  GC_AVX2 static void mstore(T* p, __m256i m, V v) { _mm256_maskstore_pd(p, m, v); }
  GC_AVX2 static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  GC_AVX2 static V mul(V a, V b) { return _mm256_mul_pd(a, b); }
  GC_AVX2 static T hsum(V v) {
    const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
  }
  // Lanes [0, valid) of a vector starting at element `offset` of a row.
  GC_AVX2 static __m256i mask(int valid) {
    const __m256i idx = _mm256_set_epi64x(3, 2, 1, 0);
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(valid), idx);
  }
};

struct VF {
  using T = float;
  using V = __m256;
  static constexpr int W = 8;
  GC_AVX2 static V zero() { return _mm256_setzero_ps(); }
  GC_AVX2 static V set1(T x) { return _mm256_set1_ps(x); }
  GC_AVX2 static V load(const T* p) { return _mm256_loadu_ps(p); }
  GC_AVX2 static V mload(const T* p, __m256i m) { return _mm256_maskload_ps(p, m); }
  GC_AVX2 static void store(T* p, V v) { _mm256_storeu_ps(p, v); }
  GC_AVX2 static void mstore(T* p, __m256i m, V v) { _mm256_maskstore_ps(p, m, v); }
  GC_AVX2 static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  GC_AVX2 static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  GC_AVX2 static T hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
  }
  GC_AVX2 static __m256i mask(int valid) {
    const __m256i idx = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(valid), idx);
  }
  // {hsum(a), hsum(b), hsum(c), hsum(d)}: the same additions of the same pairs as hsum,
  // four at a time (so the same numbers).
  GC_AVX2 static __m128 hsum4(V a, V b, V c, V d) {
    const V ab =
        _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
    const V cd =
        _mm256_add_ps(_mm256_permute2f128_ps(c, d, 0x20), _mm256_permute2f128_ps(c, d, 0x31));
    const V r = _mm256_add_ps(_mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                              _mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
    const V h = _mm256_add_ps(_mm256_shuffle_ps(r, r, _MM_SHUFFLE(2, 0, 2, 0)),
                              _mm256_shuffle_ps(r, r, _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm_unpacklo_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  }
};

// C[MR x 2W] tile of C = alpha * A B: A(i, p) = a[i * sai + p * sak], B row-major. Each step
// broadcasts one A entry per row against two vectors of a B row.
template <class S, int MR, bool FULL>
GC_AVX2 void broadcast_tile(int k, const typename S::T* a, std::ptrdiff_t sai, std::ptrdiff_t sak,
                            const typename S::T* b, std::ptrdiff_t ldb, typename S::T* c,
                            std::ptrdiff_t ldc, typename S::T alpha, int nr) {
  using V = typename S::V;
  V c0[MR], c1[MR];
  for (int r = 0; r < MR; ++r) c0[r] = c1[r] = S::zero();
  __m256i m0 = _mm256_setzero_si256(), m1 = m0;
  if (!FULL) {
    m0 = S::mask(nr);
    m1 = S::mask(nr - S::W);
  }
  for (int p = 0; p < k; ++p) {
    const typename S::T* bp = b + p * ldb;
    const V b0 = FULL ? S::load(bp) : S::mload(bp, m0);
    const V b1 = FULL ? S::load(bp + S::W) : S::mload(bp + S::W, m1);
    for (int r = 0; r < MR; ++r) {
      const V av = S::set1(a[r * sai + p * sak]);
      c0[r] = S::fma(av, b0, c0[r]);
      c1[r] = S::fma(av, b1, c1[r]);
    }
  }
  const V al = S::set1(alpha);
  for (int r = 0; r < MR; ++r) {
    typename S::T* cr = c + r * ldc;
    if (FULL) {
      S::store(cr, S::mul(c0[r], al));
      S::store(cr + S::W, S::mul(c1[r], al));
    } else {
      S::mstore(cr, m0, S::mul(c0[r], al));
      S::mstore(cr + S::W, m1, S::mul(c1[r], al));
    }
  }
}

template <class S, int MR>
GC_AVX2 void broadcast_rows(int n, int k, const typename S::T* a, std::ptrdiff_t sai,
                            std::ptrdiff_t sak, const typename S::T* b, std::ptrdiff_t ldb,
                            typename S::T* c, std::ptrdiff_t ldc, typename S::T alpha) {
  constexpr int NR = 2 * S::W;
  int j = 0;
  for (; j + NR <= n; j += NR)
    broadcast_tile<S, MR, true>(k, a, sai, sak, b + j, ldb, c + j, ldc, alpha, NR);
  if (j < n) broadcast_tile<S, MR, false>(k, a, sai, sak, b + j, ldb, c + j, ldc, alpha, n - j);
}

template <class S>
GC_AVX2_FN void broadcast_gemm(int m, int n, int k, const typename S::T* a, std::ptrdiff_t sai,
                               std::ptrdiff_t sak, const typename S::T* b, std::ptrdiff_t ldb,
                               typename S::T* c, std::ptrdiff_t ldc, typename S::T alpha) {
  int i = 0;
  for (; i + 4 <= m; i += 4)
    broadcast_rows<S, 4>(n, k, a + i * sai, sai, sak, b, ldb, c + i * ldc, ldc, alpha);
  switch (m - i) {
    case 3:
      broadcast_rows<S, 3>(n, k, a + i * sai, sai, sak, b, ldb, c + i * ldc, ldc, alpha);
      break;
    case 2:
      broadcast_rows<S, 2>(n, k, a + i * sai, sai, sak, b, ldb, c + i * ldc, ldc, alpha);
      break;
    case 1:
      broadcast_rows<S, 1>(n, k, a + i * sai, sai, sak, b, ldb, c + i * ldc, ldc, alpha);
      break;
    default:
      break;
  }
}

// C[MR x NR] tile of C = alpha * A B^T with A, B row-major: MR x NR dot products over k.
template <class S, int MR, int NR>
GC_AVX2 void dot_tile(int k, const typename S::T* a, std::ptrdiff_t lda, const typename S::T* b,
                      std::ptrdiff_t ldb, typename S::T* c, std::ptrdiff_t ldc,
                      typename S::T alpha) {
  using V = typename S::V;
  V acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int s = 0; s < NR; ++s) acc[r][s] = S::zero();
  int p = 0;
  for (; p + S::W <= k; p += S::W) {
    V av[MR];
    for (int r = 0; r < MR; ++r) av[r] = S::load(a + r * lda + p);
    for (int s = 0; s < NR; ++s) {
      const V bv = S::load(b + s * ldb + p);
      for (int r = 0; r < MR; ++r) acc[r][s] = S::fma(av[r], bv, acc[r][s]);
    }
  }
  if (p < k) {
    const __m256i m = S::mask(k - p);
    V av[MR];
    for (int r = 0; r < MR; ++r) av[r] = S::mload(a + r * lda + p, m);
    for (int s = 0; s < NR; ++s) {
      const V bv = S::mload(b + s * ldb + p, m);
      for (int r = 0; r < MR; ++r) acc[r][s] = S::fma(av[r], bv, acc[r][s]);
    }
  }
  if constexpr (std::is_same_v<S, VF> && NR == 4) {
    const __m128 al = _mm_set1_ps(alpha);
    for (int r = 0; r < MR; ++r)
      _mm_storeu_ps(c + r * ldc,
                    _mm_mul_ps(al, S::hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3])));
  } else {
    for (int r = 0; r < MR; ++r)
      for (int s = 0; s < NR; ++s) c[r * ldc + s] = alpha * S::hsum(acc[r][s]);
  }
}

template <class S, int MR>
GC_AVX2 void dot_rows(int n, int k, const typename S::T* a, std::ptrdiff_t lda,
                      const typename S::T* b, std::ptrdiff_t ldb, typename S::T* c,
                      std::ptrdiff_t ldc, typename S::T alpha) {
  int j = 0;
  for (; j + 4 <= n; j += 4) dot_tile<S, MR, 4>(k, a, lda, b + j * ldb, ldb, c + j, ldc, alpha);
  switch (n - j) {
    case 3:
      dot_tile<S, MR, 3>(k, a, lda, b + j * ldb, ldb, c + j, ldc, alpha);
      break;
    case 2:
      dot_tile<S, MR, 2>(k, a, lda, b + j * ldb, ldb, c + j, ldc, alpha);
      break;
    case 1:
      dot_tile<S, MR, 1>(k, a, lda, b + j * ldb, ldb, c + j, ldc, alpha);
      break;
    default:
      break;
  }
}

template <class S>
GC_AVX2_FN void dot_gemm(int m, int n, int k, const typename S::T* a, std::ptrdiff_t lda,
                         const typename S::T* b, std::ptrdiff_t ldb, typename S::T* c,
                         std::ptrdiff_t ldc, typename S::T alpha) {
  int i = 0;
  for (; i + 3 <= m; i += 3)
    dot_rows<S, 3>(n, k, a + i * lda, lda, b, ldb, c + i * ldc, ldc, alpha);
  switch (m - i) {
    case 2:
      dot_rows<S, 2>(n, k, a + i * lda, lda, b, ldb, c + i * ldc, ldc, alpha);
      break;
    case 1:
      dot_rows<S, 1>(n, k, a + i * lda, lda, b, ldb, c + i * ldc, ldc, alpha);
      break;
    default:
      break;
  }
}

bool usable(int m, int n, int k, blas::Trans ta, blas::Trans tb) {
  static const bool cpu = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (!cpu || m <= 0 || n <= 0 || k <= 0) return false;
  if (double(m) * double(n) * double(k) > kMaxWork) return false;
  return tb == blas::Trans::N || ta == blas::Trans::N;
}

template <class S>
bool run(blas::Trans ta, blas::Trans tb, int m, int n, int k, typename S::T alpha,
         const typename S::T* a, int lda, const typename S::T* b, int ldb, typename S::T* c,
         int ldc) {
  if (!usable(m, n, k, ta, tb)) return false;
  if (tb == blas::Trans::N) {
    const std::ptrdiff_t sai = ta == blas::Trans::N ? lda : 1;
    const std::ptrdiff_t sak = ta == blas::Trans::N ? 1 : lda;
    broadcast_gemm<S>(m, n, k, a, sai, sak, b, ldb, c, ldc, alpha);
  } else {
    dot_gemm<S>(m, n, k, a, lda, b, ldb, c, ldc, alpha);
  }
  return true;
}

}  // namespace

bool gemm(blas::Trans ta, blas::Trans tb, int m, int n, int k, double alpha, const double* a,
          int lda, const double* b, int ldb, double* c, int ldc) {
  return run<VD>(ta, tb, m, n, k, alpha, a, lda, b, ldb, c, ldc);
}

bool gemm(blas::Trans ta, blas::Trans tb, int m, int n, int k, float alpha, const float* a, int lda,
          const float* b, int ldb, float* c, int ldc) {
  return run<VF>(ta, tb, m, n, k, alpha, a, lda, b, ldb, c, ldc);
}

#else

bool gemm(blas::Trans, blas::Trans, int, int, int, double, const double*, int, const double*, int,
          double*, int) {
  return false;
}
bool gemm(blas::Trans, blas::Trans, int, int, int, float, const float*, int, const float*, int,
          float*, int) {
  return false;
}

#endif

}  // namespace gradchain::small
