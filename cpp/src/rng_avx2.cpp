// The generator kernels for AVX2 (compiled with -mavx2 -mfma; called only on CPUs that have
// them): 4 counters per vector, two vectors at a time.
#if defined(__AVX2__) && defined(__FMA__)
#include "rng_simd.hpp"

namespace gradchain::rng_kernels::avx2 {
namespace {

struct Y {
  using I = __m256i;
  using D = __m256d;
  static constexpr int W = 4, U = 2;
  static I set1(std::uint64_t x) { return _mm256_set1_epi64x(static_cast<long long>(x)); }
  static I iota() { return _mm256_set_epi64x(3, 2, 1, 0); }
  static I add(I a, I b) { return _mm256_add_epi64(a, b); }
  static I mul(I a, I b) { return _mm256_mul_epu32(a, b); }
  template <int k>
  static I shr(I a) {
    return _mm256_srli_epi64(a, k);
  }
  template <int k>
  static I shl(I a) {
    return _mm256_slli_epi64(a, k);
  }
  static I xor_(I a, I b) { return _mm256_xor_si256(a, b); }
  static I or_(I a, I b) { return _mm256_or_si256(a, b); }
  static void store(std::uint64_t* p, I a) { _mm256_store_si256(reinterpret_cast<I*>(p), a); }
  static D as_double(I a) { return _mm256_castsi256_pd(a); }
  static D set1d(double x) { return _mm256_set1_pd(x); }
  static D sub(D a, D b) { return _mm256_sub_pd(a, b); }
  static D addd(D a, D b) { return _mm256_add_pd(a, b); }
  static D muld(D a, D b) { return _mm256_mul_pd(a, b); }
  static void stored(double* p, D a) { _mm256_store_pd(p, a); }
};

}  // namespace

void blocks(const Stream& s, std::uint64_t first, std::size_t n, std::uint32_t* out) {
  rng_kernels::blocks<Y>(s, first, n, out);
}
void uniform_pm1_pairs(const Stream& s, std::uint64_t first, std::size_t n, double scale,
                       double* out) {
  rng_kernels::uniform_pm1_pairs<Y>(s, first, n, scale, out);
}
#ifdef GRADCHAIN_HAVE_LIBMVEC
void normal_pairs(const Stream& s, std::uint64_t first, std::size_t n, double scale, double* out) {
  rng_kernels::normal_pairs<Y>(s, first, n, scale, out);
}
#endif

}  // namespace gradchain::rng_kernels::avx2
#endif
