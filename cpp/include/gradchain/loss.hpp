// Losses at the end of a chain and the gradient they send back.
#pragma once

#include <string>
#include <vector>

namespace gradchain {

// probe: 0.5 * ||h_L||^2 summed over the batch; mse: mean over all elements, as
// torch.nn.functional.mse_loss; cross_entropy: softmax cross-entropy against integer
// labels, mean over the batch; grad_output: the caller gives dL/dh_L.
enum class LossKind { probe, mse, cross_entropy, grad_output };

LossKind parse_loss(const std::string& name);
const std::vector<std::string>& loss_names();

}  // namespace gradchain
