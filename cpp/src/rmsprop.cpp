// Placeholder until the optimizer is written: refuses to run.
#include <memory>
#include <stdexcept>

#include "gradchain/optimizer.hpp"

namespace gradchain {

template <class T>
std::unique_ptr<Optimizer<T>> make_rmsprop(const OptimizerSpec&) {
  throw std::invalid_argument("optimizer 'rmsprop' is not available yet");
}

template std::unique_ptr<Optimizer<float>> make_rmsprop<float>(const OptimizerSpec&);
template std::unique_ptr<Optimizer<double>> make_rmsprop<double>(const OptimizerSpec&);

}  // namespace gradchain
