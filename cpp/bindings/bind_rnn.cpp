#include <memory>
#include <string>
#include <tuple>

#include "gradchain/rnn.hpp"
#include "gradchain/system.hpp"
#include "pybind.hpp"

namespace gradchain::bindings {
namespace {

Truncation parse_truncation(const std::string& mode) {
  static const std::vector<std::string> names = {"none", "detach", "window"};
  return static_cast<Truncation>(parse_name("truncate_mode", mode, names));
}

RecurrentShape make_shape(const std::string& cell, int input_size, int hidden_size, int num_layers,
                          int output_size, bool bias) {
  RecurrentShape s;
  s.cell = parse_cell(cell);
  s.input_size = input_size;
  s.hidden_size = hidden_size;
  s.num_layers = num_layers;
  s.output_size = output_size;
  s.bias = bias;
  s.validate();
  return s;
}

py::ssize_t state_size(const RecurrentShape& s, int batch) {
  return static_cast<py::ssize_t>(s.num_layers) * batch * s.hidden_size;
}

template <class T>
py::dict run(const RecurrentChain<T>& net, CArray<T> x, py::object h0, py::object c0,
             const std::string& loss, py::object target, bool every_step,
             const std::string& truncation, int window, double max_norm, double norm_type,
             bool keep_grads) {
  const RecurrentShape& s = net.shape();
  int steps = 0, batch = 0;  // captured below, which C++17 forbids for structured bindings
  std::tie(steps, batch) = checked_sequences(x, s.input_size);
  RecurrentRequest req;
  req.loss = parse_loss(loss);
  req.target_every_step = every_step;
  req.truncation = parse_truncation(truncation);
  req.window = window;
  req.max_norm = max_norm;
  req.norm_type = norm_type;
  req.keep_grads = keep_grads;
  CArray<T> h0a, c0a;
  TargetArrays<T> tgt;
  req.h0 = state_ptr(h0, state_size(s, batch), h0a, "h0");
  req.c0 = state_ptr(c0, state_size(s, batch), c0a, "c0");
  req.target =
      target_ptr(req.loss == LossKind::cross_entropy, req.loss == LossKind::probe, target, tgt);
  const T* xp = x.data();
  // Every array the core reads is held by this frame; the GIL can go.
  RecurrentResult<T> r = without_gil([&] {
    Canceller cancel = signal_canceller();
    return net.run(xp, steps, batch, req, cancel);
  });
  const py::ssize_t L = s.num_layers, H = s.hidden_size, B = batch, T1 = steps + 1;
  py::dict d;
  d["log10_state_grad_norms"] = to_numpy(std::move(r.log10_state_grad_norms), {L, T1});
  if (s.cell == CellKind::lstm)
    d["log10_cell_grad_norms"] = to_numpy(std::move(r.log10_cell_grad_norms), {L, T1});
  d["log10_param_grad_norms"] = to_numpy_d(std::move(r.log10_param_grad_norms));
  put_loss_and_clip(d, r);
  d["h_n"] = to_numpy(std::move(r.h_n), {L, B, H});
  if (s.cell == CellKind::lstm) d["c_n"] = to_numpy(std::move(r.c_n), {L, B, H});
  if (keep_grads) {
    const auto shapes = s.param_shapes();
    py::list g;
    for (std::size_t i = 0; i < r.param_grads.size(); ++i) {
      std::vector<py::ssize_t> shp(shapes[i].begin(), shapes[i].end());
      g.append(to_numpy(std::move(r.param_grads[i]), shp));
    }
    d["param_grads"] = g;
    d["state_grads"] = to_numpy(std::move(r.state_grads), {L, T1, B, H});
    if (s.cell == CellKind::lstm)
      d["cell_grads"] = to_numpy(std::move(r.cell_grads), {L, T1, B, H});
  }
  return d;
}

template <class T>
py::tuple forward(const RecurrentChain<T>& net, CArray<T> x, py::object h0, py::object c0) {
  const RecurrentShape& s = net.shape();
  int steps = 0, batch = 0;  // captured below, which C++17 forbids for structured bindings
  std::tie(steps, batch) = checked_sequences(x, s.input_size);
  RecurrentRequest req;
  req.forward_only = true;
  CArray<T> h0a, c0a;
  req.h0 = state_ptr(h0, state_size(s, batch), h0a, "h0");
  req.c0 = state_ptr(c0, state_size(s, batch), c0a, "c0");
  const T* xp = x.data();
  RecurrentResult<T> r = without_gil([&] {
    Canceller cancel = signal_canceller();
    return net.run(xp, steps, batch, req, cancel);
  });
  const py::ssize_t L = s.num_layers, H = s.hidden_size, B = batch;
  py::object c_n = py::none();
  if (s.cell == CellKind::lstm) c_n = to_numpy(std::move(r.c_n), {L, B, H});
  return py::make_tuple(to_numpy(std::move(r.output), {static_cast<py::ssize_t>(steps), B, H}),
                        to_numpy(std::move(r.h_n), {L, B, H}), c_n);
}

template <class T>
void bind_chain(py::module_& m, const char* name) {
  using Chain = RecurrentChain<T>;
  py::class_<Chain>(m, name, "A recurrent chain (see gradchain.RNN).")
      .def(py::init([](const std::string& cell, int input_size, int hidden_size, int num_layers,
                       int output_size, bool bias, const std::string& init, double gain,
                       double recurrent_gain, double spectral_radius, py::object forget_bias,
                       std::uint64_t seed) {
             RecurrentInit spec;
             spec.kind = RecurrentInit::parse_kind(init);
             spec.gain = gain;
             spec.recurrent_gain = recurrent_gain;
             spec.spectral_radius = spectral_radius;
             if (!forget_bias.is_none()) {
               spec.set_forget_bias = true;
               spec.forget_bias = forget_bias.cast<double>();
             }
             const RecurrentShape shape =
                 make_shape(cell, input_size, hidden_size, num_layers, output_size, bias);
             return without_gil([&] {
               Canceller cancel = signal_canceller();
               return std::make_unique<Chain>(shape, spec, seed, &cancel);
             });
           }),
           py::arg("cell"), py::arg("input_size"), py::arg("hidden_size"), py::arg("num_layers"),
           py::arg("output_size"), py::arg("bias"), py::arg("init"), py::arg("gain"),
           py::arg("recurrent_gain"), py::arg("spectral_radius"), py::arg("forget_bias"),
           py::arg("seed"))
      .def_static(
          "from_params",
          [](const std::string& cell, int input_size, int hidden_size, int num_layers,
             int output_size, bool bias, std::vector<CArray<T>> arrays) {
            const RecurrentShape shape =
                make_shape(cell, input_size, hidden_size, num_layers, output_size, bias);
            double total = 0;
            for (const auto& a : arrays) total += double(a.size()) * sizeof(T);
            check_memory(total, "copying the chain's parameters");
            std::vector<std::vector<T>> params;
            for (auto& a : arrays) params.emplace_back(a.data(), a.data() + a.size());
            return std::make_unique<Chain>(shape, std::move(params));
          },
          py::arg("cell"), py::arg("input_size"), py::arg("hidden_size"), py::arg("num_layers"),
          py::arg("output_size"), py::arg("bias"), py::arg("params"),
          "A chain from parameter arrays in state_dict order.")
      .def_property_readonly("param_names", [](const Chain& c) { return c.shape().param_names(); })
      .def(
          "param",
          [](py::object self, std::size_t i) {
            Chain& c = self.cast<Chain&>();
            if (i >= c.param_count()) throw py::index_error("parameter index out of range");
            const auto shp = c.shape().param_shapes()[i];
            std::vector<py::ssize_t> shape(shp.begin(), shp.end());
            return py::array_t<T>(shape, c.param(i), self);
          },
          py::arg("index"), "View of a parameter (state_dict order).")
      .def("run_bytes",
           [](const Chain& c, int steps, int batch, bool keep_grads, const std::string& truncation,
              int window, bool every_step, bool forward_only) {
             RecurrentRequest req;
             req.keep_grads = keep_grads;
             req.truncation = parse_truncation(truncation);
             req.window = window;
             req.target_every_step = every_step;
             req.forward_only = forward_only;
             return c.run_bytes(steps, batch, req);
           })
      .def("forward", &forward<T>, py::arg("x"), py::arg("h0"), py::arg("c0"))
      .def("run", &run<T>, py::arg("x"), py::arg("h0"), py::arg("c0"), py::arg("loss"),
           py::arg("target"), py::arg("every_step"), py::arg("truncation"), py::arg("window"),
           py::arg("max_norm"), py::arg("norm_type"), py::arg("keep_grads"));
}

}  // namespace

void bind_rnn(py::module_& m) {
  bind_chain<double>(m, "RecurrentChain64");
  bind_chain<float>(m, "RecurrentChain32");
  m.def("cell_names", &cell_names);
  m.def("recurrent_init_names", &RecurrentInit::names);
}

}  // namespace gradchain::bindings
