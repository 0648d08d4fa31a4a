// Arrays carried as (mantissa array, power-of-two exponent): x = x~ * 2^e. Scaling by a
// power of two is exact in binary floating point, so renormalising never rounds; the
// exponent lives in an int64 and the log10 of a norm stays finite at any depth.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

namespace gradchain {

inline constexpr double kLog10_2 = 0.30102999566398119521;

// One pass over an array: its largest |x|, whether every entry is finite, and its sum of
// squares, kept as sumsq * 4^sq_shift so that it neither overflows nor underflows whatever
// the entries' magnitude (a second, power-of-two-scaled pass runs only when max|x| lies
// outside [2^-400, 2^400], which float data never does).
struct Scan {
  double maxabs = 0.0;
  double sumsq = 0.0;
  int sq_shift = 0;
  bool finite = true;
};

Scan scan(const double* x, std::size_t n);
Scan scan(const float* x, std::size_t n);

// max|x| (NaN entries skipped, as scan() skips them) and whether every entry is finite:
// what rescaling needs, without the sum of squares. Taken on the bit patterns, so it is
// exact and costs a fraction of scan().
struct MaxAbs {
  double value = 0.0;
  bool finite = true;
};

MaxAbs max_abs(const double* x, std::size_t n);
MaxAbs max_abs(const float* x, std::size_t n);

// The binary exponent k with 2^k <= m < 2^(k+1); 0 for m == 0.
inline int exponent_of(double m) {
  return m > 0.0 ? std::ilogb(m) : 0;
}

// The exponent to rescale by (x *= 2^-k) when max|x| = m has left the band [2^-b, 2^b], b
// a fifth of T's exponent range (0 inside it). Inside the band nothing is rescaled, so a
// pass that stays in range computes exactly what a plain float pass computes, subnormals
// included; products of two arrays inside the band, and their squares, cannot overflow. A
// small array is scaled up to max ~ 1 (exact, and room to decay further); a large one only
// down to the band's top, so that its small entries keep as many bits as they can.
template <class T>
int rescale_exponent(double m) {
  constexpr int band = std::numeric_limits<T>::max_exponent / 5;
  const int k = exponent_of(m);
  if (k > band) return k - band;
  return k < -band ? k : 0;
}

// x *= 2^k, exactly (barring subnormal results). Factors beyond T's exponent range are
// applied in steps; a k so negative that every finite x underflows writes zeros.
template <class T>
void scale_pow2(T* x, std::size_t n, int k) {
  constexpr int emax = std::numeric_limits<T>::max_exponent;
  constexpr int step = emax - 2;
  if (k == 0) return;
  if (k < -(2 * emax + std::numeric_limits<T>::digits)) {
    for (std::size_t i = 0; i < n; ++i) x[i] = x[i] * T(0);  // keeps NaN and signs
    return;
  }
  while (k != 0) {
    const int s = k < -step ? -step : (k > step ? step : k);
    const T f = static_cast<T>(std::ldexp(1.0, s));
    for (std::size_t i = 0; i < n; ++i) x[i] *= f;
    k -= s;
  }
}

// Brings x * 2^e back into the band when max|x| has left it (exactly: e absorbs the shift).
// Non-finite or all-zero arrays are left as they are.
template <class T>
void into_band(T* x, std::size_t n, std::int64_t& e) {
  const MaxAbs s = max_abs(x, n);
  if (!s.finite) return;
  const int k = rescale_exponent<T>(s.value);
  if (k != 0) {
    scale_pow2(x, n, -k);
    e += k;
  }
}

// log10 of the 2-norm of x * 2^e given x's scan; -inf for a zero norm.
inline double log10_norm(const Scan& s, std::int64_t e) {
  if (s.sumsq == 0.0) return -std::numeric_limits<double>::infinity();
  return 0.5 * std::log10(s.sumsq) + (static_cast<double>(e) + s.sq_shift) * kLog10_2;
}

// log10(10^a + 10^b), stable.
inline double log10_add(double a, double b) {
  if (a == -std::numeric_limits<double>::infinity()) return b;
  if (b == -std::numeric_limits<double>::infinity()) return a;
  const double m = a > b ? a : b, d = -std::fabs(a - b);
  return m + std::log10(1.0 + std::pow(10.0, d));
}

// dst[i] = T(double(src[i]) * f): the loop of write_scaled, vectorized where the CPU allows.
void mul_pow2(const float* src, std::size_t n, double f, float* dst);
void mul_pow2(const double* src, std::size_t n, double f, double* dst);

// out[j] = the sum over rows r of x[r * cols + j], added in row order (a bias gradient):
// each sum held in a register, where adding row by row into out would wait on a store at
// every row.
void column_sums(const float* x, std::size_t rows, std::size_t cols, float* out);
void column_sums(const double* x, std::size_t rows, std::size_t cols, double* out);

// Multiplies every entry by coef * 2^(e + coef_exp), where the product is formed by one
// rounding in T. Where 2^k is a normal double, x * 2^k is the correctly rounded x 2^k that
// ldexp gives.
template <class T>
void write_scaled(const T* src, std::size_t n, std::int64_t e, double coef, T* dst,
                  std::int64_t coef_exp = 0) {
  constexpr int kNormal = std::numeric_limits<double>::max_exponent - 1;  // 2^1023
  if (coef == 1.0) {  // one rounding at most, and none for subnormal inputs scaled up
    const int k = static_cast<int>(std::clamp<std::int64_t>(e + coef_exp, -100000, 100000));
    if (k == 0) {
      if (dst != src) std::copy(src, src + n, dst);
    } else if (k >= 1 - kNormal && k <= kNormal) {
      mul_pow2(src, n, std::ldexp(1.0, k), dst);
    } else {
      for (std::size_t i = 0; i < n; ++i)
        dst[i] = static_cast<T>(std::ldexp(static_cast<double>(src[i]), k));
    }
    return;
  }
  int ce = 0;
  const double cm = coef == 0.0 ? 0.0 : std::frexp(coef, &ce);
  const std::int64_t total = e + ce + coef_exp;
  const int k = static_cast<int>(std::clamp<std::int64_t>(total, -100000, 100000));
  const double mt = static_cast<double>(static_cast<T>(cm));
  // The product is rounded once, at the entry's true scale, as torch's g * coef is: a
  // mantissa entry below T's normal numbers (one far below its array's largest) times mt
  // in T would first be rounded there, to the few digits a subnormal keeps. mt * 2^k is
  // exact where it is a normal double; a float times it is exact in double too.
  if (k >= 2 - kNormal && k <= kNormal) {
    mul_pow2(src, n, std::ldexp(mt, k), dst);
    return;
  }
  for (std::size_t i = 0; i < n; ++i)
    dst[i] = static_cast<T>(std::ldexp(static_cast<double>(src[i]) * mt, k));
}

// log10 of the p-norm (p > 0 or inf) of x * 2^e, given x's scan. The terms are taken at
// a power-of-two scale that puts max|x| near 1, so no p (0.5 or 1000) overflows or
// underflows a term that matters; below p = 1 tiny entries still count (|x|^p with small p
// is not negligible), so each term is formed in log2 there.
template <class T>
double log10_pnorm(const T* x, std::size_t n, const Scan& s, std::int64_t e, double p) {
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  if (p == 2.0) return log10_norm(s, e);
  if (!(s.maxabs > 0)) return s.maxabs == 0 ? kNegInf : s.maxabs;  // NaN stays NaN
  if (std::isinf(s.maxabs)) return s.maxabs;
  if (std::isinf(p)) return std::log10(s.maxabs) + double(e) * kLog10_2;
  const int k = exponent_of(s.maxabs);
  double sp = 0;
  if (p >= 1.0) {
    for (std::size_t i = 0; i < n; ++i)
      sp += std::pow(std::ldexp(std::fabs(static_cast<double>(x[i])), -k), p);
  } else {
    for (std::size_t i = 0; i < n; ++i) {
      const double a = std::fabs(static_cast<double>(x[i]));
      if (a > 0) sp += std::exp2(p * (std::log2(a) - k));
    }
  }
  return std::log10(sp) / p + (double(e) + k) * kLog10_2;
}

// The total norm over parameters given each one's log10 p-norm (torch's get_total_norm),
// and clip_grad_norm_'s coefficient min(1, max_norm / (total + 1e-6)) in log space.
struct LogClip {
  double log10_total = 0.0;
  bool clipped = false;
  double log10_coef = 0.0;
  // The coefficient as torch applies it (rounded to the gradients' dtype), times
  // 2^coef_exp: a coefficient below the doubles (a total norm beyond them) is carried.
  double coef = 1.0;
  std::int64_t coef_exp = 0;
};

template <class T>
LogClip log_clip(const std::vector<double>& log10_norms, double p, double max_norm) {
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  const bool p_inf = std::isinf(p);
  double lt = kNegInf;
  for (double v : log10_norms) lt = p_inf ? std::max(lt, v) : log10_add(lt, p * v);
  LogClip r;
  r.log10_total = p_inf ? lt : lt / p;
  if (max_norm < 0.0) return r;
  r.clipped = true;
  const double denom = log10_add(r.log10_total, -6.0);
  r.log10_coef = std::min(0.0, (max_norm > 0 ? std::log10(max_norm) : kNegInf) - denom);
  r.coef = std::pow(10.0, r.log10_coef);
  const double total = std::pow(10.0, r.log10_total);
  const bool finite_total = std::isfinite(total) && total > 0;
  if (r.log10_coef < 0.0 && finite_total)
    r.coef = double(static_cast<T>(max_norm / (total + 1e-6)));
  // Below T's normal numbers the coefficient would keep only part of its digits (or none):
  // it is carried as m * 2^k instead, m the same quotient formed between mantissas (from
  // the log10 where the total lies beyond the doubles), rounded to T.
  if (r.coef < std::numeric_limits<T>::min() && std::isfinite(r.log10_coef)) {
    if (finite_total) {
      int a = 0, b = 0;
      const double fm = std::frexp(max_norm, &a), fd = std::frexp(total + 1e-6, &b);
      r.coef = double(static_cast<T>(fm / fd));
      r.coef_exp = std::int64_t{a} - b;
    } else {
      const double l2 = r.log10_coef / kLog10_2;
      const double k = std::floor(l2);
      r.coef = double(static_cast<T>(std::exp2(l2 - k)));
      r.coef_exp = static_cast<std::int64_t>(k);
    }
  }
  return r;
}

// A sum of terms v * 2^ve held as a double times 2^e: neither a term nor a partial sum
// overflows or underflows, and inside the double range every addition rounds exactly as a
// plain double sum would (the shifts are powers of two). Terms below 2^-(2^62) count as 0.
struct ScaledSum {
  double m = 0.0;  // 0, or |m| in [0.5, 1); inf or NaN once such a term was added
  std::int64_t e = 0;

  void add(double v, std::int64_t ve = 0) {
    if (v == 0.0) return;
    if (!std::isfinite(v) || !std::isfinite(m)) {
      m += v;
      return;
    }
    int k = 0;
    const double f = std::frexp(v, &k);
    const std::int64_t tv = ve + k;
    if (m == 0.0) {
      m = f;
      e = tv;
      return;
    }
    const std::int64_t c = std::max(e, tv);
    const auto shift = [](std::int64_t d) {
      return static_cast<int>(std::max<std::int64_t>(d, -4000));
    };
    m = std::ldexp(m, shift(e - c)) + std::ldexp(f, shift(tv - c));
    m = std::frexp(m, &k);
    e = m == 0.0 ? 0 : c + k;
  }
  void add(const ScaledSum& o) { add(o.m, o.e); }
  // Adds exp(ln_v) for a natural logarithm ln_v that may lie far outside the double range.
  void add_exp(double ln_v) {
    constexpr double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;
    if (std::isnan(ln_v) || ln_v == std::numeric_limits<double>::infinity()) {
      add(std::exp(ln_v));
      return;
    }
    const double k = std::floor(ln_v / 0.69314718055994530942);
    if (!(std::fabs(k) < 0x1p62)) {
      if (k > 0) add(std::numeric_limits<double>::infinity());
      return;
    }
    double frac = (ln_v - k * kLn2Hi) - k * kLn2Lo;  // noise where ln_v's ulp passes ln 2
    if (!(frac >= 0.0 && frac < 0.69314718055994530942)) frac = 0.0;
    add(std::exp(frac), static_cast<std::int64_t>(k));
  }
  // log10 of sum / divisor (divisor > 0); -inf for a zero sum.
  double log10(double divisor = 1.0) const {
    if (m == 0.0) return -std::numeric_limits<double>::infinity();
    if (!std::isfinite(m)) return m;
    return std::log10(std::fabs(m) / divisor) + static_cast<double>(e) * kLog10_2;
  }
  // sum / divisor as a double: inf or 0 only where the true value is outside the range.
  double value(double divisor = 1.0) const {
    if (m == 0.0 || !std::isfinite(m)) return m;
    return std::ldexp(m / divisor, static_cast<int>(std::clamp<std::int64_t>(e, -100000, 100000)));
  }
};

}  // namespace gradchain
