#include "gradchain/mlp.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <new>
#include <string>
#include <thread>

#include "gradchain/blas.hpp"
#include "gradchain/parallel.hpp"
#include "gradchain/scaled.hpp"
#include "gradchain/system.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace gradchain {

namespace {

using blas::Trans;
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Workspaces up to this size stay with the chain between passes (saves page faults).
constexpr double kKeptWorkspaceBytes = 512.0 * 1024 * 1024;

// Below this many multiply-adds in a whole pass, waking a second thread costs more than
// it saves.
constexpr double kOwnThreadsWork = 1 << 16;

// Below this many multiply-adds per GEMM, OpenBLAS threads cost more than they save.
constexpr double kThreadedGemmWork = 1 << 20;

// h~ = phi(z~ 2^s) 2^-s for s < 0, without underflow: phi at the true scale where that is
// a normal float (bit for bit what a plain pass computes), and its slope at 0 below that,
// where phi(t) = slope * t to the last bit.
template <class T>
void forward_small(const Activation& act, const T* z, T* h, std::size_t m, int s, T* tmp) {
  constexpr int lo = std::numeric_limits<T>::min_exponent + std::numeric_limits<T>::digits;
  const double sn = act.slope_at_zero(true), sp = act.slope_at_zero(false);
  const double tn = std::ldexp(1.0, lo) / std::min(1.0, sn);
  const double tp = std::ldexp(1.0, lo) / std::min(1.0, sp);
  for (std::size_t i = 0; i < m; ++i) tmp[i] = std::ldexp(z[i], s);
  act.forward(tmp, tmp, m);
  for (std::size_t i = 0; i < m; ++i) {
    const double zi = static_cast<double>(z[i]);
    const bool neg = zi < 0;
    h[i] = std::fabs(std::ldexp(zi, s)) >= (neg ? tn : tp)
               ? static_cast<T>(std::ldexp(static_cast<double>(tmp[i]), -s))
               : static_cast<T>(zi * (neg ? sn : sp));
  }
}

int clamp_exp(std::int64_t k) {
  return static_cast<int>(std::clamp<std::int64_t>(k, -100000, 100000));
}

std::string layer_msg(int l, int depth) {
  return "layer " + std::to_string(l) + " of " + std::to_string(depth);
}

}  // namespace

// ---------------------------------------------------------------------------------------

namespace {
void check_widths(const std::vector<int>& widths) {
  if (widths.size() < 2)
    throw std::invalid_argument("widths must list at least an input and an output width");
  for (std::size_t i = 0; i < widths.size(); ++i)
    if (widths[i] <= 0)
      throw std::invalid_argument("width must be positive; widths[" + std::to_string(i) + "] is " +
                                  std::to_string(widths[i]));
}
}  // namespace

template <class T>
double MLPChain<T>::chain_bytes(const std::vector<int>& widths, const InitSpec* init) {
  double nw = 0, nb = 0, maxw = 0;
  for (std::size_t l = 1; l < widths.size(); ++l) {
    const double wl = double(widths[l]) * double(widths[l - 1]);
    nw += wl;
    nb += widths[l];
    maxw = std::max(maxw, wl);
  }
  const double tables = double(widths.size()) * (sizeof(int) + 2 * sizeof(std::size_t));
  // Drawing a layer: it in double on every thread, and for the orthogonal initializer the
  // Gaussian matrix and LAPACK's transposed copy of it besides.
  const double draw = init ? (init->kind == InitKind::orthogonal ? 3.0 : 1.0) * maxw *
                                 sizeof(double) * max_threads()
                           : 0.0;
  return (nw + nb) * sizeof(T) + tables + draw;
}

template <class T>
void MLPChain<T>::layout() {
  check_widths(widths_);
  woff_.assign(widths_.size(), 0);
  boff_.assign(widths_.size(), 0);
  std::size_t w = 0, b = 0;
  for (std::size_t l = 1; l < widths_.size(); ++l) {
    woff_[l] = w;
    boff_[l] = b;
    w += static_cast<std::size_t>(widths_[l]) * static_cast<std::size_t>(widths_[l - 1]);
    b += static_cast<std::size_t>(widths_[l]);
  }
  woff_[0] = w;  // unused; keeps the table the same length as widths
  boff_[0] = b;
}

template <class T>
MLPChain<T>::MLPChain(std::vector<int> widths, Activation act, const InitSpec& init,
                      std::uint64_t seed, Canceller* cancel)
    : widths_(std::move(widths)), act_(act) {
  check_widths(widths_);
  init.validate();
  const double bytes = chain_bytes(widths_, &init);
  check_memory(bytes, "storing the chain's weights");
  layout();
  try {
    weights_.resize(woff_[0]);
    biases_.resize(boff_[0]);
  } catch (const std::bad_alloc&) {
    throw MemoryRequestError("could not allocate " + std::to_string(bytes) +
                             " bytes for the chain's weights");
  }
  const Philox rng(seed);
  const int depth = this->depth();
  // Each layer draws from its own stream, so the split across threads changes nothing.
  // LAPACK (orthogonal init) runs single-threaded inside the parallel loop.
  BlasThreads one(1);
  struct Scratch {
    std::vector<double> w, b;
  };
  parallel_indices<Scratch>(1, depth + 1, max_threads(), cancel, [&](int l, Scratch& buf) {
    const int fo = widths_[static_cast<std::size_t>(l)];
    const int fi = widths_[static_cast<std::size_t>(l) - 1];
    buf.w.resize(static_cast<std::size_t>(fo) * static_cast<std::size_t>(fi));
    buf.b.resize(static_cast<std::size_t>(fo));
    init_weight(buf.w.data(), fo, fi, init, rng, static_cast<std::uint64_t>(l - 1), cancel);
    init_bias(buf.b.data(), fo, init, rng, static_cast<std::uint64_t>(l - 1));
    std::transform(buf.w.begin(), buf.w.end(), weight(l),
                   [](double v) { return static_cast<T>(v); });
    std::transform(buf.b.begin(), buf.b.end(), bias(l), [](double v) { return static_cast<T>(v); });
  });
  scale_weights();
}

template <class T>
MLPChain<T>::MLPChain(std::vector<int> widths, Activation act, const T* weights,
                      std::size_t n_weights, const T* biases, std::size_t n_biases)
    : widths_(std::move(widths)), act_(act) {
  check_widths(widths_);
  check_memory(chain_bytes(widths_, nullptr), "copying the chain's weights");
  layout();
  if (n_weights != woff_[0])
    throw std::invalid_argument("weights hold " + std::to_string(n_weights) +
                                " numbers; the widths need " + std::to_string(woff_[0]));
  if (n_biases != boff_[0])
    throw std::invalid_argument("biases hold " + std::to_string(n_biases) +
                                " numbers; the widths need " + std::to_string(boff_[0]));
  weights_.assign(weights, weights + n_weights);
  biases_.assign(biases, biases + n_biases);
  scale_weights();
}

template <class T>
void MLPChain<T>::scale_weights() {
  const int L = depth();
  wexp_.assign(static_cast<std::size_t>(L) + 1, 0);
  wscaled_.assign(static_cast<std::size_t>(L) + 1, {});
  for (int l = 1; l <= L; ++l) {
    const std::size_t cnt = static_cast<std::size_t>(widths_[static_cast<std::size_t>(l)]) *
                            static_cast<std::size_t>(widths_[static_cast<std::size_t>(l) - 1]);
    const Scan s = scan(weight(l), cnt);
    if (!s.finite)
      throw std::invalid_argument("weights of layer " + std::to_string(l) +
                                  " must be finite; got NaN or inf");
    const int k = rescale_exponent<T>(s.maxabs);
    if (k == 0) continue;
    auto& c = wscaled_[static_cast<std::size_t>(l)];
    c.assign(weight(l), weight(l) + cnt);
    scale_pow2(c.data(), cnt, -k);
    wexp_[static_cast<std::size_t>(l)] = k;
  }
  zero_biases_ = std::all_of(biases_.begin(), biases_.end(), [](T b) { return b == T(0); });
}

template <class T>
bool MLPChain<T>::log_scale_forward() const {
  return act_.positively_homogeneous() && zero_biases_;
}

template <class T>
bool MLPChain<T>::carries_small_scale() const {
  return act_.linear_near_zero() && zero_biases_;
}

template <class T>
bool MLPChain<T>::two_threads(int batch) const {
#ifdef _OPENMP
  double work = 0;
  for (std::size_t l = 1; l < widths_.size(); ++l)
    work += double(batch) * double(widths_[l]) * double(widths_[l - 1]);
  return max_threads() > 1 && batch >= 2 && work >= kOwnThreadsWork;
#else
  (void)batch;
  return false;
#endif
}

template <class T>
typename MLPChain<T>::PassBytes MLPChain<T>::pass_bytes(int batch,
                                                        const BackwardRequest& req) const {
  const double B = batch, L = depth();
  double acts = 0, maxw = 0, maxn = 0, nw = 0, nb = 0;
  for (std::size_t l = 0; l < widths_.size(); ++l) {
    acts += widths_[l];
    maxn = std::max(maxn, double(widths_[l]));
    if (l > 0) {
      const double wl = double(widths_[l]) * widths_[l - 1];
      maxw = std::max(maxw, wl);
      nw += wl;
      nb += widths_[l];
    }
  }
  const bool two = two_threads(batch);
  double elems = B * acts;                                   // stored h_l
  if (act_.needs_input()) elems += B * (acts - widths_[0]);  // stored z_l
  elems += 4 * B * maxn + maxn;                              // dL/dh twice, dL/dz, dL/db, h~
  if (carries_small_scale()) elems += 2 * B * maxn;          // phi' at the true scale
  if (!req.keep_weight_grads) elems += maxw;                 // one layer's dL/dW
  elems += B * widths_.back();                               // the output
  if (req.keep_weight_grads) elems += nw;
  if (req.keep_bias_grads) elems += nb;
  if (req.keep_activation_grads) elems += B * acts;
  // Per layer: offsets, exponents (of h and z) and shifts, each thread's exponents (of h and
  // z) and maxima, the three norm arrays of the result, the per-parameter norms and
  // exponents for the total norm.
  const double per_layer =
      8 + 16 + 4 + (two ? 2 : 1) * 24 + 24 + 16 + 16 + 16 + 8 + (req.keep_activation_grads ? 8 : 0);
  PassBytes p;
  p.needed = elems * sizeof(T) + per_layer * (L + 2);
  if (two && L > 1 && !req.forward_only) p.pipeline = B * (acts - widths_[0]) * sizeof(T);
  return p;
}

template <class T>
double MLPChain<T>::backward_bytes(int batch, const BackwardRequest& req) const {
  const PassBytes p = pass_bytes(batch, req);
  return p.needed + p.pipeline;
}

template <class T>
BackwardResult<T> MLPChain<T>::backward(const T* x, int batch, const BackwardRequest& req,
                                        Canceller& cancel) const {
  if (batch <= 0)
    throw std::invalid_argument("batch must be positive; got " + std::to_string(batch));
  const int L = depth();
  const std::size_t B = static_cast<std::size_t>(batch);
  const auto n = [&](int l) {
    return static_cast<std::size_t>(widths_[static_cast<std::size_t>(l)]);
  };
  const bool homog = log_scale_forward();
  const bool small = carries_small_scale();
  const bool keep_z = act_.needs_input();

  // A workspace kept from an earlier pass is reused or freed before anything is allocated.
  std::unique_lock<std::mutex> lock(ws_mutex_, std::try_to_lock);
  const PassBytes need = pass_bytes(batch, req);
  const double held = lock.owns_lock() ? ws_.bytes() : 0.0;
  check_memory(need.needed, req.forward_only ? "this forward pass" : "this backward pass", held);
  const double bytes = need.needed + need.pipeline;

  double max_work = 0;
  for (int l = 1; l <= L; ++l)
    max_work = std::max(max_work, double(B) * double(n(l)) * double(n(l - 1)));
  // With OpenMP and a batch to split, two threads of gradchain's own beat OpenBLAS's
  // threads at every size (see the README); otherwise large GEMMs get BLAS threads.
  const bool two_threads = this->two_threads(batch);
  const int cores = std::max(max_threads(), blas_threads());
  const bool threaded_gemm = !two_threads && max_work >= kThreadedGemmWork && cores > 1;
  BlasThreads threads(threaded_gemm ? cores : 1);
  ElementwiseThreads elementwise(threaded_gemm ? 1 : 0);

  // ---- storage -----------------------------------------------------------------------
  std::vector<std::size_t> hoff(static_cast<std::size_t>(L) + 2, 0);
  for (int l = 0; l <= L; ++l)
    hoff[static_cast<std::size_t>(l) + 1] = hoff[static_cast<std::size_t>(l)] + B * n(l);
  std::size_t maxn = 0, maxw = 0;
  for (int l = 0; l <= L; ++l) maxn = std::max(maxn, n(l));
  for (int l = 1; l <= L; ++l) maxw = std::max(maxw, n(l) * n(l - 1));

  Workspace<T> local;
  Workspace<T>& ws = lock.owns_lock() && bytes <= kKeptWorkspaceBytes ? ws_ : local;
  if (lock.owns_lock() && bytes > kKeptWorkspaceBytes) ws_.release();
  T *H, *Z = nullptr, *DW = nullptr;
  try {
    H = ws.h.get(hoff.back());
    if (keep_z) Z = ws.z.get(hoff.back());
    if (!req.keep_weight_grads) DW = ws.dw.get(maxw);
  } catch (const std::bad_alloc&) {
    throw MemoryRequestError("could not allocate " + std::to_string(bytes) +
                             " bytes for this backward pass");
  }
  T* G = ws.g.get(B * maxn);
  T* G2 = ws.g2.get(B * maxn);
  T* DZ = ws.dz.get(B * maxn);
  T* DB = ws.db.get(maxn);
  T* HS = ws.hs.get(B * maxn);
  T *TZ = nullptr, *TH = nullptr;
  if (small) {
    TZ = ws.tz.get(B * maxn);
    TH = ws.th.get(B * maxn);
  }
  auto h = [&](int l) { return H + hoff[static_cast<std::size_t>(l)]; };
  auto z = [&](int l) { return keep_z ? Z + hoff[static_cast<std::size_t>(l)] : nullptr; };
  // h_l = h~_l * 2^e[l], and the stored pre-activation z_l = z~_l * 2^zexp[l]. The
  // exponents are nonzero only where the chain carries its scale in log space: always for
  // a homogeneous chain, and for a chain linear near 0 once its signal decays below the
  // band. 2^shift[l] brings h~_l into the band for the weight-gradient GEMM.
  std::vector<std::int64_t> e(static_cast<std::size_t>(L) + 1, 0);
  std::vector<std::int64_t> zexp(static_cast<std::size_t>(L) + 1, 0);
  std::vector<int> shift(static_cast<std::size_t>(L) + 1, 0);

  BackwardResult<T> res;
  res.norm_type = req.norm_type;

  // ---- forward -------------------------------------------------------------------------
  // Examples do not interact in the forward pass, so with two threads each takes half
  // the batch through the whole chain. Each half carries its own exponents; they are
  // reconciled afterwards.
  struct Part {
    std::size_t r0 = 0, r1 = 0;
    std::vector<std::int64_t> e, zs;
    std::vector<double> hmax;  // of the stored h~
    std::vector<T> tmp;
    int bad = 0;  // first layer with a non-finite or underflowed value, 0 if none
    bool bad_nan = false, bad_underflow = false;
    double bad_value = 0;
    const char* bad_what = "";
    std::exception_ptr error;
  };
  std::atomic<bool> abort{false};
  const bool can_zero =
      act_.kind == Act::relu || (act_.kind == Act::leaky_relu && act_.negative_slope == 0.0);
  auto forward_rows = [&](Part& p, bool polls) {
    const std::size_t R = p.r1 - p.r0;
    p.e.assign(static_cast<std::size_t>(L) + 1, 0);
    p.zs.assign(static_cast<std::size_t>(L) + 1, 0);
    p.hmax.assign(static_cast<std::size_t>(L) + 1, 0.0);
    T* h0 = h(0) + p.r0 * n(0);
    std::copy(x + p.r0 * n(0), x + p.r1 * n(0), h0);
    {
      const Scan s = scan(h0, R * n(0));
      int k = homog || small ? rescale_exponent<T>(s.maxabs) : 0;
      if (small && k > 0) k = 0;  // only a small signal is carried
      scale_pow2(h0, R * n(0), -k);
      p.e[0] = k;
      p.hmax[0] = std::ldexp(s.maxabs, -k);
    }
    for (int l = 1; l <= L; ++l) {
      const std::size_t ul = static_cast<std::size_t>(l), m = R * n(l);
      T* zl = (keep_z ? z(l) : h(l)) + p.r0 * n(l);
      T* hl = h(l) + p.r0 * n(l);
      blas::gemm(Trans::N, Trans::T, static_cast<int>(R), widths_[ul], widths_[ul - 1], T(1),
                 h(l - 1) + p.r0 * n(l - 1), widths_[ul - 1], gemm_weight(l), widths_[ul - 1], T(0),
                 zl, widths_[ul]);
      // z~ is at scale 2^sz; a plain pass and a small signal back in range take it to 1.
      std::int64_t sz = p.e[ul - 1] + wexp_[ul];
      if (!homog && sz > 0) {
        scale_pow2(zl, m, static_cast<int>(std::min<std::int64_t>(sz, 100000)));
        sz = 0;
      }
      if (!homog && !small) {
        if (sz < 0) scale_pow2(zl, m, static_cast<int>(std::max<std::int64_t>(sz, -100000)));
        sz = 0;
        const T* bl = bias(l);
        for (std::size_t r = 0; r < R; ++r) {
          T* row = zl + r * n(l);
          for (std::size_t j = 0; j < n(l); ++j) row[j] += bl[j];
        }
      }
      auto flag = [&](const Scan& sc, const T* a, const char* what) {
        if (sc.finite) return false;
        p.bad = l;
        p.bad_what = what;
        for (std::size_t i = 0; i < m; ++i)
          if (std::isnan(static_cast<double>(a[i]))) p.bad_nan = true;
        return true;
      };
      auto underflow = [&](double mx, const char* what) {
        p.bad = l;
        p.bad_what = what;
        p.bad_underflow = true;
        p.bad_value = mx;
      };
      const Scan sz_scan = scan(zl, m);
      if (flag(sz_scan, zl, "the pre-activation h W^T + b")) return;
      if (sz_scan.maxabs > 0 && sz_scan.maxabs < std::numeric_limits<T>::min()) {
        underflow(sz_scan.maxabs, "the pre-activation h W^T + b");
        return;
      }
      if (small && sz < 0) {
        if (p.tmp.size() < m) p.tmp.resize(m);
        forward_small(act_, zl, hl, m, static_cast<int>(std::max<std::int64_t>(sz, -100000)),
                      p.tmp.data());
      } else {
        act_.forward(zl, hl, m);
      }
      const Scan s = scan(hl, m);
      if (flag(s, hl, "the activation")) return;
      if ((s.maxabs > 0 && s.maxabs < std::numeric_limits<T>::min()) ||
          (s.maxabs == 0 && sz_scan.maxabs > 0 && !can_zero)) {
        underflow(s.maxabs, "the activation");
        return;
      }
      p.zs[ul] = sz;
      int k = 0;
      if (homog) {
        // phi(2^k u) = 2^k phi(u): move the scale into the exponent. The stored z keeps
        // the previous layer's scale; only its sign is used.
        k = rescale_exponent<T>(s.maxabs);
      } else if (small) {
        // A small signal is carried until it is back in the band at scale 1.
        k = rescale_exponent<T>(s.maxabs);
        if (sz + k > 0) k = static_cast<int>(-sz);
      }
      scale_pow2(hl, m, -k);
      p.e[ul] = sz + k;
      p.hmax[ul] = std::ldexp(s.maxabs, -k);
      if (abort.load(std::memory_order_relaxed)) return;
      if (polls) cancel.poll();
    }
  };

  std::vector<Part> parts(two_threads ? 2 : 1);
  for (std::size_t t = 0; t < parts.size(); ++t) {
    parts[t].r0 = B * t / parts.size();
    parts[t].r1 = B * (t + 1) / parts.size();
  }
  if (parts.size() == 1) {
    forward_rows(parts[0], true);
  } else {
#ifdef _OPENMP
#pragma omp parallel num_threads(team_threads(2))
    {
      const auto t = static_cast<std::size_t>(omp_get_thread_num());
      try {
        forward_rows(parts[t], t == 0);
      } catch (...) {
        parts[t].error = std::current_exception();
        abort.store(true);
      }
    }
#endif
  }
  for (const Part& p : parts)
    if (p.error) std::rethrow_exception(p.error);
  {
    const Part* first = nullptr;
    for (const Part& p : parts)
      if (p.bad && (!first || p.bad < first->bad)) first = &p;
    if (first && first->bad_underflow) {
      char buf[96];
      std::snprintf(buf, sizeof buf, "%.3g", first->bad_value);
      throw NonFiniteError(
          "forward", first->bad,
          std::string("the forward pass underflowed in ") + first->bad_what + " at " +
              layer_msg(first->bad, L) + ": its largest value is " + buf +
              ", below the smallest normal " + (sizeof(T) == 4 ? "float32" : "float64") +
              ", so the signal has lost its precision. A vanishing signal is carried in log "
              "space when every bias is zero and the activation is homogeneous (linear, relu, "
              "leaky_relu) or linear near 0 (tanh, gelu, gelu_tanh, silu, elu)");
    }
    if (first)
      throw NonFiniteError(
          "forward", first->bad,
          std::string("the forward pass ") +
              (first->bad_nan ? "produced NaN" : "overflowed to inf") + " in " + first->bad_what +
              " at " + layer_msg(first->bad, L) +
              (first->bad_nan ? "" : "; lower the gain, the weights or the input scale"));
  }
  for (int l = 0; l <= L; ++l) {
    const std::size_t ul = static_cast<std::size_t>(l);
    std::int64_t el = parts[0].e[ul], zl = parts[0].zs[ul];
    for (const Part& p : parts) {
      el = std::max(el, p.e[ul]);
      zl = std::max(zl, p.zs[ul]);
    }
    e[ul] = el;
    zexp[ul] = zl;
    double hm = 0;
    for (const Part& p : parts) {
      hm = std::max(
          hm,
          std::ldexp(p.hmax[ul], static_cast<int>(std::max<std::int64_t>(p.e[ul] - el, -100000))));
      if (p.e[ul] != el) {
        const std::int64_t d = std::max<std::int64_t>(p.e[ul] - el, -100000);
        scale_pow2(h(l) + p.r0 * n(l), (p.r1 - p.r0) * n(l), static_cast<int>(d));
      }
      if (small && keep_z && l > 0 && p.zs[ul] != zl) {
        const std::int64_t d = std::max<std::int64_t>(p.zs[ul] - zl, -100000);
        scale_pow2(z(l) + p.r0 * n(l), (p.r1 - p.r0) * n(l), static_cast<int>(d));
      }
    }
    shift[ul] = -rescale_exponent<T>(hm);
  }

  // ---- loss and dL/dh_L ---------------------------------------------------------------
  const std::size_t mL = B * n(L);
  const T* hL = h(L);
  const std::int64_t eL = e[static_cast<std::size_t>(L)];
  res.output.resize(mL);
  write_scaled(hL, mL, eL, 1.0, res.output.data());
  res.output_log2_scale = eL;
  if (req.forward_only) return res;

  std::int64_t gamma = 0;  // dL/dh_l = G * 2^gamma
  T* g = G;
  switch (req.loss) {
    case LossKind::probe: {
      std::copy(hL, hL + mL, g);
      gamma = eL;
      const Scan s = scan(hL, mL);
      res.log10_loss = std::log10(0.5) + 2.0 * log10_norm(s, eL);
      break;
    }
    case LossKind::mse: {
      const T* y = static_cast<const T*>(req.target);
      const Scan sy = scan(y, mL);
      // (h - y) computed at a common power-of-two scale c: exact where h and y overlap.
      const std::int64_t ey =
          sy.maxabs > 0 ? exponent_of(sy.maxabs) : std::numeric_limits<int>::min() / 2;
      // The common scale is the larger of h's and y's, so that h - y can neither
      // overflow nor square to inf.
      const Scan sh_scan = scan(hL, mL);
      const std::int64_t eh = sh_scan.maxabs > 0 ? eL + exponent_of(sh_scan.maxabs)
                                                 : std::numeric_limits<int>::min() / 2;
      const std::int64_t c = std::max(eh, ey);
      const int sh = static_cast<int>(std::max<std::int64_t>(eL - c, -100000));
      const int sy_ = static_cast<int>(std::max<std::int64_t>(-c, -100000));
      const T norm = static_cast<T>(2.0 / double(mL));
      double ss = 0;
      for (std::size_t i = 0; i < mL; ++i) {
        const T u = static_cast<T>(std::ldexp(double(hL[i]), sh)) -
                    static_cast<T>(std::ldexp(double(y[i]), sy_));
        ss += double(u) * double(u);
        g[i] = norm * u;
      }
      gamma = c;
      res.log10_loss = ss > 0 ? std::log10(ss / double(mL)) + 2.0 * double(c) * kLog10_2 : kNegInf;
      break;
    }
    case LossKind::cross_entropy: {
      const auto* labels = static_cast<const std::int64_t*>(req.target);
      const std::size_t C = n(L);
      const T invB = static_cast<T>(1.0 / double(B));
      if (eL <= 600) {
        const int ie = static_cast<int>(std::max<std::int64_t>(eL, -100000));
        double total = 0;
        std::vector<double> p(C);
        for (std::size_t r = 0; r < B; ++r) {
          const T* row = hL + r * C;
          double mx = kNegInf;
          for (std::size_t j = 0; j < C; ++j) mx = std::max(mx, std::ldexp(double(row[j]), ie));
          double sum = 0;
          for (std::size_t j = 0; j < C; ++j)
            sum += (p[j] = std::exp(std::ldexp(double(row[j]), ie) - mx));
          const double lse = mx + std::log(sum);
          const std::size_t y = static_cast<std::size_t>(labels[r]);
          total += lse - std::ldexp(double(row[y]), ie);
          for (std::size_t j = 0; j < C; ++j)
            g[r * C + j] = (static_cast<T>(p[j] / sum) - (j == y ? T(1) : T(0))) * invB;
        }
        const double loss = total / double(B);
        res.log10_loss = loss > 0 ? std::log10(loss) : kNegInf;
      } else {
        // Logits far beyond double range: softmax is one-hot on the maximum (shared on ties)
        // and the loss is 2^eL * mean(max - h~_y).
        double gap = 0, ties_log = 0;
        for (std::size_t r = 0; r < B; ++r) {
          const T* row = hL + r * C;
          const T mx = *std::max_element(row, row + C);
          std::size_t ties = 0;
          for (std::size_t j = 0; j < C; ++j) ties += row[j] == mx;
          const std::size_t y = static_cast<std::size_t>(labels[r]);
          gap += double(mx) - double(row[y]);
          ties_log += std::log(double(ties));
          for (std::size_t j = 0; j < C; ++j)
            g[r * C + j] =
                ((row[j] == mx ? T(1) / static_cast<T>(ties) : T(0)) - (j == y ? T(1) : T(0))) *
                invB;
        }
        res.log10_loss = gap > 0 ? std::log10(gap / double(B)) + double(eL) * kLog10_2
                                 : (ties_log > 0 ? std::log10(ties_log / double(B)) : kNegInf);
      }
      gamma = 0;
      break;
    }
    case LossKind::grad_output: {
      const T* go = static_cast<const T*>(req.target);
      std::copy(go, go + mL, g);
      gamma = 0;
      res.log10_loss = std::numeric_limits<double>::quiet_NaN();
      break;
    }
  }
  res.loss = req.loss == LossKind::grad_output ? res.log10_loss : std::pow(10.0, res.log10_loss);

  // ---- backward ------------------------------------------------------------------------
  res.log10_weight_grad_norms.assign(static_cast<std::size_t>(L), kNegInf);
  res.log10_bias_grad_norms.assign(static_cast<std::size_t>(L), kNegInf);
  res.log10_activation_grad_norms.assign(static_cast<std::size_t>(L) + 1, kNegInf);
  const bool p_two = req.norm_type == 2.0;
  // Per-parameter log10 norms in norm_type, for the total norm (torch's order: W1, b1, ...).
  std::vector<double> lp_w(static_cast<std::size_t>(L), kNegInf),
      lp_b(static_cast<std::size_t>(L), kNegInf);
  std::vector<std::int64_t> w_exp(static_cast<std::size_t>(L)), b_exp(static_cast<std::size_t>(L));
  if (req.keep_weight_grads) res.weight_grads.resize(static_cast<std::size_t>(L));
  if (req.keep_bias_grads) res.bias_grads.resize(static_cast<std::size_t>(L));
  if (req.keep_activation_grads) res.activation_grads.resize(static_cast<std::size_t>(L) + 1);
  std::vector<std::int64_t> a_exp(req.keep_activation_grads ? static_cast<std::size_t>(L) + 1 : 0);

  auto pnorm_log10 = [&](const T* a, std::size_t cnt, const Scan& s, std::int64_t ex) {
    return log10_pnorm(a, cnt, s, ex, req.norm_type);
  };

  // Rescales G when max|G| leaves the safe band; returns its norm's log10.
  auto normalise = [&](T* a, std::size_t cnt) {
    const Scan s = scan(a, cnt);
    const double lg = log10_norm(s, gamma);
    const int k = rescale_exponent<T>(s.maxabs);
    scale_pow2(a, cnt, -k);
    gamma += k;
    return lg;
  };
  {
    res.log10_activation_grad_norms[static_cast<std::size_t>(L)] = normalise(g, mL);
  }
  if (req.keep_activation_grads) {
    res.activation_grads[static_cast<std::size_t>(L)].assign(g, g + mL);
    a_exp[static_cast<std::size_t>(L)] = gamma;
  }

  if (req.keep_weight_grads)
    for (int l = 1; l <= L; ++l)
      res.weight_grads[static_cast<std::size_t>(l) - 1].resize(n(l) * n(l - 1));
  if (req.keep_bias_grads)
    for (int l = 1; l <= L; ++l) res.bias_grads[static_cast<std::size_t>(l) - 1].resize(n(l));

  // Parameter gradients of layer l from dz_l = dL/dz_l (scale 2^dz_exp): they feed
  // nothing downstream, so with two threads a second thread computes them while the
  // first carries dL/dh on down the chain.
  auto param_grads = [&](int l, const T* dz, std::int64_t dz_exp) {
    const std::size_t ul = static_cast<std::size_t>(l) - 1;
    const std::size_t nl = n(l), np = n(l - 1);
    const int inl = widths_[static_cast<std::size_t>(l)], inp = widths_[ul];
    T* db = req.keep_bias_grads ? res.bias_grads[ul].data() : DB;
    std::fill(db, db + nl, T(0));
    for (std::size_t r = 0; r < B; ++r) {
      const T* row = dz + r * nl;
      for (std::size_t j = 0; j < nl; ++j) db[j] += row[j];
    }
    {
      const Scan s = scan(db, nl);
      res.log10_bias_grad_norms[ul] = log10_norm(s, dz_exp);
      lp_b[ul] = pnorm_log10(db, nl, s, dz_exp);
      b_exp[ul] = dz_exp;
    }
    if (B == 1 && !req.keep_weight_grads) {
      // dW = dz^T h is an outer product: every entrywise norm of it factorises, and the
      // n_l x n_{l-1} matrix never has to be written.
      const Scan sd = scan(dz, nl), sx = scan(h(l - 1), np);
      // Entrywise p-norms of an outer product factorise: ||a b^T||_p = ||a||_p ||b||_p.
      res.log10_weight_grad_norms[ul] = log10_norm(sd, dz_exp) + log10_norm(sx, e[ul]);
      lp_w[ul] = p_two ? res.log10_weight_grad_norms[ul]
                       : log10_pnorm(dz, nl, sd, dz_exp, req.norm_type) +
                             log10_pnorm(h(l - 1), np, sx, e[ul], req.norm_type);
      const std::int64_t ex = dz_exp + e[ul];
      w_exp[ul] = ex;
      return;
    }
    // dW = dz^T h_{l-1}, with h_{l-1} brought into the band by 2^shift first: both factors
    // in the band, no product can overflow or underflow before its scale is applied.
    T* dw = req.keep_weight_grads ? res.weight_grads[ul].data() : DW;
    const int sh = shift[ul];
    const T* hp = h(l - 1);
    if (sh != 0) {
      T* hs = HS;
      std::copy(hp, hp + B * np, hs);
      scale_pow2(hs, B * np, sh);
      hp = hs;
    }
    blas::gemm(Trans::T, Trans::N, inl, inp, batch, T(1), dz, inl, hp, inp, T(0), dw, inp);
    const std::int64_t ex = dz_exp + e[ul] - sh;
    const Scan s = scan(dw, nl * np);
    res.log10_weight_grad_norms[ul] = log10_norm(s, ex);
    lp_w[ul] = pnorm_log10(dw, nl * np, s, ex);
    w_exp[ul] = ex;
  };

  // Pipelining keeps every dz_l until the second thread has used it: worth it while that
  // leaves half of the memory free.
  const std::size_t dz_total = hoff.back() - B * n(0);
  bool pipelined = need.pipeline > 0 && memory_allows(bytes - held, 2.0);
  T* DZall = nullptr;
  if (pipelined) {
    try {
      DZall = ws.dzall.get(dz_total);
    } catch (const std::bad_alloc&) {
      pipelined = false;
    }
  }
  std::atomic<int> ready{L + 1};  // dz_l is stored for every l >= ready
  std::vector<std::int64_t> dz_exp(static_cast<std::size_t>(L) + 1, 0);
  std::exception_ptr error;

  auto chain = [&] {
    T* g_next = G2;
    for (int l = L; l >= 1; --l) {
      const std::size_t ul = static_cast<std::size_t>(l) - 1;
      const std::size_t nl = n(l), np = n(l - 1), m = B * nl;
      const int inl = widths_[static_cast<std::size_t>(l)], inp = widths_[ul];
      // dz = dL/dh_l * phi'(z_l), same scale 2^gamma.
      T* dz = pipelined ? DZall + (hoff[static_cast<std::size_t>(l)] - B * n(0)) : DZ;
      if (act_.kind == Act::linear) {
        if (pipelined)
          std::copy(g, g + m, dz);
        else
          dz = g;
      } else if (small &&
                 (e[static_cast<std::size_t>(l)] != 0 || zexp[static_cast<std::size_t>(l)] != 0)) {
        // phi' at the true scale of a carried small signal: where it underflows, phi'(0).
        const T* zt = nullptr;
        if (keep_z) {
          std::copy(z(l), z(l) + m, TZ);
          scale_pow2(TZ, m, clamp_exp(zexp[static_cast<std::size_t>(l)]));
          zt = TZ;
        }
        std::copy(h(l), h(l) + m, TH);
        scale_pow2(TH, m, clamp_exp(e[static_cast<std::size_t>(l)]));
        act_.backward(zt, TH, g, dz, m);
      } else {
        act_.backward(z(l), h(l), g, dz, m);
      }
      if (pipelined) {
        dz_exp[static_cast<std::size_t>(l)] = gamma;
        ready.store(l, std::memory_order_release);
      } else {
        param_grads(l, dz, gamma);
      }
      // dL/dh_{l-1} = dz W_l, renormalised.
      blas::gemm(Trans::N, Trans::N, batch, inp, inl, T(1), dz, inl, gemm_weight(l), inp, T(0),
                 g_next, inp);
      gamma += wexp_[static_cast<std::size_t>(l)];
      std::swap(g, g_next);
      res.log10_activation_grad_norms[ul] = normalise(g, B * np);
      if (req.keep_activation_grads) {
        res.activation_grads[ul].assign(g, g + B * np);
        a_exp[ul] = gamma;
      }
      if (abort.load(std::memory_order_relaxed)) return;
      cancel.poll();
    }
  };

  if (!pipelined) {
    chain();
  } else {
#ifdef _OPENMP
#pragma omp parallel num_threads(team_threads(2))
    {
      try {
        if (omp_get_thread_num() == 0) {
          chain();
        } else {
          for (int l = L; l >= 1; --l) {
            while (ready.load(std::memory_order_acquire) > l) {
              if (abort.load(std::memory_order_relaxed)) break;
              std::this_thread::yield();
            }
            if (abort.load(std::memory_order_relaxed)) break;
            param_grads(l, DZall + (hoff[static_cast<std::size_t>(l)] - B * n(0)),
                        dz_exp[static_cast<std::size_t>(l)]);
          }
        }
      } catch (...) {
        abort.store(true);
#pragma omp critical(gradchain_error)
        if (!error) error = std::current_exception();
      }
    }
#endif
  }
  if (error) std::rethrow_exception(error);

  // ---- total norm and clipping (torch.nn.utils.clip_grad_norm_ over W1, b1, W2, ...) -----
  std::vector<double> lp;
  lp.reserve(2 * static_cast<std::size_t>(L));
  for (std::size_t l = 0; l < static_cast<std::size_t>(L); ++l) {
    lp.push_back(lp_w[l]);
    lp.push_back(lp_b[l]);
  }
  const LogClip lc = log_clip<T>(lp, req.norm_type, req.max_norm);
  res.log10_total_norm = lc.log10_total;
  res.clipped = lc.clipped;
  res.max_norm = lc.clipped ? req.max_norm : 0.0;
  res.log10_clip_coef = lc.log10_coef;
  const double coef = lc.coef;

  // ---- full gradients: undo the scaling (and apply the clip coefficient) ---------------
  for (int l = 0; l < L; ++l) {
    const std::size_t ul = static_cast<std::size_t>(l);
    if (req.keep_weight_grads) {
      auto& v = res.weight_grads[ul];
      write_scaled(v.data(), v.size(), w_exp[ul], coef, v.data());
    }
    if (req.keep_bias_grads) {
      auto& v = res.bias_grads[ul];
      write_scaled(v.data(), v.size(), b_exp[ul], coef, v.data());
    }
  }
  if (req.keep_activation_grads)
    for (int l = 0; l <= L; ++l) {
      auto& v = res.activation_grads[static_cast<std::size_t>(l)];
      write_scaled(v.data(), v.size(), a_exp[static_cast<std::size_t>(l)], 1.0, v.data());
    }
  return res;
}

template class MLPChain<float>;
template class MLPChain<double>;

}  // namespace gradchain
