#include <cmath>
#include <memory>
#include <string>

#include "gradchain/mlp.hpp"
#include "pybind.hpp"

namespace gradchain::bindings {
namespace {

template <class T>
py::dict backward(const MLPChain<T>& net, CArray<T> x, const std::string& loss, py::object target,
                  bool keep_grads, double max_norm, double norm_type) {
  if (x.ndim() != 2 || x.shape(1) != net.widths()[0])
    throw std::invalid_argument("x must have shape (batch, " + std::to_string(net.widths()[0]) +
                                ")");
  const int batch = static_cast<int>(x.shape(0));
  BackwardRequest req;
  req.loss = parse_loss(loss);
  req.keep_weight_grads = req.keep_bias_grads = req.keep_activation_grads = keep_grads;
  req.max_norm = max_norm;
  req.norm_type = norm_type;
  TargetArrays<T> tgt;
  req.target =
      target_ptr(req.loss == LossKind::cross_entropy, req.loss == LossKind::probe, target, tgt);
  const T* xp = x.data();
  // Everything the core reads is now a C++ pointer into arrays this frame keeps alive,
  // so the GIL can go.
  BackwardResult<T> r = without_gil([&] {
    Canceller cancel = signal_canceller();
    return net.backward(xp, batch, req, cancel);
  });

  const int L = net.depth();
  const auto& w = net.widths();
  py::dict d;
  d["log10_weight_grad_norms"] = to_numpy_d(std::move(r.log10_weight_grad_norms));
  d["log10_bias_grad_norms"] = to_numpy_d(std::move(r.log10_bias_grad_norms));
  d["log10_activation_grad_norms"] = to_numpy_d(std::move(r.log10_activation_grad_norms));
  put_loss_and_clip(d, r);
  d["output"] = to_numpy(std::move(r.output), {batch, w[static_cast<std::size_t>(L)]});
  d["output_log2_scale"] = r.output_log2_scale;
  if (keep_grads) {
    py::list wg, bg, ag;
    for (int l = 0; l < L; ++l) {
      const auto u = static_cast<std::size_t>(l);
      wg.append(to_numpy(std::move(r.weight_grads[u]), {w[u + 1], w[u]}));
      bg.append(to_numpy(std::move(r.bias_grads[u]), {w[u + 1]}));
    }
    for (int l = 0; l <= L; ++l) {
      const auto u = static_cast<std::size_t>(l);
      ag.append(to_numpy(std::move(r.activation_grads[u]), {batch, w[u]}));
    }
    d["weight_grads"] = wg;
    d["bias_grads"] = bg;
    d["activation_grads"] = ag;
  }
  return d;
}

template <class T>
py::tuple forward(const MLPChain<T>& net, CArray<T> x) {
  if (x.ndim() != 2 || x.shape(1) != net.widths()[0])
    throw std::invalid_argument("x must have shape (batch, " + std::to_string(net.widths()[0]) +
                                ")");
  const int batch = static_cast<int>(x.shape(0));
  BackwardRequest req;
  req.forward_only = true;
  const T* xp = x.data();
  // x stays alive in this frame; the core reads only the pointer.
  BackwardResult<T> r = without_gil([&] {
    Canceller cancel = signal_canceller();
    return net.backward(xp, batch, req, cancel);
  });
  const py::ssize_t out = net.widths().back();
  return py::make_tuple(to_numpy(std::move(r.output), {batch, out}), r.output_log2_scale);
}

template <class T>
void bind_chain(py::module_& m, const char* name) {
  using Chain = MLPChain<T>;
  py::class_<Chain>(m, name, "A deep fully connected chain (see gradchain.MLP).")
      .def(py::init([](std::vector<int> widths, const std::string& activation,
                       double negative_slope, double alpha, const std::string& init, double gain,
                       double sigma_w, double bias_std, std::uint64_t seed) {
             InitSpec spec;
             spec.kind = InitSpec::parse_kind(init);
             spec.gain = gain;
             spec.sigma_w = sigma_w;
             spec.bias_std = bias_std;
             const Activation act = Activation::parse(activation, negative_slope, alpha);
             // All arguments are C++ values by now.
             return without_gil([&] {
               Canceller cancel = signal_canceller();
               return std::make_unique<Chain>(std::move(widths), act, spec, seed, &cancel);
             });
           }),
           py::arg("widths"), py::arg("activation"), py::arg("negative_slope"), py::arg("alpha"),
           py::arg("init"), py::arg("gain"), py::arg("sigma_w"), py::arg("bias_std"),
           py::arg("seed"))
      .def_static(
          "from_arrays",
          [](std::vector<int> widths, const std::string& activation, double negative_slope,
             double alpha, CArray<T> weights, CArray<T> biases) {
            const Activation act = Activation::parse(activation, negative_slope, alpha);
            return std::make_unique<Chain>(std::move(widths), act, weights.data(),
                                           static_cast<std::size_t>(weights.size()), biases.data(),
                                           static_cast<std::size_t>(biases.size()));
          },
          py::arg("widths"), py::arg("activation"), py::arg("negative_slope"), py::arg("alpha"),
          py::arg("weights"), py::arg("biases"),
          "A chain from concatenated row-major weights and biases.")
      .def_property_readonly("widths", &Chain::widths)
      .def_property_readonly("depth", &Chain::depth)
      .def_property_readonly("activation", [](const Chain& c) { return c.activation().name(); })
      .def_property_readonly("log_scale_forward", &Chain::log_scale_forward)
      .def(
          "weight",
          [](py::object self, int l) {
            Chain& c = self.cast<Chain&>();
            if (l < 1 || l > c.depth()) throw py::index_error("layer out of range");
            const auto u = static_cast<std::size_t>(l);
            const py::ssize_t o = c.widths()[u], i = c.widths()[u - 1];
            return py::array_t<T>({o, i}, c.weight(l), self);
          },
          py::arg("layer"), "View of W_l (1-based layer), shape (out, in).")
      .def(
          "bias",
          [](py::object self, int l) {
            Chain& c = self.cast<Chain&>();
            if (l < 1 || l > c.depth()) throw py::index_error("layer out of range");
            const py::ssize_t o = c.widths()[static_cast<std::size_t>(l)];
            return py::array_t<T>({o}, c.bias(l), self);
          },
          py::arg("layer"), "View of b_l (1-based layer).")
      .def("backward_bytes",
           [](const Chain& c, int batch, bool keep_grads) {
             BackwardRequest req;
             req.keep_weight_grads = req.keep_bias_grads = req.keep_activation_grads = keep_grads;
             return c.backward_bytes(batch, req);
           })
      .def("forward", &forward<T>, py::arg("x"),
           "The output h_L and the binary exponent the pass carried in log space.")
      .def("backward", &backward<T>, py::arg("x"), py::arg("loss"), py::arg("target"),
           py::arg("keep_grads"), py::arg("max_norm"), py::arg("norm_type"));
}

}  // namespace

void bind_mlp(py::module_& m) {
  bind_chain<double>(m, "MLPChain64");
  bind_chain<float>(m, "MLPChain32");
  m.def("activation_names", &Activation::names);
  m.def("init_names", &InitSpec::names);
  m.def("loss_names", &loss_names);
}

}  // namespace gradchain::bindings
