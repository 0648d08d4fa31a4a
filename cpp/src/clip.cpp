#include "gradchain/clip.hpp"

#include <algorithm>
#include <atomic>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <type_traits>

#include "gradchain/parallel.hpp"
#include "gradchain/system.hpp"

namespace gradchain::clip {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Reductions work on fixed blocks whose partial results are combined in block order,
// so a norm does not depend on the number of threads.
constexpr std::size_t kBlock = kParallelGrain;

// The canceller of the norm being taken on this thread (the entry points set it), so that
// the reductions over gigabytes can stop on Ctrl-C.
thread_local Canceller* t_cancel = nullptr;

class ScopedCancel {
 public:
  explicit ScopedCancel(Canceller* c) : old_(t_cancel) { t_cancel = c; }
  ~ScopedCancel() { t_cancel = old_; }
  ScopedCancel(const ScopedCancel&) = delete;
  ScopedCancel& operator=(const ScopedCancel&) = delete;

 private:
  Canceller* old_;
};

template <class R, class F, class C>
R reduce_blocks(std::size_t n, R init, F block, C combine) {
  if (n <= kBlock) return combine(init, block(std::size_t{0}, n));
  const std::size_t nb = (n + kBlock - 1) / kBlock;
  std::vector<R> part(nb, init);
  const auto nbi = static_cast<std::int64_t>(nb);
  Canceller* const cancel = t_cancel;
  std::atomic<bool> stop{false};
#ifdef _OPENMP
#pragma omp parallel for schedule(static) \
    num_threads(team_threads(n >= 2 * kParallelGrain ? max_threads() : 1))
#endif
  for (std::int64_t k = 0; k < nbi; ++k) {
    if (stop.load(std::memory_order_relaxed)) continue;
    if (cancel && (k & 31) == 0) {
      try {
        cancel->poll();
      } catch (const Interrupted&) {
        stop.store(true);
        continue;
      }
    }
    const std::size_t b = static_cast<std::size_t>(k) * kBlock;
    part[static_cast<std::size_t>(k)] = block(b, std::min(n, b + kBlock));
  }
  if (stop.load()) throw Interrupted();
  R r = init;
  for (const R& x : part) r = combine(r, x);
  return r;
}

// Sum of f(x[i]) in double; four accumulators for accuracy and pipelining.
template <class T, class F>
double sum_of(const T* x, std::size_t n, F f) {
  auto block = [x, f](std::size_t b, std::size_t e) {
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    std::size_t i = b;
    for (; i + 4 <= e; i += 4) {
      s0 += f(static_cast<double>(x[i]));
      s1 += f(static_cast<double>(x[i + 1]));
      s2 += f(static_cast<double>(x[i + 2]));
      s3 += f(static_cast<double>(x[i + 3]));
    }
    for (; i < e; ++i) s0 += f(static_cast<double>(x[i]));
    return (s0 + s1) + (s2 + s3);
  };
  return reduce_blocks(n, 0.0, block, [](double a, double b) { return a + b; });
}

struct MaxAbs {
  double value = 0.0;
  bool nan = false;
};

// std::max would drop NaN; torch's inf-norm propagates it, so track it separately.
template <class T>
MaxAbs max_abs(const T* x, std::size_t n) {
  auto block = [x](std::size_t b, std::size_t e) {
    MaxAbs r;
    for (std::size_t i = b; i < e; ++i) {
      const double a = std::fabs(static_cast<double>(x[i]));
      if (a > r.value) r.value = a;
      if (std::isnan(a)) r.nan = true;
    }
    return r;
  };
  return reduce_blocks(n, MaxAbs{}, block, [](MaxAbs a, MaxAbs b) {
    return MaxAbs{std::max(a.value, b.value), a.nan || b.nan};
  });
}

template <class T>
double norm_inf(const T* x, std::size_t n) {
  const MaxAbs m = max_abs(x, n);
  return m.nan ? kNaN : m.value;
}

template <class T>
double norm_2(const T* x, std::size_t n) {
  struct Acc {
    double ss = 0.0;
    double max = 0.0;
  };
  auto block = [x](std::size_t b, std::size_t e) {
    double s0 = 0.0, s1 = 0.0, m = 0.0;
    std::size_t i = b;
    for (; i + 2 <= e; i += 2) {
      const double a = static_cast<double>(x[i]), c = static_cast<double>(x[i + 1]);
      s0 += a * a;
      s1 += c * c;
      m = std::max(m, std::max(std::fabs(a), std::fabs(c)));
    }
    for (; i < e; ++i) {
      const double a = static_cast<double>(x[i]);
      s0 += a * a;
      m = std::max(m, std::fabs(a));
    }
    return Acc{s0 + s1, m};
  };
  const Acc acc = reduce_blocks(
      n, Acc{}, block, [](Acc a, Acc b) { return Acc{a.ss + b.ss, std::max(a.max, b.max)}; });
  // A sum of squares is NaN only if an input is (inf + inf stays inf).
  if (std::isnan(acc.ss)) return kNaN;
  if (std::isinf(acc.max)) return kInf;
  if (acc.max == 0.0) return 0.0;
  // In this range no square that matters can overflow or underflow, so the plain sum
  // is exact enough (float data always lands here).
  if (acc.max >= 0x1p-400 && acc.max <= 0x1p400) return std::sqrt(acc.ss);
  // Rescale by a power of two (exact) so the largest entry is about 1.
  int e = 0;
  std::frexp(acc.max, &e);
  const int k = std::min(-e, 1023);
  const double s = std::ldexp(1.0, k);
  const double ss = sum_of(x, n, [s](double v) {
    const double t = v * s;
    return t * t;
  });
  return std::ldexp(std::sqrt(ss), -k);
}

template <class T>
double norm_p(const T* x, std::size_t n, double p) {
  if (p == 1.0) return sum_of(x, n, [](double v) { return std::fabs(v); });
  if (p < 1.0) {
    // |x|^p <= max(|x|, 1) here: no spurious overflow, and tiny entries keep their
    // (relatively large) contribution, which dividing by the max would flush to 0.
    const double s = sum_of(x, n, [p](double v) { return std::pow(std::fabs(v), p); });
    return std::pow(s, 1.0 / p);
  }
  const MaxAbs m = max_abs(x, n);
  if (m.nan) return kNaN;
  if (std::isinf(m.value)) return kInf;
  if (m.value == 0.0) return 0.0;
  const double mx = m.value;
  const double s = sum_of(x, n, [mx, p](double v) { return std::pow(std::fabs(v) / mx, p); });
  return mx * std::pow(s, 1.0 / p);
}

template <class T>
double array_norm_impl(const T* x, std::size_t n, double p) {
  check_norm_type(p);
  if (std::isinf(p)) return norm_inf(x, n);
  if (p == 2.0) return norm_2(x, n);
  return norm_p(x, n, p);
}

// double -> T with IEEE rounding; spelled out for float because a cast of a value
// beyond FLT_MAX is undefined behaviour in C++.
template <class T>
T to(double v) {
  if constexpr (std::is_same_v<T, float>) {
    constexpr double kRoundsToInf = 0x1.ffffffp127;  // FLT_MAX + half an ulp
    if (v >= kRoundsToInf) return std::numeric_limits<float>::infinity();
    if (v <= -kRoundsToInf) return -std::numeric_limits<float>::infinity();
  }
  return static_cast<T>(v);
}

template <class T>
void scale_impl(T* x, std::size_t n, double coef) {
  const T c = to<T>(coef);
  parallel_chunks(n, [x, c](std::size_t b, std::size_t e) {
    for (std::size_t i = b; i < e; ++i) x[i] *= c;
  });
}

void check_clip_value(double v) {
  if (std::isnan(v) || v < 0.0)
    throw std::invalid_argument("clip_value must be a non-negative number, got " +
                                format_double(v));
}

template <class T>
void clamp_impl(T* x, std::size_t n, double v) {
  check_clip_value(v);
  const T hi = to<T>(v), lo = -hi;
  // Comparisons with NaN are false, so NaN passes through as in torch.clamp.
  parallel_chunks(n, [x, lo, hi](std::size_t b, std::size_t e) {
    for (std::size_t i = b; i < e; ++i) x[i] = x[i] < lo ? lo : (x[i] > hi ? hi : x[i]);
  });
}

void check_max_norm(double max_norm) {
  if (std::isnan(max_norm) || max_norm < 0.0)
    throw std::invalid_argument("max_norm must be a non-negative number, got " +
                                format_double(max_norm));
}

}  // namespace

void check_norm_type(double p) {
  if (!(p > 0.0))
    throw std::invalid_argument("norm_type must be a positive number (p > 0) or inf, got " +
                                format_double(p));
}

double array_norm(const float* x, std::size_t n, double p) {
  return array_norm_impl(x, n, p);
}
double array_norm(const double* x, std::size_t n, double p) {
  return array_norm_impl(x, n, p);
}

double combine_norms(const std::vector<double>& norms, double p) {
  return array_norm(norms.data(), norms.size(), p);
}

double clip_coef(double total, double max_norm) {
  check_max_norm(max_norm);
  if (total < 0.0)
    throw std::invalid_argument("total_norm must be non-negative, got " + format_double(total));
  const double coef = max_norm / (total + kNormEps);
  return std::isnan(coef) ? coef : std::min(coef, 1.0);
}

void scale(float* x, std::size_t n, double coef) {
  scale_impl(x, n, coef);
}
void scale(double* x, std::size_t n, double coef) {
  scale_impl(x, n, coef);
}
void clamp(float* x, std::size_t n, double v) {
  clamp_impl(x, n, v);
}
void clamp(double* x, std::size_t n, double v) {
  clamp_impl(x, n, v);
}

double total_norm(const std::vector<Grad>& grads, double p, bool error_if_nonfinite,
                  Canceller* cancel) {
  check_norm_type(p);
  const ScopedCancel scoped(cancel);
  std::vector<double> norms;
  norms.reserve(grads.size());
  for (const Grad& g : grads) {
    norms.push_back(g.dtype == DType::float32
                        ? array_norm(static_cast<const float*>(g.data), g.size, p)
                        : array_norm(static_cast<const double*>(g.data), g.size, p));
  }
  const double total = combine_norms(norms, p);
  if (error_if_nonfinite && !std::isfinite(total)) {
    throw NonFiniteError(
        "clip", -1,
        "The total norm of order " + format_double(p) + " for gradients is non-finite (" +
            format_double(total) +
            "), so it cannot be clipped. To disable this error and scale the gradients by "
            "the non-finite norm anyway, set error_if_nonfinite=False");
  }
  return total;
}

double clip_grad_norm(const std::vector<Grad>& grads, double max_norm, double p,
                      bool error_if_nonfinite, Canceller* cancel) {
  check_max_norm(max_norm);
  const double total = total_norm(grads, p, error_if_nonfinite, cancel);
  const double coef = clip_coef(total, max_norm);
  for (const Grad& g : grads) {
    if (g.dtype == DType::float32)
      scale(static_cast<float*>(g.data), g.size, coef);
    else
      scale(static_cast<double*>(g.data), g.size, coef);
  }
  return total;
}

void clip_grad_value(const std::vector<Grad>& grads, double clip_value) {
  check_clip_value(clip_value);
  for (const Grad& g : grads) {
    if (g.dtype == DType::float32)
      clamp(static_cast<float*>(g.data), g.size, clip_value);
    else
      clamp(static_cast<double*>(g.data), g.size, clip_value);
  }
}

std::string format_double(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  const std::string sci(buf, r.ptr);
  const int exp10 = std::stoi(sci.substr(sci.find('e') + 1));
  // Python's repr switches to exponent notation outside [1e-4, 1e16).
  if (exp10 < -4 || exp10 >= 16) return sci;
  r = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::fixed);
  std::string fixed(buf, r.ptr);
  if (fixed.find('.') == std::string::npos) fixed += ".0";
  return fixed;
}

}  // namespace gradchain::clip
