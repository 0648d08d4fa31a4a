// The one header every binding file includes for pybind11, so that all of them see the
// same type casters.
#pragma once

#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "gradchain/common.hpp"

namespace py = pybind11;

namespace gradchain::bindings {

void bind_clip(py::module_& m);
void bind_mlp(py::module_& m);

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
