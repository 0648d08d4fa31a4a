// Elementwise transcendental functions over arrays. With glibc's libmvec these run
// 4 (double) or 8 (float) lanes at a time (AVX2, else SSE2 lanes); accuracy stays
// within a few ulp of the scalar libm result.
#pragma once

#include <cstddef>

namespace gradchain::vm {

void tanh(const double* x, double* y, std::size_t n);
void tanh(const float* x, float* y, std::size_t n);
void exp(const double* x, double* y, std::size_t n);
void exp(const float* x, float* y, std::size_t n);
void erf(const double* x, double* y, std::size_t n);
void erf(const float* x, float* y, std::size_t n);
void erfc(const double* x, double* y, std::size_t n);
void erfc(const float* x, float* y, std::size_t n);
void expm1(const double* x, double* y, std::size_t n);
void expm1(const float* x, float* y, std::size_t n);
void log1p(const double* x, double* y, std::size_t n);
void log1p(const float* x, float* y, std::size_t n);
void log(const double* x, double* y, std::size_t n);
void log(const float* x, float* y, std::size_t n);
void sin(const double* x, double* y, std::size_t n);
void sin(const float* x, float* y, std::size_t n);
void cos(const double* x, double* y, std::size_t n);
void cos(const float* x, float* y, std::size_t n);

// Whether the vector library is in use (for diagnostics).
bool vectorized();

}  // namespace gradchain::vm
