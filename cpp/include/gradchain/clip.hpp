// Gradient clipping with the semantics of torch.nn.utils.clip_grad_norm_,
// clip_grad_value_ and get_total_norm, over raw float32/float64 buffers.
//
// Where we differ from torch on purpose: norms are accumulated in double for float32
// data too, and computed with scaling, so a norm is inf only when the true norm
// exceeds the largest double (torch's plain sum of |x|^p overflows, e.g. two entries
// of 1e200 give inf). The inf-norm of an empty buffer is 0 (torch raises).
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "gradchain/common.hpp"

namespace gradchain::clip {

// torch's guard against dividing by a zero norm.
inline constexpr double kNormEps = 1e-6;

// Throws std::invalid_argument unless p > 0 (+inf allowed).
void check_norm_type(double p);

// Vector p-norm of x[0..n); p may be +inf (max |x|). NaN anywhere gives NaN,
// else any inf gives inf.
double array_norm(const float* x, std::size_t n, double p);
double array_norm(const double* x, std::size_t n, double p);

// The p-norm of the per-array norms: the norm of all arrays seen as one vector.
double combine_norms(const std::vector<double>& norms, double p);

// min(1, max_norm / (total + 1e-6)); NaN total gives NaN, inf total gives 0.
// Throws std::invalid_argument for max_norm < 0 or NaN, or total < 0.
double clip_coef(double total, double max_norm);

// x *= coef in x's own precision (coef is rounded to float first for float data).
void scale(float* x, std::size_t n, double coef);
void scale(double* x, std::size_t n, double coef);

// x = clamp(x, -v, v); NaN stays NaN. Throws std::invalid_argument for v < 0 or NaN.
void clamp(float* x, std::size_t n, double v);
void clamp(double* x, std::size_t n, double v);

// One contiguous gradient buffer.
struct Grad {
  DType dtype;
  void* data;
  std::size_t size;
};

// Total p-norm of all grads. With error_if_nonfinite, a NaN/inf total throws
// NonFiniteError("clip", -1, ...) with torch's wording. `cancel` is polled between blocks
// (a norm other than 2 or inf over gigabytes takes seconds).
double total_norm(const std::vector<Grad>& grads, double p, bool error_if_nonfinite,
                  Canceller* cancel = nullptr);

// total_norm, then scale every grad by clip_coef(total, max_norm); returns the total.
// Nothing is modified when it throws.
double clip_grad_norm(const std::vector<Grad>& grads, double max_norm, double p,
                      bool error_if_nonfinite, Canceller* cancel = nullptr);

void clip_grad_value(const std::vector<Grad>& grads, double clip_value);

// A double as Python's repr() writes it ("2.0", "inf", "1e-05"), for messages.
std::string format_double(double v);

}  // namespace gradchain::clip
