// Chunked parallel loops for elementwise work. Small arrays run inline: a parallel
// region costs more than the work below a few tens of thousands of elements.
#pragma once

#include <cstddef>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace gradchain {

inline constexpr std::size_t kParallelGrain = 32768;

// Threads the calling thread's elementwise loops may use. A run whose GEMMs are
// multi-threaded sets this to 1: OpenMP workers spinning between regions would take the
// cores from OpenBLAS's threads.
inline thread_local int elementwise_threads = 0;  // 0: as many as OpenMP offers

class ElementwiseThreads {
 public:
  explicit ElementwiseThreads(int n) : old_(elementwise_threads) { elementwise_threads = n; }
  ~ElementwiseThreads() { elementwise_threads = old_; }
  ElementwiseThreads(const ElementwiseThreads&) = delete;
  ElementwiseThreads& operator=(const ElementwiseThreads&) = delete;

 private:
  int old_;
};

template <class F>
void parallel_chunks(std::size_t n, F&& f) {
#ifdef _OPENMP
  // Inside one of the core's own parallel regions a nested team would only add overhead.
  const int nt = elementwise_threads > 0 ? elementwise_threads : omp_get_max_threads();
  if (n >= 2 * kParallelGrain && nt > 1 && !omp_in_parallel()) {
#pragma omp parallel num_threads(nt)
    {
      const std::size_t t = static_cast<std::size_t>(omp_get_thread_num());
      const std::size_t nth = static_cast<std::size_t>(omp_get_num_threads());
      const std::size_t chunk = (n + nth - 1) / nth;
      const std::size_t b = t * chunk;
      const std::size_t e = b + chunk < n ? b + chunk : n;
      if (b < e) f(b, e);
    }
    return;
  }
#endif
  f(std::size_t{0}, n);
}

}  // namespace gradchain
