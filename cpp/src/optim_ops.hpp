// The elementwise operations of torch.optim's single-tensor updates, rounded as torch's CPU
// kernels round them, and the one-time choice of an AVX2+FMA build of each update loop.
//
// torch's kernels fuse `add(other, alpha)`, `addcmul` and `lerp` into one fused
// multiply-add on CPUs with FMA (every x86-64 CPU since 2013); `addcdiv`, `mul` by a
// scalar, division by a scalar and `sqrt` round each operation. Only the operations torch
// fuses use fma here. A product that torch rounds in a kernel of its own before adding it
// (`buf.mul_(momentum)` before `addcdiv_`, AdamW's `param.mul_(1 - lr wd)`) is computed in
// a pass of its own over the array, so that no compiler can fuse it. Scalars are computed
// once per step in double, as Python computes them, then rounded to T as torch rounds a
// Python number for a tensor of T.
//
// An update is written once, as `Loop::at<S>(args, i)` over the elements [i, i + S::W),
// for S = Scalar<T> (one element) and, where the CPU has AVX2 and FMA, S = Avx<T> (a
// 256-bit vector); the two give the same numbers, element for element.
#pragma once

#include <cmath>
#include <cstddef>

#include "gradchain/system.hpp"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define GC_OPTIM_FMA_BUILD 1
#define GC_OPTIM_FMA_TARGET __attribute__((target("avx2,fma")))
#define GC_OPTIM_FMA_INLINE __attribute__((target("avx2,fma"))) inline
#endif
#if defined(__GNUC__) || defined(__clang__)
#define GC_OPTIM_INLINE __attribute__((always_inline)) inline
#else
#define GC_OPTIM_INLINE inline
#endif
#if defined(__GNUC__) && !defined(__clang__)
// The loop bodies return 256-bit vectors from functions that are all inlined into the AVX2
// build; GCC warns about the calling convention of calls that are never made.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace gradchain::optim_ops {

template <class T_>
struct Scalar {
  using T = T_;
  using V = T_;
  static constexpr std::size_t W = 1;
  static GC_OPTIM_INLINE V load(const T* p) { return *p; }
  static GC_OPTIM_INLINE void store(T* p, V v) { *p = v; }
  static GC_OPTIM_INLINE V set1(T x) { return x; }
  static GC_OPTIM_INLINE V fma(V a, V b, V c) { return std::fma(a, b, c); }
  static GC_OPTIM_INLINE V sqrt(V a) { return std::sqrt(a); }
  // torch.maximum: NaN wins.
  static GC_OPTIM_INLINE V maximum(V a, V b) { return (b > a || b != b) ? b : a; }
};

#ifdef GC_OPTIM_FMA_BUILD
template <class T>
struct Avx;

template <>
struct Avx<double> {
  using T = double;
  using V = __m256d;
  static constexpr std::size_t W = 4;
  static GC_OPTIM_FMA_INLINE V load(const T* p) { return _mm256_loadu_pd(p); }
  static GC_OPTIM_FMA_INLINE void store(T* p, V v) { _mm256_storeu_pd(p, v); }
  static GC_OPTIM_FMA_INLINE V set1(T x) { return _mm256_set1_pd(x); }
  static GC_OPTIM_FMA_INLINE V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static GC_OPTIM_FMA_INLINE V sqrt(V a) { return _mm256_sqrt_pd(a); }
  static GC_OPTIM_FMA_INLINE V maximum(V a, V b) {
    const V take_b =
        _mm256_or_pd(_mm256_cmp_pd(b, a, _CMP_GT_OQ), _mm256_cmp_pd(b, b, _CMP_UNORD_Q));
    return _mm256_blendv_pd(a, b, take_b);
  }
};

template <>
struct Avx<float> {
  using T = float;
  using V = __m256;
  static constexpr std::size_t W = 8;
  static GC_OPTIM_FMA_INLINE V load(const T* p) { return _mm256_loadu_ps(p); }
  static GC_OPTIM_FMA_INLINE void store(T* p, V v) { _mm256_storeu_ps(p, v); }
  static GC_OPTIM_FMA_INLINE V set1(T x) { return _mm256_set1_ps(x); }
  static GC_OPTIM_FMA_INLINE V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static GC_OPTIM_FMA_INLINE V sqrt(V a) { return _mm256_sqrt_ps(a); }
  static GC_OPTIM_FMA_INLINE V maximum(V a, V b) {
    const V take_b =
        _mm256_or_ps(_mm256_cmp_ps(b, a, _CMP_GT_OQ), _mm256_cmp_ps(b, b, _CMP_UNORD_Q));
    return _mm256_blendv_ps(a, b, take_b);
  }
};
#endif

// self + alpha * other (torch.add with alpha)
template <class S>
GC_OPTIM_INLINE typename S::V add(const typename S::V& self, typename S::T alpha,
                                  const typename S::V& other) {
  return S::fma(S::set1(alpha), other, self);
}

// self + value * a * b (torch.addcmul)
template <class S>
GC_OPTIM_INLINE typename S::V addcmul(const typename S::V& self, typename S::T value,
                                      const typename S::V& a, const typename S::V& b) {
  return S::fma(S::set1(value) * a, b, self);
}

// self + value * a / b (torch.addcdiv)
template <class S>
GC_OPTIM_INLINE typename S::V addcdiv(const typename S::V& self, typename S::T value,
                                      const typename S::V& a, const typename S::V& b) {
  return self + S::set1(value) * a / b;
}

// torch.lerp with a scalar weight: from `self` towards `end`, exact at both ends.
template <class T>
struct Lerp {
  explicit Lerp(double weight) : w(static_cast<T>(weight)), small(std::fabs(w) < T(0.5)) {}
  template <class S>
  GC_OPTIM_INLINE typename S::V at(const typename S::V& self, const typename S::V& end) const {
    const typename S::V d = end - self;
    return small ? S::fma(S::set1(w), d, self) : S::fma(S::set1(w - T(1)), d, end);
  }
  T w;
  bool small;
};

inline bool cpu_has_fma() {
#ifdef GC_OPTIM_FMA_BUILD
  return cpu_vector_isa() != VectorIsa::none;
#else
  return false;
#endif
}

// Loop::at<S>(args, i) for every element of args.n, in the AVX2+FMA build where the CPU has
// it. Args is copied to a local, so that stores through its arrays cannot alias it.
#ifdef GC_OPTIM_FMA_BUILD
template <class Loop, class T, class Args>
GC_OPTIM_FMA_TARGET void run_fma(const Args& args) {
  const Args a = args;
  std::size_t i = 0;
  for (; i + Avx<T>::W <= a.n; i += Avx<T>::W) Loop::template at<Avx<T>>(a, i);
  for (; i < a.n; ++i) Loop::template at<Scalar<T>>(a, i);
}
#endif

template <class Loop, class T, class Args>
void run(const Args& args) {
#ifdef GC_OPTIM_FMA_BUILD
  if (cpu_has_fma()) {
    run_fma<Loop, T>(args);
    return;
  }
#endif
  const Args a = args;
  for (std::size_t i = 0; i < a.n; ++i) Loop::template at<Scalar<T>>(a, i);
}

}  // namespace gradchain::optim_ops
