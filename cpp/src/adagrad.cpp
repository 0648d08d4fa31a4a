// torch.optim.Adagrad (_single_tensor_adagrad, dense gradients): the sum of squared
// gradients from initial_accumulator_value, eps added after the square root, the learning
// rate lr / (1 + (step - 1) lr_decay), L2 weight decay added to the gradient, maximize.
#include <cmath>
#include <memory>

#include "gradchain/optimizer.hpp"
#include "optim_ops.hpp"

namespace gradchain {

namespace {

namespace ops = optim_ops;

template <class T>
struct AdagradArgs {
  T *p, *sum;
  const T* g;
  std::size_t n;
  bool maximize;
  T weight_decay, eps, neg_clr;
};

template <class T>
struct AdagradLoop {
  template <class S>
  static GC_OPTIM_INLINE void at(const AdagradArgs<T>& a, std::size_t i) {
    using V = typename S::V;
    V g = S::load(a.g + i);
    if (a.maximize) g = -g;
    if (a.weight_decay != T(0)) g = ops::add<S>(g, a.weight_decay, S::load(a.p + i));
    const V sum = ops::addcmul<S>(S::load(a.sum + i), T(1), g, g);
    S::store(a.sum + i, sum);
    const V root = S::sqrt(sum) + S::set1(a.eps);
    S::store(a.p + i, ops::addcdiv<S>(S::load(a.p + i), a.neg_clr, g, root));
  }
};

template <class T>
class Adagrad final : public Optimizer<T> {
 public:
  using Optimizer<T>::Optimizer;

 protected:
  void update(ParamState<T>& s, T* p, const T* g, std::size_t n, double lr,
              UpdateTrack<T>* track) override {
    const OptimizerSpec& o = this->spec_;
    T* sum = s.get("sum", n, static_cast<T>(o.initial_accumulator_value)).data();
    s.step += 1;
    const double clr = lr / (1 + (s.step - 1) * o.lr_decay);
    const AdagradArgs<T> args{p,
                              sum,
                              g,
                              n,
                              o.maximize,
                              static_cast<T>(o.weight_decay),
                              static_cast<T>(o.eps),
                              static_cast<T>(-clr)};
    ops::run<AdagradLoop<T>, T>(args, track);
  }
};

}  // namespace

template <class T>
std::unique_ptr<Optimizer<T>> make_adagrad(const OptimizerSpec& spec) {
  return std::make_unique<Adagrad<T>>(spec);
}

template std::unique_ptr<Optimizer<float>> make_adagrad<float>(const OptimizerSpec&);
template std::unique_ptr<Optimizer<double>> make_adagrad<double>(const OptimizerSpec&);

}  // namespace gradchain
