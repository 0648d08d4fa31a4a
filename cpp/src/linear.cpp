#include "gradchain/linear.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "gradchain/blas.hpp"
#include "gradchain/scaled.hpp"
#include "gradchain/small_gemm.hpp"
#include "gradchain/weight_grad.hpp"

namespace gradchain {

namespace {
using blas::Trans;

int clamp_exp(std::int64_t k) {
  return static_cast<int>(std::clamp<std::int64_t>(k, -100000, 100000));
}
}  // namespace

template <class T>
Linear<T>::Linear(int in_features, int out_features, bool bias, bool store)
    : Block<T>(in_features, out_features), has_bias_(bias), store_(store) {
  if (in_features <= 0 || out_features <= 0)
    throw std::invalid_argument("Linear needs positive in_features and out_features; got " +
                                std::to_string(in_features) + " and " +
                                std::to_string(out_features));
  if (!store) return;
  w_.assign(static_cast<std::size_t>(in_features) * static_cast<std::size_t>(out_features), T(0));
  if (bias) b_.assign(static_cast<std::size_t>(out_features), T(0));
}

template <class T>
std::string Linear<T>::describe() const {
  return "Linear(" + std::to_string(this->in_) + ", " + std::to_string(this->out_) +
         (has_bias_ ? ")" : ", bias=False)");
}

template <class T>
std::vector<ParamInfo> Linear<T>::params() const {
  std::vector<ParamInfo> p{{"weight", {this->out_, this->in_}, false}};
  if (has_bias_) p.push_back({"bias", {this->out_}, false});
  return p;
}

template <class T>
void Linear<T>::init(const InitSpec& spec, const Philox& rng, std::uint64_t stream,
                     Canceller* cancel, bool keep_units) {
  if (!store_) {
    spec_ = spec;
    rng_ = rng;
    stream_ = stream;
    has_spec_ = true;
    return;
  }
  const UnitFamily family = unit_family(spec.kind);
  const bool reuse = keep_units && units_ && units_->family == family && units_->rng == rng &&
                     units_->stream == stream;
  if (keep_units && !reuse) {
    units_.reset();  // before drawing the new ones
    auto u = std::make_shared<Units>(Units{family, rng, stream, std::vector<double>(w_.size()),
                                           std::vector<double>(has_bias_ ? b_.size() : 0)});
    init_weight_unit(u->w.data(), this->out_, this->in_, family, rng, stream, cancel);
    if (has_bias_) init_bias_unit(u->b.data(), this->out_, rng, stream);
    u->w_max = max_abs(u->w.data(), u->w.size()).value;
    units_ = std::move(u);
  } else if (!keep_units) {
    units_.reset();
  }
  const std::size_t n = w_.size(), nb = static_cast<std::size_t>(this->out_);
  const double scale = weight_scale(this->out_, this->in_, spec);
  // A chain redrawn with only new biases (a sweep over bias_std) keeps its weights as
  // they are: they are already its units times this scale.
  const bool same_weights = reuse && scale == applied_scale_;
  std::vector<double> scratch;
  double* w;
  if constexpr (std::is_same_v<T, double>) {
    w = w_.data();
  } else {
    scratch.resize(same_weights ? nb : std::max(n, nb));
    w = scratch.data();
  }
  if (!same_weights) {
    if (units_)
      scale_draws(units_->w.data(), scale, w, n);
    else
      init_weight(w, this->out_, this->in_, spec, rng, stream, cancel);
    if constexpr (!std::is_same_v<T, double>)
      std::transform(w, w + n, w_.begin(), [](double v) { return static_cast<T>(v); });
  }
  if (has_bias_) {
    if constexpr (std::is_same_v<T, double>) w = b_.data();
    if (units_ && spec.bias_std != 0.0)
      scale_draws(units_->b.data(), spec.bias_std, w, nb);
    else
      init_bias(w, this->out_, spec, rng, stream);
    if constexpr (!std::is_same_v<T, double>)
      std::transform(w, w + nb, b_.begin(), [](double v) { return static_cast<T>(v); });
  }
  if (!units_) {
    params_changed();
    return;
  }
  // The largest weight without reading the weights again: T(fl(w_max * |scale|)), as
  // rounding (to double, then to T) never reorders magnitudes.
  const T w_max = static_cast<T>(units_->w_max * std::abs(scale));
  weight_changed(MaxAbs{static_cast<double>(w_max), std::isfinite(w_max)});
  applied_scale_ = scale;
}

template <class T>
void Linear<T>::draw_params(T* w, T* b) const {
  if (!has_spec_)
    throw std::logic_error("gradchain: " + describe() + " keeps no weights and has no initializer");
  const std::size_t n = static_cast<std::size_t>(this->in_) * static_cast<std::size_t>(this->out_);
  const std::size_t nb = static_cast<std::size_t>(this->out_);
  // The same doubles as init() draws, rounded the same way (float64 straight into place).
  if constexpr (std::is_same_v<T, double>) {
    init_weight(w, this->out_, this->in_, spec_, rng_, stream_);
    if (has_bias_ && b) init_bias(b, this->out_, spec_, rng_, stream_);
    return;
  }
  thread_local std::vector<double> d;
  d.resize(std::max(n, nb));
  init_weight(d.data(), this->out_, this->in_, spec_, rng_, stream_);
  std::transform(d.begin(), d.begin() + static_cast<std::ptrdiff_t>(n), w,
                 [](double v) { return static_cast<T>(v); });
  if (!has_bias_ || !b) return;
  init_bias(d.data(), this->out_, spec_, rng_, stream_);
  std::transform(d.begin(), d.begin() + static_cast<std::ptrdiff_t>(nb), b,
                 [](double v) { return static_cast<T>(v); });
}

// Layout: W * 2^-wexp (the matrix the products use), b, wexp, zero_bias.
template <class T>
std::size_t Linear<T>::draw_size() const {
  if (store_) return 0;
  return static_cast<std::size_t>(this->in_) * static_cast<std::size_t>(this->out_) +
         static_cast<std::size_t>(this->out_) + 2;
}

template <class T>
void Linear<T>::draw(T* out) const {
  const std::size_t n = static_cast<std::size_t>(this->in_) * static_cast<std::size_t>(this->out_);
  const std::size_t nb = static_cast<std::size_t>(this->out_);
  T* b = out + n;
  draw_params(out, b);
  if (!has_bias_) std::fill(b, b + nb, T(0));
  // As params_changed() derives them from kept weights.
  const int wexp = rescale_exponent<T>(max_abs(out, n).value);
  if (wexp != 0) scale_pow2(out, n, -wexp);
  out[n + nb] = static_cast<T>(wexp);
  out[n + nb + 1] = std::all_of(b, b + nb, [](T v) { return v == T(0); }) ? T(1) : T(0);
}

template <class T>
void Linear<T>::params_changed() {
  applied_scale_ = std::numeric_limits<double>::quiet_NaN();  // written from outside
  weight_changed(max_abs(w_.data(), w_.size()));
}

template <class T>
void Linear<T>::weight_changed(MaxAbs s) {
  if (!s.finite)
    throw std::invalid_argument(describe() + ": weight must be finite; got NaN or inf");
  wexp_ = rescale_exponent<T>(s.value);
  wscaled_.clear();
  if (wexp_ != 0) {
    wscaled_ = w_;
    scale_pow2(wscaled_.data(), wscaled_.size(), -wexp_);
  }
  zero_bias_ = std::all_of(b_.begin(), b_.end(), [](T v) { return v == T(0); });
  if (!max_abs(b_.data(), b_.size()).finite)
    throw std::invalid_argument(describe() + ": bias must be finite; got NaN or inf");
}

template <class T>
void Linear<T>::prefetch(const T* drawn) const {
  const std::size_t n = static_cast<std::size_t>(this->in_) * static_cast<std::size_t>(this->out_);
  small::prefetch_during_next(drawn ? drawn : gemm_weight(), n * sizeof(T));
}

template <class T>
std::int64_t Linear<T>::forward(const ForwardArgs<T>& a) const {
  const int in = this->in_, out = this->out_;
  const std::size_t n = static_cast<std::size_t>(in) * static_cast<std::size_t>(out);
  const T* W = a.drawn ? a.drawn : gemm_weight();
  const T* bias = a.drawn ? a.drawn + n : b_.data();
  const int wexp = a.drawn ? static_cast<int>(a.drawn[n + static_cast<std::size_t>(out)]) : wexp_;
  const bool zero_bias =
      a.drawn ? a.drawn[n + static_cast<std::size_t>(out) + 1] != T(0) : zero_bias_;
  blas::gemm(Trans::N, Trans::T, static_cast<int>(a.rows), out, in, T(1), a.x, in, W, in, T(0), a.y,
             out);
  const std::int64_t s = a.ex + wexp;
  if (zero_bias) return s;  // homogeneous: the scale is carried
  // b is added at the true scale (where x W^T underflows, b dominates anyway).
  const std::size_t m = a.rows * static_cast<std::size_t>(out);
  scale_pow2(a.y, m, clamp_exp(s));
  for (std::size_t r = 0; r < a.rows; ++r) {
    T* row = a.y + r * static_cast<std::size_t>(out);
    for (int j = 0; j < out; ++j) row[j] += bias[static_cast<std::size_t>(j)];
  }
  return 0;
}

template <class T>
std::int64_t Linear<T>::backward_input(const BackwardArgs<T>& a) const {
  const int in = this->in_, out = this->out_;
  const std::size_t n = static_cast<std::size_t>(in) * static_cast<std::size_t>(out);
  const T* W = a.drawn ? a.drawn : gemm_weight();
  const int wexp = a.drawn ? static_cast<int>(a.drawn[n + static_cast<std::size_t>(out)]) : wexp_;
  blas::gemm(Trans::N, Trans::N, static_cast<int>(a.rows), in, out, T(1), a.dy, out, W, in, T(0),
             a.dx, in);
  return a.gy + wexp;
}

template <class T>
void Linear<T>::backward_params(const BackwardArgs<T>& a, const ParamGradArgs& opt, T* const* grads,
                                ParamGrad* out) const {
  const std::size_t nin = static_cast<std::size_t>(this->in_);
  const std::size_t nout = static_cast<std::size_t>(this->out_);
  if (has_bias_) {
    column_sums(a.dy, a.rows, nout, grads[1]);
    out[1].exp = a.gy;
  }
  if (a.rows == 1 && !opt.need_values) {
    // dW = dy^T x is an outer product: its entrywise p-norms factorise,
    // ||a b^T||_p = ||a||_p ||b||_p, and the out x in matrix never has to be written.
    const Scan sd = scan(a.dy, nout), sx = scan(a.x, nin);
    out[0].has_norms = true;
    out[0].log10_norm = log10_norm(sd, a.gy) + log10_norm(sx, a.ex);
    out[0].log10_pnorm = opt.norm_type == 2.0 ? out[0].log10_norm
                                              : log10_pnorm(a.dy, nout, sd, a.gy, opt.norm_type) +
                                                    log10_pnorm(a.x, nin, sx, a.ex, opt.norm_type);
    out[0].exp = a.gy + a.ex;
    return;
  }
  // Both factors are in the band (the driver keeps every boundary there).
  blas::gemm(Trans::T, Trans::N, this->out_, this->in_, static_cast<int>(a.rows), T(1), a.dy,
             this->out_, a.x, this->in_, T(0), grads[0], this->in_);
  out[0].exp = a.gy + a.ex;
  // The scan the driver would take, taken here: where the largest entry lies below the
  // products of two in-band maxima, rows may have met only in their small entries.
  const std::size_t n = nin * nout;
  Scan sc = scan(grads[0], n);
  constexpr int band = std::numeric_limits<T>::max_exponent / 5;
  if (sc.finite && sc.maxabs < std::ldexp(1.0, -2 * band)) {
    const std::vector<ColumnRun> runs{{0, 0, nout}};
    ProductRows<T> rows;
    rows.rows = a.rows;
    rows.d = a.dy;
    rows.ldd = nout;
    rows.runs = &runs;
    rows.m = a.x;
    rows.width = nin;
    auto product = [&](const T* ds, const T* xs, std::size_t k, bool first) {
      blas::gemm(Trans::T, Trans::N, this->out_, this->in_, static_cast<int>(k), T(1), ds,
                 this->out_, xs, this->in_, first ? T(0) : T(1), grads[0], this->in_);
    };
    if (const auto k = rescaled_weight_grad(rows, 0, a.rows, product)) {
      out[0].exp += *k;
      sc = scan(grads[0], n);
    }
  }
  out[0].has_norms = true;
  out[0].log10_norm = log10_norm(sc, out[0].exp);
  out[0].log10_pnorm = log10_pnorm(grads[0], n, sc, out[0].exp, opt.norm_type);
}

template <class T>
std::unique_ptr<Block<double>> Linear<T>::to_double() const {
  auto d = std::make_unique<Linear<double>>(this->in_, this->out_, has_bias_);
  if (!store_) {  // the copy keeps them: this precision's weights, drawn once
    std::vector<T> w(static_cast<std::size_t>(this->in_) * static_cast<std::size_t>(this->out_));
    std::vector<T> b(static_cast<std::size_t>(this->out_));
    draw_params(w.data(), b.data());
    std::copy(w.begin(), w.end(), d->weight());
    if (has_bias_) std::copy(b.begin(), b.end(), d->bias());
  } else {
    std::copy(w_.begin(), w_.end(), d->weight());
    if (has_bias_) std::copy(b_.begin(), b_.end(), d->bias());
  }
  d->params_changed();
  d->set_name(this->name_);
  return d;
}

template <class T>
const T* Linear<T>::weight_for_jacobian(std::vector<T>& drawn) const {
  if (store_) return w_.data();
  drawn.resize(static_cast<std::size_t>(this->in_) * static_cast<std::size_t>(this->out_));
  draw_params(drawn.data(), nullptr);
  return drawn.data();
}

template <class T>
void Linear<T>::jvp(const JacobianArgs<T>& a, const T* v, int k, T* out) const {
  const int rows = static_cast<int>(a.rows) * k, in = this->in_, o = this->out_;
  std::vector<T> drawn;
  blas::gemm(Trans::N, Trans::T, rows, o, in, T(1), v, in, weight_for_jacobian(drawn), in, T(0),
             out, o);
}

template <class T>
void Linear<T>::vjp(const JacobianArgs<T>& a, const T* u, int k, T* out) const {
  const int rows = static_cast<int>(a.rows) * k, in = this->in_, o = this->out_;
  std::vector<T> drawn;
  blas::gemm(Trans::N, Trans::N, rows, in, o, T(1), u, o, weight_for_jacobian(drawn), in, T(0), out,
             in);
}

template class Linear<float>;
template class Linear<double>;

}  // namespace gradchain
