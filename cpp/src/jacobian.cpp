#include "gradchain/jacobian.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <limits>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "gradchain/blas.hpp"
#include "gradchain/mlp.hpp"
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
constexpr std::uint64_t kPowerSeed = 0x6a61636f62690000ull;  // start vectors of power iteration

std::size_t sz(int n) { return static_cast<std::size_t>(n); }

// ---- Householder kernels ----------------------------------------------------------------
// A QR factorisation per layer is the whole cost of the spectrum. LAPACK's dgeqrf and
// dorgqr from OpenBLAS reach about 5 GFLOP/s at n = 128 (unblocked panels, a library call
// per column), so the reflectors are applied here by kernels that keep four vectors in
// flight, fuse the update by one reflector with the dot product of the next (one load and
// one store per element and reflector), and never form Q: J_{l+1} Q_l is W_{l+1}'s rows
// with the reflectors applied, which costs what the GEMM by an explicit Q would.

// n doubles in buf starting on a cache line: vectors padded to a multiple of four entries
// then never straddle lines in the kernels. New entries are zero.
double* aligned_in(std::vector<double>& buf, std::size_t n) {
  if (buf.size() < n + 8) buf.resize(n + 8, 0.0);
  const auto p = reinterpret_cast<std::uintptr_t>(buf.data());
  return buf.data() + ((64 - (p & 63u)) & 63u) / sizeof(double);
}

// x_c <- H_{j1-1} ... H_{j0} x_c for the NV vectors x[c] of padded length mp (Reflectors
// layout; the padding of x is zero, or at least finite). Each pass over a vector applies
// H_j and accumulates the dot product with v_{j+1} on the way.
template <int NV>
void apply_block_scalar(const double* v, std::size_t ldv, const double* tau, int j0, int j1,
                        int mp, double* const* x) {
  for (int j = j0; j < j1; ++j) {
    const double* vj = v + sz(j) * ldv;
    for (int c = 0; c < NV; ++c) {
      double* xc = x[c];
      double s = 0.0;
      for (int r = j; r < mp; ++r) s += vj[r] * xc[r];
      const double t = tau[j] * s;
      for (int r = j; r < mp; ++r) xc[r] -= t * vj[r];
    }
  }
}

#ifdef GC_HH_AVX2
#define GC_AVX2_FN __attribute__((target("avx2,fma")))

GC_AVX2_FN inline double hsum(__m256d v) {
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

template <int NV>
GC_AVX2_FN void apply_block_avx2(const double* v, std::size_t ldv, const double* tau, int j0,
                                 int j1, int mp, double* const* xs) {
  double* x[NV];
  for (int c = 0; c < NV; ++c) x[c] = xs[c];
  __m256d acc[NV];
  for (int c = 0; c < NV; ++c) acc[c] = _mm256_setzero_pd();
  {
    const double* w = v + sz(j0) * ldv;
    for (int r = j0 & ~3; r < mp; r += 4) {
      const __m256d wv = _mm256_load_pd(w + r);
      for (int c = 0; c < NV; ++c) acc[c] = _mm256_fmadd_pd(wv, _mm256_load_pd(x[c] + r), acc[c]);
    }
  }
  for (int j = j0; j < j1; ++j) {
    const double* vj = v + sz(j) * ldv;
    __m256d tb[NV];
    for (int c = 0; c < NV; ++c) {
      tb[c] = _mm256_set1_pd(tau[j] * hsum(acc[c]));
      acc[c] = _mm256_setzero_pd();
    }
    // v_j is zero below entry j and v_{j+1} below j + 1: the passes start at the aligned
    // entry at or before j.
    if (j + 1 < j1) {
      const double* w = vj + ldv;
      for (int r = j & ~3; r < mp; r += 4) {
        const __m256d vv = _mm256_load_pd(vj + r), wv = _mm256_load_pd(w + r);
        for (int c = 0; c < NV; ++c) {
          const __m256d xv = _mm256_fnmadd_pd(tb[c], vv, _mm256_load_pd(x[c] + r));
          _mm256_store_pd(x[c] + r, xv);
          acc[c] = _mm256_fmadd_pd(wv, xv, acc[c]);
        }
      }
    } else {
      for (int r = j & ~3; r < mp; r += 4) {
        const __m256d vv = _mm256_load_pd(vj + r);
        for (int c = 0; c < NV; ++c)
          _mm256_store_pd(x[c] + r, _mm256_fnmadd_pd(tb[c], vv, _mm256_load_pd(x[c] + r)));
      }
    }
  }
}
#endif

bool have_avx2() {
#ifdef GC_HH_AVX2
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}

bool aligned32(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 31u) == 0; }

template <int NV>
void apply_block(const double* v, std::size_t ldv, const double* tau, int j0, int j1, int mp,
                 double* const* x) {
#ifdef GC_HH_AVX2
  bool fast = have_avx2() && aligned32(v) && ldv % 4 == 0;
  for (int c = 0; c < NV; ++c) fast = fast && aligned32(x[c]);
  if (fast) return apply_block_avx2<NV>(v, ldv, tau, j0, j1, mp, x);
#endif
  apply_block_scalar<NV>(v, ldv, tau, j0, j1, mp, x);
}

// x_c <- H_{j1-1} ... H_{j0} x_c for the n vectors x_c = x + c ldx of padded length mp.
void apply_reflectors(const double* v, std::size_t ldv, const double* tau, int j0, int j1, int mp,
                      double* x, std::size_t ldx, int n) {
  if (j0 >= j1 || n <= 0) return;
  int c = 0;
  for (; c + 4 <= n; c += 4) {
    double* p[4] = {x + sz(c) * ldx, x + sz(c + 1) * ldx, x + sz(c + 2) * ldx, x + sz(c + 3) * ldx};
    apply_block<4>(v, ldv, tau, j0, j1, mp, p);
  }
  double* p[3] = {x + sz(c) * ldx, x + sz(c + 1) * ldx, x + sz(c + 2) * ldx};
  switch (n - c) {
    case 3: apply_block<3>(v, ldv, tau, j0, j1, mp, p); break;
    case 2: apply_block<2>(v, ldv, tau, j0, j1, mp, p); break;
    case 1: apply_block<1>(v, ldv, tau, j0, j1, mp, p); break;
    default: break;
  }
}

// LAPACK's dlarfg on x[0..len): returns beta with H x = (beta, 0, ...), writes tau and
// v[1..len) (v[0] = 1), and log|beta| to logabs (-inf for a zero vector, NaN for a
// non-finite one), exact at any scale: vectors outside [2^-500, 2^500] are brought into
// range by a power of two first. x is left unchanged.
double make_reflector(const double* x, int len, double* v, double& tau, double& logabs) {
  double mx = 0.0, ss = 0.0;
  for (int r = 1; r < len; ++r) {
    const double a = std::fabs(x[r]);
    mx = a > mx ? a : mx;
    ss += x[r] * x[r];
  }
  v[0] = 1.0;
  if (!std::isfinite(mx) || !std::isfinite(x[0]) || std::isnan(ss)) {
    tau = 0.0;
    logabs = std::numeric_limits<double>::quiet_NaN();
    for (int r = 1; r < len; ++r) v[r] = 0.0;
    return logabs;
  }
  if (mx == 0.0) {  // nothing below the diagonal: H = I
    tau = 0.0;
    logabs = x[0] == 0.0 ? kNegInf : std::log(std::fabs(x[0]));
    for (int r = 1; r < len; ++r) v[r] = 0.0;
    return x[0];
  }
  const double amax = std::max(mx, std::fabs(x[0]));
  int e = 0;
  if (amax > 0x1p500 || amax < 0x1p-500 || !std::isfinite(ss)) {
    e = std::ilogb(amax);
    ss = 0.0;
    for (int r = 1; r < len; ++r) {
      const double y = std::ldexp(x[r], -e);
      ss += y * y;
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
  return std::ldexp(beta, e);
}

// Householder QR of the m x k matrix whose columns are the vectors a + c lda (k <= m,
// lda = padded(m) or more, zero padding), left-looking in panels of four columns. The
// reflectors go to v (k rows of ldv >= padded(m), Reflectors layout) and tau, log|R_jj|
// to logabs; a is left holding H_{j} ... H_0 applied to its columns.
void householder_qr(double* a, std::size_t lda, int m, int k, double* v, std::size_t ldv,
                    double* tau, double* logabs) {
  constexpr int kPanel = 4;
  const int mp = static_cast<int>(padded(m));
  for (int p0 = 0; p0 < k; p0 += kPanel) {
    const int p1 = std::min(k, p0 + kPanel);
    apply_reflectors(v, ldv, tau, 0, p0, mp, a + sz(p0) * lda, lda, p1 - p0);
    for (int c = p0; c < p1; ++c) {
      double* col = a + sz(c) * lda;
      double* vc = v + sz(c) * ldv;
      std::fill(vc, vc + c, 0.0);
      std::fill(vc + m, vc + ldv, 0.0);
      make_reflector(col + c, m - c, vc + c, tau[c], logabs[c]);
      apply_reflectors(v, ldv, tau, c, c + 1, mp, a + sz(c + 1) * lda, lda, p1 - c - 1);
    }
  }
}

// out[c * ldo + i] = d[i] * x[i * ldx + c] for c < k, i < n (a scaled transpose, in
// tiles), and zero for n <= i < ldo.
void transpose_scaled(const double* x, std::size_t ldx, const double* d, int n, int k,
                      double* out, std::size_t ldo) {
  constexpr int kTile = 16;
  for (int i0 = 0; i0 < n; i0 += kTile) {
    const int i1 = std::min(n, i0 + kTile);
    for (int c0 = 0; c0 < k; c0 += kTile) {
      const int c1 = std::min(k, c0 + kTile);
      for (int c = c0; c < c1; ++c) {
        double* o = out + sz(c) * ldo;
        for (int i = i0; i < i1; ++i) o[i] = d[i] * x[sz(i) * ldx + sz(c)];
      }
    }
  }
  for (int c = 0; c < k; ++c) std::fill(out + sz(c) * ldo + sz(n), out + sz(c + 1) * ldo, 0.0);
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

std::string layer_msg(int l, int depth) {
  return "layer " + std::to_string(l) + " of " + std::to_string(depth);
}

}  // namespace

// ---- JacobianChain defaults ------------------------------------------------------------

void JacobianChain::dense(int l, double* J) const {
  const int n = dim(l), m = dim(l - 1);
  std::vector<double> eye(sz(m) * sz(m), 0.0), cols(sz(m) * sz(n));
  for (int j = 0; j < m; ++j) eye[sz(j) * sz(m) + sz(j)] = 1.0;
  apply(l, eye.data(), m, cols.data());  // row j of cols = J e_j
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < m; ++j) J[sz(i) * sz(m) + sz(j)] = cols[sz(j) * sz(n) + sz(i)];
}

double JacobianChain::log10_frobenius(int l) const {
  const std::size_t size = sz(dim(l)) * sz(dim(l - 1));
  std::vector<double> J(size);
  dense(l, J.data());
  const double nrm = safe_norm(J.data(), size);
  return nrm > 0.0 ? std::log10(nrm) : kNegInf;
}

void JacobianChain::apply_householder(int l, const Reflectors& q, int k, double* out,
                                      std::size_t ldo) const {
  const int m = dim(l - 1), n = dim(l);
  // Column c of Q is H_0 ... H_{q.k-1} e_c: the reflectors applied last to first.
  std::vector<double> Q(sz(k) * sz(m), 0.0), out1(sz(k) * sz(n));
  for (int c = 0; c < k; ++c) {
    double* x = Q.data() + sz(c) * sz(m);
    x[c] = 1.0;
    for (int j = q.k - 1; j >= 0; --j) {
      const double* v = q.v + sz(j) * q.ldv;
      double s = 0.0;
      for (int r = j; r < m; ++r) s += v[r] * x[r];
      const double t = q.tau[j] * s;
      for (int r = j; r < m; ++r) x[r] -= t * v[r];
    }
  }
  apply(l, Q.data(), k, out1.data());
  for (int c = 0; c < k; ++c) {
    std::copy(out1.begin() + static_cast<std::ptrdiff_t>(sz(c) * sz(n)),
              out1.begin() + static_cast<std::ptrdiff_t>(sz(c + 1) * sz(n)), out + sz(c) * ldo);
    std::fill(out + sz(c) * ldo + sz(n), out + sz(c + 1) * ldo, 0.0);
  }
}

// ---- MLP layers ----------------------------------------------------------------------------

template <class T>
MLPLayers::MLPLayers(const MLPChain<T>& chain)
    : widths_(chain.widths()), act_(chain.activation()), homog_(chain.log_scale_forward()) {
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
      w_[sz(l)] = chain.weight(l);
      b_[sz(l)] = chain.bias(l);
    }
  } else {
    check_memory(double(nw + nb) * sizeof(double), "the chain's weights in float64");
    own_w_.resize(nw);
    own_b_.resize(nb);
    std::size_t wo = 0, bo = 0;
    for (int l = 1; l <= L; ++l) {
      const std::size_t n = sz(widths_[sz(l)]), mm = n * sz(widths_[sz(l) - 1]);
      std::copy(chain.weight(l), chain.weight(l) + mm, own_w_.begin() + static_cast<std::ptrdiff_t>(wo));
      std::copy(chain.bias(l), chain.bias(l) + n, own_b_.begin() + static_cast<std::ptrdiff_t>(bo));
      w_[sz(l)] = own_w_.data() + wo;
      b_[sz(l)] = own_b_.data() + bo;
      wo += mm;
      bo += n;
    }
  }
  rownorm_.resize(roff_.back());
#pragma omp parallel for schedule(static) if (nw > 1000000)
  for (int l = 1; l <= L; ++l) {
    const int n = widths_[sz(l)], m = widths_[sz(l) - 1];
    for (int i = 0; i < n; ++i)
      rownorm_[roff_[sz(l)] + sz(i)] = safe_norm(w_[sz(l)] + sz(i) * sz(m), sz(m));
  }
}

template MLPLayers::MLPLayers(const MLPChain<float>&);
template MLPLayers::MLPLayers(const MLPChain<double>&);

MLPJacobians::MLPJacobians(const MLPLayers& layers, const double* x) : layers_(layers) {
  const int L = layers.depth();
  const auto& w = layers.widths();
  off_.assign(sz(L) + 2, 0);
  for (int l = 1; l <= L; ++l) off_[sz(l) + 1] = off_[sz(l)] + sz(w[sz(l)]);
  d_.resize(off_.back());
  const int maxw = *std::max_element(w.begin(), w.end());
  std::vector<double> h(sz(maxw)), z(sz(maxw)), hn(sz(maxw));
  std::copy(x, x + w[0], h.begin());
  const Activation& act = layers.activation();
  const bool homog = layers.log_scale_forward();
  auto rescale = [&](std::vector<double>& v, int n) {
    double mx = 0.0;
    for (int i = 0; i < n; ++i) mx = std::max(mx, std::fabs(v[sz(i)]));
    if (mx > 0.0) {
      const int e = std::ilogb(mx);
      for (int i = 0; i < n; ++i) v[sz(i)] = std::ldexp(v[sz(i)], -e);
    }
  };
  if (homog) rescale(h, w[0]);
  for (int l = 1; l <= L; ++l) {
    const int n = w[sz(l)], m = w[sz(l) - 1];
    const double* W = layers.weight(l);
    const double* b = layers.bias(l);
    blas::gemm(blas::Trans::N, blas::Trans::N, n, 1, m, 1.0, W, m, h.data(), 1, 0.0, z.data(), 1);
    for (int i = 0; i < n; ++i) z[sz(i)] += b[i];
    auto check = [&](const std::vector<double>& a, const char* what) {
      for (int i = 0; i < n; ++i)
        if (!std::isfinite(a[sz(i)])) {
          const bool nan = std::isnan(a[sz(i)]);
          throw NonFiniteError(
              "forward", l,
              std::string("the forward pass ") + (nan ? "produced NaN" : "overflowed to inf") +
                  " in " + what + " at " + layer_msg(l, L) +
                  (nan ? "" : "; lower the gain, the weights or the input scale"));
        }
    };
    check(z, "the pre-activation W h + b");
    act.forward(z.data(), hn.data(), sz(n));
    check(hn, "the activation");
    double* d = d_.data() + off_[sz(l)];
    std::fill(d, d + n, 1.0);
    act.backward(z.data(), hn.data(), d, d, sz(n));
    if (homog) rescale(hn, n);
    std::swap(h, hn);
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
  scratch_.resize(sz(k) * sz(n));
  for (int c = 0; c < k; ++c)
    for (int i = 0; i < n; ++i) scratch_[sz(c) * sz(n) + sz(i)] = u[sz(c) * sz(n) + sz(i)] * d[i];
  blas::gemm(blas::Trans::N, blas::Trans::N, k, m, n, 1.0, scratch_.data(), n, layers_.weight(l), m,
             0.0, out, m);
}

void MLPJacobians::dense(int l, double* J) const {
  const int n = dim(l), m = dim(l - 1);
  const double* W = layers_.weight(l);
  const double* d = derivative(l);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < m; ++j) J[sz(i) * sz(m) + sz(j)] = d[i] * W[sz(i) * sz(m) + sz(j)];
}

double MLPJacobians::log10_frobenius(int l) const {
  // ||diag(d) W||_F^2 = sum_i d_i^2 ||W[i, :]||^2, from the row norms: O(width).
  const int n = dim(l);
  const double* d = derivative(l);
  const double* r = layers_.row_norms(l);
  double mx = 0.0;
  for (int i = 0; i < n; ++i) mx = std::max(mx, std::fabs(d[i]) * r[i]);
  if (mx == 0.0) return kNegInf;
  double ss = 0.0;
  for (int i = 0; i < n; ++i) {
    const double t = std::fabs(d[i]) * r[i] / mx;
    ss += t * t;
  }
  return std::log10(mx) + 0.5 * std::log10(ss);
}

void MLPJacobians::apply_householder(int l, const Reflectors& q, int k, double* out,
                                     std::size_t ldo) const {
  const int n = dim(l), m = dim(l - 1);
  const double* W = layers_.weight(l);
  const double* d = derivative(l);
  if (q.k == 0) {  // Q = [I_k; 0]: the first k columns of W
    transpose_scaled(W, sz(m), d, n, k, out, ldo);
    return;
  }
  // Row i of W Q is (H_{q.k-1} ... H_0 W[i, :]^T)^T restricted to its first k entries: the
  // reflectors go to W's rows (copied to padded, aligned rows) and Q is never formed.
  const std::size_t mp = padded(m);
  double* X = aligned_in(scratch_, sz(n) * mp);
  for (int i = 0; i < n; ++i) {
    std::copy(W + sz(i) * sz(m), W + sz(i + 1) * sz(m), X + sz(i) * mp);
    std::fill(X + sz(i) * mp + sz(m), X + sz(i + 1) * mp, 0.0);
  }
  apply_reflectors(q.v, q.ldv, q.tau, 0, q.k, static_cast<int>(mp), X, mp, n);
  transpose_scaled(X, mp, d, n, k, out, ldo);
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

// Largest singular value by power iteration on J^T J from a seeded random start. The
// estimate ||J^T u|| / ||u||, u = J v, is a lower bound that rises to sigma_max; iteration
// stops when it moves by less than tol relative.
void power_iteration(const JacobianChain& chain, int l, const NormsOptions& opt, LayerNorms& out) {
  const int n = chain.dim(l), m = chain.dim(l - 1);
  std::vector<double> v(sz(m)), u(sz(n));
  fill_normal(Philox(kPowerSeed), static_cast<std::uint64_t>(l), v.data(), static_cast<std::uint64_t>(m));
  double nv = safe_norm(v.data(), sz(m));
  for (double& a : v) a /= nv;
  double est = 0.0;
  out.converged = false;
  for (int it = 1; it <= opt.max_iter; ++it) {
    chain.apply(l, v.data(), 1, u.data());
    const double nu = safe_norm(u.data(), sz(n));
    out.iterations = it;
    if (nu == 0.0) {  // v in the null space: J = 0 unless the start was unlucky
      est = 0.0;
      out.converged = true;
      break;
    }
    for (double& a : u) a /= nu;
    chain.apply_transpose(l, u.data(), 1, v.data());
    const double next = safe_norm(v.data(), sz(m));
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

void jacobian_norms(const JacobianChain& chain, const NormsOptions& opt, LayerNorms* out,
                    Canceller* cancel) {
  const int L = chain.length();
  std::vector<double> J, s;
  for (int l = 1; l <= L; ++l) {
    LayerNorms& r = out[l - 1];
    r = LayerNorms{};
    r.log10_frobenius = chain.log10_frobenius(l);
    r.log10_spectral = std::numeric_limits<double>::quiet_NaN();
    if (opt.spectral) {
      const int n = chain.dim(l), m = chain.dim(l - 1);
      if (std::max(n, m) <= opt.exact_max_dim) {
        J.resize(sz(n) * sz(m));
        s.resize(sz(std::min(n, m)));
        chain.dense(l, J.data());
        const int info = blas::singular_values(n, m, J.data(), m, s.data());
        if (info != 0)
          throw std::runtime_error("LAPACK gesdd failed (info " + std::to_string(info) + ") at " +
                                   layer_msg(l, L));
        r.log10_spectral = s[0] > 0.0 ? std::log10(s[0]) : kNegInf;
      } else {
        power_iteration(chain, l, opt, r);
      }
    }
    if (cancel) cancel->poll();
  }
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
    throw std::invalid_argument("interval must be a positive integer; got " + std::to_string(interval));
}

std::vector<int> spectrum_depths(int length, int interval) {
  std::vector<int> out;
  for (int l = interval; l <= length; l += interval) out.push_back(l);
  if (out.empty() || out.back() != length) out.push_back(length);
  return out;
}

void qr_spectrum(const JacobianChain& chain, const SpectrumOptions& opt, double* S,
                 Canceller* cancel) {
  const int L = chain.length();
  std::vector<int> dims(sz(L) + 1);
  for (int l = 0; l <= L; ++l) dims[sz(l)] = chain.dim(l);
  opt.validate(dims);
  const int k = opt.k;
  const std::size_t ld = padded(*std::max_element(dims.begin(), dims.end()));
  // a: the k vectors of the current layer; v: reflectors of the last QR (vp: of the start
  // frame); compact: a without padding, for apply() between re-orthonormalisations.
  std::vector<double> abuf, bbuf, vbuf, v0buf, compact, compact2;
  double* a = aligned_in(abuf, sz(k) * ld);
  double* b = aligned_in(bbuf, sz(k) * ld);
  double* v = aligned_in(vbuf, sz(k) * ld);
  std::vector<double> tau(sz(k)), tau0(sz(k)), logabs(sz(k)), acc(sz(k), 0.0);
  std::vector<std::int64_t> colexp(sz(k), 0);

  Reflectors q;  // the current frame; q.k = 0: the first k columns of the identity
  q.m = dims[0];
  if (opt.start == SpectrumStart::random) {
    const std::size_t ld0 = padded(dims[0]);
    double* g = aligned_in(compact, sz(k) * ld0);
    double* v0 = aligned_in(v0buf, sz(k) * ld0);
    for (int c = 0; c < k; ++c)
      fill_normal(Philox(opt.seed), static_cast<std::uint64_t>(c), g + sz(c) * ld0,
                  static_cast<std::uint64_t>(dims[0]));
    householder_qr(g, ld0, dims[0], k, v0, ld0, tau0.data(), logabs.data());
    q = Reflectors{v0, ld0, tau0.data(), dims[0], k};
  }
  bool explicit_frame = false;  // a holds J_l ... J_{l'} Q_{l'-1}, not re-orthonormalised
  std::size_t row = 0;
  for (int l = 1; l <= L; ++l) {
    const int n = dims[sz(l)], m = dims[sz(l) - 1];
    if (explicit_frame) {
      compact.resize(sz(k) * sz(m));
      compact2.resize(sz(k) * sz(n));
      for (int c = 0; c < k; ++c)
        std::copy(a + sz(c) * ld, a + sz(c) * ld + sz(m), compact.begin() + static_cast<std::ptrdiff_t>(sz(c) * sz(m)));
      chain.apply(l, compact.data(), k, compact2.data());
      for (int c = 0; c < k; ++c) {
        std::copy(compact2.begin() + static_cast<std::ptrdiff_t>(sz(c) * sz(n)),
                  compact2.begin() + static_cast<std::ptrdiff_t>(sz(c + 1) * sz(n)), a + sz(c) * ld);
        std::fill(a + sz(c) * ld + sz(n), a + sz(c + 1) * ld, 0.0);
      }
    } else {
      chain.apply_householder(l, q, k, b, ld);
      std::swap(a, b);
    }
    if (l % opt.interval == 0 || l == L) {
      householder_qr(a, ld, n, k, v, ld, tau.data(), logabs.data());
      for (int c = 0; c < k; ++c) {
        const double g = logabs[sz(c)];
        if (std::isnan(g) || g == std::numeric_limits<double>::infinity())
          throw NonFiniteError("jacobian", l,
                               "the product of Jacobians became non-finite at " + layer_msg(l, L) +
                                   (opt.interval > 1 ? "; lower interval" : ""));
        acc[sz(c)] += g + double(colexp[sz(c)]) * kLn2;
        colexp[sz(c)] = 0;
      }
      std::copy(acc.begin(), acc.end(), S + row * sz(k));
      ++row;
      q = Reflectors{v, ld, tau.data(), n, k};
      explicit_frame = false;
    } else {
      // Between factorisations each vector is renormalised by a power of two: scaling a
      // column of M Q_0 scales R_cc alone (QR of A D is Q (R D)), exactly.
      for (int c = 0; c < k; ++c) {
        double* col = a + sz(c) * ld;
        double mx = 0.0;
        for (int i = 0; i < n; ++i) mx = std::max(mx, std::fabs(col[i]));
        if (!std::isfinite(mx))
          throw NonFiniteError("jacobian", l,
                               "the product of Jacobians became non-finite at " + layer_msg(l, L) +
                                   "; lower interval");
        if (mx > 0.0) {
          const int e = std::ilogb(mx);
          for (int i = 0; i < n; ++i) col[i] = std::ldexp(col[i], -e);
          colexp[sz(c)] += e;
        }
      }
      explicit_frame = true;
    }
    if (cancel) cancel->poll();
  }
}

// ---- batches -------------------------------------------------------------------------------

namespace {

// Runs body(example, polls) over the batch: examples split across the core's threads with
// one BLAS thread each (the products are small); thread 0 polls the canceller. The first
// failing example's exception (lowest index) is rethrown, with the example named.
template <class F>
void for_each_example(int batch, Canceller& cancel, F&& body) {
  BlasThreads one(1);
  std::vector<std::exception_ptr> errors(sz(batch));
  std::atomic<bool> stop{false};
  const int threads = std::min(batch, max_threads());
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int e = 0; e < batch; ++e) {
    if (stop.load(std::memory_order_relaxed)) continue;
#ifdef _OPENMP
    const bool polls = omp_get_thread_num() == 0;
#else
    const bool polls = true;
#endif
    try {
      body(e, polls ? &cancel : nullptr);
    } catch (...) {
      errors[sz(e)] = std::current_exception();
      stop.store(true);
    }
  }
  for (int e = 0; e < batch; ++e) {
    if (!errors[sz(e)]) continue;
    try {
      std::rethrow_exception(errors[sz(e)]);
    } catch (const NonFiniteError& err) {
      throw NonFiniteError(err.where(), err.index(),
                           std::string(err.what()) + " (example " + std::to_string(e) + ")");
    }
  }
}

}  // namespace

template <class T>
BatchNorms mlp_jacobian_norms(const MLPChain<T>& chain, const double* x, int batch,
                              const NormsOptions& opt, Canceller& cancel) {
  if (batch <= 0) throw std::invalid_argument("batch must be positive; got " + std::to_string(batch));
  opt.validate();
  const int L = chain.depth();
  const std::size_t cells = sz(batch) * sz(L);
  check_memory(double(cells) * 21.0, "the per-layer Jacobian norms");
  const MLPLayers layers(chain);
  BatchNorms out;
  out.log10_frobenius.resize(cells);
  out.log10_spectral.resize(cells);
  out.iterations.resize(cells);
  out.converged.resize(cells);
  const int n0 = chain.widths()[0];
  for_each_example(batch, cancel, [&](int e, Canceller* c) {
    const MLPJacobians jac(layers, x + sz(e) * sz(n0));
    std::vector<LayerNorms> r(sz(L));
    jacobian_norms(jac, opt, r.data(), c);
    for (int l = 0; l < L; ++l) {
      const std::size_t i = sz(e) * sz(L) + sz(l);
      out.log10_frobenius[i] = r[sz(l)].log10_frobenius;
      out.log10_spectral[i] = r[sz(l)].log10_spectral;
      out.iterations[i] = r[sz(l)].iterations;
      out.converged[i] = r[sz(l)].converged ? 1 : 0;
    }
  });
  return out;
}

template <class T>
std::vector<double> mlp_qr_spectrum(const MLPChain<T>& chain, const double* x, int batch,
                                    const SpectrumOptions& opt, Canceller& cancel) {
  if (batch <= 0) throw std::invalid_argument("batch must be positive; got " + std::to_string(batch));
  opt.validate(chain.widths());
  const int L = chain.depth();
  const std::size_t nd = spectrum_depths(L, opt.interval).size();
  const std::size_t per = nd * sz(opt.k);
  check_memory(double(sz(batch) * per) * sizeof(double), "the QR spectrum");
  const MLPLayers layers(chain);
  std::vector<double> S(sz(batch) * per);
  const int n0 = chain.widths()[0];
  for_each_example(batch, cancel, [&](int e, Canceller* c) {
    const MLPJacobians jac(layers, x + sz(e) * sz(n0));
    qr_spectrum(jac, opt, S.data() + sz(e) * per, c);
  });
  return S;
}

template BatchNorms mlp_jacobian_norms(const MLPChain<float>&, const double*, int,
                                       const NormsOptions&, Canceller&);
template BatchNorms mlp_jacobian_norms(const MLPChain<double>&, const double*, int,
                                       const NormsOptions&, Canceller&);
template std::vector<double> mlp_qr_spectrum(const MLPChain<float>&, const double*, int,
                                             const SpectrumOptions&, Canceller&);
template std::vector<double> mlp_qr_spectrum(const MLPChain<double>&, const double*, int,
                                             const SpectrumOptions&, Canceller&);

}  // namespace gradchain
