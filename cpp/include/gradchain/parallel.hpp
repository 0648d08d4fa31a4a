// Parallel loops: chunked ones for elementwise work, and one index at a time for
// independent pieces of work (layers, examples) that may fail or be cancelled.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <exception>
#include <thread>

#include "gradchain/common.hpp"
#include "gradchain/system.hpp"

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
  const int nt = elementwise_threads > 0 ? elementwise_threads : max_threads();
  if (n >= 2 * kParallelGrain && nt > 1 && !omp_in_parallel()) {
#pragma omp parallel num_threads(team_threads(nt))
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

// Runs body(i, scratch) for i = begin .. end - 1 on up to `threads` OpenMP threads, one
// index at a time. Each thread default-constructs one Scratch (its buffers). After a failure
// the indices not yet started are skipped, and the exception of the lowest failing index is
// rethrown. With a Canceller, every thread polls it before each index (bodies should poll it
// too), and the calling thread, once out of indices, keeps polling it while the others finish
// theirs: it is the thread that can hear Ctrl-C.
template <class Scratch, class F>
void parallel_indices(int begin, int end, int threads, Canceller* cancel, F&& body) {
  if (end <= begin) return;
  std::exception_ptr error;
  int failed = end + 1;
  std::atomic<int> next{begin}, finished{0};
  std::atomic<bool> stop{false};
  auto fail = [&](int i) {
#pragma omp critical(gradchain_parallel_indices)
    if (i < failed) {
      failed = i;
      error = std::current_exception();
    }
    stop.store(true);
  };
  const int nt = team_threads(std::min(threads, end - begin));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    Scratch scratch{};
    for (int i = next++; i < end && !stop.load(std::memory_order_relaxed); i = next++) {
      try {
        if (cancel) cancel->poll();
        body(i, scratch);
      } catch (...) {
        fail(i);
      }
    }
    ++finished;
#ifdef _OPENMP
    if (cancel && omp_get_thread_num() == 0)
      for (int spins = 0; finished.load() < omp_get_num_threads(); ++spins) {
        try {
          cancel->poll();
        } catch (...) {
          fail(end);
        }
        // Short waits (the others' last layers) spin; long ones (their last examples) sleep.
        if (spins < 2000)
          std::this_thread::yield();
        else
          std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
#endif
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace gradchain
