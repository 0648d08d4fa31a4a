// The vector kernels behind rng.hpp's generators: one namespace per instruction set, each
// defined in a file compiled for it (rng_avx2.cpp, rng_avx512.cpp) and called only on CPUs
// that have it.
#pragma once

#include <cstddef>
#include <cstdint>

namespace gradchain::rng_kernels {

struct Stream {
  std::uint32_t k0, k1;  // the key (seed)
  std::uint64_t stream;
};

// blocks: as philox_blocks. normal_pairs / uniform_pm1_pairs: out[2 i], out[2 i + 1] are the
// two numbers of block first + i times `scale`, for i < n (normal_pairs only with libmvec).
#define GC_RNG_KERNELS                                                                      \
  void blocks(const Stream& s, std::uint64_t first, std::size_t n, std::uint32_t* out);     \
  void normal_pairs(const Stream& s, std::uint64_t first, std::size_t n, double scale,      \
                    double* out);                                                           \
  void uniform_pm1_pairs(const Stream& s, std::uint64_t first, std::size_t n, double scale, \
                         double* out);
namespace avx2 {
GC_RNG_KERNELS
}
namespace avx512 {
GC_RNG_KERNELS
}
#undef GC_RNG_KERNELS

}  // namespace gradchain::rng_kernels
