#include "gradchain/rnn.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <initializer_list>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>

#include "gradchain/activation.hpp"
#include "gradchain/blas.hpp"
#include "gradchain/init.hpp"
#include "gradchain/rng.hpp"
#include "gradchain/scaled.hpp"
#include "gradchain/step_gemm.hpp"
#include "gradchain/system.hpp"
#include "gradchain/weight_grad.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace gradchain {

namespace {
const std::vector<std::string> kCellNames = {"tanh", "relu", "lstm", "gru"};
const std::vector<std::string> kInitNames = {"default", "xavier_uniform", "xavier_normal",
                                             "orthogonal", "normal"};
using blas::Trans;
constexpr double kNegInf = -std::numeric_limits<double>::infinity();
// The same thresholds as the MLP chain: below the first, a second thread costs more than
// it saves; from the second on, a single product is worth OpenBLAS's threads.
constexpr double kOwnThreadsWork = 1 << 16;
constexpr double kThreadedGemmWork = 1 << 20;
// Entries of the scaled copies a weight gradient over out-of-band states works through at a
// time (at least one step's rows).
constexpr std::size_t kChunkEntries = std::size_t{1} << 22;

inline int I(std::size_t v) {
  return static_cast<int>(v);
}
inline int clamp_shift(std::int64_t d) {
  return static_cast<int>(std::clamp<std::int64_t>(d, -100000, 100000));
}
constexpr std::int64_t kNone = std::numeric_limits<std::int64_t>::min();

// Hands out pieces of one buffer; with no buffer it only adds up the sizes, so that a
// first pass can size the allocation.
template <class T>
class Arena {
 public:
  explicit Arena(T* base = nullptr) : base_(base) {}
  T* take(std::size_t n) {
    T* p = base_ ? base_ + used_ : nullptr;
    used_ += (n + 15) / 16 * 16;  // 64-byte steps for float, 128 for double
    return p;
  }
  std::size_t used() const { return used_; }

 private:
  T* base_;
  std::size_t used_ = 0;
};

// acc += x * 2^d (exact unless the scaled terms fall below the float range, where they are
// negligible next to acc's).
template <class T>
void add_pow2(T* acc, const T* x, std::size_t n, std::int64_t d) {
  constexpr int emax = std::numeric_limits<T>::max_exponent;
  if (d == 0) {
    for (std::size_t i = 0; i < n; ++i) acc[i] += x[i];
    return;
  }
  if (d < -(2 * emax + std::numeric_limits<T>::digits)) return;  // every term underflows
  const int k = clamp_shift(d), k1 = k / 2;
  const T f1 = static_cast<T>(std::ldexp(1.0, k1)), f2 = static_cast<T>(std::ldexp(1.0, k - k1));
  for (std::size_t i = 0; i < n; ++i) acc[i] += (x[i] * f1) * f2;
}

// The exponent of the largest entry of x * 2^e (kNone for a zero array; e for a non-finite
// one, whose NaN or inf then travels on).
inline std::int64_t top_exponent(const MaxAbs& s, std::int64_t e) {
  if (!s.finite) return e;
  return s.value > 0 ? e + exponent_of(s.value) : kNone;
}

// A scaled array a * 2^e (nz false: a is zero and its contents are undefined) gets x * 2^ex
// added. Both go to the exponent of the larger of the two true maxima first, so that where
// either mantissa sits in its band, no entry that matters can underflow.
template <class T>
void accumulate(T* a, std::int64_t& e, char& nz, const T* x, std::int64_t ex, std::size_t n) {
  if (!nz) {
    std::copy(x, x + n, a);
    e = ex;
    nz = 1;
    return;
  }
  const std::int64_t ta = top_exponent(max_abs(a, n), e), tx = top_exponent(max_abs(x, n), ex);
  if (tx == kNone) return;
  const std::int64_t c = std::max(ta, tx);
  scale_pow2(a, n, clamp_shift(e - c));
  e = c;
  add_pow2(a, x, n, ex - c);
}

// Multiplication by 2^d as two factors, each inside the float range for any d a mantissa
// of T can need (|d| up to twice the exponent range): exact barring an underflowing result.
template <class T>
struct Pow2 {
  T f1 = T(1), f2 = T(1);
  explicit Pow2(std::int64_t d) {
    constexpr int lim = 2 * std::numeric_limits<T>::max_exponent + std::numeric_limits<T>::digits;
    if (d == 0) return;
    if (d < -lim) {
      f1 = f2 = T(0);
      return;
    }
    const int k = static_cast<int>(std::min<std::int64_t>(d, lim)), k1 = k / 2;
    f1 = static_cast<T>(std::ldexp(1.0, k1));
    f2 = static_cast<T>(std::ldexp(1.0, k - k1));
  }
  static Pow2 zero() { return Pow2(std::numeric_limits<std::int64_t>::min()); }
  T operator()(T x) const { return (x * f1) * f2; }
};

// A weight is used as W~ * 2^e: W~ a copy scaled by a power of two when max|W| has left the
// band (so that products with it neither overflow nor underflow before the scale is
// applied), else the parameter itself with e = 0.
template <class T>
struct Weight {
  const T* w = nullptr;
  int e = 0;
};

template <class T>
struct Model {
  CellKind cell;
  std::size_t H = 0, L = 0, G = 0, GH = 0, GW = 0, O = 0;
  std::vector<std::size_t> in;
  std::vector<Weight<T>> w_ih, w_hh;
  std::vector<const T*> b_ih, b_hh;
  std::vector<int> pi;  // per layer: index of weight_ih in the parameter list
  bool bias = true;
  Weight<T> w_out;
  const T* b_out = nullptr;
  int p_out = -1;
  std::size_t n_params = 0;
  // The runs of columns of the stored per-step gradient that multiply blocks of rows of each
  // weight: LSTM and the vanilla cells use one run; GRU's input and hidden weights see
  // different gradients for the n gate.
  std::vector<ColumnRun> ih, hh, out;
  std::vector<std::vector<T>> scaled;  // the scaled copies
  // Per layer: W~_hh transposed (H x G H), so that the forward step's product reads the
  // weight row by row as the backward step's does, with no repacking per step.
  std::vector<std::vector<T>> whh_t;

  Weight<T> weight(const std::vector<T>& w) {
    const MaxAbs s = max_abs(w.data(), w.size());
    const int e = s.finite ? rescale_exponent<T>(s.value) : 0;
    if (e == 0) return {w.data(), 0};
    scaled.emplace_back(w);
    scale_pow2(scaled.back().data(), w.size(), -e);
    return {scaled.back().data(), e};
  }
};

template <class T>
struct Part {
  std::size_t r0 = 0, R = 0;
  T* X = nullptr;          // (steps, R, in_0)
  std::vector<T*> Hs, Cs;  // per layer: (steps + 1, R, H)
  std::vector<T*> TC;      // LSTM: tanh(c_t), (steps, R, H)
  std::vector<T*>
      Gt;  // (steps, R, GW): gates, then dL/dgates (a block flagged zero in gnz: undefined)
  std::vector<std::vector<std::int64_t>> gexp;  // per layer, per step: exponent of Gt's rows
  std::vector<std::vector<char>> gnz;
  T *U = nullptr, *V = nullptr,
    *Utop = nullptr;  // upstream dL/dh_t of this layer / the one below / top
  std::vector<std::int64_t> uexp, vexp, topexp;
  std::vector<char> unz, vnz, topnz;
  std::vector<double> ls, lc;      // log10 of squared norms, layers x (steps + 1)
  std::vector<std::vector<T>> pg;  // parameter gradients
  std::vector<std::int64_t> pexp;
  std::vector<char> pnz;
  ScaledSum loss;  // this part's loss terms, before the mean's division
  T *dh = nullptr, *dc = nullptr, *dhn = nullptr, *tmp = nullptr, *S = nullptr;
  // Window truncation: gradients accumulated over every source step.
  std::vector<T*> DGA, SA, CA;
  std::vector<std::vector<std::int64_t>> dgaexp, saexp, caexp;
  std::vector<std::vector<char>> dganz, sanz, canz;
  T *Wd = nullptr, *Wx = nullptr;
  std::vector<std::int64_t> wexp, wxexp;
  std::vector<char> wnz, wxnz;
  int bad_layer = -1;
  std::int64_t bad_t = -1;
};

// Upstream gradient rows t in [first, last]: base + (t - first) * R * H at 2^exp[t - first].
template <class T>
struct Up {
  const T* base;
  const std::int64_t* exp;
  const char* nz;
  std::size_t first, last;
};

// One weight gradient sum_t D_t^T M_t (M_t: the step's R rows of `width` entries; `blocks`
// map runs of D's columns to rows of the gradient), or with M null a bias gradient sum_t D_t.
template <class T>
struct StepProduct {
  const T* M;
  std::size_t width;
  const std::vector<ColumnRun>* blocks;
  std::size_t index;  // of the parameter
};

template <class T>
class Pass {
 public:
  Pass(const Model<T>& m, const RecurrentRequest& req, std::size_t steps, std::size_t B,
       RecurrentResult<T>& res, Canceller& cancel, std::atomic<bool>& abort, bool halves, bool team)
      : m_(m),
        req_(req),
        Tn_(steps),
        B_(B),
        res_(res),
        cancel_(cancel),
        abort_(abort),
        halves_(halves),
        team_(team) {}

  void allocate(Part<T>& p, Arena<T>& a) const;
  void forward(Part<T>& p, bool polls) const;
  void loss(Part<T>& p) const;
  void backward(Part<T>& p, bool polls) const;
  void gather_window_norms(Part<T>& p) const;

  static const Activation& act(CellKind c);

 private:
  void cell_forward(Part<T>& p, std::size_t l, std::size_t t) const;
  void carry(Part<T>& p, std::size_t l, std::size_t t_hi, std::size_t t_lo, const Up<T>& up,
             bool window, bool polls) const;
  void step_grads(Part<T>& p, T* D, std::size_t ld, std::size_t steps,
                  const std::vector<std::int64_t>& ex, const std::vector<char>& nz,
                  std::initializer_list<StepProduct<T>> products) const;
  void param_grads(Part<T>& p, std::size_t l, T* dG, const std::vector<std::int64_t>& ex,
                   const std::vector<char>& nz) const;
  void vertical(Part<T>& p, std::size_t l, const T* dG, std::size_t rows, T* out) const;
  // dL/dh_t (state) or dL/dc_t (cell) of layer l, d * 2^g (have = false: zero): into the
  // window accumulator, or into the log10 norms and the kept gradients.
  enum class Grad { state, cell };
  void record(Grad which, Part<T>& p, std::size_t l, std::size_t t, const T* d, std::int64_t g,
              bool have, bool window) const;

  void gemm(Trans ta, Trans tb, std::size_t m, std::size_t n, std::size_t k, const T* a,
            std::size_t lda, const T* b, std::size_t ldb, T beta, T* c, std::size_t ldc) const;
  // C = A B of one step (A: R rows of the states or gate gradients; B: the recurrent weight
  // or its transpose, row-major).
  void step_gemm(std::size_t m, std::size_t n, std::size_t k, const T* a, std::size_t lda,
                 const T* b, std::size_t ldb, T* c, std::size_t ldc) const;

  const Model<T>& m_;
  const RecurrentRequest& req_;
  std::size_t Tn_, B_;
  RecurrentResult<T>& res_;
  Canceller& cancel_;
  std::atomic<bool>& abort_;
  bool halves_, team_;
};

// C = op(A) op(B) + beta C, every product of a pass. With `halves` (large products of an
// unsplit batch) C's columns go in two fixed halves, each a single-threaded product, on two
// threads where the pass has them: the sums never depend on the thread count, as they would
// with OpenBLAS's own threads.
template <class T>
void Pass<T>::gemm(Trans ta, Trans tb, std::size_t m, std::size_t n, std::size_t k, const T* a,
                   std::size_t lda, const T* b, std::size_t ldb, T beta, T* c,
                   std::size_t ldc) const {
  if (!halves_ || n < 2) {
    blas::gemm(ta, tb, I(m), I(n), I(k), T(1), a, I(lda), b, I(ldb), beta, c, I(ldc));
    return;
  }
  const std::size_t n0 = n / 2;
  auto half = [&](int h) {
    const std::size_t j = h == 0 ? 0 : n0, w = h == 0 ? n0 : n - n0;
    const T* bh = tb == Trans::T ? b + j * ldb : b + j;
    blas::gemm(ta, tb, I(m), I(w), I(k), T(1), a, I(lda), bh, I(ldb), beta, c + j, I(ldc));
  };
#ifdef _OPENMP
  if (team_) {
#pragma omp parallel num_threads(team_threads(2))
    half(omp_get_thread_num());
    return;
  }
#endif
  half(0);
  half(1);
}

// Every entry is the same chain of fused multiply-adds however the columns are split, so
// the halves of a large product may go to two threads.
template <class T>
void Pass<T>::step_gemm(std::size_t m, std::size_t n, std::size_t k, const T* a, std::size_t lda,
                        const T* b, std::size_t ldb, T* c, std::size_t ldc) const {
#ifdef _OPENMP
  if (team_ && n >= 2) {
    const std::size_t n0 = n / 2;
#pragma omp parallel num_threads(team_threads(2))
    {
      const bool h = omp_get_thread_num() == 1 || omp_get_num_threads() == 1;
      const bool l = omp_get_thread_num() == 0;
      if (l) step::gemm(I(m), I(n0), I(k), a, I(lda), b, I(ldb), c, I(ldc));
      if (h) step::gemm(I(m), I(n - n0), I(k), a, I(lda), b + n0, I(ldb), c + n0, I(ldc));
    }
    return;
  }
#endif
  step::gemm(I(m), I(n), I(k), a, I(lda), b, I(ldb), c, I(ldc));
}

template <class T>
const Activation& Pass<T>::act(CellKind c) {
  static const Activation tanh_{Act::tanh}, relu_{Act::relu};
  return c == CellKind::relu ? relu_ : tanh_;
}

const Activation kSigmoid{Act::sigmoid};
const Activation kTanh{Act::tanh};

template <class T>
void Pass<T>::allocate(Part<T>& p, Arena<T>& a) const {
  const std::size_t R = p.R, H = m_.H, L = m_.L, in0 = m_.in[0];
  const bool lstm = m_.cell == CellKind::lstm;
  p.X = a.take(Tn_ * R * in0);
  p.Hs.resize(L);
  p.Gt.resize(L);
  if (lstm) {
    p.Cs.resize(L);
    p.TC.resize(L);
  }
  for (std::size_t l = 0; l < L; ++l) {
    p.Hs[l] = a.take((Tn_ + 1) * R * H);
    p.Gt[l] = a.take(Tn_ * R * m_.GW);
    if (lstm) {
      p.Cs[l] = a.take((Tn_ + 1) * R * H);
      p.TC[l] = a.take(Tn_ * R * H);
    }
  }
  p.S = a.take(R * m_.GH);
  if (req_.forward_only) return;
  const std::size_t rows = (Tn_ + 1) * R * H;
  p.U = a.take(rows);
  p.Utop = a.take(rows);
  if (L > 1) p.V = a.take(rows);
  p.uexp.assign(Tn_ + 1, 0);
  p.vexp.assign(Tn_ + 1, 0);
  p.unz.assign(Tn_ + 1, 0);
  p.vnz.assign(Tn_ + 1, 0);
  p.gexp.assign(L, std::vector<std::int64_t>(Tn_, 0));
  p.gnz.assign(L, std::vector<char>(Tn_, 0));
  p.ls.assign(L * (Tn_ + 1), kNegInf);
  p.lc.assign(lstm ? L * (Tn_ + 1) : 0, kNegInf);
  p.dh = a.take(R * H);
  p.dc = a.take(R * H);
  p.dhn = a.take(R * H);
  p.tmp = a.take(R * H);
  if (req_.truncation == Truncation::window) {
    const std::size_t k = std::min<std::size_t>(static_cast<std::size_t>(req_.window), Tn_);
    p.DGA.resize(L);
    p.SA.resize(L);
    if (lstm) p.CA.resize(L);
    for (std::size_t l = 0; l < L; ++l) {
      p.DGA[l] = a.take(Tn_ * R * m_.GW);
      p.SA[l] = a.take((Tn_ + 1) * R * H);
      if (lstm) p.CA[l] = a.take((Tn_ + 1) * R * H);
    }
    p.dgaexp.assign(L, std::vector<std::int64_t>(Tn_, 0));
    p.dganz.assign(L, std::vector<char>(Tn_, 0));
    p.saexp.assign(L, std::vector<std::int64_t>(Tn_ + 1, 0));
    p.sanz.assign(L, std::vector<char>(Tn_ + 1, 0));
    p.caexp.assign(L, std::vector<std::int64_t>(Tn_ + 1, 0));
    p.canz.assign(L, std::vector<char>(Tn_ + 1, 0));
    p.Wd = a.take(k * R * m_.GW);
    p.Wx = a.take(k * R * H);
    p.wexp.assign(k, 0);
    p.wnz.assign(k, 0);
  }
  p.pg.resize(m_.n_params);
  p.pexp.assign(m_.n_params, 0);
  p.pnz.assign(m_.n_params, 0);
}

// ---- forward ------------------------------------------------------------------------------

template <class T>
void Pass<T>::cell_forward(Part<T>& p, std::size_t l, std::size_t t) const {
  const std::size_t R = p.R, H = m_.H, GW = m_.GW, GH = m_.GH, n = R * H;
  const T* hp = p.Hs[l] + (t - 1) * n;
  T* h = p.Hs[l] + t * n;
  T* G = p.Gt[l] + (t - 1) * R * GW;  // holds the input projection on entry
  T* S = p.S;
  const Weight<T>& whh = m_.w_hh[l];
  step_gemm(R, GH, H, hp, H, m_.whh_t[l].data(), GH, S, GH);
  scale_pow2(S, R * GH, whh.e);
  switch (m_.cell) {
    case CellKind::tanh:
    case CellKind::relu: {
      for (std::size_t i = 0; i < n; ++i) h[i] = G[i] + S[i];
      act(m_.cell).forward(h, h, n);
      break;
    }
    case CellKind::lstm: {
      const T* cp = p.Cs[l] + (t - 1) * n;
      T* c = p.Cs[l] + t * n;
      T* tc = p.TC[l] + (t - 1) * n;
      for (std::size_t r = 0; r < R; ++r) {
        T* g = G + r * GW;
        const T* s = S + r * GH;
        for (std::size_t j = 0; j < GW; ++j) g[j] += s[j];
        kSigmoid.forward(g, g, 2 * H);
        kTanh.forward(g + 2 * H, g + 2 * H, H);
        kSigmoid.forward(g + 3 * H, g + 3 * H, H);
        for (std::size_t j = 0; j < H; ++j)
          c[r * H + j] = g[H + j] * cp[r * H + j] + g[j] * g[2 * H + j];
      }
      kTanh.forward(c, tc, n);
      for (std::size_t r = 0; r < R; ++r)
        for (std::size_t j = 0; j < H; ++j) h[r * H + j] = G[r * GW + 3 * H + j] * tc[r * H + j];
      break;
    }
    case CellKind::gru: {
      const T* bhn = m_.b_hh[l] + 2 * H;
      for (std::size_t r = 0; r < R; ++r) {
        T* g = G + r * GW;
        const T* s = S + r * GH;
        for (std::size_t j = 0; j < 2 * H; ++j) g[j] += s[j];
        kSigmoid.forward(g, g, 2 * H);
        for (std::size_t j = 0; j < H; ++j) {
          const T ghn = s[2 * H + j] + bhn[j];
          g[3 * H + j] = ghn;
          g[2 * H + j] += g[j] * ghn;
        }
        kTanh.forward(g + 2 * H, g + 2 * H, H);
        for (std::size_t j = 0; j < H; ++j) {
          const T nn = g[2 * H + j];
          h[r * H + j] = nn + g[H + j] * (hp[r * H + j] - nn);
        }
      }
      break;
    }
  }
}

template <class T>
void Pass<T>::forward(Part<T>& p, bool polls) const {
  const std::size_t R = p.R, H = m_.H, n = R * H, GW = m_.GW, GH = m_.GH;
  const std::size_t nih = m_.cell == CellKind::gru ? 3 * H : GH;
  for (std::size_t l = 0; l < m_.L; ++l) {
    T* hs = p.Hs[l];
    if (req_.h0) {
      const T* h0 = static_cast<const T*>(req_.h0) + (l * B_ + p.r0) * H;
      std::copy(h0, h0 + n, hs);
    } else {
      std::fill(hs, hs + n, T(0));
    }
    if (m_.cell == CellKind::lstm) {
      T* cs = p.Cs[l];
      if (req_.c0) {
        const T* c0 = static_cast<const T*>(req_.c0) + (l * B_ + p.r0) * H;
        std::copy(c0, c0 + n, cs);
      } else {
        std::fill(cs, cs + n, T(0));
      }
    }
    // Input projections of every step in one product, biases folded in (GRU keeps b_hn
    // apart: the reset gate multiplies it).
    const T* X = l == 0 ? p.X : p.Hs[l - 1] + n;
    T* G = p.Gt[l];
    // Over thousands of steps of a wide layer this takes seconds: in row blocks of about
    // 2^30 multiply-adds, polled between (the rows are independent; the last block takes
    // the remainder, so that no block is small enough for another kernel).
    const Weight<T>& wih = m_.w_ih[l];
    const std::size_t rows = Tn_ * R, in = m_.in[l];
    const std::size_t block = std::max<std::size_t>(1, (std::size_t{1} << 30) / (nih * in));
    for (std::size_t r0 = 0; r0 < rows;) {
      const std::size_t r1 = rows - r0 < 2 * block ? rows : r0 + block;
      gemm(Trans::N, Trans::T, r1 - r0, nih, in, X + r0 * in, in, wih.w, in, T(0), G + r0 * GW, GW);
      r0 = r1;
      if (r0 < rows && polls) cancel_.poll();
    }
    if (wih.e != 0)
      for (std::size_t r = 0; r < Tn_ * R; ++r) scale_pow2(G + r * GW, nih, wih.e);
    std::vector<T> bsum(nih);
    for (std::size_t j = 0; j < nih; ++j)
      bsum[j] = m_.b_ih[l][j] + (m_.cell == CellKind::gru && j >= 2 * H ? T(0) : m_.b_hh[l][j]);
    // The first step whose input projection overflowed (Tn_ + 1: none).
    std::size_t bad_in = Tn_ + 1;
    for (std::size_t r = 0; r < Tn_ * R; ++r) {
      T* g = G + r * GW;
      for (std::size_t j = 0; j < nih; ++j) g[j] += bsum[j];
      if (bad_in > Tn_ && !max_abs(g, nih).finite) bad_in = r / R + 1;
    }
    for (std::size_t t = 1; t <= Tn_; ++t) {
      if (t < bad_in) cell_forward(p, l, t);
      // relu states can overflow; the bounded cells turn NaN only when products of huge
      // weights overflow with opposite signs; and a gate saturated by an infinite
      // pre-activation hides the overflow from the state but not from the backward pass
      // (0 * inf). Either way: stop at the first such step.
      if (t >= bad_in || !max_abs(p.S, R * m_.GH).finite || !max_abs(hs + t * n, n).finite) {
        p.bad_layer = static_cast<int>(l);
        p.bad_t = static_cast<std::int64_t>(t);
        return;
      }
      if (abort_.load(std::memory_order_relaxed)) return;
      if (polls) cancel_.poll();
    }
  }
}

// ---- loss ---------------------------------------------------------------------------------

// Softmax cross-entropy of rows Y (nt steps of R rows, O logits each) against the labels:
// the loss terms into p.loss, dL/dY mantissas into dY at 2^ye per step. Computed from the
// logits' log-sum-exp, so that neither the loss of a confidently right row (log1p of a sum
// that may underflow) nor its gradient (1 - p_label, not p_label - 1) cancels or vanishes:
// a step's gradients are scaled by a power of two when all of them are tiny.
template <class T>
void Pass<T>::loss(Part<T>& p) const {
  const std::size_t R = p.R, H = m_.H, n = R * H, L = m_.L;
  const T* top = p.Hs[L - 1];
  T* U = p.Utop;
  p.topexp.assign(Tn_ + 1, 0);
  p.topnz.assign(Tn_ + 1, 0);
  const bool every = req_.target_every_step && req_.loss != LossKind::probe;
  const std::size_t t0 = every ? 1 : Tn_, nt = every ? Tn_ : 1;
  for (std::size_t t = t0; t <= Tn_; ++t) p.topnz[t] = 1;
  switch (req_.loss) {
    case LossKind::probe: {
      const T* hT = top + Tn_ * n;
      loss_rows(LossKind::probe, hT, 0, R, H, nullptr, 1.0, U + Tn_ * n, p.topexp[Tn_], p.loss);
      return;
    }
    case LossKind::grad_output: {
      const T* go = static_cast<const T*>(req_.target);
      for (std::size_t t = t0; t <= Tn_; ++t) {
        const T* src = go + ((every ? t - 1 : 0) * B_ + p.r0) * H;
        loss_rows(LossKind::grad_output, src, 0, R, H, src, 1.0, U + t * n, p.topexp[t], p.loss);
      }
      return;
    }
    default:
      break;
  }
  // mse / cross_entropy on y_t = h_t (or the read-out of h_t) for the steps with a term.
  const std::size_t O = m_.O > 0 ? m_.O : H;
  const std::size_t rows = nt * R;
  const T* hs = top + t0 * n;
  std::vector<T> Y(rows * O), dY(rows * O);
  std::vector<std::int64_t> ye(nt, 0);  // dY's rows of step t0 + i are at 2^ye[i]
  if (m_.O > 0) {
    gemm(Trans::N, Trans::T, rows, O, H, hs, H, m_.w_out.w, H, T(0), Y.data(), O);
    scale_pow2(Y.data(), rows * O, m_.w_out.e);
    for (std::size_t r = 0; r < rows; ++r)
      for (std::size_t j = 0; j < O; ++j) Y[r * O + j] += m_.b_out[j];
  } else {
    std::copy(hs, hs + rows * O, Y.begin());
  }
  if (!max_abs(Y.data(), rows * O).finite) {  // read-out outputs beyond the float range
    p.bad_layer = static_cast<int>(L) - 1;
    p.bad_t = -2;
    return;
  }
  // One loss implementation for every chain: each step's rows in turn, at their own scale.
  const bool mse = req_.loss == LossKind::mse;
  const double count = double(nt) * double(B_) * (mse ? double(O) : 1.0);
  for (std::size_t i = 0; i < nt; ++i) {
    const std::size_t first = (every ? i * B_ : 0) + p.r0;
    const void* tgt =
        mse ? static_cast<const void*>(static_cast<const T*>(req_.target) + first * O)
            : static_cast<const void*>(static_cast<const std::int64_t*>(req_.target) + first);
    loss_rows(req_.loss, Y.data() + i * R * O, 0, R, O, tgt, 1.0 / count, dY.data() + i * R * O,
              ye[i], p.loss);
  }
  T* Ut = U + t0 * n;
  if (m_.O > 0) {
    gemm(Trans::N, Trans::N, rows, H, O, dY.data(), O, m_.w_out.w, H, T(0), Ut, H);
  } else {
    std::copy(dY.begin(), dY.end(), Ut);
  }
  for (std::size_t i = 0; i < nt; ++i) {
    const std::size_t t = t0 + i;
    p.topexp[t] = ye[i] + (m_.O > 0 ? m_.w_out.e : 0);
    into_band(U + t * n, n, p.topexp[t]);
  }
  if (m_.O > 0) {
    const std::vector<char> nz(nt, 1);
    const std::size_t iw = static_cast<std::size_t>(m_.p_out);
    step_grads(p, dY.data(), O, nt, ye, nz, {{hs, H, &m_.out, iw}, {nullptr, 0, &m_.out, iw + 1}});
  }
}

// ---- backward -----------------------------------------------------------------------------

template <class T>
void Pass<T>::record(Grad which, Part<T>& p, std::size_t l, std::size_t t, const T* d,
                     std::int64_t g, bool have, bool window) const {
  const bool cell = which == Grad::cell;
  const std::size_t n = p.R * m_.H;
  if (window) {
    if (have)
      accumulate((cell ? p.CA : p.SA)[l] + t * n, (cell ? p.caexp : p.saexp)[l][t],
                 (cell ? p.canz : p.sanz)[l][t], d, g, n);
    return;
  }
  if (req_.state_norms)
    (cell ? p.lc : p.ls)[l * (Tn_ + 1) + t] = have ? 2.0 * log10_norm(scan(d, n), g) : kNegInf;
  if (req_.keep_grads) {
    T* dst = (cell ? res_.cell_grads : res_.state_grads).data() +
             ((l * (Tn_ + 1) + t) * B_ + p.r0) * m_.H;
    if (have)
      write_scaled(d, n, g, 1.0, dst);
    else
      std::fill(dst, dst + n, T(0));
  }
}

// Carries dL/dh (and the LSTM's dL/dc) of layer l from step t_hi down to t_lo. Each is held
// as a mantissa array times a power of two of its own (dh * 2^gh, dc * 2^gc) and put back
// into the safe band whenever it leaves it, so it never under- or overflows. Arrays at
// different exponents are combined at the exponent of the larger true maximum, so that an
// array that is exactly zero or far smaller than the other cannot push the other out of
// the range. dL/dgates of step t is written to Gt's row block t (in place of the gates)
// or, for window truncation, to the window buffer.
template <class T>
void Pass<T>::carry(Part<T>& p, std::size_t l, std::size_t t_hi, std::size_t t_lo, const Up<T>& up,
                    bool window, bool polls) const {
  const std::size_t R = p.R, H = m_.H, n = R * H, GW = m_.GW;
  const bool lstm = m_.cell == CellKind::lstm, gru = m_.cell == CellKind::gru;
  const bool detach = !window && req_.truncation == Truncation::detach;
  const std::size_t k = static_cast<std::size_t>(std::max(req_.window, 1));
  const Weight<T>& whh = m_.w_hh[l];
  T* dh = p.dh;
  T* dc = p.dc;
  T* dhn = p.dhn;
  T* tmp = p.tmp;
  std::int64_t gh = 0, gc = 0;  // exponents of dh and dc
  std::int64_t th = kNone;      // exponent of max|dh * 2^gh| (kNone: dh is zero)
  bool have = false;            // false: dh and dc are zero (their contents undefined)

  auto up_row = [&](std::size_t t, const T*& row, std::int64_t& ex) {
    if (t < up.first || t > up.last || !up.nz[t - up.first]) return false;
    row = up.base + (t - up.first) * n;
    ex = up.exp[t - up.first];
    return true;
  };
  // c += d * 2^s * o * (1 - tanh(c_t)^2): dL/dc_t through h_t
  auto add_from_h = [&](T* c, const T* d, const T* G, const T* tc, Pow2<T> s) {
    for (std::size_t r = 0; r < R; ++r)
      for (std::size_t j = 0; j < H; ++j) {
        const std::size_t i = r * H + j;
        c[i] += s(d[i]) * G[r * GW + 3 * H + j] * (T(1) - tc[i] * tc[i]);
      }
  };
  // dc (at gc) += dh (at gh) through h_t
  auto cell_from_state = [&](const T* G, const T* tc) {
    if (th == kNone) return;
    const std::int64_t tcx = gc == gh ? kNone : top_exponent(max_abs(dc, n), gc);
    if (gc == gh || tcx == kNone) {  // a zero dc takes dh's exponent
      gc = gh;
      add_from_h(dc, dh, G, tc, Pow2<T>(0));
      return;
    }
    const std::int64_t c = std::max(th, tcx);
    scale_pow2(dc, n, clamp_shift(gc - c));
    gc = c;
    add_from_h(dc, dh, G, tc, Pow2<T>(gh - c));
  };
  for (std::size_t t = t_hi; t > t_lo; --t) {
    const T* u = nullptr;
    std::int64_t ue = 0;
    const bool has_up = up_row(t, u, ue);
    if (has_up) {
      if (!have || th == kNone) {
        std::copy(u, u + n, dh);
        gh = ue;
        th = top_exponent(max_abs(u, n), ue);
        if (lstm && !have) {
          std::fill(dc, dc + n, T(0));
          gc = ue;
        }
        have = true;
      } else if (ue == gh) {
        add_pow2(dh, u, n, 0);
      } else {
        const std::int64_t tu = top_exponent(max_abs(u, n), ue);
        if (tu != kNone) {
          const std::int64_t c = std::max(th, tu);
          scale_pow2(dh, n, clamp_shift(gh - c));
          gh = c;
          add_pow2(dh, u, n, ue - c);
          th = top_exponent(max_abs(dh, n), gh);
        }
      }
    }
    record(Grad::state, p, l, t, dh, gh, have, window);
    const T* G = p.Gt[l] + (t - 1) * R * GW;
    const T* tc = lstm ? p.TC[l] + (t - 1) * n : nullptr;
    if (detach && t % k == 0 && t < Tn_) {
      // Truncation boundary: what arrived from step t + 1 stops here; the loss and the
      // layer above at t still send their gradient on. The cell's recorded gradient is
      // that of c_t as used by h_t plus that of its detached copy.
      if (lstm) {
        if (has_up) {
          std::fill(tmp, tmp + n, T(0));
          add_from_h(tmp, u, G, tc, Pow2<T>(0));
          std::copy(tmp, tmp + n, dhn);  // dL/dc_t through h_t alone, at 2^ue
          std::int64_t e = ue;
          char nz = 1;
          if (have) accumulate(tmp, e, nz, dc, gc, n);
          record(Grad::cell, p, l, t, tmp, e, true, false);
          std::copy(dhn, dhn + n, dc);
          gc = ue;
        } else {
          record(Grad::cell, p, l, t, dc, gc, have, false);
        }
      }
      have = has_up;
      if (have) {
        std::copy(u, u + n, dh);
        gh = ue;
        th = top_exponent(max_abs(u, n), ue);
      }
    } else if (lstm && have) {
      cell_from_state(G, tc);
      record(Grad::cell, p, l, t, dc, gc, true, window);
    } else if (lstm) {
      record(Grad::cell, p, l, t, dc, gc, false, window);
    }

    T* dG = window ? p.Wd + (t - t_lo - 1) * R * GW : p.Gt[l] + (t - 1) * R * GW;
    std::int64_t* dge = window ? &p.wexp[t - t_lo - 1] : &p.gexp[l][t - 1];
    char* dgnz = window ? &p.wnz[t - t_lo - 1] : &p.gnz[l][t - 1];
    *dgnz = have ? 1 : 0;
    *dge = gh;
    if (!have) {
      // Flagged zero: the weight gradients skip the row block; the product into the layer
      // below (l > 0) reads it.
      if (l > 0) std::fill(dG, dG + R * GW, T(0));
      continue;
    }
    // dL/dgates of step t; G and dG may be the same array.
    switch (m_.cell) {
      case CellKind::tanh:
      case CellKind::relu:
        act(m_.cell).backward(static_cast<const T*>(nullptr), p.Hs[l] + t * n, dh, dG, n);
        break;
      case CellKind::lstm: {
        // The i, f, g gates come from dc, the o gate from dh: at one exponent, that of the
        // larger of the two (scaled only where their exponents differ).
        const T* cp = p.Cs[l] + (t - 1) * n;
        auto gates = [&](auto fc, auto fh) {
          for (std::size_t r = 0; r < R; ++r) {
            const T* gr = G + r * GW;
            T* dr = dG + r * GW;
            for (std::size_t j = 0; j < H; ++j) {
              const std::size_t i = r * H + j;
              const T gi = gr[j], gf = gr[H + j], gg = gr[2 * H + j], go = gr[3 * H + j];
              const T dct = dc[i], dcs = fc(dct);
              dr[j] = dcs * gg * gi * (T(1) - gi);
              dr[H + j] = dcs * cp[i] * gf * (T(1) - gf);
              dr[2 * H + j] = dcs * gi * (T(1) - gg * gg);
              dr[3 * H + j] = fh(dh[i]) * tc[i] * go * (T(1) - go);
              dc[i] = dct * gf;
            }
          }
        };
        if (gc == gh) {
          const auto same = [](T v) { return v; };
          gates(same, same);
        } else {
          const std::int64_t tcx = top_exponent(max_abs(dc, n), gc);
          const std::int64_t e = std::max(th, tcx) == kNone ? gh : std::max(th, tcx);
          *dge = e;
          gates(tcx == kNone ? Pow2<T>::zero() : Pow2<T>(gc - e),
                th == kNone ? Pow2<T>::zero() : Pow2<T>(gh - e));
        }
        break;
      }
      case CellKind::gru: {
        const T* hp = p.Hs[l] + (t - 1) * n;
        // dL/dr carries W_hn h + b_hn and dL/dz carries h_{t-1} - n, either of which may lie
        // far above the band: where dh times them could overflow, the step's gates are
        // formed from dh * 2^-s and kept at 2^(gh + s).
        Pow2<T> ds(0);
        if (th != kNone) {
          T mg = T(0);
          for (std::size_t r = 0; r < R; ++r)
            for (std::size_t j = 0; j < H; ++j)
              mg = std::max({mg, std::abs(G[r * GW + 3 * H + j]), std::abs(hp[r * H + j]) + T(1)});
          if (mg > T(0) && std::isfinite(mg)) {
            constexpr int room = std::numeric_limits<T>::max_exponent - 8;
            const std::int64_t top = th - gh + exponent_of(mg) + exponent_of(double(m_.GH));
            if (top > room) {
              ds = Pow2<T>(room - top);
              *dge = gh + (top - room);
            }
          }
        }
        for (std::size_t r = 0; r < R; ++r) {
          const T* gr = G + r * GW;
          T* dr = dG + r * GW;
          for (std::size_t j = 0; j < H; ++j) {
            const std::size_t i = r * H + j;
            const T rr = gr[j], z = gr[H + j], nn = gr[2 * H + j], ghn = gr[3 * H + j];
            const T d = ds(dh[i]);
            const T dzn = d * (T(1) - z) * (T(1) - nn * nn);
            const T dzz = d * (hp[i] - nn) * z * (T(1) - z);
            const T dzr = dzn * ghn * rr * (T(1) - rr);
            dr[j] = dzr;
            dr[H + j] = dzz;
            dr[2 * H + j] = dzn * rr;  // through W_hn h + b_hn
            dr[3 * H + j] = dzn;       // through W_in x + b_in
            tmp[i] = dh[i] * z;
          }
        }
        break;
      }
    }
    // dL/dh_{t-1} = dL/dgates_hh W~_hh at 2^(dge + e) (+ z * dL/dh_t for GRU, at 2^gh).
    step_gemm(R, H, m_.GH, dG, GW, whh.w, H, dhn, H);
    const std::int64_t ep = *dge + whh.e;
    if (gru && ep == gh) {
      for (std::size_t i = 0; i < n; ++i) dhn[i] += tmp[i];
    } else if (gru) {
      const std::int64_t ta = top_exponent(max_abs(dhn, n), ep),
                         tb = top_exponent(max_abs(tmp, n), gh);
      const std::int64_t c = std::max(ta, tb) == kNone ? ep : std::max(ta, tb);
      scale_pow2(dhn, n, clamp_shift(ep - c));
      add_pow2(dhn, tmp, n, gh - c);
      gh = c;
    }
    if (!gru) gh = ep;
    std::swap(dh, dhn);
    const MaxAbs sh = max_abs(dh, n);
    int kk = sh.finite ? rescale_exponent<T>(sh.value) : 0;
    if (kk != 0) {
      scale_pow2(dh, n, -kk);
      gh += kk;
    }
    th = top_exponent(sh, gh - kk);
    if (lstm) {
      const MaxAbs sc = max_abs(dc, n);
      kk = sc.finite ? rescale_exponent<T>(sc.value) : 0;
      if (kk != 0) {
        scale_pow2(dc, n, -kk);
        gc += kk;
      }
    }
    if (abort_.load(std::memory_order_relaxed)) return;
    if (polls) cancel_.poll();
  }
  record(Grad::state, p, l, t_lo, dh, gh, have, window);
  if (lstm) record(Grad::cell, p, l, t_lo, dc, gc, have, window);
}

// rows x in_l gradient of the layer's input: dL/dgates_ih W~_ih, row by row (each row keeps
// the exponent of its step, plus W_ih's).
template <class T>
void Pass<T>::vertical(Part<T>& p, std::size_t l, const T* dG, std::size_t rows, T* out) const {
  (void)p;
  const std::size_t in = m_.in[l];
  bool first = true;
  for (const ColumnRun& b : m_.ih) {
    gemm(Trans::N, Trans::N, rows, in, b.width, dG + b.col, m_.GW, m_.w_ih[l].w + b.row * in, in,
         first ? T(0) : T(1), out, in);
    first = false;
  }
}

// Weight and bias gradients summed over steps: D holds `steps` blocks of R rows (leading
// dimension ld), block t at 2^ex[t] (nz[t] false: zero, contents undefined). The products
// are formed at a common power-of-two scale chosen from the true magnitudes of D_t and M_t,
// never from D's recorded exponents alone, so that each step's term keeps its precision
// wherever the gradients and the states lie. D is rescaled in place.
template <class T>
void Pass<T>::step_grads(Part<T>& p, T* D, std::size_t ld, std::size_t steps,
                         const std::vector<std::int64_t>& ex, const std::vector<char>& nz,
                         std::initializer_list<StepProduct<T>> products) const {
  constexpr int band = std::numeric_limits<T>::max_exponent / 5;
  const std::size_t R = p.R, blk = R * ld;
  std::vector<std::int64_t> a(steps, kNone);  // exponent of max|D_t| * 2^ex[t]
  std::int64_t C = kNone, lowest = kNone;     // the largest a[t]; the lowest ex[t] of those
  // The products run over the steps lo..hi between the first and the last nonzero block
  // (truncation leaves the steps before a boundary without gradient); zero blocks in
  // between are written as zeros.
  std::size_t lo = steps, hi = 0;
  for (std::size_t t = 0; t < steps; ++t) {
    if (!nz[t]) continue;
    a[t] = top_exponent(max_abs(D + t * blk, blk), ex[t]);
    C = std::max(C, a[t]);
    if (a[t] != kNone) lowest = lowest == kNone ? ex[t] : std::min(lowest, ex[t]);
    lo = std::min(lo, t);
    hi = t;
  }
  for (std::size_t t = lo; t < hi; ++t)
    if (!nz[t]) std::fill(D + t * blk, D + (t + 1) * blk, T(0));
  const bool any = C != kNone;
  std::size_t rows_out = 0;
  for (const StepProduct<T>& q : products) {
    rows_out = 0;
    for (const ColumnRun& b : *q.blocks) rows_out = std::max(rows_out, b.row + b.width);
    p.pg[q.index].assign(rows_out * (q.M ? q.width : 1), T(0));
    p.pnz[q.index] = any ? 1 : 0;
  }
  if (!any) return;
  auto gemm_blocks = [&](const StepProduct<T>& q, const T* Dm, const T* M, std::size_t rows,
                         bool first) {
    T* out = p.pg[q.index].data();
    for (const ColumnRun& b : *q.blocks)
      gemm(Trans::T, Trans::N, b.width, q.width, rows, Dm + b.col, ld, M, q.width,
           first ? T(0) : T(1), out + b.row * q.width, q.width);
  };
  auto chunk_steps = [&](const StepProduct<T>& q) {
    return std::max<std::size_t>(1, kChunkEntries / (blk + R * q.width));
  };
  // A weight gradient formed at 2^at whose largest entry lies below 2^-2band there, far
  // below the products of its factors' in-band maxima: the steps' rows may have met only in
  // their small entries (M_t largest in a row where D_t is 0, and the reverse). It is formed
  // again at each row's own scale from D_t at 2^e(t) (kZeroRows: no products).
  auto reform = [&](const StepProduct<T>& q, const T* Dm, std::int64_t at, auto e) {
    const std::vector<T>& g = p.pg[q.index];
    const MaxAbs s = max_abs(g.data(), g.size());
    if (!s.finite || s.value >= std::ldexp(1.0, -2 * band)) return;
    std::vector<std::int64_t> ge(hi + 1 - lo);
    for (std::size_t t = lo; t <= hi; ++t) ge[t - lo] = e(t);
    ProductRows<T> f;
    f.rows = (hi + 1 - lo) * R;
    f.d = Dm + lo * blk;
    f.ldd = ld;
    f.runs = q.blocks;
    f.exp = ge.data();
    f.group = R;
    f.m = q.M + lo * R * q.width;
    f.width = q.width;
    const auto k = rescaled_weight_grad(f, at, chunk_steps(q) * R,
                                        [&](const T* ds, const T* ms, std::size_t n, bool first) {
                                          gemm_blocks(q, ds, ms, n, first);
                                        });
    if (k) p.pexp[q.index] = *k;
  };
  // Per product: the exponent of max|M_t| (kNone: M_t is zero, or D_t is).
  std::vector<std::vector<std::int64_t>> mes(products.size());
  // Products whose M_t left the band: step t's term D_t^T M_t is formed from D_t * 2^(ex_t +
  // m_t - P) and M_t * 2^-m_t (m_t: M_t's binary exponent), P the largest term's exponent.
  // Their entries are at most about 1, so nothing overflows and every term within the
  // precision of the largest keeps its digits. They read D before it is rescaled below.
  std::vector<char> in_band(products.size(), 1);
  {
    std::size_t qi = 0;
    for (const StepProduct<T>& q : products) {
      const std::size_t qb = R * q.width;
      if (!q.M) {
        ++qi;
        continue;
      }
      std::vector<std::int64_t>& me = mes[qi];
      me.assign(steps, kNone);
      std::int64_t P = kNone;
      for (std::size_t t = 0; t < steps; ++t) {
        const MaxAbs s = max_abs(q.M + t * qb, qb);
        if (s.finite && s.value > 0 && a[t] != kNone) {
          me[t] = exponent_of(s.value);
          if (rescale_exponent<T>(s.value) != 0) in_band[qi] = 0;
          P = std::max(P, a[t] + me[t]);
        }
      }
      if (!in_band[qi]) {
        p.pexp[q.index] = P == kNone ? 0 : P;
        const std::size_t cs = chunk_steps(q);
        std::vector<T> Gs(std::min(cs, steps) * blk), Ms(std::min(cs, steps) * qb);
        bool first = true;
        for (std::size_t t0 = lo; t0 <= hi && P != kNone; t0 += cs) {
          const std::size_t t1 = std::min(hi + 1, t0 + cs);
          for (std::size_t t = t0; t < t1; ++t) {
            T* gs = Gs.data() + (t - t0) * blk;
            T* ms = Ms.data() + (t - t0) * qb;
            if (a[t] == kNone || me[t] == kNone) {
              std::fill(gs, gs + blk, T(0));
              std::fill(ms, ms + qb, T(0));
              continue;
            }
            std::copy(D + t * blk, D + (t + 1) * blk, gs);
            scale_pow2(gs, blk, clamp_shift(ex[t] + me[t] - P));
            std::copy(q.M + t * qb, q.M + (t + 1) * qb, ms);
            scale_pow2(ms, qb, clamp_shift(-me[t]));
          }
          gemm_blocks(q, Gs.data(), Ms.data(), (t1 - t0) * R, first);
          first = false;
        }
        Gs = std::vector<T>();  // the rows formed again below take their place
        Ms = std::vector<T>();
        if (P != kNone)
          reform(q, D, P, [&](std::size_t t) { return me[t] == kNone ? kZeroRows : ex[t]; });
      }
      ++qi;
    }
  }
  // Everything else at D's common exponent E. E = C puts the largest entries near 1; any E
  // up to `room` below C keeps every product and sum in range (M_t inside the band), and an
  // E at or below every step's own exponent scales no step down, so that no entry is lost to
  // the subnormals and the rows can still be formed again at their own scales.
  const std::size_t rows = (hi + 1 - lo) * R;
  const std::int64_t room =
      std::numeric_limits<T>::max_exponent - band - 4 - (exponent_of(double(rows)) + 1);
  const std::int64_t E = std::max(C - room, std::min(C, lowest));
  for (std::size_t t = 0; t < steps; ++t)
    if (a[t] != kNone) scale_pow2(D + t * blk, blk, clamp_shift(ex[t] - E));
  std::size_t qi = 0;
  for (const StepProduct<T>& q : products) {
    const std::vector<std::int64_t>& me = mes[qi];
    if (!in_band[qi++]) continue;
    p.pexp[q.index] = E;
    if (q.M) {
      gemm_blocks(q, D + lo * blk, q.M + lo * R * q.width, rows, true);
      reform(q, D, E, [&](std::size_t t) { return me[t] == kNone ? kZeroRows : E; });
      continue;
    }
    std::vector<double> s(p.pg[q.index].size(), 0.0);
    for (std::size_t r = lo * R; r < (hi + 1) * R; ++r) {
      const T* d = D + r * ld;
      for (const ColumnRun& b : *q.blocks)
        for (std::size_t j = 0; j < b.width; ++j) s[b.row + j] += double(d[b.col + j]);
    }
    for (std::size_t j = 0; j < s.size(); ++j) p.pg[q.index][j] = static_cast<T>(s[j]);
  }
}

template <class T>
void Pass<T>::param_grads(Part<T>& p, std::size_t l, T* dG, const std::vector<std::int64_t>& ex,
                          const std::vector<char>& nz) const {
  const std::size_t n = p.R * m_.H, iw = static_cast<std::size_t>(m_.pi[l]);
  const T* X = l == 0 ? p.X : p.Hs[l - 1] + n;
  const T* Hp = p.Hs[l];
  if (m_.bias)
    step_grads(p, dG, m_.GW, Tn_, ex, nz,
               {{X, m_.in[l], &m_.ih, iw},
                {Hp, m_.H, &m_.hh, iw + 1},
                {nullptr, 0, &m_.ih, iw + 2},
                {nullptr, 0, &m_.hh, iw + 3}});
  else
    step_grads(p, dG, m_.GW, Tn_, ex, nz, {{X, m_.in[l], &m_.ih, iw}, {Hp, m_.H, &m_.hh, iw + 1}});
}

template <class T>
void Pass<T>::backward(Part<T>& p, bool polls) const {
  const std::size_t R = p.R, H = m_.H, n = R * H, L = m_.L;
  if (req_.truncation != Truncation::window) {
    std::copy(p.Utop, p.Utop + (Tn_ + 1) * n, p.U);
    p.uexp = p.topexp;
    p.unz = p.topnz;
    for (std::size_t li = L; li-- > 0;) {
      carry(p, li, Tn_, 0, Up<T>{p.U, p.uexp.data(), p.unz.data(), 0, Tn_}, false, polls);
      if (abort_.load(std::memory_order_relaxed)) return;
      if (li > 0) {
        vertical(p, li, p.Gt[li], Tn_ * R, p.V + n);
        p.vnz.assign(Tn_ + 1, 0);
        for (std::size_t t = 1; t <= Tn_; ++t) {
          p.vexp[t] = p.gexp[li][t - 1] + m_.w_ih[li].e;
          p.vnz[t] = p.gnz[li][t - 1];
          if (p.vnz[t]) into_band(p.V + t * n, n, p.vexp[t]);
        }
        std::swap(p.U, p.V);
        std::swap(p.uexp, p.vexp);
        std::swap(p.unz, p.vnz);
      }
      param_grads(p, li, p.Gt[li], p.gexp[li], p.gnz[li]);
    }
    return;
  }
  // Window truncation: each step's loss term is carried back through at most k steps,
  // every layer, on its own; gates, states and parameter gradients are summed.
  const std::size_t k = static_cast<std::size_t>(req_.window);
  const std::size_t GW = m_.GW;
  for (std::size_t s = Tn_; s >= 1; --s) {
    if (!p.topnz[s]) continue;
    const std::size_t s0 = s > k ? s - k : 0, w = s - s0;
    Up<T> up{p.Utop + s * n, &p.topexp[s], &p.topnz[s], s, s};
    for (std::size_t li = L; li-- > 0;) {
      carry(p, li, s, s0, up, true, polls);
      if (abort_.load(std::memory_order_relaxed)) return;
      for (std::size_t i = 0; i < w; ++i) {
        if (!p.wnz[i]) continue;
        const std::size_t t = s0 + 1 + i;
        accumulate(p.DGA[li] + (t - 1) * R * GW, p.dgaexp[li][t - 1], p.dganz[li][t - 1],
                   p.Wd + i * R * GW, p.wexp[i], R * GW);
      }
      if (li > 0) {
        vertical(p, li, p.Wd, w * R, p.Wx);
        p.wxexp.assign(w, 0);
        p.wxnz.assign(p.wnz.begin(), p.wnz.begin() + static_cast<std::ptrdiff_t>(w));
        for (std::size_t i = 0; i < w; ++i) {
          p.wxexp[i] = p.wexp[i] + m_.w_ih[li].e;
          if (p.wxnz[i]) into_band(p.Wx + i * n, n, p.wxexp[i]);
        }
        up = Up<T>{p.Wx, p.wxexp.data(), p.wxnz.data(), s0 + 1, s};
      }
    }
  }
  for (std::size_t li = 0; li < L; ++li) param_grads(p, li, p.DGA[li], p.dgaexp[li], p.dganz[li]);
  gather_window_norms(p);
}

template <class T>
void Pass<T>::gather_window_norms(Part<T>& p) const {
  const std::size_t n = p.R * m_.H;
  const bool lstm = m_.cell == CellKind::lstm;
  for (std::size_t l = 0; l < m_.L; ++l)
    for (std::size_t t = 0; t <= Tn_; ++t) {
      const T* a = p.SA[l] + t * n;
      record(Grad::state, p, l, t, a, p.saexp[l][t], p.sanz[l][t] != 0, false);
      if (lstm)
        record(Grad::cell, p, l, t, p.CA[l] + t * n, p.caexp[l][t], p.canz[l][t] != 0, false);
    }
}

}  // namespace

// ---- names, shapes, initialisation ----------------------------------------------------------

CellKind parse_cell(const std::string& name) {
  return static_cast<CellKind>(parse_name("cell", name, kCellNames));
}
const std::vector<std::string>& cell_names() {
  return kCellNames;
}
int gate_count(CellKind cell) {
  switch (cell) {
    case CellKind::lstm:
      return 4;
    case CellKind::gru:
      return 3;
    default:
      return 1;
  }
}

RecurrentInitKind RecurrentInit::parse_kind(const std::string& name) {
  return static_cast<RecurrentInitKind>(parse_name("init", name, kInitNames));
}
const std::vector<std::string>& RecurrentInit::names() {
  return kInitNames;
}

void RecurrentShape::validate() const {
  auto pos = [](const char* what, int v) {
    if (v <= 0)
      throw std::invalid_argument(std::string(what) + " must be a positive integer; got " +
                                  std::to_string(v));
  };
  pos("input_size", input_size);
  pos("hidden_size", hidden_size);
  pos("num_layers", num_layers);
  if (output_size < 0)
    throw std::invalid_argument("output_size must be positive (or absent); got " +
                                std::to_string(output_size));
  const int gates = gate_count(cell), most = std::numeric_limits<int>::max() / gates;
  if (hidden_size > most)
    throw std::invalid_argument("hidden_size must be at most " + std::to_string(most) +
                                " for cell '" + kCellNames[static_cast<std::size_t>(cell)] +
                                "' (its " + std::to_string(gates) +
                                " gates times hidden_size rows must fit 32-bit BLAS sizes); got " +
                                std::to_string(hidden_size));
}

double RecurrentShape::param_count() const {
  double n = 0;
  for (const auto& shp : param_shapes()) {
    double k = 1;
    for (const std::int64_t d : shp) k *= double(d);
    n += k;
  }
  return n;
}

double RecurrentShape::largest_param() const {
  const double gh = double(gate_count(cell)) * hidden_size;
  return std::max({gh * input_size, gh * hidden_size, double(output_size) * hidden_size});
}

std::vector<std::string> RecurrentShape::param_names() const {
  std::vector<std::string> out;
  for (int l = 0; l < num_layers; ++l) {
    const std::string sfx = "_l" + std::to_string(l);
    out.push_back("weight_ih" + sfx);
    out.push_back("weight_hh" + sfx);
    if (bias) {
      out.push_back("bias_ih" + sfx);
      out.push_back("bias_hh" + sfx);
    }
  }
  if (output_size > 0) {
    out.push_back("readout.weight");
    out.push_back("readout.bias");
  }
  return out;
}

std::vector<std::vector<std::int64_t>> RecurrentShape::param_shapes() const {
  const std::int64_t gh = std::int64_t{gate_count(cell)} * hidden_size;
  std::vector<std::vector<std::int64_t>> out;
  for (int l = 0; l < num_layers; ++l) {
    out.push_back({gh, l == 0 ? input_size : hidden_size});
    out.push_back({gh, hidden_size});
    if (bias) {
      out.push_back({gh});
      out.push_back({gh});
    }
  }
  if (output_size > 0) {
    out.push_back({output_size, hidden_size});
    out.push_back({output_size});
  }
  return out;
}

template <class T>
void RecurrentChain<T>::layout() {
  shape_.validate();
  const auto shapes = shape_.param_shapes();
  if (params_.size() != shapes.size())
    throw std::invalid_argument("expected " + std::to_string(shapes.size()) +
                                " parameter arrays; got " + std::to_string(params_.size()));
  const auto names = shape_.param_names();
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    std::size_t sz = 1;
    for (const std::int64_t d : shapes[i]) sz *= static_cast<std::size_t>(d);
    if (params_[i].size() != sz)
      throw std::invalid_argument(names[i] + " must have " + std::to_string(sz) + " entries; got " +
                                  std::to_string(params_[i].size()));
  }
  idx_.clear();
  const int per = shape_.bias ? 4 : 2;
  for (int l = 0; l < shape_.num_layers; ++l) {
    idx_.push_back(l * per);
    idx_.push_back(l * per + 1);
    idx_.push_back(shape_.bias ? l * per + 2 : -1);
    idx_.push_back(shape_.bias ? l * per + 3 : -1);
  }
  readout_ = shape_.output_size > 0 ? shape_.num_layers * per : -1;
  zeros_.assign(static_cast<std::size_t>(gate_count(shape_.cell) * shape_.hidden_size), T(0));
}

template <class T>
double RecurrentChain<T>::chain_bytes(const RecurrentShape& shape, const RecurrentInit* init) {
  double b = shape.param_count() * sizeof(T);
  if (init) {
    // One parameter in double; for the orthogonal initializer and spectral_radius one
    // gate block twice more (its matrix and LAPACK's transposed copy).
    const double H = shape.hidden_size, in = std::max(shape.input_size, shape.hidden_size);
    b += shape.largest_param() * sizeof(double);
    if (init->kind == RecurrentInitKind::orthogonal || init->spectral_radius > 0)
      b += 2 * H * in * sizeof(double);
  }
  return b;
}

template <class T>
RecurrentChain<T>::RecurrentChain(const RecurrentShape& shape, std::vector<std::vector<T>> params)
    : shape_(shape), params_(std::move(params)) {
  layout();
}

template <class T>
RecurrentChain<T>::RecurrentChain(const RecurrentShape& shape, const RecurrentInit& init,
                                  std::uint64_t seed, Canceller* cancel)
    : shape_(shape) {
  shape_.validate();
  if (init.set_forget_bias && (shape.cell != CellKind::lstm || !shape.bias))
    throw std::invalid_argument("forget_bias applies to an LSTM with biases only");
  if (!(init.spectral_radius >= 0.0) || !std::isfinite(init.spectral_radius))
    throw std::invalid_argument("spectral_radius must be a finite positive number");
  check_memory(chain_bytes(shape_, &init), "storing the chain's parameters");
  // LAPACK's QR and eigenvalue routines (orthogonal init, spectral_radius) gain little from
  // OpenBLAS's threads at these sizes and lose several times over when the cores are busy.
  BlasThreads one(1);
  const auto shapes = shape_.param_shapes();
  const auto names = shape_.param_names();
  params_.resize(shapes.size());
  const Philox rng(seed);
  const std::size_t H = static_cast<std::size_t>(shape.hidden_size);
  const std::size_t G = static_cast<std::size_t>(gate_count(shape.cell));
  const double k = 1.0 / std::sqrt(double(H));
  std::size_t i = 0;
  std::vector<double> buf;
  // Streams: (layer, which parameter, gate block) never share random numbers.
  auto stream_id = [](std::size_t layer, std::size_t which, std::size_t block) {
    return static_cast<std::uint64_t>((layer * 4 + which) * 8 + block);
  };
  auto uniform = [&](std::size_t n, double a, std::uint64_t id) {
    buf.resize(n);
    fill_uniform_pm1(rng, weight_stream(id), buf.data(), n, cancel, a);
  };
  for (std::size_t l = 0; l < static_cast<std::size_t>(shape.num_layers); ++l) {
    for (std::size_t which = 0; which < (shape.bias ? 4u : 2u); ++which, ++i) {
      const std::size_t fan_in = static_cast<std::size_t>(shapes[i].size() == 2 ? shapes[i][1] : 0);
      const std::size_t n = which < 2 ? G * H * fan_in : G * H;
      const double gain = which == 0 ? init.gain : which == 1 ? init.recurrent_gain : 1.0;
      if (init.kind == RecurrentInitKind::uniform) {
        uniform(n, k * gain, stream_id(l, which, 7));
      } else if (which >= 2) {
        buf.assign(n, 0.0);
      } else {
        buf.resize(n);
        InitSpec spec;
        spec.gain = gain;
        switch (init.kind) {
          case RecurrentInitKind::xavier_normal:
            spec.kind = InitKind::xavier_normal;
            break;
          case RecurrentInitKind::orthogonal:
            spec.kind = which == 1 ? InitKind::orthogonal : InitKind::xavier_uniform;
            break;
          case RecurrentInitKind::normal:
            spec.kind = InitKind::normal;
            spec.sigma_w = gain;
            spec.gain = 1.0;
            break;
          default:
            spec.kind = InitKind::xavier_uniform;
            break;
        }
        for (std::size_t gb = 0; gb < G; ++gb)
          init_weight(buf.data() + gb * H * fan_in, static_cast<int>(H), static_cast<int>(fan_in),
                      spec, rng, stream_id(l, which, gb), cancel);
      }
      if (which == 1 && init.spectral_radius > 0.0) {
        std::vector<double> a(H * H), wr(H), wi(H);
        for (std::size_t gb = 0; gb < G; ++gb) {
          if (cancel) cancel->poll();
          double* blk = buf.data() + gb * H * H;
          std::copy(blk, blk + H * H, a.begin());
          if (blas::eigvals(static_cast<int>(H), a.data(), static_cast<int>(H), wr.data(),
                            wi.data()) != 0)
            throw std::runtime_error("LAPACK geev failed while setting the spectral radius");
          double rho = 0.0;
          for (std::size_t j = 0; j < H; ++j) rho = std::max(rho, std::hypot(wr[j], wi[j]));
          if (!(rho > 0.0))
            throw std::invalid_argument(
                "spectral_radius: weight_hh has spectral radius 0 and cannot be rescaled");
          for (std::size_t j = 0; j < H * H; ++j) blk[j] *= init.spectral_radius / rho;
        }
      }
      if (init.set_forget_bias && which >= 2)
        for (std::size_t j = H; j < 2 * H; ++j) buf[j] = which == 2 ? init.forget_bias : 0.0;
      params_[i].assign(buf.begin(), buf.end());
    }
  }
  if (shape.output_size > 0) {
    const std::size_t O = static_cast<std::size_t>(shape.output_size);
    const std::size_t Lr = static_cast<std::size_t>(shape.num_layers);
    uniform(O * H, k, stream_id(Lr, 0, 0));
    params_[i++].assign(buf.begin(), buf.end());
    uniform(O, k, stream_id(Lr, 1, 0));
    params_[i++].assign(buf.begin(), buf.end());
  }
  layout();
}

// ---- running ----------------------------------------------------------------------------------

namespace {
// Whether a run splits the batch in two parts (by the problem's size alone, so that the
// results do not depend on the thread count; the parts run on two threads where there
// are two).
bool two_parts(const RecurrentShape& s, int steps, int batch) {
  const double step_work =
      double(batch) * gate_count(s.cell) * double(s.hidden_size) * double(s.hidden_size);
  return batch >= 2 && double(steps) * s.num_layers * step_work >= kOwnThreadsWork;
}
}  // namespace

template <class T>
double RecurrentChain<T>::run_bytes(int steps, int batch, const RecurrentRequest& req) const {
  const double Tn = steps, B = batch, H = shape_.hidden_size, L = shape_.num_layers;
  const bool lstm = shape_.cell == CellKind::lstm, window = req.truncation == Truncation::window;
  const double GW = shape_.cell == CellKind::gru || lstm ? 4 * H : H;
  const double in0 = shape_.input_size, in_max = std::max(in0, L > 1 ? H : 0.0);
  const double O = shape_.output_size > 0 ? shape_.output_size : H;
  const double P = two_parts(shape_, steps, batch) ? 2 : 1;
  const double k = window ? std::min<double>(req.window, Tn) : 0;
  const double params = shape_.param_count();
  // Numbers in the buffer the parts share out (Pass::allocate), 16 of padding per piece.
  double e = Tn * B * in0;                     // input copy
  e += L * (Tn + 1) * B * H * (lstm ? 2 : 1);  // states (and cells)
  e += L * Tn * B * (GW + (lstm ? H : 0));     // gates (and tanh of the cells)
  e += B * GW;                                 // one step's recurrent product
  double pieces = 2 + L * (lstm ? 4 : 2);
  double bytes = 8 * L * P;  // per layer, per part: pointers
  if (!req.forward_only) {
    e += (L > 1 ? 3 : 2) * (Tn + 1) * B * H + 4 * B * H;  // upstream gradients, carry
    pieces += 7;
    if (window) {
      e += L * Tn * B * GW + L * (Tn + 1) * B * H * (lstm ? 2 : 1) + k * B * (GW + H);
      pieces += L * (lstm ? 3 : 2) + 2;
    }
    // Per part, per step: the upstream and carried gradients' exponents and flags, the
    // top's, every layer's gates' and the log10 norms; the window's accumulators'.
    double per_step = 3 * 9 + L * 9 + L * 8 * (lstm ? 2 : 1);
    if (window) per_step += L * 9 * (lstm ? 3 : 2);
    bytes += P * (per_step * (Tn + 1) + 18 * k);
    // Per part: its parameter gradients; the loss terms; the largest layer's parameter
    // gradient scratch (steps whose states left the float band are rescaled in copies); the
    // steps' exponents of D and of each M, and of rows formed again at their own scales.
    bytes += P * params * sizeof(T);
    e += 2 * (req.target_every_step ? Tn : 1) * B * O;
    e += Tn * B * (in_max + GW);
    bytes += P * 4 * Tn * 8;
    // The parts' sum, its norms, and the result's state norms and kept gradients.
    bytes += params * sizeof(T) + 24 * double(params_.size());
    bytes += L * (Tn + 1) * 8 * (lstm ? 2 : 1);
    if (req.keep_grads) e += L * (Tn + 1) * B * H * (lstm ? 2 : 1);
    // scaled copies for weight gradients over states outside the band
    const double width = std::max<double>({GW, double(shape_.input_size), H});
    e += std::max<double>(kChunkEntries, 2 * B * width);
  } else {
    e += Tn * B * H;  // the output
  }
  e += L * B * H * (lstm ? 2 : 1);  // h_n, c_n
  bytes += params * sizeof(T);      // scaled copies of out-of-band weights
  bytes += L * GW * H * sizeof(T);  // transposed recurrent weights
  return (e + 16 * pieces * P) * sizeof(T) + bytes;
}

template <class T>
RecurrentResult<T> RecurrentChain<T>::run(const T* x, int steps, int batch,
                                          const RecurrentRequest& req, Canceller& cancel) const {
  if (steps <= 0)
    throw std::invalid_argument("x must have at least one timestep; got " + std::to_string(steps));
  if (batch <= 0)
    throw std::invalid_argument("batch must be positive; got " + std::to_string(batch));
  if (req.truncation != Truncation::none && req.window <= 0)
    throw std::invalid_argument("truncate must be a positive integer; got " +
                                std::to_string(req.window));
  if (double(steps) * batch > std::numeric_limits<int>::max())
    throw std::invalid_argument("x must hold at most 2**31 - 1 steps times sequences; got " +
                                std::to_string(steps) + " x " + std::to_string(batch));
  // Buffers kept from an earlier run are reused or freed before anything is allocated.
  std::unique_lock<std::mutex> lock(ws_mutex_, std::try_to_lock);
  const double bytes = run_bytes(steps, batch, req);
  check_memory(bytes, "this run", lock.owns_lock() ? double(ws_.capacity()) * sizeof(T) : 0.0);

  Model<T> m;
  m.cell = shape_.cell;
  m.H = static_cast<std::size_t>(shape_.hidden_size);
  m.L = static_cast<std::size_t>(shape_.num_layers);
  m.G = static_cast<std::size_t>(gate_count(shape_.cell));
  m.GH = m.G * m.H;
  m.GW = (shape_.cell == CellKind::lstm || shape_.cell == CellKind::gru) ? 4 * m.H : m.H;
  m.O = static_cast<std::size_t>(std::max(shape_.output_size, 0));
  m.bias = shape_.bias;
  m.n_params = params_.size();
  m.scaled.reserve(2 * m.L + 1);
  for (std::size_t l = 0; l < m.L; ++l) {
    m.in.push_back(l == 0 ? static_cast<std::size_t>(shape_.input_size) : m.H);
    const int* ix = idx_.data() + 4 * l;
    m.pi.push_back(ix[0]);
    m.w_ih.push_back(m.weight(params_[static_cast<std::size_t>(ix[0])]));
    m.w_hh.push_back(m.weight(params_[static_cast<std::size_t>(ix[1])]));
    std::vector<T>& wt = m.whh_t.emplace_back(m.GH * m.H);
    for (std::size_t j = 0; j < m.GH; ++j)
      for (std::size_t i = 0; i < m.H; ++i) wt[i * m.GH + j] = m.w_hh.back().w[j * m.H + i];
    m.b_ih.push_back(ix[2] >= 0 ? params_[static_cast<std::size_t>(ix[2])].data() : zeros_.data());
    m.b_hh.push_back(ix[3] >= 0 ? params_[static_cast<std::size_t>(ix[3])].data() : zeros_.data());
  }
  if (readout_ >= 0) {
    m.p_out = readout_;
    m.w_out = m.weight(params_[static_cast<std::size_t>(readout_)]);
    m.out = {{0, 0, m.O}};
    m.b_out = params_[static_cast<std::size_t>(readout_) + 1].data();
  }
  if (m.cell == CellKind::gru) {
    m.ih = {{0, 0, 2 * m.H}, {2 * m.H, 3 * m.H, m.H}};
    m.hh = {{0, 0, 3 * m.H}};
  } else {
    m.ih = {{0, 0, m.GH}};
    m.hh = {{0, 0, m.GH}};
  }

  const std::size_t Tn = static_cast<std::size_t>(steps), B = static_cast<std::size_t>(batch);
  const std::size_t H = m.H, L = m.L;
  const bool lstm = m.cell == CellKind::lstm;
  const double step_work = double(B) * double(m.GH) * double(H);
  // The batch is split in two by the problem's size alone, never by the thread count, and
  // the halves' sums are combined in a fixed order: the results are the same whether the
  // halves run on two threads or one after the other.
  const bool two = two_parts(shape_, steps, batch);
  bool parallel = false;
#ifdef _OPENMP
  parallel = two && max_threads() > 1;
#endif
  // An unsplit batch with large products splits each product's columns in two instead.
  const bool halves = !two && step_work >= kThreadedGemmWork;
  bool team = false;
#ifdef _OPENMP
  team = halves && max_threads() > 1;
#endif
  BlasThreads threads(1);

  RecurrentResult<T> res;
  res.norm_type = req.norm_type;
  if (req.keep_grads && !req.forward_only) {
    res.state_grads.assign(L * (Tn + 1) * B * H, T(0));
    if (lstm) res.cell_grads.assign(L * (Tn + 1) * B * H, T(0));
  }
  std::vector<Part<T>> parts(two ? 2 : 1);
  if (two) {
    parts[0].r0 = 0;
    parts[0].R = B / 2;
    parts[1].r0 = B / 2;
    parts[1].R = B - B / 2;
  } else {
    parts[0].R = B;
  }
  std::atomic<bool> abort{false};
  Pass<T> pass(m, req, Tn, B, res, cancel, abort, halves, team);
  Arena<T> sizing;
  for (Part<T>& p : parts) pass.allocate(p, sizing);
  // Buffers up to kKeptBytes stay with the chain between runs (saves page faults); a
  // concurrent run on the same chain gets its own.
  constexpr double kKeptBytes = 512.0 * 1024 * 1024;
  const double ws_bytes = double(sizing.used()) * sizeof(T);
  Buffer<T> local;
  Buffer<T>& ws = lock.owns_lock() && ws_bytes <= kKeptBytes ? ws_ : local;
  if (lock.owns_lock() && ws_bytes > kKeptBytes) ws_.release();
  T* base = nullptr;
  try {
    base = ws.get(sizing.used());
  } catch (const std::bad_alloc&) {
    throw MemoryRequestError("could not allocate " + std::to_string(bytes) + " bytes for this run");
  }
  Arena<T> arena(base);
  for (Part<T>& p : parts) {
    pass.allocate(p, arena);
    const std::size_t in0 = m.in[0];
    for (std::size_t t = 0; t < Tn; ++t)
      std::copy(x + (t * B + p.r0) * in0, x + (t * B + p.r0 + p.R) * in0, p.X + t * p.R * in0);
  }
  std::exception_ptr error;
  auto work = [&](Part<T>& p, bool polls) {
    pass.forward(p, polls);
    if (p.bad_layer >= 0 || req.forward_only || abort.load()) return;
    pass.loss(p);
    if (p.bad_layer >= 0 || req.loss_only) return;
    for (std::size_t t = 0; t <= Tn; ++t)
      if (p.topnz[t] && !max_abs(p.Utop + t * p.R * H, p.R * H).finite) {
        p.bad_layer = static_cast<int>(L) - 1;
        p.bad_t = -2;
        return;
      }
    pass.backward(p, polls);
  };
  if (!parallel) {
    for (Part<T>& p : parts) work(p, true);
  } else {
#ifdef _OPENMP
#pragma omp parallel num_threads(team_threads(2))
    {
      const int tid = omp_get_thread_num();
      try {
        work(parts[static_cast<std::size_t>(tid)], tid == 0);
      } catch (...) {
        abort.store(true);
#pragma omp critical(gradchain_rnn_error)
        if (!error) error = std::current_exception();
      }
    }
#endif
  }
  if (error) std::rethrow_exception(error);

  // ---- non-finite values: report the first place ---------------------------------------------
  {
    int bl = -1;
    std::int64_t bt = 0;
    for (const Part<T>& p : parts)
      if (p.bad_layer >= 0 && (bl < 0 || p.bad_t < bt || (p.bad_t == bt && p.bad_layer < bl))) {
        bl = p.bad_layer;
        bt = p.bad_t;
      }
    if (bl >= 0 && bt == -2)
      throw NonFiniteError("loss", -1,
                           "the loss gradient is not finite (the outputs are too large)");
    if (bl >= 0)
      throw NonFiniteError("forward", bt,
                           "the forward pass overflowed at timestep " + std::to_string(bt) +
                               " of layer " + std::to_string(bl) +
                               " (states or pre-activations past the float range); lower "
                               "the weights or the inputs");
  }

  res.h_n.assign(L * B * H, T(0));
  if (lstm) res.c_n.assign(L * B * H, T(0));
  for (const Part<T>& p : parts)
    for (std::size_t l = 0; l < L; ++l) {
      const T* h = p.Hs[l] + Tn * p.R * H;
      std::copy(h, h + p.R * H, res.h_n.data() + (l * B + p.r0) * H);
      if (lstm) {
        const T* c = p.Cs[l] + Tn * p.R * H;
        std::copy(c, c + p.R * H, res.c_n.data() + (l * B + p.r0) * H);
      }
    }
  if (req.forward_only) {
    res.output.assign(Tn * B * H, T(0));
    for (const Part<T>& p : parts)
      for (std::size_t t = 1; t <= Tn; ++t) {
        const T* h = p.Hs[L - 1] + t * p.R * H;
        std::copy(h, h + p.R * H, res.output.data() + ((t - 1) * B + p.r0) * H);
      }
    return res;
  }

  // ---- loss, state norms ---------------------------------------------------------------------
  ScaledSum loss;
  for (const Part<T>& p : parts) loss.add(p.loss);
  if (req.loss == LossKind::grad_output) {
    res.loss = std::numeric_limits<double>::quiet_NaN();
    res.log10_loss = res.loss;
  } else {
    const double terms = req.target_every_step && req.loss != LossKind::probe ? double(Tn) : 1.0;
    const double divisor = req.loss == LossKind::mse ? terms * double(B) * double(m.O ? m.O : H)
                           : req.loss == LossKind::cross_entropy ? terms * double(B)
                                                                 : 1.0;
    res.loss = loss.value(divisor);
    res.log10_loss = loss.log10(divisor);
  }
  if (req.loss_only) return res;
  const std::size_t nn = L * (Tn + 1);
  const double unset = req.state_norms ? kNegInf : std::numeric_limits<double>::quiet_NaN();
  res.log10_state_grad_norms.assign(nn, unset);
  if (lstm) res.log10_cell_grad_norms.assign(nn, unset);
  for (std::size_t i = 0; i < (req.state_norms ? nn : 0); ++i) {
    double s = kNegInf, c = kNegInf;
    for (const Part<T>& p : parts) {
      s = log10_add(s, p.ls[i]);
      if (lstm) c = log10_add(c, p.lc[i]);
    }
    res.log10_state_grad_norms[i] = 0.5 * s;
    if (lstm) res.log10_cell_grad_norms[i] = 0.5 * c;
  }

  // ---- parameter gradients: the parts' sums, norms, clipping ----------------------------------
  const std::size_t np = params_.size();
  std::vector<std::vector<T>> grads(np);
  std::vector<std::int64_t> gexp(np, 0);
  std::vector<double> lp(np, kNegInf);
  res.log10_param_grad_norms.assign(np, kNegInf);
  for (std::size_t i = 0; i < np; ++i) {
    grads[i].assign(params_[i].size(), T(0));
    char nz = 0;
    for (const Part<T>& p : parts)
      if (p.pnz[i])
        accumulate(grads[i].data(), gexp[i], nz, p.pg[i].data(), p.pexp[i], grads[i].size());
    if (!nz) continue;
    {  // into the band, so that the sum of squares can neither underflow nor overflow
      const int k = exponent_of(max_abs(grads[i].data(), grads[i].size()).value);
      scale_pow2(grads[i].data(), grads[i].size(), -k);
      gexp[i] += k;
    }
    const Scan s = scan(grads[i].data(), grads[i].size());
    res.log10_param_grad_norms[i] = log10_norm(s, gexp[i]);
    lp[i] = log10_pnorm(grads[i].data(), grads[i].size(), s, gexp[i], req.norm_type);
  }
  const LogClip lc = log_clip<T>(lp, req.norm_type, req.max_norm);
  res.log10_total_norm = lc.log10_total;
  res.clipped = lc.clipped;
  res.max_norm = lc.clipped ? req.max_norm : 0.0;
  res.log10_clip_coef = lc.log10_coef;
  if (req.keep_grads || req.keep_param_grads) {
    for (std::size_t i = 0; i < np; ++i)
      write_scaled(grads[i].data(), grads[i].size(), gexp[i], lc.coef, grads[i].data(),
                   lc.coef_exp);
    res.param_grads = std::move(grads);
  }
  return res;
}

template class RecurrentChain<float>;
template class RecurrentChain<double>;

}  // namespace gradchain
