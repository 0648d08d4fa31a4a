#include "gradchain/vecmath.hpp"

#include <cmath>

#if defined(GRADCHAIN_HAVE_LIBMVEC) && defined(__x86_64__)
#include <immintrin.h>
#define GC_MVEC 1
#endif

namespace gradchain::vm {

#ifdef GC_MVEC
// glibc libmvec's vector ABI: _ZGV<isa>N<lanes>v_<name>; b = SSE2, d = AVX2.
extern "C" {
#define GC_DECL(name)                                   \
  __m128d _ZGVbN2v_##name(__m128d);                     \
  __m256d _ZGVdN4v_##name(__m256d);                     \
  __m128 _ZGVbN4v_##name##f(__m128);                    \
  __m256 _ZGVdN8v_##name##f(__m256);
GC_DECL(tanh)
GC_DECL(exp)
GC_DECL(erf)
GC_DECL(expm1)
GC_DECL(log1p)
GC_DECL(log)
GC_DECL(sin)
GC_DECL(cos)
#undef GC_DECL
}

namespace {
bool have_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
}  // namespace

#define GC_DEFINE(name)                                                                    \
  namespace {                                                                              \
  __attribute__((target("avx2,fma"))) std::size_t name##_d4(const double* x, double* y,    \
                                                            std::size_t n) {              \
    std::size_t i = 0;                                                                     \
    for (; i + 4 <= n; i += 4) _mm256_storeu_pd(y + i, _ZGVdN4v_##name(_mm256_loadu_pd(x + i))); \
    return i;                                                                              \
  }                                                                                        \
  __attribute__((target("avx2,fma"))) std::size_t name##_f8(const float* x, float* y,      \
                                                            std::size_t n) {              \
    std::size_t i = 0;                                                                     \
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _ZGVdN8v_##name##f(_mm256_loadu_ps(x + i))); \
    return i;                                                                              \
  }                                                                                        \
  }                                                                                        \
  void name(const double* x, double* y, std::size_t n) {                                   \
    std::size_t i = 0;                                                                     \
    if (have_avx2()) {                                                                     \
      i = name##_d4(x, y, n);                                                              \
    } else {                                                                               \
      for (; i + 2 <= n; i += 2) _mm_storeu_pd(y + i, _ZGVbN2v_##name(_mm_loadu_pd(x + i))); \
    }                                                                                      \
    for (; i < n; ++i) y[i] = std::name(x[i]);                                             \
  }                                                                                        \
  void name(const float* x, float* y, std::size_t n) {                                     \
    std::size_t i = 0;                                                                     \
    if (have_avx2()) {                                                                     \
      i = name##_f8(x, y, n);                                                              \
    } else {                                                                               \
      for (; i + 4 <= n; i += 4) _mm_storeu_ps(y + i, _ZGVbN4v_##name##f(_mm_loadu_ps(x + i))); \
    }                                                                                      \
    for (; i < n; ++i) y[i] = std::name(x[i]);                                             \
  }

GC_DEFINE(exp)
GC_DEFINE(erf)
GC_DEFINE(expm1)
GC_DEFINE(log1p)
GC_DEFINE(log)
GC_DEFINE(sin)
GC_DEFINE(cos)
#undef GC_DEFINE

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
__attribute__((target("avx2,fma"))) std::size_t tanhf_f8(const float* x, float* y, std::size_t n) {
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _ZGVdN8v_tanhf(_mm256_loadu_ps(x + i)));
  return i;
}
}  // namespace

void tanh(const double* x, double* y, std::size_t n) {
  std::size_t i = 0;
  if (have_avx2()) {
    i = tanh_d4(x, y, n);
  } else {
    for (; i + 2 <= n; i += 2) _mm_storeu_pd(y + i, _ZGVbN2v_tanh(_mm_loadu_pd(x + i)));
  }
  for (; i < n; ++i) y[i] = std::tanh(x[i]);
}

void tanh(const float* x, float* y, std::size_t n) {
  // libmvec's own tanhf: the expm1 form loses too much near +-1 in single precision.
  std::size_t i = 0;
  if (have_avx2()) {
    i = tanhf_f8(x, y, n);
  } else {
    for (; i + 4 <= n; i += 4) _mm_storeu_ps(y + i, _ZGVbN4v_tanhf(_mm_loadu_ps(x + i)));
  }
  for (; i < n; ++i) y[i] = std::tanh(x[i]);
}

bool vectorized() { return true; }

#else

#define GC_DEFINE(name)                                                                      \
  void name(const double* x, double* y, std::size_t n) {                                     \
    for (std::size_t i = 0; i < n; ++i) y[i] = std::name(x[i]);                              \
  }                                                                                          \
  void name(const float* x, float* y, std::size_t n) {                                       \
    for (std::size_t i = 0; i < n; ++i) y[i] = std::name(x[i]);                              \
  }
GC_DEFINE(tanh)
GC_DEFINE(exp)
GC_DEFINE(erf)
GC_DEFINE(expm1)
GC_DEFINE(log1p)
GC_DEFINE(log)
GC_DEFINE(sin)
GC_DEFINE(cos)
#undef GC_DEFINE

bool vectorized() { return false; }
#endif

}  // namespace gradchain::vm
