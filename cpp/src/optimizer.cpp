#include "gradchain/optimizer.hpp"

#include <cmath>
#include <cstdio>
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
  // torch accepts lr = 0 (no update at all); gradchain refuses it as a likely mistake.
  require(std::isfinite(lr) && lr > 0, "lr must be a finite number > 0; got " + num(lr));
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

std::vector<std::string> state_buffer_names(const OptimizerSpec& spec) {
  switch (spec.kind) {
    case OptimKind::sgd:
      if (spec.momentum != 0) return {"momentum_buffer"};
      return {};
    case OptimKind::adam:
    case OptimKind::adamw:
      if (spec.amsgrad) return {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"};
      return {"exp_avg", "exp_avg_sq"};
    case OptimKind::rmsprop: {
      std::vector<std::string> names{"square_avg"};
      if (spec.momentum > 0) names.emplace_back("momentum_buffer");
      if (spec.centered) names.emplace_back("grad_avg");
      return names;
    }
    case OptimKind::adagrad:
      return {"sum"};
  }
  return {};
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

namespace {
template <class T>
void check_step(std::vector<ParamState<T>>& state, std::size_t i, std::size_t n, double lr) {
  // A schedule may reach 0 (cosine annealing to eta_min = 0), so the step's lr may be 0.
  require(std::isfinite(lr) && lr >= 0, "lr must be a finite number >= 0; got " + num(lr));
  if (i >= state.size()) state.resize(i + 1);
  for (const auto& b : state[i].buffers)
    if (b.second.size() != n)
      throw std::invalid_argument("parameter " + std::to_string(i) + " has " + std::to_string(n) +
                                  " numbers but its optimizer state '" + b.first + "' has " +
                                  std::to_string(b.second.size()));
}
}  // namespace

template <class T>
void Optimizer<T>::step(std::size_t i, T* p, const T* g, std::size_t n, double lr) {
  check_step(state_, i, n, lr);
  update(state_[i], p, g, n, lr, nullptr);
}

template <class T>
UpdateSums Optimizer<T>::step_tracked(std::size_t i, T* p, const T* g, std::size_t n, double lr,
                                      T* before) {
  check_step(state_, i, n, lr);
  UpdateTrack<T> track;
  track.before = before;
  update(state_[i], p, g, n, lr, &track);
  return track.sums;
}

template <class T>
void Optimizer<T>::set_state(std::vector<ParamState<T>> state) {
  const std::vector<std::string> names = state_buffer_names(spec_);
  for (std::size_t i = 0; i < state.size(); ++i) {
    ParamState<T>& s = state[i];
    const std::string which = "the optimizer state of parameter " + std::to_string(i);
    require(std::isfinite(s.step) && s.step >= 0,
            which + " must have a finite step >= 0; got " + num(s.step));
    if (s.buffers.empty()) {
      // Adam's bias corrections (and Adagrad's, RMSprop's step count) would restart mid-way.
      require(s.step == 0 || spec_.kind == OptimKind::sgd,
              which + " has step " + num(s.step) + " but no buffers");
      continue;
    }
    for (const auto& b : s.buffers) {
      bool known = false;
      for (const auto& name : names) known = known || name == b.first;
      std::string expected;
      for (const auto& name : names) expected += (expected.empty() ? "'" : ", '") + name + "'";
      require(known, which + " has a buffer '" + b.first + "' that this optimizer does not keep" +
                         " (it keeps " + (expected.empty() ? "none" : expected) + ")");
    }
    require(s.buffers.size() <= names.size(), which + " names a buffer twice");
    const std::string& first = s.buffers.front().first;
    const std::size_t size = s.buffers.front().second.size();
    std::vector<std::pair<std::string, std::vector<T>>> ordered;
    for (const auto& name : names) {
      std::vector<T>* b = s.find(name);
      require(b != nullptr, which + " lacks the buffer '" + name + "'");
      require(b->size() == size, which + ": its buffers must all have one size; '" + name +
                                     "' has " + std::to_string(b->size()) + ", '" + first +
                                     "' has " + std::to_string(size));
      ordered.emplace_back(name, *b);
    }
    s.buffers = std::move(ordered);
  }
  state_ = std::move(state);
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
