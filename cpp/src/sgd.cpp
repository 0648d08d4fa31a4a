// torch.optim.SGD (_single_tensor_sgd): weight decay added to the gradient, a momentum
// buffer that starts as a copy of the first gradient (dampening applies from the second
// step on), Nesterov's look-ahead, maximize.
#include <memory>

#include "gradchain/optimizer.hpp"

namespace gradchain {

namespace {

template <class T>
class SGD final : public Optimizer<T> {
 public:
  using Optimizer<T>::Optimizer;

 protected:
  void update(ParamState<T>& s, T* p, const T* g, std::size_t n, double lr) override {
    const OptimizerSpec& o = this->spec_;
    const T wd = static_cast<T>(o.weight_decay), mu = static_cast<T>(o.momentum);
    const T keep = static_cast<T>(1.0 - o.dampening), step = static_cast<T>(-lr);
    const bool first = o.momentum != 0 && s.find("momentum_buffer") == nullptr;
    T* buf = o.momentum != 0 ? s.get("momentum_buffer", n, T(0)).data() : nullptr;
    for (std::size_t i = 0; i < n; ++i) {
      T d = o.maximize ? -g[i] : g[i];
      if (o.weight_decay != 0) d = d + wd * p[i];
      if (buf) {
        buf[i] = first ? d : buf[i] * mu + keep * d;
        d = o.nesterov ? d + mu * buf[i] : buf[i];
      }
      p[i] = p[i] + step * d;
    }
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
