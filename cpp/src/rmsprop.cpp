// torch.optim.RMSprop (_single_tensor_rmsprop): the running average of squared gradients
// (alpha), centered by the running average of gradients, eps added after the square root,
// a momentum buffer, L2 weight decay added to the gradient, maximize.
#include <cmath>
#include <memory>

#include "gradchain/optimizer.hpp"
#include "optim_ops.hpp"

namespace gradchain {

namespace {

namespace ops = optim_ops;

template <class T>
struct RMSpropArgs {
  T *p, *square_avg, *momentum_buffer, *grad_avg;  // null without momentum / centered
  const T* g;
  std::size_t n;
  bool maximize;
  T weight_decay, alpha, one_minus_alpha;
  ops::Lerp<T> lerp;
  T eps, neg_lr;
};

template <class T>
struct RMSpropLoop {
  template <class S>
  static GC_OPTIM_INLINE void at(const RMSpropArgs<T>& a, std::size_t i) {
    using V = typename S::V;
    V g = S::load(a.g + i);
    if (a.maximize) g = -g;
    if (a.weight_decay != T(0)) g = ops::add<S>(g, a.weight_decay, S::load(a.p + i));
    const V sq =
        ops::addcmul<S>(S::load(a.square_avg + i) * S::set1(a.alpha), a.one_minus_alpha, g, g);
    S::store(a.square_avg + i, sq);
    V avg;
    if (a.grad_avg) {
      const V grad_avg = a.lerp.template at<S>(S::load(a.grad_avg + i), g);
      S::store(a.grad_avg + i, grad_avg);
      avg = S::sqrt(ops::addcmul<S>(sq, T(-1), grad_avg, grad_avg));
    } else {
      avg = S::sqrt(sq);
    }
    avg = avg + S::set1(a.eps);
    if (a.momentum_buffer) {
      // The buffer was multiplied by the momentum in a pass of its own.
      const V buf = ops::addcdiv<S>(S::load(a.momentum_buffer + i), T(1), g, avg);
      S::store(a.momentum_buffer + i, buf);
      S::store(a.p + i, ops::add<S>(S::load(a.p + i), a.neg_lr, buf));
    } else {
      S::store(a.p + i, ops::addcdiv<S>(S::load(a.p + i), a.neg_lr, g, avg));
    }
  }
};

template <class T>
class RMSprop final : public Optimizer<T> {
 public:
  using Optimizer<T>::Optimizer;

 protected:
  void update(ParamState<T>& s, T* p, const T* g, std::size_t n, double lr,
              UpdateTrack<T>* track) override {
    const OptimizerSpec& o = this->spec_;
    T* square_avg = s.get("square_avg", n, T(0)).data();
    T* buf = o.momentum > 0 ? s.get("momentum_buffer", n, T(0)).data() : nullptr;
    T* grad_avg = o.centered ? s.get("grad_avg", n, T(0)).data() : nullptr;
    s.step += 1;
    if (buf) {
      const T mu = static_cast<T>(o.momentum);
      for (std::size_t i = 0; i < n; ++i) buf[i] = buf[i] * mu;
    }
    const RMSpropArgs<T> args{p,
                              square_avg,
                              buf,
                              grad_avg,
                              g,
                              n,
                              o.maximize,
                              static_cast<T>(o.weight_decay),
                              static_cast<T>(o.alpha),
                              static_cast<T>(1 - o.alpha),
                              ops::Lerp<T>(1 - o.alpha),
                              static_cast<T>(o.eps),
                              static_cast<T>(-lr)};
    ops::run<RMSpropLoop<T>, T>(args, track);
  }
};

}  // namespace

template <class T>
std::unique_ptr<Optimizer<T>> make_rmsprop(const OptimizerSpec& spec) {
  return std::make_unique<RMSprop<T>>(spec);
}

template std::unique_ptr<Optimizer<float>> make_rmsprop<float>(const OptimizerSpec&);
template std::unique_ptr<Optimizer<double>> make_rmsprop<double>(const OptimizerSpec&);

}  // namespace gradchain
