// The generator kernels for AVX-512 (compiled with -mavx512f; called only on CPUs that have
// it): 8 counters per vector, four vectors at a time (32 registers hold them). Box-Muller
// still calls the AVX2 libmvec variants, 4 lanes at a time.
#if defined(__AVX512F__) && defined(__FMA__)
#include "rng_simd.hpp"

// GCC 12 flags the deliberately undefined upper lanes inside its own shift intrinsics.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace gradchain::rng_kernels::avx512 {
namespace {

struct Z {
  using I = __m512i;
  using D = __m512d;
  static constexpr int W = 8, U = 4;
  static I set1(std::uint64_t x) { return _mm512_set1_epi64(static_cast<long long>(x)); }
  static I iota() { return _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0); }
  static I add(I a, I b) { return _mm512_add_epi64(a, b); }
  static I mul(I a, I b) { return _mm512_mul_epu32(a, b); }
  template <int k>
  static I shr(I a) {
    return _mm512_srli_epi64(a, k);
  }
  template <int k>
  static I shl(I a) {
    return _mm512_slli_epi64(a, k);
  }
  static I xor_(I a, I b) { return _mm512_xor_si512(a, b); }
  static I or_(I a, I b) { return _mm512_or_si512(a, b); }
  static void store(std::uint64_t* p, I a) { _mm512_store_si512(p, a); }
  static D as_double(I a) { return _mm512_castsi512_pd(a); }
  static D set1d(double x) { return _mm512_set1_pd(x); }
  static D sub(D a, D b) { return _mm512_sub_pd(a, b); }
  static D addd(D a, D b) { return _mm512_add_pd(a, b); }
  static D muld(D a, D b) { return _mm512_mul_pd(a, b); }
  static void stored(double* p, D a) { _mm512_store_pd(p, a); }
};

}  // namespace

void blocks(const Stream& s, std::uint64_t first, std::size_t n, std::uint32_t* out) {
  rng_kernels::blocks<Z>(s, first, n, out);
}
void uniform_pm1_pairs(const Stream& s, std::uint64_t first, std::size_t n, double scale,
                       double* out) {
  rng_kernels::uniform_pm1_pairs<Z>(s, first, n, scale, out);
}
#ifdef GRADCHAIN_HAVE_LIBMVEC
void normal_pairs(const Stream& s, std::uint64_t first, std::size_t n, double scale, double* out) {
  rng_kernels::normal_pairs<Z>(s, first, n, scale, out);
}
#endif

}  // namespace gradchain::rng_kernels::avx512
#endif
