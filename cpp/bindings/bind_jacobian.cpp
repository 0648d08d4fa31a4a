#include <limits>
#include <string>
#include <tuple>

#include "gradchain/chain.hpp"
#include "gradchain/jacobian.hpp"
#include "gradchain/rnn_jacobian.hpp"
#include "pybind.hpp"

namespace gradchain::bindings {
namespace {

int checked_batch(const CArray<double>& x, int n0) {
  if (x.ndim() != 2 || x.shape(1) != n0)
    throw std::invalid_argument("x must have shape (batch, " + std::to_string(n0) + ")");
  if (x.shape(0) < 1 || x.shape(0) > std::numeric_limits<int>::max())
    throw std::invalid_argument("x must hold between 1 and 2**31 - 1 examples");
  return static_cast<int>(x.shape(0));
}

NormsOptions norms_options(bool spectral, double tol, int max_iter, int exact_max_dim) {
  NormsOptions opt;
  opt.spectral = spectral;
  opt.tol = tol;
  opt.max_iter = max_iter;
  opt.exact_max_dim = exact_max_dim;
  return opt;
}

SpectrumOptions spectrum_options(int k, int interval, const std::string& start,
                                 std::uint64_t seed) {
  SpectrumOptions opt;
  opt.k = k;
  opt.interval = interval;
  opt.start = SpectrumOptions::parse_start(start);
  opt.seed = seed;
  return opt;
}

py::dict norms_dict(BatchNorms r, int batch, int length) {
  const py::ssize_t L = length;
  py::dict d;
  d["log10_frobenius"] = to_numpy(std::move(r.log10_frobenius), {batch, L});
  d["log10_spectral"] = to_numpy(std::move(r.log10_spectral), {batch, L});
  d["iterations"] = to_numpy(std::move(r.iterations), {batch, L});
  py::array_t<bool> conv({static_cast<py::ssize_t>(batch), L});
  std::copy(r.converged.begin(), r.converged.end(), conv.mutable_data());
  d["converged"] = conv;
  return d;
}

py::tuple spectrum_tuple(std::vector<double> S, int batch, int length, int k, int interval) {
  std::vector<int> depths = spectrum_depths(length, interval);
  const auto nd = static_cast<py::ssize_t>(depths.size());
  return py::make_tuple(to_numpy(std::move(depths), {nd}), to_numpy(std::move(S), {batch, nd, k}));
}

// The core checks the options. In every function below only C++ values and buffers kept
// alive by this frame (x, h0, c0) or by the caller's reference (the chain) cross into the
// core, so the GIL can be released.

template <class T>
py::dict chain_norms(const Chain<T>& net, CArray<double> x, bool train, bool layers, bool spectral,
                     double tol, int max_iter, int exact_max_dim) {
  const int batch = checked_batch(x, net.in_width());
  const NormsOptions opt = norms_options(spectral, tol, max_iter, exact_max_dim);
  const double* xp = x.data();
  const auto dims = chain_jacobian_dims(net, batch, train, layers);
  const int examples = !layers && net.couples_batch(train) ? 1 : batch;
  BatchNorms r = without_gil([&] {
    Canceller cancel = signal_canceller();
    return chain_jacobian_norms(net, xp, batch, train, layers, opt, cancel);
  });
  return norms_dict(std::move(r), examples, static_cast<int>(dims.size()) - 1);
}

template <class T>
py::tuple chain_spectrum(const Chain<T>& net, CArray<double> x, bool train, bool layers, int k,
                         int interval, const std::string& start, std::uint64_t seed) {
  const int batch = checked_batch(x, net.in_width());
  const SpectrumOptions opt = spectrum_options(k, interval, start, seed);
  const double* xp = x.data();
  const auto dims = chain_jacobian_dims(net, batch, train, layers);
  const int examples = !layers && net.couples_batch(train) ? 1 : batch;
  std::vector<double> S = without_gil([&] {
    Canceller cancel = signal_canceller();
    return chain_qr_spectrum(net, xp, batch, train, layers, opt, cancel);
  });
  return spectrum_tuple(std::move(S), examples, static_cast<int>(dims.size()) - 1, k, interval);
}

// A batch of sequences as the core reads it: x (steps, batch, input_size) and the optional
// initial states, converted and kept alive here.
struct Sequences {
  int steps = 0, batch = 0;
  CArray<double> x, h0, c0;
  const double *xp = nullptr, *h0p = nullptr, *c0p = nullptr;

  Sequences(const RecurrentShape& s, CArray<double> xs, const py::object& h, const py::object& c)
      : x(std::move(xs)) {
    std::tie(steps, batch) = checked_sequences(x, s.input_size);
    const py::ssize_t state = static_cast<py::ssize_t>(s.num_layers) * batch * s.hidden_size;
    xp = x.data();
    h0p = state_ptr(h, state, h0, "h0");
    c0p = state_ptr(c, state, c0, "c0");
  }
};

template <class T>
py::dict rnn_norms(const RecurrentChain<T>& net, CArray<double> x, py::object h0, py::object c0,
                   bool spectral, double tol, int max_iter, int exact_max_dim) {
  const Sequences q(net.shape(), std::move(x), h0, c0);
  const NormsOptions opt = norms_options(spectral, tol, max_iter, exact_max_dim);
  BatchNorms r = without_gil([&] {
    Canceller cancel = signal_canceller();
    return recurrent_jacobian_norms(net, q.xp, q.steps, q.batch, q.h0p, q.c0p, opt, cancel);
  });
  return norms_dict(std::move(r), q.batch, q.steps);
}

template <class T>
py::tuple rnn_spectrum(const RecurrentChain<T>& net, CArray<double> x, py::object h0, py::object c0,
                       int k, int interval, const std::string& start, std::uint64_t seed) {
  const Sequences q(net.shape(), std::move(x), h0, c0);
  const SpectrumOptions opt = spectrum_options(k, interval, start, seed);
  std::vector<double> S = without_gil([&] {
    Canceller cancel = signal_canceller();
    return recurrent_qr_spectrum(net, q.xp, q.steps, q.batch, q.h0p, q.c0p, opt, cancel);
  });
  return spectrum_tuple(std::move(S), q.batch, q.steps, k, interval);
}

template <class T>
void bind_for(py::module_& m) {
  m.def("jacobian_norms", &chain_norms<T>, py::arg("chain"), py::arg("x"), py::arg("train"),
        py::arg("layers"), py::arg("spectral"), py::arg("tol"), py::arg("max_iter"),
        py::arg("exact_max_dim"),
        R"doc(Per-example log10 norms of the Jacobian of every top-level block of a chain.

With layers, per layer of a [Linear, Activation] * depth chain. When a train-mode BatchNorm
couples the batch, the whole batch is one example (state size batch x width).)doc");
  m.def("jacobian_spectrum", &chain_spectrum<T>, py::arg("chain"), py::arg("x"), py::arg("train"),
        py::arg("layers"), py::arg("k"), py::arg("interval"), py::arg("start"), py::arg("seed"),
        R"doc(QR spectrum of the product of a chain's block (or layer) Jacobians.)doc");
  m.def("jacobian_dims", &chain_jacobian_dims<T>, py::arg("chain"), py::arg("batch"),
        py::arg("train"), py::arg("layers"), "State sizes dim(0..length) of the Jacobian steps.");
  m.def("jacobian_norms", &rnn_norms<T>, py::arg("chain"), py::arg("x"), py::arg("h0"),
        py::arg("c0"), py::arg("spectral"), py::arg("tol"), py::arg("max_iter"),
        py::arg("exact_max_dim"),
        R"doc(Per-sequence, per-step log10 norms of J_t = ds_t / ds_{t-1} of a recurrent chain.

x is float64 (steps, batch, input_size); h0, c0 float64 (num_layers, batch, hidden_size) or
None. The state s_t stacks every layer's h_t (and the LSTM's c_t after it). Returns a dict of
(batch, steps) arrays as for an MLP chain.)doc");
  m.def(
      "jacobian_spectrum", &rnn_spectrum<T>, py::arg("chain"), py::arg("x"), py::arg("h0"),
      py::arg("c0"), py::arg("k"), py::arg("interval"), py::arg("start"), py::arg("seed"),
      R"doc(Cumulative sums of log|R_ii| of the QR factorisation of J_t ... J_1 Q_0 = ds_t/ds_0 Q_0.

Returns (depths, S) as for an MLP chain, with depths the time steps.)doc");
}

}  // namespace

void bind_jacobian(py::module_& m) {
  bind_for<double>(m);
  bind_for<float>(m);
}

}  // namespace gradchain::bindings
