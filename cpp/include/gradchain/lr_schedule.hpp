// The learning rate of each optimizer step. This schedule keeps the base rate; the
// schedules of torch.optim.lr_scheduler follow.
#pragma once

namespace gradchain {

class LRSchedule {
 public:
  explicit LRSchedule(double base_lr) : lr_(base_lr) {}

  // The rate for the coming step.
  double lr() const { return lr_; }
  // After each optimizer step, with that step's training loss.
  void step(double /*loss*/) {}

 private:
  double lr_;
};

}  // namespace gradchain
