#include "gradchain/normalization.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

#include "gradchain/scaled.hpp"

namespace gradchain::norm {

namespace {
constexpr std::int64_t kMaxExp = std::int64_t(1) << 40;

int clamp_exp(std::int64_t k) {
  return static_cast<int>(std::clamp<std::int64_t>(k, -100000, 100000));
}

std::int64_t floor_half(std::int64_t k) {
  return k >= 0 ? k / 2 : -((1 - k) / 2);
}

// log2 of a positive finite double, rounded down.
std::int64_t log2_of(double v) {
  return std::ilogb(v);
}
}  // namespace

InvStd inv_std(double v, double eps, std::int64_t e) {
  if (eps == 0.0 || e == 0) return {1.0 / std::sqrt(v + eps), 0};
  int ke = 0;
  const double me = std::frexp(eps, &ke);
  const std::int64_t s = ke - 2 * std::clamp<std::int64_t>(e, -kMaxExp, kMaxExp);
  // eps * 4^-e = me * 2^s. In this range it is a normal double and the sum cannot
  // overflow (v < 2^420: the variance of values in the band).
  if (s > -960 && s < 960) return {1.0 / std::sqrt(v + std::ldexp(me, static_cast<int>(s))), 0};
  std::int64_t top = s;
  if (v > 0) top = std::max<std::int64_t>(top, log2_of(v));
  const std::int64_t k = floor_half(top);
  const double sum = std::ldexp(v, clamp_exp(-2 * k)) + std::ldexp(me, clamp_exp(s - 2 * k));
  return {1.0 / std::sqrt(sum), -k};
}

template <class T>
void Stats::compute(const T* x, std::int64_t e, const Layout& L, bool center, double eps) {
  const std::size_t G = L.groups, n = L.len;
  ex = e;
  mean.assign(G, 0.0);
  var.resize(G);
  m.resize(G);
  dmax.resize(G);
  c.resize(G);
  q.resize(G);
  const double dn = static_cast<double>(n);
  for (std::size_t g = 0; g < G; ++g) {
    const T* xg = x + g * n;
    double mu = 0.0;
    if (center) {
      double sum = 0.0;
#pragma omp simd reduction(+ : sum)
      for (std::size_t i = 0; i < n; ++i) sum += static_cast<double>(xg[i]);
      mu = sum / dn;
    }
    double ss = 0.0, dm = 0.0;
#pragma omp simd reduction(+ : ss) reduction(max : dm)
    for (std::size_t i = 0; i < n; ++i) {
      const double d = static_cast<double>(xg[i]) - mu;
      const double ad = std::fabs(d);
      ss += d * d;
      dm = ad > dm ? ad : dm;
    }
    mean[g] = mu;
    var[g] = ss / dn;
    dmax[g] = dm;
    const InvStd r = inv_std(var[g], eps, e);
    m[g] = r.m;
    q[g] = r.q;
  }
  // |xhat| <= sqrt(n) unless eps dominates, and then it may fall below any float: it gets
  // an exponent of its own.
  constexpr int band = std::numeric_limits<T>::max_exponent / 5;
  bool any = false;
  std::int64_t top = 0;
  for (std::size_t g = 0; g < G; ++g) {
    const double a = dmax[g] * m[g];
    if (!(a > 0) || !std::isfinite(a)) continue;
    const std::int64_t l = log2_of(a) + q[g];
    top = any ? std::max(top, l) : l;
    any = true;
  }
  xexp = (any && (top > band || top < -band)) ? top : 0;
  for (std::size_t g = 0; g < G; ++g) c[g] = std::ldexp(m[g], clamp_exp(q[g] - xexp));
}

void Stats::save(std::vector<double>& out) const {
  const std::size_t G = mean.size();
  out.assign(3 + 6 * G, 0.0);
  out[0] = static_cast<double>(ex);
  out[1] = static_cast<double>(xexp);
  out[2] = static_cast<double>(G);
  double* p = out.data() + 3;
  for (std::size_t g = 0; g < G; ++g, p += 6) {
    p[0] = mean[g];
    p[1] = var[g];
    p[2] = m[g];
    p[3] = static_cast<double>(q[g]);
    p[4] = dmax[g];
    p[5] = c[g];
  }
}

bool Stats::load(const std::vector<double>* in, std::size_t groups, std::int64_t e) {
  if (!in || in->size() != 3 + 6 * groups || (*in)[0] != static_cast<double>(e) ||
      (*in)[2] != static_cast<double>(groups))
    return false;
  const std::vector<double>& v = *in;
  ex = e;
  xexp = static_cast<std::int64_t>(v[1]);
  mean.resize(groups);
  var.resize(groups);
  m.resize(groups);
  q.resize(groups);
  dmax.resize(groups);
  c.resize(groups);
  const double* p = v.data() + 3;
  for (std::size_t g = 0; g < groups; ++g, p += 6) {
    mean[g] = p[0];
    var[g] = p[1];
    m[g] = p[2];
    q[g] = static_cast<std::int64_t>(p[3]);
    dmax[g] = p[4];
    c[g] = p[5];
  }
  return true;
}

template <class T>
AffineParams<T>::AffineParams(std::size_t n, bool weight, bool bias)
    : has_w_(weight), has_b_(bias) {
  if (weight) w_.assign(n, T(1));
  if (bias) b_.assign(n, T(0));
}

template <class T>
void AffineParams<T>::refresh(const std::string& block) {
  const Scan sw = scan(w_.data(), w_.size());
  if (!sw.finite) throw std::invalid_argument(block + ": weight must be finite; got NaN or inf");
  if (!scan(b_.data(), b_.size()).finite)
    throw std::invalid_argument(block + ": bias must be finite; got NaN or inf");
  wexp_ = rescale_exponent<T>(sw.maxabs);
  wscaled_.clear();
  if (wexp_ != 0) {
    wscaled_ = w_;
    scale_pow2(wscaled_.data(), wscaled_.size(), -wexp_);
  }
  zero_bias_ = std::all_of(b_.begin(), b_.end(), [](T v) { return v == T(0); });
}

template <class T>
Affine<T> AffineParams<T>::view() const {
  Affine<T> a;
  if (has_w_) {
    a.w = wscaled_.empty() ? w_.data() : wscaled_.data();
    a.wexp = wexp_;
    a.w_true = w_.data();
  }
  if (has_b_ && !zero_bias_) a.b = b_.data();
  return a;
}

template <class T>
void transpose(const T* src, std::size_t rows, std::size_t cols, T* dst) {
  constexpr std::size_t kTile = 16;
  for (std::size_t r0 = 0; r0 < rows; r0 += kTile)
    for (std::size_t c0 = 0; c0 < cols; c0 += kTile) {
      const std::size_t r1 = std::min(rows, r0 + kTile), c1 = std::min(cols, c0 + kTile);
      for (std::size_t r = r0; r < r1; ++r)
        for (std::size_t c = c0; c < c1; ++c) dst[c * rows + r] = src[r * cols + c];
    }
}

namespace {
// The weight of entry i of group g: per entry, one per group, or none. The loops below take
// it as a template argument, so that each variant vectorises on its own.
struct NoWeight {
  double operator()(std::size_t) const { return 1.0; }
};
template <class T>
struct EntryWeight {
  const T* w;
  double operator()(std::size_t i) const { return static_cast<double>(w[i]); }
};
struct GroupWeight {
  double w;
  double operator()(std::size_t) const { return w; }
};

template <class T, class F>
void with_weight(const Layout& L, const T* w, std::size_t g, F&& f) {
  if (!w)
    f(NoWeight{});
  else if (L.affine_per_group)
    f(GroupWeight{static_cast<double>(w[g])});
  else
    f(EntryWeight<T>{w});
}
}  // namespace

template <class T>
std::int64_t forward(const T* x, const Layout& L, const Stats& s, const Affine<T>& a, T* y) {
  const std::size_t n = L.len;
  const std::int64_t shift = a.b ? s.xexp + a.wexp : 0;
  // The bias is added at the true scale, where it may dwarf (or be dwarfed by) xhat; below
  // 2^-1074 the factor itself would vanish, so such groups go through ldexp.
  const bool tiny_shift = shift < -1074;
  const double f = tiny_shift ? 0.0 : std::ldexp(1.0, clamp_exp(shift));
  for (std::size_t g = 0; g < L.groups; ++g) {
    const T* xg = x + g * n;
    T* yg = y + g * n;
    const double mu = s.mean[g], c = s.c[g];
    with_weight(L, a.w, g, [&](auto w) {
      if (!a.b) {
#pragma omp simd
        for (std::size_t i = 0; i < n; ++i)
          yg[i] = static_cast<T>((static_cast<double>(xg[i]) - mu) * c * w(i));
        return;
      }
      const T* b = a.b + (L.affine_per_group ? g : 0);
      const std::size_t bstep = L.affine_per_group ? 0 : 1;
      if (tiny_shift) {
        for (std::size_t i = 0; i < n; ++i)
          yg[i] = static_cast<T>(
              std::ldexp((static_cast<double>(xg[i]) - mu) * c * w(i), clamp_exp(shift)) +
              static_cast<double>(b[i * bstep]));
        return;
      }
#pragma omp simd
      for (std::size_t i = 0; i < n; ++i)
        yg[i] = static_cast<T>((static_cast<double>(xg[i]) - mu) * c * w(i) * f +
                               static_cast<double>(b[i * bstep]));
    });
  }
  return a.b ? 0 : s.xexp + a.wexp;
}

template <class T>
std::int64_t backward_input(const T* x, const T* dy, std::int64_t gy, const Layout& L,
                            const Stats& s, bool center, const Affine<T>& a, T* dx) {
  const std::size_t G = L.groups, n = L.len;
  const double dn = static_cast<double>(n);
  // xhat = xt * 2^xexp, so its term in the bracket carries 4^xexp.
  const double f = std::ldexp(1.0, clamp_exp(2 * s.xexp));
  thread_local std::vector<double> mg, mgx;
  mg.resize(G);
  mgx.resize(G);
  bool any = false;
  std::int64_t top = 0;
  for (std::size_t g = 0; g < G; ++g) {
    const T* xg = x + g * n;
    const T* dyg = dy + g * n;
    const double mu = s.mean[g], c = s.c[g];
    double sg = 0.0, sgx = 0.0, gmax = 0.0;
    with_weight(L, a.w, g, [&](auto w) {
#pragma omp simd reduction(+ : sg, sgx) reduction(max : gmax)
      for (std::size_t i = 0; i < n; ++i) {
        const double gi = static_cast<double>(dyg[i]) * w(i);
        const double xi = (static_cast<double>(xg[i]) - mu) * c;
        const double ag = std::fabs(gi);
        sg += gi;
        sgx += gi * xi;
        gmax = ag > gmax ? ag : gmax;
      }
    });
    mg[g] = center ? sg / dn : 0.0;
    mgx[g] = sgx / dn * f;
    // A bound on the group's bracket, so that one exponent serves every group and rstd
    // (up to 2^480 relative to x~ when eps is tiny) cannot overflow a float on its own.
    const double bound = gmax + std::fabs(mg[g]) + s.dmax[g] * std::fabs(c) * std::fabs(mgx[g]);
    const double mm = s.m[g];
    if (bound > 0 && mm > 0 && std::isfinite(bound) && std::isfinite(mm)) {
      const std::int64_t eg = log2_of(bound) + log2_of(mm) + s.q[g];
      top = any ? std::max(top, eg) : eg;
      any = true;
    }
  }
  for (std::size_t g = 0; g < G; ++g) {
    const T* xg = x + g * n;
    const T* dyg = dy + g * n;
    T* dxg = dx + g * n;
    const double mu = s.mean[g], c = s.c[g], m1 = mg[g], m2 = mgx[g];
    const double r = std::ldexp(s.m[g], clamp_exp(s.q[g] - top));
    with_weight(L, a.w, g, [&](auto w) {
#pragma omp simd
      for (std::size_t i = 0; i < n; ++i) {
        const double gi = static_cast<double>(dyg[i]) * w(i);
        const double xi = (static_cast<double>(xg[i]) - mu) * c;
        dxg[i] = static_cast<T>(r * (gi - m1 - xi * m2));
      }
    });
  }
  return gy + a.wexp + top - s.ex;
}

template <class T>
std::int64_t store_scaled(const std::vector<double>& acc, T* out) {
  double mx = 0.0;
  for (double v : acc) mx = std::max(mx, std::fabs(v));
  const int k = std::isfinite(mx) ? rescale_exponent<T>(mx) : 0;
  for (std::size_t i = 0; i < acc.size(); ++i)
    out[i] = static_cast<T>(k == 0 ? acc[i] : std::ldexp(acc[i], -k));
  return k;
}

template <class T>
void backward_params(const T* x, const T* dy, std::int64_t gy, const Layout& L, const Stats& s,
                     std::size_t nparams, T* dw, std::int64_t& ew, T* db, std::int64_t& eb) {
  const std::size_t n = L.len;
  thread_local std::vector<double> aw, ab;
  aw.assign(nparams, 0.0);
  ab.assign(nparams, 0.0);
  double* pw = aw.data();
  double* pb = ab.data();
  for (std::size_t g = 0; g < L.groups; ++g) {
    const T* xg = x + g * n;
    const T* dyg = dy + g * n;
    const double mu = s.mean[g], c = s.c[g];
    if (L.affine_per_group) {
      double sw = 0.0, sb = 0.0;
#pragma omp simd reduction(+ : sw, sb)
      for (std::size_t i = 0; i < n; ++i) {
        const double d = static_cast<double>(dyg[i]);
        sw += d * ((static_cast<double>(xg[i]) - mu) * c);
        sb += d;
      }
      pw[g] = sw;
      pb[g] = sb;
      continue;
    }
#pragma omp simd
    for (std::size_t i = 0; i < n; ++i) {
      const double d = static_cast<double>(dyg[i]);
      pw[i] += d * ((static_cast<double>(xg[i]) - mu) * c);
      pb[i] += d;
    }
  }
  if (dw) ew = gy + s.xexp + store_scaled(aw, dw);
  if (db) eb = gy + store_scaled(ab, db);
}

template <class T>
void jacobian_product(const T* x, const Layout& L, const Stats& s, bool center, const Affine<T>& a,
                      const T* v, int k, bool transpose, T* out) {
  const std::size_t G = L.groups, n = L.len, size = G * n;
  const double dn = static_cast<double>(n);
  thread_local std::vector<double> z, xh;
  z.resize(n);
  xh.resize(n);
  const T* w = a.w_true;
  for (std::size_t j = 0; j < static_cast<std::size_t>(k); ++j) {
    for (std::size_t g = 0; g < G; ++g) {
      const T* xg = x + g * n;
      const T* vg = v + j * size + g * n;
      T* og = out + j * size + g * n;
      const double rstd = std::ldexp(s.m[g], clamp_exp(s.q[g] - s.ex));
      double sz = 0.0, szx = 0.0;
      for (std::size_t i = 0; i < n; ++i) {
        const double wi = !w ? 1.0 : static_cast<double>(w[L.affine_per_group ? g : i]);
        z[i] = transpose ? wi * static_cast<double>(vg[i]) : static_cast<double>(vg[i]);
        // The true xhat (<= sqrt(n)); m * 2^q alone may overflow where x~ - mean is 0.
        xh[i] = std::ldexp((static_cast<double>(xg[i]) - s.mean[g]) * s.m[g], clamp_exp(s.q[g]));
        sz += z[i];
        szx += z[i] * xh[i];
      }
      const double mz = center ? sz / dn : 0.0, mzx = szx / dn;
      for (std::size_t i = 0; i < n; ++i) {
        const double wi =
            (transpose || !w) ? 1.0 : static_cast<double>(w[L.affine_per_group ? g : i]);
        og[i] = static_cast<T>(wi * rstd * (z[i] - mz - xh[i] * mzx));
      }
    }
  }
}

#define GC_NORM_INSTANTIATE(T)                                                                     \
  template void Stats::compute<T>(const T*, std::int64_t, const Layout&, bool, double);            \
  template class AffineParams<T>;                                                                  \
  template void transpose<T>(const T*, std::size_t, std::size_t, T*);                              \
  template std::int64_t forward<T>(const T*, const Layout&, const Stats&, const Affine<T>&, T*);   \
  template std::int64_t backward_input<T>(const T*, const T*, std::int64_t, const Layout&,         \
                                          const Stats&, bool, const Affine<T>&, T*);               \
  template void backward_params<T>(const T*, const T*, std::int64_t, const Layout&, const Stats&,  \
                                   std::size_t, T*, std::int64_t&, T*, std::int64_t&);             \
  template std::int64_t store_scaled<T>(const std::vector<double>&, T*);                           \
  template void jacobian_product<T>(const T*, const Layout&, const Stats&, bool, const Affine<T>&, \
                                    const T*, int, bool, T*);
GC_NORM_INSTANTIATE(float)
GC_NORM_INSTANTIATE(double)
#undef GC_NORM_INSTANTIATE

}  // namespace gradchain::norm
