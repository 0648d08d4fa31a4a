// The one header every binding file includes for pybind11, so that all of them see the
// same type casters.
#pragma once

#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "gradchain/common.hpp"

namespace py = pybind11;

namespace gradchain::bindings {

void bind_chain(py::module_& m);
void bind_clip(py::module_& m);
void bind_jacobian(py::module_& m);
void bind_optim(py::module_& m);
void bind_rnn(py::module_& m);
void bind_train(py::module_& m);

// Hands a std::vector's buffer to NumPy without copying.
template <class T>
py::array_t<T> to_numpy(std::vector<T>&& v, std::vector<py::ssize_t> shape) {
  auto* heap = new std::vector<T>(std::move(v));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>(shape, heap->data(), owner);
}

inline py::array_t<double> to_numpy_d(std::vector<double>&& v) {
  const auto n = static_cast<py::ssize_t>(v.size());
  return to_numpy(std::move(v), {n});
}

template <class T>
using CArray = py::array_t<T, py::array::c_style | py::array::forcecast>;

// The loss target as the core reads it: int64 labels for cross-entropy, T values for mse
// and upstream gradients, nothing for the probe. `keep` holds the converted arrays.
// (In an unnamed namespace: pybind11's types have hidden visibility, and a struct that
// holds them must not be more visible than they are.)
namespace {
template <class T>
struct TargetArrays {
  CArray<T> values;
  py::array_t<std::int64_t, py::array::c_style | py::array::forcecast> labels;
};
template <class T>
const void* target_ptr(bool labels, bool none, py::object target, TargetArrays<T>& keep) {
  if (none) return nullptr;
  if (labels) {
    keep.labels = target.cast<decltype(keep.labels)>();
    return keep.labels.data();
  }
  keep.values = target.cast<CArray<T>>();
  return keep.values.data();
}

// An optional initial state (None: nullptr) of `size` entries, converted into `keep`.
// Shapes are checked by the Python layer; this guards the core.
template <class T>
const T* state_ptr(const py::object& a, py::ssize_t size, CArray<T>& keep, const char* what) {
  if (a.is_none()) return nullptr;
  keep = a.cast<CArray<T>>();
  if (keep.size() != size)
    throw std::invalid_argument(std::string(what) +
                                " must have shape (num_layers, batch, hidden_size)");
  return keep.data();
}
}  // namespace

// (steps, batch) of a (steps, batch, input_size) batch of sequences.
template <class T>
std::pair<int, int> checked_sequences(const CArray<T>& x, int input_size) {
  if (x.ndim() != 3 || x.shape(2) != input_size)
    throw std::invalid_argument("x must have shape (steps, batch, " + std::to_string(input_size) +
                                ")");
  constexpr auto most = std::numeric_limits<int>::max();
  if (x.shape(0) < 1 || x.shape(0) > most || x.shape(1) < 1 || x.shape(1) > most)
    throw std::invalid_argument("x must hold between 1 and 2**31 - 1 steps and sequences");
  return {static_cast<int>(x.shape(0)), static_cast<int>(x.shape(1))};
}

// The loss and the total-norm / clipping fields that every backward result has.
template <class R>
void put_loss_and_clip(py::dict& d, const R& r) {
  d["loss"] = r.loss;
  d["log10_loss"] = r.log10_loss;
  d["norm_type"] = r.norm_type;
  d["log10_total_norm"] = r.log10_total_norm;
  d["clipped"] = r.clipped;
  d["max_norm"] = r.max_norm;
  d["log10_clip_coef"] = r.log10_clip_coef;
}

// A Canceller whose hook checks for pending signals (Ctrl-C). Safe to call with the GIL
// released: the hook takes the GIL for the check only.
Canceller signal_canceller();

// Runs f with the GIL released and turns gradchain::Interrupted into the pending
// KeyboardInterrupt.
template <class F>
auto without_gil(F&& f) -> decltype(f()) {
  try {
    py::gil_scoped_release release;
    return f();
  } catch (const Interrupted&) {
    throw py::error_already_set();
  }
}

}  // namespace gradchain::bindings
