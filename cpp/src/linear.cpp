#include "gradchain/linear.hpp"

#include <algorithm>
#include <stdexcept>

#include "gradchain/blas.hpp"
#include "gradchain/scaled.hpp"

namespace gradchain {

namespace {
using blas::Trans;

int clamp_exp(std::int64_t k) {
  return static_cast<int>(std::clamp<std::int64_t>(k, -100000, 100000));
}
}  // namespace

template <class T>
Linear<T>::Linear(int in_features, int out_features, bool bias)
    : Block<T>(in_features, out_features), has_bias_(bias) {
  if (in_features <= 0 || out_features <= 0)
    throw std::invalid_argument("Linear needs positive in_features and out_features; got " +
                                std::to_string(in_features) + " and " +
                                std::to_string(out_features));
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
                     Canceller* cancel) {
  std::vector<double> w(w_.size()), b(static_cast<std::size_t>(this->out_));
  init_weight(w.data(), this->out_, this->in_, spec, rng, stream, cancel);
  std::transform(w.begin(), w.end(), w_.begin(), [](double v) { return static_cast<T>(v); });
  if (has_bias_) {
    init_bias(b.data(), this->out_, spec, rng, stream);
    std::transform(b.begin(), b.end(), b_.begin(), [](double v) { return static_cast<T>(v); });
  }
  params_changed();
}

template <class T>
void Linear<T>::params_changed() {
  const MaxAbs s = max_abs(w_.data(), w_.size());
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
std::int64_t Linear<T>::forward(const ForwardArgs<T>& a) const {
  const int in = this->in_, out = this->out_;
  blas::gemm(Trans::N, Trans::T, static_cast<int>(a.rows), out, in, T(1), a.x, in, gemm_weight(),
             in, T(0), a.y, out);
  const std::int64_t s = a.ex + wexp_;
  if (zero_bias_) return s;  // homogeneous: the scale is carried
  // b is added at the true scale (where x W^T underflows, b dominates anyway).
  const std::size_t m = a.rows * static_cast<std::size_t>(out);
  scale_pow2(a.y, m, clamp_exp(s));
  for (std::size_t r = 0; r < a.rows; ++r) {
    T* row = a.y + r * static_cast<std::size_t>(out);
    for (int j = 0; j < out; ++j) row[j] += b_[static_cast<std::size_t>(j)];
  }
  return 0;
}

template <class T>
std::int64_t Linear<T>::backward_input(const BackwardArgs<T>& a) const {
  const int in = this->in_, out = this->out_;
  blas::gemm(Trans::N, Trans::N, static_cast<int>(a.rows), in, out, T(1), a.dy, out, gemm_weight(),
             in, T(0), a.dx, in);
  return a.gy + wexp_;
}

template <class T>
void Linear<T>::backward_params(const BackwardArgs<T>& a, const ParamGradArgs& opt, T* const* grads,
                                ParamGrad* out) const {
  const std::size_t nin = static_cast<std::size_t>(this->in_);
  const std::size_t nout = static_cast<std::size_t>(this->out_);
  if (has_bias_) {
    T* db = grads[1];
    std::fill(db, db + nout, T(0));
    for (std::size_t r = 0; r < a.rows; ++r) {
      const T* row = a.dy + r * nout;
      for (std::size_t j = 0; j < nout; ++j) db[j] += row[j];
    }
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
}

template <class T>
std::unique_ptr<Block<double>> Linear<T>::to_double() const {
  auto d = std::make_unique<Linear<double>>(this->in_, this->out_, has_bias_);
  std::copy(w_.begin(), w_.end(), d->weight());
  if (has_bias_) std::copy(b_.begin(), b_.end(), d->bias());
  d->params_changed();
  d->set_name(this->name_);
  return d;
}

template <class T>
void Linear<T>::jvp(const JacobianArgs<T>& a, const T* v, int k, T* out) const {
  const int rows = static_cast<int>(a.rows) * k, in = this->in_, o = this->out_;
  blas::gemm(Trans::N, Trans::T, rows, o, in, T(1), v, in, w_.data(), in, T(0), out, o);
}

template <class T>
void Linear<T>::vjp(const JacobianArgs<T>& a, const T* u, int k, T* out) const {
  const int rows = static_cast<int>(a.rows) * k, in = this->in_, o = this->out_;
  blas::gemm(Trans::N, Trans::N, rows, in, o, T(1), u, o, w_.data(), in, T(0), out, in);
}

template class Linear<float>;
template class Linear<double>;

}  // namespace gradchain
