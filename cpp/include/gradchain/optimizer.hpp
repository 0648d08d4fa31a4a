// The optimizers of torch.optim with their exact update equations, defaults and state:
// torch's single-tensor code path (foreach=False), one parameter after another, in the
// parameter's own precision. Each optimizer lives in the file named after it (sgd.cpp,
// adam.cpp for Adam and AdamW, rmsprop.cpp, adagrad.cpp); this header is their common
// face, and lr_schedule.hpp gives the learning rate of each step.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace gradchain {

enum class OptimKind { sgd, adam, adamw, rmsprop, adagrad };

OptimKind parse_optimizer(const std::string& name);
const std::vector<std::string>& optimizer_names();  // "sgd", "adam", "adamw", "rmsprop", "adagrad"

// Every hyperparameter of every kind, with torch's defaults where kinds share a name
// (each kind reads only its own; the Python layer fills in the kind's defaults).
struct OptimizerSpec {
  OptimKind kind = OptimKind::sgd;
  double lr = 1e-3;
  double weight_decay = 0.0;  // L2 added to the gradient; AdamW: decoupled (p *= 1 - lr wd)
  bool maximize = false;
  double momentum = 0.0;                   // SGD, RMSprop
  double dampening = 0.0;                  // SGD
  bool nesterov = false;                   // SGD
  double beta1 = 0.9, beta2 = 0.999;       // Adam, AdamW
  double eps = 1e-8;                       // Adam, AdamW, RMSprop (1e-8), Adagrad (1e-10)
  bool amsgrad = false;                    // Adam, AdamW
  double alpha = 0.99;                     // RMSprop
  bool centered = false;                   // RMSprop
  double lr_decay = 0.0;                   // Adagrad
  double initial_accumulator_value = 0.0;  // Adagrad

  // std::invalid_argument naming the argument and the accepted values, as torch's own
  // checks (0 <= beta < 1, nesterov needs momentum > 0 and dampening 0, ...), but stricter
  // in two ways: lr must be > 0 (torch accepts 0) and every number finite.
  void validate() const;
};

// One parameter's state in torch's layout: the step count (a float tensor in torch) and
// named buffers of the parameter's size ("momentum_buffer", "exp_avg", "exp_avg_sq",
// "max_exp_avg_sq", "square_avg", "grad_avg", "sum"). A buffer torch has not created yet
// (SGD's momentum buffer before the first step) is absent.
template <class T>
struct ParamState {
  double step = 0.0;
  std::vector<std::pair<std::string, std::vector<T>>> buffers;

  std::vector<T>* find(const std::string& name);
  const std::vector<T>* find(const std::string& name) const;
  std::vector<T>& get(const std::string& name, std::size_t n, T fill);  // created on first use
};

// The buffers one parameter's state holds once it has taken a step, in torch's order
// (e.g. Adam with amsgrad: exp_avg, exp_avg_sq, max_exp_avg_sq; SGD without momentum: none).
std::vector<std::string> state_buffer_names(const OptimizerSpec& spec);

// The sums of one update of a parameter (b its values before, p after), in double:
// max |p|, sum p^2, max |p - b|, sum (p - b)^2. A NaN in p makes sum_p2 NaN, an inf makes
// max_p inf.
struct UpdateSums {
  double max_p = 0.0, sum_p2 = 0.0, max_d = 0.0, sum_d2 = 0.0;
};

// A tracked update: where p's values before it go, and its sums.
template <class T>
struct UpdateTrack {
  T* before = nullptr;
  bool copied = false;  // an earlier pass of the update has put them there
  UpdateSums sums;
};

template <class T>
class Optimizer {
 public:
  explicit Optimizer(const OptimizerSpec& spec);
  virtual ~Optimizer() = default;
  const OptimizerSpec& spec() const { return spec_; }

  // One update of parameter `i` (n numbers at p, gradient g) at learning rate `lr` (the
  // schedule's value for this step; spec().lr is the base). `g` is read only. Parameters
  // are numbered by the caller, the same way on every step. std::invalid_argument if lr is
  // negative or not finite, or n differs from the size of parameter i's state.
  void step(std::size_t i, T* p, const T* g, std::size_t n, double lr);
  // As step(), and p's values before the update go to `before` (n numbers) and the
  // update's sums come back: both taken in the update's own pass over p.
  UpdateSums step_tracked(std::size_t i, T* p, const T* g, std::size_t n, double lr, T* before);
  // Makes room for the state of parameters 0 .. n - 1: after it, steps of different
  // parameters may run on different threads at once.
  void reserve(std::size_t n) {
    if (n > state_.size()) state_.resize(n);
  }

  std::vector<ParamState<T>>& state() { return state_; }
  const std::vector<ParamState<T>>& state() const { return state_; }
  // Replaces the state (one saved earlier, or loaded from torch): each parameter's holds no
  // buffer (not stepped yet) or exactly state_buffer_names(spec()), all of one size, and a
  // step count >= 0; std::invalid_argument naming the parameter and buffer otherwise.
  void set_state(std::vector<ParamState<T>> state);

 protected:
  // With `track` (step_tracked): p's values before the update go to track->before, taken
  // in the update's last pass over p with its sums (unless an earlier pass copied them).
  virtual void update(ParamState<T>& s, T* p, const T* g, std::size_t n, double lr,
                      UpdateTrack<T>* track) = 0;
  OptimizerSpec spec_;

 private:
  std::vector<ParamState<T>> state_;
};

template <class T>
std::unique_ptr<Optimizer<T>> make_optimizer(const OptimizerSpec& spec);

// The factories behind make_optimizer, one in each optimizer's file.
template <class T>
std::unique_ptr<Optimizer<T>> make_sgd(const OptimizerSpec& spec);
template <class T>
std::unique_ptr<Optimizer<T>> make_adam(const OptimizerSpec& spec);  // Adam and AdamW
template <class T>
std::unique_ptr<Optimizer<T>> make_rmsprop(const OptimizerSpec& spec);
template <class T>
std::unique_ptr<Optimizer<T>> make_adagrad(const OptimizerSpec& spec);

}  // namespace gradchain
