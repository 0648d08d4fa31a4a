#include "gradchain/optimizer.hpp"

#include <cmath>
#include <stdexcept>

#include "gradchain/common.hpp"

namespace gradchain {

const std::vector<std::string>& optimizer_names() {
  static const std::vector<std::string> names{"sgd", "adam", "adamw", "rmsprop", "adagrad"};
  return names;
}

OptimKind parse_optimizer(const std::string& name) {
  return static_cast<OptimKind>(parse_name("optimizer", name, optimizer_names()));
}

namespace {
void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}
std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}
}  // namespace

void OptimizerSpec::validate() const {
  require(std::isfinite(lr) && lr >= 0, "lr must be a finite number >= 0; got " + num(lr));
  require(std::isfinite(weight_decay) && weight_decay >= 0,
          "weight_decay must be a finite number >= 0; got " + num(weight_decay));
  require(std::isfinite(momentum) && momentum >= 0,
          "momentum must be a finite number >= 0; got " + num(momentum));
  require(std::isfinite(dampening), "dampening must be finite; got " + num(dampening));
  if (kind == OptimKind::sgd && nesterov)
    require(momentum > 0 && dampening == 0,
            "nesterov=True needs momentum > 0 and dampening = 0; got momentum " + num(momentum) +
                ", dampening " + num(dampening));
  require(beta1 >= 0 && beta1 < 1, "betas[0] must be in [0, 1); got " + num(beta1));
  require(beta2 >= 0 && beta2 < 1, "betas[1] must be in [0, 1); got " + num(beta2));
  require(std::isfinite(eps) && eps >= 0, "eps must be a finite number >= 0; got " + num(eps));
  require(std::isfinite(alpha) && alpha >= 0,
          "alpha must be a finite number >= 0; got " + num(alpha));
  require(std::isfinite(lr_decay) && lr_decay >= 0,
          "lr_decay must be a finite number >= 0; got " + num(lr_decay));
  require(std::isfinite(initial_accumulator_value) && initial_accumulator_value >= 0,
          "initial_accumulator_value must be a finite number >= 0; got " +
              num(initial_accumulator_value));
}

template <class T>
std::vector<T>* ParamState<T>::find(const std::string& name) {
  for (auto& b : buffers)
    if (b.first == name) return &b.second;
  return nullptr;
}

template <class T>
const std::vector<T>* ParamState<T>::find(const std::string& name) const {
  for (const auto& b : buffers)
    if (b.first == name) return &b.second;
  return nullptr;
}

template <class T>
std::vector<T>& ParamState<T>::get(const std::string& name, std::size_t n, T fill) {
  if (std::vector<T>* b = find(name)) return *b;
  buffers.emplace_back(name, std::vector<T>(n, fill));
  return buffers.back().second;
}

template <class T>
Optimizer<T>::Optimizer(const OptimizerSpec& spec) : spec_(spec) {
  spec_.validate();
}

template <class T>
void Optimizer<T>::step(std::size_t i, T* p, const T* g, std::size_t n, double lr) {
  if (i >= state_.size()) state_.resize(i + 1);
  update(state_[i], p, g, n, lr);
}

template <class T>
std::unique_ptr<Optimizer<T>> make_optimizer(const OptimizerSpec& spec) {
  switch (spec.kind) {
    case OptimKind::sgd:
      return make_sgd<T>(spec);
    case OptimKind::adam:
    case OptimKind::adamw:
      return make_adam<T>(spec);
    case OptimKind::rmsprop:
      return make_rmsprop<T>(spec);
    case OptimKind::adagrad:
      return make_adagrad<T>(spec);
  }
  throw std::invalid_argument("unknown optimizer");
}

template struct ParamState<float>;
template struct ParamState<double>;
template class Optimizer<float>;
template class Optimizer<double>;
template std::unique_ptr<Optimizer<float>> make_optimizer<float>(const OptimizerSpec&);
template std::unique_ptr<Optimizer<double>> make_optimizer<double>(const OptimizerSpec&);

}  // namespace gradchain
