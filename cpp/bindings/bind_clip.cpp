// Low-level bindings for gradient clipping. gradchain/clip.py validates and converts
// user input; these only accept lists of C-contiguous native float32/float64 arrays.
#include <string>
#include <vector>

#include "gradchain/clip.hpp"
#include "pybind.hpp"

namespace gradchain::bindings {

namespace {

// Borrows each array's buffer. `keep` holds a reference to every array so a buffer
// cannot be freed while the GIL is released, even if another thread edits the list.
std::vector<clip::Grad> grads_from(const py::list& arrays, std::vector<py::array>& keep,
                                   bool writable) {
  std::vector<clip::Grad> grads;
  grads.reserve(arrays.size());
  keep.reserve(arrays.size());
  std::size_t i = 0;
  for (py::handle h : arrays) {
    const std::string item = "arrays[" + std::to_string(i++) + "]";
    if (!py::isinstance<py::array>(h)) throw py::type_error(item + " is not a numpy.ndarray");
    auto a = py::reinterpret_borrow<py::array>(h);
    DType dtype;
    if (a.dtype().equal(py::dtype::of<float>()))
      dtype = DType::float32;
    else if (a.dtype().equal(py::dtype::of<double>()))
      dtype = DType::float64;
    else
      throw py::type_error(item + " must have dtype float32 or float64 (native byte order)");
    if (!(a.flags() & py::array::c_style)) throw py::value_error(item + " is not C-contiguous");
    if (writable && !a.writeable()) throw py::value_error(item + " is read-only");
    // Only total_norm gets read-only buffers, and it never writes through them.
    grads.push_back({dtype, const_cast<void*>(a.data()), static_cast<std::size_t>(a.size())});
    keep.push_back(std::move(a));
  }
  return grads;
}

}  // namespace

void bind_clip(py::module_& m) {
  // In all of these, pybind11 has converted the scalars to double/bool and grads_from
  // has extracted raw pointers before without_gil runs: no Python object is touched
  // without the GIL.
  m.def(
      "clip_total_norm",
      [](const py::list& arrays, double norm_type, bool error_if_nonfinite) {
        std::vector<py::array> keep;
        const auto grads = grads_from(arrays, keep, false);
        return without_gil([&] {
          Canceller cancel = signal_canceller();
          return clip::total_norm(grads, norm_type, error_if_nonfinite, &cancel);
        });
      },
      py::arg("arrays"), py::arg("norm_type"), py::arg("error_if_nonfinite"),
      "Total norm of C-contiguous float32/float64 arrays (see gradchain.clip).");
  m.def(
      "clip_grad_norm",
      [](const py::list& arrays, double max_norm, double norm_type, bool error_if_nonfinite) {
        std::vector<py::array> keep;
        const auto grads = grads_from(arrays, keep, true);
        return without_gil([&] {
          Canceller cancel = signal_canceller();
          return clip::clip_grad_norm(grads, max_norm, norm_type, error_if_nonfinite, &cancel);
        });
      },
      py::arg("arrays"), py::arg("max_norm"), py::arg("norm_type"), py::arg("error_if_nonfinite"),
      "Scales C-contiguous float32/float64 arrays in place; returns the total norm.");
  m.def(
      "clip_grad_value",
      [](const py::list& arrays, double clip_value) {
        std::vector<py::array> keep;
        const auto grads = grads_from(arrays, keep, true);
        without_gil([&] { clip::clip_grad_value(grads, clip_value); });
      },
      py::arg("arrays"), py::arg("clip_value"),
      "Clamps C-contiguous float32/float64 arrays to [-clip_value, clip_value] in place.");
  m.def("clip_coefficient", &clip::clip_coef, py::arg("total_norm"), py::arg("max_norm"),
        "min(1, max_norm / (total_norm + 1e-6)).");
}

}  // namespace gradchain::bindings
