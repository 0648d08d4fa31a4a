// Activation functions and their derivatives, with PyTorch's formulas arranged so that every
// finite argument gives a finite value: the exact limit where a formula saturates.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

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
};

}  // namespace gradchain
