#include "gradchain/layer_norm.hpp"

#include <algorithm>
#include <cmath>
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
LayerNorm<T>::LayerNorm(int width, double eps, bool elementwise_affine, bool bias)
    : Block<T>(width, width),
      eps_(eps),
      affine_(width > 0 ? static_cast<std::size_t>(width) : 0, elementwise_affine,
              elementwise_affine && bias) {
  if (width <= 0)
    throw std::invalid_argument("LayerNorm: width must be positive; got " + std::to_string(width));
  if (!(eps >= 0.0) || !std::isfinite(eps))
    throw std::invalid_argument("LayerNorm: eps must be a finite number >= 0; got " +
                                clip::format_double(eps));
}

template <class T>
std::string LayerNorm<T>::describe() const {
  std::string s = "LayerNorm(" + std::to_string(this->in_) + ", eps=" + clip::format_double(eps_);
  if (!affine_.has_weight())
    s += ", elementwise_affine=False";
  else if (!affine_.has_bias())
    s += ", bias=False";
  return s + ")";
}

template <class T>
std::vector<ParamInfo> LayerNorm<T>::params() const {
  std::vector<ParamInfo> p;
  if (affine_.has_weight()) p.push_back({"weight", {this->in_}, false});
  if (affine_.has_bias()) p.push_back({"bias", {this->in_}, false});
  return p;
}

template <class T>
T* LayerNorm<T>::param_data(std::size_t i) {
  return i == 0 ? affine_.weight().data() : affine_.bias().data();
}

template <class T>
std::int64_t LayerNorm<T>::forward(const ForwardArgs<T>& a) const {
  const auto L = norm::Layout::rows(a.rows, static_cast<std::size_t>(this->in_));
  norm::Stats& s = stats_buffer();
  s.compute(a.x, a.ex, L, true, eps_);
  return norm::forward(a.x, L, s, affine_.view(), a.y);
}

template <class T>
std::int64_t LayerNorm<T>::backward_input(const BackwardArgs<T>& a) const {
  const auto L = norm::Layout::rows(a.rows, static_cast<std::size_t>(this->in_));
  norm::Stats& s = stats_buffer();
  s.compute(a.x, a.ex, L, true, eps_);
  return norm::backward_input(a.x, a.dy, a.gy, L, s, true, affine_.view(), a.dx);
}

template <class T>
void LayerNorm<T>::backward_params(const BackwardArgs<T>& a, const ParamGradArgs&, T* const* grads,
                                   ParamGrad* out) const {
  if (!affine_.has_weight()) return;
  const auto L = norm::Layout::rows(a.rows, static_cast<std::size_t>(this->in_));
  norm::Stats& s = stats_buffer();
  s.compute(a.x, a.ex, L, true, eps_);
  std::int64_t eb = 0;
  norm::backward_params(a.x, a.dy, a.gy, L, s, L.len, grads[0], out[0].exp,
                        affine_.has_bias() ? grads[1] : nullptr, eb);
  if (affine_.has_bias()) out[1].exp = eb;
}

template <class T>
std::unique_ptr<Block<double>> LayerNorm<T>::to_double() const {
  auto d = std::make_unique<LayerNorm<double>>(this->in_, eps_, affine_.has_weight(),
                                               affine_.has_bias());
  if (affine_.has_weight())
    std::copy(affine_.weight().begin(), affine_.weight().end(), d->param_data(0));
  if (affine_.has_bias()) std::copy(affine_.bias().begin(), affine_.bias().end(), d->param_data(1));
  d->params_changed();
  d->set_name(this->name_);
  return d;
}

template <class T>
void LayerNorm<T>::jvp(const JacobianArgs<T>& a, const T* v, int k, T* out) const {
  const auto L = norm::Layout::rows(a.rows, static_cast<std::size_t>(this->in_));
  norm::Stats& s = stats_buffer();
  s.compute(a.x, a.ex, L, true, eps_);
  norm::jacobian_product(a.x, L, s, true, affine_.view(), v, k, false, out);
}

template <class T>
void LayerNorm<T>::vjp(const JacobianArgs<T>& a, const T* u, int k, T* out) const {
  const auto L = norm::Layout::rows(a.rows, static_cast<std::size_t>(this->in_));
  norm::Stats& s = stats_buffer();
  s.compute(a.x, a.ex, L, true, eps_);
  norm::jacobian_product(a.x, L, s, true, affine_.view(), u, k, true, out);
}

template class LayerNorm<float>;
template class LayerNorm<double>;

}  // namespace gradchain
