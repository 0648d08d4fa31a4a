// Residual: y = s(x) + scale * f(x), f a sequence of blocks (the body) and s the identity
// or a Linear shortcut when f changes the width. A composite: it holds its parts, and the
// chain runs them as its own steps; the residual itself is the join.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "gradchain/block.hpp"

namespace gradchain {

template <class T>
class Residual final : public Block<T> {
 public:
  Residual(std::vector<std::unique_ptr<Block<T>>> body, double scale,
           std::unique_ptr<Block<T>> shortcut);
  Residual(const Residual& o);
  std::unique_ptr<Block<T>> clone() const override { return std::make_unique<Residual>(*this); }
  std::unique_ptr<Block<double>> to_double() const override;
  BlockKind kind() const override { return BlockKind::residual; }
  std::string describe() const override;

  const std::vector<std::unique_ptr<Block<T>>>& body() const { return body_; }
  std::vector<std::unique_ptr<Block<T>>>& body() { return body_; }
  Block<T>* shortcut() const { return shortcut_.get(); }
  double scale() const { return scale_; }

  bool saves_input() const override { return false; }
  bool saves_output() const override { return false; }

  // The join: y = skip * 2^es + scale * f * 2^ef at a common exponent, returned. Zero
  // inputs (all entries 0) do not take part in choosing it.
  std::int64_t join(std::size_t rows, const T* skip, std::int64_t es, const T* f, std::int64_t ef,
                    T* y) const;
  // dL/df = scale * dy: written to df, its exponent returned.
  std::int64_t join_backward(std::size_t rows, const T* dy, std::int64_t gy, T* df) const;

  // A residual runs as steps of its chain, never as one block.
  std::int64_t forward(const ForwardArgs<T>& a) const override;
  std::int64_t backward_input(const BackwardArgs<T>& a) const override;
  // The Jacobian of a residual is I + scale * J_body (+ the shortcut's): the Jacobian tools
  // run its parts.
  void jvp(const JacobianArgs<T>& a, const T* v, int k, T* out) const override;
  void vjp(const JacobianArgs<T>& a, const T* u, int k, T* out) const override;

 private:
  std::vector<std::unique_ptr<Block<T>>> body_;
  double scale_;
  std::unique_ptr<Block<T>> shortcut_;
  T m_;  // scale = m * 2^k
  int k_ = 0;
};

extern template class Residual<float>;
extern template class Residual<double>;

}  // namespace gradchain
