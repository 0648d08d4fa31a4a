#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "gradchain/common.hpp"
#include "gradchain/loss.hpp"
#include "gradchain/scaled.hpp"

namespace gradchain {

namespace {
const std::vector<std::string> kLossNames = {"probe", "mse", "cross_entropy", "grad_output"};
constexpr double kNegInf = -std::numeric_limits<double>::infinity();
}  // namespace

LossKind parse_loss(const std::string& name) {
  return static_cast<LossKind>(parse_name("loss", name, kLossNames));
}

const std::vector<std::string>& loss_names() {
  return kLossNames;
}

template <class T>
double loss_and_grad(LossKind kind, const T* h, std::int64_t eh, std::size_t rows, std::size_t cols,
                     const void* target, T* g, std::int64_t& gamma) {
  const std::size_t m = rows * cols;
  double log10_loss = 0.0;
  switch (kind) {
    case LossKind::probe: {
      std::copy(h, h + m, g);
      gamma = eh;
      const Scan s = scan(h, m);
      log10_loss = std::log10(0.5) + 2.0 * log10_norm(s, eh);
      break;
    }
    case LossKind::mse: {
      const T* y = static_cast<const T*>(target);
      const Scan sy = scan(y, m);
      // (h - y) computed at a common power-of-two scale c: exact where h and y overlap.
      const std::int64_t ey =
          sy.maxabs > 0 ? exponent_of(sy.maxabs) : std::numeric_limits<int>::min() / 2;
      // The common scale is the larger of h's and y's, so that h - y can neither
      // overflow nor square to inf.
      const Scan sh_scan = scan(h, m);
      const std::int64_t emax = sh_scan.maxabs > 0 ? eh + exponent_of(sh_scan.maxabs)
                                                   : std::numeric_limits<int>::min() / 2;
      const std::int64_t c = std::max(emax, ey);
      const int sh = static_cast<int>(std::max<std::int64_t>(eh - c, -100000));
      const int sy_ = static_cast<int>(std::max<std::int64_t>(-c, -100000));
      const T norm = static_cast<T>(2.0 / double(m));
      double ss = 0;
      for (std::size_t i = 0; i < m; ++i) {
        const T u = static_cast<T>(std::ldexp(double(h[i]), sh)) -
                    static_cast<T>(std::ldexp(double(y[i]), sy_));
        ss += double(u) * double(u);
        g[i] = norm * u;
      }
      gamma = c;
      log10_loss = ss > 0 ? std::log10(ss / double(m)) + 2.0 * double(c) * kLog10_2 : kNegInf;
      break;
    }
    case LossKind::cross_entropy: {
      const auto* labels = static_cast<const std::int64_t*>(target);
      const std::size_t C = cols;
      const T invB = static_cast<T>(1.0 / double(rows));
      if (eh <= 600) {
        const int ie = static_cast<int>(std::max<std::int64_t>(eh, -100000));
        double total = 0;
        std::vector<double> p(C);
        for (std::size_t r = 0; r < rows; ++r) {
          const T* row = h + r * C;
          double mx = kNegInf;
          for (std::size_t j = 0; j < C; ++j) mx = std::max(mx, std::ldexp(double(row[j]), ie));
          double sum = 0;
          for (std::size_t j = 0; j < C; ++j)
            sum += (p[j] = std::exp(std::ldexp(double(row[j]), ie) - mx));
          const double lse = mx + std::log(sum);
          const std::size_t y = static_cast<std::size_t>(labels[r]);
          total += lse - std::ldexp(double(row[y]), ie);
          for (std::size_t j = 0; j < C; ++j)
            g[r * C + j] = (static_cast<T>(p[j] / sum) - (j == y ? T(1) : T(0))) * invB;
        }
        const double loss = total / double(rows);
        log10_loss = loss > 0 ? std::log10(loss) : kNegInf;
      } else {
        // Logits far beyond double range: softmax is one-hot on the maximum (shared on ties)
        // and the loss is 2^eh * mean(max - h~_y).
        double gap = 0, ties_log = 0;
        for (std::size_t r = 0; r < rows; ++r) {
          const T* row = h + r * C;
          const T mx = *std::max_element(row, row + C);
          std::size_t ties = 0;
          for (std::size_t j = 0; j < C; ++j) ties += row[j] == mx;
          const std::size_t y = static_cast<std::size_t>(labels[r]);
          gap += double(mx) - double(row[y]);
          ties_log += std::log(double(ties));
          for (std::size_t j = 0; j < C; ++j)
            g[r * C + j] =
                ((row[j] == mx ? T(1) / static_cast<T>(ties) : T(0)) - (j == y ? T(1) : T(0))) *
                invB;
        }
        log10_loss = gap > 0 ? std::log10(gap / double(rows)) + double(eh) * kLog10_2
                             : (ties_log > 0 ? std::log10(ties_log / double(rows)) : kNegInf);
      }
      gamma = 0;
      break;
    }
    case LossKind::grad_output: {
      const T* go = static_cast<const T*>(target);
      std::copy(go, go + m, g);
      gamma = 0;
      log10_loss = std::numeric_limits<double>::quiet_NaN();
      break;
    }
  }
  return log10_loss;
}

template double loss_and_grad<float>(LossKind, const float*, std::int64_t, std::size_t, std::size_t,
                                     const void*, float*, std::int64_t&);
template double loss_and_grad<double>(LossKind, const double*, std::int64_t, std::size_t,
                                      std::size_t, const void*, double*, std::int64_t&);

}  // namespace gradchain
