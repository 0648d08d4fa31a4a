// GC_CLONES marks a one-pass reduction (written for `omp simd`, so that it vectorizes
// without -ffast-math) for an AVX2 clone that the loader picks where the CPU has it, on
// x86-64 with GCC or Clang; elsewhere it marks nothing.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define GC_CLONES __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef GC_CLONES
#define GC_CLONES
#endif
