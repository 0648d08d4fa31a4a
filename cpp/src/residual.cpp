#include "gradchain/residual.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <stdexcept>

#include "gradchain/scaled.hpp"

namespace gradchain {

namespace {
int clamp_exp(std::int64_t k) {
  return static_cast<int>(std::clamp<std::int64_t>(k, -100000, 100000));
}
}  // namespace

template <class T>
Residual<T>::Residual(std::vector<std::unique_ptr<Block<T>>> body, double scale,
                      std::unique_ptr<Block<T>> shortcut)
    : Block<T>(0, 0), body_(std::move(body)), scale_(scale), shortcut_(std::move(shortcut)) {
  if (body_.empty()) throw std::invalid_argument("Residual needs at least one block in its body");
  if (!std::isfinite(scale)) throw std::invalid_argument("Residual's scale must be finite");
  this->in_ = body_.front()->in_width();
  this->out_ = body_.back()->out_width();
  for (std::size_t i = 1; i < body_.size(); ++i)
    if (body_[i - 1]->out_width() != body_[i]->in_width())
      throw std::invalid_argument("Residual body: block " + std::to_string(i - 1) + " (" +
                                  body_[i - 1]->describe() + ") gives width " +
                                  std::to_string(body_[i - 1]->out_width()) + " but block " +
                                  std::to_string(i) + " (" + body_[i]->describe() + ") takes " +
                                  std::to_string(body_[i]->in_width()));
  if (shortcut_) {
    if (shortcut_->in_width() != this->in_ || shortcut_->out_width() != this->out_)
      throw std::invalid_argument("Residual shortcut " + shortcut_->describe() + " must map " +
                                  std::to_string(this->in_) + " to " + std::to_string(this->out_) +
                                  " features");
  } else if (this->in_ != this->out_) {
    throw std::invalid_argument(
        "Residual body maps " + std::to_string(this->in_) + " features to " +
        std::to_string(this->out_) +
        "; x + f(x) needs equal widths, or a Linear shortcut (shortcut=True)");
  }
  m_ = static_cast<T>(scale == 0.0 ? 0.0 : std::frexp(scale, &k_));
}

template <class T>
Residual<T>::Residual(const Residual& o) : Block<T>(o), scale_(o.scale_), m_(o.m_), k_(o.k_) {
  for (const auto& b : o.body_) body_.push_back(b->clone());
  if (o.shortcut_) shortcut_ = o.shortcut_->clone();
}

template <class T>
std::string Residual<T>::describe() const {
  char buf[64];
  std::snprintf(buf, sizeof buf, "Residual(%zu blocks, scale=%.17g%s)", body_.size(), scale_,
                shortcut_ ? ", shortcut" : "");
  return buf;
}

template <class T>
std::int64_t Residual<T>::join(std::size_t rows, const T* skip, std::int64_t es, const T* f,
                               std::int64_t ef, T* y) const {
  const std::size_t m = rows * static_cast<std::size_t>(this->out_);
  const bool fz = m_ == T(0) || scan(f, m).maxabs == 0;
  const bool sz = scan(skip, m).maxabs == 0;
  const std::int64_t eff = ef + k_;
  const std::int64_t E = fz ? es : (sz ? eff : std::max(es, eff));
  const int ds = clamp_exp(es - E), df = clamp_exp(eff - E);
  if (ds == 0 && df == 0) {
    for (std::size_t i = 0; i < m; ++i) y[i] = skip[i] + m_ * f[i];
  } else {
    const T a = static_cast<T>(std::ldexp(1.0, std::max(ds, -1100)));
    const T b = static_cast<T>(std::ldexp(1.0, std::max(df, -1100)));
    // One of ds, df is 0; the other factor is an exact power of two (or flushes to 0,
    // where that term is below the other's last bit).
    for (std::size_t i = 0; i < m; ++i) y[i] = skip[i] * a + (m_ * f[i]) * b;
  }
  return E;
}

template <class T>
std::int64_t Residual<T>::join_backward(std::size_t rows, const T* dy, std::int64_t gy,
                                        T* df) const {
  const std::size_t m = rows * static_cast<std::size_t>(this->out_);
  for (std::size_t i = 0; i < m; ++i) df[i] = m_ * dy[i];
  return gy + k_;
}

template <class T>
std::int64_t Residual<T>::forward(const ForwardArgs<T>&) const {
  throw std::logic_error("a Residual block runs as steps of its chain");
}

template <class T>
std::int64_t Residual<T>::backward_input(const BackwardArgs<T>&) const {
  throw std::logic_error("a Residual block runs as steps of its chain");
}

template <class T>
std::unique_ptr<Block<double>> Residual<T>::to_double() const {
  std::vector<std::unique_ptr<Block<double>>> body;
  for (const auto& b : body_) body.push_back(b->to_double());
  auto d = std::make_unique<Residual<double>>(std::move(body), scale_,
                                              shortcut_ ? shortcut_->to_double() : nullptr);
  d->set_name(this->name_);
  return d;
}

template <class T>
void Residual<T>::jvp(const JacobianArgs<T>&, const T*, int, T*) const {
  throw std::logic_error("a Residual block's Jacobian is taken through its parts");
}

template <class T>
void Residual<T>::vjp(const JacobianArgs<T>&, const T*, int, T*) const {
  throw std::logic_error("a Residual block's Jacobian is taken through its parts");
}

template class Residual<float>;
template class Residual<double>;

}  // namespace gradchain
