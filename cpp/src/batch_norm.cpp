#include "gradchain/batch_norm.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "gradchain/clip.hpp"
#include "gradchain/scaled.hpp"

namespace gradchain {

namespace {
norm::Stats& stats_buffer() {
  thread_local norm::Stats s;
  return s;
}

int clamp_exp(std::int64_t k) {
  return static_cast<int>(std::clamp<std::int64_t>(k, -100000, 100000));
}

// The kernels normalise contiguous groups: the columns of a rows x width array go through
// them transposed, `count` arrays one after another.
template <class T>
T* transposed(const T* src, std::size_t rows, std::size_t width, std::vector<T>& buf,
              std::size_t count = 1) {
  const std::size_t m = rows * width;
  buf.resize(m * count);
  for (std::size_t j = 0; j < count; ++j)
    norm::transpose(src + j * m, rows, width, buf.data() + j * m);
  return buf.data();
}

template <class T>
void transpose_back(const T* src, std::size_t rows, std::size_t width, T* dst,
                    std::size_t count = 1) {
  const std::size_t m = rows * width;
  for (std::size_t j = 0; j < count; ++j) norm::transpose(src + j * m, width, rows, dst + j * m);
}

template <class T>
struct Scratch {
  std::vector<T> x, dy, out;
};

template <class T>
Scratch<T>& scratch() {
  thread_local Scratch<T> s;
  return s;
}
}  // namespace

template <class T>
BatchNorm<T>::BatchNorm(int width, double eps, std::optional<double> momentum, bool affine,
                        bool track_running_stats)
    : Block<T>(width, width),
      eps_(eps),
      momentum_(momentum),
      track_(track_running_stats),
      affine_(width > 0 ? static_cast<std::size_t>(width) : 0, affine, affine) {
  if (width <= 0)
    throw std::invalid_argument("BatchNorm: width must be positive; got " + std::to_string(width));
  if (!(eps >= 0.0) || !std::isfinite(eps))
    throw std::invalid_argument("BatchNorm: eps must be a finite number >= 0; got " +
                                clip::format_double(eps));
  if (momentum && !(*momentum >= 0.0 && *momentum <= 1.0))
    throw std::invalid_argument("BatchNorm: momentum must be a number in [0, 1] or None; got " +
                                clip::format_double(*momentum));
  if (track_) {
    running_mean_.assign(static_cast<std::size_t>(width), T(0));
    running_var_.assign(static_cast<std::size_t>(width), T(1));
  }
}

template <class T>
std::string BatchNorm<T>::describe() const {
  std::string s =
      "BatchNorm(" + std::to_string(this->in_) + ", eps=" + clip::format_double(eps_) +
      ", momentum=" + (momentum_ ? clip::format_double(*momentum_) : std::string("None"));
  if (!affine_.has_weight()) s += ", affine=False";
  if (!track_) s += ", track_running_stats=False";
  return s + ")";
}

template <class T>
std::vector<ParamInfo> BatchNorm<T>::params() const {
  std::vector<ParamInfo> p;
  if (affine_.has_weight()) {
    p.push_back({"weight", {this->in_}, false});
    p.push_back({"bias", {this->in_}, false});
  }
  if (track_) {
    p.push_back({"running_mean", {this->in_}, true});
    p.push_back({"running_var", {this->in_}, true});
    p.push_back({"num_batches_tracked", {}, true});
  }
  return p;
}

template <class T>
T* BatchNorm<T>::param_data(std::size_t i) {
  if (affine_.has_weight()) {
    if (i == 0) return affine_.weight().data();
    if (i == 1) return affine_.bias().data();
    i -= 2;
  }
  if (i == 0) return running_mean_.data();
  if (i == 1) return running_var_.data();
  return &num_batches_tracked_;
}

template <class T>
void BatchNorm<T>::eval_coefficients(std::vector<double>& alpha, std::vector<double>& beta) const {
  const std::size_t n = static_cast<std::size_t>(this->in_);
  alpha.resize(n);
  beta.resize(n);
  const auto& w = affine_.weight();
  const auto& b = affine_.bias();
  for (std::size_t j = 0; j < n; ++j) {
    const double invstd = 1.0 / std::sqrt(static_cast<double>(running_var_[j]) + eps_);
    alpha[j] = affine_.has_weight() ? invstd * static_cast<double>(w[j]) : invstd;
    beta[j] = (affine_.has_bias() ? static_cast<double>(b[j]) : 0.0) -
              static_cast<double>(running_mean_[j]) * alpha[j];
  }
}

template <class T>
std::int64_t BatchNorm<T>::forward(const ForwardArgs<T>& a) const {
  const std::size_t n = static_cast<std::size_t>(this->in_);
  if (batch_stats(a.train)) {
    if (a.rows < 2)
      throw std::invalid_argument(describe() +
                                  ": Expected more than 1 value per channel when training, got "
                                  "input size [" +
                                  std::to_string(a.rows) + ", " + std::to_string(n) + "]");
    if (eps_ <= 0.0)
      throw std::invalid_argument(describe() +
                                  ": batch_norm eps must be positive during training, but got " +
                                  clip::format_double(eps_));
    const auto L = norm::Layout::features(a.rows, n);
    Scratch<T>& t = scratch<T>();
    const T* xt = transposed(a.x, a.rows, n, t.x);
    norm::Stats& s = stats_buffer();
    s.compute(xt, a.ex, L, true, eps_);
    if (a.local) s.save(*a.local);
    t.out.resize(a.rows * n);
    const std::int64_t ey = norm::forward(xt, L, s, affine_.view(), t.out.data());
    transpose_back(t.out.data(), a.rows, n, a.y);
    return ey;
  }
  thread_local std::vector<double> alpha, beta;
  eval_coefficients(alpha, beta);
  const bool homogeneous = std::all_of(beta.begin(), beta.end(), [](double v) { return v == 0; });
  if (homogeneous) {  // the scale is carried
    double amax = 0;
    for (double v : alpha) amax = std::max(amax, std::fabs(v));
    const int ka = std::isfinite(amax) ? rescale_exponent<T>(amax) : 0;
    for (double& v : alpha) v = std::ldexp(v, -ka);
    for (std::size_t r = 0; r < a.rows; ++r)
      for (std::size_t j = 0; j < n; ++j)
        a.y[r * n + j] = static_cast<T>(static_cast<double>(a.x[r * n + j]) * alpha[j]);
    return a.ex + ka;
  }
  // The running mean and the bias live at the true scale.
  const int ex = clamp_exp(a.ex);
  for (std::size_t r = 0; r < a.rows; ++r)
    for (std::size_t j = 0; j < n; ++j)
      a.y[r * n + j] =
          static_cast<T>(std::ldexp(static_cast<double>(a.x[r * n + j]), ex) * alpha[j] + beta[j]);
  return 0;
}

template <class T>
void BatchNorm<T>::after_forward(const std::vector<double>& local, std::size_t batch) {
  if (!track_ || batch < 2 || local.empty()) return;
  const std::size_t n = static_cast<std::size_t>(this->in_);
  const auto ex = static_cast<std::int64_t>(local[0]);
  norm::Stats s;
  if (!s.load(&local, n, ex)) return;
  num_batches_tracked_ += T(1);
  const double f = momentum_ ? *momentum_ : 1.0 / static_cast<double>(num_batches_tracked_);
  const double B = static_cast<double>(batch);
  for (std::size_t j = 0; j < n; ++j) {
    const double mean = std::ldexp(s.mean[j], clamp_exp(ex));
    const double var = std::ldexp(s.var[j] * B / (B - 1.0), clamp_exp(2 * ex));
    running_mean_[j] = static_cast<T>(f * mean + (1.0 - f) * static_cast<double>(running_mean_[j]));
    running_var_[j] = static_cast<T>(f * var + (1.0 - f) * static_cast<double>(running_var_[j]));
  }
}

template <class T>
const norm::Stats& BatchNorm<T>::batch_stats_of(const BackwardArgs<T>& a, const T* xt) const {
  const std::size_t n = static_cast<std::size_t>(this->in_);
  norm::Stats& s = stats_buffer();
  if (!s.load(a.local, n, a.ex)) s.compute(xt, a.ex, norm::Layout::features(a.rows, n), true, eps_);
  return s;
}

template <class T>
std::int64_t BatchNorm<T>::backward_input(const BackwardArgs<T>& a) const {
  const std::size_t n = static_cast<std::size_t>(this->in_);
  if (batch_stats(a.train)) {
    Scratch<T>& t = scratch<T>();
    const T* xt = transposed(a.x, a.rows, n, t.x);
    const T* dyt = transposed(a.dy, a.rows, n, t.dy);
    t.out.resize(a.rows * n);
    const std::int64_t gx =
        norm::backward_input(xt, dyt, a.gy, norm::Layout::features(a.rows, n),
                             batch_stats_of(a, xt), true, affine_.view(), t.out.data());
    transpose_back(t.out.data(), a.rows, n, a.dx);
    return gx;
  }
  thread_local std::vector<double> alpha, beta;
  eval_coefficients(alpha, beta);
  double amax = 0;
  for (double v : alpha) amax = std::max(amax, std::fabs(v));
  const int ka = std::isfinite(amax) ? rescale_exponent<T>(amax) : 0;
  for (double& v : alpha) v = std::ldexp(v, -ka);
  for (std::size_t r = 0; r < a.rows; ++r)
    for (std::size_t j = 0; j < n; ++j)
      a.dx[r * n + j] = static_cast<T>(static_cast<double>(a.dy[r * n + j]) * alpha[j]);
  return a.gy + ka;
}

template <class T>
void BatchNorm<T>::backward_params(const BackwardArgs<T>& a, const ParamGradArgs&, T* const* grads,
                                   ParamGrad* out) const {
  if (!affine_.has_weight()) return;
  const std::size_t n = static_cast<std::size_t>(this->in_);
  if (batch_stats(a.train)) {
    Scratch<T>& t = scratch<T>();
    const T* xt = transposed(a.x, a.rows, n, t.x);
    const T* dyt = transposed(a.dy, a.rows, n, t.dy);
    norm::backward_params(xt, dyt, a.gy, norm::Layout::features(a.rows, n), batch_stats_of(a, xt),
                          n, grads[0], out[0].exp, grads[1], out[1].exp);
    return;
  }
  // xhat = (x - running_mean) * invstd; with a zero running mean x's scale is carried.
  const bool zero_mean =
      std::all_of(running_mean_.begin(), running_mean_.end(), [](T v) { return v == T(0); });
  thread_local std::vector<double> aw, ab;
  aw.assign(n, 0.0);
  ab.assign(n, 0.0);
  const int ex = clamp_exp(a.ex);
  for (std::size_t r = 0; r < a.rows; ++r)
    for (std::size_t j = 0; j < n; ++j) {
      const double d = static_cast<double>(a.dy[r * n + j]);
      const double x = static_cast<double>(a.x[r * n + j]);
      const double invstd = 1.0 / std::sqrt(static_cast<double>(running_var_[j]) + eps_);
      const double xhat =
          zero_mean ? x * invstd
                    : (std::ldexp(x, ex) - static_cast<double>(running_mean_[j])) * invstd;
      aw[j] += d * xhat;
      ab[j] += d;
    }
  out[0].exp = a.gy + (zero_mean ? a.ex : 0) + norm::store_scaled(aw, grads[0]);
  out[1].exp = a.gy + norm::store_scaled(ab, grads[1]);
}

template <class T>
std::unique_ptr<Block<double>> BatchNorm<T>::to_double() const {
  auto d =
      std::make_unique<BatchNorm<double>>(this->in_, eps_, momentum_, affine_.has_weight(), track_);
  std::size_t i = 0;
  if (affine_.has_weight()) {
    std::copy(affine_.weight().begin(), affine_.weight().end(), d->param_data(i++));
    std::copy(affine_.bias().begin(), affine_.bias().end(), d->param_data(i++));
  }
  if (track_) {
    std::copy(running_mean_.begin(), running_mean_.end(), d->param_data(i++));
    std::copy(running_var_.begin(), running_var_.end(), d->param_data(i++));
    *d->param_data(i) = static_cast<double>(num_batches_tracked_);
  }
  d->params_changed();
  d->set_name(this->name_);
  return d;
}

template <class T>
void BatchNorm<T>::jacobian_batch(const JacobianArgs<T>& a, const T* v, int k, bool transpose,
                                  T* out) const {
  const std::size_t n = static_cast<std::size_t>(this->in_);
  const auto kk = static_cast<std::size_t>(k);
  Scratch<T>& t = scratch<T>();
  const T* xt = transposed(a.x, a.rows, n, t.x);
  const T* vt = transposed(v, a.rows, n, t.dy, kk);
  t.out.resize(a.rows * n * kk);
  norm::jacobian_product(xt, norm::Layout::features(a.rows, n), batch_stats_of(a, xt), true,
                         affine_.view(), vt, k, transpose, t.out.data());
  transpose_back(t.out.data(), a.rows, n, out, kk);
}

template <class T>
void BatchNorm<T>::jvp(const JacobianArgs<T>& a, const T* v, int k, T* out) const {
  const std::size_t n = static_cast<std::size_t>(this->in_);
  if (batch_stats(a.train)) {
    jacobian_batch(a, v, k, false, out);
    return;
  }
  thread_local std::vector<double> alpha, beta;
  eval_coefficients(alpha, beta);
  const std::size_t m = a.rows * static_cast<std::size_t>(k);
  for (std::size_t r = 0; r < m; ++r)
    for (std::size_t j = 0; j < n; ++j)
      out[r * n + j] = static_cast<T>(static_cast<double>(v[r * n + j]) * alpha[j]);
}

template <class T>
void BatchNorm<T>::vjp(const JacobianArgs<T>& a, const T* u, int k, T* out) const {
  if (batch_stats(a.train)) {
    jacobian_batch(a, u, k, true, out);
    return;
  }
  jvp(a, u, k, out);  // diagonal
}

template class BatchNorm<float>;
template class BatchNorm<double>;

}  // namespace gradchain
