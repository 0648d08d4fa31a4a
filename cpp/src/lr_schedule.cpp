#include "gradchain/lr_schedule.hpp"

#include <cmath>
#include <cstdio>
#include <limits>
#include <stdexcept>

#include "gradchain/common.hpp"

namespace gradchain {

const std::vector<std::string>& schedule_names() {
  static const std::vector<std::string> names{"constant", "step",   "exponential",
                                              "cosine",   "linear", "plateau"};
  return names;
}

ScheduleKind parse_schedule(const std::string& name) {
  return static_cast<ScheduleKind>(parse_name("schedule", name, schedule_names()));
}

namespace {

constexpr double kPi = 3.141592653589793;  // Python's math.pi

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

void require_count(const char* name, std::int64_t v, std::int64_t least) {
  require(v >= least, std::string(name) + " must be an integer >= " + std::to_string(least) +
                          "; got " + std::to_string(v));
}

}  // namespace

void ScheduleSpec::validate() const {
  switch (kind) {
    case ScheduleKind::constant:
      break;
    case ScheduleKind::step:
      require_count("step_size", step_size, 1);
      require(std::isfinite(gamma) && gamma > 0,
              "gamma must be a finite number > 0; got " + num(gamma));
      break;
    case ScheduleKind::exponential:
      require(std::isfinite(gamma) && gamma > 0,
              "gamma must be a finite number > 0; got " + num(gamma));
      break;
    case ScheduleKind::cosine:
      require_count("T_max", T_max, 1);
      require(std::isfinite(eta_min) && eta_min >= 0,
              "eta_min must be a finite number >= 0; got " + num(eta_min));
      break;
    case ScheduleKind::linear:
      require(start_factor > 0 && start_factor <= 1,
              "start_factor must be in (0, 1]; got " + num(start_factor));
      require(end_factor >= 0 && end_factor <= 1,
              "end_factor must be in [0, 1]; got " + num(end_factor));
      require_count("total_iters", total_iters, 0);
      break;
    case ScheduleKind::plateau:
      require(factor >= 0 && factor < 1, "factor must be in [0, 1); got " + num(factor));
      require_count("patience", patience, 0);
      require(std::isfinite(threshold) && threshold >= 0,
              "threshold must be a finite number >= 0; got " + num(threshold));
      require_count("cooldown", cooldown, 0);
      require(std::isfinite(min_lr) && min_lr >= 0,
              "min_lr must be a finite number >= 0; got " + num(min_lr));
      require(std::isfinite(eps) && eps >= 0, "eps must be a finite number >= 0; got " + num(eps));
      break;
  }
}

LRSchedule::LRSchedule(const ScheduleSpec& spec, double base_lr) : spec_(spec), base_lr_(base_lr) {
  spec_.validate();
  require(std::isfinite(base_lr) && base_lr > 0,
          "lr must be a finite number > 0; got " + num(base_lr));
  // torch's constructor takes the first step: last_epoch 0, and LinearLR's first factor.
  state_.lr = spec_.kind == ScheduleKind::linear ? base_lr * spec_.start_factor : base_lr;
  const double inf = std::numeric_limits<double>::infinity();
  state_.best = spec_.mode_max ? -inf : inf;  // torch's mode_worse
}

bool LRSchedule::better(double a, double best) const {
  if (!spec_.mode_max)
    return spec_.threshold_abs ? a < best - spec_.threshold : a < best * (1.0 - spec_.threshold);
  return spec_.threshold_abs ? a > best + spec_.threshold : a > best * (spec_.threshold + 1.0);
}

void LRSchedule::step(double loss) {
  ScheduleState& s = state_;
  const ScheduleSpec& o = spec_;
  s.last_epoch += 1;
  const auto epoch = static_cast<double>(s.last_epoch);
  switch (o.kind) {
    case ScheduleKind::constant:
      break;
    case ScheduleKind::step:
      if (s.last_epoch % o.step_size == 0) s.lr = s.lr * o.gamma;
      break;
    case ScheduleKind::exponential:
      s.lr = s.lr * o.gamma;
      break;
    case ScheduleKind::cosine: {
      const auto t_max = static_cast<double>(o.T_max);
      if ((s.last_epoch - 1 - o.T_max) % (2 * o.T_max) == 0) {
        // Past a minimum (1 + cos = 0 below): the recursion restarts from the closed form.
        s.lr = s.lr + (base_lr_ - o.eta_min) * (1 - std::cos(kPi / t_max)) / 2;
      } else {
        s.lr = (1 + std::cos(kPi * epoch / t_max)) / (1 + std::cos(kPi * (epoch - 1) / t_max)) *
                   (s.lr - o.eta_min) +
               o.eta_min;
      }
      break;
    }
    case ScheduleKind::linear:
      if (s.last_epoch <= o.total_iters) {
        const double span = o.end_factor - o.start_factor;
        s.lr = s.lr * (1.0 + span / (static_cast<double>(o.total_iters) * o.start_factor +
                                     (epoch - 1) * span));
      }
      break;
    case ScheduleKind::plateau:
      if (better(loss, s.best)) {
        s.best = loss;
        s.num_bad_epochs = 0;
      } else {
        s.num_bad_epochs += 1;
      }
      if (s.cooldown_counter > 0) {
        s.cooldown_counter -= 1;
        s.num_bad_epochs = 0;  // bad steps in the cooldown do not count
      }
      if (s.num_bad_epochs > o.patience) {
        const double reduced = s.lr * o.factor;
        const double next = o.min_lr > reduced ? o.min_lr : reduced;  // Python's max
        if (s.lr - next > o.eps) s.lr = next;
        s.cooldown_counter = o.cooldown;
        s.num_bad_epochs = 0;
      }
      break;
  }
}

void LRSchedule::set_state(const ScheduleState& state) {
  require(state.last_epoch >= 0,
          "last_epoch must be an integer >= 0; got " + std::to_string(state.last_epoch));
  require(std::isfinite(state.lr) && state.lr >= 0,
          "the schedule's lr must be a finite number >= 0; got " + num(state.lr));
  require(!std::isnan(state.best), "best must not be NaN");
  require(state.num_bad_epochs >= 0,
          "num_bad_epochs must be an integer >= 0; got " + std::to_string(state.num_bad_epochs));
  require(state.cooldown_counter >= 0, "cooldown_counter must be an integer >= 0; got " +
                                           std::to_string(state.cooldown_counter));
  state_ = state;
}

}  // namespace gradchain
