#include <algorithm>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "gradchain/activation.hpp"
#include "gradchain/batch_norm.hpp"
#include "gradchain/chain.hpp"
#include "gradchain/layer_norm.hpp"
#include "gradchain/linear.hpp"
#include "gradchain/residual.hpp"
#include "gradchain/rms_norm.hpp"
#include "gradchain/scale.hpp"
#include "pybind.hpp"

namespace gradchain::bindings {
namespace {

// A block from its spec (a dict with "kind" and the block's arguments, as gradchain's
// Python block classes write it). Adding a block kind is one entry here.
template <class T>
std::unique_ptr<Block<T>> make_block(const py::dict& d, bool store = true);

// store = false: the Linear blocks keep no weights (they draw them for each pass).
template <class T>
std::vector<std::unique_ptr<Block<T>>> make_blocks(const py::list& specs, bool store = true) {
  std::vector<std::unique_ptr<Block<T>>> out;
  std::size_t i = 0;
  for (const py::handle& h : specs) {
    // A deep chain allocates its parameters here, reading the specs with the GIL held;
    // now and then other threads get the GIL (a timer that sends SIGINT, say) and Ctrl-C
    // stops the construction.
    if (i++ % 64 == 0) {
      {
        py::gil_scoped_release let_others_run;
      }
      if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    }
    out.push_back(make_block<T>(h.cast<py::dict>(), store));
  }
  return out;
}

template <class T>
using Factory = std::function<std::unique_ptr<Block<T>>(const py::dict&, bool)>;

std::optional<double> optional_double(const py::dict& d, const char* key) {
  if (d[key].is_none()) return std::nullopt;
  return d[key].cast<double>();
}

template <class T>
const std::map<std::string, Factory<T>>& factories() {
  static const std::map<std::string, Factory<T>> table = {
      {"linear",
       [](const py::dict& d, bool store) {
         return std::make_unique<Linear<T>>(d["in_features"].cast<int>(),
                                            d["out_features"].cast<int>(), d["bias"].cast<bool>(),
                                            store);
       }},
      {"activation",
       [](const py::dict& d, bool store) {
         return std::make_unique<ActivationBlock<T>>(
             d["width"].cast<int>(),
             Activation::parse(d["activation"].cast<std::string>(),
                               d["negative_slope"].cast<double>(), d["alpha"].cast<double>()));
       }},
      {"layer_norm",
       [](const py::dict& d, bool store) {
         return std::make_unique<LayerNorm<T>>(d["width"].cast<int>(), d["eps"].cast<double>(),
                                               d["elementwise_affine"].cast<bool>(),
                                               d["bias"].cast<bool>());
       }},
      {"rms_norm",
       [](const py::dict& d, bool store) {
         return std::make_unique<RMSNorm<T>>(d["width"].cast<int>(), optional_double(d, "eps"),
                                             d["elementwise_affine"].cast<bool>());
       }},
      {"batch_norm",
       [](const py::dict& d, bool store) {
         return std::make_unique<BatchNorm<T>>(
             d["width"].cast<int>(), d["eps"].cast<double>(), optional_double(d, "momentum"),
             d["affine"].cast<bool>(), d["track_running_stats"].cast<bool>());
       }},
      {"scale",
       [](const py::dict& d, bool store) {
         return std::make_unique<Scale<T>>(d["width"].cast<int>(), d["value"].cast<double>());
       }},
      {"residual",
       [](const py::dict& d, bool store) {
         std::unique_ptr<Block<T>> shortcut;
         if (!d["shortcut"].is_none())
           shortcut = make_block<T>(d["shortcut"].cast<py::dict>(), store);
         return std::make_unique<Residual<T>>(make_blocks<T>(d["body"].cast<py::list>(), store),
                                              d["scale"].cast<double>(), std::move(shortcut));
       }},
  };
  return table;
}

template <class T>
std::unique_ptr<Block<T>> make_block(const py::dict& d, bool store) {
  const auto kind = d["kind"].cast<std::string>();
  const auto& table = factories<T>();
  const auto it = table.find(kind);
  if (it == table.end()) {
    std::string names;
    for (const auto& [k, f] : table) names += (names.empty() ? "'" : ", '") + k + "'";
    throw std::invalid_argument("block kind must be one of " + names + "; got '" + kind + "'");
  }
  std::unique_ptr<Block<T>> b = it->second(d, store);
  if (d.contains("name") && !d["name"].is_none()) b->set_name(d["name"].cast<std::string>());
  return b;
}

std::string drawn_message(const std::string& name) {
  return name +
         " is drawn for each pass (a chain built with store_weights=False) and cannot be "
         "written; build the chain with store_weights=True to set its parameters";
}

template <class T>
py::dict backward(Chain<T>& net, CArray<T> x, const std::string& loss, py::object target,
                  bool keep_grads, double max_norm, double norm_type, bool train, bool param_grads,
                  int checkpoint) {
  if (x.ndim() != 2 || x.shape(1) != net.in_width())
    throw std::invalid_argument("x must have shape (batch, " + std::to_string(net.in_width()) +
                                ")");
  const int batch = static_cast<int>(x.shape(0));
  ChainRequest req;
  req.loss = parse_loss(loss);
  req.keep_param_grads = req.keep_boundary_grads = keep_grads;
  req.max_norm = max_norm;
  req.norm_type = norm_type;
  req.train = train;
  req.param_grads = param_grads;
  req.checkpoint = checkpoint;
  TargetArrays<T> tgt;
  req.target =
      target_ptr(req.loss == LossKind::cross_entropy, req.loss == LossKind::probe, target, tgt);
  const T* xp = x.data();
  // Everything the core reads is now a C++ pointer into arrays this frame keeps alive,
  // so the GIL can go.
  ChainResult<T> r = without_gil([&] {
    Canceller cancel = signal_canceller();
    return net.backward(xp, batch, req, cancel);
  });
  py::dict d;
  d["log10_param_grad_norms"] = to_numpy_d(std::move(r.log10_param_grad_norms));
  d["log10_boundary_grad_norms"] = to_numpy_d(std::move(r.log10_boundary_grad_norms));
  put_loss_and_clip(d, r);
  d["output"] = to_numpy(std::move(r.output), {batch, net.out_width()});
  d["output_mantissa"] = to_numpy(std::move(r.output_mantissa), {batch, net.out_width()});
  d["output_log2_scale"] = r.output_log2_scale;
  if (keep_grads) {
    py::list pg, bg;
    const auto& ps = net.parameters();
    for (std::size_t i = 0; i < net.num_params(); ++i) {
      std::vector<py::ssize_t> shape(ps[i].shape.begin(), ps[i].shape.end());
      pg.append(to_numpy(std::move(r.param_grads[i]), shape));
    }
    for (auto& g : r.boundary_grads) {
      const auto n = static_cast<py::ssize_t>(g.size()) / batch;
      bg.append(to_numpy(std::move(g), {batch, n}));
    }
    d["param_grads"] = pg;
    d["boundary_grads"] = bg;
  }
  return d;
}

// J v (or J^T v) of top-level block `index` at the point x * 2^x_log2_scale, for the
// vectors v[0..k) (each rows x width).
template <class T>
py::array_t<T> block_jacobian_product(const Chain<T>& net, std::size_t index, CArray<T> x,
                                      std::int64_t x_log2_scale, CArray<T> v, bool transpose,
                                      bool train) {
  if (index >= net.size()) throw py::index_error("block index out of range");
  const Block<T>& b = net.block(index);
  if (b.kind() == BlockKind::residual)
    throw std::invalid_argument("block " + std::to_string(index) +
                                " is a Residual: its Jacobian is taken through its parts");
  const int in = b.in_width(), out = b.out_width();
  if (x.ndim() != 2 || x.shape(1) != in)
    throw std::invalid_argument("x must have shape (rows, " + std::to_string(in) + ")");
  const auto rows = static_cast<std::size_t>(x.shape(0));
  const int vw = transpose ? out : in, ow = transpose ? in : out;
  if (v.ndim() != 3 || static_cast<std::size_t>(v.shape(1)) != rows || v.shape(2) != vw)
    throw std::invalid_argument("v must have shape (k, " + std::to_string(rows) + ", " +
                                std::to_string(vw) + ")");
  const int k = static_cast<int>(v.shape(0));
  const std::size_t w = static_cast<std::size_t>(std::max(in, out));
  std::vector<T> y(rows * static_cast<std::size_t>(out)), scratch(rows * w * 2 * (k + 1));
  std::vector<double> local;
  ForwardArgs<T> f;
  f.rows = rows;
  f.x = x.data();
  f.ex = x_log2_scale;
  f.y = y.data();
  f.scratch = scratch.data();
  f.train = train;
  f.local = &local;
  JacobianArgs<T> a;
  a.rows = rows;
  a.x = x.data();
  a.ex = x_log2_scale;
  a.ey = b.forward(f);
  a.y = y.data();
  a.scratch = scratch.data();
  a.train = train;
  a.local = &local;
  std::vector<T> res(static_cast<std::size_t>(k) * rows * static_cast<std::size_t>(ow));
  if (transpose)
    b.vjp(a, v.data(), k, res.data());
  else
    b.jvp(a, v.data(), k, res.data());
  return to_numpy(std::move(res), {k, static_cast<py::ssize_t>(rows), ow});
}

template <class T>
void bind(py::module_& m, const char* name) {
  using C = Chain<T>;
  py::class_<C>(m, name, "A chain of blocks (see gradchain.Chain).")
      .def(py::init([](const py::list& specs, bool store_weights) {
             return std::make_unique<C>(make_blocks<T>(specs, store_weights));
           }),
           py::arg("specs"), py::arg("store_weights") = true)
      .def_property_readonly("draws_params", &C::draws_params)
      .def(
          "init",
          [](C& c, const std::string& init, double gain, double sigma_w, double bias_std,
             std::uint64_t seed, bool keep_units) {
            InitSpec spec;
            spec.kind = InitSpec::parse_kind(init);
            spec.gain = gain;
            spec.sigma_w = sigma_w;
            spec.bias_std = bias_std;
            // All arguments are C++ values by now.
            without_gil([&] {
              Canceller cancel = signal_canceller();
              c.init(spec, seed, &cancel, keep_units);
              return 0;
            });
          },
          py::arg("init"), py::arg("gain"), py::arg("sigma_w"), py::arg("bias_std"),
          py::arg("seed"), py::arg("keep_units") = false)
      .def_property_readonly("in_width", &C::in_width)
      .def_property_readonly("out_width", &C::out_width)
      .def_property_readonly("num_params", &C::num_params)
      .def_property_readonly(
          "parameters",
          [](const C& c) {
            py::list out;
            for (const auto& p : c.parameters())
              out.append(py::make_tuple(p.name, py::tuple(py::cast(p.shape)), p.buffer));
            return out;
          })
      .def(
          "param_name",
          [](const C& c, std::size_t i) {
            if (i >= c.parameters().size()) throw py::index_error("parameter index out of range");
            return c.parameters()[i].name;
          },
          py::arg("index"), "The torch name of parameter `index`.")
      .def(
          "param",
          [](py::object self, std::size_t i) {
            C& c = self.cast<C&>();
            if (i >= c.parameters().size()) throw py::index_error("parameter index out of range");
            const auto& p = c.parameters()[i];
            std::vector<py::ssize_t> shape(p.shape.begin(), p.shape.end());
            if (p.block->draw_size() > 0) {  // drawn now, into a new array
              const auto& lin = static_cast<const Linear<T>&>(*p.block);
              std::vector<T> w(static_cast<std::size_t>(lin.in_width()) *
                               static_cast<std::size_t>(lin.out_width())),
                  b(static_cast<std::size_t>(lin.out_width()));
              without_gil([&] {
                lin.draw_params(w.data(), b.data());
                return 0;
              });
              return to_numpy(std::move(p.index == 0 ? w : b), shape);
            }
            return py::array_t<T>(shape, p.data(), self);
          },
          py::arg("index"),
          "A view of parameter `index` (write through set_param); a new array where the chain "
          "draws it for each pass.")
      .def(
          "set_param",
          [](C& c, std::size_t i, CArray<T> a) {
            if (i >= c.parameters().size()) throw py::index_error("parameter index out of range");
            const auto& p = c.parameters()[i];
            if (p.block->draw_size() > 0) throw std::invalid_argument(drawn_message(p.name));
            if (static_cast<std::size_t>(a.size()) != p.size)
              throw std::invalid_argument(p.name + " needs " + std::to_string(p.size) +
                                          " values; got " + std::to_string(a.size()));
            std::copy(a.data(), a.data() + a.size(), p.data());
            c.params_changed();
          },
          py::arg("index"), py::arg("values"))
      .def(
          "set_params",
          [](C& c, const py::list& items) {
            // Every pair is converted and checked before any is written (a bad one leaves
            // the chain as it was), and the blocks refresh what they derive from their
            // parameters once, not once per parameter.
            const auto& ps = c.parameters();
            std::vector<std::pair<std::size_t, CArray<T>>> todo;
            for (const py::handle& h : items) {
              const auto pair = h.cast<py::tuple>();
              const auto i = pair[0].cast<std::size_t>();
              if (i >= ps.size()) throw py::index_error("parameter index out of range");
              if (ps[i].block->draw_size() > 0)
                throw std::invalid_argument(drawn_message(ps[i].name));
              auto a = pair[1].cast<CArray<T>>();
              if (static_cast<std::size_t>(a.size()) != ps[i].size)
                throw std::invalid_argument(ps[i].name + " needs " + std::to_string(ps[i].size) +
                                            " values; got " + std::to_string(a.size()));
              todo.emplace_back(i, std::move(a));
            }
            for (const auto& [i, a] : todo) std::copy(a.data(), a.data() + a.size(), ps[i].data());
            c.params_changed();
          },
          py::arg("items"), "Writes (index, values) pairs, then refreshes the blocks once.")
      .def("couples_batch", &C::couples_batch, py::arg("train"))
      .def(
          "backward_bytes",
          [](const C& c, int batch, bool keep_grads, int checkpoint) {
            ChainRequest req;
            req.keep_param_grads = req.keep_boundary_grads = keep_grads;
            req.checkpoint = checkpoint;
            return c.backward_bytes(batch, req);
          },
          py::arg("batch"), py::arg("keep_grads"), py::arg("checkpoint") = 0)
      .def(
          "forward",
          [](C& c, CArray<T> x, bool train) {
            if (x.ndim() != 2 || x.shape(1) != c.in_width())
              throw std::invalid_argument("x must have shape (batch, " +
                                          std::to_string(c.in_width()) + ")");
            const int batch = static_cast<int>(x.shape(0));
            ChainRequest req;
            req.forward_only = true;
            req.train = train;
            const T* xp = x.data();
            // x stays alive in this frame; the core reads only the pointer.
            ChainResult<T> r = without_gil([&] {
              Canceller cancel = signal_canceller();
              return c.backward(xp, batch, req, cancel);
            });
            return py::make_tuple(to_numpy(std::move(r.output), {batch, c.out_width()}),
                                  r.output_log2_scale);
          },
          py::arg("x"), py::arg("train"))
      .def("backward", &backward<T>, py::arg("x"), py::arg("loss"), py::arg("target"),
           py::arg("keep_grads"), py::arg("max_norm"), py::arg("norm_type"), py::arg("train"),
           py::arg("param_grads") = true, py::arg("checkpoint") = 0)
      .def("block_jacobian_product", &block_jacobian_product<T>, py::arg("index"), py::arg("x"),
           py::arg("x_log2_scale"), py::arg("v"), py::arg("transpose"), py::arg("train"),
           "J v (transpose: J^T v) of top-level block `index` at x * 2^x_log2_scale; v has "
           "shape (k, rows, width).");
}

}  // namespace

void bind_chain(py::module_& m) {
  bind<double>(m, "Chain64");
  bind<float>(m, "Chain32");
  m.def("activation_names", &Activation::names);
  m.def("init_names", &InitSpec::names);
  m.def("loss_names", &loss_names);
}

}  // namespace gradchain::bindings
