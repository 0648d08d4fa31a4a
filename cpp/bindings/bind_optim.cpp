// The optimizers (SGD; the other optimizers follow) and the learning-rate schedule.
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "gradchain/lr_schedule.hpp"
#include "gradchain/optimizer.hpp"
#include "pybind.hpp"

namespace gradchain::bindings {
namespace {

// An OptimizerSpec from a dict of its fields and "kind"; absent fields keep their defaults.
OptimizerSpec make_spec(const py::dict& d) {
  OptimizerSpec s;
  s.kind = parse_optimizer(d["kind"].cast<std::string>());
  auto get = [&](const char* key, auto& field) {
    if (d.contains(key)) field = d[key].cast<std::remove_reference_t<decltype(field)>>();
  };
  get("lr", s.lr);
  get("weight_decay", s.weight_decay);
  get("maximize", s.maximize);
  get("momentum", s.momentum);
  get("dampening", s.dampening);
  get("nesterov", s.nesterov);
  get("beta1", s.beta1);
  get("beta2", s.beta2);
  get("eps", s.eps);
  get("amsgrad", s.amsgrad);
  get("alpha", s.alpha);
  get("centered", s.centered);
  get("lr_decay", s.lr_decay);
  get("initial_accumulator_value", s.initial_accumulator_value);
  return s;
}

template <class T>
void bind_optimizer(py::module_& m, const char* name) {
  using O = Optimizer<T>;
  py::class_<O>(m, name, "An optimizer of torch.optim (see gradchain.optim).")
      .def(py::init([](const py::dict& spec) { return make_optimizer<T>(make_spec(spec)); }),
           py::arg("spec"))
      .def(
          "step",
          [](O& o, const py::list& params, const py::list& grads, double lr) {
            if (params.size() != grads.size())
              throw std::invalid_argument("params and grads must have the same length");
            for (std::size_t i = 0; i < params.size(); ++i) {
              auto p = params[i].cast<py::array_t<T>>();
              auto g = grads[i].cast<CArray<T>>();
              if (!(p.flags() & py::array::c_style) || !p.writeable())
                throw std::invalid_argument("params[" + std::to_string(i) +
                                            "] must be a writeable C-contiguous array");
              if (p.size() != g.size())
                throw std::invalid_argument("grads[" + std::to_string(i) +
                                            "] must have the size of params[" + std::to_string(i) +
                                            "]");
              o.step(i, p.mutable_data(), g.data(), static_cast<std::size_t>(p.size()), lr);
            }
          },
          py::arg("params"), py::arg("grads"), py::arg("lr"),
          "One update of every parameter (in place) at learning rate lr.")
      .def("state",
           [](const O& o) {
             py::list out;
             for (const ParamState<T>& s : o.state()) {
               py::dict bufs;
               for (const auto& [k, v] : s.buffers)
                 bufs[py::str(k)] = py::array_t<T>(static_cast<py::ssize_t>(v.size()), v.data());
               out.append(py::make_tuple(s.step, bufs));
             }
             return out;
           })
      .def(
          "set_state",
          [](O& o, const py::list& states) {
            std::vector<ParamState<T>> all;
            for (const py::handle& h : states) {
              const auto t = h.cast<py::tuple>();
              ParamState<T> s;
              s.step = t[0].cast<double>();
              for (const auto& item : t[1].cast<py::dict>()) {
                const py::handle key = item.first, value = item.second;
                auto a = value.template cast<CArray<T>>();
                s.buffers.emplace_back(key.template cast<std::string>(),
                                       std::vector<T>(a.data(), a.data() + a.size()));
              }
              all.push_back(std::move(s));
            }
            o.state() = std::move(all);
          },
          py::arg("state"));
}

}  // namespace

void bind_optim(py::module_& m) {
  bind_optimizer<double>(m, "Optimizer64");
  bind_optimizer<float>(m, "Optimizer32");
  py::class_<LRSchedule>(m, "LRSchedule", "The learning rate of each step.")
      .def(py::init<double>(), py::arg("base_lr"))
      .def("lr", &LRSchedule::lr)
      .def("step", &LRSchedule::step, py::arg("loss"));
}

}  // namespace gradchain::bindings
