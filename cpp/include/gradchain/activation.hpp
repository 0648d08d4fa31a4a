// Activation functions and their derivatives, with PyTorch's formulas arranged so that every
// finite argument gives a finite value: the exact limit where a formula saturates.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "gradchain/block.hpp"

namespace gradchain {

enum class Act { linear, sigmoid, tanh, relu, leaky_relu, elu, gelu, gelu_tanh, silu, softplus };

struct Activation {
  Act kind = Act::tanh;
  double negative_slope = 0.01;  // leaky_relu
  double alpha = 1.0;            // elu

  static Activation parse(const std::string& name, double negative_slope = 0.01,
                          double alpha = 1.0);
  static const std::vector<std::string>& names();
  std::string name() const;

  // phi(c z) = c phi(z) for every c > 0: the forward pass can then carry its scale in
  // log space (with zero biases).
  bool positively_homogeneous() const;
  // phi(0) = 0 and phi(z) = s z (1 + O(z)) near 0 with s > 0 on each side: a chain whose
  // signal decays below the float range can carry its scale in log space (zero biases).
  bool linear_near_zero() const;
  // That slope s on the side of z's sign.
  double slope_at_zero(bool negative) const;
  // The derivative needs the pre-activation z, not only the output h.
  bool needs_input() const;

  // h = phi(z); h and z may alias.
  template <class T>
  void forward(const T* z, T* h, std::size_t n) const;
  // out = g * phi'(z), given z (if needs_input()) and h = phi(z); out may alias g.
  template <class T>
  void backward(const T* z, const T* h, const T* g, T* out, std::size_t n) const;
  // h~ = phi(z~ 2^s) 2^-s for s < 0 and linear_near_zero(), without underflow: phi at the
  // true scale where its value is a normal float (bit for bit what a plain pass computes),
  // and its slope at 0 below that, where phi(t) = slope * t to the last bit. tmp holds n.
  template <class T>
  void forward_scaled(const T* z, T* h, std::size_t n, int s, T* tmp) const;
};

// The activation as a block of a chain (torch.nn.Tanh, ReLU, ...). A value carried at a
// power-of-two scale passes through a homogeneous phi, and a small one through a phi that
// is linear near 0; otherwise phi is applied at the true scale.
template <class T>
class ActivationBlock final : public Block<T> {
 public:
  ActivationBlock(int width, Activation act) : Block<T>(width, width), act_(act) {}
  std::unique_ptr<Block<T>> clone() const override {
    return std::make_unique<ActivationBlock>(*this);
  }
  std::unique_ptr<Block<double>> to_double() const override;
  BlockKind kind() const override { return BlockKind::activation; }
  std::string describe() const override;
  const Activation& activation() const { return act_; }

  bool saves_input() const override { return act_.needs_input(); }
  bool saves_output() const override { return !act_.needs_input(); }
  bool in_place() const override { return true; }
  bool can_zero() const override;
  bool absorbs_tiny_input() const override;

  std::int64_t forward(const ForwardArgs<T>& a) const override;
  std::int64_t backward_input(const BackwardArgs<T>& a) const override;
  void jvp(const JacobianArgs<T>& a, const T* v, int k, T* out) const override;
  void vjp(const JacobianArgs<T>& a, const T* u, int k, T* out) const override;

 private:
  // phi'(x) at the point, rows x width, into d (d must not be a.scratch).
  void derivative(const JacobianArgs<T>& a, T* d) const;

  Activation act_;
};

extern template class ActivationBlock<float>;
extern template class ActivationBlock<double>;

}  // namespace gradchain
