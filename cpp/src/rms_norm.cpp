#include "gradchain/rms_norm.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

#include "gradchain/clip.hpp"

namespace gradchain {

namespace {
norm::Stats& stats_buffer() {
  thread_local norm::Stats s;
  return s;
}
}  // namespace

template <class T>
RMSNorm<T>::RMSNorm(int width, std::optional<double> eps, bool elementwise_affine)
    : Block<T>(width, width),
      eps_(eps),
      affine_(width > 0 ? static_cast<std::size_t>(width) : 0, elementwise_affine, false) {
  if (width <= 0)
    throw std::invalid_argument("RMSNorm: width must be positive; got " + std::to_string(width));
  if (eps && (!(*eps >= 0.0) || !std::isfinite(*eps)))
    throw std::invalid_argument("RMSNorm: eps must be a finite number >= 0 or None; got " +
                                clip::format_double(*eps));
}

template <class T>
double RMSNorm<T>::effective_eps() const {
  return eps_ ? *eps_ : static_cast<double>(std::numeric_limits<T>::epsilon());
}

template <class T>
std::string RMSNorm<T>::describe() const {
  std::string s = "RMSNorm(" + std::to_string(this->in_) +
                  ", eps=" + (eps_ ? clip::format_double(*eps_) : std::string("None"));
  if (!affine_.has_weight()) s += ", elementwise_affine=False";
  return s + ")";
}

template <class T>
std::vector<ParamInfo> RMSNorm<T>::params() const {
  if (!affine_.has_weight()) return {};
  return {{"weight", {this->in_}, false}};
}

template <class T>
std::int64_t RMSNorm<T>::forward(const ForwardArgs<T>& a) const {
  const auto L = norm::Layout::rows(a.rows, static_cast<std::size_t>(this->in_));
  norm::Stats& s = stats_buffer();
  s.compute(a.x, a.ex, L, false, effective_eps());
  return norm::forward(a.x, L, s, affine_.view(), a.y);
}

template <class T>
std::int64_t RMSNorm<T>::backward_input(const BackwardArgs<T>& a) const {
  const auto L = norm::Layout::rows(a.rows, static_cast<std::size_t>(this->in_));
  norm::Stats& s = stats_buffer();
  s.compute(a.x, a.ex, L, false, effective_eps());
  return norm::backward_input(a.x, a.dy, a.gy, L, s, false, affine_.view(), a.dx);
}

template <class T>
void RMSNorm<T>::backward_params(const BackwardArgs<T>& a, const ParamGradArgs&, T* const* grads,
                                 ParamGrad* out) const {
  if (!affine_.has_weight()) return;
  const auto L = norm::Layout::rows(a.rows, static_cast<std::size_t>(this->in_));
  norm::Stats& s = stats_buffer();
  s.compute(a.x, a.ex, L, false, effective_eps());
  std::int64_t unused = 0;
  norm::backward_params<T>(a.x, a.dy, a.gy, L, s, L.len, grads[0], out[0].exp, nullptr, unused);
}

template <class T>
std::unique_ptr<Block<double>> RMSNorm<T>::to_double() const {
  // eps=None means the machine epsilon of the dtype the model was built in.
  auto d = std::make_unique<RMSNorm<double>>(this->in_, effective_eps(), affine_.has_weight());
  if (affine_.has_weight()) {
    const auto& w = affine_.weight();
    std::copy(w.begin(), w.end(), d->param_data(0));
  }
  d->params_changed();
  d->set_name(this->name_);
  return d;
}

template <class T>
void RMSNorm<T>::jvp(const JacobianArgs<T>& a, const T* v, int k, T* out) const {
  const auto L = norm::Layout::rows(a.rows, static_cast<std::size_t>(this->in_));
  norm::Stats& s = stats_buffer();
  s.compute(a.x, a.ex, L, false, effective_eps());
  norm::jacobian_product(a.x, L, s, false, affine_.view(), v, k, false, out);
}

template <class T>
void RMSNorm<T>::vjp(const JacobianArgs<T>& a, const T* u, int k, T* out) const {
  const auto L = norm::Layout::rows(a.rows, static_cast<std::size_t>(this->in_));
  norm::Stats& s = stats_buffer();
  s.compute(a.x, a.ex, L, false, effective_eps());
  norm::jacobian_product(a.x, L, s, false, affine_.view(), u, k, true, out);
}

template class RMSNorm<float>;
template class RMSNorm<double>;

}  // namespace gradchain
