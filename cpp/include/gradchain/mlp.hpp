// A deep fully connected chain h_l = phi(h_{l-1} W_l^T + b_l), l = 1..L, with an exact
// backward pass whose per-layer gradient norms are carried in log space.
#pragma once

#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "gradchain/activation.hpp"
#include "gradchain/common.hpp"
#include "gradchain/init.hpp"
#include "gradchain/loss.hpp"

namespace gradchain {

struct BackwardRequest {
  LossKind loss = LossKind::probe;
  const void* target = nullptr;  // T[B*n_L] (mse, grad_output) or int64[B] (cross_entropy)
  bool keep_weight_grads = false;
  bool keep_bias_grads = false;
  bool keep_activation_grads = false;
  double max_norm = -1.0;     // < 0: no clipping
  double norm_type = 2.0;     // for the total norm and clipping; inf allowed
  bool forward_only = false;  // stop after the output (no loss, no gradients)
};

template <class T>
struct BackwardResult {
  // log10 of Frobenius / Euclidean norms; -inf where a gradient is exactly zero.
  std::vector<double> log10_weight_grad_norms;      // L
  std::vector<double> log10_bias_grad_norms;        // L
  std::vector<double> log10_activation_grad_norms;  // L + 1, h_0 = input
  double loss = 0.0;
  double log10_loss = 0.0;
  double norm_type = 2.0;
  double log10_total_norm = 0.0;  // over all weight and bias gradients, in norm_type
  bool clipped = false;
  double max_norm = 0.0;
  double log10_clip_coef = 0.0;  // min(0, log10(max_norm / (total + 1e-6)))
  // Output h_L as floats, and the binary exponent the forward pass carried in log space
  // (0 unless the chain is positively homogeneous and rescaled).
  std::vector<T> output;
  std::int64_t output_log2_scale = 0;
  // Full gradients on request (after clipping, when clipping was asked for).
  std::vector<std::vector<T>> weight_grads, bias_grads, activation_grads;
};

// An allocator that leaves new elements uninitialised: a deep chain's weights are written
// once by the initializer, and zero-filling gigabytes first would double the cost.
template <class T>
struct UninitAllocator : std::allocator<T> {
  template <class U>
  struct rebind {
    using other = UninitAllocator<U>;
  };
  UninitAllocator() = default;
  template <class U>
  UninitAllocator(const UninitAllocator<U>&) noexcept {}
  template <class U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};

template <class T>
using ParamVector = std::vector<T, UninitAllocator<T>>;

// Scratch memory that a chain keeps between backward passes (uninitialised on growth).
template <class T>
class Buffer {
 public:
  T* get(std::size_t n) {
    if (n > cap_) {
      p_.reset();
      p_.reset(new T[n]);
      cap_ = n;
    }
    return p_.get();
  }
  void release() {
    p_.reset();
    cap_ = 0;
  }
  std::size_t capacity() const { return cap_; }

 private:
  std::unique_ptr<T[]> p_;
  std::size_t cap_ = 0;
};

template <class T>
struct Workspace {
  Buffer<T> h, z, g, g2, dz, dw, db, dzall, hs, tz, th;
  void release() {
    for (Buffer<T>* b : {&h, &z, &g, &g2, &dz, &dw, &db, &dzall, &hs, &tz, &th}) b->release();
  }
  double bytes() const {
    double n = 0;
    for (const Buffer<T>* b : {&h, &z, &g, &g2, &dz, &dw, &db, &dzall}) n += double(b->capacity());
    return n * sizeof(T);
  }
};

template <class T>
class MLPChain {
 public:
  // Draws weights and biases from `seed`. widths = (in, hidden..., out), size depth + 1.
  // `cancel`, if given, is polled between layers (drawing a deep chain takes seconds).
  MLPChain(std::vector<int> widths, Activation act, const InitSpec& init, std::uint64_t seed,
           Canceller* cancel = nullptr);
  // Copies weights (row-major out x in per layer, concatenated) and biases as given.
  MLPChain(std::vector<int> widths, Activation act, const T* weights, std::size_t n_weights,
           const T* biases, std::size_t n_biases);

  int depth() const { return static_cast<int>(widths_.size()) - 1; }
  const std::vector<int>& widths() const { return widths_; }
  const Activation& activation() const { return act_; }
  T* weight(int l) { return weights_.data() + woff_[static_cast<std::size_t>(l)]; }
  T* bias(int l) { return biases_.data() + boff_[static_cast<std::size_t>(l)]; }
  const T* weight(int l) const { return weights_.data() + woff_[static_cast<std::size_t>(l)]; }
  const T* bias(int l) const { return biases_.data() + boff_[static_cast<std::size_t>(l)]; }
  // True when phi is positively homogeneous and every bias is zero: the forward pass
  // then rescales by powers of two and never overflows.
  bool log_scale_forward() const;
  // True when phi is linear near 0 (tanh, gelu, silu, elu) and every bias is zero: a
  // signal that decays below the float range is then carried in log space.
  bool carries_small_scale() const;

  // Bytes a chain with these widths holds, plus what drawing its weights takes on every
  // thread (init: nullptr when the weights are copied in).
  static double chain_bytes(const std::vector<int>& widths, const InitSpec* init);
  // Bytes a backward pass with this batch would allocate at most: everything it keeps
  // (per-layer bookkeeping and the result included), on every thread.
  double backward_bytes(int batch, const BackwardRequest& req) const;

  BackwardResult<T> backward(const T* x, int batch, const BackwardRequest& req,
                             Canceller& cancel) const;

 private:
  void layout();
  void scale_weights();
  // W_l = W~_l * 2^wexp_[l], W~_l in the safe band: the weight the GEMMs use.
  const T* gemm_weight(int l) const {
    const auto& c = wscaled_[static_cast<std::size_t>(l)];
    return c.empty() ? weight(l) : c.data();
  }
  bool two_threads(int batch) const;
  // Of backward_bytes: what the pass cannot do without, and the dL/dz store that lets two
  // threads pipeline the backward pass (used when memory allows).
  struct PassBytes {
    double needed = 0.0, pipeline = 0.0;
  };
  PassBytes pass_bytes(int batch, const BackwardRequest& req) const;

  std::vector<int> widths_;
  Activation act_;
  ParamVector<T> weights_, biases_;
  std::vector<std::size_t> woff_, boff_;
  // Layers whose largest weight lies outside the safe band keep a power-of-two scaled copy
  // (rare: weights near 1e300 or 1e-300), so that no product overflows or underflows
  // before its scale is applied.
  std::vector<int> wexp_;
  std::vector<std::vector<T>> wscaled_;
  bool zero_biases_ = false;
  // Reused by backward passes up to kKeptWorkspaceBytes; a concurrent pass on the same
  // chain gets its own.
  mutable std::mutex ws_mutex_;
  mutable Workspace<T> ws_;
};

extern template class MLPChain<float>;
extern template class MLPChain<double>;

}  // namespace gradchain
