#include "gradchain/init.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "gradchain/blas.hpp"
#include "gradchain/common.hpp"

namespace gradchain {

namespace {
// From this many columns on, the orthogonal initializer's QR goes a panel of kPanel columns
// at a time (LAPACK's blocked algorithm, one call per panel), so that Ctrl-C is heard
// between panels: one LAPACK call on a 4096-wide layer takes seconds.
constexpr int kSplitColumns = 1024;
constexpr int kPanel = 128;

[[noreturn]] void lapack_failed(const char* routine) {
  throw std::runtime_error(std::string("LAPACK ") + routine +
                           " failed in the orthogonal initializer");
}

// Householder QR of the column-major m x k matrix c (m >= k), then Q in its place; sign[j]
// is the sign of R_jj. Right-looking by panels, and Q formed from the last panel back, as
// LAPACK's dgeqrf and dorgqr do inside one call.
void qr_in_panels(int m, int k, double* c, double* tau, double* sign, Canceller* cancel) {
  auto at = [&](int i, int j) {
    return c + static_cast<std::size_t>(j) * static_cast<std::size_t>(m) +
           static_cast<std::size_t>(i);
  };
  for (int j = 0; j < k; j += kPanel) {
    if (cancel) cancel->poll();
    const int jb = std::min(kPanel, k - j);
    if (blas::geqrf_cm(m - j, jb, at(j, j), m, tau + j) != 0) lapack_failed("geqrf");
    if (j + jb < k && blas::ormqr_left_cm(blas::Trans::T, m - j, k - j - jb, jb, at(j, j), m,
                                          tau + j, at(j, j + jb), m) != 0)
      lapack_failed("ormqr");
  }
  for (int j = 0; j < k; ++j) sign[j] = *at(j, j) < 0.0 ? -1.0 : 1.0;
  for (int i = (k - 1) / kPanel * kPanel; i >= 0; i -= kPanel) {
    if (cancel) cancel->poll();
    const int ib = std::min(kPanel, k - i);
    // The columns right of the panel hold H_{i+ib} ... H_{k-1} E (zero above row i + ib).
    if (i + ib < k && blas::ormqr_left_cm(blas::Trans::N, m - i, k - i - ib, ib, at(i, i), m,
                                          tau + i, at(i, i + ib), m) != 0)
      lapack_failed("ormqr");
    if (blas::orgqr_cm(m - i, ib, ib, at(i, i), m, tau + i) != 0) lapack_failed("orgqr");
    for (int j = i; j < i + ib; ++j) std::fill(at(0, j), at(i, j), 0.0);
  }
}

const std::vector<std::string> kInitNames = {"xavier_normal", "xavier_uniform", "he_normal",
                                             "he_uniform",    "lecun_normal",   "orthogonal",
                                             "normal"};
}  // namespace

const std::vector<std::string>& InitSpec::names() {
  return kInitNames;
}

InitKind InitSpec::parse_kind(const std::string& name) {
  return static_cast<InitKind>(parse_name("init", name, kInitNames));
}

void InitSpec::validate() const {
  if (!std::isfinite(gain))
    throw std::invalid_argument("gain must be a finite number; got " + std::to_string(gain));
  if (!std::isfinite(sigma_w) || sigma_w < 0.0)
    throw std::invalid_argument("sigma_w must be a finite number >= 0; got " +
                                std::to_string(sigma_w));
  if (!std::isfinite(bias_std) || bias_std < 0.0)
    throw std::invalid_argument("bias_std must be a finite number >= 0; got " +
                                std::to_string(bias_std));
}

double InitSpec::weight_std(int fan_out, int fan_in) const {
  const double fi = fan_in, fo = fan_out;
  switch (kind) {
    case InitKind::xavier_normal:
    case InitKind::xavier_uniform:
      return gain * std::sqrt(2.0 / (fi + fo));
    case InitKind::he_normal:
    case InitKind::he_uniform:
      return gain * std::sqrt(2.0 / fi);
    case InitKind::lecun_normal:
    case InitKind::orthogonal:
      return gain / std::sqrt(fi);
    case InitKind::normal:
      return gain * sigma_w / std::sqrt(fi);
  }
  return 0.0;
}

UnitFamily unit_family(InitKind kind) {
  switch (kind) {
    case InitKind::xavier_uniform:
    case InitKind::he_uniform:
      return UnitFamily::uniform;
    case InitKind::orthogonal:
      return UnitFamily::orthogonal;
    default:
      return UnitFamily::normal;
  }
}

double weight_scale(int fan_out, int fan_in, const InitSpec& spec) {
  switch (unit_family(spec.kind)) {
    case UnitFamily::uniform:
      // U(-a, a) has std a / sqrt(3).
      return std::sqrt(3.0) * spec.weight_std(fan_out, fan_in);
    case UnitFamily::orthogonal:
      return spec.gain;
    case UnitFamily::normal:
      break;
  }
  return spec.weight_std(fan_out, fan_in);
}

void init_weight_unit(double* w, int fan_out, int fan_in, UnitFamily family, const Philox& rng,
                      std::uint64_t layer, Canceller* cancel) {
  const std::uint64_t n = static_cast<std::uint64_t>(fan_out) * static_cast<std::uint64_t>(fan_in);
  const std::uint64_t stream = weight_stream(layer);
  switch (family) {
    case UnitFamily::uniform:
      fill_uniform_pm1(rng, stream, w, n, cancel);
      return;
    case UnitFamily::normal:
      fill_normal(rng, stream, w, n, cancel);
      return;
    case UnitFamily::orthogonal:
      break;
  }
  // Haar measure: QR of a Gaussian matrix with the signs of diag(R) folded into Q
  // (Mezzadri 2007), taken on the tall orientation as torch.nn.init.orthogonal_ does.
  const int m = std::max(fan_out, fan_in), k = std::min(fan_out, fan_in);
  const auto K = static_cast<std::size_t>(k), FI = static_cast<std::size_t>(fan_in);
  const auto M = static_cast<std::size_t>(m);
  std::vector<double> a(n), tau(K), sign(K);
  fill_normal(rng, stream, a.data(), n, cancel);
  // q(i, j): entry (i, j) of the tall factor Q (m x k); W = Q diag(sign), transposed when wide.
  auto store = [&](auto q) {
    for (std::size_t i = 0; i < M; ++i)
      for (std::size_t j = 0; j < K; ++j) {
        const double x = q(i, j) * sign[j];
        if (fan_out >= fan_in)
          w[i * FI + j] = x;
        else
          w[j * FI + i] = x;
      }
  };
  if (k >= kSplitColumns) {
    std::vector<double> c(n);  // column-major
    for (std::size_t i = 0; i < M; ++i)
      for (std::size_t j = 0; j < K; ++j) c[j * M + i] = a[i * K + j];
    std::vector<double>().swap(a);
    qr_in_panels(m, k, c.data(), tau.data(), sign.data(), cancel);
    store([&](std::size_t i, std::size_t j) { return c[j * M + i]; });
    return;
  }
  if (blas::geqrf(m, k, a.data(), k, tau.data()) != 0)
    throw std::runtime_error("LAPACK geqrf failed in the orthogonal initializer");
  for (std::size_t j = 0; j < K; ++j) sign[j] = a[j * K + j] < 0.0 ? -1.0 : 1.0;
  if (blas::orgqr(m, k, k, a.data(), k, tau.data()) != 0)
    throw std::runtime_error("LAPACK orgqr failed in the orthogonal initializer");
  store([&](std::size_t i, std::size_t j) { return a[i * K + j]; });
}

void scale_draws(const double* unit, double scale, double* out, std::uint64_t n) {
  // unit * scale: the orthogonal weight gain * q * sign is the same double, as sign = +-1.
  for (std::uint64_t i = 0; i < n; ++i) out[i] = unit[i] * scale;
}

void init_weight(double* w, int fan_out, int fan_in, const InitSpec& spec, const Philox& rng,
                 std::uint64_t layer, Canceller* cancel) {
  const std::uint64_t n = static_cast<std::uint64_t>(fan_out) * static_cast<std::uint64_t>(fan_in);
  const UnitFamily family = unit_family(spec.kind);
  const double scale = weight_scale(fan_out, fan_in, spec);
  // The generator applies the scale as it writes (the same rounding of unit * scale), which
  // saves a pass over a weight that no longer fits in cache.
  if (family == UnitFamily::normal)
    return fill_normal(rng, weight_stream(layer), w, n, cancel, scale);
  if (family == UnitFamily::uniform)
    return fill_uniform_pm1(rng, weight_stream(layer), w, n, cancel, scale);
  init_weight_unit(w, fan_out, fan_in, family, rng, layer, cancel);
  scale_draws(w, scale, w, n);
}

void init_bias_unit(double* b, int n, const Philox& rng, std::uint64_t layer) {
  fill_normal(rng, bias_stream(layer), b, static_cast<std::uint64_t>(n));
}

void init_bias(double* b, int n, const InitSpec& spec, const Philox& rng, std::uint64_t layer) {
  const std::uint64_t m = static_cast<std::uint64_t>(n);
  if (spec.bias_std == 0.0) {
    std::fill(b, b + m, 0.0);
    return;
  }
  fill_normal(rng, bias_stream(layer), b, m, nullptr, spec.bias_std);
}

}  // namespace gradchain
