// Counter-based random numbers (Philox4x32-10, Salmon et al. 2011). A value depends only
// on (seed, stream, index), so any element of any layer can be drawn independently: the
// weights are the same for any thread count and can be regenerated on the fly.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>

#include "gradchain/system.hpp"

namespace gradchain {

class Philox {
 public:
  using Block = std::array<std::uint32_t, 4>;

  explicit Philox(std::uint64_t seed)
      : k0_(static_cast<std::uint32_t>(seed)), k1_(static_cast<std::uint32_t>(seed >> 32)) {}

  Block operator()(std::uint64_t stream, std::uint64_t index) const {
    Block c = {static_cast<std::uint32_t>(index), static_cast<std::uint32_t>(index >> 32),
               static_cast<std::uint32_t>(stream), static_cast<std::uint32_t>(stream >> 32)};
    std::uint32_t k0 = k0_, k1 = k1_;
    for (int r = 0; r < 10; ++r) {
      const std::uint64_t p0 = std::uint64_t{0xD2511F53u} * c[0];
      const std::uint64_t p1 = std::uint64_t{0xCD9E8D57u} * c[2];
      c = {static_cast<std::uint32_t>(p1 >> 32) ^ c[1] ^ k0, static_cast<std::uint32_t>(p1),
           static_cast<std::uint32_t>(p0 >> 32) ^ c[3] ^ k1, static_cast<std::uint32_t>(p0)};
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    return c;
  }

  std::uint32_t key0() const { return k0_; }
  std::uint32_t key1() const { return k1_; }

  bool operator==(const Philox& o) const { return k0_ == o.k0_ && k1_ == o.k1_; }

  // Two doubles uniform on [0, 1) with 53 random bits each.
  void uniform2(std::uint64_t stream, std::uint64_t index, double out[2]) const {
    const Block b = (*this)(stream, index);
    out[0] = to_unit((std::uint64_t{b[1]} << 32) | b[0]);
    out[1] = to_unit((std::uint64_t{b[3]} << 32) | b[2]);
  }

 private:
  static double to_unit(std::uint64_t x) { return static_cast<double>(x >> 11) * 0x1.0p-53; }
  std::uint32_t k0_, k1_;
};

class Canceller;

// The generators below run vector kernels (VectorIsa::avx512 / avx2) where the CPU has
// them, else the scalar Philox; every variant gives the same bits. rng_isa() is the one in
// use; set_rng_isa() picks another the CPU has (none: scalar) and returns the previous one,
// for comparing them.
VectorIsa rng_isa();
VectorIsa set_rng_isa(VectorIsa isa);
// 'avx512', 'avx2' or 'scalar'.
const char* rng_isa_name(VectorIsa isa);

// out[4 i + w] = word w of rng(stream, first + i) for i < n.
void philox_blocks(const Philox& rng, std::uint64_t stream, std::uint64_t first, std::uint64_t n,
                   std::uint32_t* out);

// Fills out[0..n) with standard normals (or uniforms on [-1, 1)) of one stream, each times
// `scale` (one rounding after the number's own), polling `cancel` (if given) every few
// thousand numbers. Element i comes from block i / 2 (Box-Muller on its two 53-bit
// uniforms), so that any element can be drawn on its own.
void fill_normal(const Philox& rng, std::uint64_t stream, double* out, std::uint64_t n,
                 Canceller* cancel = nullptr, double scale = 1.0);
void fill_uniform_pm1(const Philox& rng, std::uint64_t stream, double* out, std::uint64_t n,
                      Canceller* cancel = nullptr, double scale = 1.0);

}  // namespace gradchain
