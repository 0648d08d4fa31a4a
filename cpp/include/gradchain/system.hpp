// Facts about the machine that the core sizes its work by: memory and threads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
#include <string>

namespace gradchain {

// The widest vector instruction set of this CPU that the core has kernels for, detected
// once: avx2 means AVX2 with FMA, avx512 AVX-512F with both (none off x86-64 or without).
enum class VectorIsa { none, avx2, avx512 };
VectorIsa cpu_vector_isa();

// Physical memory of the machine in bytes (0 if unknown).
std::uint64_t physical_memory_bytes();

// The memory new allocations may take now, and which limit sets it.
struct MemoryLimit {
  double bytes = 0.0;     // +inf when nothing is known
  double physical = 0.0;  // physical memory (0 if unknown)
  std::string source;     // says which limit it is, for messages
};

// The least of: MemAvailable in /proc/meminfo (physical memory when that is missing), the
// room left under every cgroup memory limit of this process (v2 memory.max, v1
// memory.limit_in_bytes, less the memory in use not counting reclaimable file pages),
// and GRADCHAIN_MEMORY_LIMIT (bytes; it can only lower the limit). `root` is prepended to
// every path read (tests point it at a fake tree); "" reads the machine's own.
MemoryLimit memory_limit(const std::string& root = "");

// What a request beyond the memory available throws: a std::bad_alloc with a message.
class MemoryRequestError : public std::bad_alloc {
 public:
  explicit MemoryRequestError(std::string msg) : msg_(std::move(msg)) {}
  const char* what() const noexcept override { return msg_.c_str(); }

 private:
  std::string msg_;
};

// Throws MemoryRequestError "<what> needs N bytes (...), more than <the limit>" when
// `bytes` (less `reusable`, memory the caller holds and frees or reuses for the request)
// exceeds memory_limit(). Requests under 16 MiB are not checked unless
// GRADCHAIN_MEMORY_LIMIT is set: reading the limits costs more than such a pass.
void check_memory(double bytes, const std::string& what, double reusable = 0.0);

// True when memory_limit() leaves room for `bytes` at least `factor` times over (an
// optional buffer that should not crowd out everything else).
bool memory_allows(double bytes, double factor);

// Number of threads the core's own parallel loops may use: OpenMP's count, or 1 in a
// process forked from a thread that had run one of those loops (libgomp's threads do not
// survive fork, and entering a parallel region there would wait for them forever).
int max_threads();
// Caps max_threads() for the calling thread only (0: no cap) and returns the previous cap:
// concurrent runs on threads of their own (a sweep's points) then do not compete for cores.
int set_thread_limit(int n);
// Threads for one of the core's OpenMP regions that would like `n`: every region's
// num_threads goes through it, so that the fork guard knows which threads have a pool.
int team_threads(int n);
// True in a process forked after its forking thread had run a parallel region.
bool forked_single_threaded();

// Sets the number of BLAS threads (OpenBLAS); returns the previous value.
int set_blas_threads(int n);
// Threads the core may give OpenBLAS: its current count, or 1 where max_threads() is 1
// because of a fork (the child runs single-threaded throughout).
int blas_threads();

// Runs OpenBLAS on one thread while a run lasts and restores its count when the run ends,
// however it ends. The count is one setting for the whole process, so runs on several
// threads at once (a sweep's points) share it: the first to start sets it, the last to
// end restores it; none changes it under another's BLAS call.
class BlasThreads {
 public:
  explicit BlasThreads(int n);
  ~BlasThreads();
  BlasThreads(const BlasThreads&) = delete;
  BlasThreads& operator=(const BlasThreads&) = delete;
};

}  // namespace gradchain
