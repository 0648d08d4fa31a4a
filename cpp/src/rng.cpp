#include "gradchain/rng.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <stdexcept>
#include <string>

#include "gradchain/common.hpp"
#include "gradchain/parallel.hpp"
#include "gradchain/vecmath.hpp"
#include "rng_kernels.hpp"

namespace gradchain {

namespace {

std::atomic<VectorIsa>& current() {
  static std::atomic<VectorIsa> isa{cpu_vector_isa()};
  return isa;
}

// Pairs between two looks at the Canceller (a few tens of microseconds of work).
constexpr std::uint64_t kPollPairs = 8192;
// From this many pairs (a millisecond or so) one draw is split over the core's threads when
// nothing else runs in parallel: the layers of a chain are already spread over the threads,
// but a single wide layer is not.
constexpr std::uint64_t kSplitPairs = std::uint64_t{1} << 17;

using Pairs = void (*)(const rng_kernels::Stream&, std::uint64_t, std::size_t, double, double*);

// The portable Box-Muller: the definition the kernels reproduce bit for bit.
void normal_pairs_portable(const rng_kernels::Stream& st, std::uint64_t first, std::size_t n,
                           double scale, double* out) {
  const Philox rng((std::uint64_t{st.k1} << 32) | st.k0);
  constexpr std::size_t kPairs = 256;
  double r[kPairs], t[kPairs], c[kPairs], s[kPairs];
  for (std::size_t p = 0; p < n; p += kPairs) {
    const std::size_t m = std::min(kPairs, n - p);
    for (std::size_t j = 0; j < m; ++j) {
      double u[2];
      rng.uniform2(st.stream, first + p + j, u);
      r[j] = 1.0 - u[0];  // in (0, 1]
      t[j] = 6.283185307179586476925 * u[1];
    }
    vm::log(r, r, m);
    vm::cos(t, c, m);
    vm::sin(t, s, m);
    for (std::size_t j = 0; j < m; ++j) {
      const double rad = std::sqrt(-2.0 * r[j]);
      out[2 * (p + j)] = rad * c[j] * scale;
      out[2 * (p + j) + 1] = rad * s[j] * scale;
    }
  }
}

void uniform_pm1_pairs_portable(const rng_kernels::Stream& st, std::uint64_t first, std::size_t n,
                                double scale, double* out) {
  const Philox rng((std::uint64_t{st.k1} << 32) | st.k0);
  for (std::size_t j = 0; j < n; ++j) {
    double u[2];
    rng.uniform2(st.stream, first + j, u);
    out[2 * j] = (2.0 * u[0] - 1.0) * scale;
    out[2 * j + 1] = (2.0 * u[1] - 1.0) * scale;
  }
}

Pairs normal_pairs(VectorIsa isa) {
#if defined(GRADCHAIN_RNG_SIMD) && defined(GRADCHAIN_HAVE_LIBMVEC)
  // Only with libmvec: without it vm::log and friends are the scalar libm functions.
  if (isa == VectorIsa::avx512) return rng_kernels::avx512::normal_pairs;
  if (isa == VectorIsa::avx2) return rng_kernels::avx2::normal_pairs;
#else
  (void)isa;
#endif
  return normal_pairs_portable;
}

Pairs uniform_pm1_pairs(VectorIsa isa) {
#ifdef GRADCHAIN_RNG_SIMD
  if (isa == VectorIsa::avx512) return rng_kernels::avx512::uniform_pm1_pairs;
  if (isa == VectorIsa::avx2) return rng_kernels::avx2::uniform_pm1_pairs;
#else
  (void)isa;
#endif
  return uniform_pm1_pairs_portable;
}

// out[0..n) from pairs 0, 1, ...: whole pairs in place, the odd last number through a
// buffer (its pair's second number is dropped).
void fill_pairs(Pairs pairs, const Philox& rng, std::uint64_t stream, double* out, std::uint64_t n,
                Canceller* cancel, double scale) {
  const rng_kernels::Stream st{rng.key0(), rng.key1(), stream};
  const std::uint64_t whole = n / 2;
  auto chunk = [&](std::uint64_t p) {
    pairs(st, p, static_cast<std::size_t>(std::min(kPollPairs, whole - p)), scale, out + 2 * p);
  };
  int threads = elementwise_threads > 0 ? elementwise_threads : max_threads();
#ifdef _OPENMP
  if (omp_in_parallel()) threads = 1;
#endif
  if (threads > 1 && whole >= kSplitPairs && whole / kPollPairs < (1u << 30)) {
    // Every number depends on its counter alone, so any split gives the same bits.
    struct Scratch {};
    const auto chunks = static_cast<int>((whole + kPollPairs - 1) / kPollPairs);
    parallel_indices<Scratch>(0, chunks, threads, cancel, [&](int c, Scratch&) {
      chunk(static_cast<std::uint64_t>(c) * kPollPairs);
    });
  } else {
    for (std::uint64_t p = 0; p < whole; p += kPollPairs) {
      if (cancel) cancel->poll();
      chunk(p);
    }
  }
  if (n % 2) {
    double last[2];
    pairs(st, whole, 1, scale, last);
    out[n - 1] = last[0];
  }
}

}  // namespace

VectorIsa rng_isa() {
  return current().load(std::memory_order_relaxed);
}

const char* rng_isa_name(VectorIsa isa) {
  return isa == VectorIsa::avx512 ? "avx512" : isa == VectorIsa::avx2 ? "avx2" : "scalar";
}

VectorIsa set_rng_isa(VectorIsa isa) {
  if (static_cast<int>(isa) > static_cast<int>(cpu_vector_isa()))
    throw std::invalid_argument(std::string("isa must be one this CPU has (up to '") +
                                rng_isa_name(cpu_vector_isa()) + "'); got '" + rng_isa_name(isa) +
                                "'");
  return current().exchange(isa);
}

void philox_blocks(const Philox& rng, std::uint64_t stream, std::uint64_t first, std::uint64_t n,
                   std::uint32_t* out) {
  const rng_kernels::Stream st{rng.key0(), rng.key1(), stream};
  const auto m = static_cast<std::size_t>(n);
  switch (rng_isa()) {
#ifdef GRADCHAIN_RNG_SIMD
    case VectorIsa::avx512:
      return rng_kernels::avx512::blocks(st, first, m, out);
    case VectorIsa::avx2:
      return rng_kernels::avx2::blocks(st, first, m, out);
#endif
    default:
      for (std::size_t i = 0; i < m; ++i) {
        const Philox::Block b = rng(stream, first + i);
        std::copy(b.begin(), b.end(), out + 4 * i);
      }
  }
}

void fill_normal(const Philox& rng, std::uint64_t stream, double* out, std::uint64_t n,
                 Canceller* cancel, double scale) {
  fill_pairs(normal_pairs(rng_isa()), rng, stream, out, n, cancel, scale);
}

void fill_uniform_pm1(const Philox& rng, std::uint64_t stream, double* out, std::uint64_t n,
                      Canceller* cancel, double scale) {
  fill_pairs(uniform_pm1_pairs(rng_isa()), rng, stream, out, n, cancel, scale);
}

}  // namespace gradchain
