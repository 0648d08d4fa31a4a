#include "gradchain/blas.hpp"
#include "gradchain/rng.hpp"
#include "gradchain/small_gemm.hpp"
#include "gradchain/system.hpp"
#include "gradchain/vecmath.hpp"
#include "pybind.hpp"

namespace gradchain::bindings {

namespace {
small::Isa parse_isa(const std::string& name) {
  for (small::Isa i : {small::Isa::blas, small::Isa::avx2, small::Isa::avx512})
    if (name == small::isa_name(i)) return i;
  throw std::invalid_argument("isa must be 'avx512', 'avx2' or 'blas'; got '" + name + "'");
}

VectorIsa parse_rng_isa(const std::string& name) {
  for (VectorIsa i : {VectorIsa::none, VectorIsa::avx2, VectorIsa::avx512})
    if (name == rng_isa_name(i)) return i;
  throw std::invalid_argument("isa must be 'avx512', 'avx2' or 'scalar'; got '" + name + "'");
}

// n numbers of one stream through fill(Philox(seed), stream, ...).
template <void (*fill)(const Philox&, std::uint64_t, double*, std::uint64_t, Canceller*, double)>
py::array_t<double> draw(std::uint64_t seed, std::uint64_t stream, std::uint64_t n) {
  py::array_t<double> out(static_cast<py::ssize_t>(n));
  fill(Philox(seed), stream, out.mutable_data(), n, nullptr, 1.0);
  return out;
}

// op(a) op(b) through the core's product (the small-product kernels where they apply).
template <class T>
py::array_t<T> product(const py::array_t<T, py::array::c_style | py::array::forcecast>& a,
                       const py::array_t<T, py::array::c_style | py::array::forcecast>& b, bool ta,
                       bool tb, double alpha) {
  if (a.ndim() != 2 || b.ndim() != 2) throw std::invalid_argument("a and b must be 2-d");
  const int ar = static_cast<int>(a.shape(0)), ac = static_cast<int>(a.shape(1));
  const int br = static_cast<int>(b.shape(0)), bc = static_cast<int>(b.shape(1));
  const int m = ta ? ac : ar, k = ta ? ar : ac, kb = tb ? bc : br, n = tb ? br : bc;
  if (k != kb)
    throw std::invalid_argument("op(a) has " + std::to_string(k) + " columns but op(b) has " +
                                std::to_string(kb) + " rows");
  py::array_t<T> c({m, n});
  if (m > 0 && n > 0)
    blas::gemm(ta ? blas::Trans::T : blas::Trans::N, tb ? blas::Trans::T : blas::Trans::N, m, n, k,
               static_cast<T>(alpha), a.data(), ac, b.data(), bc, T(0), c.mutable_data(), n);
  return c;
}
}  // namespace

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
  m.def(
      "kernel_isa", [] { return std::string(small::isa_name(small::isa())); },
      "The instruction set of the small-product kernels in use: 'avx512', 'avx2' or 'blas'.");
  m.def(
      "set_kernel_isa",
      [](const std::string& name) {
        return std::string(small::isa_name(small::set_isa(bindings::parse_isa(name))));
      },
      py::arg("isa"),
      "Uses the small-product kernels of `isa` (one the CPU has; 'blas': none) from now on; "
      "returns the one used before. For comparing the variants.");
  m.def(
      "rng_isa", [] { return std::string(rng_isa_name(rng_isa())); },
      "The instruction set of the random number generators in use: 'avx512', 'avx2' or "
      "'scalar'.");
  m.def(
      "set_rng_isa",
      [](const std::string& name) {
        return std::string(rng_isa_name(set_rng_isa(bindings::parse_rng_isa(name))));
      },
      py::arg("isa"),
      "Uses the generators of `isa` (one the CPU has; 'scalar': none) from now on; returns the "
      "one used before. All give the same numbers; for comparing them.");
  m.def(
      "philox_blocks",
      [](std::uint64_t seed, std::uint64_t stream, std::uint64_t first, std::uint64_t n) {
        py::array_t<std::uint32_t> out({static_cast<py::ssize_t>(n), py::ssize_t{4}});
        philox_blocks(Philox(seed), stream, first, n, out.mutable_data());
        return out;
      },
      py::arg("seed"), py::arg("stream"), py::arg("first"), py::arg("n"),
      "Philox4x32-10 blocks first .. first + n - 1 of a stream as an (n, 4) uint32 array: "
      "counter (index low, index high, stream low, stream high), key (seed low, seed high).");
  m.def("fill_normal", &bindings::draw<fill_normal>, py::arg("seed"), py::arg("stream"),
        py::arg("n"), "The first n standard normals of a stream, as the initializers draw them.");
  m.def("fill_uniform_pm1", &bindings::draw<fill_uniform_pm1>, py::arg("seed"), py::arg("stream"),
        py::arg("n"),
        "The first n uniforms on [-1, 1) of a stream, as the initializers draw them.");
  m.def("gemm", &bindings::product<double>, py::arg("a").noconvert(), py::arg("b").noconvert(),
        py::arg("trans_a") = false, py::arg("trans_b") = false, py::arg("alpha") = 1.0,
        "alpha op(a) op(b) in float64 through the core's product (for tests).");
  m.def("gemm", &bindings::product<float>, py::arg("a").noconvert(), py::arg("b").noconvert(),
        py::arg("trans_a") = false, py::arg("trans_b") = false, py::arg("alpha") = 1.0,
        "alpha op(a) op(b) in float32 through the core's product (for tests).");
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
