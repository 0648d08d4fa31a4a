#include "gradchain/train.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <utility>

#include "gradchain/clip.hpp"
#include "gradchain/clones.hpp"
#include "gradchain/parallel.hpp"
#include "gradchain/rng.hpp"
#include "gradchain/scaled.hpp"
#include "gradchain/system.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace gradchain {

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();
// Validation passes take the split this many examples at a time.
constexpr std::int64_t kValidationChunk = 1024;

// The high 64 bits of a * b: an integer uniform on [0, m) from 64 random bits.
std::uint64_t mulhi(std::uint64_t a, std::uint64_t b) {
  const std::uint64_t a0 = a & 0xffffffffu, a1 = a >> 32, b0 = b & 0xffffffffu, b1 = b >> 32;
  const std::uint64_t p00 = a0 * b0, p01 = a0 * b1, p10 = a1 * b0, p11 = a1 * b1;
  const std::uint64_t mid = (p00 >> 32) + (p01 & 0xffffffffu) + (p10 & 0xffffffffu);
  return p11 + (p01 >> 32) + (p10 >> 32) + (mid >> 32);
}

// log10 ||x|| from a scan; NaN or +inf for a non-finite array.
double log10_norm_of(const Scan& s) {
  if (!s.finite) return std::isinf(s.maxabs) ? kInf : kNaN;
  return log10_norm(s, 0);
}

bool bad_log10(double v) {
  return std::isnan(v) || v == kInf;
}

bool in_band(double m) {
  return m == 0.0 || (m >= 0x1p-400 && m <= 0x1p400);
}

// The largest entries and sums of squares of p and p - b, in one pass. A NaN in p makes sp
// NaN, an inf makes mp inf.
template <class T>
__attribute__((always_inline)) inline UpdateSums update_sums_impl(const T* p, const T* b,
                                                                  std::size_t n) {
  double mp = 0.0, md = 0.0, sp = 0.0, sd = 0.0;
#pragma omp simd reduction(max : mp, md) reduction(+ : sp, sd)
  for (std::size_t i = 0; i < n; ++i) {
    const double a = static_cast<double>(p[i]), d = a - static_cast<double>(b[i]);
    const double fa = std::fabs(a), fd = std::fabs(d);
    mp = fa > mp ? fa : mp;
    md = fd > md ? fd : md;
    sp += a * a;
    sd += d * d;
  }
  UpdateSums u;
  u.max_p = mp;
  u.max_d = md;
  u.sum_p2 = sp;
  u.sum_d2 = sd;
  return u;
}

GC_CLONES UpdateSums update_sums(const float* p, const float* b, std::size_t n) {
  return update_sums_impl(p, b, n);
}
GC_CLONES UpdateSums update_sums(const double* p, const double* b, std::size_t n) {
  return update_sums_impl(p, b, n);
}

// max|p| and sum p^2 as the last update's pass left them, the ones of the next update's b.
struct Sums {
  double m = 0.0, s = 0.0;
  bool valid = false;
};

// log10 ||p|| (NaN or +inf for a non-finite p) and log10 ||p - b|| / ||b|| of one update
// (b the parameter before it, u its sums, `last` b's sums where known), from the sums where
// no square that matters can overflow or underflow; otherwise from scans at a power-of-two
// scale (`diff`, a scratch of the thread's, then takes n numbers).
template <class T>
bool update_norms(const T* p, const T* b, std::size_t n, const UpdateSums& u,
                  std::vector<double>& diff, Sums& last, double& log10_p, double& log10_ratio) {
  if (!last.valid) {  // b through the same pass, as p
    const UpdateSums ub = update_sums(b, b, n);
    last = {ub.max_p, ub.sum_p2, true};
  }
  const double mp = u.max_p, mb = last.m, md = u.max_d, sp = u.sum_p2, sb = last.s, sd = u.sum_d2;
  last = {mp, sp, true};
  if (std::isnan(sp) || std::isinf(mp)) {
    log10_p = std::isinf(mp) ? kInf : kNaN;
    last.valid = false;
    return false;
  }
  if (in_band(mp) && in_band(mb) && in_band(md)) {
    log10_p = sp == 0.0 ? -kInf : 0.5 * std::log10(sp);
    log10_ratio = sd == 0.0 ? -kInf : (sb == 0.0 ? kInf : 0.5 * (std::log10(sd) - std::log10(sb)));
    return true;
  }
  diff.resize(n);
  for (std::size_t i = 0; i < n; ++i)
    diff[i] = static_cast<double>(p[i]) - static_cast<double>(b[i]);
  log10_p = log10_norm(scan(p, n), 0);
  const double ld = log10_norm(scan(diff.data(), n), 0);
  log10_ratio = ld == -kInf ? -kInf : ld - log10_norm(scan(b, n), 0);
  return true;
}

// One forward and backward pass, in the history's parameter order.
template <class T>
struct StepPass {
  double loss = kNaN, log10_loss = kNaN, log10_total = kNaN, log10_coef = 0.0;
  std::vector<double> log10_grad;
  std::vector<std::vector<T>> grads;  // clipped by norm
  std::vector<double> log10_act;
};

// ---- the adapters: one per chain kind -------------------------------------------------------

template <class T>
class ChainModel {
 public:
  ChainModel(Chain<T>& c, const std::vector<std::size_t>& order) : c_(c), order_(order) {
    const std::size_t n = c.num_params();
    if (order_.empty()) {
      order_.resize(n);
      std::iota(order_.begin(), order_.end(), std::size_t{0});
    }
    std::vector<char> seen(n, 0);
    for (std::size_t k : order_) {
      if (k >= n || seen[k]) throw std::invalid_argument("order must be a permutation of 0..n-1");
      seen[k] = 1;
    }
    if (order_.size() != n) throw std::invalid_argument("order must be a permutation of 0..n-1");
  }
  std::size_t size() const { return order_.size(); }
  T* param(std::size_t i) { return c_.parameters()[order_[i]].data(); }
  std::size_t param_size(std::size_t i) const { return c_.parameters()[order_[i]].size; }
  // Rows of a weight matrix (each a unit's incoming weights); 0 for other parameters.
  std::size_t rows(std::size_t i) const {
    const auto& s = c_.parameters()[order_[i]].shape;
    return s.size() == 2 ? static_cast<std::size_t>(s[0]) : 0;
  }
  std::string name(std::size_t i) const { return c_.parameters()[order_[i]].name; }
  std::size_t activations(const TrainData<T>&) const { return c_.size() + 1; }
  void check(const TrainData<T>& d) const {
    if (d.sequences) throw std::invalid_argument("a chain of blocks trains on rows, not sequences");
    if (d.in != c_.in_width())
      throw std::invalid_argument("x must have " + std::to_string(c_.in_width()) +
                                  " features; got " + std::to_string(d.in));
    if (d.loss == LossKind::mse && d.out != c_.out_width())
      throw std::invalid_argument("y must have " + std::to_string(c_.out_width()) +
                                  " columns; got " + std::to_string(d.out));
  }
  void backward(const T* x, const void* y, int batch, const TrainData<T>& d, const TrainOptions& o,
                StepPass<T>& out, Canceller& cancel) {
    ChainRequest req;
    req.loss = d.loss;
    req.target = y;
    req.keep_param_grads = true;
    req.boundary_norms = o.record_activation_grads;
    req.max_norm = o.max_norm;
    req.norm_type = o.norm_type;
    req.train = o.train;
    ChainResult<T> r = c_.backward(x, batch, req, cancel);
    out.loss = r.loss;
    out.log10_loss = r.log10_loss;
    out.log10_total = r.log10_total_norm;
    out.log10_coef = r.log10_clip_coef;
    const std::size_t n = order_.size();
    out.log10_grad.resize(n);
    out.grads.resize(n);
    for (std::size_t i = 0; i < n; ++i) {
      out.log10_grad[i] = r.log10_param_grad_norms[order_[i]];
      out.grads[i] = std::move(r.param_grads[order_[i]]);
    }
    out.log10_act = std::move(r.log10_boundary_grad_norms);
  }
  // The mean loss over `batch` examples: forward only, in eval mode.
  double loss(const T* x, const void* y, int batch, const TrainData<T>& d, Canceller& cancel) {
    ChainRequest req;
    req.loss = d.loss;
    req.target = y;
    req.loss_only = true;
    req.train = false;
    return c_.backward(x, batch, req, cancel).loss;
  }
  void changed() { c_.params_changed(); }
  // The step's gradients, once applied, back to the chain for the next pass to write into.
  void recycle(StepPass<T>& out) {
    std::vector<std::vector<T>> grads(order_.size());
    for (std::size_t i = 0; i < order_.size(); ++i) grads[order_[i]] = std::move(out.grads[i]);
    c_.recycle_param_grads(std::move(grads));
  }
  std::string where(const NonFiniteError& e) const {
    if (e.where() == "forward" && e.index() >= 1 && std::size_t(e.index()) <= c_.size())
      return "block '" + c_.block(std::size_t(e.index() - 1)).name() + "'";
    return e.where();
  }

 private:
  Chain<T>& c_;
  std::vector<std::size_t> order_;
};

template <class T>
class RecurrentModel {
 public:
  explicit RecurrentModel(RecurrentChain<T>& c)
      : c_(c), names_(c.shape().param_names()), shapes_(c.shape().param_shapes()) {}
  std::size_t size() const { return c_.param_count(); }
  T* param(std::size_t i) { return c_.param(i); }
  std::size_t param_size(std::size_t i) const { return c_.param_size(i); }
  std::size_t rows(std::size_t i) const {
    return shapes_[i].size() == 2 ? static_cast<std::size_t>(shapes_[i][0]) : 0;
  }
  std::string name(std::size_t i) const { return names_[i]; }
  std::size_t activations(const TrainData<T>& d) const {
    return static_cast<std::size_t>(c_.shape().num_layers) *
           (static_cast<std::size_t>(d.seq_len) + 1);
  }
  void check(const TrainData<T>& d) const {
    const RecurrentShape& s = c_.shape();
    if (!d.sequences) throw std::invalid_argument("a recurrent chain trains on sequences");
    if (d.in != s.input_size)
      throw std::invalid_argument("x must have " + std::to_string(s.input_size) +
                                  " features per step; got " + std::to_string(d.in));
    const int n_out = s.output_size > 0 ? s.output_size : s.hidden_size;
    if (d.loss == LossKind::mse && d.out != n_out)
      throw std::invalid_argument("y must have " + std::to_string(n_out) + " columns; got " +
                                  std::to_string(d.out));
  }
  void backward(const T* x, const void* y, int batch, const TrainData<T>& d, const TrainOptions& o,
                StepPass<T>& out, Canceller& cancel) {
    RecurrentRequest req;
    req.loss = d.loss;
    req.target = y;
    req.target_every_step = d.every_step;
    req.truncation = o.truncation;
    req.window = o.window;
    req.max_norm = o.max_norm;
    req.norm_type = o.norm_type;
    req.keep_param_grads = true;
    req.state_norms = o.record_activation_grads;
    RecurrentResult<T> r = c_.run(x, d.seq_len, batch, req, cancel);
    out.loss = r.loss;
    out.log10_loss = r.log10_loss;
    out.log10_total = r.log10_total_norm;
    out.log10_coef = r.log10_clip_coef;
    out.log10_grad = std::move(r.log10_param_grad_norms);
    out.grads = std::move(r.param_grads);
    out.log10_act = std::move(r.log10_state_grad_norms);
  }
  double loss(const T* x, const void* y, int batch, const TrainData<T>& d, Canceller& cancel) {
    RecurrentRequest req;
    req.loss = d.loss;
    req.target = y;
    req.target_every_step = d.every_step;
    req.loss_only = true;
    return c_.run(x, d.seq_len, batch, req, cancel).loss;
  }
  void changed() {}
  void recycle(StepPass<T>&) {}
  std::string where(const NonFiniteError& e) const {
    if (e.where() == "forward") return "timestep " + std::to_string(e.index());
    return e.where();
  }

 private:
  RecurrentChain<T>& c_;
  std::vector<std::string> names_;
  std::vector<std::vector<std::int64_t>> shapes_;
};

// Parameters of at least this many numbers in all are updated on the pass's threads.
constexpr std::size_t kParallelUpdate = 16384;

// ---- threads ------------------------------------------------------------------------------

// The passes of a run go on the core's threads or on one: the numbers are the same either
// way (a pass splits its work by the problem's size alone), but a run of many small passes
// can be faster on one thread, and on a loaded machine the hand-offs between two threads
// wait for a core. The loop times a few passes each way at the start, again once the
// threads and buffers are warm (step kRetry), and every kCycle steps, and keeps the faster.
class PassThreads {
 public:
  PassThreads() : full_(max_threads()) {}
  ~PassThreads() {
    if (full_ > 1) set(full_);
  }
  PassThreads(const PassThreads&) = delete;
  PassThreads& operator=(const PassThreads&) = delete;

  // Before the pass of step s (0-based).
  void begin(std::int64_t s) {
    if (full_ <= 1) return;
    if (s == kRetry || s % kCycle == 0) {
      start_ = s;
      best_[0] = best_[1] = kInf;
    }
    const std::int64_t k = s - start_;
    trial_ = k < 2 * kTrial ? static_cast<int>(k / kTrial) : -1;
    set(trial_ == 0 ? full_ : trial_ == 1 ? 1 : chosen_);
    if (trial_ >= 0) t0_ = std::chrono::steady_clock::now();
  }
  // After it: the first pass of each trial (a change of threads) is not counted.
  void end(std::int64_t s) {
    if (trial_ < 0) return;
    const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
    const std::int64_t k = s - start_;
    if (k % kTrial != 0) best_[trial_] = std::min(best_[trial_], t);
    if (k == 2 * kTrial - 1) chosen_ = best_[1] < best_[0] ? 1 : full_;
  }

 private:
  static constexpr std::int64_t kCycle = 1000, kRetry = 50, kTrial = 4;
  static void set(int n) {
#ifdef _OPENMP
    omp_set_num_threads(n);
#else
    (void)n;
#endif
  }
  int full_;
  int chosen_ = 1;
  int trial_ = -1;
  std::int64_t start_ = 0;
  double best_[2] = {kInf, kInf};
  std::chrono::steady_clock::time_point t0_;
};

// ---- batches ------------------------------------------------------------------------------

// Copies the examples idx[0..B) of the training split (or the validation split) into
// contiguous batch arrays of the same layout.
template <class T>
struct Gather {
  std::vector<T> x, y;
  std::vector<std::int64_t> labels;

  const void* target() const {
    return labels.empty() ? static_cast<const void*>(y.data())
                          : static_cast<const void*>(labels.data());
  }

  void operator()(const TrainData<T>& d, bool val, const std::int64_t* idx, std::size_t B) {
    const T* X = val ? d.x_val : d.x;
    const void* Y = val ? d.y_val : d.y;
    const std::size_t N = static_cast<std::size_t>(val ? d.n_val : d.n);
    const std::size_t in = static_cast<std::size_t>(d.in);
    const std::size_t steps = d.sequences ? static_cast<std::size_t>(d.seq_len) : 1;
    x.resize(steps * B * in);
    for (std::size_t t = 0; t < steps; ++t)
      for (std::size_t j = 0; j < B; ++j) {
        const T* src = X + (t * N + static_cast<std::size_t>(idx[j])) * in;
        std::copy(src, src + in, x.data() + (t * B + j) * in);
      }
    const std::size_t ysteps = d.sequences && d.every_step ? steps : 1;
    if (d.loss == LossKind::cross_entropy) {
      const auto* L = static_cast<const std::int64_t*>(Y);
      labels.resize(ysteps * B);
      for (std::size_t t = 0; t < ysteps; ++t)
        for (std::size_t j = 0; j < B; ++j)
          labels[t * B + j] = L[t * N + static_cast<std::size_t>(idx[j])];
    } else {
      const auto* V = static_cast<const T*>(Y);
      const std::size_t out = static_cast<std::size_t>(d.out);
      y.resize(ysteps * B * out);
      for (std::size_t t = 0; t < ysteps; ++t)
        for (std::size_t j = 0; j < B; ++j) {
          const T* src = V + (t * N + static_cast<std::size_t>(idx[j])) * out;
          std::copy(src, src + out, y.data() + (t * B + j) * out);
        }
    }
  }
};

// Rows (or sequences) per example in each split, for the memory estimate.
template <class T>
double example_bytes(const TrainData<T>& d) {
  const double steps = d.sequences ? d.seq_len : 1;
  const double ysteps = d.sequences && d.every_step ? steps : 1;
  const double y = d.loss == LossKind::cross_entropy ? 8.0 : double(d.out) * sizeof(T);
  return steps * d.in * sizeof(T) + ysteps * y;
}

void check_options(const TrainOptions& o, std::int64_t n) {
  if (o.steps <= 0)
    throw std::invalid_argument("steps must be a positive integer; got " + std::to_string(o.steps));
  if (o.batch_size <= 0 || o.batch_size > n)
    throw std::invalid_argument("batch_size must be between 1 and the " + std::to_string(n) +
                                " training examples; got " + std::to_string(o.batch_size));
  if (o.record_every <= 0)
    throw std::invalid_argument("record_every must be a positive integer; got " +
                                std::to_string(o.record_every));
  if (o.max_norm >= 0 && o.clip_value >= 0)
    throw std::invalid_argument("give max_norm or clip_value, not both");
  clip::check_norm_type(o.norm_type);
  if (std::isnan(o.max_norm) || std::isnan(o.clip_value) || std::isnan(o.max_weight_norm))
    throw std::invalid_argument("max_norm, clip_value and max_weight_norm must not be NaN");
}

// torch.renorm(w, p=2, dim=0, maxnorm=c) on a (rows x n/rows) weight: every row whose
// 2-norm exceeds c is multiplied by c / (norm + 1e-7), in the weight's precision.
template <class T>
void renorm_rows(T* w, std::size_t rows, std::size_t n, double c) {
  const std::size_t cols = n / rows;
  const T cs = static_cast<T>(c), eps = static_cast<T>(1e-7);
  for (std::size_t r = 0; r < rows; ++r) {
    T* row = w + r * cols;
    const T norm = static_cast<T>(clip::array_norm(row, cols, 2.0));
    if (!(norm > cs)) continue;
    const T f = cs / (norm + eps);
    for (std::size_t j = 0; j < cols; ++j) row[j] *= f;
  }
}

// The values of one step, written into the history as a row once the step is done.
struct Row {
  std::int64_t step = 0;
  double loss = kNaN, log10_loss = kNaN, log10_total = kNaN, log10_clipped = kNaN,
         log10_coef = kNaN, lr = kNaN, val_loss = kNaN;
  std::vector<double> grad, norm, ratio, act;

  void reset(std::size_t P, std::size_t A) {
    loss = log10_loss = log10_total = log10_clipped = log10_coef = lr = val_loss = kNaN;
    grad.assign(P, kNaN);
    norm.assign(P, kNaN);
    ratio.assign(P, kNaN);
    act.assign(A, kNaN);
  }
};

void write_row(TrainHistory& h, const Row& r) {
  const auto i = static_cast<std::size_t>(h.rows);
  h.steps[i] = r.step;
  h.loss[i] = r.loss;
  h.log10_loss[i] = r.log10_loss;
  h.log10_total_norm[i] = r.log10_total;
  h.log10_clipped_total_norm[i] = r.log10_clipped;
  h.log10_clip_coef[i] = r.log10_coef;
  h.lr[i] = r.lr;
  if (!h.val_loss.empty()) h.val_loss[i] = r.val_loss;
  std::copy(r.grad.begin(), r.grad.end(), h.log10_param_grad_norms.begin() + i * h.P);
  std::copy(r.norm.begin(), r.norm.end(), h.log10_param_norms.begin() + i * h.P);
  std::copy(r.ratio.begin(), r.ratio.end(), h.log10_update_ratios.begin() + i * h.P);
  if (h.A) std::copy(r.act.begin(), r.act.end(), h.log10_activation_grad_norms.begin() + i * h.A);
}

// ---- the loop -------------------------------------------------------------------------------

template <class T, class Model>
std::shared_ptr<TrainHistory> run(Model& model, const TrainData<T>& d, Optimizer<T>& opt,
                                  LRSchedule* schedule, const TrainOptions& o, Canceller& cancel,
                                  const TrainCallback& callback) {
  if (d.n <= 0) throw std::invalid_argument("the data must hold at least one example");
  check_options(o, d.n);
  model.check(d);
  const std::size_t P = model.size();
  const std::size_t A = o.record_activation_grads ? model.activations(d) : 0;
  const bool val = d.n_val > 0;
  const std::int64_t capacity = o.steps / o.record_every + (o.steps % o.record_every ? 1 : 0);
  std::vector<std::size_t> offset(P + 1, 0);
  std::size_t largest = 0;
  for (std::size_t i = 0; i < P; ++i) {
    offset[i + 1] = offset[i] + model.param_size(i);
    largest = std::max(largest, model.param_size(i));
  }
  const std::size_t B = static_cast<std::size_t>(o.batch_size);
  const std::int64_t chunk = val ? std::min(d.n_val, kValidationChunk) : 0;
  // The history, a copy of the weights before each update, the difference of the largest
  // parameter, the sampler's permutation, the batch and validation copies, and one step's
  // gradients and row.
  const double bytes = TrainHistory::bytes(capacity, P, A, val) + double(offset[P]) * sizeof(T) +
                       double(largest) * 8 * max_threads() + double(d.n) * 8 +
                       (double(B) + double(chunk)) * example_bytes(d) +
                       double(offset[P]) * sizeof(T) + double(P + A) * 8 * 6;
  check_memory(bytes, "this training run (its history holds " + std::to_string(capacity) +
                          " rows of " + std::to_string(P) + " parameters)");

  auto hist = std::make_shared<TrainHistory>();
  TrainHistory& h = *hist;
  h.P = P;
  h.A = A;
  h.capacity = capacity;
  const auto cap = static_cast<std::size_t>(capacity);
  h.steps.assign(cap, 0);
  for (auto* v : {&h.loss, &h.log10_loss, &h.log10_total_norm, &h.log10_clipped_total_norm,
                  &h.log10_clip_coef, &h.lr})
    v->assign(cap, kNaN);
  if (val) h.val_loss.assign(cap, kNaN);
  h.log10_param_grad_norms.assign(cap * P, kNaN);
  h.log10_param_norms.assign(cap * P, kNaN);
  h.log10_update_ratios.assign(cap * P, kNaN);
  h.log10_activation_grad_norms.assign(cap * A, kNaN);

  Sampler sampler(d.n, o.batch_size, o.seed, o.shuffle);
  Gather<T> batch, vbatch;
  StepPass<T> pass;
  Row row;
  std::vector<T> before(offset[P]);
  // Updates of parameters too few to be worth a second thread stay on one.
  const bool parallel_update = P >= 2 && offset[P] >= kParallelUpdate;
  // A thread's differences p - b, where an update's sums leave the band.
  struct UpdateScratch {
    std::vector<double> diff;
  };
  std::vector<char> finite(P, 1);
  opt.reserve(P);
  std::vector<Sums> last(P);
  std::vector<std::int64_t> vidx;
  if (val) {
    vidx.resize(static_cast<std::size_t>(chunk));
    std::iota(vidx.begin(), vidx.end(), std::int64_t{0});
  }
  const bool by_value = o.clip_value >= 0;
  const bool renorm = o.max_weight_norm >= 0;
  bool staged = false;  // row h.rows holds the last step run, not yet committed
  auto stage = [&] {
    write_row(h, row);
    staged = true;
    h.steps_run = row.step;
  };
  auto commit = [&] {
    if (!staged) return;
    ++h.rows;
    staged = false;
  };
  auto diverge = [&](std::int64_t step, const char* what, std::string where, std::int64_t index,
                     std::string message) {
    h.has_nonfinite = true;
    h.nonfinite = NonFinite{step, what, std::move(where), index, std::move(message)};
    h.stopped = Stopped::diverged;
    stage();
    commit();
  };
  auto weight_norms = [&] {
    for (std::size_t i = 0; i < P; ++i)
      row.norm[i] = log10_norm_of(scan(model.param(i), model.param_size(i)));
  };
  // The validation loss: the mean over the split, `chunk` examples at a time.
  auto validate = [&] {
    double sum = 0;
    for (std::int64_t i0 = 0; i0 < d.n_val; i0 += chunk) {
      const std::int64_t rows = std::min(chunk, d.n_val - i0);
      for (std::int64_t j = 0; j < rows; ++j) vidx[static_cast<std::size_t>(j)] = i0 + j;
      vbatch(d, true, vidx.data(), static_cast<std::size_t>(rows));
      sum += model.loss(vbatch.x.data(), vbatch.target(), static_cast<int>(rows), d, cancel) *
             double(rows);
    }
    return sum / double(d.n_val);
  };

  PassThreads threads;
  BlasThreads blas(1);  // as every pass sets it: no thread-count changes between passes
  try {
    for (std::int64_t s = 0; s < o.steps; ++s) {
      const std::int64_t step = s + 1;
      cancel.poll();
      batch(d, false, sampler.batch(s), B);
      const double lr = schedule ? schedule->lr() : opt.spec().lr;
      row.reset(P, A);
      row.step = step;
      row.lr = lr;

      // ---- forward and backward --------------------------------------------------------------
      try {
        threads.begin(s);
        model.backward(batch.x.data(), batch.target(), o.batch_size, d, o, pass, cancel);
      } catch (const NonFiniteError& e) {
        weight_norms();
        diverge(step, "loss", model.where(e), -1, e.what());
        break;
      }
      row.loss = pass.loss;
      row.log10_loss = pass.log10_loss;
      row.log10_total = pass.log10_total;
      row.log10_coef = pass.log10_coef;
      row.log10_clipped = pass.log10_total + pass.log10_coef;
      row.grad = pass.log10_grad;
      if (A) row.act = pass.log10_act;
      if (bad_log10(pass.log10_loss)) {
        weight_norms();
        diverge(step, "loss", "loss", -1,
                "the training loss of step " + std::to_string(step) + " is " +
                    (std::isnan(pass.loss) ? "NaN" : "infinite"));
        break;
      }
      // torch.nn.utils.clip_grad_value_, and the total norm of what it leaves.
      if (by_value) {
        std::vector<double> lp(P);
        for (std::size_t i = 0; i < P; ++i) {
          std::vector<T>& g = pass.grads[i];
          clip::clamp(g.data(), g.size(), o.clip_value);
          const Scan sc = scan(g.data(), g.size());
          lp[i] = log10_pnorm(g.data(), g.size(), sc, 0, o.norm_type);
        }
        row.log10_clipped = log_clip<T>(lp, o.norm_type, -1.0).log10_total;
        row.log10_coef = row.log10_clipped == row.log10_total
                             ? 0.0
                             : std::min(0.0, row.log10_clipped - row.log10_total);
      }
      // The first gradient the backward pass reached that the update cannot take: NaN, or
      // infinite (clip_grad_value_ clamps infinite entries), or, where its clipped norm
      // exceeds the largest T, with an entry beyond the float range.
      std::int64_t bad = -1;
      const double top = std::log10(double(std::numeric_limits<T>::max()));
      for (std::size_t i = P; i-- > 0;) {
        const std::vector<T>& g = pass.grads[i];
        const double lg = row.grad[i];
        const bool nonfinite = by_value ? std::isnan(lg)
                                        : bad_log10(lg) || (lg + pass.log10_coef >= top &&
                                                            !scan(g.data(), g.size()).finite);
        if (nonfinite) {
          bad = static_cast<std::int64_t>(i);
          break;
        }
      }
      if (bad >= 0) {
        weight_norms();
        const std::string name = model.name(static_cast<std::size_t>(bad));
        diverge(step, "gradient", name, bad,
                "the gradient of " + name + " is not finite at step " + std::to_string(step));
        break;
      }

      // ---- the update ------------------------------------------------------------------------
      // Every parameter takes its update, independent of the others' and its sums taken
      // within it, so that the pass's threads may share the parameters out: the numbers are
      // the same on any number of threads.
      auto update_one = [&](int pi, UpdateScratch& scratch) {
        const auto i = static_cast<std::size_t>(pi);
        T* p = model.param(i);
        const std::size_t n = model.param_size(i);
        T* b = before.data() + offset[i];
        UpdateSums u;
        if (renorm && model.rows(i) > 0) {
          std::copy(p, p + n, b);
          opt.step(i, p, pass.grads[i].data(), n, lr);
          renorm_rows(p, model.rows(i), n, o.max_weight_norm);
          u = update_sums(p, b, n);
        } else {
          u = opt.step_tracked(i, p, pass.grads[i].data(), n, lr, b);
        }
        finite[i] = update_norms(p, b, n, u, scratch.diff, last[i], row.norm[i], row.ratio[i]);
      };
      parallel_indices<UpdateScratch>(0, static_cast<int>(P), parallel_update ? max_threads() : 1,
                                      nullptr, update_one);
      threads.end(s);
      const auto bad_it = std::find(finite.begin(), finite.end(), char(0));
      if (bad_it != finite.end()) {
        // The chain keeps the weights it had before this step.
        for (std::size_t i = 0; i < P; ++i)
          std::copy(before.data() + offset[i], before.data() + offset[i + 1], model.param(i));
        model.changed();
        const auto bad_weight = static_cast<std::size_t>(bad_it - finite.begin());
        const std::string name = model.name(bad_weight);
        diverge(step, "weight", name, static_cast<std::int64_t>(bad_weight),
                "the update of step " + std::to_string(step) + " made " + name +
                    " non-finite (the weights of step " + std::to_string(step - 1) + " are kept)");
        break;
      }
      model.changed();
      model.recycle(pass);
      if (schedule) schedule->step(pass.loss);
      stage();

      const bool record = step % o.record_every == 0 || step == o.steps;
      if (!record) continue;
      if (val) {
        row.val_loss = validate();
        h.val_loss[static_cast<std::size_t>(h.rows)] = row.val_loss;
      }
      commit();
      // The callback may change the weights.
      if (callback) std::fill(last.begin(), last.end(), Sums{});
      if (callback && callback(step, h) && step < o.steps) {
        h.stopped = Stopped::callback;
        break;
      }
    }
  } catch (const Interrupted&) {
    h.stopped = Stopped::interrupted;
  }
  commit();
  return hist;
}

}  // namespace

// ---- public ---------------------------------------------------------------------------------

Sampler::Sampler(std::int64_t n, int batch, std::uint64_t seed, bool shuffle)
    : n_(n), per_epoch_(0), batch_(batch), seed_(seed), shuffle_(shuffle) {
  if (n <= 0) throw std::invalid_argument("n must be positive; got " + std::to_string(n));
  if (batch <= 0 || batch > n)
    throw std::invalid_argument("batch_size must be between 1 and n = " + std::to_string(n) +
                                "; got " + std::to_string(batch));
  per_epoch_ = n / batch;
}

const std::int64_t* Sampler::batch(std::int64_t step) {
  const std::int64_t epoch = step / per_epoch_, b = step % per_epoch_;
  if (epoch != epoch_) {
    perm_.resize(static_cast<std::size_t>(n_));
    std::iota(perm_.begin(), perm_.end(), std::int64_t{0});
    if (shuffle_) {
      const Philox rng(seed_);
      const auto stream = static_cast<std::uint64_t>(epoch);
      std::uint64_t k = 0;
      for (std::int64_t i = n_ - 1; i > 0; --i, ++k) {
        const Philox::Block r = rng(stream, k);
        const std::uint64_t u = (std::uint64_t{r[1]} << 32) | r[0];
        const auto j = static_cast<std::size_t>(mulhi(u, static_cast<std::uint64_t>(i) + 1));
        std::swap(perm_[static_cast<std::size_t>(i)], perm_[j]);
      }
    }
    epoch_ = epoch;
  }
  return perm_.data() + b * batch_;
}

std::vector<std::int64_t> batch_order(std::int64_t n, int batch, std::int64_t steps,
                                      std::uint64_t seed, bool shuffle) {
  if (steps <= 0)
    throw std::invalid_argument("steps must be a positive integer; got " + std::to_string(steps));
  Sampler s(n, batch, seed, shuffle);
  check_memory(double(steps) * batch * 8 + double(n) * 8, "the batch order");
  std::vector<std::int64_t> out(static_cast<std::size_t>(steps) * static_cast<std::size_t>(batch));
  for (std::int64_t k = 0; k < steps; ++k) {
    const std::int64_t* b = s.batch(k);
    std::copy(b, b + batch, out.begin() + k * batch);
  }
  return out;
}

const char* stopped_name(Stopped s) {
  switch (s) {
    case Stopped::completed:
      return "completed";
    case Stopped::callback:
      return "callback";
    case Stopped::interrupted:
      return "interrupted";
    case Stopped::diverged:
      return "diverged";
  }
  return "completed";
}

double TrainHistory::bytes(std::int64_t capacity, std::size_t P, std::size_t A, bool val) {
  return double(capacity) * 8.0 * (8.0 + (val ? 1 : 0) + 3.0 * double(P) + double(A));
}

template <class T>
std::shared_ptr<TrainHistory> train(Chain<T>& chain, const std::vector<std::size_t>& order,
                                    const TrainData<T>& data, Optimizer<T>& optimizer,
                                    LRSchedule* schedule, const TrainOptions& options,
                                    Canceller& cancel, const TrainCallback& callback) {
  if (chain.draws_params())
    throw std::invalid_argument(
        "net draws its weights for each pass (store_weights=False): training updates them, so "
        "build it with store_weights=True");
  ChainModel<T> model(chain, order);
  return run(model, data, optimizer, schedule, options, cancel, callback);
}

template <class T>
std::shared_ptr<TrainHistory> train(RecurrentChain<T>& chain, const TrainData<T>& data,
                                    Optimizer<T>& optimizer, LRSchedule* schedule,
                                    const TrainOptions& options, Canceller& cancel,
                                    const TrainCallback& callback) {
  RecurrentModel<T> model(chain);
  return run(model, data, optimizer, schedule, options, cancel, callback);
}

template std::shared_ptr<TrainHistory> train(Chain<float>&, const std::vector<std::size_t>&,
                                             const TrainData<float>&, Optimizer<float>&,
                                             LRSchedule*, const TrainOptions&, Canceller&,
                                             const TrainCallback&);
template std::shared_ptr<TrainHistory> train(Chain<double>&, const std::vector<std::size_t>&,
                                             const TrainData<double>&, Optimizer<double>&,
                                             LRSchedule*, const TrainOptions&, Canceller&,
                                             const TrainCallback&);
template std::shared_ptr<TrainHistory> train(RecurrentChain<float>&, const TrainData<float>&,
                                             Optimizer<float>&, LRSchedule*, const TrainOptions&,
                                             Canceller&, const TrainCallback&);
template std::shared_ptr<TrainHistory> train(RecurrentChain<double>&, const TrainData<double>&,
                                             Optimizer<double>&, LRSchedule*, const TrainOptions&,
                                             Canceller&, const TrainCallback&);

}  // namespace gradchain
