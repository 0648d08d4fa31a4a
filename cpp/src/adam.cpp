// torch.optim.Adam and AdamW (_single_tensor_adam): first and second moments, the bias
// corrections with eps added after the second one, AMSGrad's maximum taken on the raw
// second moment, L2 decay added to the gradient (Adam) or decoupled, p *= 1 - lr wd
// (AdamW), maximize.
#include <algorithm>
#include <cmath>
#include <memory>

#include "gradchain/optimizer.hpp"
#include "optim_ops.hpp"

namespace gradchain {

namespace {

namespace ops = optim_ops;

template <class T>
struct AdamArgs {
  T *p, *exp_avg, *exp_avg_sq, *max_exp_avg_sq;  // max_exp_avg_sq: null without amsgrad
  const T* g;
  std::size_t n;
  bool maximize;
  T l2;  // 0 for AdamW
  ops::Lerp<T> lerp1;
  T beta2, one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size;
};

template <class T>
struct AdamLoop {
  template <class S>
  static GC_OPTIM_INLINE void at(const AdamArgs<T>& a, std::size_t i) {
    using V = typename S::V;
    V g = S::load(a.g + i);
    if (a.maximize) g = -g;
    if (a.l2 != T(0)) g = ops::add<S>(g, a.l2, S::load(a.p + i));
    const V exp_avg = a.lerp1.template at<S>(S::load(a.exp_avg + i), g);
    S::store(a.exp_avg + i, exp_avg);
    const V sq =
        ops::addcmul<S>(S::load(a.exp_avg_sq + i) * S::set1(a.beta2), a.one_minus_beta2, g, g);
    S::store(a.exp_avg_sq + i, sq);
    V second = sq;
    if (a.max_exp_avg_sq) {
      second = S::maximum(S::load(a.max_exp_avg_sq + i), sq);
      S::store(a.max_exp_avg_sq + i, second);
    }
    const V denom = S::sqrt(second) / S::set1(a.bias_correction2_sqrt) + S::set1(a.eps);
    S::store(a.p + i, ops::addcdiv<S>(S::load(a.p + i), a.neg_step_size, exp_avg, denom));
  }
};

template <class T>
class Adam final : public Optimizer<T> {
 public:
  using Optimizer<T>::Optimizer;

 protected:
  void update(ParamState<T>& s, T* p, const T* g, std::size_t n, double lr,
              UpdateTrack<T>* track) override {
    const OptimizerSpec& o = this->spec_;
    const bool decoupled = o.kind == OptimKind::adamw;
    T* exp_avg = s.get("exp_avg", n, T(0)).data();
    T* exp_avg_sq = s.get("exp_avg_sq", n, T(0)).data();
    T* max_sq = o.amsgrad ? s.get("max_exp_avg_sq", n, T(0)).data() : nullptr;
    s.step += 1;
    if (decoupled && o.weight_decay != 0) {
      const T decay = static_cast<T>(1 - lr * o.weight_decay);
      if (track) {
        std::copy(p, p + n, track->before);
        track->copied = true;
      }
      for (std::size_t i = 0; i < n; ++i) p[i] = p[i] * decay;
    }
    // Python floats, as torch computes them: beta ** step, then bias_correction2 ** 0.5.
    const double bias_correction1 = 1 - std::pow(o.beta1, s.step);
    const double bias_correction2 = 1 - std::pow(o.beta2, s.step);
    const double step_size = lr / bias_correction1;
    const double bias_correction2_sqrt = std::pow(bias_correction2, 0.5);
    const AdamArgs<T> args{p,
                           exp_avg,
                           exp_avg_sq,
                           max_sq,
                           g,
                           n,
                           o.maximize,
                           decoupled ? T(0) : static_cast<T>(o.weight_decay),
                           ops::Lerp<T>(1 - o.beta1),
                           static_cast<T>(o.beta2),
                           static_cast<T>(1 - o.beta2),
                           static_cast<T>(bias_correction2_sqrt),
                           static_cast<T>(o.eps),
                           static_cast<T>(-step_size)};
    ops::run<AdamLoop<T>, T>(args, track);
  }
};

}  // namespace

template <class T>
std::unique_ptr<Optimizer<T>> make_adam(const OptimizerSpec& spec) {
  return std::make_unique<Adam<T>>(spec);
}

template std::unique_ptr<Optimizer<float>> make_adam<float>(const OptimizerSpec&);
template std::unique_ptr<Optimizer<double>> make_adam<double>(const OptimizerSpec&);

}  // namespace gradchain
