// Learning-rate schedules as torch.optim.lr_scheduler computes them when `scheduler.step()`
// is called once after each optimizer step: StepLR, ExponentialLR, CosineAnnealingLR (its
// recursive form, past T_max too), LinearLR (the linear warm-up) and ReduceLROnPlateau,
// plus a constant rate. The arithmetic is torch's Python arithmetic, in the same order, so
// the rates agree to the last bit.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace gradchain {

enum class ScheduleKind { constant, step, exponential, cosine, linear, plateau };

ScheduleKind parse_schedule(const std::string& name);
// "constant", "step", "exponential", "cosine", "linear", "plateau"
const std::vector<std::string>& schedule_names();

// Every argument of every kind, with torch's defaults (each kind reads only its own).
struct ScheduleSpec {
  ScheduleKind kind = ScheduleKind::constant;
  std::int64_t step_size = 1;                       // step: decay every step_size steps
  double gamma = 0.1;                               // step, exponential
  std::int64_t T_max = 1;                           // cosine
  double eta_min = 0.0;                             // cosine
  double start_factor = 1.0 / 3, end_factor = 1.0;  // linear
  std::int64_t total_iters = 5;                     // linear
  bool mode_max = false;                            // plateau: mode "max" (else "min")
  double factor = 0.1;                              // plateau
  std::int64_t patience = 10;                       // plateau
  double threshold = 1e-4;                          // plateau
  bool threshold_abs = false;                       // plateau: threshold_mode "abs" (else "rel")
  std::int64_t cooldown = 0;                        // plateau
  double min_lr = 0.0;                              // plateau
  double eps = 1e-8;                                // plateau

  // std::invalid_argument naming the argument and the accepted values.
  void validate() const;
};

// Where a schedule is: torch's scheduler attributes of the same names. `lr` is the rate of
// the coming optimizer step; `best`, `num_bad_epochs` and `cooldown_counter` are used by
// plateau only.
struct ScheduleState {
  std::int64_t last_epoch = 0;
  double lr = 0.0;
  double best = 0.0;
  std::int64_t num_bad_epochs = 0;
  std::int64_t cooldown_counter = 0;
};

class LRSchedule {
 public:
  // std::invalid_argument for a bad spec or a base_lr that is not finite and > 0.
  LRSchedule(const ScheduleSpec& spec, double base_lr);

  const ScheduleSpec& spec() const { return spec_; }
  double base_lr() const { return base_lr_; }

  // The learning rate of the coming optimizer step.
  double lr() const { return state_.lr; }
  // Called once after each optimizer step; `loss` (that step's) is read by plateau only.
  void step(double loss);

  const ScheduleState& state() const { return state_; }
  // std::invalid_argument for a negative count or a rate that is not finite and >= 0.
  void set_state(const ScheduleState& state);

 private:
  bool better(double a, double best) const;
  ScheduleSpec spec_;
  double base_lr_;
  ScheduleState state_;
};

}  // namespace gradchain
