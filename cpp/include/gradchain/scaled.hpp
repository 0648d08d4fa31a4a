// Arrays carried as (mantissa array, power-of-two exponent): x = x~ * 2^e. Scaling by a
// power of two is exact in binary floating point, so renormalising never rounds; the
// exponent lives in an int64 and the log10 of a norm stays finite at any depth.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

namespace gradchain {

inline constexpr double kLog10_2 = 0.30102999566398119521;

struct Scan {
  double maxabs = 0.0;
  double sumsq = 0.0;
  bool finite = true;
};

// Largest |x|, sum of squares (accumulated in double) and whether all entries are finite.
Scan scan(const double* x, std::size_t n);
Scan scan(const float* x, std::size_t n);

// sum |x_i|^p in double.
template <class T>
double sum_abs_pow(const T* x, std::size_t n, double p) {
  double s = 0;
  for (std::size_t i = 0; i < n; ++i) s += std::pow(std::fabs(static_cast<double>(x[i])), p);
  return s;
}

// The binary exponent k with 2^k <= m < 2^(k+1); 0 for m == 0.
inline int exponent_of(double m) { return m > 0.0 ? std::ilogb(m) : 0; }

// The exponent to rescale by when max|x| = m has left the band [2^-b, 2^b], b a fifth
// of T's exponent range (0 inside it). Inside the band nothing is rescaled, so a pass that
// stays in range computes exactly what a plain float pass computes, subnormals included;
// products of two arrays inside the band, and their squares, cannot overflow.
template <class T>
int rescale_exponent(double m) {
  constexpr int band = std::numeric_limits<T>::max_exponent / 5;
  const int k = exponent_of(m);
  return (k > band || k < -band) ? k : 0;
}

// x *= 2^k, exactly (barring subnormal results).
template <class T>
void scale_pow2(T* x, std::size_t n, int k) {
  if (k == 0) return;
  const T f = static_cast<T>(std::ldexp(1.0, k));
  if (std::isfinite(static_cast<double>(f)) && f != T(0)) {
    for (std::size_t i = 0; i < n; ++i) x[i] *= f;
  } else {
    for (std::size_t i = 0; i < n; ++i) x[i] = static_cast<T>(std::ldexp(static_cast<double>(x[i]), k));
  }
}

// log10 of sqrt(sumsq) * 2^e; -inf for a zero norm.
inline double log10_norm(double sumsq, std::int64_t e) {
  if (sumsq == 0.0) return -std::numeric_limits<double>::infinity();
  return 0.5 * std::log10(sumsq) + static_cast<double>(e) * kLog10_2;
}

// log10(10^a + 10^b), stable.
inline double log10_add(double a, double b) {
  if (a == -std::numeric_limits<double>::infinity()) return b;
  if (b == -std::numeric_limits<double>::infinity()) return a;
  const double m = a > b ? a : b, d = -std::fabs(a - b);
  return m + std::log10(1.0 + std::pow(10.0, d));
}

}  // namespace gradchain
