#include "gradchain/vecmath.hpp"
#include "gradchain/system.hpp"

#include <algorithm>
#include <cmath>

#if defined(GRADCHAIN_HAVE_LIBMVEC) && defined(__x86_64__)
#include <immintrin.h>
#define GC_MVEC 1
#endif

namespace gradchain::vm {

#ifdef GC_MVEC
// glibc libmvec's vector ABI: _ZGV<isa>N<lanes>v_<name>; b = SSE2, d = AVX2.
extern "C" {
#define GC_DECL(name)                \
  __m128d _ZGVbN2v_##name(__m128d);  \
  __m256d _ZGVdN4v_##name(__m256d);  \
  __m128 _ZGVbN4v_##name##f(__m128); \
  __m256 _ZGVdN8v_##name##f(__m256);
GC_DECL(tanh)
GC_DECL(exp)
GC_DECL(erf)
GC_DECL(erfc)
GC_DECL(expm1)
GC_DECL(log1p)
GC_DECL(log)
GC_DECL(sin)
GC_DECL(cos)
#undef GC_DECL
}

namespace {
bool have_avx2() {
  return cpu_vector_isa() != VectorIsa::none;
}
}  // namespace

// Kernels: name##_d4 / name##_f8 run the AVX2 variants over whole vectors and return how
// far they got; the dispatchers add the SSE2 variants (CPUs without AVX2).
#define GC_KERNEL_D(name)                                                                        \
  namespace {                                                                                    \
  __attribute__((target("avx2,fma"))) std::size_t name##_d4(const double* x, double* y,          \
                                                            std::size_t n) {                     \
    std::size_t i = 0;                                                                           \
    for (; i + 4 <= n; i += 4) _mm256_storeu_pd(y + i, _ZGVdN4v_##name(_mm256_loadu_pd(x + i))); \
    return i;                                                                                    \
  }                                                                                              \
  }
#define GC_KERNEL_F(name)                                                             \
  namespace {                                                                         \
  __attribute__((target("avx2,fma"))) std::size_t name##_f8(const float* x, float* y, \
                                                            std::size_t n) {          \
    std::size_t i = 0;                                                                \
    for (; i + 8 <= n; i += 8)                                                        \
      _mm256_storeu_ps(y + i, _ZGVdN8v_##name##f(_mm256_loadu_ps(x + i)));            \
    return i;                                                                         \
  }                                                                                   \
  }
// The tail of fewer than a vector's lanes goes through the same kernel, padded: every
// element's result depends on its value alone, never on its position in the array or on
// how a caller split the array (between threads or batch halves).
#define GC_DISPATCH(name)                                                                     \
  void name(const double* x, double* y, std::size_t n) {                                      \
    std::size_t i = 0;                                                                        \
    if (have_avx2()) {                                                                        \
      i = name##_d4(x, y, n);                                                                 \
      if (i < n) {                                                                            \
        double bx[4] = {0, 0, 0, 0}, by[4];                                                   \
        std::copy(x + i, x + n, bx);                                                          \
        name##_d4(bx, by, 4);                                                                 \
        std::copy(by, by + (n - i), y + i);                                                   \
      }                                                                                       \
      return;                                                                                 \
    }                                                                                         \
    for (; i + 2 <= n; i += 2) _mm_storeu_pd(y + i, _ZGVbN2v_##name(_mm_loadu_pd(x + i)));    \
    if (i < n) {                                                                              \
      const double bx[2] = {x[i], 0};                                                         \
      double by[2];                                                                           \
      _mm_storeu_pd(by, _ZGVbN2v_##name(_mm_loadu_pd(bx)));                                   \
      y[i] = by[0];                                                                           \
    }                                                                                         \
  }                                                                                           \
  void name(const float* x, float* y, std::size_t n) {                                        \
    std::size_t i = 0;                                                                        \
    if (have_avx2()) {                                                                        \
      i = name##_f8(x, y, n);                                                                 \
      if (i < n) {                                                                            \
        float bx[8] = {0, 0, 0, 0, 0, 0, 0, 0}, by[8];                                        \
        std::copy(x + i, x + n, bx);                                                          \
        name##_f8(bx, by, 8);                                                                 \
        std::copy(by, by + (n - i), y + i);                                                   \
      }                                                                                       \
      return;                                                                                 \
    }                                                                                         \
    for (; i + 4 <= n; i += 4) _mm_storeu_ps(y + i, _ZGVbN4v_##name##f(_mm_loadu_ps(x + i))); \
    if (i < n) {                                                                              \
      float bx[4] = {0, 0, 0, 0}, by[4];                                                      \
      std::copy(x + i, x + n, bx);                                                            \
      _mm_storeu_ps(by, _ZGVbN4v_##name##f(_mm_loadu_ps(bx)));                                \
      std::copy(by, by + (n - i), y + i);                                                     \
    }                                                                                         \
  }
#define GC_DEFINE(name) GC_KERNEL_D(name) GC_KERNEL_F(name) GC_DISPATCH(name)

GC_DEFINE(exp)
GC_DEFINE(erf)
GC_DEFINE(erfc)
GC_DEFINE(expm1)
GC_DEFINE(log1p)
GC_DEFINE(log)
GC_DEFINE(sin)
GC_DEFINE(cos)

// Double tanh(x) = expm1(2x) / (expm1(2x) + 2): about twice as fast as libmvec's tanh,
// within 4 ulp, and free of cancellation near 0. |x| is capped where tanh rounds to +-1 (so that
// expm1 cannot overflow); min/max keep a NaN input as NaN.
namespace {
__attribute__((target("avx2,fma"))) std::size_t tanh_d4(const double* x, double* y, std::size_t n) {
  const __m256d hi = _mm256_set1_pd(20.0), lo = _mm256_set1_pd(-20.0), two = _mm256_set1_pd(2.0);
  std::size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    __m256d v = _mm256_max_pd(lo, _mm256_min_pd(hi, _mm256_loadu_pd(x + i)));
    const __m256d e = _ZGVdN4v_expm1(_mm256_add_pd(v, v));
    _mm256_storeu_pd(y + i, _mm256_div_pd(e, _mm256_add_pd(e, two)));
  }
  return i;
}
}  // namespace
// Single precision keeps libmvec's own tanhf: the expm1 form loses too much near +-1 there.
GC_KERNEL_F(tanh)
GC_DISPATCH(tanh)
#undef GC_DEFINE
#undef GC_DISPATCH
#undef GC_KERNEL_F
#undef GC_KERNEL_D

bool vectorized() {
  return true;
}

#else

#define GC_DEFINE(name)                                         \
  void name(const double* x, double* y, std::size_t n) {        \
    for (std::size_t i = 0; i < n; ++i) y[i] = std::name(x[i]); \
  }                                                             \
  void name(const float* x, float* y, std::size_t n) {          \
    for (std::size_t i = 0; i < n; ++i) y[i] = std::name(x[i]); \
  }
GC_DEFINE(tanh)
GC_DEFINE(exp)
GC_DEFINE(erf)
GC_DEFINE(erfc)
GC_DEFINE(expm1)
GC_DEFINE(log1p)
GC_DEFINE(log)
GC_DEFINE(sin)
GC_DEFINE(cos)
#undef GC_DEFINE

bool vectorized() {
  return false;
}
#endif

}  // namespace gradchain::vm
