#include "gradchain/scaled.hpp"

#include <cstdint>
#include <cstring>
#include <limits>

#include "gradchain/clones.hpp"

namespace gradchain {

namespace {
template <class T>
__attribute__((always_inline)) inline Scan scan_impl(const T* x, std::size_t n) {
  double mx = 0.0, ss = 0.0, bad = 0.0;
#pragma omp simd reduction(max : mx) reduction(+ : ss, bad)
  for (std::size_t i = 0; i < n; ++i) {
    const double a = static_cast<double>(x[i]);
    const double fa = std::fabs(a);
    mx = fa > mx ? fa : mx;
    ss += a * a;
    bad += a * 0.0;  // NaN once any entry is NaN or inf
  }
  Scan r;
  r.maxabs = mx;
  r.sumsq = ss;
  r.finite = (bad == 0.0);
  if (r.finite && mx > 0 && (mx > 0x1p400 || mx < 0x1p-400)) {
    // Squares of the entries that matter would overflow or underflow: sum them at a
    // power-of-two scale (exact) that puts the largest near 1.
    const int k = std::ilogb(mx);
    double s2 = 0.0;
#pragma omp simd reduction(+ : s2)
    for (std::size_t i = 0; i < n; ++i) {
      const double a = std::ldexp(static_cast<double>(x[i]), -k);
      s2 += a * a;
    }
    r.sumsq = s2;
    r.sq_shift = k;
  }
  return r;
}

// |x| as a (non-negative) integer orders like |x| itself; above the bits of inf lie the NaNs.
template <class T, class I>
__attribute__((always_inline)) inline MaxAbs max_abs_impl(const T* x, std::size_t n) {
  static_assert(sizeof(T) == sizeof(I));
  constexpr I kMag = std::numeric_limits<I>::max();
  constexpr I kInf = sizeof(T) == 4 ? I(0x7f800000) : I(0x7ff0000000000000);
  I top = 0;
#pragma omp simd reduction(max : top)
  for (std::size_t i = 0; i < n; ++i) {
    I b;
    std::memcpy(&b, x + i, sizeof b);
    b &= kMag;
    top = b > top ? b : top;
  }
  const bool finite = top < kInf;
  if (top > kInf) {  // a NaN: the largest of the other entries
    top = 0;
#pragma omp simd reduction(max : top)
    for (std::size_t i = 0; i < n; ++i) {
      I b;
      std::memcpy(&b, x + i, sizeof b);
      b &= kMag;
      b = b > kInf ? I(0) : b;
      top = b > top ? b : top;
    }
  }
  T m;
  std::memcpy(&m, &top, sizeof m);
  return {static_cast<double>(m), finite};
}
}  // namespace

GC_CLONES MaxAbs max_abs(const double* x, std::size_t n) {
  return max_abs_impl<double, std::int64_t>(x, n);
}
GC_CLONES MaxAbs max_abs(const float* x, std::size_t n) {
  return max_abs_impl<float, std::int32_t>(x, n);
}

namespace {
template <class T>
__attribute__((always_inline)) inline void mul_pow2_impl(const T* src, std::size_t n, double f,
                                                         T* dst) {
#pragma omp simd
  for (std::size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(static_cast<double>(src[i]) * f);
}
}  // namespace

GC_CLONES void mul_pow2(const float* src, std::size_t n, double f, float* dst) {
  mul_pow2_impl(src, n, f, dst);
}
GC_CLONES void mul_pow2(const double* src, std::size_t n, double f, double* dst) {
  mul_pow2_impl(src, n, f, dst);
}

namespace {
template <class T>
__attribute__((always_inline)) inline void column_sums_impl(const T* x, std::size_t rows,
                                                            std::size_t cols, T* out) {
  // Columns in blocks that stay in registers while the rows go by.
  constexpr std::size_t kCols = 64 / sizeof(T) * 4;
  for (std::size_t j0 = 0; j0 < cols; j0 += kCols) {
    const std::size_t nj = cols - j0 < kCols ? cols - j0 : kCols;
    T acc[kCols];
#pragma omp simd
    for (std::size_t j = 0; j < kCols; ++j) acc[j] = T(0);
    for (std::size_t r = 0; r < rows; ++r) {
      const T* row = x + r * cols + j0;
#pragma omp simd
      for (std::size_t j = 0; j < nj; ++j) acc[j] += row[j];
    }
    for (std::size_t j = 0; j < nj; ++j) out[j0 + j] = acc[j];
  }
}
}  // namespace

GC_CLONES void column_sums(const float* x, std::size_t rows, std::size_t cols, float* out) {
  column_sums_impl(x, rows, cols, out);
}
GC_CLONES void column_sums(const double* x, std::size_t rows, std::size_t cols, double* out) {
  column_sums_impl(x, rows, cols, out);
}

GC_CLONES Scan scan(const double* x, std::size_t n) {
  return scan_impl(x, n);
}
GC_CLONES Scan scan(const float* x, std::size_t n) {
  return scan_impl(x, n);
}

}  // namespace gradchain
