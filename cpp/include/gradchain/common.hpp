// Shared vocabulary of the gradchain core: errors, cancellation, small helpers.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace gradchain {

// A value became NaN or +-inf inside a run. `where` names the place
// ("forward", "loss", ...) and `index` the first layer or timestep it showed up in.
class NonFiniteError : public std::runtime_error {
 public:
  NonFiniteError(const std::string& where, std::int64_t index, const std::string& what)
      : std::runtime_error(what), where_(where), index_(index) {}
  const std::string& where() const noexcept { return where_; }
  std::int64_t index() const noexcept { return index_; }

 private:
  std::string where_;
  std::int64_t index_;
};

// Thrown when the cancellation hook asks a long run to stop (Ctrl-C in Python).
class Interrupted : public std::runtime_error {
 public:
  Interrupted() : std::runtime_error("interrupted") {}
};

// Long loops call `poll()` once per unit of work, on every thread. The thread that created
// the Canceller consults the hook every 20 ms, the first time 20 ms after its creation (a
// hook that takes the GIL would otherwise wait for other Python threads in every short
// call); once it fires, poll() throws Interrupted on every thread.
class Canceller {
 public:
  Canceller() = default;
  // `hook` is consulted from the creating thread only: Python checks for signals on its
  // main thread alone, and other threads must not wait for the GIL.
  explicit Canceller(std::function<bool()> hook);
  Canceller(const Canceller&) = delete;
  Canceller& operator=(const Canceller&) = delete;
  void poll();
  bool stopped() const { return stopped_.load(std::memory_order_relaxed); }

 private:
  std::function<bool()> hook_;
  std::thread::id owner_;
  std::atomic<bool> stopped_{false};
  std::int64_t last_ns_ = 0;
};

// The index of `name` in `names`; otherwise std::invalid_argument "<what> must be one of
// 'a', 'b', ...; got 'x'".
std::size_t parse_name(const char* what, const std::string& name,
                       const std::vector<std::string>& names);

enum class DType { float32, float64 };

}  // namespace gradchain
