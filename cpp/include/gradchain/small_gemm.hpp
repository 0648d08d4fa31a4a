// Register-blocked kernels for the small matrix products of narrow chains, where OpenBLAS
// spends much of its time packing operands. They read the operands where they lie (all
// fit in L1 or L2). One build carries an AVX-512 and an AVX2 variant, each compiled with
// its own flags; the widest that the CPU has is chosen once, at the first product. Elsewhere
// (no AVX2, not x86-64) products go to BLAS.
#pragma once

#include <cstddef>

#include "gradchain/blas.hpp"

namespace gradchain::small {

enum class Isa { blas, avx2, avx512 };

// The variant in use: the widest the CPU has, unless set_isa chose a narrower one.
Isa isa();
const char* isa_name(Isa i);
// Uses `i` from now on (a narrower one than the CPU's, to compare variants); a variant the
// CPU lacks throws std::invalid_argument. Returns the one in use before.
Isa set_isa(Isa i);

// Memory that the next product of these kernels on the calling thread loads into cache while
// it runs, one line per step of its inner loop, up to two ranges (e.g. what the next layer of
// a chain reads, so that a chain larger than the caches does not wait for memory at every
// layer). A product that goes to BLAS drops them.
struct Prefetch {
  const char* p[2] = {nullptr, nullptr};
  const char* end[2] = {nullptr, nullptr};
};
void prefetch_during_next(const void* p, std::size_t bytes);

// While one lives on a thread, the A B^T products on that thread take a B at the address,
// shape and leading dimension of the one before it to hold the same values, and reuse its
// transpose (e.g. the parts of a batch that one thread takes through the same layer's
// weights in turn). Whoever opens one vouches that no such B changes while it lives.
class KeepPacked {
 public:
  KeepPacked();
  ~KeepPacked();
  KeepPacked(const KeepPacked&) = delete;
  KeepPacked& operator=(const KeepPacked&) = delete;
};

// C = alpha * op(A) op(B), row-major, beta = 0. Returns false (and does nothing) when the
// product is too large for these kernels, op(B) = B^T with op(A) = A^T, or the variant in
// use is blas: the caller then uses BLAS.
bool gemm(blas::Trans ta, blas::Trans tb, int m, int n, int k, double alpha, const double* a,
          int lda, const double* b, int ldb, double* c, int ldc);
bool gemm(blas::Trans ta, blas::Trans tb, int m, int n, int k, float alpha, const float* a, int lda,
          const float* b, int ldb, float* c, int ldc);

}  // namespace gradchain::small
