// BatchNorm: torch.nn.BatchNorm1d on (batch, features). With batch statistics (train mode,
// or always without running statistics) every feature is normalised over the batch with
// its mean and biased variance, which couples the examples; the running statistics then
// move towards the batch mean and unbiased variance. In eval mode it is the per-feature
// affine map (x - running_mean) / sqrt(running_var + eps) * weight + bias.
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
class BatchNorm final : public Block<T> {
 public:
  // momentum: none means the cumulative average (factor 1 / num_batches_tracked).
  BatchNorm(int width, double eps, std::optional<double> momentum, bool affine,
            bool track_running_stats);
  std::unique_ptr<Block<T>> clone() const override { return std::make_unique<BatchNorm>(*this); }
  std::unique_ptr<Block<double>> to_double() const override;
  BlockKind kind() const override { return BlockKind::batch_norm; }
  std::string describe() const override;
  double eps() const { return eps_; }
  const std::optional<double>& momentum() const { return momentum_; }
  bool affine() const { return affine_.has_weight(); }
  bool track_running_stats() const { return track_; }

  // With batch statistics, the statistics of the forward pass (per feature, in double) are
  // kept in ForwardArgs::local for the backward pass: the batch is never split then.
  bool saves_input() const override { return true; }
  bool saves_output() const override { return false; }
  bool couples_batch(bool train) const override { return batch_stats(train); }

  // weight, bias (affine), then the buffers running_mean, running_var, num_batches_tracked
  // (track_running_stats; the count is kept as a T).
  std::vector<ParamInfo> params() const override;
  T* param_data(std::size_t i) override;
  void params_changed() override { affine_.refresh(describe()); }

  std::int64_t forward(const ForwardArgs<T>& a) const override;
  void after_forward(const std::vector<double>& local, std::size_t batch) override;
  std::int64_t backward_input(const BackwardArgs<T>& a) const override;
  void backward_params(const BackwardArgs<T>& a, const ParamGradArgs& opt, T* const* grads,
                       ParamGrad* out) const override;
  // In eval mode a.rows may be anything (the map is per example); with batch statistics
  // a.rows is the whole batch and the Jacobian couples its rows.
  void jvp(const JacobianArgs<T>& a, const T* v, int k, T* out) const override;
  void vjp(const JacobianArgs<T>& a, const T* u, int k, T* out) const override;

 private:
  bool batch_stats(bool train) const { return train || !track_; }
  // The statistics of a pass with batch statistics: from `local` when it holds them for
  // this input, else computed from x (xt: x transposed).
  const norm::Stats& batch_stats_of(const BackwardArgs<T>& a, const T* xt) const;
  // J v or J^T v with batch statistics: the batch's rows are coupled.
  void jacobian_batch(const JacobianArgs<T>& a, const T* v, int k, bool transpose, T* out) const;
  // Eval mode: y = x * alpha + beta per feature (as torch computes it).
  void eval_coefficients(std::vector<double>& alpha, std::vector<double>& beta) const;

  double eps_;
  std::optional<double> momentum_;
  bool track_;
  norm::AffineParams<T> affine_;
  std::vector<T> running_mean_, running_var_;
  T num_batches_tracked_ = T(0);
};

extern template class BatchNorm<float>;
extern template class BatchNorm<double>;

}  // namespace gradchain
