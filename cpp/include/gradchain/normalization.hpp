// The arithmetic shared by the normalisation blocks (layer_norm.hpp, rms_norm.hpp,
// batch_norm.hpp): groups of values are centred (or not), divided by sqrt(var + eps) and
// mapped through a per-feature affine map. Values arrive as mantissas x~ times 2^e with any
// exponent e; normalisation is scale-invariant except for eps, so everything is computed
// on x~ with eps * 4^-e in its place (see inv_std), and the result is what a plain float
// computation at the true scale gives wherever that one stays in range.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace gradchain::norm {

// 1 / sqrt(v + eps * 4^-e) = m * 2^q. q = 0 wherever the sum is an ordinary double; then m
// is exactly 2^e / sqrt(v * 4^e + eps), the plain result at the true scale. Otherwise one
// term dwarfs the other and the sum is formed at a power-of-two scale.
struct InvStd {
  double m = 1.0;
  std::int64_t q = 0;
};
InvStd inv_std(double v, double eps, std::int64_t e);

// Which entries are normalised together: contiguous groups of `len` entries. LayerNorm and
// RMSNorm normalise each row of a rows x width array; BatchNorm normalises the columns,
// which it hands over transposed (one group per feature, with one weight per group).
struct Layout {
  std::size_t groups = 0, len = 0;
  bool affine_per_group = false;  // BatchNorm: one weight per group; LayerNorm: per entry

  static Layout rows(std::size_t rows, std::size_t width) { return {rows, width, false}; }
  static Layout features(std::size_t rows, std::size_t width) { return {width, rows, true}; }
};

// dst (cols x rows) = src (rows x cols) transposed.
template <class T>
void transpose(const T* src, std::size_t rows, std::size_t cols, T* dst);

// Per group: the mean and biased variance of x~, 1/sqrt(var + eps) as m * 2^q (relative to
// x~'s scale), and c = m * 2^(q - xexp), so that xhat = (x~ - mean) * c * 2^xexp with one
// exponent xexp for all groups (0 unless eps dominates so far that xhat leaves the band).
struct Stats {
  std::int64_t ex = 0;    // the input exponent they belong to
  std::int64_t xexp = 0;  // the exponent of xhat
  std::vector<double> mean, var, m, dmax, c;
  std::vector<std::int64_t> q;

  template <class T>
  void compute(const T* x, std::int64_t e, const Layout& L, bool center, double eps);
  // As a flat array (BatchNorm keeps its batch statistics between the passes this way).
  void save(std::vector<double>& out) const;
  // False when `in` does not hold statistics of `groups` groups taken at exponent e.
  bool load(const std::vector<double>* in, std::size_t groups, std::int64_t e);
};

// The affine map after the normalisation, as the kernels use it. A weight whose largest
// entry leaves the band is used as a power-of-two scaled copy w * 2^-wexp.
template <class T>
struct Affine {
  const T* w = nullptr;  // nullptr: no weight
  int wexp = 0;
  const T* b = nullptr;       // nullptr: no bias or an all-zero one
  const T* w_true = nullptr;  // the weight itself (Jacobians)
};

// A normalisation block's weight (init 1) and bias (init 0), and what is derived from them.
template <class T>
class AffineParams {
 public:
  AffineParams(std::size_t n, bool weight, bool bias);
  bool has_weight() const { return has_w_; }
  bool has_bias() const { return has_b_; }
  std::vector<T>& weight() { return w_; }
  std::vector<T>& bias() { return b_; }
  const std::vector<T>& weight() const { return w_; }
  const std::vector<T>& bias() const { return b_; }
  // After the values changed: checks they are finite (naming `block`), rescales.
  void refresh(const std::string& block);
  Affine<T> view() const;

 private:
  bool has_w_, has_b_;
  std::vector<T> w_, b_, wscaled_;
  int wexp_ = 0;
  bool zero_bias_ = true;
};

// y = xhat * w + b for every entry; returns y's exponent (0 with a nonzero bias, which is
// added at the true scale).
template <class T>
std::int64_t forward(const T* x, const Layout& L, const Stats& s, const Affine<T>& a, T* y);

// dx from dy * 2^gy: per group dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w
// (no mean(g) term without centring); returns dx's exponent.
template <class T>
std::int64_t backward_input(const T* x, const T* dy, std::int64_t gy, const Layout& L,
                            const Stats& s, bool center, const Affine<T>& a, T* dx);

// dw = sum dy * xhat and db = sum dy over the entries each parameter multiplies; either
// pointer may be null. Their exponents go to ew and eb.
template <class T>
void backward_params(const T* x, const T* dy, std::int64_t gy, const Layout& L, const Stats& s,
                     std::size_t nparams, T* dw, std::int64_t& ew, T* db, std::int64_t& eb);

// Sums accumulated in double as T mantissas: out = acc * 2^-k; returns k (0 when the largest
// sum lies in the band).
template <class T>
std::int64_t store_scaled(const std::vector<double>& acc, T* out);

// Jacobian products at the point for k vectors (each a rows x width array of true values):
// out = J v, or out = J^T v when transpose.
template <class T>
void jacobian_product(const T* x, const Layout& L, const Stats& s, bool center, const Affine<T>& a,
                      const T* v, int k, bool transpose, T* out);

}  // namespace gradchain::norm
