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

#include "gradchain/optimizer.hpp"
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

// The running sums of a tracked update (see Optimizer::step_tracked), in double.
template <class S>
struct SumsOf {
  double mp = 0.0, md = 0.0, sp = 0.0, sd = 0.0;
  GC_OPTIM_INLINE void add(const typename S::V& before, const typename S::V& after) {
    const double a = static_cast<double>(after), d = a - static_cast<double>(before);
    const double fa = std::fabs(a), fd = std::fabs(d);
    mp = fa > mp ? fa : mp;
    md = fd > md ? fd : md;
    sp += a * a;
    sd += d * d;
  }
  void into(UpdateSums& u) const {
    u.max_p = u.max_p > mp || mp != mp ? u.max_p : mp;
    u.max_d = u.max_d > md || md != md ? u.max_d : md;
    u.sum_p2 += sp;
    u.sum_d2 += sd;
  }
};

#ifdef GC_OPTIM_FMA_BUILD
// Four double lanes per accumulator; a float vector goes in as its two halves.
template <class T>
struct AvxSums {
  // Two sets of accumulators, one per half of a float vector: the loop-carried chains
  // through them must stay shorter than the update's own divisions.
  __m256d mp[2], md[2], sp[2], sd[2];
  GC_OPTIM_FMA_INLINE AvxSums() {
    for (int h = 0; h < 2; ++h) mp[h] = md[h] = sp[h] = sd[h] = _mm256_setzero_pd();
  }
  GC_OPTIM_FMA_INLINE void add4(int h, __m256d b, __m256d a) {
    const __m256d d = _mm256_sub_pd(a, b),
                  abs = _mm256_castsi256_pd(_mm256_set1_epi64x(~(1LL << 63)));
    mp[h] = _mm256_max_pd(_mm256_and_pd(a, abs), mp[h]);  // |a| > mp ? |a| : mp, as SumsOf
    md[h] = _mm256_max_pd(_mm256_and_pd(d, abs), md[h]);
    sp[h] = _mm256_fmadd_pd(a, a, sp[h]);
    sd[h] = _mm256_fmadd_pd(d, d, sd[h]);
  }
  GC_OPTIM_FMA_INLINE void add(const typename Avx<T>::V& before, const typename Avx<T>::V& after) {
    if constexpr (sizeof(T) == 8) {
      add4(0, before, after);
    } else {
      add4(0, _mm256_cvtps_pd(_mm256_castps256_ps128(before)),
           _mm256_cvtps_pd(_mm256_castps256_ps128(after)));
      add4(1, _mm256_cvtps_pd(_mm256_extractf128_ps(before, 1)),
           _mm256_cvtps_pd(_mm256_extractf128_ps(after, 1)));
    }
  }
  GC_OPTIM_FMA_INLINE void into(UpdateSums& u) const {
    alignas(32) double v[4][4];
    for (int h = 0; h < 2; ++h) {
      _mm256_store_pd(v[0], mp[h]);
      _mm256_store_pd(v[1], md[h]);
      _mm256_store_pd(v[2], sp[h]);
      _mm256_store_pd(v[3], sd[h]);
      for (int l = 0; l < 4; ++l) {
        u.max_p = u.max_p > v[0][l] || v[0][l] != v[0][l] ? u.max_p : v[0][l];
        u.max_d = u.max_d > v[1][l] || v[1][l] != v[1][l] ? u.max_d : v[1][l];
        u.sum_p2 += v[2][l];
        u.sum_d2 += v[3][l];
      }
    }
  }
};
#endif

// Loop::at<S>(args, i) for every element of args.n, in the AVX2+FMA build where the CPU has
// it, with `track` (if not null): p as it was goes to track->before (unless an earlier pass
// of the update put it there), and the update's sums are taken from the values in
// registers, so that neither needs a pass of its own over the arrays. Args is copied to a
// local, so that stores through its arrays cannot alias it.
#ifdef GC_OPTIM_FMA_BUILD
template <class Loop, class T, class Args>
GC_OPTIM_FMA_TARGET void run_fma(const Args& args, UpdateTrack<T>* track) {
  const Args a = args;
  std::size_t i = 0;
  if (!track) {
    for (; i + Avx<T>::W <= a.n; i += Avx<T>::W) Loop::template at<Avx<T>>(a, i);
    for (; i < a.n; ++i) Loop::template at<Scalar<T>>(a, i);
    return;
  }
  T* const before = track->before;
  const bool copied = track->copied;
  AvxSums<T> vs;
  for (; i + Avx<T>::W <= a.n; i += Avx<T>::W) {
    const typename Avx<T>::V b = Avx<T>::load((copied ? before : a.p) + i);
    if (!copied) Avx<T>::store(before + i, b);
    Loop::template at<Avx<T>>(a, i);
    vs.add(b, Avx<T>::load(a.p + i));
  }
  SumsOf<Scalar<T>> ss;
  for (; i < a.n; ++i) {
    const T b = copied ? before[i] : a.p[i];
    before[i] = b;
    Loop::template at<Scalar<T>>(a, i);
    ss.add(b, a.p[i]);
  }
  vs.into(track->sums);
  ss.into(track->sums);
}
#endif

template <class Loop, class T, class Args>
void run(const Args& args, UpdateTrack<T>* track = nullptr) {
#ifdef GC_OPTIM_FMA_BUILD
  if (cpu_has_fma()) {
    run_fma<Loop, T>(args, track);
    return;
  }
#endif
  const Args a = args;
  if (!track) {
    for (std::size_t i = 0; i < a.n; ++i) Loop::template at<Scalar<T>>(a, i);
    return;
  }
  SumsOf<Scalar<T>> ss;
  for (std::size_t i = 0; i < a.n; ++i) {
    const T b = track->copied ? track->before[i] : a.p[i];
    track->before[i] = b;
    Loop::template at<Scalar<T>>(a, i);
    ss.add(b, a.p[i]);
  }
  ss.into(track->sums);
}

}  // namespace gradchain::optim_ops
