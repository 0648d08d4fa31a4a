// LayerNorm: y = (x - mean) / sqrt(var + eps) * weight + bias over each row
// (torch.nn.LayerNorm over the last dimension; var is the biased variance).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "gradchain/block.hpp"
#include "gradchain/normalization.hpp"

namespace gradchain {

template <class T>
class LayerNorm final : public Block<T> {
 public:
  LayerNorm(int width, double eps, bool elementwise_affine, bool bias);
  std::unique_ptr<Block<T>> clone() const override { return std::make_unique<LayerNorm>(*this); }
  std::unique_ptr<Block<double>> to_double() const override;
  BlockKind kind() const override { return BlockKind::layer_norm; }
  std::string describe() const override;
  double eps() const { return eps_; }
  bool elementwise_affine() const { return affine_.has_weight(); }
  bool has_bias() const { return affine_.has_bias(); }

  // Mean and rstd are recomputed from x in the backward pass: the driver may rescale rows
  // of a stored boundary between the passes.
  bool saves_input() const override { return true; }
  bool saves_output() const override { return false; }

  std::vector<ParamInfo> params() const override;
  T* param_data(std::size_t i) override;
  void params_changed() override { affine_.refresh(describe()); }

  std::int64_t forward(const ForwardArgs<T>& a) const override;
  std::int64_t backward_input(const BackwardArgs<T>& a) const override;
  void backward_params(const BackwardArgs<T>& a, const ParamGradArgs& opt, T* const* grads,
                       ParamGrad* out) const override;
  void jvp(const JacobianArgs<T>& a, const T* v, int k, T* out) const override;
  void vjp(const JacobianArgs<T>& a, const T* u, int k, T* out) const override;

 private:
  double eps_;
  norm::AffineParams<T> affine_;
};

extern template class LayerNorm<float>;
extern template class LayerNorm<double>;

}  // namespace gradchain
