#include "gradchain/rnn_jacobian.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>

#include "gradchain/blas.hpp"
#include "gradchain/system.hpp"

namespace gradchain {

namespace {

std::size_t sz(int n) {
  return static_cast<std::size_t>(n);
}

double sigmoid(double a) {
  return 1.0 / (1.0 + std::exp(-a));
}

// z = W u + b for a row-major rows x m matrix W.
void affine(const double* W, const double* b, int rows, int m, const double* u, double* z) {
  std::copy(b, b + rows, z);
  blas::gemm(blas::Trans::N, blas::Trans::N, rows, 1, m, 1.0, W, m, u, 1, 1.0, z, 1);
}

// What one cell step produces: the new h (and c), and, when asked, the coefficients of its
// Jacobian. With the pre-activations a = W_ih u + b_ih (+) W_hh h_prev + b_hh split into gate
// blocks W_g, the rows of d(out)/du are sum_g diag(in[out][g]) W_ih,g, those of
// d(out)/dh_prev sum_g diag(hh[out][g]) W_hh,g plus a diagonal, and (LSTM) d(out)/dc_prev is
// diagonal. out = 0 is h, out = 1 the LSTM's c.
struct StepCoefs {
  int H = 0, G = 0;
  std::vector<double> in, hh;      // [out][gate][H]
  std::vector<double> h_hp;        // d h / d h_prev diagonal (GRU's z), else empty
  std::vector<double> h_cp, c_cp;  // LSTM: d h / d c_prev and d c / d c_prev diagonals

  void resize(CellKind cell, int hidden, int gates) {
    H = hidden;
    G = gates;
    const int outs = cell == CellKind::lstm ? 2 : 1;
    in.assign(sz(outs * G * H), 0.0);
    hh.assign(sz(outs * G * H), 0.0);
    h_hp.assign(cell == CellKind::gru ? sz(H) : 0, 0.0);
    h_cp.assign(cell == CellKind::lstm ? sz(H) : 0, 0.0);
    c_cp.assign(cell == CellKind::lstm ? sz(H) : 0, 0.0);
  }
  double* in_at(int out, int g) { return in.data() + sz((out * G + g) * H); }
  double* hh_at(int out, int g) { return hh.data() + sz((out * G + g) * H); }
};

// One step of layer l: u its input, hp/cp the previous state; writes h (and c); ai and ah
// are scratch of gates * hidden. Forward and Jacobian use this one routine, so dense(t)
// sees exactly the states the forward pass stored.
void cell_step(const RecurrentLayers& L, int l, const double* u, const double* hp, const double* cp,
               double* h, double* c, double* ai, double* ah, StepCoefs* co) {
  const int H = L.hidden(), G = L.gates();
  affine(L.w_ih(l), L.b_ih(l), G * H, L.in_dim(l), u, ai);
  affine(L.w_hh(l), L.b_hh(l), G * H, H, hp, ah);
  switch (L.cell()) {
    case CellKind::tanh:
    case CellKind::relu: {
      const bool is_tanh = L.cell() == CellKind::tanh;
      for (int j = 0; j < H; ++j) {
        const double a = ai[j] + ah[j];
        const double v = is_tanh ? std::tanh(a) : (a > 0.0 ? a : 0.0);
        h[j] = v;
        if (co)
          co->in_at(0, 0)[j] = co->hh_at(0, 0)[j] = is_tanh ? 1.0 - v * v : (a > 0.0 ? 1.0 : 0.0);
      }
      break;
    }
    case CellKind::lstm: {
      for (int j = 0; j < H; ++j) {
        const double i = sigmoid(ai[j] + ah[j]);
        const double f = sigmoid(ai[H + j] + ah[H + j]);
        const double g = std::tanh(ai[2 * H + j] + ah[2 * H + j]);
        const double o = sigmoid(ai[3 * H + j] + ah[3 * H + j]);
        const double cn = f * cp[j] + i * g;
        const double tc = std::tanh(cn);
        c[j] = cn;
        h[j] = o * tc;
        if (!co) continue;
        const double dci = g * i * (1.0 - i), dcf = cp[j] * f * (1.0 - f), dcg = i * (1.0 - g * g);
        const double k = o * (1.0 - tc * tc), dho = tc * o * (1.0 - o);
        const double hv[4] = {k * dci, k * dcf, k * dcg, dho};
        const double cv[4] = {dci, dcf, dcg, 0.0};
        for (int q = 0; q < 4; ++q) {
          co->in_at(0, q)[j] = co->hh_at(0, q)[j] = hv[q];
          co->in_at(1, q)[j] = co->hh_at(1, q)[j] = cv[q];
        }
        co->h_cp[sz(j)] = k * f;
        co->c_cp[sz(j)] = f;
      }
      break;
    }
    case CellKind::gru: {
      for (int j = 0; j < H; ++j) {
        const double r = sigmoid(ai[j] + ah[j]);
        const double z = sigmoid(ai[H + j] + ah[H + j]);
        const double hn = ah[2 * H + j];
        const double n = std::tanh(ai[2 * H + j] + r * hn);
        h[j] = (1.0 - z) * n + z * hp[j];
        if (!co) continue;
        const double beta = (1.0 - z) * (1.0 - n * n);
        const double dr = beta * hn * r * (1.0 - r), dz = (hp[j] - n) * z * (1.0 - z);
        co->in_at(0, 0)[j] = co->hh_at(0, 0)[j] = dr;
        co->in_at(0, 1)[j] = co->hh_at(0, 1)[j] = dz;
        co->in_at(0, 2)[j] = beta;
        co->hh_at(0, 2)[j] = beta * r;
        co->h_hp[sz(j)] = z;
      }
      break;
    }
  }
}

// M (outs*H x m) = rows sum_g diag(coef[out][g]) W_g, W (G*H x m) row-major.
void combine(const double* coef, const double* W, int outs, int G, int H, int m, double* M) {
  for (int out = 0; out < outs; ++out)
    for (int i = 0; i < H; ++i) {
      double* row = M + sz(out * H + i) * sz(m);
      std::fill(row, row + m, 0.0);
      for (int g = 0; g < G; ++g) {
        const double a = coef[sz((out * G + g) * H + i)];
        if (a == 0.0) continue;
        const double* w = W + sz(g * H + i) * sz(m);
        for (int j = 0; j < m; ++j) row[j] += a * w[j];
      }
    }
}

}  // namespace

template <class T>
RecurrentLayers::RecurrentLayers(const RecurrentChain<T>& chain)
    : cell_(chain.shape().cell),
      layers_(chain.shape().num_layers),
      hidden_(chain.shape().hidden_size),
      gates_(gate_count(chain.shape().cell)),
      input_(chain.shape().input_size) {
  const bool bias = chain.shape().bias;
  const std::size_t per = bias ? 4 : 2;
  auto copy = [&](std::size_t i) {
    const T* p = chain.param(i);
    return std::vector<double>(p, p + chain.param_size(i));
  };
  for (int l = 0; l < layers_; ++l) {
    const std::size_t base = sz(l) * per;
    w_ih_.push_back(copy(base));
    w_hh_.push_back(copy(base + 1));
    b_ih_.push_back(bias ? copy(base + 2) : std::vector<double>(sz(gates_ * hidden_), 0.0));
    b_hh_.push_back(bias ? copy(base + 3) : std::vector<double>(sz(gates_ * hidden_), 0.0));
  }
}

template RecurrentLayers::RecurrentLayers(const RecurrentChain<float>&);
template RecurrentLayers::RecurrentLayers(const RecurrentChain<double>&);

RecurrentJacobians::RecurrentJacobians(const RecurrentLayers& layers, const double* x, int steps,
                                       std::size_t x_stride, const double* s0)
    : layers_(layers), x_(x), steps_(steps), n_(layers.state_dim()), stride_(x_stride) {
  if (steps < 1)
    throw std::invalid_argument("steps must be positive; got " + std::to_string(steps));
  s_.assign(sz(steps + 1) * sz(n_), 0.0);
  if (s0) std::copy(s0, s0 + n_, s_.begin());
  const int H = layers.hidden(), S = layers.layer_state();
  const bool lstm = layers.cell() == CellKind::lstm;
  std::vector<double> ai(sz(layers.gates() * H)), ah(ai.size());
  for (int t = 1; t <= steps; ++t) {
    const double* prev = state(t - 1);
    double* cur = s_.data() + sz(t) * sz(n_);
    for (int l = 0; l < layers.layers(); ++l) {
      const double* u = l == 0 ? input(t) : cur + sz((l - 1) * S);
      double* h = cur + sz(l * S);
      cell_step(layers, l, u, prev + sz(l * S), lstm ? prev + sz(l * S + H) : nullptr, h,
                lstm ? h + H : nullptr, ai.data(), ah.data(), nullptr);
      for (int j = 0; j < S; ++j)
        if (!std::isfinite(h[j]))
          throw NonFiniteError("step", t,
                               "the forward pass produced a non-finite state at step " +
                                   std::to_string(t) + ", layer " + std::to_string(l));
    }
  }
}

int RecurrentJacobians::dense(int t, double* J) const {
  const RecurrentLayers& L = layers_;
  const int H = L.hidden(), G = L.gates(), S = L.layer_state(), n = n_;
  const bool lstm = L.cell() == CellKind::lstm;
  const int outs = lstm ? 2 : 1;
  const double* prev = state(t - 1);
  const double* cur = state(t);
  std::fill(J, J + sz(n) * sz(n), 0.0);
  std::vector<double> ai(sz(G * H)), ah(ai.size()), h(sz(S)), M(sz(S) * sz(H));
  StepCoefs co;
  co.resize(L.cell(), H, G);
  for (int l = 0; l < L.layers(); ++l) {
    const int o = l * S;
    const double* u = l == 0 ? input(t) : cur + sz((l - 1) * S);
    cell_step(L, l, u, prev + sz(o), lstm ? prev + sz(o + H) : nullptr, h.data(),
              lstm ? h.data() + H : nullptr, ai.data(), ah.data(), &co);
    double* rows = J + sz(o) * sz(n);
    if (l > 0) {
      // Through h^{l-1}_t, whose rows of J_t are complete.
      combine(co.in.data(), L.w_ih(l), outs, G, H, H, M.data());
      blas::gemm(blas::Trans::N, blas::Trans::N, S, n, H, 1.0, M.data(), H, J + sz(o - S) * sz(n),
                 n, 0.0, rows, n);
    }
    combine(co.hh.data(), L.w_hh(l), outs, G, H, H, M.data());
    for (int r = 0; r < S; ++r) {
      double* row = rows + sz(r) * sz(n) + sz(o);
      const double* m = M.data() + sz(r) * sz(H);
      for (int j = 0; j < H; ++j) row[j] += m[j];
    }
    if (L.cell() == CellKind::gru)
      for (int j = 0; j < H; ++j) rows[sz(j) * sz(n) + sz(o + j)] += co.h_hp[sz(j)];
    if (lstm)
      for (int j = 0; j < H; ++j) {
        rows[sz(j) * sz(n) + sz(o + H + j)] += co.h_cp[sz(j)];
        rows[sz(H + j) * sz(n) + sz(o + H + j)] += co.c_cp[sz(j)];
      }
  }
  return 0;
}

void RecurrentJacobians::apply(int t, const double* v, int k, double* out) const {
  std::vector<double> J(sz(n_) * sz(n_));
  dense(t, J.data());
  blas::gemm(blas::Trans::N, blas::Trans::T, k, n_, n_, 1.0, v, n_, J.data(), n_, 0.0, out, n_);
}

void RecurrentJacobians::apply_transpose(int t, const double* u, int k, double* out) const {
  std::vector<double> J(sz(n_) * sz(n_));
  dense(t, J.data());
  blas::gemm(blas::Trans::N, blas::Trans::N, k, n_, n_, 1.0, u, n_, J.data(), n_, 0.0, out, n_);
}

// ---- batches ---------------------------------------------------------------------------

namespace {

void check_sequence(int steps, int batch) {
  if (steps < 1)
    throw std::invalid_argument("x must have at least one step; got " + std::to_string(steps));
  if (batch < 1)
    throw std::invalid_argument("x must hold at least one sequence; got " + std::to_string(batch));
}

// Example e's initial state from layers x batch x hidden arrays.
std::vector<double> initial_state(const RecurrentLayers& L, const double* h0, const double* c0,
                                  int batch, int e) {
  const int H = L.hidden(), S = L.layer_state();
  std::vector<double> s(sz(L.state_dim()), 0.0);
  for (int l = 0; l < L.layers(); ++l) {
    const std::size_t src = (sz(l) * sz(batch) + sz(e)) * sz(H);
    if (h0) std::copy(h0 + src, h0 + src + sz(H), s.begin() + l * S);
    if (c0 && L.cell() == CellKind::lstm)
      std::copy(c0 + src, c0 + src + sz(H), s.begin() + l * S + H);
  }
  return s;
}

// The cell parameters in double, shared by all sequences.
template <class T>
double layers_bytes(const RecurrentChain<T>& chain) {
  const RecurrentShape& s = chain.shape();
  const double gh = double(gate_count(s.cell)) * s.hidden_size;
  double params = 0;
  for (int l = 0; l < s.num_layers; ++l)
    params += gh * ((l == 0 ? s.input_size : s.hidden_size) + s.hidden_size + 2.0);
  return params * sizeof(double);
}

// One sequence's RecurrentJacobians: every state s_0..s_steps.
template <class T>
double sequence_bytes(const RecurrentChain<T>& chain, int steps) {
  const RecurrentShape& s = chain.shape();
  const double n = double(s.num_layers) * s.hidden_size * (s.cell == CellKind::lstm ? 2 : 1);
  return (double(steps) + 2) * n * sizeof(double);
}

template <class T>
std::vector<int> state_dims(const RecurrentChain<T>& chain, int steps) {
  const RecurrentShape& s = chain.shape();
  const double n = double(s.num_layers) * s.hidden_size * (s.cell == CellKind::lstm ? 2 : 1);
  if (n > std::numeric_limits<int>::max())
    throw std::invalid_argument(
        "the Jacobians' state (num_layers * hidden_size, twice that for an LSTM) must have at "
        "most 2**31 - 1 entries; this chain's has " +
        std::to_string(static_cast<long long>(n)));
  return std::vector<int>(sz(steps + 1), static_cast<int>(n));
}

JacobianFactory sequences(const RecurrentLayers& L, const double* x, int steps, int batch,
                          const double* h0, const double* c0) {
  return [&L, x, steps, batch, h0, c0](int e, bool) -> std::unique_ptr<JacobianChain> {
    const std::vector<double> s0 = initial_state(L, h0, c0, batch, e);
    return std::make_unique<RecurrentJacobians>(L, x + sz(e) * sz(L.input_size()), steps,
                                                sz(batch) * sz(L.input_size()), s0.data());
  };
}

}  // namespace

template <class T>
BatchNorms recurrent_jacobian_norms(const RecurrentChain<T>& chain, const double* x, int steps,
                                    int batch, const double* h0, const double* c0,
                                    const NormsOptions& opt, Canceller& cancel) {
  check_sequence(steps, batch);
  opt.validate();
  check_memory(layers_bytes(chain) + batch_norms_bytes(batch, state_dims(chain, steps), opt,
                                                       sequence_bytes(chain, steps), true),
               "the per-step Jacobian norms");
  const RecurrentLayers layers(chain);
  return batch_jacobian_norms(batch, steps, sequences(layers, x, steps, batch, h0, c0), opt,
                              cancel);
}

template <class T>
std::vector<double> recurrent_qr_spectrum(const RecurrentChain<T>& chain, const double* x,
                                          int steps, int batch, const double* h0, const double* c0,
                                          const SpectrumOptions& opt, Canceller& cancel) {
  check_sequence(steps, batch);
  const std::vector<int> dims = state_dims(chain, steps);
  opt.validate(dims);
  check_memory(layers_bytes(chain) +
                   batch_spectrum_bytes(batch, dims, opt, sequence_bytes(chain, steps), true),
               "the QR spectrum");
  const RecurrentLayers layers(chain);
  return batch_qr_spectrum(batch, dims, sequences(layers, x, steps, batch, h0, c0), opt, cancel);
}

#define GC_INSTANTIATE(T)                                                                          \
  template BatchNorms recurrent_jacobian_norms(const RecurrentChain<T>&, const double*, int, int,  \
                                               const double*, const double*, const NormsOptions&,  \
                                               Canceller&);                                        \
  template std::vector<double> recurrent_qr_spectrum(const RecurrentChain<T>&, const double*, int, \
                                                     int, const double*, const double*,            \
                                                     const SpectrumOptions&, Canceller&);
GC_INSTANTIATE(float)
GC_INSTANTIATE(double)
#undef GC_INSTANTIATE

}  // namespace gradchain
