#include "gradchain/system.hpp"

#include <unistd.h>

#include <chrono>
#include <cstdio>

#include "gradchain/blas.hpp"
#include "gradchain/common.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace gradchain {

void Canceller::poll() {
  if (!hook_) return;
  // Reading the clock is cheap next to a layer, but a hook that takes the GIL is not.
  if ((++counter_ & 7u) != 0) return;
  const std::int64_t now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                               std::chrono::steady_clock::now().time_since_epoch())
                               .count();
  if (now - last_ns_ < 20'000'000) return;
  last_ns_ = now;
  if (hook_()) throw Interrupted();
}

std::uint64_t physical_memory_bytes() {
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page = sysconf(_SC_PAGE_SIZE);
  if (pages <= 0 || page <= 0) return 0;
  return static_cast<std::uint64_t>(pages) * static_cast<std::uint64_t>(page);
}

void check_memory(double bytes, const std::string& what) {
  const double avail = static_cast<double>(physical_memory_bytes());
  if (avail > 0 && bytes > avail) {
    char buf[512];
    std::snprintf(buf, sizeof buf,
                  "%s needs %.0f bytes (%.3g GiB), more than the %.3g GiB of memory this "
                  "machine has",
                  what.c_str(), bytes, bytes / 1073741824.0, avail / 1073741824.0);
    throw MemoryRequestError(buf);
  }
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

int set_blas_threads(int n) {
  const int old = blas::get_num_threads();
  if (n != old) blas::set_num_threads(n);
  return old;
}

int blas_threads() {
  return blas::get_num_threads();
}

}  // namespace gradchain
