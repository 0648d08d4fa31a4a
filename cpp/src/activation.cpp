#include "gradchain/activation.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

#include "gradchain/common.hpp"
#include "gradchain/parallel.hpp"
#include "gradchain/scaled.hpp"
#include "gradchain/vecmath.hpp"

// The scratch blocks are filled by the vector-math calls before any read; GCC cannot see
// through those calls.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace gradchain {

namespace {
const std::vector<std::string> kNames = {"linear", "sigmoid", "tanh",      "relu", "leaky_relu",
                                         "elu",    "gelu",    "gelu_tanh", "silu", "softplus"};

// Below these, tanh(x) is x in T: x^3 / 3 is far below half an ulp of x, and vm::tanh's
// expm1(2x) / (expm1(2x) + 2) is 2x / 2 (float: libmvec's tanhf returns x).
template <class T>
constexpr double kTanhIsX = sizeof(T) == 8 ? 0x1p-60 : 0x1p-30;
// Below these, 1 - h^2 rounds to 1 in T, so tanh's backward pass gives dL/dz = dL/dh.
template <class T>
constexpr double kTanhFlat = sizeof(T) == 8 ? 0x1p-27 : 0x1p-13;

// Elementwise work runs in blocks of this many elements, so that temporaries stay in L1.
constexpr std::size_t kBlock = 512;

// PyTorch's constants for softplus (beta = 1, threshold = 20) and gelu.
constexpr double kSoftplusThreshold = 20.0;
constexpr double kSqrt1_2 = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;
constexpr double kGeluBeta = 0.79788456080286535588;  // sqrt(2/pi)
constexpr double kGeluKappa = 0.044715;

// e = exp(-|z|), which never overflows: sigmoid(z) = 1 / (1 + e) for z >= 0 and e / (1 + e)
// below keeps the tiny (down to subnormal) values of large negative z, where 1 / (1 + exp(-z))
// would be 1 / inf = 0.
template <class T>
void exp_neg_abs(const T* z, T* e, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) e[i] = -std::fabs(z[i]);
  vm::exp(e, e, n);
}

// e = exp(-2 |u|), u = sqrt(2/pi) (z + 0.044715 z^3): gelu_tanh's (1 + tanh(u)) / 2 is
// sigmoid(2 u), 1 / (1 + e) for z >= 0 and e / (1 + e) below, which keeps its tail where
// 1 + tanh(u) cancels to 0 (from z = -7, where the true value is still 1e-16).
template <class T>
void gelu_tanh_half(const T* z, T* e, std::size_t n) {
  const T two_beta = static_cast<T>(2 * kGeluBeta), kappa = static_cast<T>(kGeluKappa);
  for (std::size_t i = 0; i < n; ++i) {
    const T x = z[i];
    e[i] = -std::fabs(two_beta * (x + kappa * x * x * x));
  }
  vm::exp(e, e, n);
}

// The normal CDF as erfc(-z / sqrt 2) / 2: (1 + erf(z / sqrt 2)) / 2 cancels to 0 below
// z = -8 (and loses digits from z = -1 on), where the CDF is still far above the underflow.
template <class T>
void gelu_cdf(const T* z, T* cdf, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) cdf[i] = -z[i] * static_cast<T>(kSqrt1_2);
  vm::erfc(cdf, cdf, n);
  for (std::size_t i = 0; i < n; ++i) cdf[i] *= T(0.5);
}

template <class T>
void forward_block(const Activation& a, const T* z, T* h, std::size_t n) {
  T tmp[kBlock];
  switch (a.kind) {
    case Act::linear:
      if (h != z) std::copy(z, z + n, h);
      break;
    case Act::tanh:
      vm::tanh(z, h, n);
      break;
    case Act::sigmoid:
      exp_neg_abs(z, tmp, n);
      for (std::size_t i = 0; i < n; ++i) h[i] = (z[i] < T(0) ? tmp[i] : T(1)) / (T(1) + tmp[i]);
      break;
    case Act::relu:
      // NaN must propagate as in torch.relu. Through tmp, as in backward_block.
      for (std::size_t i = 0; i < n; ++i) {
        const T zi = z[i];
        tmp[i] = zi < T(0) ? T(0) : zi;
      }
      std::copy(tmp, tmp + n, h);
      break;
    case Act::leaky_relu: {
      const T s = static_cast<T>(a.negative_slope);
      for (std::size_t i = 0; i < n; ++i) h[i] = z[i] > T(0) ? z[i] : z[i] * s;
      break;
    }
    case Act::elu: {
      const T al = static_cast<T>(a.alpha);
      vm::expm1(z, tmp, n);
      for (std::size_t i = 0; i < n; ++i) h[i] = z[i] > T(0) ? z[i] : al * tmp[i];
      break;
    }
    case Act::gelu:
      gelu_cdf(z, tmp, n);
      for (std::size_t i = 0; i < n; ++i) h[i] = z[i] * tmp[i];
      break;
    case Act::gelu_tanh:
      gelu_tanh_half(z, tmp, n);
      for (std::size_t i = 0; i < n; ++i)
        h[i] = z[i] * ((z[i] < T(0) ? tmp[i] : T(1)) / (T(1) + tmp[i]));
      break;
    case Act::silu:
      exp_neg_abs(z, tmp, n);
      for (std::size_t i = 0; i < n; ++i)
        h[i] = z[i] * ((z[i] < T(0) ? tmp[i] : T(1)) / (T(1) + tmp[i]));
      break;
    case Act::softplus:
      vm::exp(z, tmp, n);
      vm::log1p(tmp, tmp, n);
      for (std::size_t i = 0; i < n; ++i)
        h[i] = z[i] > static_cast<T>(kSoftplusThreshold) ? z[i] : tmp[i];
      break;
  }
}

template <class T>
void backward_block(const Activation& a, const T* z, const T* h, const T* g, T* out,
                    std::size_t n) {
  T tmp[kBlock];
  switch (a.kind) {
    case Act::linear:
      if (out != g) std::copy(g, g + n, out);
      break;
    case Act::tanh:
      for (std::size_t i = 0; i < n; ++i) out[i] = g[i] * (T(1) - h[i] * h[i]);
      break;
    case Act::sigmoid:
      for (std::size_t i = 0; i < n; ++i) out[i] = g[i] * (T(1) - h[i]) * h[i];
      break;
    case Act::relu:
      // Loaded before the select and stored to tmp, which aliases nothing (out may be g),
      // so that the loop becomes vector blends instead of a branch per element.
      for (std::size_t i = 0; i < n; ++i) {
        const T gi = g[i];
        tmp[i] = h[i] > T(0) ? gi : T(0);
      }
      std::copy(tmp, tmp + n, out);
      break;
    case Act::leaky_relu: {
      const T s = static_cast<T>(a.negative_slope);
      if (a.needs_input()) {
        for (std::size_t i = 0; i < n; ++i) out[i] = z[i] > T(0) ? g[i] : g[i] * s;
      } else {
        for (std::size_t i = 0; i < n; ++i) out[i] = h[i] > T(0) ? g[i] : g[i] * s;
      }
      break;
    }
    case Act::elu: {
      const T al = static_cast<T>(a.alpha);
      vm::exp(z, tmp, n);
      for (std::size_t i = 0; i < n; ++i) out[i] = z[i] <= T(0) ? g[i] * al * tmp[i] : g[i];
      break;
    }
    case Act::gelu: {
      T pdf[kBlock];
      for (std::size_t i = 0; i < n; ++i) pdf[i] = T(-0.5) * z[i] * z[i];
      gelu_cdf(z, tmp, n);
      vm::exp(pdf, pdf, n);
      for (std::size_t i = 0; i < n; ++i)
        out[i] = g[i] * (tmp[i] + z[i] * pdf[i] * static_cast<T>(kInvSqrt2Pi));
      break;
    }
    case Act::gelu_tanh: {
      const T beta = static_cast<T>(kGeluBeta), kappa = static_cast<T>(kGeluKappa);
      gelu_tanh_half(z, tmp, n);
      for (std::size_t i = 0; i < n; ++i) {
        const T x = z[i], e = tmp[i], d = T(1) + e;
        const T s = (x < T(0) ? e : T(1)) / d;
        // 2 s (1 - s) = 2 e / (1 + e)^2 = 1 - tanh(u)^2; once it is 0 the second term is
        // exactly 0, while x * x may be inf (|x| > 1e154, or 1e19 in float32): 0 * inf
        // must not make it NaN.
        const T dright =
            e == T(0) ? T(0) : x * (T(2) * e / (d * d)) * beta * (T(1) + T(3) * kappa * x * x);
        out[i] = g[i] * (s + dright);
      }
      break;
    }
    case Act::silu:
      exp_neg_abs(z, tmp, n);
      for (std::size_t i = 0; i < n; ++i) {
        const T s = (z[i] < T(0) ? tmp[i] : T(1)) / (T(1) + tmp[i]);
        out[i] = g[i] * s * (T(1) + z[i] * (T(1) - s));
      }
      break;
    case Act::softplus:
      vm::exp(z, tmp, n);
      for (std::size_t i = 0; i < n; ++i)
        out[i] = z[i] > static_cast<T>(kSoftplusThreshold) ? g[i] : g[i] * tmp[i] / (tmp[i] + T(1));
      break;
  }
}
}  // namespace

const std::vector<std::string>& Activation::names() {
  return kNames;
}

Activation Activation::parse(const std::string& name, double negative_slope, double alpha) {
  Activation a;
  a.kind = static_cast<Act>(parse_name("activation", name, kNames));
  if (!std::isfinite(negative_slope))
    throw std::invalid_argument("negative_slope must be finite; got " +
                                std::to_string(negative_slope));
  if (!std::isfinite(alpha) || alpha <= 0.0)
    throw std::invalid_argument("alpha must be a positive finite number; got " +
                                std::to_string(alpha));
  a.negative_slope = negative_slope;
  a.alpha = alpha;
  return a;
}

std::string Activation::name() const {
  return kNames[static_cast<std::size_t>(kind)];
}

bool Activation::positively_homogeneous() const {
  return kind == Act::linear || kind == Act::relu || kind == Act::leaky_relu;
}

bool Activation::linear_near_zero() const {
  switch (kind) {
    case Act::tanh:
    case Act::elu:
    case Act::gelu:
    case Act::gelu_tanh:
    case Act::silu:
      return true;
    default:
      return false;
  }
}

double Activation::slope_at_zero(bool negative) const {
  switch (kind) {
    case Act::elu:
      return negative ? alpha : 1.0;
    case Act::gelu:
    case Act::gelu_tanh:
    case Act::silu:
      return 0.5;
    default:
      return 1.0;
  }
}

bool Activation::needs_input() const {
  switch (kind) {
    case Act::elu:
    case Act::gelu:
    case Act::gelu_tanh:
    case Act::silu:
    case Act::softplus:
      return true;
    case Act::leaky_relu:
      return negative_slope < 0.0;
    default:
      return false;
  }
}

template <class T>
void Activation::forward(const T* z, T* h, std::size_t n) const {
  parallel_chunks(n, [&](std::size_t b, std::size_t e) {
    for (std::size_t i = b; i < e; i += kBlock)
      forward_block(*this, z + i, h + i, std::min(kBlock, e - i));
  });
}

template <class T>
void Activation::backward(const T* z, const T* h, const T* g, T* out, std::size_t n) const {
  parallel_chunks(n, [&](std::size_t b, std::size_t e) {
    for (std::size_t i = b; i < e; i += kBlock) {
      const std::size_t m = std::min(kBlock, e - i);
      backward_block(*this, z ? z + i : nullptr, h ? h + i : nullptr, g + i, out + i, m);
    }
  });
}

template <class T>
void Activation::forward_scaled(const T* z, T* h, std::size_t n, int s, T* tmp) const {
  constexpr int lo = std::numeric_limits<T>::min_exponent + std::numeric_limits<T>::digits;
  const double sn = slope_at_zero(true), sp = slope_at_zero(false);
  const double tn = std::ldexp(1.0, lo) / std::min(1.0, sn);
  const double tp = std::ldexp(1.0, lo) / std::min(1.0, sp);
  const MaxAbs mz = max_abs(z, n);
  if (kind == Act::tanh && mz.finite && std::ldexp(mz.value, s) < kTanhIsX<T>) {
    // tanh of every entry is the entry itself (vm::tanh included), and so is the result of
    // both branches below.
    if (h != z) std::copy(z, z + n, h);
    return;
  }
  if (mz.finite && std::ldexp(mz.value, s) < std::min(tn, tp)) {
    // Every entry is in the linear part (a signal that has vanished far below the floats):
    // the branch below for each, without phi.
#pragma omp simd
    for (std::size_t i = 0; i < n; ++i) {
      const double zi = static_cast<double>(z[i]);
      h[i] = static_cast<T>(zi * (zi < 0 ? sn : sp));
    }
    return;
  }
  if (s >= std::numeric_limits<double>::min_exponent - 1) {
    // 2^s and 2^-s are normal doubles: each ldexp below is one correctly rounded product.
    const double f = std::ldexp(1.0, s), g = std::ldexp(1.0, -s);
#pragma omp simd
    for (std::size_t i = 0; i < n; ++i) tmp[i] = static_cast<T>(static_cast<double>(z[i]) * f);
    forward(tmp, tmp, n);
#pragma omp simd
    for (std::size_t i = 0; i < n; ++i) {
      const double zi = static_cast<double>(z[i]);
      const bool neg = zi < 0;
      h[i] = std::fabs(zi * f) >= (neg ? tn : tp) ? static_cast<T>(static_cast<double>(tmp[i]) * g)
                                                  : static_cast<T>(zi * (neg ? sn : sp));
    }
    return;
  }
  for (std::size_t i = 0; i < n; ++i) tmp[i] = std::ldexp(z[i], s);
  forward(tmp, tmp, n);
  for (std::size_t i = 0; i < n; ++i) {
    const double zi = static_cast<double>(z[i]);
    const bool neg = zi < 0;
    h[i] = std::fabs(std::ldexp(zi, s)) >= (neg ? tn : tp)
               ? static_cast<T>(std::ldexp(static_cast<double>(tmp[i]), -s))
               : static_cast<T>(zi * (neg ? sn : sp));
  }
}

template void Activation::forward_scaled<float>(const float*, float*, std::size_t, int,
                                                float*) const;
template void Activation::forward_scaled<double>(const double*, double*, std::size_t, int,
                                                 double*) const;
template void Activation::forward<float>(const float*, float*, std::size_t) const;
template void Activation::forward<double>(const double*, double*, std::size_t) const;
template void Activation::backward<float>(const float*, const float*, const float*, float*,
                                          std::size_t) const;
template void Activation::backward<double>(const double*, const double*, const double*, double*,
                                           std::size_t) const;

// ---- the block ---------------------------------------------------------------------

namespace {
int clamp_exp(std::int64_t k) {
  return static_cast<int>(std::clamp<std::int64_t>(k, -100000, 100000));
}
}  // namespace

template <class T>
std::string ActivationBlock<T>::describe() const {
  return "Activation('" + act_.name() + "')";
}

template <class T>
bool ActivationBlock<T>::can_zero() const {
  return act_.kind == Act::relu || (act_.kind == Act::leaky_relu && act_.negative_slope == 0.0);
}

template <class T>
bool ActivationBlock<T>::absorbs_tiny_input() const {
  return act_.kind == Act::sigmoid || act_.kind == Act::softplus;
}

template <class T>
std::int64_t ActivationBlock<T>::forward(const ForwardArgs<T>& a) const {
  const std::size_t m = a.rows * static_cast<std::size_t>(this->in_);
  if (act_.positively_homogeneous()) {  // phi(2^k u) = 2^k phi(u)
    act_.forward(a.x, a.y, m);
    return a.ex;
  }
  if (a.ex < 0 && act_.linear_near_zero()) {
    act_.forward_scaled(a.x, a.y, m, clamp_exp(a.ex), a.scratch);
    return a.ex;
  }
  if (a.ex == 0) {
    act_.forward(a.x, a.y, m);
    return 0;
  }
  if (a.y != a.x) std::copy(a.x, a.x + m, a.y);
  scale_pow2(a.y, m, clamp_exp(a.ex));
  act_.forward(a.y, a.y, m);
  return 0;
}

template <class T>
std::int64_t ActivationBlock<T>::backward_input(const BackwardArgs<T>& a) const {
  const std::size_t m = a.rows * static_cast<std::size_t>(this->in_);
  if (act_.kind == Act::linear) {
    if (a.dx != a.dy) std::copy(a.dy, a.dy + m, a.dx);
    return a.gy;
  }
  // phi' is taken from the input z or from the output h, never both: only that one is read.
  const bool from_z = act_.needs_input();
  const T* z = from_z ? a.x : nullptr;
  const T* h = from_z ? nullptr : a.y;
  const std::int64_t e = from_z ? a.ex : a.ey;
  if (act_.kind == Act::tanh && h && e < 0) {
    const MaxAbs mh = max_abs(h, m);
    if (mh.finite && std::ldexp(mh.value, clamp_exp(e)) < kTanhFlat<T>) {
      if (a.dx != a.dy) std::copy(a.dy, a.dy + m, a.dx);
      return a.gy;
    }
  }
  if (!act_.positively_homogeneous() && e != 0 && (z || h)) {
    // phi' at the true scale (where a carried small value underflows there, phi'(0)).
    const T* src = from_z ? z : h;
    std::copy(src, src + m, a.scratch);
    scale_pow2(a.scratch, m, clamp_exp(e));
    (from_z ? z : h) = a.scratch;
  }
  act_.backward(z, h, a.dy, a.dx, m);
  return a.gy;
}

template <class T>
std::unique_ptr<Block<double>> ActivationBlock<T>::to_double() const {
  auto d = std::make_unique<ActivationBlock<double>>(this->in_, act_);
  d->set_name(this->name_);
  return d;
}

template <class T>
void ActivationBlock<T>::derivative(const JacobianArgs<T>& a, T* d) const {
  const std::size_t m = a.rows * static_cast<std::size_t>(this->in_);
  std::vector<T> ones(m, T(1));
  BackwardArgs<T> b = a;
  b.dy = ones.data();
  b.gy = 0;
  b.dx = d;
  backward_input(b);
}

template <class T>
void ActivationBlock<T>::jvp(const JacobianArgs<T>& a, const T* v, int k, T* out) const {
  const std::size_t m = a.rows * static_cast<std::size_t>(this->in_);
  std::vector<T> d(m);
  derivative(a, d.data());
  for (std::size_t j = 0; j < static_cast<std::size_t>(k); ++j)
    for (std::size_t i = 0; i < m; ++i) out[j * m + i] = d[i] * v[j * m + i];
}

template <class T>
void ActivationBlock<T>::vjp(const JacobianArgs<T>& a, const T* u, int k, T* out) const {
  jvp(a, u, k, out);  // diagonal
}

template class ActivationBlock<float>;
template class ActivationBlock<double>;

}  // namespace gradchain
