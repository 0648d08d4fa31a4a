// Linear: y = x W^T + b (torch.nn.Linear), W out x in.
#pragma once

#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "gradchain/block.hpp"
#include "gradchain/common.hpp"
#include "gradchain/init.hpp"
#include "gradchain/scaled.hpp"

namespace gradchain {

template <class T>
class Linear final : public Block<T> {
 public:
  // store = false: the block keeps no weights; init() then only records how to draw them
  // (draw_size(), draw()), for chains too deep to store theirs.
  Linear(int in_features, int out_features, bool bias, bool store = true);
  std::unique_ptr<Block<T>> clone() const override { return std::make_unique<Linear>(*this); }
  std::unique_ptr<Block<double>> to_double() const override;
  BlockKind kind() const override { return BlockKind::linear; }
  std::string describe() const override;

  bool has_bias() const { return has_bias_; }
  // Draws W (and b) as layer `stream` of the counter-based generator, in double. With
  // keep_units the block keeps the unit draws (see init_weight_unit: twice the weights'
  // memory), and a later init from the same generator and stream in the same family only
  // rescales them, to the same doubles.
  void init(const InitSpec& spec, const Philox& rng, std::uint64_t stream,
            Canceller* cancel = nullptr, bool keep_units = false);
  T* weight() { return w_.data(); }
  T* bias() { return has_bias_ ? b_.data() : nullptr; }
  const T* weight() const { return w_.data(); }
  const T* bias() const { return has_bias_ ? b_.data() : nullptr; }
  // log_2 of the power-of-two factor kept apart from out-of-band weights.
  int weight_exponent() const { return wexp_; }
  // W~ = W * 2^-weight_exponent(), the matrix the products use.
  const T* gemm_weight() const { return wscaled_.empty() ? w_.data() : wscaled_.data(); }
  bool zero_bias() const { return zero_bias_; }
  // Whether the weights are drawn for each pass instead of kept.
  bool drawn() const { return !store_; }
  // W and b as init() draws them (b: out_features entries, or nullptr).
  void draw_params(T* w, T* b) const;
  std::size_t draw_size() const override;
  void draw(T* out) const override;

  bool saves_input() const override { return true; }
  bool saves_output() const override { return false; }

  std::vector<ParamInfo> params() const override;
  T* param_data(std::size_t i) override { return i == 0 ? w_.data() : b_.data(); }
  void params_changed() override;

  void prefetch(const T* drawn) const override;
  std::int64_t forward(const ForwardArgs<T>& a) const override;
  std::int64_t backward_input(const BackwardArgs<T>& a) const override;
  void backward_params(const BackwardArgs<T>& a, const ParamGradArgs& opt, T* const* grads,
                       ParamGrad* out) const override;
  void jvp(const JacobianArgs<T>& a, const T* v, int k, T* out) const override;
  void vjp(const JacobianArgs<T>& a, const T* u, int k, T* out) const override;

 private:
  bool has_bias_;
  bool store_ = true;
  // How a block that keeps no weights draws them.
  bool has_spec_ = false;
  InitSpec spec_;
  Philox rng_{0};
  std::uint64_t stream_ = 0;
  std::vector<T> w_, b_;
  struct Units {
    UnitFamily family;
    Philox rng;
    std::uint64_t stream;
    std::vector<double> w, b;
    double w_max = 0.0;  // max |w|: rounding is monotone, so max |w * s| = fl(w_max * |s|)
  };
  // Never changed once drawn, so copies of the block share them.
  std::shared_ptr<const Units> units_;
  // The scale of units_ that w_ holds; NaN once the weights were written from outside.
  double applied_scale_ = std::numeric_limits<double>::quiet_NaN();
  // Weights whose largest entry lies outside the safe band (near 1e300 or 1e-300) are used
  // as a power-of-two scaled copy, so that no product overflows or underflows before its
  // scale is applied.
  int wexp_ = 0;
  std::vector<T> wscaled_;
  bool zero_bias_ = true;
  // params_changed() given the weight's largest magnitude.
  void weight_changed(MaxAbs w_max);
  // W itself: the kept weights, or drawn into `drawn`.
  const T* weight_for_jacobian(std::vector<T>& drawn) const;
};

extern template class Linear<float>;
extern template class Linear<double>;

}  // namespace gradchain
