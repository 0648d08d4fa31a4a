// torch.optim.SGD (_single_tensor_sgd): weight decay added to the gradient, a momentum
// buffer that starts as a copy of the first gradient (dampening applies from the second
// step on), Nesterov's look-ahead, maximize.
#include <memory>

#include "gradchain/optimizer.hpp"
#include "optim_ops.hpp"

namespace gradchain {

namespace {

namespace ops = optim_ops;

template <class T>
struct SGDArgs {
  T* p;
  T* buf;  // null without momentum
  const T* g;
  std::size_t n;
  bool maximize, first, nesterov;
  T weight_decay, momentum, keep, neg_lr;
};

template <class T>
struct SGDLoop {
  template <class S>
  static GC_OPTIM_INLINE void at(const SGDArgs<T>& a, std::size_t i) {
    using V = typename S::V;
    V d = S::load(a.g + i);
    if (a.maximize) d = -d;
    if (a.weight_decay != T(0)) d = ops::add<S>(d, a.weight_decay, S::load(a.p + i));
    if (a.buf) {
      const V buf = a.first ? d : ops::add<S>(S::load(a.buf + i) * S::set1(a.momentum), a.keep, d);
      S::store(a.buf + i, buf);
      d = a.nesterov ? ops::add<S>(d, a.momentum, buf) : buf;
    }
    S::store(a.p + i, ops::add<S>(S::load(a.p + i), a.neg_lr, d));
  }
};

template <class T>
class SGD final : public Optimizer<T> {
 public:
  using Optimizer<T>::Optimizer;

 protected:
  void update(ParamState<T>& s, T* p, const T* g, std::size_t n, double lr,
              UpdateTrack<T>* track) override {
    const OptimizerSpec& o = this->spec_;
    const bool first = o.momentum != 0 && s.find("momentum_buffer") == nullptr;
    T* buf = o.momentum != 0 ? s.get("momentum_buffer", n, T(0)).data() : nullptr;
    const SGDArgs<T> args{p,
                          buf,
                          g,
                          n,
                          o.maximize,
                          first,
                          o.nesterov,
                          static_cast<T>(o.weight_decay),
                          static_cast<T>(o.momentum),
                          static_cast<T>(1 - o.dampening),
                          static_cast<T>(-lr)};
    ops::run<SGDLoop<T>, T>(args, track);
    s.step += 1;
  }
};

}  // namespace

template <class T>
std::unique_ptr<Optimizer<T>> make_sgd(const OptimizerSpec& spec) {
  return std::make_unique<SGD<T>>(spec);
}

template std::unique_ptr<Optimizer<float>> make_sgd<float>(const OptimizerSpec&);
template std::unique_ptr<Optimizer<double>> make_sgd<double>(const OptimizerSpec&);

}  // namespace gradchain
