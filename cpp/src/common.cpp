#include "gradchain/common.hpp"

#include <algorithm>
#include <stdexcept>

namespace gradchain {

std::size_t parse_name(const char* what, const std::string& name,
                       const std::vector<std::string>& names) {
  const auto it = std::find(names.begin(), names.end(), name);
  if (it != names.end()) return static_cast<std::size_t>(it - names.begin());
  std::string all;
  for (const auto& s : names) all += (all.empty() ? "'" : ", '") + s + "'";
  throw std::invalid_argument(std::string(what) + " must be one of " + all + "; got '" + name +
                              "'");
}

}  // namespace gradchain
