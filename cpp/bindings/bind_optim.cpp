// Bindings of the optimizers and learning-rate schedules. Optimizer64/Optimizer32 are the
// core's Optimizer<T> themselves (held by std::unique_ptr), so that other bindings can take
// an `Optimizer<T>&` or an `LRSchedule&` from these objects. gradchain/optim.py validates
// user input; these check only what guards the core (dtypes, sizes, writability).
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "gradchain/lr_schedule.hpp"
#include "gradchain/optimizer.hpp"
#include "pybind.hpp"

namespace gradchain::bindings {

namespace {

// Every OptimizerSpec field by its name in the spec dict ("betas" is beta1 and beta2).
const std::vector<std::pair<const char*, double OptimizerSpec::*>> kOptimizerNumbers{
    {"lr", &OptimizerSpec::lr},
    {"weight_decay", &OptimizerSpec::weight_decay},
    {"momentum", &OptimizerSpec::momentum},
    {"dampening", &OptimizerSpec::dampening},
    {"beta1", &OptimizerSpec::beta1},
    {"beta2", &OptimizerSpec::beta2},
    {"eps", &OptimizerSpec::eps},
    {"alpha", &OptimizerSpec::alpha},
    {"lr_decay", &OptimizerSpec::lr_decay},
    {"initial_accumulator_value", &OptimizerSpec::initial_accumulator_value}};
const std::vector<std::pair<const char*, bool OptimizerSpec::*>> kOptimizerFlags{
    {"maximize", &OptimizerSpec::maximize},
    {"nesterov", &OptimizerSpec::nesterov},
    {"amsgrad", &OptimizerSpec::amsgrad},
    {"centered", &OptimizerSpec::centered}};

const std::vector<std::pair<const char*, double ScheduleSpec::*>> kScheduleNumbers{
    {"gamma", &ScheduleSpec::gamma},
    {"eta_min", &ScheduleSpec::eta_min},
    {"start_factor", &ScheduleSpec::start_factor},
    {"end_factor", &ScheduleSpec::end_factor},
    {"factor", &ScheduleSpec::factor},
    {"threshold", &ScheduleSpec::threshold},
    {"min_lr", &ScheduleSpec::min_lr},
    {"eps", &ScheduleSpec::eps}};
const std::vector<std::pair<const char*, std::int64_t ScheduleSpec::*>> kScheduleCounts{
    {"step_size", &ScheduleSpec::step_size},
    {"T_max", &ScheduleSpec::T_max},
    {"total_iters", &ScheduleSpec::total_iters},
    {"patience", &ScheduleSpec::patience},
    {"cooldown", &ScheduleSpec::cooldown}};

// Sets spec.<key> from `value` if `key` is in `table`.
template <class S, class V>
bool set_field(S& spec, const std::string& key, const py::handle& value,
               const std::vector<std::pair<const char*, V S::*>>& table) {
  for (const auto& f : table)
    if (key == f.first) {
      spec.*(f.second) = value.cast<V>();
      return true;
    }
  return false;
}

OptimizerSpec optimizer_spec(const py::dict& d) {
  OptimizerSpec s;
  for (auto item : d) {
    const auto key = item.first.cast<std::string>();
    if (key == "kind")
      s.kind = parse_optimizer(item.second.cast<std::string>());
    else if (!set_field(s, key, item.second, kOptimizerNumbers) &&
             !set_field(s, key, item.second, kOptimizerFlags))
      throw std::invalid_argument("unknown optimizer argument '" + key + "'");
  }
  s.validate();
  return s;
}

py::dict optimizer_dict(const OptimizerSpec& s) {
  py::dict d;
  d["kind"] = optimizer_names()[static_cast<std::size_t>(s.kind)];
  for (const auto& f : kOptimizerNumbers) d[f.first] = s.*(f.second);
  for (const auto& f : kOptimizerFlags) d[f.first] = s.*(f.second);
  return d;
}

ScheduleSpec schedule_spec(const py::dict& d) {
  ScheduleSpec s;
  for (auto item : d) {
    const auto key = item.first.cast<std::string>();
    if (key == "kind") {
      s.kind = parse_schedule(item.second.cast<std::string>());
    } else if (key == "mode") {
      s.mode_max = parse_name("mode", item.second.cast<std::string>(), {"min", "max"}) == 1;
    } else if (key == "threshold_mode") {
      s.threshold_abs =
          parse_name("threshold_mode", item.second.cast<std::string>(), {"rel", "abs"}) == 1;
    } else if (!set_field(s, key, item.second, kScheduleNumbers) &&
               !set_field(s, key, item.second, kScheduleCounts)) {
      throw std::invalid_argument("unknown schedule argument '" + key + "'");
    }
  }
  s.validate();
  return s;
}

py::dict schedule_dict(const ScheduleSpec& s) {
  py::dict d;
  d["kind"] = schedule_names()[static_cast<std::size_t>(s.kind)];
  for (const auto& f : kScheduleNumbers) d[f.first] = s.*(f.second);
  for (const auto& f : kScheduleCounts) d[f.first] = s.*(f.second);
  d["mode"] = s.mode_max ? "max" : "min";
  d["threshold_mode"] = s.threshold_abs ? "abs" : "rel";
  return d;
}

// One optimizer step over lists of arrays, all checked before the first is touched.
template <class T>
void step_lists(Optimizer<T>& opt, const py::list& params, const py::list& grads, double lr) {
  if (params.size() != grads.size())
    throw std::invalid_argument("params and grads must have the same length; got " +
                                std::to_string(params.size()) + " and " +
                                std::to_string(grads.size()));
  const char* dtype = std::is_same<T, double>::value ? "float64" : "float32";
  std::vector<py::array> keep_p;  // references held while the GIL is released
  std::vector<CArray<T>> keep_g;
  for (std::size_t i = 0; i < params.size(); ++i) {
    const std::string pi = "params[" + std::to_string(i) + "]";
    const std::string gi = "grads[" + std::to_string(i) + "]";
    py::handle h = params[i];
    if (!py::isinstance<py::array>(h)) throw py::type_error(pi + " is not a numpy.ndarray");
    auto p = py::reinterpret_borrow<py::array>(h);
    if (!p.dtype().equal(py::dtype::of<T>()))
      throw py::type_error(pi + " must have dtype " + dtype + " (native byte order)");
    if (!(p.flags() & py::array::c_style)) throw py::value_error(pi + " is not C-contiguous");
    if (!p.writeable()) throw py::value_error(pi + " is read-only");
    auto g = py::reinterpret_borrow<py::object>(grads[i]).cast<CArray<T>>();
    if (g.size() != p.size())
      throw std::invalid_argument(gi + " has " + std::to_string(g.size()) + " numbers but " + pi +
                                  " has " + std::to_string(p.size()));
    const auto n = static_cast<std::size_t>(p.size());
    if (i < opt.state().size())
      for (const auto& b : opt.state()[i].buffers)
        if (b.second.size() != n)
          throw std::invalid_argument(pi + " has " + std::to_string(n) +
                                      " numbers but its optimizer state has " +
                                      std::to_string(b.second.size()));
    keep_p.push_back(std::move(p));
    keep_g.push_back(std::move(g));
  }
  std::vector<T*> ps;
  for (auto& p : keep_p) ps.push_back(static_cast<T*>(p.mutable_data()));
  // Only raw pointers into arrays this frame holds are used without the GIL.
  without_gil([&] {
    for (std::size_t i = 0; i < ps.size(); ++i)
      opt.step(i, ps[i], keep_g[i].data(), static_cast<std::size_t>(keep_g[i].size()), lr);
  });
}

template <class T>
py::list state_list(const Optimizer<T>& opt) {
  py::list out;
  for (const ParamState<T>& s : opt.state()) {
    py::dict buffers;
    for (const auto& b : s.buffers) {
      std::vector<T> copy(b.second);
      buffers[py::str(b.first)] =
          to_numpy(std::move(copy), {static_cast<py::ssize_t>(b.second.size())});
    }
    out.append(py::make_tuple(s.step, buffers));
  }
  return out;
}

template <class T>
void set_state_list(Optimizer<T>& opt, const py::list& items) {
  std::vector<ParamState<T>> state;
  for (std::size_t i = 0; i < items.size(); ++i) {
    const auto item = py::reinterpret_borrow<py::object>(items[i]).cast<py::tuple>();
    if (item.size() != 2)
      throw std::invalid_argument("state[" + std::to_string(i) +
                                  "] must be a pair (step, {name: array})");
    ParamState<T> s;
    s.step = item[0].cast<double>();
    for (auto b : item[1].cast<py::dict>()) {
      auto a = py::reinterpret_borrow<py::object>(b.second).cast<CArray<T>>();
      s.buffers.emplace_back(b.first.cast<std::string>(),
                             std::vector<T>(a.data(), a.data() + a.size()));
    }
    state.push_back(std::move(s));
  }
  opt.set_state(std::move(state));
}

template <class T>
void register_optimizer(py::module_& m, const char* name) {
  using O = Optimizer<T>;
  py::class_<O, std::unique_ptr<O>>(m, name,
                                    "An optimizer of the core (see gradchain.optim): torch.optim's "
                                    "single-tensor update, in the parameters' precision.")
      .def(py::init([](const py::dict& spec) { return make_optimizer<T>(optimizer_spec(spec)); }),
           py::arg("spec"),
           "From a dict of OptimizerSpec fields: kind ('sgd', 'adam', 'adamw', 'rmsprop', "
           "'adagrad'), lr, weight_decay, maximize, momentum, dampening, nesterov, beta1, beta2, "
           "eps, amsgrad, alpha, centered, lr_decay, initial_accumulator_value.")
      .def_property_readonly(
          "spec", [](const O& o) { return optimizer_dict(o.spec()); },
          "The spec as a dict (every field, each kind reads its own).")
      .def("step", &step_lists<T>, py::arg("params"), py::arg("grads"), py::arg("lr"),
           "One step at learning rate lr: params[i] (C-contiguous, writable) updated in place "
           "from grads[i]; parameter i is the i-th of the lists on every call.")
      .def("state", &state_list<T>,
           "[(step, {buffer name: 1-D copy})] per parameter, in torch's names and order.")
      .def("set_state", &set_state_list<T>, py::arg("state"),
           "Replaces the state with a list like state()'s (arrays of any shape, flattened).");
}

py::dict schedule_state_dict(const ScheduleState& s) {
  py::dict d;
  d["last_epoch"] = s.last_epoch;
  d["lr"] = s.lr;
  d["best"] = s.best;
  d["num_bad_epochs"] = s.num_bad_epochs;
  d["cooldown_counter"] = s.cooldown_counter;
  return d;
}

ScheduleState schedule_state(const py::dict& d) {
  ScheduleState s;
  for (auto item : d) {
    const auto key = item.first.cast<std::string>();
    if (key == "last_epoch")
      s.last_epoch = item.second.cast<std::int64_t>();
    else if (key == "lr")
      s.lr = item.second.cast<double>();
    else if (key == "best")
      s.best = item.second.cast<double>();
    else if (key == "num_bad_epochs")
      s.num_bad_epochs = item.second.cast<std::int64_t>();
    else if (key == "cooldown_counter")
      s.cooldown_counter = item.second.cast<std::int64_t>();
    else
      throw std::invalid_argument("unknown schedule state '" + key + "'");
  }
  return s;
}

// The rates of the next `steps` optimizer steps from the current state, which is left as it
// is; losses[t] is the loss of step t (plateau reads it; None: NaN, a step that never improves).
py::array_t<double> coming_rates(const LRSchedule& schedule, std::int64_t steps,
                                 const py::object& losses) {
  if (steps < 0)
    throw std::invalid_argument("steps must be an integer >= 0; got " + std::to_string(steps));
  CArray<double> loss;
  if (!losses.is_none()) {
    loss = losses.cast<CArray<double>>();
    if (loss.ndim() != 1 || loss.size() != steps)
      throw std::invalid_argument("losses must have shape (" + std::to_string(steps) + ",)");
  }
  const double* lp = losses.is_none() ? nullptr : loss.data();
  std::vector<double> out(static_cast<std::size_t>(steps));
  LRSchedule s = schedule;
  for (std::size_t t = 0; t < out.size(); ++t) {
    out[t] = s.lr();
    s.step(lp ? lp[t] : std::numeric_limits<double>::quiet_NaN());
  }
  return to_numpy_d(std::move(out));
}

}  // namespace

void bind_optim(py::module_& m) {
  register_optimizer<double>(m, "Optimizer64");
  register_optimizer<float>(m, "Optimizer32");
  m.def("optimizer_names", &optimizer_names);
  m.def("schedule_names", &schedule_names);

  py::class_<LRSchedule>(m, "LRSchedule",
                         "A learning-rate schedule of the core (see gradchain.optim.lr_scheduler).")
      .def(py::init([](const py::dict& spec, double base_lr) {
             return LRSchedule(schedule_spec(spec), base_lr);
           }),
           py::arg("spec"), py::arg("base_lr"),
           "From a dict of ScheduleSpec fields: kind ('constant', 'step', 'exponential', "
           "'cosine', 'linear', 'plateau'), step_size, gamma, T_max, eta_min, start_factor, "
           "end_factor, total_iters, mode ('min', 'max'), factor, patience, threshold, "
           "threshold_mode ('rel', 'abs'), cooldown, min_lr, eps; and the optimizer's lr.")
      .def_property_readonly("spec", [](const LRSchedule& s) { return schedule_dict(s.spec()); })
      .def_property_readonly("base_lr", &LRSchedule::base_lr)
      .def("lr", &LRSchedule::lr, "The learning rate of the coming optimizer step.")
      .def("step", &LRSchedule::step, py::arg("loss") = std::numeric_limits<double>::quiet_NaN(),
           "Called once after each optimizer step, with that step's loss (read by plateau).")
      .def(
          "state", [](const LRSchedule& s) { return schedule_state_dict(s.state()); },
          "{last_epoch, lr, best, num_bad_epochs, cooldown_counter}")
      .def(
          "set_state", [](LRSchedule& s, const py::dict& d) { s.set_state(schedule_state(d)); },
          py::arg("state"))
      .def("lrs", &coming_rates, py::arg("steps"), py::arg("losses") = py::none(),
           "The rates of the next `steps` steps, from a copy (this schedule is not advanced).");
}

}  // namespace gradchain::bindings
