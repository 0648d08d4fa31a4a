// Training any chain (Chain<T>, RecurrentChain<T>) with an optimizer of optimizer.hpp: a
// seeded sampler, clipping, max-norm, non-finite detection, cancellation and a history of
// every recorded step with its norms exact in log space. One loop serves every chain kind
// through a small adapter per kind.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "gradchain/chain.hpp"
#include "gradchain/common.hpp"
#include "gradchain/loss.hpp"
#include "gradchain/lr_schedule.hpp"
#include "gradchain/optimizer.hpp"
#include "gradchain/rnn.hpp"

namespace gradchain {

// Mini-batches of a run: each epoch a permutation of the n examples drawn from
// Philox(seed) with stream = epoch (a Fisher-Yates shuffle), or 0..n-1 without shuffling;
// batches of `batch` in order, the last partial one dropped.
class Sampler {
 public:
  Sampler(std::int64_t n, int batch, std::uint64_t seed, bool shuffle);
  // The indices of step `step` (0-based); valid until the next call.
  const std::int64_t* batch(std::int64_t step);
  std::int64_t batches_per_epoch() const { return per_epoch_; }

 private:
  std::int64_t n_, per_epoch_;
  int batch_;
  std::uint64_t seed_;
  bool shuffle_;
  std::int64_t epoch_ = -1;
  std::vector<std::int64_t> perm_;
};

// The (steps x batch) indices a run uses, row-major.
std::vector<std::int64_t> batch_order(std::int64_t n, int batch, std::int64_t steps,
                                      std::uint64_t seed, bool shuffle);

// The examples of a run. Rows: x is (n, in). Sequences: x is (seq_len, n, in) and the
// batch axis is 1. Targets: mse takes T values, (n, out) (or (seq_len, n, out) with
// every_step); cross_entropy takes int64 labels, (n) (or (seq_len, n)).
template <class T>
struct TrainData {
  const T* x = nullptr;
  const void* y = nullptr;
  std::int64_t n = 0;
  bool sequences = false;
  int seq_len = 1;
  int in = 0;
  int out = 0;  // target columns (mse); 1 for labels
  bool every_step = false;
  LossKind loss = LossKind::mse;
  // An optional validation split of the same layout (n_val = 0: none).
  const T* x_val = nullptr;
  const void* y_val = nullptr;
  std::int64_t n_val = 0;
};

struct TrainOptions {
  std::int64_t steps = 1;
  int batch_size = 32;
  std::uint64_t seed = 0;
  bool shuffle = true;
  double max_norm = -1.0;  // < 0: no clipping by norm
  double norm_type = 2.0;
  double clip_value = -1.0;       // < 0: no clipping by value
  double max_weight_norm = -1.0;  // < 0: no max-norm constraint
  std::int64_t record_every = 1;
  bool record_activation_grads = false;
  bool train = true;  // BatchNorm: batch statistics (and running-stat updates)
  Truncation truncation = Truncation::none;
  int window = 0;
};

enum class Stopped { completed, callback, interrupted, diverged };
const char* stopped_name(Stopped s);

// The first step at which the loss, a gradient or a weight was NaN or infinite.
struct NonFinite {
  std::int64_t step = 0;    // 1-based
  std::string what;         // "loss", "gradient" or "weight"
  std::string where;        // a parameter's name, a block or timestep, or "loss"
  std::int64_t index = -1;  // the parameter's index, or -1
  std::string message;
};

// Rows of recorded steps, allocated for every row a run can record; `rows` are filled.
// Row-major (rows x P) and (rows x A) for the per-parameter and per-boundary arrays. The
// arrays never grow, so views of the filled rows stay valid while a run goes on.
struct TrainHistory : std::enable_shared_from_this<TrainHistory> {
  std::size_t P = 0, A = 0;
  std::int64_t capacity = 0, rows = 0;
  std::vector<std::int64_t> steps;
  std::vector<double> loss, log10_loss, log10_total_norm, log10_clipped_total_norm, log10_clip_coef,
      lr, val_loss;
  std::vector<double> log10_param_grad_norms, log10_param_norms, log10_update_ratios,
      log10_activation_grad_norms;
  Stopped stopped = Stopped::completed;
  std::int64_t steps_run = 0;
  bool has_nonfinite = false;
  NonFinite nonfinite;

  static double bytes(std::int64_t capacity, std::size_t P, std::size_t A, bool val);
};

// Called after each recorded row with the step (1-based) and the history so far; returns
// true to stop the run.
using TrainCallback = std::function<bool(std::int64_t, const TrainHistory&)>;

// Trains `chain` in place: `order[i]` is the chain's parameter (parameters() index) that
// is parameter i of the optimizer and the history (empty: the chain's own order).
// `schedule` may be null (the optimizer's lr throughout). Interrupted (the canceller) ends
// the run with stopped = interrupted; a NonFiniteError of a pass ends it as diverged; the
// weights are those of the last step whose update was finite.
template <class T>
std::shared_ptr<TrainHistory> train(Chain<T>& chain, const std::vector<std::size_t>& order,
                                    const TrainData<T>& data, Optimizer<T>& optimizer,
                                    LRSchedule* schedule, const TrainOptions& options,
                                    Canceller& cancel, const TrainCallback& callback);
template <class T>
std::shared_ptr<TrainHistory> train(RecurrentChain<T>& chain, const TrainData<T>& data,
                                    Optimizer<T>& optimizer, LRSchedule* schedule,
                                    const TrainOptions& options, Canceller& cancel,
                                    const TrainCallback& callback);

}  // namespace gradchain
