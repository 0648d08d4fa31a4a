// Recurrent chains: vanilla RNN (tanh, relu), LSTM and GRU cells with PyTorch's parameter
// layout, stacked in layers and unrolled over time, with an exact backward pass through
// time whose per-timestep state-gradient norms are carried in log space.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "gradchain/buffer.hpp"
#include "gradchain/common.hpp"
#include "gradchain/init.hpp"
#include "gradchain/loss.hpp"

namespace gradchain {

// tanh/relu: h' = phi(W_ih x + b_ih + W_hh h + b_hh). lstm: gates i, f, g, o.
// gru: gates r, z, n with n = tanh(W_in x + b_in + r * (W_hn h + b_hn)).
enum class CellKind { tanh, relu, lstm, gru };

CellKind parse_cell(const std::string& name);
const std::vector<std::string>& cell_names();
int gate_count(CellKind cell);  // 1, 1, 4, 3

enum class RecurrentInitKind { uniform, xavier_uniform, xavier_normal, orthogonal, normal };

struct RecurrentInit {
  RecurrentInitKind kind = RecurrentInitKind::uniform;
  double gain = 1.0;             // multiplies weight_ih
  double recurrent_gain = 1.0;   // multiplies weight_hh
  double spectral_radius = 0.0;  // > 0: each gate block of weight_hh is rescaled to it
  bool set_forget_bias = false;  // LSTM: forget block of bias_ih = forget_bias, of bias_hh = 0
  double forget_bias = 1.0;

  static RecurrentInitKind parse_kind(const std::string& name);
  static const std::vector<std::string>& names();
};

enum class Truncation { none, detach, window };

struct RecurrentRequest {
  LossKind loss = LossKind::probe;
  // T[B * n] (last step) or T[steps * B * n] (every step) for mse and grad_output;
  // int64[B] or int64[steps * B] for cross_entropy. n is output_size with a read-out.
  const void* target = nullptr;
  bool target_every_step = false;
  const void* h0 = nullptr;  // T[layers * B * hidden]; null for zeros
  const void* c0 = nullptr;  // LSTM
  Truncation truncation = Truncation::none;
  int window = 0;
  double max_norm = -1.0;  // < 0: no clipping
  double norm_type = 2.0;
  bool keep_grads = false;        // parameter gradients and every state gradient
  bool keep_param_grads = false;  // parameter gradients only
  bool state_norms = true;        // false: the state and cell gradient norms are left NaN
  bool forward_only = false;      // stop after the forward pass (output, h_n, c_n)
  bool loss_only = false;         // forward and loss, no backward (a validation pass)
};

template <class T>
struct RecurrentResult {
  double loss = 0.0, log10_loss = 0.0;
  std::vector<double> log10_state_grad_norms;  // layers x (steps + 1), t = 0..steps
  std::vector<double> log10_cell_grad_norms;   // LSTM only, same layout
  std::vector<double> log10_param_grad_norms;  // one per parameter, state_dict order
  double norm_type = 2.0;
  double log10_total_norm = 0.0;
  bool clipped = false;
  double max_norm = 0.0;
  double log10_clip_coef = 0.0;
  std::vector<T> output;    // forward_only: top layer's h_1..h_T, (steps, B, hidden)
  std::vector<T> h_n, c_n;  // (layers, B, hidden); c_n for LSTM
  std::vector<std::vector<T>> param_grads;  // keep_grads; after clipping
  std::vector<T> state_grads, cell_grads;   // keep_grads: (layers, steps + 1, B, hidden)
};

struct RecurrentShape {
  CellKind cell = CellKind::tanh;
  int input_size = 1;
  int hidden_size = 1;
  int num_layers = 1;
  int output_size = 0;  // > 0: a linear read-out y = h W^T + b on the top layer
  bool bias = true;

  // Positive sizes, and gates * hidden_size within BLAS's 32-bit sizes (so no product of
  // two sizes overflows 64 bits).
  void validate() const;
  // Parameter names and shapes in torch's state_dict order.
  std::vector<std::string> param_names() const;
  std::vector<std::vector<std::int64_t>> param_shapes() const;
  // Numbers in all parameters, and in the largest one.
  double param_count() const;
  double largest_param() const;
};

template <class T>
class RecurrentChain {
 public:
  // `cancel`, if given, is polled as the parameters are drawn (a wide chain takes seconds;
  // spectral_radius solves one eigenvalue problem per gate block, which is not interrupted).
  RecurrentChain(const RecurrentShape& shape, const RecurrentInit& init, std::uint64_t seed,
                 Canceller* cancel = nullptr);
  // Bytes a chain of this shape holds, plus what drawing its parameters takes (init: nullptr
  // when they are copied in).
  static double chain_bytes(const RecurrentShape& shape, const RecurrentInit* init);
  // Takes the parameters in state_dict order.
  RecurrentChain(const RecurrentShape& shape, std::vector<std::vector<T>> params);

  const RecurrentShape& shape() const { return shape_; }
  std::size_t param_count() const { return params_.size(); }
  T* param(std::size_t i) { return params_[i].data(); }
  const T* param(std::size_t i) const { return params_[i].data(); }
  std::size_t param_size(std::size_t i) const { return params_[i].size(); }

  // Bytes a run over `steps` timesteps with this batch would allocate at most: everything
  // it keeps (per-step bookkeeping and the result included), on every thread.
  double run_bytes(int steps, int batch, const RecurrentRequest& req) const;

  // x is (steps, batch, input_size), row-major.
  RecurrentResult<T> run(const T* x, int steps, int batch, const RecurrentRequest& req,
                         Canceller& cancel) const;

 private:
  void layout();

  RecurrentShape shape_;
  std::vector<std::vector<T>> params_;
  std::vector<T> zeros_;  // stands in for the biases of a bias-free chain
  // Per layer: indices of weight_ih, weight_hh, bias_ih, bias_hh in params_ (-1: none).
  std::vector<int> idx_;
  int readout_ = -1;  // index of readout.weight
  mutable std::mutex ws_mutex_;
  mutable Buffer<T> ws_;
};

extern template class RecurrentChain<float>;
extern template class RecurrentChain<double>;

}  // namespace gradchain
