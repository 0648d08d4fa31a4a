#include "gradchain/small_gemm.hpp"
#include "gradchain/system.hpp"

#include <atomic>
#include <stdexcept>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GC_SMALL_GEMM 1
#endif

namespace gradchain::small {

#ifdef GC_SMALL_GEMM
// Defined in small_gemm_avx2.cpp and small_gemm_avx512.cpp, each compiled for its
// instruction set: nothing else in the library is.
namespace avx2 {
void gemm(bool ta, bool tb, int m, int n, int k, double alpha, const double* a, int lda,
          const double* b, int ldb, double* c, int ldc, Prefetch& pf);
void gemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda,
          const float* b, int ldb, float* c, int ldc, Prefetch& pf);
}  // namespace avx2
namespace avx512 {
void gemm(bool ta, bool tb, int m, int n, int k, double alpha, const double* a, int lda,
          const double* b, int ldb, double* c, int ldc, Prefetch& pf);
void gemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda,
          const float* b, int ldb, float* c, int ldc, Prefetch& pf);
}  // namespace avx512
#endif

namespace {

// Products up to this many multiply-adds use the kernels (e.g. 32 x 128 x 128): above it
// OpenBLAS's packed panels win, except for the A B form (dL/dx = dL/dy W), whose kernel
// reads B's rows in place where OpenBLAS packs the whole of B at every call: up to
// 32 x 384 x 384 (at 32 x 512 x 512 the two break even).
constexpr double kMaxWork = 1 << 19;
constexpr double kMaxWorkAB = 3 << 21;

Isa widest() {
#ifdef GC_SMALL_GEMM
  switch (cpu_vector_isa()) {
    case VectorIsa::avx512:
      return Isa::avx512;
    case VectorIsa::avx2:
      return Isa::avx2;
    case VectorIsa::none:
      break;
  }
#endif
  return Isa::blas;
}

std::atomic<Isa>& current() {
  static std::atomic<Isa> c{widest()};
  return c;
}

thread_local Prefetch pending;

template <class T>
bool run(blas::Trans ta, blas::Trans tb, int m, int n, int k, T alpha, const T* a, int lda,
         const T* b, int ldb, T* c, int ldc) {
  Prefetch pf = pending;
  pending = Prefetch{};
  const Isa i = current().load(std::memory_order_relaxed);
  if (i == Isa::blas || m <= 0 || n <= 0 || k <= 0) return false;
  const bool at = ta == blas::Trans::T, bt = tb == blas::Trans::T;
  if (at && bt) return false;
  if (double(m) * double(n) * double(k) > (at || bt ? kMaxWork : kMaxWorkAB)) return false;
#ifdef GC_SMALL_GEMM
  // The A B^T form sums each dot product in as many lanes as a vector holds, so its
  // numbers depend on the vector width; it keeps the AVX2 kernel on every CPU, so that a
  // pass gives the same numbers on AVX-512 and AVX2 CPUs (training runs, whose trajectories
  // amplify last-bit differences, included). The other forms sum in the same order at any
  // width.
  if (i == Isa::avx512 && !bt) {
    avx512::gemm(at, bt, m, n, k, alpha, a, lda, b, ldb, c, ldc, pf);
  } else {
    avx2::gemm(at, bt, m, n, k, alpha, a, lda, b, ldb, c, ldc, pf);
  }
  return true;
#else
  (void)a, (void)b, (void)c, (void)alpha, (void)lda, (void)ldb, (void)ldc, (void)pf;
  return false;
#endif
}

}  // namespace

void prefetch_during_next(const void* p, std::size_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int r = 0; r < 2; ++r)
    if (pending.p[r] == pending.end[r]) {
      pending.p[r] = c;
      pending.end[r] = c + bytes;
      return;
    }
}

Isa isa() {
  return current().load();
}

const char* isa_name(Isa i) {
  switch (i) {
    case Isa::avx512:
      return "avx512";
    case Isa::avx2:
      return "avx2";
    case Isa::blas:
      break;
  }
  return "blas";
}

Isa set_isa(Isa i) {
  if (static_cast<int>(i) > static_cast<int>(widest()))
    throw std::invalid_argument(std::string("isa must be one this CPU has (up to '") +
                                isa_name(widest()) + "'); got '" + isa_name(i) + "'");
  return current().exchange(i);
}

bool gemm(blas::Trans ta, blas::Trans tb, int m, int n, int k, double alpha, const double* a,
          int lda, const double* b, int ldb, double* c, int ldc) {
  return run(ta, tb, m, n, k, alpha, a, lda, b, ldb, c, ldc);
}

bool gemm(blas::Trans ta, blas::Trans tb, int m, int n, int k, float alpha, const float* a, int lda,
          const float* b, int ldb, float* c, int ldc) {
  return run(ta, tb, m, n, k, alpha, a, lda, b, ldb, c, ldc);
}

}  // namespace gradchain::small
