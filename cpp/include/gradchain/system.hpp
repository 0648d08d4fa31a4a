// Facts about the machine that the core sizes its work by.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace gradchain {

// Physical memory of the machine in bytes (0 if unknown).
std::uint64_t physical_memory_bytes();

// Throws std::bad_alloc-derived MemoryRequestError when `bytes` exceeds physical memory.
class MemoryRequestError : public std::bad_alloc {
 public:
  explicit MemoryRequestError(std::string msg) : msg_(std::move(msg)) {}
  const char* what() const noexcept override { return msg_.c_str(); }

 private:
  std::string msg_;
};
void check_memory(double bytes, const std::string& what);

// Number of threads the core's own parallel loops may use.
int max_threads();
// Sets the number of BLAS threads (OpenBLAS); returns the previous value.
int set_blas_threads(int n);
int blas_threads();

// Restores OpenBLAS's thread count when a run ends, however it ends.
class BlasThreads {
 public:
  explicit BlasThreads(int n) : old_(set_blas_threads(n)) {}
  ~BlasThreads() { set_blas_threads(old_); }
  BlasThreads(const BlasThreads&) = delete;
  BlasThreads& operator=(const BlasThreads&) = delete;

 private:
  int old_;
};

}  // namespace gradchain
