#include "gradchain/scale.hpp"

#include <cmath>
#include <cstdio>
#include <stdexcept>

namespace gradchain {

template <class T>
Scale<T>::Scale(int width, double c) : Block<T>(width, width), c_(c) {
  if (width <= 0) throw std::invalid_argument("Scale needs a positive width");
  if (!std::isfinite(c)) throw std::invalid_argument("Scale's value must be finite");
  m_ = static_cast<T>(c == 0.0 ? 0.0 : std::frexp(c, &k_));
}

template <class T>
std::string Scale<T>::describe() const {
  char buf[64];
  std::snprintf(buf, sizeof buf, "Scale(%.17g)", c_);
  return buf;
}

template <class T>
std::int64_t Scale<T>::forward(const ForwardArgs<T>& a) const {
  const std::size_t m = a.rows * static_cast<std::size_t>(this->in_);
  for (std::size_t i = 0; i < m; ++i) a.y[i] = m_ * a.x[i];
  return a.ex + k_;
}

template <class T>
std::int64_t Scale<T>::backward_input(const BackwardArgs<T>& a) const {
  const std::size_t m = a.rows * static_cast<std::size_t>(this->in_);
  for (std::size_t i = 0; i < m; ++i) a.dx[i] = m_ * a.dy[i];
  return a.gy + k_;
}

template <class T>
std::unique_ptr<Block<double>> Scale<T>::to_double() const {
  auto d = std::make_unique<Scale<double>>(this->in_, c_);
  d->set_name(this->name_);
  return d;
}

template <class T>
void Scale<T>::jvp(const JacobianArgs<T>& a, const T* v, int k, T* out) const {
  const std::size_t m = a.rows * static_cast<std::size_t>(this->in_) * static_cast<std::size_t>(k);
  const T c = static_cast<T>(c_);
  for (std::size_t i = 0; i < m; ++i) out[i] = c * v[i];
}

template <class T>
void Scale<T>::vjp(const JacobianArgs<T>& a, const T* u, int k, T* out) const {
  jvp(a, u, k, out);
}

template class Scale<float>;
template class Scale<double>;

}  // namespace gradchain
