#include "gradchain/loss.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "gradchain/common.hpp"
#include "gradchain/scaled.hpp"

namespace gradchain {

namespace {
const std::vector<std::string> kLossNames = {"probe", "mse", "cross_entropy", "grad_output"};
constexpr double kNegInf = -std::numeric_limits<double>::infinity();
constexpr double kLn2 = 0.69314718055994530942;
constexpr double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;

int clamp_exp(std::int64_t k) {
  return static_cast<int>(std::clamp<std::int64_t>(k, -100000, 100000));
}

// Softmax cross-entropy of logits y * 2^ey. Each row's terms are formed from the logits in
// double (at the true scale where that is finite); the gradient entries p_j - [j = label]
// are taken in log space and written at one power of two for all rows, so a confident
// prediction (1 - p_label ~ e^-5000) keeps its gradient and its loss.
template <class T>
void cross_entropy(const T* y, std::int64_t ey, std::size_t rows, std::size_t cols,
                   const std::int64_t* labels, double scale, T* dy, std::int64_t& gy,
                   ScaledSum& sum) {
  constexpr int band = std::numeric_limits<T>::max_exponent / 5;
  // The largest logit at its true scale, as a power of two (the mantissas may lie anywhere
  // in the band, so ey alone does not say it).
  const MaxAbs ym = max_abs(y, rows * cols);
  const std::int64_t top = ym.value > 0 ? ey + exponent_of(ym.value) : ey;
  if (ey > 900 || top > 900) {
    // Logits at or beyond 2^900: two that differ do so by at least 2^847, so the softmax
    // is one-hot on each row's maximum (shared on ties), the loss 2^ey (max - y_label) (or
    // log(ties) where the label shares it).
    for (std::size_t r = 0; r < rows; ++r) {
      const T* row = y + r * cols;
      const T mx = *std::max_element(row, row + cols);
      std::size_t ties = 0;
      for (std::size_t j = 0; j < cols; ++j) ties += row[j] == mx;
      const std::size_t lab = static_cast<std::size_t>(labels[r]);
      const double gap = double(mx) - double(row[lab]);
      if (gap > 0)
        sum.add(gap, ey);
      else
        sum.add(std::log(double(ties)));
      for (std::size_t j = 0; j < cols; ++j)
        dy[r * cols + j] = static_cast<T>(
            ((row[j] == mx ? 1.0 / double(ties) : 0.0) - (j == lab ? 1.0 : 0.0)) * scale);
    }
    gy = 0;
    return;
  }
  const int ie = clamp_exp(ey);
  struct Row {
    // The largest logit and log sum_j e^(z_j - max) (the log-sum-exp is their sum, taken
    // apart: z_j - max is exact near the top, where max + lsum may absorb lsum);
    // log|dL/dy_label| when the label holds the largest logit.
    double mx, lsum, llab;
    bool top;
    std::size_t lab;
  };
  std::vector<Row> info(rows);
  std::vector<double> z(cols);
  double big = kNegInf;  // the largest log|gradient entry| of all rows
  for (std::size_t r = 0; r < rows; ++r) {
    const T* yr = y + r * cols;
    for (std::size_t j = 0; j < cols; ++j) z[j] = std::ldexp(double(yr[j]), ie);
    const std::size_t lab = static_cast<std::size_t>(labels[r]);
    const double mx = *std::max_element(z.begin(), z.end());
    double s = 0.0;
    for (std::size_t j = 0; j < cols; ++j) s += std::exp(z[j] - mx);
    const double lsum = std::log(s);
    Row& w = info[r];
    w.mx = mx;
    w.lsum = lsum;
    w.lab = lab;
    w.top = z[lab] == mx;
    if (w.top) {
      // log of sum_{j != label} e^(z_j - max), without underflow
      double m2 = kNegInf;
      for (std::size_t j = 0; j < cols; ++j)
        if (j != lab) m2 = std::max(m2, z[j]);
      double s2 = 0.0;
      for (std::size_t j = 0; j < cols; ++j)
        if (j != lab) s2 += std::exp(z[j] - m2);
      const double lp = cols > 1 ? (m2 - mx) + std::log(s2) : kNegInf;
      if (lp > -700.0)
        sum.add(std::log1p(std::exp(lp)));
      else
        sum.add_exp(lp);  // log1p(e^lp) = e^lp to double precision
      w.llab = lp - lsum;
      big = std::max(big, w.llab);
    } else {
      const double d = mx - z[lab];  // > 0
      if (std::isfinite(d))
        sum.add(d + lsum);
      else
        sum.add(0.5 * mx - 0.5 * z[lab] + 0.5 * lsum, 1);
      w.llab = 0.0;
      big = std::max(big, std::log(0.5));
    }
  }
  // Scale only when the largest entry lies below the band (then every entry is tiny): by
  // 2^-k, k = floor(big / ln 2), each entry then exp((log - big) + frac) with frac =
  // big - k ln 2 in [0, ln 2) (noise, and set to 0, where big is too large for a double to
  // resolve it).
  double k = 0.0, frac = 0.0;
  if (big > kNegInf && big / kLn2 < -band) {
    k = std::floor(big / kLn2);
    frac = (big - k * kLn2Hi) - k * kLn2Lo;
    if (!(frac >= 0.0 && frac < kLn2)) frac = 0.0;
    if (!(k > -0x1p62)) big = kNegInf;  // beyond even the exponent's range: zero
  }
  auto mant = [&](double lg) { return k == 0.0 ? std::exp(lg) : std::exp((lg - big) + frac); };
  gy = static_cast<std::int64_t>(k);
  const T s = static_cast<T>(scale);
  for (std::size_t r = 0; r < rows; ++r) {
    const T* yr = y + r * cols;
    T* d = dy + r * cols;
    const Row& w = info[r];
    if (big == kNegInf) {
      std::fill(d, d + cols, T(0));
      continue;
    }
    for (std::size_t j = 0; j < cols; ++j) {
      const double zj = std::ldexp(double(yr[j]), ie);
      double g;
      if (j != w.lab)
        g = mant((zj - w.mx) - w.lsum);
      else if (w.top)
        g = -mant(w.llab);
      else
        g = std::expm1((zj - w.mx) - w.lsum);
      d[j] = static_cast<T>(g) * s;
    }
  }
}

}  // namespace

LossKind parse_loss(const std::string& name) {
  return static_cast<LossKind>(parse_name("loss", name, kLossNames));
}

const std::vector<std::string>& loss_names() {
  return kLossNames;
}

template <class T>
void loss_rows(LossKind kind, const T* y, std::int64_t ey, std::size_t rows, std::size_t cols,
               const void* target, double scale, T* dy, std::int64_t& gy, ScaledSum& sum) {
  const std::size_t m = rows * cols;
  switch (kind) {
    case LossKind::probe: {
      const Scan s = scan(y, m);
      sum.add(0.5 * s.sumsq, 2 * (ey + s.sq_shift));
      const T f = static_cast<T>(scale);
      for (std::size_t i = 0; i < m; ++i) dy[i] = f * y[i];
      gy = ey;
      break;
    }
    case LossKind::mse: {
      // (y - t) at a common power-of-two scale 2^c that puts the larger of y's and t's
      // largest entries just below the band's top: exact where y and t overlap, and the
      // difference (times 2 / count) stays in the band. Near 1, an example 2^-1074 below
      // the batch's largest would lose its gradient (torch's pass at the true scale keeps it);
      // at the top it keeps it down to the band and the subnormals below, the most one
      // exponent for the batch allows.
      constexpr int band = std::numeric_limits<T>::max_exponent / 5;
      const T* t = static_cast<const T*>(target);
      const MaxAbs st = max_abs(t, m), sy = max_abs(y, m);
      constexpr std::int64_t kNone = std::numeric_limits<int>::min() / 2;
      const std::int64_t et = st.value > 0 ? exponent_of(st.value) : kNone;
      const std::int64_t eyy = sy.value > 0 ? ey + exponent_of(sy.value) : kNone;
      const std::int64_t c = std::max(eyy, et) - (band - 2);
      const int shy = clamp_exp(ey - c), sht = clamp_exp(-c);
      // A product with a normal power of two rounds as ldexp does.
      constexpr int kNormal = std::numeric_limits<double>::max_exponent - 1;
      if (shy >= 1 - kNormal && shy <= kNormal && sht >= 1 - kNormal && sht <= kNormal) {
        const double fy = std::ldexp(1.0, shy), ft = std::ldexp(1.0, sht);
        for (std::size_t i = 0; i < m; ++i)
          dy[i] = static_cast<T>(double(y[i]) * fy) - static_cast<T>(double(t[i]) * ft);
      } else {
        for (std::size_t i = 0; i < m; ++i)
          dy[i] = static_cast<T>(std::ldexp(double(y[i]), shy)) -
                  static_cast<T>(std::ldexp(double(t[i]), sht));
      }
      const Scan s = scan(dy, m);
      sum.add(s.sumsq, 2 * (c + s.sq_shift));
      const T f = static_cast<T>(2.0 * scale);
      for (std::size_t i = 0; i < m; ++i) dy[i] *= f;
      gy = c;
      break;
    }
    case LossKind::cross_entropy:
      cross_entropy(y, ey, rows, cols, static_cast<const std::int64_t*>(target), scale, dy, gy,
                    sum);
      break;
    case LossKind::grad_output: {
      const T* go = static_cast<const T*>(target);
      std::copy(go, go + m, dy);
      gy = 0;
      break;
    }
  }
  into_band(dy, m, gy);
}

template void loss_rows<float>(LossKind, const float*, std::int64_t, std::size_t, std::size_t,
                               const void*, double, float*, std::int64_t&, ScaledSum&);
template void loss_rows<double>(LossKind, const double*, std::int64_t, std::size_t, std::size_t,
                                const void*, double, double*, std::int64_t&, ScaledSum&);

}  // namespace gradchain
