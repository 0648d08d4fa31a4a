// Jacobians of a chain's steps, J_l = dh_l / dh_{l-1}, and their products: per-layer
// Frobenius and spectral norms, and the QR spectrum of J_l ... J_1 (Benettin et al. 1980).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "gradchain/activation.hpp"
#include "gradchain/common.hpp"

namespace gradchain {

template <class T>
class Chain;
template <class T>
struct ChainResult;
template <class T>
class Block;

// The Jacobians of a chain of length() steps for one input. Blocks of k vectors are stored
// one vector after another (k x dim row-major): the layout in which the Householder kernels
// and the scaling by phi' run along contiguous memory.
class JacobianChain {
 public:
  virtual ~JacobianChain() = default;
  virtual int length() const = 0;
  // dim(0) is the input size, dim(l) the output size of step l (l = 1..length()).
  virtual int dim(int l) const = 0;
  // out = J_l v for k vectors: v is k x dim(l-1), out is k x dim(l).
  virtual void apply(int l, const double* v, int k, double* out) const = 0;
  // out = J_l^T u for k vectors: u is k x dim(l), out is k x dim(l-1).
  virtual void apply_transpose(int l, const double* u, int k, double* out) const = 0;
  // J_l = J * 2^e, J dim(l) x dim(l-1) row-major; returns e. Default: J_l applied to the
  // identity, e = 0.
  virtual int dense(int l, double* J) const;
  // log10 ||J_l||_F (-inf when J_l = 0). Default: from dense().
  virtual double log10_frobenius(int l) const;
  // J_l = diag(d) B with B dim(l) x dim(l-1) row-major: returns B and sets d (nullptr for
  // d = 1). The QR spectrum applies its reflectors to B's rows, so that the orthonormal
  // frame is never formed. Default: B = dense(l) in `storage`, d = nullptr.
  virtual const double* row_form(int l, const double** d, std::vector<double>& storage) const;
  // True when apply() and log10_frobenius() form dense(l) on every call: jacobian_norms()
  // then forms it once per step and works on that.
  virtual bool dense_native() const { return false; }
  // True when apply() at step l would round its products below the normal range, where
  // dense(l) keeps their bits: jacobian_norms() then works on dense(l).
  virtual bool dense_needed(int) const { return false; }
};

// A [Linear, Activation] chain's weights in double (a copy for float chains), and what every
// example's Jacobians share: the Euclidean norm of every row of every W_l (with row_norms; they are
// what log10_frobenius() needs).
class MLPLayers {
 public:
  // From a chain of blocks of the shape [Linear, Activation] * depth, one activation
  // throughout (every layer of gc.MLP); std::invalid_argument otherwise.
  template <class T>
  MLPLayers(const Chain<T>& chain, bool row_norms);

  int depth() const { return static_cast<int>(widths_.size()) - 1; }
  const std::vector<int>& widths() const { return widths_; }
  const Activation& activation() const { return act_; }
  bool log_scale_forward() const { return homog_; }
  const double* weight(int l) const { return w_[static_cast<std::size_t>(l)]; }
  const double* bias(int l) const { return b_[static_cast<std::size_t>(l)]; }
  // The row norms of W_l times 2^-weight_exponent(l), so that rows of weights below the
  // normal range keep their bits.
  const double* row_norms(int l) const {
    return rownorm_.data() + roff_[static_cast<std::size_t>(l)];
  }
  // ilogb of the largest |entry| of W_l (0 for a zero W_l).
  int weight_exponent(int l) const { return wexp_[static_cast<std::size_t>(l)]; }

 private:
  std::vector<int> widths_;
  Activation act_;
  bool homog_ = false;
  template <class T>
  void take(const std::vector<const T*>& w, const std::vector<const T*>& b, bool row_norms);
  std::vector<double> own_w_, own_b_;
  std::vector<const double*> w_, b_;
  std::vector<double> rownorm_;
  std::vector<std::size_t> roff_;
  std::vector<int> wexp_;
};

// J_l = diag(phi'(z_l)) W_l for one example. The forward pass runs in double and keeps only
// phi'(z_l). With a positively homogeneous activation and zero biases h_l is renormalised
// by a power of two every layer (phi' depends on the sign of z only), so that pass never
// overflows; otherwise a NaN or inf in z_l or h_l throws NonFiniteError.
// Eager: the whole pass runs in the constructor, and const methods are safe to call from
// several threads. Lazy: layers are computed when first asked for, in order, right before
// their weights are used again (a chain larger than the caches is read from memory once);
// then only one thread may call in at a time.
class MLPJacobians final : public JacobianChain {
 public:
  MLPJacobians(const MLPLayers& layers, const double* x, bool lazy = false);

  int length() const override { return layers_.depth(); }
  int dim(int l) const override { return layers_.widths()[static_cast<std::size_t>(l)]; }
  void apply(int l, const double* v, int k, double* out) const override;
  void apply_transpose(int l, const double* u, int k, double* out) const override;
  int dense(int l, double* J) const override;
  bool dense_needed(int l) const override;
  double log10_frobenius(int l) const override;
  const double* row_form(int l, const double** d, std::vector<double>& storage) const override;

  // phi'(z_l), dim(l) entries.
  const double* derivative(int l) const {
    if (l > done_) forward_to(l);
    return d_.data() + off_[static_cast<std::size_t>(l)];
  }

 private:
  void forward_to(int l) const;

  const MLPLayers& layers_;
  mutable std::vector<double> d_, h_, z_, hn_;
  std::vector<std::size_t> off_;
  mutable int done_ = 0;  // layers whose phi' is in d_
};

// The Jacobians J_l = dh_l / dh_{l-1} of the top-level blocks of a chain at one point: one
// example (rows = 1), or the whole batch (rows = batch) when a train-mode BatchNorm couples
// the examples; the state of boundary l is then rows x width, flattened. A residual
// block's Jacobian is I (or its shortcut's) + scale * the product of its body's. The
// forward pass runs in the constructor, in double, with the chain's log-space
// bookkeeping; const methods are safe to call from several threads.
class BlockJacobians final : public JacobianChain {
 public:
  BlockJacobians(const Chain<double>& chain, const double* x, std::size_t rows, bool train);
  ~BlockJacobians() override;

  int length() const override;
  int dim(int l) const override;
  void apply(int l, const double* v, int k, double* out) const override;
  void apply_transpose(int l, const double* u, int k, double* out) const override;

 private:
  void jvp(const Block<double>& b, const double* v, int k, double* out) const;
  void vjp(const Block<double>& b, const double* u, int k, double* out) const;
  int step_of(const Block<double>& b) const;

  const Chain<double>& chain_;
  std::size_t rows_;
  bool train_;
  std::unique_ptr<ChainResult<double>> trace_;
  std::vector<std::pair<const Block<double>*, int>> steps_;  // sorted by block address
};

// ---- per-layer norms ------------------------------------------------------------------

struct NormsOptions {
  bool spectral = true;
  double tol = 1e-10;       // power iteration: stop when the estimate moves less than this
  int max_iter = 1000;      // power iteration: at most this many products with J^T J
  int exact_max_dim = 256;  // exact SVD when max(dim(l-1), dim(l)) <= this
  void validate() const;
};

struct LayerNorms {
  double log10_frobenius = 0.0;
  double log10_spectral = 0.0;  // NaN when not asked for
  int iterations = 0;           // power iterations (0: exact SVD)
  bool converged = true;
};

// Norms of every J_l, l = 1..length(); out has length() entries. With threads > 1 the
// layers are shared out (the chain's const methods must then be thread-safe).
void jacobian_norms(const JacobianChain& chain, const NormsOptions& opt, LayerNorms* out,
                    Canceller* cancel = nullptr, int threads = 1);

// ---- QR spectrum of the cumulative product ---------------------------------------------

enum class SpectrumStart { identity, random };

struct SpectrumOptions {
  int k = 0;         // directions, 1 <= k <= min_l dim(l)
  int interval = 1;  // re-orthonormalise every `interval` steps (and at the last)
  SpectrumStart start = SpectrumStart::identity;
  std::uint64_t seed = 0;  // for start = random
  void validate(const std::vector<int>& dims) const;
  static SpectrumStart parse_start(const std::string& name);
};

// The steps after which a QR factorisation happens: interval, 2 interval, ... and length.
std::vector<int> spectrum_depths(int length, int interval);

// For every depth l in spectrum_depths(), S[i] = log|R_ii|, i < k, of the thin QR
// factorisation M_l Q_0 = Q R of the product M_l = J_l ... J_1 applied to the start frame
// Q_0 (the first k columns of the identity, or a seeded random orthonormal frame), computed
// as sums of log|R_ii| of one Householder QR per re-orthonormalisation, so no product is
// ever formed. Written to S (n_depths x k row-major); -inf where R_ii = 0, and for every
// i >= r from a layer on whose vectors have only r < k nonzero rows. With threads >= 2,
// interval 1 and layers of about 10^6 flops or more, two threads share every layer (the
// chain's row_form() is then called from one thread at a time, in order of l).
void qr_spectrum(const JacobianChain& chain, const SpectrumOptions& opt, double* S,
                 Canceller* cancel = nullptr, int threads = 1);

// ---- batches ---------------------------------------------------------------------------

struct BatchNorms {
  // batch x depth, row-major.
  std::vector<double> log10_frobenius, log10_spectral;
  std::vector<std::int32_t> iterations;
  std::vector<std::uint8_t> converged;
};

// One example's Jacobians (lazy: as MLPJacobians' lazy mode, for the QR spectrum, which
// asks for the steps in order from one thread at a time).
using JacobianFactory = std::function<std::unique_ptr<JacobianChain>(int example, bool lazy)>;

// jacobian_norms() for every example of a batch of chains with `length` steps each;
// examples are shared out over the core's threads, with one BLAS thread each.
BatchNorms batch_jacobian_norms(int batch, int length, const JacobianFactory& make,
                                const NormsOptions& opt, Canceller& cancel);

// qr_spectrum() for every example; dims are the chains' dim(0..length). Returns
// batch x n_depths x k, row-major.
std::vector<double> batch_qr_spectrum(int batch, const std::vector<int>& dims,
                                      const JacobianFactory& make, const SpectrumOptions& opt,
                                      Canceller& cancel);

// Bytes batch_jacobian_norms() and batch_qr_spectrum() take for chains whose steps have
// these dims: the result, and for every example in work at once its JacobianChain
// (example_bytes) and its threads' buffers. `dense`: the chain forms dense J_l for its norms
// and products (dense_native(), and row_form() into storage).
double batch_norms_bytes(int batch, const std::vector<int>& dims, const NormsOptions& opt,
                         double example_bytes, bool dense);
double batch_spectrum_bytes(int batch, const std::vector<int>& dims, const SpectrumOptions& opt,
                            double example_bytes, bool dense);

// Through a chain of blocks (x: batch x in_width, float64). Per top-level block; with
// `layers`, per layer of a chain shaped [Linear, Activation] * depth (J = diag(phi') W).
// When a train-mode BatchNorm couples the batch, the result has one "example": the whole
// batch (state size batch x width).
template <class T>
BatchNorms chain_jacobian_norms(const Chain<T>& chain, const double* x, int batch, bool train,
                                bool layers, const NormsOptions& opt, Canceller& cancel);
template <class T>
std::vector<double> chain_qr_spectrum(const Chain<T>& chain, const double* x, int batch, bool train,
                                      bool layers, const SpectrumOptions& opt, Canceller& cancel);
// The state dimensions dim(0..length) the functions above use.
template <class T>
std::vector<int> chain_jacobian_dims(const Chain<T>& chain, int batch, bool train, bool layers);

}  // namespace gradchain
