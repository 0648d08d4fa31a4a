// Parallel loops: chunked ones for elementwise work, and one index at a time for
// independent pieces of work (layers, examples) that may fail or be cancelled.
#pragma once

#include <atomic>
#include <cstddef>
#include <exception>

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

// Runs body(i, scratch, polls) for i = begin .. end - 1 on up to `threads` OpenMP threads,
// one index at a time (dynamic schedule). Each thread default-constructs one Scratch (its
// buffers); `polls` is true on one thread only, the one that should poll a Canceller. After
// a failure the indices not yet started are skipped, and the exception of the lowest failing
// index is rethrown.
template <class Scratch, class F>
void parallel_indices(int begin, int end, int threads, F&& body) {
  std::exception_ptr error;
  int failed = end;
  std::atomic<bool> stop{false};
#pragma omp parallel num_threads(threads) if (threads > 1 && end - begin > 1)
  {
    Scratch scratch{};
#ifdef _OPENMP
    const bool polls = omp_get_thread_num() == 0;
#else
    const bool polls = true;
#endif
#pragma omp for schedule(dynamic, 1)
    for (int i = begin; i < end; ++i) {
      if (stop.load(std::memory_order_relaxed)) continue;
      try {
        body(i, scratch, polls);
      } catch (...) {
#pragma omp critical(gradchain_parallel_indices)
        if (i < failed) {
          failed = i;
          error = std::current_exception();
        }
        stop.store(true);
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace gradchain
