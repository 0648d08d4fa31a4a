#include <limits>
#include <string>

#include "gradchain/jacobian.hpp"
#include "gradchain/mlp.hpp"
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

template <class T>
py::dict norms(const MLPChain<T>& net, CArray<double> x, bool spectral, double tol, int max_iter,
               int exact_max_dim) {
  const int batch = checked_batch(x, net.widths()[0]);
  NormsOptions opt;
  opt.spectral = spectral;
  opt.tol = tol;
  opt.max_iter = max_iter;
  opt.exact_max_dim = exact_max_dim;
  opt.validate();
  const double* xp = x.data();
  // The core reads only x's buffer, which this frame keeps alive, and the chain, which the
  // caller's reference keeps alive.
  BatchNorms r = without_gil([&] {
    Canceller cancel = signal_canceller();
    return mlp_jacobian_norms(net, xp, batch, opt, cancel);
  });
  const py::ssize_t L = net.depth();
  py::dict d;
  d["log10_frobenius"] = to_numpy(std::move(r.log10_frobenius), {batch, L});
  d["log10_spectral"] = to_numpy(std::move(r.log10_spectral), {batch, L});
  d["iterations"] = to_numpy(std::move(r.iterations), {batch, L});
  py::array_t<bool> conv({static_cast<py::ssize_t>(batch), L});
  std::copy(r.converged.begin(), r.converged.end(), conv.mutable_data());
  d["converged"] = conv;
  return d;
}

template <class T>
py::tuple spectrum(const MLPChain<T>& net, CArray<double> x, int k, int interval,
                   const std::string& start, std::uint64_t seed) {
  const int batch = checked_batch(x, net.widths()[0]);
  SpectrumOptions opt;
  opt.k = k;
  opt.interval = interval;
  opt.start = SpectrumOptions::parse_start(start);
  opt.seed = seed;
  opt.validate(net.widths());
  const double* xp = x.data();
  // As in norms(): only C++ values and kept-alive buffers cross into the core.
  std::vector<double> S = without_gil([&] {
    Canceller cancel = signal_canceller();
    return mlp_qr_spectrum(net, xp, batch, opt, cancel);
  });
  std::vector<int> depths = spectrum_depths(net.depth(), interval);
  const auto nd = static_cast<py::ssize_t>(depths.size());
  return py::make_tuple(to_numpy(std::move(depths), {nd}),
                        to_numpy(std::move(S), {batch, nd, k}));
}

template <class T>
void bind_for(py::module_& m) {
  m.def("jacobian_norms", &norms<T>, py::arg("chain"), py::arg("x"), py::arg("spectral"),
        py::arg("tol"), py::arg("max_iter"), py::arg("exact_max_dim"),
        R"doc(Per-example, per-layer log10 Frobenius and spectral norms of J_l = diag(phi'(z_l)) W_l.

x is float64 (batch, widths[0]). Returns a dict of (batch, depth) arrays: log10_frobenius,
log10_spectral (NaN unless spectral), iterations (0: exact SVD), converged.)doc");
  m.def("jacobian_spectrum", &spectrum<T>, py::arg("chain"), py::arg("x"), py::arg("k"),
        py::arg("interval"), py::arg("start"), py::arg("seed"),
        R"doc(Cumulative sums of log|R_ii| of the QR factorisation of J_l ... J_1 Q_0.

Returns (depths, S): depths (n_depths,) int32, the layers after which a QR happened;
S (batch, n_depths, k) float64, natural log.)doc");
}

}  // namespace

void bind_jacobian(py::module_& m) {
  bind_for<double>(m);
  bind_for<float>(m);
}

}  // namespace gradchain::bindings
