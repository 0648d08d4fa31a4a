// Losses at the end of a chain and the gradient they send back: one implementation for
// chains of blocks and recurrent chains.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace gradchain {

struct ScaledSum;

// probe: 0.5 * ||h_L||^2 summed over the batch; mse: mean over all elements, as
// torch.nn.functional.mse_loss; cross_entropy: softmax cross-entropy against integer
// labels, mean over the batch; grad_output: the caller gives dL/dh_L.
enum class LossKind { probe, mse, cross_entropy, grad_output };

LossKind parse_loss(const std::string& name);
const std::vector<std::string>& loss_names();

// The loss terms of `rows` outputs y * 2^ey (rows x cols, row-major) are added to `sum`
// (probe: 0.5 * sum y^2; mse: sum (y - t)^2; cross_entropy: sum of -log softmax(y)_label;
// grad_output: nothing), and the gradient of scale * (their sum) is written to dy as
// dy * 2^gy, in the band. target: T values (rows x cols: mse's t, grad_output's dL/dy) or
// int64 labels (rows), already offset to these rows. Everything is exact in log space:
// outputs, targets and the loss at any magnitude, cross-entropy of a confident prediction
// (1 - p_label taken from the other classes), logits beyond the double range.
template <class T>
void loss_rows(LossKind kind, const T* y, std::int64_t ey, std::size_t rows, std::size_t cols,
               const void* target, double scale, T* dy, std::int64_t& gy, ScaledSum& sum);

}  // namespace gradchain
