#include "gradchain/small_gemm.hpp"
#include "gradchain/system.hpp"

#include <atomic>
#include <cstdint>
#include <vector>
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
void transpose(int n, int k, const double* b, int ldb, double* bt, int ldbt);
void transpose(int n, int k, const float* b, int ldb, float* bt, int ldbt);
}  // namespace avx2
namespace avx512 {
void gemm(bool ta, bool tb, int m, int n, int k, double alpha, const double* a, int lda,
          const double* b, int ldb, double* c, int ldc, Prefetch& pf);
void gemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda,
          const float* b, int ldb, float* c, int ldc, Prefetch& pf);
void transpose(int n, int k, const double* b, int ldb, double* bt, int ldbt);
void transpose(int n, int k, const float* b, int ldb, float* bt, int ldbt);
}  // namespace avx512
#endif

namespace {

// Products up to this many multiply-adds use the kernels (e.g. 32 x 128 x 128): above it
// OpenBLAS's packed panels win, except for the A B form (dL/dx = dL/dy W), whose kernel
// reads B's rows in place where OpenBLAS packs the whole of B at every call, and the A B^T
// form, which transposes B once and then runs the A B form: up to 32 x 384 x 384 (at
// 32 x 512 x 512 the kernels and OpenBLAS break even).
constexpr double kMaxWork = 1 << 19;
constexpr double kMaxWorkAB = 3 << 21;
// Float64 A B^T products from this many multiply-adds (16 x 64 x 32, say) run in order on
// the A B kernel (see run), smaller ones as dot products.
constexpr double kMinInOrder = 1 << 15;

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

// The transposed B of the A B^T form: a buffer per thread, aligned to a cache line, and
// while a KeepPacked lives on the thread, which operand it holds.
struct Packed {
  std::vector<char> buf;
  const void* b = nullptr;  // nullptr: nothing to reuse
  int n = 0, k = 0, ldb = 0;
  std::size_t elem = 0;
};
thread_local Packed packed;
// A^T and C^T of an A B^T product run as C^T = B A^T (see run).
thread_local std::vector<char> scratch;
thread_local int keep_depth = 0;

// `count` T's in buf, from a cache line's start (buf grows as needed: true where it did).
template <class T>
T* aligned_in(std::vector<char>& buf, std::size_t count, bool* grew = nullptr) {
  const std::size_t bytes = count * sizeof(T) + 64;
  const bool more = buf.size() < bytes;
  if (more) buf.resize(bytes);
  if (grew) *grew = more;
  const auto addr = reinterpret_cast<std::uintptr_t>(buf.data());
  return reinterpret_cast<T*>(buf.data() + (64 - addr % 64) % 64);
}

template <class T>
bool run(blas::Trans ta, blas::Trans tb, int m, int n, int k, T alpha, const T* a, int lda,
         const T* b, int ldb, T* c, int ldc) {
  Prefetch pf = pending;
  pending = Prefetch{};
  const Isa i = current().load(std::memory_order_relaxed);
  if (i == Isa::blas || m <= 0 || n <= 0 || k <= 0) return false;
  const bool at = ta == blas::Trans::T, bt = tb == blas::Trans::T;
  if (at && bt) return false;
  const double work = double(m) * double(n) * double(k);
  if (work > (at ? kMaxWork : kMaxWorkAB)) return false;
#ifdef GC_SMALL_GEMM
  // The A B^T form runs as A B products near the core's peak (dot products spend much of
  // their time in horizontal sums), whichever way transposes fewer entries: as
  // C^T = B A^T, with A transposed before and C^T after (a batch at least a vector wide but
  // narrower than the layer: A and C are a few kilobytes that the caller has just written,
  // where B may come from memory), or with B transposed (once per operand while a
  // KeepPacked lives, which here means two parts of a batch). Either way every entry is the
  // sum over k in order, so the numbers are the same. Float64 products below kMinInOrder
  // multiply-adds, or of fewer rows than a 512-bit vector holds, keep dot products (the
  // transposes would cost more than they save), whose sums depend on the rows alone. The
  // choice depends on the shape alone (the vector is the same on every CPU), and so do the
  // numbers.
  constexpr int kLanes = 64 / static_cast<int>(sizeof(T));
  if (bt &&
      (sizeof(T) == sizeof(float) || work > kMaxWork || (m >= kLanes && work >= kMinInOrder))) {
    const auto transpose = [i](int rows, int cols, const T* src, int lds, T* dst, int ldd) {
      if (i == Isa::avx512)
        avx512::transpose(rows, cols, src, lds, dst, ldd);
      else
        avx2::transpose(rows, cols, src, lds, dst, ldd);
    };
    const bool have = keep_depth > 0 && packed.b == b && packed.n == n && packed.k == k &&
                      packed.ldb == ldb && packed.elem == sizeof(T);
    const double parts = keep_depth > 0 ? 2 : 1;
    if (!have && m >= kLanes && parts * m * (double(k) + n) < double(n) * k) {
      T* xt =
          aligned_in<T>(scratch, std::size_t(k) * std::size_t(m) + std::size_t(n) * std::size_t(m));
      T* yt = xt + std::size_t(k) * std::size_t(m);
      transpose(m, k, a, lda, xt, m);
      if (i == Isa::avx512)
        avx512::gemm(false, false, n, m, k, alpha, b, ldb, xt, m, yt, m, pf);
      else
        avx2::gemm(false, false, n, m, k, alpha, b, ldb, xt, m, yt, m, pf);
      transpose(n, m, yt, m, c, ldc);
      return true;
    }
    bool grew = false;
    T* t = aligned_in<T>(packed.buf, std::size_t(n) * std::size_t(k), &grew);
    if (grew) packed.b = nullptr;
    if (!have) {
      transpose(n, k, b, ldb, t, n);
      packed.b = keep_depth > 0 ? b : nullptr;
      packed.n = n, packed.k = k, packed.ldb = ldb, packed.elem = sizeof(T);
    }
    b = t;
    ldb = n;
    tb = blas::Trans::N;
  }
  // Dot products sum in as many lanes as a vector holds, so their numbers depend on the
  // vector width: they keep the AVX2 kernel on every CPU, so that a pass gives the same
  // numbers on AVX-512 and AVX2 CPUs (training runs, whose trajectories amplify last-bit
  // differences, included). The A B form sums in the same order at any width.
  const bool dot = tb == blas::Trans::T;
  if (i == Isa::avx512 && !dot) {
    avx512::gemm(at, dot, m, n, k, alpha, a, lda, b, ldb, c, ldc, pf);
  } else {
    avx2::gemm(at, dot, m, n, k, alpha, a, lda, b, ldb, c, ldc, pf);
  }
  return true;
#else
  (void)a, (void)b, (void)c, (void)alpha, (void)lda, (void)ldb, (void)ldc, (void)pf, (void)work;
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

KeepPacked::KeepPacked() {
  ++keep_depth;
}
KeepPacked::~KeepPacked() {
  if (--keep_depth == 0) packed.b = nullptr;
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
