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
    const T* xg = x + g * L.gstride;
    double mu = 0.0;
    if (center) {
      double sum = 0.0;
      for (std::size_t i = 0; i < n; ++i) sum += static_cast<double>(xg[i * L.estride]);
      mu = sum / dn;
    }
    double ss = 0.0, dm = 0.0;
    for (std::size_t i = 0; i < n; ++i) {
      const double d = static_cast<double>(xg[i * L.estride]) - mu;
      ss += d * d;
      dm = std::max(dm, std::fabs(d));
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
std::int64_t forward(const T* x, const Layout& L, const Stats& s, const Affine<T>& a, T* y) {
  const int shift = a.b ? clamp_exp(s.xexp + a.wexp) : 0;
  for (std::size_t g = 0; g < L.groups; ++g) {
    const double mu = s.mean[g], c = s.c[g];
    for (std::size_t i = 0; i < L.len; ++i) {
      const std::size_t k = L.at(g, i), p = L.param(g, i);
      double v = (static_cast<double>(x[k]) - mu) * c;
      if (a.w) v *= static_cast<double>(a.w[p]);
      if (a.b) {
        // The bias is added at the true scale, where it may dwarf (or be dwarfed by) xhat.
        if (shift != 0) v = std::ldexp(v, shift);
        v += static_cast<double>(a.b[p]);
      }
      y[k] = static_cast<T>(v);
    }
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
  thread_local std::vector<std::int64_t> eg;
  mg.resize(G);
  mgx.resize(G);
  eg.resize(G);
  bool any = false;
  std::int64_t top = 0;
  for (std::size_t g = 0; g < G; ++g) {
    const double mu = s.mean[g], c = s.c[g];
    double sg = 0.0, sgx = 0.0, gmax = 0.0;
    for (std::size_t i = 0; i < n; ++i) {
      const std::size_t k = L.at(g, i);
      const double gi = a.w ? static_cast<double>(dy[k]) * static_cast<double>(a.w[L.param(g, i)])
                            : static_cast<double>(dy[k]);
      const double xi = (static_cast<double>(x[k]) - mu) * c;
      sg += gi;
      sgx += gi * xi;
      gmax = std::max(gmax, std::fabs(gi));
    }
    mg[g] = center ? sg / dn : 0.0;
    mgx[g] = sgx / dn * f;
    // A bound on the group's bracket, so that one exponent serves every group and rstd
    // (up to 2^480 relative to x~ when eps is tiny) cannot overflow a float on its own.
    const double bound = gmax + std::fabs(mg[g]) + s.dmax[g] * std::fabs(c) * std::fabs(mgx[g]);
    const double mm = s.m[g];
    if (bound > 0 && mm > 0 && std::isfinite(bound) && std::isfinite(mm)) {
      eg[g] = log2_of(bound) + log2_of(mm) + s.q[g];
      top = any ? std::max(top, eg[g]) : eg[g];
      any = true;
    }
  }
  for (std::size_t g = 0; g < G; ++g) {
    const double mu = s.mean[g], c = s.c[g];
    const double r = std::ldexp(s.m[g], clamp_exp(s.q[g] - top));
    for (std::size_t i = 0; i < n; ++i) {
      const std::size_t k = L.at(g, i);
      const double gi = a.w ? static_cast<double>(dy[k]) * static_cast<double>(a.w[L.param(g, i)])
                            : static_cast<double>(dy[k]);
      const double xi = (static_cast<double>(x[k]) - mu) * c;
      dx[k] = static_cast<T>(r * (gi - mg[g] - xi * mgx[g]));
    }
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
  thread_local std::vector<double> aw, ab;
  aw.assign(dw ? nparams : 0, 0.0);
  ab.assign(db ? nparams : 0, 0.0);
  for (std::size_t g = 0; g < L.groups; ++g) {
    const double mu = s.mean[g], c = s.c[g];
    for (std::size_t i = 0; i < L.len; ++i) {
      const std::size_t k = L.at(g, i), p = L.param(g, i);
      const double d = static_cast<double>(dy[k]);
      if (dw) aw[p] += d * ((static_cast<double>(x[k]) - mu) * c);
      if (db) ab[p] += d;
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
  for (std::size_t j = 0; j < static_cast<std::size_t>(k); ++j) {
    const T* vj = v + j * size;
    T* oj = out + j * size;
    for (std::size_t g = 0; g < G; ++g) {
      const double rstd = std::ldexp(s.m[g], clamp_exp(s.q[g] - s.ex));
      double sz = 0.0, szx = 0.0;
      for (std::size_t i = 0; i < n; ++i) {
        const std::size_t kk = L.at(g, i);
        const double w = a.w_true ? static_cast<double>(a.w_true[L.param(g, i)]) : 1.0;
        z[i] = transpose ? w * static_cast<double>(vj[kk]) : static_cast<double>(vj[kk]);
        // The true xhat (<= sqrt(n)); m * 2^q alone may overflow where x~ - mean is 0.
        xh[i] = std::ldexp((static_cast<double>(x[kk]) - s.mean[g]) * s.m[g], clamp_exp(s.q[g]));
        sz += z[i];
        szx += z[i] * xh[i];
      }
      const double mz = center ? sz / dn : 0.0, mzx = szx / dn;
      for (std::size_t i = 0; i < n; ++i) {
        const std::size_t kk = L.at(g, i);
        const double w =
            (!transpose && a.w_true) ? static_cast<double>(a.w_true[L.param(g, i)]) : 1.0;
        oj[kk] = static_cast<T>(w * rstd * (z[i] - mz - xh[i] * mzx));
      }
    }
  }
}

#define GC_NORM_INSTANTIATE(T)                                                                     \
  template void Stats::compute<T>(const T*, std::int64_t, const Layout&, bool, double);            \
  template class AffineParams<T>;                                                                  \
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
