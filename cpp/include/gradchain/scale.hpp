// Scale: y = c x for a constant c (the `a` of a user module's `x + a * f(x)`, or a
// standalone multiplier).
#pragma once

#include <memory>
#include <string>

#include "gradchain/block.hpp"

namespace gradchain {

template <class T>
class Scale final : public Block<T> {
 public:
  Scale(int width, double c);
  std::unique_ptr<Block<T>> clone() const override { return std::make_unique<Scale>(*this); }
  std::unique_ptr<Block<double>> to_double() const override;
  BlockKind kind() const override { return BlockKind::scale; }
  std::string describe() const override;
  double value() const { return c_; }

  bool saves_input() const override { return false; }
  bool saves_output() const override { return false; }
  bool in_place() const override { return true; }
  bool can_zero() const override { return c_ == 0.0; }

  std::int64_t forward(const ForwardArgs<T>& a) const override;
  std::int64_t backward_input(const BackwardArgs<T>& a) const override;
  void jvp(const JacobianArgs<T>& a, const T* v, int k, T* out) const override;
  void vjp(const JacobianArgs<T>& a, const T* u, int k, T* out) const override;

 private:
  double c_;
  // c = m * 2^k with |m| in [0.5, 1): the power of two goes into the exponent.
  T m_;
  int k_ = 0;
};

extern template class Scale<float>;
extern template class Scale<double>;

}  // namespace gradchain
