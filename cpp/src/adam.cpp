// Placeholder until the optimizer is written: refuses to run.
#include <memory>
#include <stdexcept>

#include "gradchain/optimizer.hpp"

namespace gradchain {

template <class T>
std::unique_ptr<Optimizer<T>> make_adam(const OptimizerSpec&) {
  throw std::invalid_argument("optimizer 'adam' is not available yet");
}

template std::unique_ptr<Optimizer<float>> make_adam<float>(const OptimizerSpec&);
template std::unique_ptr<Optimizer<double>> make_adam<double>(const OptimizerSpec&);

}  // namespace gradchain
