#include "gradchain/jacobian.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <exception>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>

#include "gradchain/activation.hpp"
#include "gradchain/blas.hpp"
#include "gradchain/chain.hpp"
#include "gradchain/linear.hpp"
#include "gradchain/residual.hpp"
#include "gradchain/parallel.hpp"
#include "gradchain/rng.hpp"
#include "gradchain/system.hpp"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define GC_HH_AVX2 1
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace gradchain {

namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();
constexpr double kLn2 = 0.69314718055994530942;
constexpr double kLog10Of2 = 0.30102999566398119521;
constexpr std::uint64_t kPowerSeed = 0x6a61636f62690000ull;  // start vectors of power iteration
constexpr double kPipelineFlops = 1 << 20;  // per layer, for two threads on one example

std::size_t sz(int n) {
  return static_cast<std::size_t>(n);
}

// ---- Householder kernels ----------------------------------------------------------------
// One Householder QR per layer is the whole cost of the spectrum. OpenBLAS's dgeqrf and
// dorgqr reach about 5 GFLOP/s at n = 128 (unblocked panels, a library call per column),
// which alone would be slower than a PyTorch loop; here reflectors are applied four at a
// time in compact WY form (I - V T V^T, Schreiber & Van Loan 1989) by register-blocked
// kernels over cache-resident vectors, and Q is never formed: J_{l+1} Q_l is the rows of
// W_{l+1} with the reflectors applied, which costs what the product by an explicit Q would.
//
// Vectors are padded to a multiple of four entries with zeros (padded()), start on a cache
// line (aligned_in()), and reflectors are stored in full: row j of v is 0 before entry j,
// 1 at j, and 0 in the padding. The kernels then run over whole vectors.

std::size_t padded(int m) {
  return (sz(m) + 3) & ~std::size_t{3};
}

// n doubles in buf starting on a cache line. New entries are zero.
double* aligned_in(std::vector<double>& buf, std::size_t n) {
  if (buf.size() < n + 8) buf.resize(n + 8, 0.0);
  const auto p = reinterpret_cast<std::uintptr_t>(buf.data());
  return buf.data() + ((64 - (p & 63u)) & 63u) / sizeof(double);
}

// The reflectors H_j = I - tau_j v_j v_j^T, j < k, of one QR factorisation on R^m, and for
// every block of four (the last may be shorter) the upper triangular T with
// H_{4b} ... H_{4b+3} = I - V T V^T (16 doubles per block, row-major).
struct Frame {
  const double* v = nullptr;
  std::size_t ldv = 0;
  const double* tau = nullptr;
  const double* t = nullptr;
  int m = 0;
  int k = 0;  // 0: the frame is the first columns of the identity
};

constexpr int kBlock = 4;

double dot(const double* a, const double* b, int n);

// T of the block of B reflectors starting at j (LAPACK's dlarft, forward, columnwise).
void block_t(const double* v, std::size_t ldv, const double* tau, int j, int B, int mp, double* T) {
  std::fill(T, T + kBlock * kBlock, 0.0);
  for (int i = 0; i < B; ++i) {
    const double* vi = v + sz(j + i) * ldv;
    double z[kBlock];
    for (int p = 0; p < i; ++p) {
      const double* vp = v + sz(j + p) * ldv;
      z[p] = -tau[j + i] * dot(vp + j + i, vi + j + i, mp - j - i);
    }
    for (int p = 0; p < i; ++p) {
      double s = 0.0;
      for (int q = p; q < i; ++q) s += T[p * kBlock + q] * z[q];
      T[p * kBlock + i] = s;
    }
    T[i * kBlock + i] = tau[j + i];
  }
}

// x_c <- (I - V T V^T)^T x_c = H_{j+B-1} ... H_j x_c for the NV vectors x[c] (length mp),
// V the B reflectors from j. One pass forms V^T x, one subtracts V (T^T V^T x).
template <int B, int NV>
void block_scalar(const double* v, std::size_t ldv, const double* T, int j, int mp,
                  double* const* x) {
  for (int c = 0; c < NV; ++c) {
    double w[B], u[B];
    for (int i = 0; i < B; ++i) {
      const double* vi = v + sz(j + i) * ldv;
      double s = 0.0;
      for (int r = j; r < mp; ++r) s += vi[r] * x[c][r];
      w[i] = s;
    }
    for (int i = 0; i < B; ++i) {
      double s = 0.0;
      for (int p = 0; p <= i; ++p) s += T[p * kBlock + i] * w[p];
      u[i] = s;
    }
    for (int i = 0; i < B; ++i) {
      const double* vi = v + sz(j + i) * ldv;
      for (int r = j; r < mp; ++r) x[c][r] -= u[i] * vi[r];
    }
  }
}

#ifdef GC_HH_AVX2
#define GC_AVX2_FN __attribute__((target("avx2,fma")))

GC_AVX2_FN inline double hsum(__m256d v) {
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

// As block_scalar. With B = 4 and NV = 2 or 3 both passes are bound by the FMA units (per
// four entries and vector: four FMAs against two to three loads, and one store), and
// they fit the 16 vector registers.
template <int B, int NV>
GC_AVX2_FN void block_avx2(const double* v, std::size_t ldv, const double* T, int j, int mp,
                           double* const* xs) {
  double* x[NV];
  for (int c = 0; c < NV; ++c) x[c] = xs[c];
  const double* vi[B];
  for (int i = 0; i < B; ++i) vi[i] = v + sz(j + i) * ldv;
  const int r0 = j & ~3;
  __m256d acc[B][NV];
  for (int i = 0; i < B; ++i)
    for (int c = 0; c < NV; ++c) acc[i][c] = _mm256_setzero_pd();
  for (int r = r0; r < mp; r += 4) {
    __m256d xv[NV];
    for (int c = 0; c < NV; ++c) xv[c] = _mm256_load_pd(x[c] + r);
    for (int i = 0; i < B; ++i) {
      const __m256d vv = _mm256_load_pd(vi[i] + r);
      for (int c = 0; c < NV; ++c) acc[i][c] = _mm256_fmadd_pd(vv, xv[c], acc[i][c]);
    }
  }
  __m256d u[B][NV];
  for (int c = 0; c < NV; ++c) {
    double w[B];
    for (int i = 0; i < B; ++i) w[i] = hsum(acc[i][c]);
    for (int i = 0; i < B; ++i) {
      double s = 0.0;
      for (int p = 0; p <= i; ++p) s += T[p * kBlock + i] * w[p];
      u[i][c] = _mm256_set1_pd(s);
    }
  }
  for (int r = r0; r < mp; r += 4) {
    __m256d vv[B];
    for (int i = 0; i < B; ++i) vv[i] = _mm256_load_pd(vi[i] + r);
    for (int c = 0; c < NV; ++c) {
      __m256d xv = _mm256_load_pd(x[c] + r);
      for (int i = 0; i < B; ++i) xv = _mm256_fnmadd_pd(u[i][c], vv[i], xv);
      _mm256_store_pd(x[c] + r, xv);
    }
  }
}
#endif

bool have_avx2() {
#ifdef GC_HH_AVX2
  return cpu_vector_isa() != VectorIsa::none;
#else
  return false;
#endif
}

#ifdef GC_HH_AVX2
GC_AVX2_FN double dot_avx2(const double* a, const double* b, int n) {
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    s0 = _mm256_fmadd_pd(_mm256_loadu_pd(a + i), _mm256_loadu_pd(b + i), s0);
    s1 = _mm256_fmadd_pd(_mm256_loadu_pd(a + i + 4), _mm256_loadu_pd(b + i + 4), s1);
  }
  double s = hsum(_mm256_add_pd(s0, s1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// z[i] = W[i, :] . h, four rows at a time.
GC_AVX2_FN void gemv_avx2(const double* W, int n, int m, const double* h, double* z) {
  int i = 0;
  for (; i + 4 <= n; i += 4) {
    const double* w0 = W + sz(i) * sz(m);
    const double* w1 = w0 + m;
    const double* w2 = w1 + m;
    const double* w3 = w2 + m;
    __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
    int r = 0;
    for (; r + 4 <= m; r += 4) {
      const __m256d hv = _mm256_loadu_pd(h + r);
      a0 = _mm256_fmadd_pd(_mm256_loadu_pd(w0 + r), hv, a0);
      a1 = _mm256_fmadd_pd(_mm256_loadu_pd(w1 + r), hv, a1);
      a2 = _mm256_fmadd_pd(_mm256_loadu_pd(w2 + r), hv, a2);
      a3 = _mm256_fmadd_pd(_mm256_loadu_pd(w3 + r), hv, a3);
    }
    double s[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
    for (; r < m; ++r) {
      s[0] += w0[r] * h[r];
      s[1] += w1[r] * h[r];
      s[2] += w2[r] * h[r];
      s[3] += w3[r] * h[r];
    }
    for (int c = 0; c < 4; ++c) z[i + c] = s[c];
  }
  for (; i < n; ++i) z[i] = dot_avx2(W + sz(i) * sz(m), h, m);
}

// out[c * ldo + i] = d[i] x[i * ldx + c] (d = nullptr: ones) on the 4 x 4 block at (i, c).
GC_AVX2_FN void transpose4_avx2(const double* x, std::size_t ldx, const double* d, int i, int c,
                                double* out, std::size_t ldo) {
  const double* p = x + sz(i) * ldx + sz(c);
  const __m256d r0 = _mm256_loadu_pd(p), r1 = _mm256_loadu_pd(p + ldx);
  const __m256d r2 = _mm256_loadu_pd(p + 2 * ldx), r3 = _mm256_loadu_pd(p + 3 * ldx);
  const __m256d t0 = _mm256_unpacklo_pd(r0, r1), t1 = _mm256_unpackhi_pd(r0, r1);
  const __m256d t2 = _mm256_unpacklo_pd(r2, r3), t3 = _mm256_unpackhi_pd(r2, r3);
  __m256d col[4] = {_mm256_permute2f128_pd(t0, t2, 0x20), _mm256_permute2f128_pd(t1, t3, 0x20),
                    _mm256_permute2f128_pd(t0, t2, 0x31), _mm256_permute2f128_pd(t1, t3, 0x31)};
  if (d) {
    const __m256d dv = _mm256_loadu_pd(d + i);
    for (__m256d& v : col) v = _mm256_mul_pd(v, dv);
  }
  for (int q = 0; q < 4; ++q) _mm256_storeu_pd(out + sz(c + q) * ldo + sz(i), col[q]);
}
#endif

double dot(const double* a, const double* b, int n) {
#ifdef GC_HH_AVX2
  if (have_avx2()) return dot_avx2(a, b, n);
#endif
  double s = 0.0;
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// z = W h for the n x m row-major W.
void gemv(const double* W, int n, int m, const double* h, double* z) {
#ifdef GC_HH_AVX2
  if (have_avx2()) return gemv_avx2(W, n, m, h, z);
#endif
  for (int i = 0; i < n; ++i) {
    double s = 0.0;
    for (int r = 0; r < m; ++r) s += W[sz(i) * sz(m) + sz(r)] * h[r];
    z[i] = s;
  }
}

template <int B, int NV>
void block_apply(const double* v, std::size_t ldv, const double* T, int j, int mp,
                 double* const* x) {
#ifdef GC_HH_AVX2
  if (have_avx2()) return block_avx2<B, NV>(v, ldv, T, j, mp, x);
#endif
  block_scalar<B, NV>(v, ldv, T, j, mp, x);
}

template <int NV>
void block_apply_n(int B, const double* v, std::size_t ldv, const double* T, int j, int mp,
                   double* const* x) {
  switch (B) {
    case 4:
      block_apply<4, NV>(v, ldv, T, j, mp, x);
      break;
    case 3:
      block_apply<3, NV>(v, ldv, T, j, mp, x);
      break;
    case 2:
      block_apply<2, NV>(v, ldv, T, j, mp, x);
      break;
    default:
      block_apply<1, NV>(v, ldv, T, j, mp, x);
      break;
  }
}

// The B <= 4 reflectors from j, with their T, applied to the n vectors x + c ldx: in
// threes (fewer loads of v per FMA), except a QR panel's four columns, in pairs.
void apply_block(const double* v, std::size_t ldv, const double* T, int j, int B, int mp, double* x,
                 std::size_t ldx, int n) {
  int c = 0;
  if (n != 4) {
    for (; c + 3 <= n; c += 3) {
      double* p[3] = {x + sz(c) * ldx, x + sz(c + 1) * ldx, x + sz(c + 2) * ldx};
      block_apply_n<3>(B, v, ldv, T, j, mp, p);
    }
  }
  for (; c + 2 <= n; c += 2) {
    double* p[2] = {x + sz(c) * ldx, x + sz(c + 1) * ldx};
    block_apply_n<2>(B, v, ldv, T, j, mp, p);
  }
  if (c < n) {
    double* p[1] = {x + sz(c) * ldx};
    block_apply_n<1>(B, v, ldv, T, j, mp, p);
  }
}

// x_c <- H_{j1-1} ... H_{j0} x_c for the n vectors x_c = x + c ldx of padded length, j0
// and j1 on block boundaries (or j1 = f.k). Vectors go in groups of 15, which stay in the
// L1 cache while every block of reflectors passes over them.
void apply_frame(const Frame& f, int j0, int j1, double* x, std::size_t ldx, int n) {
  const int mp = static_cast<int>(padded(f.m));
  constexpr int kGroup = 15;  // five threes
  for (int c0 = 0; c0 < n; c0 += kGroup) {
    const int nc = std::min(kGroup, n - c0);
    for (int j = j0; j < j1; j += kBlock)
      apply_block(f.v, f.ldv, f.t + sz(j / kBlock) * kBlock * kBlock, j, std::min(kBlock, j1 - j),
                  mp, x + sz(c0) * ldx, ldx, nc);
  }
}

// LAPACK's dlarfg on x[0..len): writes v[0..len) (v[0] = 1) and tau such that
// (I - tau v v^T) x = (beta, 0, ...), and log|beta| to logabs (-inf for a zero vector, NaN
// for a non-finite one), exact at any scale: vectors outside [2^-500, 2^500] are brought
// into range by a power of two first.
void make_reflector(const double* x, int len, double* v, double& tau, double& logabs) {
  v[0] = 1.0;
  tau = 0.0;
  double ss = dot(x + 1, x + 1, len - 1);
  const double a0 = std::fabs(x[0]);
  int e = 0;
  // Squares in range and a moderate head (the usual case): no scaling. Otherwise look at
  // the entries themselves.
  if (!(ss >= 0x1p-900 && ss <= 0x1p900 && a0 <= 0x1p500)) {
    double mx = 0.0;
    for (int r = 1; r < len; ++r) mx = std::max(mx, std::fabs(x[r]));
    if (!std::isfinite(mx) || !std::isfinite(a0) || std::isnan(ss)) {
      logabs = std::numeric_limits<double>::quiet_NaN();
      std::fill(v + 1, v + len, 0.0);
      return;
    }
    if (mx == 0.0) {  // nothing below the diagonal: H = I
      logabs = a0 == 0.0 ? kNegInf : std::log(a0);
      std::fill(v + 1, v + len, 0.0);
      return;
    }
    const double amax = std::max(mx, a0);
    if (amax > 0x1p500 || amax < 0x1p-500 || !std::isfinite(ss)) {
      e = std::ilogb(amax);
      ss = 0.0;
      for (int r = 1; r < len; ++r) {
        const double y = std::ldexp(x[r], -e);
        ss += y * y;
      }
    }
  }
  const double alpha = std::ldexp(x[0], -e);
  const double beta = -std::copysign(std::hypot(alpha, std::sqrt(ss)), alpha);
  tau = (beta - alpha) / beta;
  const double inv = 1.0 / (alpha - beta);
  if (e == 0) {
    for (int r = 1; r < len; ++r) v[r] = x[r] * inv;
  } else {
    for (int r = 1; r < len; ++r) v[r] = std::ldexp(x[r], -e) * inv;
  }
  logabs = std::log(std::fabs(beta)) + double(e) * kLn2;
}

// Householder QR of the m x k matrix whose columns are the vectors a + c lda (k <= m,
// lda >= padded(m), zero padding), left-looking in panels of four columns: each panel
// receives the earlier blocks of reflectors, then is factored column by column. Fills the
// frame's storage (v: k rows of ldv >= padded(m); tau; t: one T per block) and logabs with
// log|R_jj|. `published`, if given, is set to base + the number of finished reflectors
// after each panel (for a thread applying them meanwhile). `cancel` is polled every 64
// columns (a full spectrum of width 2048 takes seconds per factorisation).
void householder_qr(double* a, std::size_t lda, int m, int k, double* v, std::size_t ldv,
                    double* tau, double* t, double* logabs,
                    std::atomic<long long>* published = nullptr, long long base = 0,
                    Canceller* cancel = nullptr) {
  const int mp = static_cast<int>(padded(m));
  const Frame f{v, ldv, tau, t, m, k};
  for (int p0 = 0; p0 < k; p0 += kBlock) {
    if (cancel && p0 % 64 == 0) cancel->poll();
    const int p1 = std::min(k, p0 + kBlock);
    apply_frame(f, 0, p0, a + sz(p0) * lda, lda, p1 - p0);
    for (int c = p0; c < p1; ++c) {
      double* vc = v + sz(c) * ldv;
      std::fill(vc, vc + c, 0.0);
      std::fill(vc + m, vc + ldv, 0.0);
      make_reflector(a + sz(c) * lda + sz(c), m - c, vc + c, tau[c], logabs[c]);
      const double tc[kBlock * kBlock] = {tau[c]};
      apply_block(v, ldv, tc, c, 1, mp, a + sz(c + 1) * lda, lda, p1 - c - 1);
    }
    block_t(v, ldv, tau, p0, p1 - p0, mp, t + sz(p0 / kBlock) * kBlock * kBlock);
    if (published) published->store(base + p1, std::memory_order_release);
  }
}

// out[c * ldo + i] = d[i] x[i * ldx + c] for c < k and i0 <= i < i1 (a scaled transpose,
// in 4 x 4 blocks; d = nullptr: ones).
void transpose_rows(const double* x, std::size_t ldx, const double* d, int i0, int i1, int k,
                    double* out, std::size_t ldo) {
  int i = i0;
#ifdef GC_HH_AVX2
  if (have_avx2()) {
    for (; i + 4 <= i1; i += 4) {
      int c = 0;
      for (; c + 4 <= k; c += 4) transpose4_avx2(x, ldx, d, i, c, out, ldo);
      for (; c < k; ++c)
        for (int q = i; q < i + 4; ++q)
          out[sz(c) * ldo + sz(q)] = (d ? d[q] : 1.0) * x[sz(q) * ldx + sz(c)];
    }
  }
#endif
  for (; i < i1; ++i)
    for (int c = 0; c < k; ++c)
      out[sz(c) * ldo + sz(i)] = (d ? d[i] : 1.0) * x[sz(i) * ldx + sz(c)];
}

void zero_padding(double* out, std::size_t ldo, int n, int k) {
  for (int c = 0; c < k; ++c) std::fill(out + sz(c) * ldo + sz(n), out + sz(c + 1) * ldo, 0.0);
}

// ilogb of the largest |x_i| (0 when x is zero or not finite).
int top_exponent(const double* x, std::size_t n) {
  double mx = 0.0;
  for (std::size_t i = 0; i < n; ++i) mx = std::max(mx, std::fabs(x[i]));
  return mx > 0.0 && std::isfinite(mx) ? std::ilogb(mx) : 0;
}

// ||x|| 2^s without overflow or underflow of the squares, where the result is in range.
double scaled_norm(const double* x, std::size_t n, int s) {
  const int e = top_exponent(x, n);
  double ss = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    const double y = std::ldexp(x[i], -e);
    ss += y * y;
  }
  return std::ldexp(std::sqrt(ss), e + s);
}

// Euclidean norm without overflow or underflow of the squares.
double safe_norm(const double* x, std::size_t n) {
  double mx = 0.0;
  for (std::size_t i = 0; i < n; ++i) mx = std::max(mx, std::fabs(x[i]));
  if (mx == 0.0 || !std::isfinite(mx)) return mx;
  double ss = 0.0;
  if (mx < 0x1p500 && mx > 0x1p-500) {
    for (std::size_t i = 0; i < n; ++i) ss += x[i] * x[i];
    return std::sqrt(ss);
  }
  const int e = std::ilogb(mx);
  for (std::size_t i = 0; i < n; ++i) {
    const double y = std::ldexp(x[i], -e);
    ss += y * y;
  }
  return std::ldexp(std::sqrt(ss), e);
}

// x *= 2^-e with 2^e <= max|x| < 2^(e+1): exact, and keeps every sign.
void rescale_pow2(double* x, int n) {
  double mx = 0.0;
  for (int i = 0; i < n; ++i) mx = std::max(mx, std::fabs(x[i]));
  if (mx > 0.0) {
    const int e = std::ilogb(mx);
    for (int i = 0; i < n; ++i) x[i] = std::ldexp(x[i], -e);
  }
}

std::string layer_msg(int l, int depth) {
  return "layer " + std::to_string(l) + " of " + std::to_string(depth);
}

}  // namespace

// ---- JacobianChain defaults ------------------------------------------------------------

int JacobianChain::dense(int l, double* J) const {
  const int n = dim(l), m = dim(l - 1);
  std::vector<double> eye(sz(m) * sz(m), 0.0), cols(sz(m) * sz(n));
  for (int j = 0; j < m; ++j) eye[sz(j) * sz(m) + sz(j)] = 1.0;
  apply(l, eye.data(), m, cols.data());  // row j of cols = J e_j
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < m; ++j) J[sz(i) * sz(m) + sz(j)] = cols[sz(j) * sz(n) + sz(i)];
  return 0;
}

double JacobianChain::log10_frobenius(int l) const {
  const std::size_t size = sz(dim(l)) * sz(dim(l - 1));
  std::vector<double> J(size);
  const int e = dense(l, J.data());
  const double nrm = safe_norm(J.data(), size);
  return nrm > 0.0 ? std::log10(nrm) + double(e) * kLog10Of2 : kNegInf;
}

const double* JacobianChain::row_form(int l, const double** d, std::vector<double>& storage) const {
  storage.resize(sz(dim(l)) * sz(dim(l - 1)));
  const int e = dense(l, storage.data());
  if (e != 0)
    for (double& a : storage) a = std::ldexp(a, e);
  *d = nullptr;
  return storage.data();
}

// ---- MLP layers ----------------------------------------------------------------------------

template <class T>
MLPLayers::MLPLayers(const Chain<T>& chain, bool row_norms) {
  const auto& blocks = chain.blocks();
  const bool shaped = blocks.size() % 2 == 0 && !blocks.empty();
  std::vector<const T*> w{nullptr}, b{nullptr};
  bool zero_bias = true;
  widths_.push_back(chain.in_width());
  for (std::size_t i = 0; shaped && i < blocks.size(); i += 2) {
    const auto* lin = dynamic_cast<const Linear<T>*>(blocks[i].get());
    const auto* act = dynamic_cast<const ActivationBlock<T>*>(blocks[i + 1].get());
    if (!lin || !act || !lin->has_bias() || (i > 0 && act->activation().kind != act_.kind))
      throw std::invalid_argument(
          "per-layer Jacobians need a chain of [Linear, Activation] layers with one activation");
    if (lin->drawn())
      throw std::invalid_argument(
          "per-layer Jacobians read every layer's weights: build the chain with "
          "store_weights=True (this one draws them for each pass)");
    act_ = act->activation();
    widths_.push_back(lin->out_width());
    w.push_back(lin->weight());
    b.push_back(lin->bias());
    zero_bias = zero_bias && lin->zero_bias();
  }
  if (!shaped)
    throw std::invalid_argument(
        "per-layer Jacobians need a chain of [Linear, Activation] layers with one activation");
  homog_ = act_.positively_homogeneous() && zero_bias;
  take(w, b, row_norms);
}

template <class T>
void MLPLayers::take(const std::vector<const T*>& wsrc, const std::vector<const T*>& bsrc,
                     bool row_norms) {
  const int L = depth();
  w_.assign(sz(L) + 1, nullptr);
  b_.assign(sz(L) + 1, nullptr);
  roff_.assign(sz(L) + 2, 0);
  std::size_t nw = 0, nb = 0;
  for (int l = 1; l <= L; ++l) {
    nw += sz(widths_[sz(l)]) * sz(widths_[sz(l) - 1]);
    nb += sz(widths_[sz(l)]);
    roff_[sz(l) + 1] = roff_[sz(l)] + sz(widths_[sz(l)]);
  }
  if constexpr (std::is_same_v<T, double>) {
    for (int l = 1; l <= L; ++l) {
      w_[sz(l)] = wsrc[sz(l)];
      b_[sz(l)] = bsrc[sz(l)];
    }
  } else {
    own_w_.resize(nw);
    own_b_.resize(nb);
    std::size_t wo = 0, bo = 0;
    for (int l = 1; l <= L; ++l) {
      const std::size_t n = sz(widths_[sz(l)]), mm = n * sz(widths_[sz(l) - 1]);
      std::copy(wsrc[sz(l)], wsrc[sz(l)] + mm, own_w_.begin() + static_cast<std::ptrdiff_t>(wo));
      std::copy(bsrc[sz(l)], bsrc[sz(l)] + n, own_b_.begin() + static_cast<std::ptrdiff_t>(bo));
      w_[sz(l)] = own_w_.data() + wo;
      b_[sz(l)] = own_b_.data() + bo;
      wo += mm;
      bo += n;
    }
  }
  wexp_.assign(sz(L) + 1, 0);
  for (int l = 1; l <= L; ++l)
    wexp_[sz(l)] = top_exponent(w_[sz(l)], sz(widths_[sz(l)]) * sz(widths_[sz(l) - 1]));
  if (!row_norms) return;
  rownorm_.resize(roff_.back());
#pragma omp parallel for schedule(static) \
    num_threads(team_threads(nw > 1000000 ? max_threads() : 1))
  for (int l = 1; l <= L; ++l) {
    const int n = widths_[sz(l)], m = widths_[sz(l) - 1];
    for (int i = 0; i < n; ++i)
      rownorm_[roff_[sz(l)] + sz(i)] = scaled_norm(w_[sz(l)] + sz(i) * sz(m), sz(m), -wexp_[sz(l)]);
  }
}

template MLPLayers::MLPLayers(const Chain<float>&, bool);
template MLPLayers::MLPLayers(const Chain<double>&, bool);

// ---- chains of blocks ----------------------------------------------------------------------

BlockJacobians::BlockJacobians(const Chain<double>& chain, const double* x, std::size_t rows,
                               bool train)
    : chain_(chain), rows_(rows), train_(train) {
  ChainRequest req;
  req.trace = true;
  req.forward_only = true;
  req.train = train;
  Canceller none;
  trace_ = std::make_unique<ChainResult<double>>(
      const_cast<Chain<double>&>(chain).backward(x, static_cast<int>(rows), req, none));
  const auto& steps = chain.plan().steps;
  for (std::size_t i = 0; i < steps.size(); ++i)
    steps_.emplace_back(steps[i].block, static_cast<int>(i));
  std::sort(steps_.begin(), steps_.end());
}

BlockJacobians::~BlockJacobians() = default;

int BlockJacobians::length() const {
  return static_cast<int>(chain_.size());
}

int BlockJacobians::dim(int l) const {
  const int w = l == 0 ? chain_.in_width() : chain_.block(sz(l) - 1).out_width();
  return static_cast<int>(rows_) * w;
}

int BlockJacobians::step_of(const Block<double>& b) const {
  const auto it = std::lower_bound(steps_.begin(), steps_.end(),
                                   std::make_pair(&b, std::numeric_limits<int>::min()));
  return it->second;
}

void BlockJacobians::jvp(const Block<double>& b, const double* v, int k, double* out) const {
  const std::size_t nin = rows_ * sz(b.in_width()), nout = rows_ * sz(b.out_width());
  if (const auto* r = dynamic_cast<const Residual<double>*>(&b)) {
    std::vector<double> t(v, v + sz(k) * nin), next;
    for (const auto& child : r->body()) {
      next.resize(sz(k) * rows_ * sz(child->out_width()));
      jvp(*child, t.data(), k, next.data());
      std::swap(t, next);
    }
    if (r->shortcut())
      jvp(*r->shortcut(), v, k, out);
    else
      std::copy(v, v + sz(k) * nout, out);
    for (std::size_t i = 0; i < sz(k) * nout; ++i) out[i] += r->scale() * t[i];
    return;
  }
  const auto& s = chain_.plan().steps[sz(step_of(b))];
  JacobianArgs<double> a;
  a.rows = rows_;
  a.x = trace_->trace_values[sz(s.in)].data();
  a.ex = trace_->trace_exps[sz(s.in)];
  a.y = trace_->trace_values[sz(s.out)].data();
  a.ey = trace_->trace_exps[sz(s.out)];
  a.train = train_;
  a.local = &trace_->trace_locals[sz(step_of(b))];
  std::vector<double> scratch(2 * sz(k) * rows_ * sz(std::max(b.in_width(), b.out_width())));
  a.scratch = scratch.data();
  b.jvp(a, v, k, out);
}

void BlockJacobians::vjp(const Block<double>& b, const double* u, int k, double* out) const {
  const std::size_t nin = rows_ * sz(b.in_width()), nout = rows_ * sz(b.out_width());
  if (const auto* r = dynamic_cast<const Residual<double>*>(&b)) {
    std::vector<double> t(sz(k) * nout), next;
    for (std::size_t i = 0; i < t.size(); ++i) t[i] = r->scale() * u[i];
    for (auto it = r->body().rbegin(); it != r->body().rend(); ++it) {
      next.resize(sz(k) * rows_ * sz((*it)->in_width()));
      vjp(**it, t.data(), k, next.data());
      std::swap(t, next);
    }
    if (r->shortcut())
      vjp(*r->shortcut(), u, k, out);
    else
      std::copy(u, u + sz(k) * nin, out);
    for (std::size_t i = 0; i < sz(k) * nin; ++i) out[i] += t[i];
    return;
  }
  const auto& s = chain_.plan().steps[sz(step_of(b))];
  JacobianArgs<double> a;
  a.rows = rows_;
  a.x = trace_->trace_values[sz(s.in)].data();
  a.ex = trace_->trace_exps[sz(s.in)];
  a.y = trace_->trace_values[sz(s.out)].data();
  a.ey = trace_->trace_exps[sz(s.out)];
  a.train = train_;
  a.local = &trace_->trace_locals[sz(step_of(b))];
  std::vector<double> scratch(2 * sz(k) * rows_ * sz(std::max(b.in_width(), b.out_width())));
  a.scratch = scratch.data();
  b.vjp(a, u, k, out);
}

void BlockJacobians::apply(int l, const double* v, int k, double* out) const {
  jvp(chain_.block(sz(l) - 1), v, k, out);
}

void BlockJacobians::apply_transpose(int l, const double* u, int k, double* out) const {
  vjp(chain_.block(sz(l) - 1), u, k, out);
}

MLPJacobians::MLPJacobians(const MLPLayers& layers, const double* x, bool lazy) : layers_(layers) {
  const int L = layers.depth();
  const auto& w = layers.widths();
  off_.assign(sz(L) + 2, 0);
  for (int l = 1; l <= L; ++l) off_[sz(l) + 1] = off_[sz(l)] + sz(w[sz(l)]);
  d_.resize(off_.back());
  const int maxw = *std::max_element(w.begin(), w.end());
  h_.assign(sz(maxw), 0.0);
  z_.resize(sz(maxw));
  hn_.resize(sz(maxw));
  std::copy(x, x + w[0], h_.begin());
  if (layers.log_scale_forward()) rescale_pow2(h_.data(), w[0]);
  if (!lazy) forward_to(L);
}

void MLPJacobians::forward_to(int last) const {
  const int L = layers_.depth();
  const auto& w = layers_.widths();
  const Activation& act = layers_.activation();
  const bool homog = layers_.log_scale_forward();
  for (int l = done_ + 1; l <= last; ++l) {
    const int n = w[sz(l)], m = w[sz(l) - 1];
    const double* W = layers_.weight(l);
    const double* b = layers_.bias(l);
    gemv(W, n, m, h_.data(), z_.data());
    for (int i = 0; i < n; ++i) z_[sz(i)] += b[i];
    auto check = [&](const std::vector<double>& a, const char* what) {
      for (int i = 0; i < n; ++i)
        if (!std::isfinite(a[sz(i)])) {
          const bool nan = std::isnan(a[sz(i)]);
          throw NonFiniteError("forward", l,
                               std::string("the forward pass ") +
                                   (nan ? "produced NaN" : "overflowed to inf") + " in " + what +
                                   " at " + layer_msg(l, L) +
                                   (nan ? "" : "; lower the gain, the weights or the input scale"));
        }
    };
    check(z_, "the pre-activation W h + b");
    act.forward(z_.data(), hn_.data(), sz(n));
    check(hn_, "the activation");
    double* d = d_.data() + off_[sz(l)];
    std::fill(d, d + n, 1.0);
    act.backward(z_.data(), hn_.data(), d, d, sz(n));
    if (homog) rescale_pow2(hn_.data(), n);
    std::swap(h_, hn_);
    done_ = l;
  }
}

void MLPJacobians::apply(int l, const double* v, int k, double* out) const {
  const int n = dim(l), m = dim(l - 1);
  blas::gemm(blas::Trans::N, blas::Trans::T, k, n, m, 1.0, v, m, layers_.weight(l), m, 0.0, out, n);
  const double* d = derivative(l);
  for (int c = 0; c < k; ++c) {
    double* o = out + sz(c) * sz(n);
    for (int i = 0; i < n; ++i) o[i] *= d[i];
  }
}

void MLPJacobians::apply_transpose(int l, const double* u, int k, double* out) const {
  const int n = dim(l), m = dim(l - 1);
  const double* d = derivative(l);
  std::vector<double> du(sz(k) * sz(n));
  for (int c = 0; c < k; ++c)
    for (int i = 0; i < n; ++i) du[sz(c) * sz(n) + sz(i)] = u[sz(c) * sz(n) + sz(i)] * d[i];
  blas::gemm(blas::Trans::N, blas::Trans::N, k, m, n, 1.0, du.data(), n, layers_.weight(l), m, 0.0,
             out, m);
}

bool MLPJacobians::dense_needed(int l) const {
  return top_exponent(derivative(l), sz(dim(l))) + layers_.weight_exponent(l) <= -900;
}

int MLPJacobians::dense(int l, double* J) const {
  const int n = dim(l), m = dim(l - 1);
  const double* W = layers_.weight(l);
  const double* d = derivative(l);
  const int ed = top_exponent(d, sz(n)), ew = layers_.weight_exponent(l);
  // (Entries that overflow stay inf: rescale_dense reports them.)
  if (ed + ew > -900) {
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < m; ++j) J[sz(i) * sz(m) + sz(j)] = d[i] * W[sz(i) * sz(m) + sz(j)];
    return 0;
  }
  // Products formed where they lie would lose the bits a subnormal cannot hold: both
  // factors go to about 1 first, exactly, and 2^(ed + ew) is returned.
  for (int i = 0; i < n; ++i) {
    const double di = std::ldexp(d[i], -ed);
    for (int j = 0; j < m; ++j)
      J[sz(i) * sz(m) + sz(j)] = di * std::ldexp(W[sz(i) * sz(m) + sz(j)], -ew);
  }
  return ed + ew;
}

double MLPJacobians::log10_frobenius(int l) const {
  // ||diag(d) W||_F^2 = sum_i d_i^2 ||W[i, :]||^2, from the row norms: O(width). Each
  // d_i ||W[i, :]|| is held as mantissa * 2^exponent, as it may lie beyond the double range.
  const int n = dim(l);
  const double* d = derivative(l);
  const double* r = layers_.row_norms(l);
  int emax = std::numeric_limits<int>::min();
  for (int i = 0; i < n; ++i) {
    if (d[i] == 0.0 || r[i] == 0.0) continue;
    int ed = 0, er = 0;
    std::frexp(d[i], &ed);
    std::frexp(r[i], &er);
    emax = std::max(emax, ed + er);
  }
  if (emax == std::numeric_limits<int>::min()) return kNegInf;
  double ss = 0.0;
  for (int i = 0; i < n; ++i) {
    if (d[i] == 0.0 || r[i] == 0.0) continue;
    int ed = 0, er = 0;
    const double md = std::frexp(d[i], &ed), mr = std::frexp(r[i], &er);
    const double t = std::ldexp(md * mr, ed + er - emax);
    ss += t * t;
  }
  return 0.5 * std::log10(ss) + double(emax + layers_.weight_exponent(l)) * kLog10Of2;
}

const double* MLPJacobians::row_form(int l, const double** d, std::vector<double>&) const {
  *d = derivative(l);
  return layers_.weight(l);
}

// ---- norms ---------------------------------------------------------------------------------

void NormsOptions::validate() const {
  if (!(tol > 0.0) || !std::isfinite(tol))
    throw std::invalid_argument("tol must be a positive finite number; got " + std::to_string(tol));
  if (max_iter < 1)
    throw std::invalid_argument("max_iter must be a positive integer; got " +
                                std::to_string(max_iter));
  if (exact_max_dim < 0)
    throw std::invalid_argument("exact_max_dim must be >= 0; got " + std::to_string(exact_max_dim));
}

namespace {

[[noreturn]] void throw_nonfinite_jacobian(int l, int L) {
  throw NonFiniteError("jacobian", l,
                       "the Jacobian of " + layer_msg(l, L) +
                           " has entries beyond the float range (phi'(z) times the weights "
                           "overflows); lower the weights or the activation's parameters");
}

// J *= 2^-e with 2^e <= max|J| < 2^(e+1), exactly; returns e (0 for J = 0). Throws
// NonFiniteError when an entry is not finite.
int rescale_dense(std::vector<double>& J, int l, int L) {
  double mx = 0.0;
  for (const double a : J) {
    if (!std::isfinite(a)) throw_nonfinite_jacobian(l, L);
    mx = std::max(mx, std::fabs(a));
  }
  if (mx == 0.0) return 0;
  const int e = std::ilogb(mx);
  for (double& a : J) a = std::ldexp(a, -e);
  return e;
}

// Largest singular value by power iteration on J^T J from a seeded random start. The
// estimate ||J^T u|| / ||u||, u = J v, is a lower bound that rises to sigma_max; iteration
// stops when it moves by less than tol relative.
void power_iteration(const JacobianChain& chain, int l, const NormsOptions& opt, LayerNorms& out,
                     Canceller* cancel) {
  const int n = chain.dim(l), m = chain.dim(l - 1);
  std::vector<double> v(sz(m)), u(sz(n));
  fill_normal(Philox(kPowerSeed), static_cast<std::uint64_t>(l), v.data(),
              static_cast<std::uint64_t>(m));
  double nv = safe_norm(v.data(), sz(m));
  for (double& a : v) a /= nv;
  double est = 0.0;
  out.converged = false;
  for (int it = 1; it <= opt.max_iter; ++it) {
    if (cancel) cancel->poll();
    chain.apply(l, v.data(), 1, u.data());
    const double nu = safe_norm(u.data(), sz(n));
    if (!std::isfinite(nu)) throw_nonfinite_jacobian(l, chain.length());
    out.iterations = it;
    if (nu == 0.0) {  // v in the null space: J = 0 unless the start was unlucky
      est = 0.0;
      out.converged = true;
      break;
    }
    for (double& a : u) a /= nu;
    chain.apply_transpose(l, u.data(), 1, v.data());
    const double next = safe_norm(v.data(), sz(m));
    if (!std::isfinite(next)) throw_nonfinite_jacobian(l, chain.length());
    for (double& a : v) a /= next;
    const bool done = std::fabs(next - est) <= opt.tol * next;
    est = next;
    if (done) {
      out.converged = true;
      break;
    }
  }
  out.log10_spectral = est > 0.0 ? std::log10(est) : kNegInf;
}

}  // namespace

namespace {

// Step l of a chain as its dense n x m matrix, for power iteration on chains whose apply()
// would form that matrix anew on every call.
class DenseStep final : public JacobianChain {
 public:
  DenseStep(const double* J, int l, int n, int m) : J_(J), l_(l), n_(n), m_(m) {}
  int length() const override { return l_; }
  int dim(int j) const override { return j == l_ ? n_ : m_; }
  void apply(int, const double* v, int k, double* out) const override {
    blas::gemm(blas::Trans::N, blas::Trans::T, k, n_, m_, 1.0, v, m_, J_, m_, 0.0, out, n_);
  }
  void apply_transpose(int, const double* u, int k, double* out) const override {
    blas::gemm(blas::Trans::N, blas::Trans::N, k, m_, n_, 1.0, u, n_, J_, m_, 0.0, out, m_);
  }

 private:
  const double* J_;
  int l_, n_, m_;
};

}  // namespace

void jacobian_norms(const JacobianChain& chain, const NormsOptions& opt, LayerNorms* out,
                    Canceller* cancel, int threads) {
  const int L = chain.length();
  const bool native = chain.dense_native();
  struct Scratch {
    std::vector<double> J, s;
  };
  // Layers are independent: with threads > 1 they are shared out.
  parallel_indices<Scratch>(1, L + 1, threads, cancel, [&](int l, Scratch& w) {
    LayerNorms& r = out[l - 1];
    r = LayerNorms{};
    const int n = chain.dim(l), m = chain.dim(l - 1);
    const bool exact = opt.spectral && std::max(n, m) <= opt.exact_max_dim;
    const bool form = native || exact || (opt.spectral && chain.dense_needed(l));
    // A chain whose own norms and products go through dense() has it formed once here,
    // scaled by a power of two (exactly) so that neither its norms nor the SVD's
    // intermediate values leave the double range; log10 2^e is added back to every norm.
    double shift = 0.0;
    if (form) {
      w.J.resize(sz(n) * sz(m));
      const int e = chain.dense(l, w.J.data());
      shift = double(e + rescale_dense(w.J, l, L)) * kLog10Of2;
    }
    if (native) {
      const double nrm = safe_norm(w.J.data(), w.J.size());
      r.log10_frobenius = nrm > 0.0 ? std::log10(nrm) + shift : kNegInf;
    } else {
      r.log10_frobenius = chain.log10_frobenius(l);
    }
    r.log10_spectral = std::numeric_limits<double>::quiet_NaN();
    bool done = !opt.spectral;
    if (exact) {
      w.s.resize(sz(std::min(n, m)));
      if (blas::singular_values(n, m, w.J.data(), m, w.s.data()) == 0) {
        r.log10_spectral = w.s[0] > 0.0 ? std::log10(w.s[0]) + shift : kNegInf;
        done = true;
      } else {
        // The SVD did not converge (it overwrote J): power iteration decides instead.
        chain.dense(l, w.J.data());
        rescale_dense(w.J, l, L);
      }
    }
    if (!done) {
      if (form) {
        power_iteration(DenseStep(w.J.data(), l, n, m), l, opt, r, cancel);
        if (std::isfinite(r.log10_spectral)) r.log10_spectral += shift;
      } else {
        power_iteration(chain, l, opt, r, cancel);
      }
    }
  });
}

// ---- QR spectrum ---------------------------------------------------------------------------

SpectrumStart SpectrumOptions::parse_start(const std::string& name) {
  static const std::vector<std::string> names = {"identity", "random"};
  return static_cast<SpectrumStart>(parse_name("start", name, names));
}

void SpectrumOptions::validate(const std::vector<int>& dims) const {
  if (dims.size() < 2) throw std::invalid_argument("the chain has no steps");
  const int kmax = *std::min_element(dims.begin(), dims.end());
  if (k < 1 || k > kmax)
    throw std::invalid_argument("k must be between 1 and the smallest width, " +
                                std::to_string(kmax) + "; got " + std::to_string(k));
  if (interval < 1)
    throw std::invalid_argument("interval must be a positive integer; got " +
                                std::to_string(interval));
}

std::vector<int> spectrum_depths(int length, int interval) {
  std::vector<int> out;
  for (int l = interval; l <= length; l += interval) out.push_back(l);
  if (out.empty() || out.back() != length) out.push_back(length);
  return out;
}

namespace {

// One example's QR spectrum: buffers and the steps of a layer.
class QRRun {
 public:
  QRRun(const JacobianChain& chain, const SpectrumOptions& opt, double* S)
      : chain_(chain), opt_(opt), S_(S), L_(chain.length()), k_(opt.k) {
    dims_.resize(sz(L_) + 1);
    for (int l = 0; l <= L_; ++l) dims_[sz(l)] = chain.dim(l);
    opt.validate(dims_);
    ld_ = padded(*std::max_element(dims_.begin(), dims_.end()));
    const std::size_t nt = sz((k_ + kBlock - 1) / kBlock) * kBlock * kBlock;
    a_ = aligned_in(abuf_, sz(k_) * ld_);
    next_ = aligned_in(nextbuf_, sz(k_) * ld_);
    rows_ = aligned_in(rowbuf_, ld_ * ld_);
    v_ = aligned_in(vbuf_, sz(k_) * ld_);
    tau_.resize(sz(k_));
    t_.resize(nt);
    logabs_.resize(sz(k_));
    acc_.assign(sz(k_), 0.0);
    colexp_.assign(sz(k_), 0);
    frame_.m = dims_[0];
    if (opt.start == SpectrumStart::random) {
      const std::size_t ld0 = padded(dims_[0]);
      double* g = aligned_in(compact_, sz(k_) * ld0);
      double* v0 = aligned_in(v0buf_, sz(k_) * ld0);
      tau0_.resize(sz(k_));
      t0_.resize(nt);
      for (int c = 0; c < k_; ++c)
        fill_normal(Philox(opt.seed), static_cast<std::uint64_t>(c), g + sz(c) * ld0,
                    static_cast<std::uint64_t>(dims_[0]));
      householder_qr(g, ld0, dims_[0], k_, v0, ld0, tau0_.data(), t0_.data(), logabs_.data());
      frame_ = Frame{v0, ld0, tau0_.data(), t0_.data(), dims_[0], k_};
    }
  }

  // Layers from..L, one thread; with `built`, a_ already holds layer from's vectors.
  void run_sequential(Canceller* cancel, int from = 1, bool built = false) {
    cancel_ = cancel;
    bool explicit_frame = false;  // a holds J_l ... J_{l'} Q_{l'-1}, not re-orthonormalised
    for (int l = from; l <= L_; ++l) {
      if (built && l == from) {
        // vectors of this layer were made by run_pipelined
      } else if (explicit_frame) {
        multiply(l);
      } else {
        rotate(l, row_form(l, 0), 0, dims_[sz(l)], a_);
      }
      if (l % opt_.interval == 0 || l == L_) {
        factor(l, a_, nullptr, 0);
        explicit_frame = false;
      } else if (nonzero_rows(a_, dims_[sz(l)]) < k_) {
        // Rank lost to zero rows shows as exact zeros on R's diagonal only in a QR of this
        // layer's vectors; the values do not depend on where QRs happen.
        factor(l, a_, nullptr, 0, false);
        explicit_frame = false;
      } else {
        renormalise(l);
        explicit_frame = true;
      }
      if (cancel) cancel->poll();
    }
  }

  // Two threads, re-orthonormalising at every layer: while thread 0 factors layer l,
  // thread 1 applies each finished block of its reflectors to most rows of B_{l+1}; thread 0
  // then does the remaining rows, and they meet. The split starts from the flop counts
  // and follows the measured finishing times (the factorisation runs at a lower
  // rate than the row updates, and other processes may take either core for a while).
  // When meeting keeps costing more than the work (another process holding one of the
  // cores makes each meeting wait for a time slice), the rest runs on one thread.
  void run_pipelined(Canceller* cancel) {
    cancel_ = cancel;
#ifdef _OPENMP
    double* bufs[2] = {a_, next_};
    rotate(1, row_form(1, 0), 0, dims_[1], bufs[1]);
    // Reflectors finished so far, counted over all layers: layer l's j-th is (l-1) k + j.
    std::atomic<long long> published{0};
    std::atomic<bool> abort{false};
    std::exception_ptr error;
    RowForm next, upcoming;       // B_{l+1} and B_{l+2} during layer l
    int split = 0, stop_at = 0;   // stop_at: first layer left to run_sequential (0: none)
    double busy[2] = {0.0, 0.0};  // each thread's time from the layer's start to the barrier
    double row_time = 0.0;
    unsigned slow = 0;  // one bit per layer, the last layer lowest
    Clock::time_point start = Clock::now();
    if (L_ >= 2) {
      next = row_form(2, 0);
      split = next_split(1, -1, busy, row_time);
    }
#pragma omp parallel num_threads(team_threads(2))
    {
      const int me = omp_get_thread_num();
      for (int l = 1; l <= L_; ++l) {
        if (abort.load() || stop_at > 0) break;
        double* cur = bufs[l % 2];
        double* nxt = bufs[(l + 1) % 2];
        const int n1 = l < L_ ? dims_[sz(l) + 1] : 0;
        const long long base = static_cast<long long>(l - 1) * k_;
        try {
          if (me == 0) {
            try {
              factor(l, cur, &published, base);
            } catch (...) {
              published.store(base + k_, std::memory_order_release);  // releases thread 1
              throw;
            }
            if (l < L_) {
              const Clock::time_point t = Clock::now();
              rotate(l + 1, next, 0, split, nxt);
              if (split > 0) row_time = seconds(t, Clock::now()) / split;
            }
            // The layer after next (its forward step, for MLPJacobians): counted in
            // thread 0's time, so that the split makes room for it.
            if (l + 1 < L_) upcoming = row_form(l + 2, l % 2);
            if (cancel) cancel->poll();
          } else if (l < L_ && split < n1) {
            const int m = dims_[sz(l)];
            const std::size_t mp = padded(m);
            load_rows(next, m, split, n1);
            const Frame f{v_, ld_, tau_.data(), t_.data(), m, k_};
            for (int j = 0; j < k_ && !abort.load(std::memory_order_relaxed);) {
              long long r;
              for (int spins = 0; (r = published.load(std::memory_order_acquire)) <= base + j;
                   ++spins)
                spin(spins);
              const int j1 = static_cast<int>(r - base);
              apply_frame(f, j, j1, rows_ + sz(split) * mp, mp, n1 - split);
              j = j1;
            }
            transpose_rows(rows_, mp, next.d, split, n1, k_, nxt, ld_);
          }
        } catch (...) {
#pragma omp critical(gradchain_qr_error)
          if (!error) error = std::current_exception();
          abort.store(true);
        }
        busy[me] = seconds(start, Clock::now());
#pragma omp barrier
#pragma omp master
        {
          // A layer is slow when meeting took more than half its time; most of the last
          // 16 being slow means a core is taken (one slow layer is a passing hiccup).
          const Clock::time_point now = Clock::now();
          const double w = seconds(start, now);
          slow = (slow << 1) | (w - std::max(busy[0], busy[1]) > 0.5 * w ? 1u : 0u);
          int recent = 0;
          for (unsigned bits = slow & 0xffffu; bits; bits &= bits - 1) ++recent;
          if (row_time <= 0.0 && l < L_ && dims_[sz(l) + 1] > split)
            row_time = busy[1] / (dims_[sz(l) + 1] - split);  // thread 1's, waits included
          if (l >= 16 && l < L_ && recent > 8) stop_at = l + 1;
          if (l + 1 < L_) {
            next = upcoming;
            split = next_split(l + 1, split, busy, row_time);
          }
          start = Clock::now();
        }
#pragma omp barrier
      }
    }
    if (error) std::rethrow_exception(error);
    if (stop_at > 0) {
      a_ = bufs[stop_at % 2];  // holds layer stop_at's vectors
      next_ = bufs[(stop_at + 1) % 2];
      run_sequential(cancel, stop_at, true);
    }
#else
    run_sequential(cancel);
#endif
  }

 private:
  struct RowForm {
    const double* B = nullptr;
    const double* d = nullptr;
  };

  RowForm row_form(int l, int which) {
    RowForm r;
    r.B = chain_.row_form(l, &r.d, storage_[which]);
    return r;
  }

  // Busy-waits a few microseconds, then gives the core away (another process may hold
  // the core that thread 0 needs).
  static void spin(int spins) {
    if (spins > 2000) {
      std::this_thread::yield();
      return;
    }
#ifdef GC_HH_AVX2
    _mm_pause();
#endif
  }

  using Clock = std::chrono::steady_clock;
  static double seconds(Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration<double>(b - a).count();
  }

  // Rows of B_{l+1} that thread 0 takes after factoring layer l. First (or when the shapes
  // change) from the multiply-adds, (n' w - W_qr) / (2 w) with w per row; then moved by
  // half the gap between the two threads' finishing times of the last layer, in rows.
  int next_split(int l, int last, const double* done, double row_time) const {
    const double n = dims_[sz(l)], n1 = dims_[sz(l) + 1], k = k_;
    const bool same_shape =
        l >= 2 && dims_[sz(l) - 1] == dims_[sz(l)] && dims_[sz(l) + 1] == dims_[sz(l)];
    double r;
    if (last >= 0 && same_shape && row_time > 0.0) {
      const double step = std::clamp((done[1] - done[0]) / (2.0 * row_time), -4.0, 4.0);
      r = last + std::round(step);
    } else {
      const double wqr = 2.0 * n * k * k - 2.0 / 3.0 * k * k * k;
      const double wrow = 4.0 * k * n - 2.0 * k * k;
      r = std::round((n1 * wrow - wqr) / (2.0 * wrow));
    }
    return static_cast<int>(std::clamp(r, 0.0, n1));
  }

  // Rows [i0, i1) of B (m columns) into rows_, padded.
  void load_rows(const RowForm& rf, int m, int i0, int i1) {
    const std::size_t mp = padded(m);
    for (int i = i0; i < i1; ++i) {
      std::copy(rf.B + sz(i) * sz(m), rf.B + sz(i + 1) * sz(m), rows_ + sz(i) * mp);
      std::fill(rows_ + sz(i) * mp + sz(m), rows_ + sz(i + 1) * mp, 0.0);
    }
  }

  // Rows [i0, i1) of J_l Q_{l-1} into out (as entries i0..i1 of its k vectors): row i of
  // B Q is (H_{k-1} ... H_0 B[i, :]^T)^T, of which the first k entries are wanted.
  void rotate(int l, const RowForm& rf, int i0, int i1, double* out) {
    const int n = dims_[sz(l)], m = dims_[sz(l) - 1];
    if (frame_.k == 0) {
      transpose_rows(rf.B, sz(m), rf.d, i0, i1, k_, out, ld_);
    } else {
      // Rows are independent: a few hundred at a time, with a poll between them.
      constexpr int kRowsPerPoll = 240;  // whole groups of apply_frame's 15
      const std::size_t mp = padded(m);
      for (int r0 = i0; r0 < i1; r0 += kRowsPerPoll) {
        const int r1 = std::min(i1, r0 + kRowsPerPoll);
        if (cancel_ && r0 > i0) cancel_->poll();
        load_rows(rf, m, r0, r1);
        apply_frame(frame_, 0, k_, rows_ + sz(r0) * mp, mp, r1 - r0);
        transpose_rows(rows_, mp, rf.d, r0, r1, k_, out, ld_);
      }
    }
    if (i1 == n || i0 == 0) zero_padding(out, ld_, n, k_);
  }

  // a <- J_l a through apply(), between re-orthonormalisations.
  void multiply(int l) {
    const int n = dims_[sz(l)], m = dims_[sz(l) - 1];
    compact_.resize(sz(k_) * sz(m));
    compact2_.resize(sz(k_) * sz(n));
    for (int c = 0; c < k_; ++c)
      std::copy(a_ + sz(c) * ld_, a_ + sz(c) * ld_ + sz(m),
                compact_.begin() + static_cast<std::ptrdiff_t>(sz(c) * sz(m)));
    chain_.apply(l, compact_.data(), k_, compact2_.data());
    for (int c = 0; c < k_; ++c)
      std::copy(compact2_.begin() + static_cast<std::ptrdiff_t>(sz(c) * sz(n)),
                compact2_.begin() + static_cast<std::ptrdiff_t>(sz(c + 1) * sz(n)),
                a_ + sz(c) * ld_);
    zero_padding(a_, ld_, n, k_);
  }

  // Each vector is renormalised by a power of two: scaling a column of M Q_0 scales R_cc
  // alone (the QR factorisation of A D is Q (R D)), exactly.
  void renormalise(int l) {
    const int n = dims_[sz(l)];
    for (int c = 0; c < k_; ++c) {
      double* col = a_ + sz(c) * ld_;
      double mx = 0.0;
      for (int i = 0; i < n; ++i) mx = std::max(mx, std::fabs(col[i]));
      if (!std::isfinite(mx))
        throw NonFiniteError("jacobian", l,
                             "the product of Jacobians became non-finite at " + layer_msg(l, L_) +
                                 "; lower interval");
      if (mx > 0.0) {
        const int e = std::ilogb(mx);
        for (int i = 0; i < n; ++i) col[i] = std::ldexp(col[i], -e);
        colexp_[sz(c)] += e;
      }
    }
  }

  // How many of the first n entries are nonzero in at least one of the k vectors in a,
  // counted up to k: with r < k such rows, at most r of the R_ii are nonzero (the QR of
  // the vectors is that of their r nonzero rows, which has r rows).
  int nonzero_rows(const double* a, int n) const {
    int r = 0;
    for (int i = 0; i < n && r < k_; ++i)
      for (int c = 0; c < k_; ++c)
        if (a[sz(c) * ld_ + sz(i)] != 0.0) {
          ++r;
          break;
        }
    return r;
  }

  // QR of the k vectors in a; the log|R_ii| go to the running sums and, with `record`, to
  // S's next row.
  void factor(int l, double* a, std::atomic<long long>* published, long long base,
              bool record = true) {
    const int n = dims_[sz(l)];
    const int rank = nonzero_rows(a, n);
    householder_qr(a, ld_, n, k_, v_, ld_, tau_.data(), t_.data(), logabs_.data(), published, base,
                   cancel_);
    int zero = 0;  // directions whose vector is exactly zero in its own place
    for (int c = 0; c < k_; ++c) {
      const double g = logabs_[sz(c)];
      if (std::isnan(g) || g == std::numeric_limits<double>::infinity())
        throw NonFiniteError("jacobian", l,
                             "the product of Jacobians became non-finite at " + layer_msg(l, L_) +
                                 (opt_.interval > 1 ? "; lower interval" : ""));
      zero += g == kNegInf ? 1 : 0;
    }
    // With `rank` nonzero rows at most `rank` of the R_ii are nonzero. The exact zeros count
    // towards that loss; the rest of it is taken from the last directions, where rounding
    // leaves about eps |R| in place of the exact 0.
    for (int c = k_ - 1, extra = k_ - rank - zero; c >= 0 && extra > 0; --c)
      if (logabs_[sz(c)] != kNegInf) {
        logabs_[sz(c)] = kNegInf;
        --extra;
      }
    for (int c = 0; c < k_; ++c) {
      acc_[sz(c)] += logabs_[sz(c)] + double(colexp_[sz(c)]) * kLn2;
      colexp_[sz(c)] = 0;
    }
    if (record) {
      std::copy(acc_.begin(), acc_.end(), S_ + row_ * sz(k_));
      ++row_;
    }
    frame_ = Frame{v_, ld_, tau_.data(), t_.data(), n, k_};
  }

  const JacobianChain& chain_;
  const SpectrumOptions& opt_;
  Canceller* cancel_ = nullptr;
  double* S_;
  int L_, k_;
  std::vector<int> dims_;
  std::size_t ld_ = 0, row_ = 0;
  // a: the k vectors of the current layer (next: of the following one, pipelined); rows:
  // B_l's rows with reflectors applied; v, tau, t: the last factorisation (v0...: the
  // random start's).
  std::vector<double> abuf_, nextbuf_, rowbuf_, vbuf_, v0buf_, compact_, compact2_;
  std::vector<double> storage_[2];
  double *a_ = nullptr, *next_ = nullptr, *rows_ = nullptr, *v_ = nullptr;
  std::vector<double> tau_, t_, tau0_, t0_, logabs_, acc_;
  std::vector<std::int64_t> colexp_;
  Frame frame_;
};

}  // namespace

void qr_spectrum(const JacobianChain& chain, const SpectrumOptions& opt, double* S,
                 Canceller* cancel, int threads) {
  QRRun run(chain, opt, S);
  // Two threads meet twice per layer; below about a million flops per layer (some 40 us)
  // that costs more than it saves, and far more when other processes take the cores.
  const int L = chain.length();
  double flops = 0.0;
  for (int l = 1; l <= L; ++l) {
    const double n = chain.dim(l), m = chain.dim(l - 1), k = opt.k;
    flops += 4.0 * n * m * k + 2.0 * n * k * k;
  }
  if (threads >= 2 && opt.interval == 1 && L >= 2 && flops >= kPipelineFlops * L)
    run.run_pipelined(cancel);
  else
    run.run_sequential(cancel);
}

// ---- batches -------------------------------------------------------------------------------

namespace {

// Runs body(example, cancel) over the batch: examples split across the core's threads with
// one BLAS thread each (the products are small); every thread polls the canceller. The first
// failing example's exception (lowest index) is rethrown, with the example named.
template <class F>
void for_each_example(int batch, Canceller& cancel, F&& body) {
  BlasThreads one(1);
  struct None {};
  parallel_indices<None>(0, batch, std::min(batch, max_threads()), &cancel, [&](int e, None&) {
    try {
      body(e, &cancel);
    } catch (const NonFiniteError& err) {
      throw NonFiniteError(err.where(), err.index(),
                           std::string(err.what()) + " (example " + std::to_string(e) + ")");
    }
  });
}

}  // namespace

BatchNorms batch_jacobian_norms(int batch, int length, const JacobianFactory& make,
                                const NormsOptions& opt, Canceller& cancel) {
  if (batch <= 0)
    throw std::invalid_argument("batch must be positive; got " + std::to_string(batch));
  opt.validate();
  const std::size_t cells = sz(batch) * sz(length);
  BatchNorms out;
  out.log10_frobenius.resize(cells);
  out.log10_spectral.resize(cells);
  out.iterations.resize(cells);
  out.converged.resize(cells);
  // A batch smaller than the thread count shares out each example's layers instead.
  const int per_example = batch < max_threads() ? max_threads() : 1;
  for_each_example(batch, cancel, [&](int e, Canceller* c) {
    const std::unique_ptr<JacobianChain> jac = make(e, false);
    std::vector<LayerNorms> r(sz(length));
    jacobian_norms(*jac, opt, r.data(), c, per_example);
    for (int l = 0; l < length; ++l) {
      const std::size_t i = sz(e) * sz(length) + sz(l);
      out.log10_frobenius[i] = r[sz(l)].log10_frobenius;
      out.log10_spectral[i] = r[sz(l)].log10_spectral;
      out.iterations[i] = r[sz(l)].iterations;
      out.converged[i] = r[sz(l)].converged ? 1 : 0;
    }
  });
  return out;
}

std::vector<double> batch_qr_spectrum(int batch, const std::vector<int>& dims,
                                      const JacobianFactory& make, const SpectrumOptions& opt,
                                      Canceller& cancel) {
  if (batch <= 0)
    throw std::invalid_argument("batch must be positive; got " + std::to_string(batch));
  opt.validate(dims);
  const int L = static_cast<int>(dims.size()) - 1;
  const std::size_t nd = spectrum_depths(L, opt.interval).size();
  const std::size_t per = nd * sz(opt.k);
  std::vector<double> S(sz(batch) * per);
  if (batch == 1 && max_threads() >= 2) {
    // One example: its two threads share each layer (run_pipelined).
    BlasThreads one(1);
    const std::unique_ptr<JacobianChain> jac = make(0, true);
    qr_spectrum(*jac, opt, S.data(), &cancel, 2);
    return S;
  }
  for_each_example(batch, cancel, [&](int e, Canceller* c) {
    const std::unique_ptr<JacobianChain> jac = make(e, true);
    qr_spectrum(*jac, opt, S.data() + sz(e) * per, c);
  });
  return S;
}

namespace {

// LAPACK's gesdd without vectors: its documented minimum workspace, room for the blocked
// routines' larger one, and the integer workspace.
double svd_workspace_bytes(double n, double m) {
  const double mn = std::min(n, m), mx = std::max(n, m);
  return (3 * mn + std::max(mx, 7 * mn) + 64 * (n + m)) * sizeof(double) + 8 * mn * sizeof(int);
}

int examples_at_once(int batch) {
  return std::max(1, std::min(batch, max_threads()));
}

}  // namespace

double batch_norms_bytes(int batch, const std::vector<int>& dims, const NormsOptions& opt,
                         double example_bytes, bool dense) {
  const double L = double(dims.size()) - 1;
  const int threads = max_threads();
  const double per_example = batch < threads ? threads : 1;
  double scratch = 0;  // one thread's, at the largest step
  for (std::size_t l = 1; l < dims.size(); ++l) {
    const double n = dims[l], m = dims[l - 1];
    const bool exact = opt.spectral && std::max(n, m) <= opt.exact_max_dim;
    double b = 0;
    if (dense || exact) b += n * m * sizeof(double);
    if (exact) b += svd_workspace_bytes(n, m);
    if (opt.spectral && !exact) b += 3 * (n + m) * sizeof(double);  // power iteration
    scratch = std::max(scratch, b);
  }
  const double result = double(batch) * L * 21;  // two doubles, an int32 and a flag per cell
  return result +
         examples_at_once(batch) * (example_bytes + L * sizeof(LayerNorms) + per_example * scratch);
}

double batch_spectrum_bytes(int batch, const std::vector<int>& dims, const SpectrumOptions& opt,
                            double example_bytes, bool dense) {
  const double k = opt.k, L = double(dims.size()) - 1;
  const double ld = double(padded(*std::max_element(dims.begin(), dims.end())));
  const double ld0 = double(padded(dims[0]));
  // QRRun: the current, next and reflector blocks of k vectors, the reflected rows, the
  // blocks' T, the random start, the compact copies between factorisations.
  double qr = (3 * k * ld + ld * ld + (k / kBlock + 1) * kBlock * kBlock + 8 * k) * 8;
  if (opt.start == SpectrumStart::random) qr += (2 * k * ld0 + k) * 8;
  if (opt.interval > 1) qr += 2 * k * ld * 8;
  if (dense) qr += (opt.interval > 1 ? 3 : 2) * ld * ld * 8;  // row_form() storage, apply()
  const double depths = std::floor(L / std::max(opt.interval, 1)) + 1;
  const int at_once = batch == 1 ? 1 : examples_at_once(batch);
  return double(batch) * depths * k * sizeof(double) + at_once * (example_bytes + qr);
}

namespace {

// Bytes of one example's MLPJacobians: phi' of every layer, the offsets, three vectors.
double mlp_example_bytes(const std::vector<int>& w) {
  double acts = 0;
  for (std::size_t l = 1; l < w.size(); ++l) acts += w[l];
  const double maxw = *std::max_element(w.begin(), w.end());
  return (acts + double(w.size()) + 1 + 3 * maxw) * 8;
}

// The chain's weights in double (copied for a float chain), and their row norms.
template <class T>
double mlp_layers_bytes(const std::vector<int>& w, bool row_norms) {
  double params = 0, rows = 0;
  for (std::size_t l = 1; l < w.size(); ++l) {
    params += double(w[l]) * (double(w[l - 1]) + 1);
    rows += w[l];
  }
  return (std::is_same_v<T, double> ? 0.0 : params * 8) + (row_norms ? rows * 8 : 0.0) +
         double(w.size()) * 4 * 8;
}

// Example e of a batch of inputs x (batch x widths[0]) through the chain's layers.
JacobianFactory mlp_examples(const MLPLayers& layers, const double* x) {
  const std::size_t n0 = sz(layers.widths()[0]);
  return [&layers, x, n0](int e, bool lazy) -> std::unique_ptr<JacobianChain> {
    return std::make_unique<MLPJacobians>(layers, x + sz(e) * n0, lazy);
  };
}

}  // namespace

namespace {

// The chain in double (a copy for float chains), as the Jacobian tools need it.
template <class T>
const Chain<double>& as_double(const Chain<T>& chain, std::unique_ptr<Chain<double>>& keep) {
  if constexpr (std::is_same_v<T, double>) {
    return chain;
  } else {
    keep = chain.to_double();
    return *keep;
  }
}

// Examples of a chain of blocks: rows of x one at a time, or all of them as one point when
// the batch is coupled.
JacobianFactory block_examples(const Chain<double>& chain, const double* x, int batch, bool train,
                               bool coupled) {
  const std::size_t n0 = sz(chain.in_width());
  return [&chain, x, batch, train, coupled, n0](int e, bool) -> std::unique_ptr<JacobianChain> {
    if (coupled) return std::make_unique<BlockJacobians>(chain, x, sz(batch), train);
    return std::make_unique<BlockJacobians>(chain, x + sz(e) * n0, 1, train);
  };
}

}  // namespace

template <class T>
std::vector<int> chain_jacobian_dims(const Chain<T>& chain, int batch, bool train, bool layers) {
  if (layers) return MLPLayers(chain, false).widths();
  const int rows = chain.couples_batch(train) ? batch : 1;
  std::vector<int> dims{rows * chain.in_width()};
  for (const auto& b : chain.blocks()) dims.push_back(rows * b->out_width());
  return dims;
}

// The chain in double for a float chain, and one example's forward trace: every boundary
// twice (the pass's store and the trace's copy), its exponents and per-pass data.
template <class T>
double block_example_bytes(const Chain<T>& chain, const std::vector<int>& dims) {
  double per_row = 0;
  for (int w : chain.plan().width) per_row += w;
  const double rows = double(dims[0]) / chain.in_width();
  return 2 * rows * per_row * 8 + double(chain.plan().width.size()) * 64 + 1e5;
}

template <class T>
double double_copy_bytes(const Chain<T>& chain) {
  if constexpr (std::is_same_v<T, double>) {
    return 0.0;
  } else {
    double params = 0;
    for (const auto& p : chain.parameters()) params += double(p.size);
    return params * 8 * 2;  // the weights, and a scaled copy where they leave the band
  }
}

template <class T>
BatchNorms chain_jacobian_norms(const Chain<T>& chain, const double* x, int batch, bool train,
                                bool layers, const NormsOptions& opt, Canceller& cancel) {
  opt.validate();
  if (layers) {
    const auto dims = chain_jacobian_dims(chain, batch, train, true);
    // Spectral norms of a layer whose derivative and weights lie far below the floats
    // (dense_needed) go through its dense matrix, which the example's data decides: it is
    // counted whenever spectral norms are asked for.
    check_memory(mlp_layers_bytes<T>(dims, true) +
                     batch_norms_bytes(batch, dims, opt, mlp_example_bytes(dims), opt.spectral),
                 "the per-layer Jacobian norms");
    const MLPLayers ml(chain, true);
    return batch_jacobian_norms(batch, ml.depth(), mlp_examples(ml, x), opt, cancel);
  }
  {
    const auto dims = chain_jacobian_dims(chain, batch, train, false);
    const int examples = chain.couples_batch(train) ? 1 : batch;
    check_memory(double_copy_bytes(chain) +
                     batch_norms_bytes(examples, dims, opt, block_example_bytes(chain, dims), true),
                 "the per-block Jacobian norms");
  }
  std::unique_ptr<Chain<double>> keep;
  const Chain<double>& c = as_double(chain, keep);
  const bool coupled = c.couples_batch(train);
  return batch_jacobian_norms(coupled ? 1 : batch, static_cast<int>(c.size()),
                              block_examples(c, x, batch, train, coupled), opt, cancel);
}

template <class T>
std::vector<double> chain_qr_spectrum(const Chain<T>& chain, const double* x, int batch, bool train,
                                      bool layers, const SpectrumOptions& opt, Canceller& cancel) {
  const auto dims = chain_jacobian_dims(chain, batch, train, layers);
  opt.validate(dims);
  if (layers) {
    check_memory(mlp_layers_bytes<T>(dims, false) +
                     batch_spectrum_bytes(batch, dims, opt, mlp_example_bytes(dims), false),
                 "the QR spectrum");
    const MLPLayers ml(chain, false);
    return batch_qr_spectrum(batch, ml.widths(), mlp_examples(ml, x), opt, cancel);
  }
  {
    const int examples = chain.couples_batch(train) ? 1 : batch;
    check_memory(
        double_copy_bytes(chain) +
            batch_spectrum_bytes(examples, dims, opt, block_example_bytes(chain, dims), true),
        "the QR spectrum");
  }
  std::unique_ptr<Chain<double>> keep;
  const Chain<double>& c = as_double(chain, keep);
  const bool coupled = c.couples_batch(train);
  return batch_qr_spectrum(coupled ? 1 : batch, chain_jacobian_dims(c, batch, train, false),
                           block_examples(c, x, batch, train, coupled), opt, cancel);
}

template std::vector<int> chain_jacobian_dims(const Chain<float>&, int, bool, bool);
template std::vector<int> chain_jacobian_dims(const Chain<double>&, int, bool, bool);
template BatchNorms chain_jacobian_norms(const Chain<float>&, const double*, int, bool, bool,
                                         const NormsOptions&, Canceller&);
template BatchNorms chain_jacobian_norms(const Chain<double>&, const double*, int, bool, bool,
                                         const NormsOptions&, Canceller&);
template std::vector<double> chain_qr_spectrum(const Chain<float>&, const double*, int, bool, bool,
                                               const SpectrumOptions&, Canceller&);
template std::vector<double> chain_qr_spectrum(const Chain<double>&, const double*, int, bool, bool,
                                               const SpectrumOptions&, Canceller&);

}  // namespace gradchain
