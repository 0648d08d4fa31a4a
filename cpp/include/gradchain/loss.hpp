// Losses at the end of a chain and the gradient they send back.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace gradchain {

// probe: 0.5 * ||h_L||^2 summed over the batch; mse: mean over all elements, as
// torch.nn.functional.mse_loss; cross_entropy: softmax cross-entropy against integer
// labels, mean over the batch; grad_output: the caller gives dL/dh_L.
enum class LossKind { probe, mse, cross_entropy, grad_output };

LossKind parse_loss(const std::string& name);
const std::vector<std::string>& loss_names();

// The loss of the outputs h * 2^eh (rows x cols, row-major) and its gradient
// dL/dh = g * 2^gamma, written to g (rows x cols). target: T values (mse, grad_output) or
// int64 labels (cross_entropy). Returns log10 of the loss, exact in log space (NaN for
// grad_output).
template <class T>
double loss_and_grad(LossKind kind, const T* h, std::int64_t eh, std::size_t rows, std::size_t cols,
                     const void* target, T* g, std::int64_t& gamma);

}  // namespace gradchain
