// RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight over each row (torch.nn.RMSNorm over the
// last dimension). No eps means T's machine epsilon, as torch.finfo(dtype).eps.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "gradchain/block.hpp"
#include "gradchain/normalization.hpp"

namespace gradchain {

template <class T>
class RMSNorm final : public Block<T> {
 public:
  RMSNorm(int width, std::optional<double> eps, bool elementwise_affine);
  std::unique_ptr<Block<T>> clone() const override { return std::make_unique<RMSNorm>(*this); }
  std::unique_ptr<Block<double>> to_double() const override;
  BlockKind kind() const override { return BlockKind::rms_norm; }
  std::string describe() const override;
  const std::optional<double>& eps() const { return eps_; }
  // The eps in use.
  double effective_eps() const;
  bool elementwise_affine() const { return affine_.has_weight(); }

  // rstd is recomputed from x in the backward pass (rows of a stored boundary may be
  // rescaled between the passes).
  bool saves_input() const override { return true; }
  bool saves_output() const override { return false; }

  std::vector<ParamInfo> params() const override;
  T* param_data(std::size_t) override { return affine_.weight().data(); }
  void params_changed() override { affine_.refresh(describe()); }

  std::int64_t forward(const ForwardArgs<T>& a) const override;
  std::int64_t backward_input(const BackwardArgs<T>& a) const override;
  void backward_params(const BackwardArgs<T>& a, const ParamGradArgs& opt, T* const* grads,
                       ParamGrad* out) const override;
  void jvp(const JacobianArgs<T>& a, const T* v, int k, T* out) const override;
  void vjp(const JacobianArgs<T>& a, const T* u, int k, T* out) const override;

 private:
  std::optional<double> eps_;
  norm::AffineParams<T> affine_;
};

extern template class RMSNorm<float>;
extern template class RMSNorm<double>;

}  // namespace gradchain
