// A chain of blocks and the one driver that runs any chain: the forward pass, the loss,
// the backward pass with every boundary and parameter gradient norm exact in log space,
// clipping, threads, memory and cancellation.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "gradchain/block.hpp"
#include "gradchain/common.hpp"
#include "gradchain/init.hpp"
#include "gradchain/loss.hpp"

namespace gradchain {

struct ChainRequest {
  LossKind loss = LossKind::probe;
  const void* target = nullptr;  // T[B*out] (mse, grad_output) or int64[B] (cross_entropy)
  bool keep_param_grads = false;
  bool keep_boundary_grads = false;
  // false: log10_boundary_grad_norms is left NaN (the pass then skips those sums)
  bool boundary_norms = true;
  // false: no parameter gradients at all (their norms and the total norm are left NaN), for
  // callers that want the boundary norms only; not with keep_param_grads or clipping
  bool param_grads = true;
  double max_norm = -1.0;  // < 0: no clipping
  double norm_type = 2.0;  // for the total norm and clipping; inf allowed
  bool forward_only = false;
  bool loss_only = false;  // forward and loss, no backward (a validation pass)
  bool train = true;       // BatchNorm: batch statistics (and running-stat updates) or running ones
  // Forward only, keeping every boundary (inner ones too) in the result: the point at which
  // the Jacobian tools take each block's Jacobian. The batch is not split.
  bool trace = false;
  // Activation checkpointing: the forward pass keeps the boundary at every k-th top-level
  // block (and nothing else), and the backward pass recomputes each segment of k blocks
  // from it. 0: every boundary is kept; -1: k chosen to need the least memory (about
  // sqrt(blocks)). The results are the same either way.
  int checkpoint = 0;
};

template <class T>
struct ChainResult {
  // log10 of the Frobenius norm of every parameter's gradient (parameters(), buffers
  // excluded); -inf where a gradient is exactly zero.
  std::vector<double> log10_param_grad_norms;
  // log10 ||dL/dh|| at every top-level boundary: the input, then each top-level block's
  // output.
  std::vector<double> log10_boundary_grad_norms;
  double loss = 0.0;
  double log10_loss = 0.0;
  double norm_type = 2.0;
  double log10_total_norm = 0.0;  // over all parameter gradients, in norm_type
  bool clipped = false;
  double max_norm = 0.0;
  double log10_clip_coef = 0.0;
  // The last boundary as the forward pass holds it (output_mantissa, within the float
  // range) and at its true scale (output = output_mantissa * 2^output_log2_scale, rounded
  // once: 0 or inf where that leaves the float range).
  std::vector<T> output, output_mantissa;
  std::int64_t output_log2_scale = 0;
  std::vector<std::vector<T>> param_grads, boundary_grads;  // on request (clipped)
  // With ChainRequest::trace: every boundary (rows x width, times 2^exp) and every step's
  // per-pass data.
  std::vector<std::vector<T>> trace_values;
  std::vector<std::int64_t> trace_exps;
  std::vector<std::vector<double>> trace_locals;
};

// One parameter or buffer of the chain, with its torch name ("3.block.1.weight").
template <class T>
struct ParamRef {
  std::string name;
  std::vector<std::int64_t> shape;
  Block<T>* block = nullptr;
  std::size_t index = 0;  // in block->params()
  std::size_t size = 0;
  bool buffer = false;
  T* data() const { return block->param_data(index); }
};

template <class T>
class Chain {
 public:
  // Takes the top-level blocks; names them torch-style ("i", "i.block.j", "i.shortcut")
  // where a block has no name yet.
  explicit Chain(std::vector<std::unique_ptr<Block<T>>> blocks);
  Chain(const Chain& o);
  Chain& operator=(const Chain&) = delete;

  // The same chain in double precision (a copy).
  std::unique_ptr<Chain<double>> to_double() const;

  int in_width() const { return blocks_.front()->in_width(); }
  int out_width() const { return blocks_.back()->out_width(); }
  std::size_t size() const { return blocks_.size(); }
  const Block<T>& block(std::size_t i) const { return *blocks_[i]; }
  const std::vector<std::unique_ptr<Block<T>>>& blocks() const { return blocks_; }

  // Every parameter and buffer, parameters of a block before its buffers, blocks in order
  // (a residual's body, then its shortcut).
  const std::vector<ParamRef<T>>& parameters() const { return params_; }
  std::size_t num_params() const { return n_trainable_; }
  // Draws every Linear's weights: the k-th Linear in order uses stream k, so an MLP's
  // layer l has the same weights as ever. `cancel` is polled between layers. keep_units:
  // see Linear::init (a chain redrawn with the same seed and a new scale only rescales).
  void init(const InitSpec& spec, std::uint64_t seed, Canceller* cancel = nullptr,
            bool keep_units = false);
  // After parameters were written from outside.
  void params_changed();
  // Some block keeps no parameters and draws them for each pass (Linear(..., store=false)).
  bool draws_params() const { return plan_->drawn; }
  // Some block mixes the examples of a batch in this mode.
  bool couples_batch(bool train) const;

  // Bytes a pass with this batch would allocate.
  double backward_bytes(int batch, const ChainRequest& req) const;
  // Hands a result's param_grads back once read: the next pass that keeps its parameter
  // gradients writes them there instead of allocating (and zeroing) new ones.
  void recycle_param_grads(std::vector<std::vector<T>>&& grads);
  struct PassBytes {
    double needed = 0.0, pipeline = 0.0;
  };
  PassBytes pass_bytes(int batch, const ChainRequest& req) const;
  // Forward, loss, backward. Updates BatchNorm running statistics in train mode, so two
  // passes on one chain do not run at the same time (the second waits).
  ChainResult<T> backward(const T* x, int batch, const ChainRequest& req, Canceller& cancel);

  // The block tree as a flat list of steps over numbered boundaries (boundary 0 is the
  // input): a leaf step runs one block; a join step ends a residual block.
  struct Step {
    enum class Kind { leaf, join } kind = Kind::leaf;
    Block<T>* block = nullptr;  // leaf: the block; join: its Residual
    int in = 0;                 // leaf: input boundary; join: the body's output
    int skip = -1;              // join: the residual input (or its shortcut's output)
    int out = 0;
    int rin = -1;    // join: the residual's input
    int param0 = 0;  // index of its first parameter gradient (trainable parameters only)
    int nparams = 0;
    int top_block = 0;  // the top-level block (0-based) this step belongs to
    std::string where;  // for messages: "block 3 (Linear(64, 256), '3')"
  };
  struct Plan {
    std::vector<Step> steps;
    std::vector<int> width;           // per boundary
    std::vector<char> stored;         // per boundary: kept for the backward pass (or the loss)
    std::vector<char> absorbed;       // per boundary: only read by blocks that absorb a tiny input
    std::vector<int> top;             // per boundary: its top-level index, or -1
    std::vector<std::size_t> offset;  // per stored boundary: offset per example
    std::size_t stored_per_row = 0;
    int maxw = 0;
    std::size_t max_param = 0;  // largest parameter (entries)
    int last = 0;               // the output boundary
    bool any_params = false;
    bool drawn = false;             // some block draws its parameters for each pass
    std::vector<int> top_boundary;  // per top-level index: its boundary
  };
  const Plan& plan() const { return *plan_; }
  struct Workspace;

 private:
  void compile();

  std::vector<std::unique_ptr<Block<T>>> blocks_;
  std::vector<ParamRef<T>> params_;
  std::size_t n_trainable_ = 0;
  std::shared_ptr<const Plan> plan_;
  std::shared_ptr<const Plan> trace_plan_;  // the same steps, every boundary stored
  std::mutex run_mutex_;
  // Reused by passes up to a size (saves page faults); a concurrent pass gets its own.
  std::mutex ws_mutex_;
  std::shared_ptr<Workspace> ws_;
};

extern template class Chain<float>;
extern template class Chain<double>;

}  // namespace gradchain
