// Jacobians of a recurrent chain's steps, J_t = ds_t / ds_{t-1}, for the per-step norms and
// the QR spectrum of dh_t / dh_0 (jacobian.hpp).
#pragma once

#include <cstddef>
#include <vector>

#include "gradchain/jacobian.hpp"
#include "gradchain/rnn.hpp"

namespace gradchain {

// A RecurrentChain's cell parameters in double (the read-out plays no part), shared by every
// sequence's Jacobians.
class RecurrentLayers {
 public:
  template <class T>
  explicit RecurrentLayers(const RecurrentChain<T>& chain);

  CellKind cell() const { return cell_; }
  int layers() const { return layers_; }
  int hidden() const { return hidden_; }
  int gates() const { return gates_; }
  int input_size() const { return input_; }
  int in_dim(int l) const { return l == 0 ? input_ : hidden_; }
  // Entries of one layer's state: h, and for the LSTM c after it.
  int layer_state() const { return cell_ == CellKind::lstm ? 2 * hidden_ : hidden_; }
  int state_dim() const { return layers_ * layer_state(); }
  const double* w_ih(int l) const { return w_ih_[static_cast<std::size_t>(l)].data(); }
  const double* w_hh(int l) const { return w_hh_[static_cast<std::size_t>(l)].data(); }
  const double* b_ih(int l) const { return b_ih_[static_cast<std::size_t>(l)].data(); }
  const double* b_hh(int l) const { return b_hh_[static_cast<std::size_t>(l)].data(); }

 private:
  CellKind cell_;
  int layers_, hidden_, gates_, input_;
  std::vector<std::vector<double>> w_ih_, w_hh_, b_ih_, b_hh_;  // zero biases when bias-free
};

// The state s_t stacks every layer's h_t, each followed by the LSTM's c_t:
// [h^0_t, (c^0_t,) h^1_t, (c^1_t,) ...], so J_t is square, state_dim() wide. Layer l > 0 reads
// h^{l-1}_t of the same step, so its rows of J_t include the chain rule through the layers
// below. One sequence: x_t (t = 1..steps) are input_size() doubles, x_stride apart; s0 is
// the initial state (nullptr: zeros). The forward pass runs in double in the constructor and
// keeps every s_t (a NaN or inf throws NonFiniteError with the step); dense(t) recomputes
// step t's gates from s_{t-1}, by the same code. Const methods are thread-safe.
class RecurrentJacobians final : public JacobianChain {
 public:
  RecurrentJacobians(const RecurrentLayers& layers, const double* x, int steps,
                     std::size_t x_stride, const double* s0);

  int length() const override { return steps_; }
  int dim(int) const override { return n_; }
  void apply(int t, const double* v, int k, double* out) const override;
  void apply_transpose(int t, const double* u, int k, double* out) const override;
  int dense(int t, double* J) const override;
  bool dense_native() const override { return true; }

  // s_t, t = 0..steps.
  const double* state(int t) const {
    return s_.data() + static_cast<std::size_t>(t) * static_cast<std::size_t>(n_);
  }

 private:
  const double* input(int t) const { return x_ + static_cast<std::size_t>(t - 1) * stride_; }

  const RecurrentLayers& layers_;
  const double* x_;
  int steps_, n_;
  std::size_t stride_;
  std::vector<double> s_;
};

// Per-step norms and QR spectra for a batch of sequences: x is steps x batch x input_size
// (float64, as RecurrentChain::run takes it); h0, c0 are layers x batch x hidden (nullptr:
// zeros; c0 for the LSTM).
template <class T>
BatchNorms recurrent_jacobian_norms(const RecurrentChain<T>& chain, const double* x, int steps,
                                    int batch, const double* h0, const double* c0,
                                    const NormsOptions& opt, Canceller& cancel);

template <class T>
std::vector<double> recurrent_qr_spectrum(const RecurrentChain<T>& chain, const double* x,
                                          int steps, int batch, const double* h0, const double* c0,
                                          const SpectrumOptions& opt, Canceller& cancel);

}  // namespace gradchain
