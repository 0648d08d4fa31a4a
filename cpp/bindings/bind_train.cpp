#include <memory>
#include <string>
#include <vector>

#include "gradchain/train.hpp"
#include "pybind.hpp"

namespace gradchain::bindings {
namespace {

using Labels = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;

// Views of the first `rows` rows of a history; each keeps the history alive.
py::dict history_dict(std::shared_ptr<const TrainHistory> h, std::int64_t rows) {
  auto* keep = new std::shared_ptr<const TrainHistory>(h);
  py::capsule owner(keep,
                    [](void* p) { delete static_cast<std::shared_ptr<const TrainHistory>*>(p); });
  const auto R = static_cast<py::ssize_t>(rows);
  auto vec = [&](const std::vector<double>& v) {
    return py::array_t<double>({R}, v.data(), owner);
  };
  auto mat = [&](const std::vector<double>& v, std::size_t cols) {
    const auto C = static_cast<py::ssize_t>(cols);
    return py::array_t<double>({R, C}, v.data(), owner);
  };
  py::dict d;
  d["steps"] = py::array_t<std::int64_t>({R}, h->steps.data(), owner);
  d["loss"] = vec(h->loss);
  d["log10_loss"] = vec(h->log10_loss);
  d["log10_total_norm"] = vec(h->log10_total_norm);
  d["log10_clipped_total_norm"] = vec(h->log10_clipped_total_norm);
  d["log10_clip_coef"] = vec(h->log10_clip_coef);
  d["lr"] = vec(h->lr);
  d["val_loss"] = h->val_loss.empty() ? py::object(py::none()) : py::object(vec(h->val_loss));
  d["log10_param_grad_norms"] = mat(h->log10_param_grad_norms, h->P);
  d["log10_param_norms"] = mat(h->log10_param_norms, h->P);
  d["log10_update_ratios"] = mat(h->log10_update_ratios, h->P);
  d["log10_activation_grad_norms"] =
      h->A ? py::object(mat(h->log10_activation_grad_norms, h->A)) : py::object(py::none());
  d["stopped"] = stopped_name(h->stopped);
  d["steps_run"] = h->steps_run;
  if (h->has_nonfinite) {
    py::dict nf;
    nf["step"] = h->nonfinite.step;
    nf["what"] = h->nonfinite.what;
    nf["where"] = h->nonfinite.where;
    nf["index"] = h->nonfinite.index;
    nf["message"] = h->nonfinite.message;
    d["nonfinite"] = nf;
  } else {
    d["nonfinite"] = py::none();
  }
  return d;
}

// The pointer to a target array: int64 labels for cross-entropy, T values for mse.
template <class T>
const void* target(const py::object& y, bool labels, CArray<T>& values, Labels& ints) {
  if (labels) {
    ints = y.cast<Labels>();
    return ints.data();
  }
  values = y.cast<CArray<T>>();
  return values.data();
}

template <class T, class Net>
py::dict train(Net& net, const std::vector<std::size_t>& order, CArray<T> x, py::object y,
               py::object x_val, py::object y_val, const std::string& loss, bool sequences,
               bool every_step, py::object optimizer, py::object schedule, std::int64_t steps,
               int batch_size, std::uint64_t seed, bool shuffle, double max_norm, double norm_type,
               double clip_value, double max_weight_norm, std::int64_t record_every,
               bool record_activation_grads, bool train_mode, const std::string& truncation,
               int window, py::object callback) {
  static const std::vector<std::string> truncations = {"none", "detach", "window"};
  TrainData<T> d;
  d.loss = parse_loss(loss);
  if (d.loss != LossKind::mse && d.loss != LossKind::cross_entropy)
    throw std::invalid_argument("loss must be one of 'mse', 'cross_entropy'; got '" + loss + "'");
  const bool labels = d.loss == LossKind::cross_entropy;
  // Shapes are checked by the Python layer; these guard the core.
  const py::ssize_t xdim = sequences ? 3 : 2;
  if (x.ndim() != xdim) throw std::invalid_argument("x has the wrong number of dimensions");
  d.sequences = sequences;
  d.every_step = sequences && every_step;
  d.seq_len = sequences ? static_cast<int>(x.shape(0)) : 1;
  d.n = static_cast<std::int64_t>(x.shape(sequences ? 1 : 0));
  d.in = static_cast<int>(x.shape(xdim - 1));
  d.x = x.data();
  CArray<T> yv, yvv, xv;
  Labels yl, yvl;
  d.y = target<T>(y, labels, yv, yl);
  const py::ssize_t ysteps = d.every_step ? d.seq_len : 1;
  const py::ssize_t ysize = labels ? yl.size() : yv.size();
  d.out = labels ? 1 : static_cast<int>(yv.size() / std::max<py::ssize_t>(1, ysteps * d.n));
  if (ysize != ysteps * d.n * d.out) throw std::invalid_argument("y does not fit x");
  if (!x_val.is_none()) {
    xv = x_val.cast<CArray<T>>();
    if (xv.ndim() != xdim || xv.shape(xdim - 1) != d.in || (sequences && xv.shape(0) != d.seq_len))
      throw std::invalid_argument("x_val does not fit x");
    d.x_val = xv.data();
    d.n_val = static_cast<std::int64_t>(xv.shape(sequences ? 1 : 0));
    d.y_val = target<T>(y_val, labels, yvv, yvl);
    if ((labels ? yvl.size() : yvv.size()) != ysteps * d.n_val * d.out)
      throw std::invalid_argument("y_val does not fit x_val");
  }
  TrainOptions o;
  o.steps = steps;
  o.batch_size = batch_size;
  o.seed = seed;
  o.shuffle = shuffle;
  o.max_norm = max_norm;
  o.norm_type = norm_type;
  o.clip_value = clip_value;
  o.max_weight_norm = max_weight_norm;
  o.record_every = record_every;
  o.record_activation_grads = record_activation_grads;
  o.train = train_mode;
  o.truncation = static_cast<Truncation>(parse_name("truncate_mode", truncation, truncations));
  o.window = window;
  Optimizer<T>* opt = nullptr;
  try {
    opt = &optimizer.cast<Optimizer<T>&>();
  } catch (const py::cast_error&) {
    throw py::type_error(std::string("optimizer must be the core optimizer for ") +
                         (sizeof(T) == 4 ? "float32" : "float64") + " parameters");
  }
  LRSchedule* sched = schedule.is_none() ? nullptr : &schedule.cast<LRSchedule&>();

  // A callback's exception ends the run; it is handed back with the history.
  py::object error = py::none();
  TrainCallback cb;
  if (!callback.is_none())
    cb = [&](std::int64_t step, const TrainHistory& h) {
      py::gil_scoped_acquire gil;
      try {
        return callback(step, history_dict(h.shared_from_this(), h.rows)).template cast<bool>();
      } catch (py::error_already_set& e) {
        error = e.value();
        return true;
      }
    };
  // The arrays the core reads are held by this frame and the net and optimizer by the
  // caller, so the GIL can go; it is taken back only to call the callback.
  std::shared_ptr<TrainHistory> h = without_gil([&] {
    Canceller cancel = signal_canceller();
    if constexpr (std::is_same_v<Net, Chain<T>>)
      return gradchain::train(net, order, d, *opt, sched, o, cancel, cb);
    else
      return gradchain::train(net, d, *opt, sched, o, cancel, cb);
  });
  py::dict out = history_dict(h, h->rows);
  // Ctrl-C: the KeyboardInterrupt that the signal check raised is pending.
  if (h->stopped == Stopped::interrupted && PyErr_Occurred()) {
    py::error_already_set e;
    error = e.value();
  }
  out["exception"] = error;
  return out;
}

template <class T>
void bind_dtype(py::module_& m) {
  m.def("train", &train<T, Chain<T>>, py::arg("net"), py::arg("order"), py::arg("x"), py::arg("y"),
        py::arg("x_val"), py::arg("y_val"), py::arg("loss"), py::arg("sequences"),
        py::arg("every_step"), py::arg("optimizer"), py::arg("schedule"), py::arg("steps"),
        py::arg("batch_size"), py::arg("seed"), py::arg("shuffle"), py::arg("max_norm"),
        py::arg("norm_type"), py::arg("clip_value"), py::arg("max_weight_norm"),
        py::arg("record_every"), py::arg("record_activation_grads"), py::arg("train"),
        py::arg("truncation"), py::arg("window"), py::arg("callback"));
  m.def("train", &train<T, RecurrentChain<T>>, py::arg("net"), py::arg("order"), py::arg("x"),
        py::arg("y"), py::arg("x_val"), py::arg("y_val"), py::arg("loss"), py::arg("sequences"),
        py::arg("every_step"), py::arg("optimizer"), py::arg("schedule"), py::arg("steps"),
        py::arg("batch_size"), py::arg("seed"), py::arg("shuffle"), py::arg("max_norm"),
        py::arg("norm_type"), py::arg("clip_value"), py::arg("max_weight_norm"),
        py::arg("record_every"), py::arg("record_activation_grads"), py::arg("train"),
        py::arg("truncation"), py::arg("window"), py::arg("callback"));
}

}  // namespace

void bind_train(py::module_& m) {
  bind_dtype<double>(m);
  bind_dtype<float>(m);
  m.def(
      "batch_order",
      [](std::int64_t n, int batch_size, std::int64_t steps, std::uint64_t seed, bool shuffle) {
        std::vector<std::int64_t> v = batch_order(n, batch_size, steps, seed, shuffle);
        return to_numpy(std::move(v), {static_cast<py::ssize_t>(steps), batch_size});
      },
      py::arg("n"), py::arg("batch_size"), py::arg("steps"), py::arg("seed"), py::arg("shuffle"),
      "The (steps, batch_size) example indices a training run draws.");
}

}  // namespace gradchain::bindings
