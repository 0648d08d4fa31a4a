// A block is one layer of a chain: one mathematical map with its forward pass, its
// backward pass and its Jacobian. Values cross block boundaries as row-major
// (rows x width) mantissa arrays times a power of two 2^e (see scaled.hpp); the driver
// (chain.hpp) keeps every boundary in the safe band, so a block must accept any input
// exponent and say what exponent its output has.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace gradchain {

enum class BlockKind { linear, activation, layer_norm, rms_norm, batch_norm, residual, scale };

// A parameter or buffer of a block, in torch's named_parameters() / state_dict() order.
struct ParamInfo {
  std::string name;  // relative to the block: "weight", "bias", "running_mean", ...
  std::vector<std::int64_t> shape;
  bool buffer = false;  // state_dict() only: BatchNorm's running statistics
};

// The forward pass of one block over `rows` examples (a part of the batch, or all of it).
template <class T>
struct ForwardArgs {
  std::size_t rows = 0;
  const T* x = nullptr;  // rows x in_width, value x * 2^ex
  std::int64_t ex = 0;
  T* y = nullptr;        // rows x out_width; may alias x for an in_place() block
  T* scratch = nullptr;  // rows x max(in, out) the block may use
  bool train = true;
  // Per-pass data a block keeps besides its boundaries (BatchNorm's batch statistics).
  std::vector<double>* local = nullptr;
  // The block's parameters as draw() wrote them, for a block that keeps none.
  const T* drawn = nullptr;
};

// The backward pass of one block: dx from dy; x and y are the stored boundaries (nullptr
// where the block does not save them).
template <class T>
struct BackwardArgs {
  std::size_t rows = 0;
  const T* x = nullptr;
  std::int64_t ex = 0;
  const T* y = nullptr;
  std::int64_t ey = 0;
  const T* dy = nullptr;  // rows x out_width, dL/dy = dy * 2^gy, in the band
  std::int64_t gy = 0;
  T* dx = nullptr;  // rows x in_width; may alias dy for an in_place() block
  T* scratch = nullptr;
  bool train = true;
  const std::vector<double>* local = nullptr;
  const T* drawn = nullptr;  // as in ForwardArgs
};

// A parameter's gradient as a block hands it to the driver: a mantissa array (grads[i],
// the parameter's size) times 2^exp. A block that can give the norms without writing the
// gradient (the batch-1 outer product of Linear), or that has scanned what it wrote, sets
// has_norms.
struct ParamGrad {
  std::int64_t exp = 0;
  bool has_norms = false;
  double log10_norm = 0.0;   // 2-norm, when has_norms
  double log10_pnorm = 0.0;  // norm_type-norm, when has_norms
};

struct ParamGradArgs {
  double norm_type = 2.0;
  bool need_values = true;  // false: norms suffice (has_norms may be used)
};

// The point at which a block's Jacobian is taken: its input and output boundaries of one
// forward pass (one example, or the whole batch for a block that couples it), as in
// BackwardArgs.
template <class T>
using JacobianArgs = BackwardArgs<T>;

template <class T>
class Block {
 public:
  Block(int in_width, int out_width) : in_(in_width), out_(out_width) {}
  virtual ~Block() = default;
  virtual std::unique_ptr<Block<T>> clone() const = 0;
  // The same block in double precision (the Jacobian tools work in double).
  virtual std::unique_ptr<Block<double>> to_double() const = 0;
  virtual BlockKind kind() const = 0;
  // For messages and reprs: "Linear(64, 256)".
  virtual std::string describe() const = 0;

  int in_width() const { return in_; }
  int out_width() const { return out_; }
  // torch-style prefix of this block's parameters ("3.block.1"); set by the chain.
  const std::string& name() const { return name_; }
  void set_name(std::string n) { name_ = std::move(n); }

  // What the backward pass reads besides dy.
  virtual bool saves_input() const = 0;
  virtual bool saves_output() const = 0;
  // y may be written over x (when the driver does not keep x).
  virtual bool in_place() const { return false; }
  // The forward pass mixes the examples of a batch (train-mode BatchNorm).
  virtual bool couples_batch(bool /*train*/) const { return false; }
  // Output values can be exactly zero for a nonzero input (relu's dead units, a zero
  // weight row); otherwise an all-zero output from a nonzero input means underflow.
  virtual bool can_zero() const { return true; }
  // The output does not depend on the precision of an input below the normal floats
  // (phi(0) != 0 for a smooth phi: sigmoid, softplus), so such an input is no underflow.
  virtual bool absorbs_tiny_input() const { return false; }

  // Parameters and buffers, their storage (contiguous, row-major) and sizes.
  virtual std::vector<ParamInfo> params() const { return {}; }
  virtual T* param_data(std::size_t /*i*/) { return nullptr; }
  const T* param_data(std::size_t i) const { return const_cast<Block*>(this)->param_data(i); }
  // Called after parameters changed (initialisation, load, training): refreshes what the
  // block derives from them.
  virtual void params_changed() {}
  // A block that keeps no parameters draws them for each pass that needs them: draw_size()
  // entries written by draw(), which forward and backward then read from their args'
  // `drawn`. 0: the block keeps its parameters.
  virtual std::size_t draw_size() const { return 0; }
  virtual void draw(T* /*out*/) const {}

  // Asks for what the block's products will read (its parameters, or the drawn ones at
  // `drawn`) to be loaded into cache during the next product on this thread: the driver
  // calls it for the layer after the one at hand.
  virtual void prefetch(const T* /*drawn*/) const {}

  // y = f(x) for a.rows examples; returns y's exponent.
  virtual std::int64_t forward(const ForwardArgs<T>& a) const = 0;
  // After a forward pass in train mode over the whole batch (BatchNorm's running stats).
  virtual void after_forward(const std::vector<double>& /*local*/, std::size_t /*batch*/) {}
  // dx = dL/dx from dy; returns dx's exponent.
  virtual std::int64_t backward_input(const BackwardArgs<T>& a) const = 0;
  // Gradients of the parameters (not the buffers) from the same arguments: grads[i] holds
  // params()[i]'s size entries; out[i] receives its exponent (or its norms).
  virtual void backward_params(const BackwardArgs<T>& /*a*/, const ParamGradArgs& /*opt*/,
                               T* const* /*grads*/, ParamGrad* /*out*/) const {}

  // Jacobian products at the point a (a.rows rows; dy, dx, gy unused), for k vectors
  // stored one after another: out = J v with v k x (rows * in_width) and out
  // k x (rows * out_width); out = J^T u with u k x (rows * out_width) and out
  // k x (rows * in_width). J is the derivative of the true values, whatever the
  // exponents the point is carried at. scratch holds k x rows x max(in, out) x 2.
  virtual void jvp(const JacobianArgs<T>& a, const T* v, int k, T* out) const = 0;
  virtual void vjp(const JacobianArgs<T>& a, const T* u, int k, T* out) const = 0;

 protected:
  int in_, out_;
  std::string name_;
};

}  // namespace gradchain
