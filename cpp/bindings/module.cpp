#include "gradchain/system.hpp"
#include "gradchain/vecmath.hpp"
#include "pybind.hpp"

namespace gradchain::bindings {

Canceller signal_canceller() {
  return Canceller([] {
    py::gil_scoped_acquire gil;
    return PyErr_CheckSignals() != 0;
  });
}

}  // namespace gradchain::bindings

PYBIND11_MODULE(_core, m) {
  using namespace gradchain;
  m.doc() = "gradchain's compiled core (private; use the gradchain package)";
  m.attr("__version__") = GRADCHAIN_VERSION;

  // NonFiniteError lives in Python (gradchain.errors) so that it can derive from
  // FloatingPointError; looked up when first raised.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const NonFiniteError& e) {
      py::object cls = py::module_::import("gradchain.errors").attr("NonFiniteError");
      py::object exc = cls(e.what(), e.where(), e.index());
      PyErr_SetObject(cls.ptr(), exc.ptr());
    } catch (const MemoryRequestError& e) {
      PyErr_SetString(PyExc_MemoryError, e.what());
    }
  });

  m.def("physical_memory_bytes", &physical_memory_bytes,
        "Physical memory of this machine in bytes.");
  m.def(
      "memory_limit",
      [](const std::string& root) {
        const MemoryLimit lim = memory_limit(root);
        return py::make_tuple(lim.bytes, lim.physical, lim.source);
      },
      py::arg("root") = "",
      R"doc((bytes, physical, source): the memory new allocations may take now, the physical
memory, and which limit sets the first (MemAvailable, a cgroup limit, GRADCHAIN_MEMORY_LIMIT).
`root` is prepended to the /proc and /sys paths read (for tests).)doc");
  m.def("check_memory", &check_memory, py::arg("bytes"), py::arg("what"), py::arg("reusable") = 0.0,
        "Raises MemoryError '<what> needs N bytes ..., more than <limit>' when bytes exceed "
        "memory_limit().");
  m.def("forked_single_threaded", &forked_single_threaded,
        "True in a process forked after the forking thread ran one of the core's parallel "
        "loops: the core then runs on one thread.");
  m.def("max_threads", &max_threads, "Threads the core's own parallel loops use.");
  m.def("set_thread_limit", &set_thread_limit, py::arg("threads"),
        "Caps the threads of the core's runs started from the calling thread (0: no cap); "
        "returns the previous cap.");
  m.def("blas_threads", &blas_threads,
        "Threads the core may give OpenBLAS: its count now (1 in a forked single-threaded child).");
  m.def("vectorized_math", &vm::vectorized, "Whether activations use glibc's vector math library.");
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif

  bindings::bind_chain(m);
  bindings::bind_clip(m);
  bindings::bind_jacobian(m);
  bindings::bind_optim(m);
  bindings::bind_rnn(m);
  bindings::bind_train(m);
}
